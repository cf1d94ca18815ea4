#!/usr/bin/env python3
"""Times diffusers' QwenImageTransformer2DModel on the shapes pixmarket-engine-bench times.

The model is built with the real Qwen-Image config (or the engine's tiny config) and random
weights drawn on the target device with torch.manual_seed, in the target dtype directly (the
20B model never exists in f32 or on the CPU). Every parameter is re-drawn with the same scaling
pixmarket-engine-bench uses for its own random weights: linear weights N(0, 1/fan_in), biases
0.02*N, norm weights 1 + 0.1*N. Attention is diffusers' default processor (PyTorch SDPA).

Timing: CUDA events around each forward (time.perf_counter on the CPU), warm-up runs discarded,
median of --iters. Peak memory: torch.cuda.max_memory_allocated per shape (PyTorch's allocator,
tensors only; the candle bench samples device-wide used memory, which also counts the CUDA
context and cached blocks; docs/benchmarks.md says how to read the two side by side).

--save-weights DIR writes the transformer with save_pretrained (config.json + sharded
diffusion_pytorch_model*.safetensors), loadable by `pixmarket-engine-bench --weights DIR`.
--save-io FILE writes one forward's inputs and output (img, txt, timestep, img_hw, out) for
`pixmarket-engine-bench --compare-with FILE`.
"""

import argparse
import json
import statistics
import sys
import time

import torch

TINY = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=2, attention_head_dim=32,
    num_attention_heads=2, joint_attention_dim=32, axes_dims_rope=(8, 12, 12),
)
REAL = dict(
    patch_size=2, in_channels=64, out_channels=16, num_layers=60, attention_head_dim=128,
    num_attention_heads=24, joint_attention_dim=3584, axes_dims_rope=(16, 56, 56),
)
DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "f16": torch.float16}


def forward_flops(cfg, b, s_i, s_t):
    """The same formula as pixmarket-engine-bench's forward_flops (see its comment)."""
    d = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    f = 4 * d
    n = s_i + s_t
    c = cfg["in_channels"]
    j = cfg["joint_attention_dim"]
    per_block = 2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d + 4 * 6 * d * d
    outside = 2 * s_i * c * d + 2 * s_t * j * d + 2 * s_i * d * c + 2 * (256 * d + d * d) + 4 * d * d
    return b * (cfg["num_layers"] * per_block + outside)


def reinit_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            if leaf == "weight" and p.dim() == 1 or "norm.weight" in name:
                p.normal_(1.0, 0.1)
            elif leaf == "bias":
                p.normal_(0.0, 0.02)
            else:
                fan_in = 1
                for s in p.shape[1:]:
                    fan_in *= s
                p.normal_(0.0, 1.0 / max(fan_in, 1) ** 0.5)


def build(cfg, dtype, device):
    from diffusers import QwenImageTransformer2DModel

    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = QwenImageTransformer2DModel(**cfg)
    finally:
        torch.set_default_dtype(old)
    model = model.to(device=device, dtype=dtype).eval()
    reinit_(model)
    return model


def inputs(cfg, size, b, text_len, dtype, device):
    h = w = size // 8 // cfg["patch_size"]
    img = torch.randn(b, h * w, cfg["in_channels"], device=device, dtype=torch.float32).to(dtype)
    txt = torch.randn(b, text_len, cfg["joint_attention_dim"], device=device, dtype=torch.float32).to(dtype)
    t = torch.full((b,), 0.5, device=device, dtype=dtype)
    return img, txt, t, (h, w)


def run(model, img, txt, t, hw):
    # No text mask: QwenImagePipeline drops an all-ones mask (so SDPA gets no attn_mask and may
    # use its flash backend), and the candle side also runs unmasked.
    b = img.shape[0]
    return model(
        hidden_states=img, encoder_hidden_states=txt, encoder_hidden_states_mask=None,
        timestep=t, img_shapes=[[(1, hw[0], hw[1])]] * b, return_dict=False,
    )[0]


def timed(fn, device, warmup, iters):
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    out = []
    for _ in range(iters):
        if cuda:
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            torch.cuda.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t0) * 1e3)
    return sorted(out)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--config", choices=["real", "tiny"], default="real")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--sizes", default="512,1024,1328")
    ap.add_argument("--batch", default="1,2")
    ap.add_argument("--text-len", type=int, default=100)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--peak-tflops", type=float, default=790.0)
    ap.add_argument("--json")
    ap.add_argument("--save-weights", metavar="DIR")
    ap.add_argument("--save-io", metavar="FILE")
    ap.add_argument("--io-size", type=int, default=1024)
    ap.add_argument("--io-batch", type=int, default=1)
    a = ap.parse_args()

    import diffusers

    cfg = REAL if a.config == "real" else TINY
    dtype = DTYPES[a.dtype]
    cuda = a.device.startswith("cuda")
    torch.manual_seed(a.seed)
    t0 = time.perf_counter()
    model = build(cfg, dtype, a.device)
    if cuda:
        torch.cuda.synchronize()
    report = {
        "tool": {"name": "bench_diffusers.py", "diffusers": diffusers.__version__,
                 "torch": torch.__version__, "python": sys.version.split()[0],
                 "gpu": torch.cuda.get_device_name() if cuda else None,
                 "sdpa_backends": "PyTorch default (torch.nn.functional.scaled_dot_product_attention)"},
        "setup": {"device": a.device, "dtype": a.dtype, "config": a.config,
                  "params": sum(p.numel() for p in model.parameters()),
                  "text_len": a.text_len, "warmup": a.warmup, "iters": a.iters,
                  "seed": a.seed, "peak_tflops": a.peak_tflops,
                  "memory_method": "torch.cuda.max_memory_allocated" if cuda else "not measured (CPU)"},
        "build_s": time.perf_counter() - t0,
        "forward": [],
    }
    with torch.inference_mode():
        if a.save_io:
            from safetensors.torch import save_file

            torch.manual_seed(a.seed + 1)
            img, txt, t, hw = inputs(cfg, a.io_size, a.io_batch, a.text_len, dtype, a.device)
            out = run(model, img, txt, t, hw)
            save_file({
                "img": img.contiguous().cpu(), "txt": txt.contiguous().cpu(),
                "timestep": t.float().cpu(), "img_hw": torch.tensor(hw, dtype=torch.int64),
                "out": out.contiguous().cpu(),
            }, a.save_io)
            report["save_io"] = {"file": a.save_io, "size": a.io_size, "batch": a.io_batch,
                                 "out_shape": list(out.shape)}
            print(f"io: wrote {a.save_io}", file=sys.stderr)
        for size in [int(s) for s in a.sizes.split(",") if s]:
            for b in [int(s) for s in a.batch.split(",") if s]:
                try:
                    img, txt, t, hw = inputs(cfg, size, b, a.text_len, dtype, a.device)
                    if cuda:
                        torch.cuda.reset_peak_memory_stats()
                    ms = timed(lambda: run(model, img, txt, t, hw), a.device, a.warmup, a.iters)
                    med = statistics.median(ms)
                    flops = forward_flops(cfg, b, hw[0] * hw[1], a.text_len)
                    floor = flops / (a.peak_tflops * 1e12) * 1e3
                    row = {"size": size, "batch": b, "s_img": hw[0] * hw[1], "s_txt": a.text_len,
                           "median_ms": med, "min_ms": ms[0], "max_ms": ms[-1], "iters": len(ms),
                           "tflop": flops / 1e12, "achieved_tflops": flops / (med * 1e-3) / 1e12,
                           "floor_ms": floor, "ratio_to_floor": med / floor,
                           "peak_mem_bytes": torch.cuda.max_memory_allocated() if cuda else None}
                except Exception as e:  # noqa: BLE001 - one failed shape must not lose the rest
                    row = {"size": size, "batch": b, "error": repr(e)}
                print(f"forward {size} B={b}: {row}", file=sys.stderr)
                report["forward"].append(row)
                del img, txt
    if a.save_weights:
        t1 = time.perf_counter()
        model.save_pretrained(a.save_weights, safe_serialization=True, max_shard_size="10GB")
        report["save_weights"] = {"dir": a.save_weights, "seconds": time.perf_counter() - t1}
    text = json.dumps(report, indent=2)
    if a.json:
        with open(a.json, "w") as f:
            f.write(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
