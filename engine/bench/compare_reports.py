#!/usr/bin/env python3
"""Prints a markdown table of pixmarket-engine-bench vs bench_diffusers.py reports, shape by shape.

usage: compare_reports.py CANDLE.json DIFFUSERS.json
ratio = candle median / diffusers median (< 1: candle is faster).
"""

import json
import sys


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def gib(b):
    return None if b is None else b / 2**30


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    with open(sys.argv[1]) as f:
        c = json.load(f)
    with open(sys.argv[2]) as f:
        d = json.load(f)
    rows = {(r["size"], r["batch"]): r for r in d.get("forward", [])}
    print("| size | batch | TFLOP | candle ms | diffusers ms | candle/diffusers | candle TFLOP/s "
          "| diffusers TFLOP/s | candle / floor | candle peak GiB | diffusers peak GiB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in c.get("forward", []):
        o = rows.get((r["size"], r["batch"]), {})
        cm, dm = r.get("median_ms"), o.get("median_ms")
        ratio = cm / dm if cm and dm else None
        print(f"| {r['size']}² | {r['batch']} | {fmt(r.get('tflop'), '.1f')} | {fmt(cm, '.1f')} "
              f"| {fmt(dm, '.1f')} | {fmt(ratio, '.2f')} | {fmt(r.get('achieved_tflops'), '.0f')} "
              f"| {fmt(o.get('achieved_tflops'), '.0f')} | {fmt(r.get('ratio_to_floor'), '.2f')} "
              f"| {fmt(gib(r.get('peak_mem_bytes')), '.1f')} | {fmt(gib(o.get('peak_mem_bytes')), '.1f')} |")
    for key, label in [("vae_decode", "VAE decode"), ("text_encoder", "text encoder")]:
        v = c.get(key, {})
        if "median_ms" in v:
            print(f"\n{label} (candle): {v['median_ms']:.1f} ms median")
    e = c.get("e2e", {})
    if "total_s" in e:
        print(f"\nend to end (candle, {e['size']}², {e['steps']} steps, CFG): {e['total_s']:.2f} s "
              f"(text {e['text_encoder_s']:.2f} s, denoise {e['denoise_s']:.2f} s = "
              f"{e['per_forward_ms']:.1f} ms/forward, VAE {e['vae_decode_s']:.2f} s)")
    cmp_ = c.get("compare")
    if cmp_:
        print(f"\ncorrectness: {cmp_}")


if __name__ == "__main__":
    main()
