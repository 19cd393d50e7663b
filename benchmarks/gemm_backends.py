"""Which fp32 GEMM is fastest on this machine: PyTorch's default (MKL via ``F.linear``), oneDNN inside the
same PyTorch (``torch.ops.mkldnn._linear_pointwise``), and MKL with its CPU dispatch told the CPU is an
Intel one (``mkl_serv_intel_cpu_true`` interposed with ``LD_PRELOAD``, in a child process: on AMD CPUs
MKL otherwise picks code paths without AVX-512).

Shapes ``M x K x N`` (``y(M, N) = x(M, K) @ W(N, K)^T``) are the models' own: the issue's four (2048^3,
a cpu-tiny FFN up and down projection over 2048 tokens, one of 64 experts' ~192 rows) plus the
backward's weight-gradient form (K = 2048 tokens). GFLOP/s = 2 M K N / best of ``--reps`` timed calls
after warm-up, at 1 and 2 threads, all backends interleaved shape by shape. Printed: GFLOP/s per
backend and the best one's ratio to ``F.linear``.

    .venv/bin/python benchmarks/gemm_backends.py               # ~1 minute
    .venv/bin/python benchmarks/gemm_backends.py --threads 2 --reps 30
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import tinyseek  # noqa: F401  (first: OMP_WAIT_POLICY=PASSIVE before torch loads libgomp)
import torch
import torch.nn.functional as F

from tinyseek.kernels.gemm import best_seconds

SHAPES = [(2048, 2048, 2048), (2048, 256, 1024), (2048, 1024, 256), (192, 256, 512), (1024, 2048, 256),
          (256, 2048, 1024)]
FAKE_INTEL = "int mkl_serv_intel_cpu_true(void) { return 1; }\n"


def measure(backends: list[str], threads: list[int], reps: int) -> dict:
    """{f"{backend}/{threads}/{M}x{K}x{N}": GFLOP/s} for the backends run in this process."""
    out = {}
    g = torch.Generator().manual_seed(0)
    fns = {"mkl": lambda x, w: F.linear(x, w),
           "onednn": lambda x, w: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")}
    for t in threads:
        torch.set_num_threads(t)
        for M, K, N in SHAPES:
            x, w = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g)
            for b in backends:
                s = best_seconds(lambda: fns[b](x, w), reps)
                out[f"{b}/{t}/{M}x{K}x{N}"] = 2 * M * K * N / s / 1e9
    return out


def child_mkl_fixed(threads: list[int], reps: int) -> dict:
    """The MKL numbers again in a child process with the dispatch override preloaded."""
    with tempfile.TemporaryDirectory() as d:
        src, lib = Path(d) / "fake_intel.c", Path(d) / "libfake_intel.so"
        src.write_text(FAKE_INTEL)
        subprocess.run(["cc", "-shared", "-fPIC", "-O2", "-o", str(lib), str(src)], check=True)
        env = dict(os.environ, LD_PRELOAD=str(lib))
        cmd = [sys.executable, __file__, "--child", "--threads", *map(str, threads), "--reps", str(reps)]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return {k.replace("mkl/", "mkl_intel_dispatch/"): v for k, v in json.loads(r.stdout.splitlines()[-1]).items()}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(measure(["mkl"], args.threads, args.reps)))
        return 0
    backends = ["mkl", "onednn"]
    res = measure(backends, args.threads, args.reps)
    res.update(child_mkl_fixed(args.threads, args.reps))
    names = backends + ["mkl_intel_dispatch"]
    print(f"{'threads':>7} {'M x K x N':>16} " + " ".join(f"{n:>18}" for n in names) + f" {'best / F.linear':>15}")
    for t in args.threads:
        for M, K, N in SHAPES:
            v = [res[f"{n}/{t}/{M}x{K}x{N}"] for n in names]
            print(f"{t:>7} {f'{M}x{K}x{N}':>16} " + " ".join(f"{x:>18.1f}" for x in v) + f" {max(v) / v[0]:>15.2f}")
    print("(GFLOP/s, best of", args.reps, "calls; torch", torch.__version__ + ")")
    return 0


if __name__ == "__main__":
    sys.exit(main())
