#!/usr/bin/env bash
# The GPU-machine side of issue 6: run from the repository root of the copy the `run` tool makes,
# with these ignored paths carried (see docs/benchmarks.md for how to make them here):
#   .gpu/pixmarket-engine-bench.xz   the CUDA build (xz -9 of target/cuda/release/pixmarket-engine-bench)
#   .gpu/run-cuda.sh                 copy of ../shared/gpu/run-cuda.sh
#   .whl/diffusers-*.whl             python3 -m pip download --no-deps -d .whl diffusers==0.42.1
# Usage: bash engine/bench/run-on-gpu.sh STAGE   (one stage per call: each must fit 10 minutes)
#   diffusers  diffusers' transformer, real config, bf16, all shapes; saves its random weights
#              to $W (≈41 GB on the machine's disk) and one 1024² forward's inputs/output to $IO
#   compare    candle loads $W, runs the same forward, relative error vs diffusers (≤ 2e-2)
#   candle     candle, real config, random weights made on the GPU: all shapes, VAE decode 1024²,
#              text encoder 100 tokens, end-to-end 1024² 50-step CFG image
#   smoke      both, tiny config, one iteration (a first check that the binary and CUDA libs load)
# Stages after `diffusers` need the same warm machine (its /tmp). Everything lands in $OUT.
set -euo pipefail
STAGE="${1:?stage: smoke|diffusers|compare|candle}"
OUT="${OUT:-/tmp/pxm-out}"
mkdir -p "$OUT"
W=/tmp/pxm-weights
IO=/tmp/pxm-io-1024.safetensors
SIZES="${SIZES:-512,1024,1328}"
BATCH="${BATCH:-1,2}"
ITERS="${ITERS:-5}"

BIN=/tmp/pxm-bin/pixmarket-engine-bench
if [ ! -x "$BIN" ]; then
  mkdir -p /tmp/pxm-bin
  xz -dc .gpu/pixmarket-engine-bench.xz > "$BIN"
  chmod +x "$BIN"
fi
S=/tmp/pxm-py
if [ ! -d "$S/diffusers" ]; then
  mkdir -p "$S"
  python3 -m pip install -q --no-deps --target "$S" .whl/diffusers-*.whl
fi
export PYTHONPATH="$S${PYTHONPATH:+:$PYTHONPATH}"
candle() { bash .gpu/run-cuda.sh "$BIN" --device cuda "$@"; }

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, diffusers; print("torch", torch.__version__, "cuda", torch.version.cuda, "diffusers", diffusers.__version__)'
  df -h /tmp | tail -1; } > "$OUT/machine-$STAGE.txt" 2>&1 || true
cat "$OUT/machine-$STAGE.txt"

case "$STAGE" in
  smoke)
    candle --config tiny --sizes 64,128 --batch 1,2 --iters 1 --warmup 1 --vae-size 64 \
      --e2e-steps 2 --e2e-size 64 --json "$OUT/candle-tiny.json" 2>&1 | tail -n 20
    python3 engine/bench/bench_diffusers.py --device cuda --config tiny --sizes 64,128 \
      --batch 1,2 --iters 1 --json "$OUT/diffusers-tiny.json" 2>&1 | tail -n 5
    ;;
  diffusers)
    rm -rf "$W"
    python3 engine/bench/bench_diffusers.py --device cuda --config real --dtype bf16 \
      --sizes "$SIZES" --batch "$BATCH" --iters "$ITERS" --warmup 2 \
      --save-io "$IO" --io-size 1024 --save-weights "$W" \
      --json "$OUT/diffusers-real.json" 2> "$OUT/diffusers-real.log" | tail -n 40
    ;;
  compare)
    candle --config real --dtype bf16 --weights "$W" --compare-with "$IO" --sizes 1024 \
      --batch 1 --iters "$ITERS" --no-vae --no-text-encoder --e2e-steps 0 \
      --json "$OUT/candle-compare.json" 2> "$OUT/candle-compare.log" | tail -n 40
    ;;
  candle)
    candle --config real --dtype bf16 --sizes "$SIZES" --batch "$BATCH" --iters "$ITERS" \
      --warmup 2 --vae-size 1024 --text-len 100 --e2e-steps 50 --e2e-size 1024 \
      --json "$OUT/candle-real.json" 2> "$OUT/candle-real.log" | tail -n 60
    ;;
  *) echo "unknown stage $STAGE" >&2; exit 2 ;;
esac
# $OUT is emptied between calls: keep every report in /tmp/pxm-results too (same warm machine)
# and print the side-by-side table once both full-size reports exist.
R=/tmp/pxm-results
mkdir -p "$R"
cp "$OUT"/*.json "$R"/ 2>/dev/null || true
if [ -f "$R/diffusers-real.json" ] && [ -f "$R/candle-real.json" ]; then
  cp "$R"/*.json "$OUT"/
  python3 engine/bench/compare_reports.py "$R/candle-real.json" "$R/diffusers-real.json" \
    | tee "$OUT/side-by-side.md"
fi
