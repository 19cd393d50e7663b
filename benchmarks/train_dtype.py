"""A cpu-tiny training step in fp32 against bf16 autocast, side by side in one process.

The step is what the pretraining loop does per optimizer step: forward, backward, grad-norm clipping,
AdamW (8 x 256 tokens, the cpu-tiny model, 2 threads by default). Repetitions are interleaved (fp32,
bf16, fp32, ...) and the medians printed as tokens/s with the ratio. On CPUs with native bf16
(AVX512_BF16 / AMX) the bf16 GEMMs are ~2x fp32; the routed experts stay fp32 in the C training kernel
either way (``MoE._grouped``).

    .venv/bin/python benchmarks/train_dtype.py                   # ~1 minute
    .venv/bin/python benchmarks/train_dtype.py --reps 11 --threads 1
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import tinyseek  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE before torch loads libgomp)
import torch

from tinyseek import malloc
from tinyseek.config import model_cpu_tiny
from tinyseek.model.transformer import Transformer


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=8)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    malloc.tune()
    torch.manual_seed(0)
    cfg = model_cpu_tiny()
    model = Transformer(cfg).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    idx = torch.randint(0, cfg.vocab_size, (args.batch, cfg.max_seq_len))
    losses = {}
    with torch.no_grad():  # the starting weights' loss in each dtype (the numerics check)
        for d in ("fp32", "bf16"):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=d == "bf16"):
                losses[d] = float(model(idx, idx).loss)

    def step(dtype: str) -> None:
        for p in model.parameters():
            p.grad = None
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out = model(idx, idx)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

    dtypes = ["fp32", "bf16"]
    for d in dtypes:
        step(d)
        step(d)
    ts = {d: [] for d in dtypes}
    for _ in range(args.reps):
        for d in dtypes:
            t0 = time.perf_counter()
            step(d)
            ts[d].append(time.perf_counter() - t0)
    tok = args.batch * cfg.max_seq_len
    tps = {d: tok / statistics.median(v) for d, v in ts.items()}
    print(f"torch {torch.__version__}, {args.threads} threads, {args.batch}x{cfg.max_seq_len} tokens, "
          f"median of {args.reps}; bf16 GEMM native: {torch.ops.mkldnn._is_mkldnn_bf16_supported()}")
    for d in dtypes:
        print(f"  {d:5s} {tps[d]:8.0f} tok/s  loss at the start {losses[d]:.5f}")
    print(f"  bf16 / fp32 = {tps['bf16'] / tps['fp32']:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
