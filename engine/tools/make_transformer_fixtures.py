#!/usr/bin/env python3
"""Parity fixtures for the Qwen-Image transformer, RoPE, scheduler, packing and true CFG.

Builds a small random `QwenImageTransformer2DModel` (diffusers, CPU), saves it with
`save_pretrained` in the real diffusers layout -- once sharded in f32 (index + shards), once as a
single bf16 file -- and writes the reference inputs and outputs the Rust tests in
`engine/tests/transformer_*.rs` compare against. Also records the real 20B config and its
parameter count/shapes, built on the meta device (no weights allocated).

Usage (from the repository root):
    /work/pyref/bin/python engine/tools/make_transformer_fixtures.py
Needs torch and diffusers (tested with torch 2.15 CPU, diffusers 0.42.1). Seeds are fixed, so a
rerun with the same versions rewrites byte-identical files.
"""

import json
import math
import shutil
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel
from diffusers.models.transformers.transformer_qwenimage import QwenEmbedRope
from safetensors.torch import save_file

OUT = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "transformer"

# Small config: the shape of diffusers' own model test (patch 2, 2 layers, small heads), with 3
# heads and axes (4, 6, 6) so every RoPE axis has more than one frequency pair.
TINY = dict(
    patch_size=2,
    in_channels=16,
    out_channels=4,
    num_layers=2,
    attention_head_dim=16,
    num_attention_heads=3,
    joint_attention_dim=24,
    guidance_embeds=False,
    axes_dims_rope=(4, 6, 6),
)
# Packed image grid (rows, cols): odd rows so the centring (ceil/floor split) is exercised.
GRID = (3, 4)
TXT_LEN = 5
# Second sample of the batch has 3 valid text tokens out of 5.
VALID_LENS = (5, 3)

# The shipped Qwen-Image scheduler config (spec section 3.3).
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


def bf16_round(t):
    return t.to(torch.bfloat16).to(torch.float32)


def build_tiny():
    torch.manual_seed(0)
    model = QwenImageTransformer2DModel(**TINY).eval()
    # Default init leaves every RMSNorm weight at 1, which would not test that it is applied.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1 and "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
    return model


def save_models(model):
    for sub in ("model_sharded", "model_single_bf16"):
        shutil.rmtree(OUT / sub, ignore_errors=True)
    # ~0.77 MB of f32 weights; 300 kB shards give three files and an index.
    model.save_pretrained(OUT / "model_sharded" / "transformer", max_shard_size="300KB")
    # A fresh copy: Module.to() converts in place.
    build_tiny().to(torch.bfloat16).save_pretrained(OUT / "model_single_bf16" / "transformer")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER).save_config(OUT / "model_sharded" / "scheduler")


def inputs(dtype):
    g = torch.Generator().manual_seed(1)
    h, w = GRID
    img = torch.randn(2, h * w, TINY["in_channels"], generator=g)
    txt = torch.randn(2, TXT_LEN, TINY["joint_attention_dim"], generator=g)
    mask = torch.zeros(2, TXT_LEN)
    for b, n in enumerate(VALID_LENS):
        mask[b, :n] = 1.0
    sigma = torch.tensor([0.8125, 0.3])
    if dtype == torch.bfloat16:
        # The pipeline rounds t = sigma*1000 to bf16, then divides by 1000 in bf16 (spec 1.3 step 2).
        timestep = (sigma * 1000).to(torch.bfloat16) / 1000
    else:
        timestep = sigma
    return img.to(dtype), txt.to(dtype), mask, timestep


def capture_block0(model, img, txt, timestep, mask):
    """Runs the model once and records block 0's inputs and outputs."""
    seen = {}

    def hook(_module, args, kwargs, output):
        seen["img"] = kwargs["hidden_states"].clone()
        seen["txt"] = kwargs["encoder_hidden_states"].clone()
        seen["temb"] = kwargs["temb"].clone()
        seen["txt_out"], seen["img_out"] = (o.clone() for o in output)

    handle = model.transformer_blocks[0].register_forward_hook(hook, with_kwargs=True)
    with torch.no_grad():
        model(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[(1, *GRID)] * img.shape[0],
            return_dict=False,
        )
    handle.remove()
    return seen


def forward(model, img, txt, mask, timestep):
    with torch.no_grad():
        return model(
            hidden_states=img,
            encoder_hidden_states=txt,
            encoder_hidden_states_mask=mask,
            timestep=timestep,
            img_shapes=[(1, *GRID)] * img.shape[0],
            return_dict=False,
        )[0]


def model_tensors(model, dtype, tag):
    img, txt, mask, timestep = inputs(dtype)
    out = {}
    out[f"{tag}.img"] = img.contiguous()
    out[f"{tag}.txt"] = txt.contiguous()
    out[f"{tag}.mask"] = mask.contiguous()
    out[f"{tag}.timestep"] = timestep.contiguous()
    # Batch 1: the first sample alone, no mask (what the pipeline passes for an unpadded prompt).
    out[f"{tag}.out_b1"] = forward(model, img[:1], txt[:1], None, timestep[:1])
    # Batch 2: padded second prompt with a key-padding mask.
    out[f"{tag}.out_b2"] = forward(model, img, txt, mask, timestep)
    # Block 0 of the batch-2 run.
    blk = capture_block0(model, img, txt, timestep, mask)
    for k, v in blk.items():
        out[f"{tag}.block0.{k}"] = v.contiguous()
    # Timestep embedding alone: sinusoid (time_proj) and MLP output.
    ts = torch.tensor([0.0, 0.02, 0.5, 0.98970, 1.0]).to(dtype)
    with torch.no_grad():
        proj = model.time_text_embed.time_proj(ts)
        temb = model.time_text_embed(ts, img)
    out[f"{tag}.temb.t"] = ts
    out[f"{tag}.temb.proj"] = proj.contiguous()
    out[f"{tag}.temb.out"] = temb.contiguous()
    return out


ROPE_CASES = {
    "tiny": (TINY["axes_dims_rope"], (1, *GRID), TXT_LEN),
    # The real axes on an odd, non-square grid.
    "real": ((16, 56, 56), (1, 7, 5), 6),
}


def rope_tensors():
    out = {}
    for name, (axes, fhw, txt_len) in ROPE_CASES.items():
        rope = QwenEmbedRope(theta=10000, axes_dim=list(axes), scale_rope=True)
        img_f, txt_f = rope([fhw], device=torch.device("cpu"), max_txt_seq_len=txt_len)
        out[f"rope.{name}.img_cos"] = img_f.real.contiguous()
        out[f"rope.{name}.img_sin"] = img_f.imag.contiguous()
        out[f"rope.{name}.txt_cos"] = txt_f.real.contiguous()
        out[f"rope.{name}.txt_sin"] = txt_f.imag.contiguous()
    return out


def pack_tensors():
    g = torch.Generator().manual_seed(2)
    lat = torch.randn(2, 4, 6, 8, generator=g)
    packed = QwenImagePipeline._pack_latents(lat, 2, 4, 6, 8)
    # vae_scale_factor 8: a 48x64 image has a 6x8 latent.
    unpacked = QwenImagePipeline._unpack_latents(packed, 48, 64, 8)
    return {"pack.latents": lat, "pack.packed": packed.contiguous(), "pack.unpacked": unpacked.contiguous()}


def mu_for(seq_len, cfg):
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    b = cfg["base_shift"] - m * cfg["base_image_seq_len"]
    return seq_len * m + b


def schedule(steps, seq_len):
    sched = FlowMatchEulerDiscreteScheduler(**SCHEDULER)
    # As QwenImagePipeline.__call__ does: linspace(1, 1/N, N) sigmas and mu from the image tokens.
    sigmas = np.linspace(1.0, 1 / steps, steps)
    sched.set_timesteps(sigmas=sigmas, mu=mu_for(seq_len, SCHEDULER))
    return sched


def scheduler_fixtures():
    out = {}
    for side in (256, 512, 1024, 1328):
        seq = (side // 16) ** 2
        for steps in (50, 20):
            s = schedule(steps, seq)
            out[f"{side}_{steps}"] = {
                "image_seq_len": seq,
                "steps": steps,
                "mu": mu_for(seq, SCHEDULER),
                "sigmas": [float(x) for x in s.sigmas],
                "timesteps": [float(x) for x in s.timesteps],
            }
    return out


def cfg_step_tensors():
    """One true-CFG, norm-rescaled Euler step as QwenImagePipeline's loop does it."""
    out = {}
    g = torch.Generator().manual_seed(3)
    cond = torch.randn(2, 12, 16, generator=g)
    uncond = torch.randn(2, 12, 16, generator=g)
    sample = torch.randn(2, 12, 16, generator=g)
    scale = 4.0
    step_index = 7
    for tag, dtype in (("f32", torch.float32), ("bf16", torch.bfloat16)):
        c, u, x = cond.to(dtype), uncond.to(dtype), sample.to(dtype)
        comb = u + scale * (c - u)
        cond_norm = torch.norm(c, dim=-1, keepdim=True)
        comb_norm = torch.norm(comb, dim=-1, keepdim=True)
        pred = comb * (cond_norm / comb_norm)
        sched = schedule(50, 4096)
        sched.set_begin_index(step_index)
        nxt = sched.step(pred, sched.timesteps[step_index], x, return_dict=False)[0]
        out[f"cfg.{tag}.cond"] = c
        out[f"cfg.{tag}.uncond"] = u
        out[f"cfg.{tag}.sample"] = x
        out[f"cfg.{tag}.pred"] = pred.contiguous()
        out[f"cfg.{tag}.next"] = nxt.contiguous()
        # What the pipeline feeds the transformer at this step: t expanded to the batch, cast to
        # the latents' dtype, then divided by 1000 in that dtype.
        t = sched.timesteps[step_index]
        out[f"cfg.{tag}.model_timestep"] = (t.expand(2).to(dtype) / 1000).contiguous()
    return out, {"scale": scale, "step_index": step_index, "steps": 50, "image_seq_len": 4096}


def real_20b():
    with torch.device("meta"):
        model = QwenImageTransformer2DModel()
    shapes = {n: list(p.shape) for n, p in model.named_parameters()}
    total = sum(p.numel() for p in model.parameters())
    # Block tensors repeat 60 times: keep the top level and block 0, plus the block count.
    kept = {n: s for n, s in shapes.items() if not n.startswith("transformer_blocks.") or n.startswith("transformer_blocks.0.")}
    config = {k: (list(v) if isinstance(v, tuple) else v) for k, v in model.config.items() if not k.startswith("_")}
    config["_class_name"] = "QwenImageTransformer2DModel"
    config["_diffusers_version"] = "0.42.1"
    return {"total_params": total, "num_tensors": len(shapes), "config": config, "shapes": kept}


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    model = build_tiny()
    save_models(model)

    tensors = {}
    tensors.update(model_tensors(model, torch.float32, "f32"))
    model_bf16 = build_tiny().to(torch.bfloat16)
    tensors.update(model_tensors(model_bf16, torch.bfloat16, "bf16"))
    tensors.update(rope_tensors())
    tensors.update(pack_tensors())
    cfg_t, cfg_meta = cfg_step_tensors()
    tensors.update(cfg_t)
    tensors = {k: v.contiguous() for k, v in sorted(tensors.items())}
    save_file(tensors, OUT / "reference.safetensors")

    meta = {
        "tiny_config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in TINY.items()},
        "grid": list(GRID),
        "txt_len": TXT_LEN,
        "valid_lens": list(VALID_LENS),
        "scheduler_config": SCHEDULER,
        "schedules": scheduler_fixtures(),
        "cfg_step": cfg_meta,
        "rope_cases": {
            k: {"axes": list(a), "grid": list(fhw[1:]), "txt_len": n} for k, (a, fhw, n) in ROPE_CASES.items()
        },
        "versions": {"torch": torch.__version__.split("+")[0], "diffusers": "0.42.1"},
    }
    (OUT / "reference.json").write_text(json.dumps(meta, indent=1, sort_keys=True) + "\n")
    (OUT / "real_20b.json").write_text(json.dumps(real_20b(), indent=1, sort_keys=True) + "\n")
    print(f"wrote fixtures under {OUT}")


if __name__ == "__main__":
    main()
