#!/usr/bin/env python3
"""Parity fixtures for the tokenizer, the text encoder and the VAE of pixmarket-engine.

Builds small random models with the reference implementations (transformers'
Qwen2_5_VLForConditionalGeneration and Qwen2Tokenizer, diffusers' AutoencoderKLQwenImage),
saves them in the real diffusers / transformers file layouts, and records what the reference
computes for them. The Rust tests in engine/tests/{tokenizer,text_encoder,vae}_*.rs load the
same files and compare.

Usage (from the repository root; nothing is downloaded):

    /work/pyref/bin/python engine/tools/make_encoder_vae_fixtures.py

Writes engine/tests/fixtures/{tokenizer,text_encoder,vae}/. Everything is seeded, so a rerun
reproduces the files up to library version changes.

Tokenizer: a byte-level BPE trained here on a few sentences, with the Qwen2 pre-tokenizer regex,
NFC and the Qwen special tokens added after the vocabulary (as in the real Qwen2 tokenizer, whose
vocab.json holds no special tokens). Two folders: `bpe/` (vocab.json + merges.txt +
tokenizer_config.json, the layout of the Qwen-Image repo's tokenizer/) and `json/` (tokenizer.json
as transformers saves it).

The template prefix drop: the reference pipeline hard-codes 34, the prefix length in the real
Qwen2 vocabulary. With this tiny vocabulary the prefix is longer, so the reference embeddings are
computed with the pipeline's own code path but with drop_idx = the number of tokens of the
template prefix in this tokenizer (recorded in expected.json), which is how the Rust side derives
it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"

TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}"
    "<|im_end|>\n<|im_start|>assistant\n"
)
# Qwen2 pre-tokenizer regex, as in the tokenizer.json of Qwen2 / Qwen2.5 models.
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
    r"""\s*[\r\n]+|\s+(?!\S)|\s+"""
)
# Special tokens of Qwen2.5-VL in id order; the real ids start at 151643.
SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
# Added tokens that are not special in the real tokenizer.
PLAIN_ADDED_TOKENS = ["<tool_call>", "</tool_call>"]

CORPUS = [
    "Describe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:",
    "A red cat sitting on a blue chair in the morning light.",
    "Two dogs play in the park; it's a sunny day and they're happy.",
    "A photograph of a mountain lake at sunset, ultra HD, 4K, cinematic composition.",
    "The quick brown fox jumps over the lazy dog 1234567890 times.",
    "Café au lait, naïve façade, 東京 at night with neon signs.",
    "system user assistant",
]

PROMPTS = [
    "A red cat sitting on a blue chair",
    "",
    "  two  spaces\n\nand a blank line; it's I'M we'll 2024!",
    "Café naïve 東京 🐱 — ultra HD, 4K, cinematic composition.",
    "user said <|im_end|> in the middle",
    # Long enough to be cut at 512 tokens after the template drop.
    " ".join(f"word{i} zebra{i % 7}" for i in range(400)),
]
MAX_SEQUENCE_LENGTH = 512


def build_tokenizer(out: Path):
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=[],
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 4, trainer=trainer)

    bpe_dir = out / "bpe"
    bpe_dir.mkdir(parents=True)
    tok.model.save(str(bpe_dir))  # vocab.json + merges.txt
    vocab_size = tok.get_vocab_size()
    added = {}
    for i, t in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS):
        added[str(vocab_size + i)] = {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": t in SPECIAL_TOKENS,
        }
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    (bpe_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))

    # The reference: transformers loading the vocab.json + merges.txt folder, as it loads the
    # Qwen-Image repo's tokenizer/.
    ref = AutoTokenizer.from_pretrained(str(bpe_dir))
    json_dir = out / "json"
    ref.save_pretrained(str(json_dir))
    for extra in json_dir.iterdir():
        if extra.name != "tokenizer.json":
            extra.unlink()
    ref_json = AutoTokenizer.from_pretrained(str(bpe_dir))

    prefix = TEMPLATE.split("{}")[0]
    drop_idx = len(ref(prefix)["input_ids"])
    cases = []
    for p in PROMPTS:
        full = ref(TEMPLATE.format(p))["input_ids"]
        again = ref_json(TEMPLATE.format(p))["input_ids"]
        assert full == again
        kept = full[: drop_idx + MAX_SEQUENCE_LENGTH]
        cases.append(
            {
                "prompt": p,
                "ids": kept,
                "full_len": len(full),
                "user_prompt_tokens": min(len(ref(p, add_special_tokens=False)["input_ids"]), MAX_SEQUENCE_LENGTH),
            }
        )
    expected = {
        "template": TEMPLATE,
        "drop_index": drop_idx,
        "max_sequence_length": MAX_SEQUENCE_LENGTH,
        "vocab_size": vocab_size,
        "added_tokens": {t: vocab_size + i for i, t in enumerate(SPECIAL_TOKENS + PLAIN_ADDED_TOKENS)},
        "cases": cases,
    }
    (out / "expected.json").write_text(json.dumps(expected, indent=1, ensure_ascii=False))
    return ref, drop_idx, vocab_size + len(SPECIAL_TOKENS) + len(PLAIN_ADDED_TOKENS)


def reference_prompt_embeds(tokenizer, model, prompts, drop_idx):
    """QwenImagePipeline._get_qwen_prompt_embeds + encode_prompt's cut, with our drop index."""
    txt = [TEMPLATE.format(p) for p in prompts]
    toks = tokenizer(txt, max_length=1024 + drop_idx, padding=True, truncation=True, return_tensors="pt")
    out = model(input_ids=toks.input_ids, attention_mask=toks.attention_mask, output_hidden_states=True)
    hidden = out.hidden_states[-1]
    bool_mask = toks.attention_mask.bool()
    selected = hidden[bool_mask]
    split = torch.split(selected, bool_mask.sum(dim=1).tolist(), dim=0)
    split = [e[drop_idx:] for e in split]
    max_len = max(e.size(0) for e in split)
    embeds = torch.stack([torch.cat([u, u.new_zeros(max_len - u.size(0), u.size(1))]) for u in split])
    mask = torch.stack(
        [torch.cat([torch.ones(u.size(0), dtype=torch.long), torch.zeros(max_len - u.size(0), dtype=torch.long)]) for u in split]
    )
    embeds = embeds[:, :MAX_SEQUENCE_LENGTH]
    mask = mask[:, :MAX_SEQUENCE_LENGTH]
    return toks, hidden, embeds, mask


def build_text_encoder(out: Path, tokenizer, drop_idx: int, vocab: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(1)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,  # GQA 2:1 like the real 28:4
            vocab_size=vocab,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            rope_theta=1e6,
            max_position_embeddings=4096,
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
    )
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        # Random norms and biases too, so that a missed weight shows.
        for name, p in model.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))

    # Layout as transformers saves it (`model.*` for the language model), sharded with an index.
    sharded = out / "sharded"
    model.save_pretrained(str(sharded), max_shard_size="60KB")
    (sharded / "generation_config.json").unlink(missing_ok=True)
    # The transformers >= 4.52 layout of the Qwen-Image checkpoint (`model.language_model.*`), one
    # file, made by renaming keys in a copy.
    nested = out / "nested"
    nested.mkdir()
    tensors = {}
    for f in sorted(sharded.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
    renamed = {}
    for k, v in tensors.items():
        if k.startswith("model.") and not k.startswith("model.visual.") and not k.startswith("model.language_model."):
            k = "model.language_model." + k[len("model.") :]
        renamed[k] = v.contiguous()
    assert any(k.startswith("model.language_model.layers.0.") for k in renamed)
    save_file(renamed, str(nested / "model.safetensors"), metadata={"format": "pt"})
    shutil.copy(sharded / "config.json", nested / "config.json")

    expected = {}
    with torch.no_grad():
        # One prompt at a time (the B=1 path the pipeline uses).
        for i, p in enumerate(PROMPTS[:3]):
            toks, hidden, embeds, mask = reference_prompt_embeds(tokenizer, model, [p], drop_idx)
            expected[f"ids_{i}"] = toks.input_ids[0].to(torch.int64)
            expected[f"hidden_{i}"] = hidden[0]
            expected[f"embeds_{i}"] = embeds[0]
        # The long prompt: the reference encodes 1024 + drop tokens and keeps the first 512 after
        # the drop; the Rust side encodes only drop + 512 (equal, as the model is causal).
        _, _, embeds, _ = reference_prompt_embeds(tokenizer, model, PROMPTS[-1:], drop_idx)
        expected["embeds_long"] = embeds[0]
        # A padded batch of two prompts of different lengths.
        toks, hidden, embeds, mask = reference_prompt_embeds(tokenizer, model, PROMPTS[:2], drop_idx)
        expected["batch_ids"] = toks.input_ids.to(torch.int64)
        expected["batch_attention_mask"] = toks.attention_mask.to(torch.int64)
        expected["batch_embeds"] = embeds
        expected["batch_mask"] = mask.to(torch.int64)
        # The production dtype: the same model and prompt 2 run in bf16 by the reference.
        model.to(torch.bfloat16)
        _, hidden, _, _ = reference_prompt_embeds(tokenizer, model, PROMPTS[2:3], drop_idx)
        expected["hidden_2_bf16"] = hidden[0].float()
        model.to(torch.float32)
    save_file({k: v.contiguous() for k, v in expected.items()}, str(out / "expected.safetensors"))
    (out / "meta.json").write_text(
        json.dumps({"drop_index": drop_idx, "prompts": PROMPTS[:3], "long_prompt": PROMPTS[-1]}, indent=1, ensure_ascii=False)
    )


# Latent statistics of the real Qwen-Image VAE (diffusers' defaults), so the (de)normalisation is
# exercised with realistic numbers.
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]


def build_vae(out: Path):
    from diffusers import AutoencoderKLQwenImage

    torch.manual_seed(2)
    # The real block structure (dim_mult [1,2,4,4], 2 res blocks, temporal flags [F,T,T] so both
    # upsample3d/downsample3d and the 2-D resamplers appear), at 1/16 of the real width.
    vae = AutoencoderKLQwenImage(
        base_dim=6,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=2,
        attn_scales=[],
        temperal_downsample=[False, True, True],
        dropout=0.0,
        latents_mean=LATENTS_MEAN,
        latents_std=LATENTS_STD,
    ).eval()
    with torch.no_grad():
        for name, p in vae.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
        # Stored in bf16 like the real checkpoint (and half the size); the reference below runs
        # in f32 on exactly these values, so the loader's bf16 -> f32 conversion is exact.
        for p in vae.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    vae.to(torch.bfloat16).save_pretrained(str(out), safe_serialization=True)
    vae.to(torch.float32)

    z_dim = 16
    h, w = 6, 8  # latent size; non-square so a transposed axis shows
    latents = torch.randn(1, z_dim, 1, h, w)  # normalised, as the pipeline holds them
    image = torch.rand(1, 3, 1, h * 8, w * 8) * 2 - 1
    mean = torch.tensor(LATENTS_MEAN).view(1, z_dim, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(LATENTS_STD).view(1, z_dim, 1, 1, 1)
    with torch.no_grad():
        # QwenImagePipeline: latents / latents_std + latents_mean (latents_std = 1 / std), then [:, :, 0].
        decoded = vae.decode(latents / inv_std + mean, return_dict=False)[0][:, :, 0]
        # Unclamped too: the clamp could hide errors where the random decoder saturates.
        raw = vae.post_quant_conv(latents / inv_std + mean)
        vae.clear_cache()
        unclamped = vae.decoder(raw[:, :, :1], feat_cache=vae._feat_map, feat_idx=[0])[:, :, 0]
        vae.clear_cache()
        dist = vae.encode(image).latent_dist
        normalised = (dist.mean - mean) * inv_std  # QwenImageImg2ImgPipeline._encode_vae_image
    save_file(
        {
            "latents": latents[:, :, 0].contiguous(),
            "decoded": decoded.contiguous(),
            "decoded_unclamped": unclamped.contiguous(),
            "image": image[:, :, 0].contiguous(),
            "posterior_mean": dist.mean[:, :, 0].contiguous(),
            "posterior_std": dist.std[:, :, 0].contiguous(),
            "posterior_mean_normalised": normalised[:, :, 0].contiguous(),
        },
        str(out / "expected.safetensors"),
    )


def record_real_shapes(root: Path):
    """Names and shapes of the full-size models, from meta-device instances (no memory): the Rust
    tests build the real configs over a shapes-only backend and must ask for exactly these."""
    from diffusers import AutoencoderKLQwenImage
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    with torch.device("meta"):
        vae = AutoencoderKLQwenImage()  # the defaults are the shipped Qwen-Image config
        te = Qwen2_5_VLForConditionalGeneration(
            Qwen2_5_VLConfig(
                text_config=dict(
                    hidden_size=3584,
                    intermediate_size=18944,
                    num_hidden_layers=28,
                    num_attention_heads=28,
                    num_key_value_heads=4,
                    vocab_size=152064,
                    rms_norm_eps=1e-6,
                    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]},
                    rope_theta=1e6,
                ),
                vision_config=dict(depth=1),  # the tower is never read; keep the meta model small
            )
        )
    def write(path: Path, shapes: dict):  # one tensor per line, sorted, so diffs stay readable
        lines = [f"{json.dumps(k)}: {json.dumps(v)}" for k, v in sorted(shapes.items())]
        path.write_text("{\n" + ",\n".join(lines) + "\n}\n")

    write(root / "vae" / "real_shapes.json", {k: list(v.shape) for k, v in vae.state_dict().items()})
    # transformers 5 holds the language model as `model.language_model.*` in memory, the layout of
    # the Qwen-Image checkpoint.
    lm = {k: list(v.shape) for k, v in te.state_dict().items() if k.startswith("model.language_model.")}
    assert len(lm) == 2 + 28 * 12, len(lm)
    write(root / "text_encoder" / "real_shapes.json", lm)


def main():
    for sub in ("tokenizer", "text_encoder", "vae"):
        d = ROOT / sub
        if d.exists():
            shutil.rmtree(d)
        d.mkdir(parents=True)
    tokenizer, drop_idx, vocab = build_tokenizer(ROOT / "tokenizer")
    build_text_encoder(ROOT / "text_encoder", tokenizer, drop_idx, vocab)
    build_vae(ROOT / "vae")
    record_real_shapes(ROOT)
    total = sum(f.stat().st_size for sub in ("tokenizer", "text_encoder", "vae") for f in (ROOT / sub).rglob("*") if f.is_file())
    print(f"fixtures written under {ROOT}: {total / 1e6:.2f} MB, drop index {drop_idx}, vocab {vocab}")


if __name__ == "__main__":
    main()
