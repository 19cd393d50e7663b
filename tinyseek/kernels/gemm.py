"""The fp32 CPU GEMM behind the linear layers at many rows (training, prefill): PyTorch's default
(``F.linear``: MKL in the x86 wheels) or oneDNN inside the same PyTorch
(``torch.ops.mkldnn._linear_pointwise``), chosen once per machine by measuring both.

Why: on AMD CPUs MKL takes code paths without AVX-512, oneDNN does not. On the 2-core Zen 5 test
machine oneDNN is 1.08-1.13x MKL on one thread and 1.08-1.27x on two at the models' shapes
(``benchmarks/gemm_backends.py``); on an Intel CPU the two may tie, and then nothing changes.

The choice (:func:`backend`): ``TINYSEEK_GEMM=mkl|onednn`` forces one; the default ``auto`` times
both on model-shaped products (forward, input gradient and weight gradient of a 2048 x 256 -> 1024
projection and its transpose) at the current thread count, once per CPU model, torch version and
thread count, and keeps the verdict in a private cache file (``gemm.json`` beside the kernel cache,
:func:`tinyseek.kernels.loader.cache_dir`); oneDNN is taken only when it is at least
:data:`MARGIN` faster in total. No oneDNN in the build, or not on CPU: MKL.

:func:`linear` is ``F.linear`` through oneDNN with autograd: the forward and the input gradient are
oneDNN products (``gy @ W`` as a linear with the transposed weight), the weight gradient
``gy^T @ x`` goes to ``torch.mm`` (the transposed operands cost a copy of both through oneDNN, and
MKL's mm is as fast at that shape once those copies are counted: measured, see benchmarks/README.md).
Results equal ``F.linear`` up to float summation order (tests/test_gemm.py).
"""
from __future__ import annotations

import json
import os
import platform
import tempfile
import time

import torch

from tinyseek.config import ConfigError
from tinyseek.kernels import loader

MARGIN = 1.05  # oneDNN must beat MKL by this factor (summed over the probe products) to be chosen
CHOICES = ("auto", "mkl", "onednn")
_PROBE = [(2048, 256, 1024), (2048, 1024, 256)]  # (M, K, N) of y = x W^T; each also timed as dX and dW
_chosen: dict[int, str] = {}  # thread count -> backend, this process


def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's dense linear op."""
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


def _onednn(x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x2, w, b, "none", [], "")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def best_seconds(f, reps: int = 5) -> float:
    """The fastest of ``reps`` timed calls of ``f`` after one untimed call (seconds)."""
    f()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        f()
        best = min(best, time.perf_counter() - t0)
    return best


def measure() -> dict:
    """Seconds of MKL and oneDNN over the probe products (forward, input and weight gradient forms),
    best of 5 each, at the current thread count."""
    g = torch.Generator().manual_seed(0)
    t = {"mkl": 0.0, "onednn": 0.0}
    for M, K, N in _PROBE:
        x, w, gy = torch.randn(M, K, generator=g), torch.randn(N, K, generator=g), torch.randn(M, N, generator=g)
        wt = w.t().contiguous()
        t["mkl"] += best_seconds(lambda: torch.nn.functional.linear(x, w)) + best_seconds(lambda: torch.mm(gy, w))
        t["onednn"] += best_seconds(lambda: _onednn(x, w, None)) + best_seconds(lambda: _onednn(gy, wt, None))
    return t


def peak_flops(n: int = 1024, reps: int = 5) -> float:
    """Best-of-``reps`` FLOP/s of an ``n``-cube fp32 CPU product over both backends (MKL's mm and, where
    present, oneDNN's linear): the peak that MFU is measured against (not the slower of the two)."""
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=g), torch.randn(n, n, generator=g)
    best = best_seconds(lambda: a @ b, reps)
    if onednn_available():
        best = min(best, best_seconds(lambda: _onednn(a, b, None), reps))
    return 2 * n ** 3 / best


def _cache_file():
    return loader.cache_dir() / "gemm.json"


def _key() -> str:
    return f"{_cpu_model()}|torch {torch.__version__}|threads {torch.get_num_threads()}"


def backend() -> str:
    """``"mkl"`` or ``"onednn"`` for this process's thread count (module docstring); decided once."""
    n = torch.get_num_threads()
    if n in _chosen:
        return _chosen[n]
    want = os.environ.get("TINYSEEK_GEMM", "auto").strip().lower() or "auto"
    if want not in CHOICES:
        raise ConfigError(f"TINYSEEK_GEMM must be one of {', '.join(CHOICES)}, got {want!r}")
    if want != "auto" or not onednn_available():
        _chosen[n] = "onednn" if want == "onednn" and onednn_available() else "mkl"
        return _chosen[n]
    path, key = _cache_file(), _key()
    cached = {}
    if loader.trusted_file(path):
        try:
            cached = json.loads(path.read_text())
        except (OSError, ValueError):
            cached = {}
    if not isinstance(cached, dict):
        cached = {}
    entry = cached.get(key)
    if not (isinstance(entry, dict) and entry.get("backend") in ("mkl", "onednn")):
        t = measure()
        entry = {"backend": "onednn" if t["mkl"] >= MARGIN * t["onednn"] else "mkl",
                 "seconds": {k: round(v, 6) for k, v in t.items()}}
        cached[key] = entry
        fd, tmp = tempfile.mkstemp(prefix=".gemm.", suffix=".json", dir=path.parent)
        with os.fdopen(fd, "w") as f:
            json.dump(cached, f, indent=1)
        os.replace(tmp, path)
    _chosen[n] = entry["backend"]
    return _chosen[n]


class _OneDNNLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x2, w)
        ctx.has_bias = b is not None
        return _onednn(x2, w, b)

    @staticmethod
    def backward(ctx, gy: torch.Tensor):
        x2, w = ctx.saved_tensors
        gy = gy.contiguous()
        gx = _onednn(gy, w.t().contiguous(), None) if ctx.needs_input_grad[0] else None
        gw = torch.mm(gy.t(), x2) if ctx.needs_input_grad[1] else None
        gb = gy.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return gx, gw, gb


def fits(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> bool:
    """Whether :func:`linear` takes these: plain CPU fp32 tensors (no subclass such as DTensor), a
    2-D weight, no autocast; what the oneDNN op accepts without conversions."""
    plain = (torch.Tensor, torch.nn.Parameter)
    if type(x) not in plain or type(w) not in plain or x.dtype is not torch.float32 or w.dtype is not torch.float32:
        return False
    if not (x.is_cpu and w.is_cpu and w.dim() == 2) or torch.is_autocast_enabled("cpu"):
        return False
    return b is None or (type(b) in plain and b.dtype is torch.float32 and b.is_cpu)


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear(x, w, b)`` through oneDNN (forward and input gradient; module docstring) for
    tensors :func:`fits` accepts."""
    x2 = x.reshape(-1, x.shape[-1])
    if not x2.is_contiguous():
        x2 = x2.contiguous()
    if not w.is_contiguous():
        w = w.contiguous()
    y = _OneDNNLinear.apply(x2, w, b)
    return y.view(*x.shape[:-1], w.shape[0])
