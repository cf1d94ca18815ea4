#!/usr/bin/env python3
"""Parity fixtures for the whole pipelines of pixmarket-engine (text-to-image, image-to-image,
inpaint) against diffusers' QwenImagePipeline / QwenImageImg2ImgPipeline /
QwenImageInpaintPipeline.

Builds a small random Qwen-Image pipeline (tokenizer from the tokenizer fixture, a small
Qwen2.5-VL text encoder, a small transformer and VAE, the shipped scheduler config), saves it with
`QwenImagePipeline.save_pretrained` -- so the Rust side also proves it loads such a folder -- and
records the final images of a few short runs in f32.

Usage (from the repository root; nothing is downloaded):

    /work/pyref/bin/python engine/tools/make_pipeline_fixtures.py

Writes engine/tests/fixtures/pipeline/. Seeds are fixed; a rerun with the same library versions
rewrites the same numbers.

How the runs are made comparable:
- the starting noise is given: `latents.safetensors`-style files (tensor `latents`, shape
  [1, 16, H/8, W/8], the noise before packing). Text-to-image passes it packed as `latents=`.
  The image-to-image and inpaint pipelines ignore (img2img) or cannot take (inpaint) `latents=`
  as noise, so their `randn_tensor` is patched to return the given noise;
- the VAE posterior is taken at its mean (pixmarket's choice; diffusers samples it), by patching
  `retrieve_latents`;
- the template drop index is the prefix length in this tiny vocabulary (the reference hard-codes
  34, the length in the real vocabulary), exactly as the tokenizer fixture does;
- the init image and the mask are PNGs at the target size, so no resampling happens.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file

ROOT = Path(__file__).resolve().parents[1] / "tests" / "fixtures"
OUT = ROOT / "pipeline"

WIDTH, HEIGHT = 64, 48  # non-square, multiples of 16: a 4x3 patch grid
SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=1.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=0.9,
    base_image_seq_len=256,
    max_image_seq_len=8192,
    shift_terminal=0.02,
    time_shift_type="exponential",
    invert_sigmas=False,
    stochastic_sampling=False,
    use_karras_sigmas=False,
    use_exponential_sigmas=False,
    use_beta_sigmas=False,
)
LATENTS_MEAN = [-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508, 0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921]
LATENTS_STD = [2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743, 3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160]
TEMPLATE_PREFIX = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, "
    "text, spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n"
)

CASES = [
    # name, mode, prompt, negative (None = no CFG), steps, cfg, strength
    dict(name="t2i_2step", mode="t2i", prompt="A red cat sitting on a blue chair", negative=None, steps=2, cfg=1.0, strength=None),
    dict(name="t2i_3step_cfg", mode="t2i", prompt="a mountain lake at sunset", negative="blurry", steps=3, cfg=4.0, strength=None),
    dict(name="img2img", mode="img2img", prompt="two dogs play in the park", negative=" ", steps=4, cfg=2.5, strength=0.5),
    dict(name="inpaint", mode="inpaint", prompt="A red cat", negative=None, steps=4, cfg=1.0, strength=0.75),
]


def build_pipeline():
    from diffusers import (
        AutoencoderKLQwenImage,
        FlowMatchEulerDiscreteScheduler,
        QwenImagePipeline,
        QwenImageTransformer2DModel,
    )
    from transformers import AutoTokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    tokenizer = AutoTokenizer.from_pretrained(str(ROOT / "tokenizer" / "bpe"))
    vocab = len(tokenizer)
    ids = lambda t: tokenizer.convert_tokens_to_ids(t)  # noqa: E731

    torch.manual_seed(11)
    te_cfg = Qwen2_5_VLConfig(
        text_config=dict(
            hidden_size=32,
            intermediate_size=48,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=vocab,
            rms_norm_eps=1e-6,
            rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
            rope_theta=1e6,
            max_position_embeddings=4096,
            bos_token_id=ids("<|endoftext|>"),
            eos_token_id=ids("<|im_end|>"),
        ),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=32),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    text_encoder = Qwen2_5_VLForConditionalGeneration(te_cfg).eval()
    with torch.no_grad():
        for name, p in text_encoder.named_parameters():
            if "visual" in name:
                continue
            if name.endswith("norm.weight") or "layernorm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
            else:
                p.copy_(0.3 * torch.randn_like(p))

    torch.manual_seed(12)
    transformer = QwenImageTransformer2DModel(
        patch_size=2,
        in_channels=64,
        out_channels=16,
        num_layers=2,
        attention_head_dim=16,
        num_attention_heads=2,
        joint_attention_dim=32,
        guidance_embeds=False,
        axes_dims_rope=(4, 6, 6),
    ).eval()
    with torch.no_grad():
        for name, p in transformer.named_parameters():
            if name.endswith("norm_q.weight") or "norm_k" in name or "norm_added" in name or name == "txt_norm.weight":
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.05 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / max(p.shape[-1], 1) ** 0.5)

    torch.manual_seed(13)
    vae = AutoencoderKLQwenImage(
        base_dim=4,
        z_dim=16,
        dim_mult=[1, 2, 4, 4],
        num_res_blocks=1,
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

    scheduler = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    pipe = QwenImagePipeline(
        scheduler=scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer
    )
    drop_idx = len(tokenizer(TEMPLATE_PREFIX)["input_ids"])
    return pipe, drop_idx


def pack(noise):
    b, c, h, w = noise.shape
    x = noise.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def make_inputs():
    """A smooth random RGB image and a mask (white = repaint) with an edge off the 8-px grid."""
    g = torch.Generator().manual_seed(21)
    base = torch.rand(3, HEIGHT // 8, WIDTH // 8, generator=g)
    img = torch.nn.functional.interpolate(base[None], size=(HEIGHT, WIDTH), mode="bilinear", align_corners=False)[0]
    img = img + 0.15 * torch.rand(3, HEIGHT, WIDTH, generator=g)
    arr = (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    mask = np.zeros((HEIGHT, WIDTH), dtype=np.uint8)
    mask[10:37, 20:61] = 255
    mask[0:4, 0:4] = 127  # below the 0.5 threshold: kept
    return Image.fromarray(arr, "RGB"), Image.fromarray(mask, "L")


def main():
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_img2img as p_i2i
    import diffusers.pipelines.qwenimage.pipeline_qwenimage_inpaint as p_inp
    from diffusers import QwenImageImg2ImgPipeline, QwenImageInpaintPipeline

    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    pipe, drop_idx = build_pipeline()
    model_dir = OUT / "model"
    pipe.save_pretrained(str(model_dir))

    init_image, mask_image = make_inputs()
    init_image.save(OUT / "init.png")
    mask_image.save(OUT / "mask.png")

    def posterior_mean(encoder_output, generator=None, sample_mode="sample"):
        return encoder_output.latent_dist.mode()

    p_i2i.retrieve_latents = posterior_mean
    p_inp.retrieve_latents = posterior_mean

    tensors = {}
    meta = {"width": WIDTH, "height": HEIGHT, "drop_index": drop_idx, "cases": []}
    for i, case in enumerate(CASES):
        torch.manual_seed(100 + i)
        noise = torch.randn(1, 16, HEIGHT // 8, WIDTH // 8)
        save_file({"latents": noise.contiguous()}, str(OUT / f"{case['name']}_latents.safetensors"))

        def fixed_noise(shape, generator=None, device=None, dtype=None, layout=None):
            assert tuple(shape) == (1, 1, 16, HEIGHT // 8, WIDTH // 8), shape
            return noise[:, None].to(dtype=dtype)

        p_i2i.randn_tensor = fixed_noise
        p_inp.randn_tensor = fixed_noise
        common = dict(
            prompt=case["prompt"],
            negative_prompt=case["negative"],
            true_cfg_scale=case["cfg"],
            num_inference_steps=case["steps"],
            height=HEIGHT,
            width=WIDTH,
            output_type="np",
        )
        with torch.no_grad():
            if case["mode"] == "t2i":
                runner = pipe
                extra = dict(latents=pack(noise))
            elif case["mode"] == "img2img":
                runner = QwenImageImg2ImgPipeline(**pipe.components)
                extra = dict(image=init_image, strength=case["strength"])
            else:
                runner = QwenImageInpaintPipeline(**pipe.components)
                extra = dict(image=init_image, mask_image=mask_image, strength=case["strength"])
            runner.prompt_template_encode_start_idx = drop_idx
            runner.set_progress_bar_config(disable=True)
            image = runner(**common, **extra).images[0]  # [H, W, 3] float in [0, 1]
        tensors[case["name"]] = torch.from_numpy(np.ascontiguousarray(image)).to(torch.float32)
        meta["cases"].append({k: v for k, v in case.items()})
    save_file(tensors, str(OUT / "expected.safetensors"))
    (OUT / "meta.json").write_text(json.dumps(meta, indent=1))
    total = sum(f.stat().st_size for f in OUT.rglob("*") if f.is_file())
    print(f"pipeline fixtures under {OUT}: {total / 1e6:.2f} MB, drop index {drop_idx}")


if __name__ == "__main__":
    main()
