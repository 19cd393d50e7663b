"""Fused CPU kernels for weight-only quantized decode (a few rows times an int8 / int4 weight):
the glue over ``quant.c`` (C source, package data). It takes tensors and plain numbers and imports
nothing from ``model/`` or ``quant/``; :mod:`tinyseek.quant.formats` names which kernel format a
quantization format uses, and the quantized modules call these functions.

The PyTorch-op path converts the whole weight to float on every call before the GEMM; at decode
(one row per sequence) that conversion costs more than the matmul itself. These kernels read the
integer codes directly, convert in registers and accumulate in fp32
(``y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k]``):

- ``ts_mm``       x (M, K) times an int8 (N, K) or packed-int4 (N, ceil(K/2)) weight, fp16 scales
- ``ts_swiglu``   one whole SwiGLU expert (gate|up matmul, ``silu(g) * u``, down matmul) in one call
- ``ts_ffn``      a dense SwiGLU FFN of three separate matrices in one call
- ``ts_moe``      all routed experts of a MoE layer for a few tokens, weighted and summed, in one call
- ``ts_dequant``  float rows of a quantized matrix, all of them or gathered by index (embedding lookup)
- ``ts_w8a8``     W8A8: x (M, K) fp32 quantized per token to uint8 with a zero point (``ts_quant_act``),
  times int8 codes (N, K) with int32 accumulation (VNNI ``vpdpbusd`` where the CPU has it), the
  zero-point correction from the weight row sums, fp32 out; bit-identical to
  :func:`tinyseek.quant.ops.w8a8_reference` (:func:`w8a8_mm`)

Kernel formats (the ``kfmt`` argument, :attr:`tinyseek.quant.formats.QuantFormat.kernel`):
``KERNEL_INT8`` = int8 codes ``(N, K)``, one fp16 scale a row; ``KERNEL_INT4`` = int4 codes packed
two per byte ``(N, ceil(K/2))`` (low nibble = even column, stored as ``code + 8``), fp16 scales
``(N, G)`` per group of ``gs`` inputs (``gs = 0``: one scale a row); ``KERNEL_W8A8`` = int8's
layout, every product quantizing its input rows per token (``ts_w8a8``), so the fused SwiGLU /
FFN / MoE calls run W8A8 too (their SiLU in C: equal to the module path up to float rounding). Every stored tensor must be
contiguous; smoothing vectors (AWQ, optional, fp16) divide the input columns first.

Built by :mod:`tinyseek.kernels.loader` on first use (AVX-512 intrinsics where the CPU has them,
portable loops otherwise or with ``portable=True``; a CPython extension where ``Python.h`` exists,
else ``ctypes``). Large products run on PyTorch's own OpenMP pool (``torch.get_num_threads()``
threads); small ones stay on the calling thread.

Contract of every wrapper: it returns the result, or None when the kernels do not apply and the
caller must take its PyTorch path. They apply when all of these hold: the kernels are enabled (the
default; ``TINYSEEK_QUANT_KERNELS=0`` or :func:`enable(False) <enable>` turns them off; checked
on every call so the switch works on live models), they built (no compiler: one printed line,
then None), the input is a CPU fp32 tensor without autograd, it has at most ``MAX_ROWS`` rows
(``CHUNK_ROWS`` for :func:`quant_mm` and :func:`ffn`, which make one call per ``MAX_ROWS`` rows,
each reading the packed weights once: up to ``CHUNK_ROWS`` rows that beats turning the whole matrix
back into floats every step), and every scale / smoothing tensor is fp16 (format-v1 int8 checkpoints store fp32 scales: None).
Results agree with the PyTorch path to float summation order (tests/test_quant.py). Timings, and
PyTorch's own weight-only CPU kernels that were measured and not used: benchmarks/README.md, quant.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyseek.kernels import loader as ckernels
from tinyseek.kernels.loader import I64 as _I64, INT as _INT, P as _P

MAX_ROWS = 8  # rows one kernel call takes (its register tile reads each weight once per call)
CHUNK_ROWS = 32  # up to this many rows, calls of MAX_ROWS rows each (16 rows: 2-3x faster than dequantising)
KERNEL_INT8, KERNEL_INT4, KERNEL_W8A8 = 8, 4, 9  # the C functions' format switch (their first argument)

_SRC = ckernels.source("quant.c")
_NAME = "_tinyseek_quant"  # the extension's module name (PyInit__tinyseek_quant in quant.c)
_SIGS = {
    "ts_mm": ([_INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_swiglu": ([_INT, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_ffn": ([_INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_moe": ([_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT],
               _INT),
    "ts_dequant": ([_INT, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64], _INT),
    "ts_w8a8": ([_P, _P, _P, _P, _I64, _I64, _I64, _INT], None),
    "ts_quant_act": ([_P, _P, _P, _P, _I64, _I64, _I64], None),
}
KERNELS = ckernels.Kernels(_NAME, _SRC, _SIGS, "TINYSEEK_QUANT_KERNELS", "tinyseek.kernels.quant")
_state = KERNELS.state  # enabled / lib / failed (tests patch its entries)


def enable(flag: bool = True) -> bool:
    """Turn the fused kernels on or off; returns whether they are usable (building them if needed)."""
    return KERNELS.enable(flag)


def available() -> bool:
    """Enabled and built (builds on first call)."""
    return KERNELS.ready() is not None


def build(kind: str = "pyext", cache: Path | None = None, portable: bool = False) -> Path:
    """Compile the kernels (or reuse the cached build); returns the shared library's path.
    ``kind``: "pyext" (a CPython extension; needs Python.h) or "ctypes" (plain C). ``portable``
    leaves out the AVX-512 paths (what a CPU without them gets; for tests)."""
    return ckernels.build(_NAME, _SRC, kind, cache, portable)


def load(kind: str = "pyext", portable: bool = False):
    """Build (if needed) and load the kernels; returns an object with ``ts_mm``, ``ts_swiglu``,
    ``ts_ffn``, ``ts_moe`` and ``ts_dequant`` taking integers (pointers as ints, 0 = NULL)."""
    return KERNELS.load(kind, portable)


def _usable(x: torch.Tensor, scale: torch.Tensor) -> bool:
    return (x.is_cpu and x.dtype is torch.float32 and scale.dtype is torch.float16
            and not (x.requires_grad and torch.is_grad_enabled()))


def _group(gs: int, k: int) -> int:
    """The C kernels' group width: ``gs``, or the whole (even-padded) row when ``gs <= 0``."""
    return gs if gs > 0 else k + k % 2


def _lib_for(x: torch.Tensor, scale: torch.Tensor, fits: bool, *fp16: torch.Tensor | None):
    """The loaded kernels for one call, or None: ``fits`` (the wrapper's own size / dtype checks),
    ``x`` and ``scale`` usable (:func:`_usable`), every other scale / smoothing vector given in
    ``fp16`` absent or fp16, the kernels enabled and built."""
    if not fits or not _usable(x, scale):
        return None
    for t in fp16:
        if t is not None and t.dtype is not torch.float16:
            return None
    return KERNELS.ready()


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def _row_ptr(t: torch.Tensor | None, e: int) -> int:
    """Address of row ``e`` of a contiguous fp16 ``(E, K)`` tensor (0 = NULL for None)."""
    return 0 if t is None else t.data_ptr() + e * t.stride(0) * 2


def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, kfmt: int, gs: int,
             smooth: torch.Tensor | None = None):
    """``(x / smooth) @ W_hat^T`` for ``x (..., K)``, or None (module docstring). ``qweight`` /
    ``scale`` in kernel format ``kfmt`` with group size ``gs``; ``smooth`` (fp16, K; None = no AWQ
    smoothing). Kept lean: it runs once per Linear per decode step."""
    K = x.shape[-1]
    n = x.numel()
    lib = _lib_for(x, scale, n <= CHUNK_ROWS * K, smooth)
    if lib is None:
        return None
    x = x.contiguous()
    N = qweight.shape[0]
    y = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)
    rows, threads, G = n // K, torch.get_num_threads(), _group(gs, K)
    for r in range(0, rows, MAX_ROWS):  # row blocks: byte offsets into the contiguous x and y
        lib.ts_mm(kfmt, x.data_ptr() + r * K * 4, qweight.data_ptr(), scale.data_ptr(), _ptr(smooth),
                  y.data_ptr() + r * N * 4, min(MAX_ROWS, rows - r), N, K, scale.shape[-1], G, threads)
    return y


def swiglu(x_MD: torch.Tensor, q_gu: torch.Tensor, s_gu: torch.Tensor, q_d: torch.Tensor, s_d: torch.Tensor,
           e: int, kfmt: int, gs: int, sm_gu: torch.Tensor | None = None, sm_d: torch.Tensor | None = None):
    """Expert ``e`` of stacked quantized experts (``q_gu (E, 2F, D')``: gate rows then up rows,
    ``q_d (E, D, F')``, optional AWQ smoothing ``sm_gu (E, D)`` / ``sm_d (E, F)``) applied to
    ``x (M, D)`` in one call: ``(silu(g) * u) @ W_down``; None when not applicable."""
    M, D = x_MD.shape
    lib = _lib_for(x_MD, s_gu, M <= MAX_ROWS, sm_gu)
    if lib is None:
        return None
    x_MD = x_MD.contiguous()
    F2 = q_gu.shape[1]
    y = torch.empty(M, D, dtype=torch.float32)
    # expert e's slices by pointer offset (no view objects); the buffers are contiguous
    lib.ts_swiglu(kfmt, x_MD.data_ptr(), q_gu.data_ptr() + e * q_gu.stride(0) * q_gu.element_size(),
                  s_gu.data_ptr() + e * s_gu.stride(0) * 2, _row_ptr(sm_gu, e),
                  q_d.data_ptr() + e * q_d.stride(0) * q_d.element_size(), s_d.data_ptr() + e * s_d.stride(0) * 2,
                  _row_ptr(sm_d, e), y.data_ptr(), M, D, F2 // 2, s_gu.shape[-1], s_d.shape[-1],
                  _group(gs, D), torch.get_num_threads())
    return y


def ffn(x: torch.Tensor, q_g: torch.Tensor, s_g: torch.Tensor, sm_g: torch.Tensor | None, q_u: torch.Tensor,
        s_u: torch.Tensor, sm_u: torch.Tensor | None, q_d: torch.Tensor, s_d: torch.Tensor, sm_d: torch.Tensor | None,
        kfmt: int, gs: int):
    """``down(silu(gate(x)) * up(x))`` for ``x (..., D)`` in one call, from three quantized matrices
    of one kernel format and group size (gate / up ``(F, D')``, down ``(D, F')``, each with its
    optional AWQ smoothing); None when not applicable."""
    D = x.shape[-1]
    n = x.numel()
    lib = _lib_for(x, s_g, n <= CHUNK_ROWS * D, s_u, s_d, sm_g, sm_u, sm_d)
    if lib is None:
        return None
    x = x.contiguous()
    y = torch.empty(x.shape, dtype=torch.float32)
    rows, threads = n // D, torch.get_num_threads()
    for r in range(0, rows, MAX_ROWS):  # row blocks, as in quant_mm
        lib.ts_ffn(kfmt, x.data_ptr() + r * D * 4, q_g.data_ptr(), s_g.data_ptr(), _ptr(sm_g), q_u.data_ptr(),
                   s_u.data_ptr(), _ptr(sm_u), q_d.data_ptr(), s_d.data_ptr(), _ptr(sm_d), y.data_ptr() + r * D * 4,
                   min(MAX_ROWS, rows - r), D, q_g.shape[0], s_g.shape[-1], s_d.shape[-1], _group(gs, D), threads)
    return y


def moe(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, q_gu: torch.Tensor, s_gu: torch.Tensor,
        q_d: torch.Tensor, s_d: torch.Tensor, kfmt: int, gs: int, sm_gu: torch.Tensor | None = None,
        sm_d: torch.Tensor | None = None):
    """All routed experts for a few tokens in one call: ``y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n])``
    (stacked buffers as in :func:`swiglu`), or None when not applicable. Replaces the sort / gather /
    per-expert calls / concatenate / scatter-add of a dispatch at decode. An expert index outside
    the stack raises ``IndexError``."""
    N, D = x_ND.shape
    fits = N <= MAX_ROWS and w_NK.dtype is torch.float32 and idx_NK.device.type == "cpu"
    lib = _lib_for(x_ND, s_gu, fits, sm_gu)
    if lib is None:
        return None
    x_ND, w_NK = x_ND.contiguous(), w_NK.contiguous()
    if idx_NK.dtype is not torch.int64 or not idx_NK.is_contiguous():
        idx_NK = idx_NK.to(torch.int64).contiguous()
    E, F2 = q_gu.shape[0], q_gu.shape[1]
    y = torch.empty(N, D, dtype=torch.float32)
    rc = lib.ts_moe(kfmt, x_ND.data_ptr(), idx_NK.data_ptr(), w_NK.data_ptr(), N, idx_NK.shape[1], E,
                    q_gu.data_ptr(), s_gu.data_ptr(), _ptr(sm_gu), q_d.data_ptr(), s_d.data_ptr(), _ptr(sm_d),
                    y.data_ptr(), D, F2 // 2, s_gu.shape[-1], s_d.shape[-1], _group(gs, D), torch.get_num_threads())
    if rc != 0:
        raise IndexError(f"expert index out of range for {E} experts")
    return y


def dequant_rows(qweight: torch.Tensor, scale: torch.Tensor, kfmt: int, k: int, gs: int,
                 idx: torch.Tensor | None = None):
    """Float rows ``(R, k)`` of a quantized ``(V, k)`` matrix (all rows, or ``idx``'s rows, any
    shape: result ``(*idx.shape, k)``), or None when not applicable. An index outside the matrix
    raises ``IndexError`` like ``F.embedding``."""
    if not (qweight.is_cpu and scale.dtype is torch.float16):
        return None
    lib = KERNELS.ready()
    if lib is None:
        return None
    if not (qweight.is_contiguous() and scale.is_contiguous()):
        qweight, scale = qweight.contiguous(), scale.contiguous()
    V = qweight.shape[0]
    if idx is not None:
        if idx.device.type != "cpu":
            return None
        flat = idx.reshape(-1)
        if flat.dtype is not torch.int64 or not flat.is_contiguous():
            flat = flat.to(torch.int64).contiguous()
        out = torch.empty(idx.shape + (k,), dtype=torch.float32)
        rc = lib.ts_dequant(kfmt, flat.data_ptr(), flat.numel(), V, qweight.data_ptr(), scale.data_ptr(),
                            out.data_ptr(), k, scale.shape[-1], _group(gs, k))
    else:
        out = torch.empty(V, k, dtype=torch.float32)
        rc = lib.ts_dequant(kfmt, 0, V, V, qweight.data_ptr(), scale.data_ptr(), out.data_ptr(), k,
                            scale.shape[-1], _group(gs, k))
    if rc != 0:
        raise IndexError(f"index out of range in the quantized table of {V} rows")
    return out


def w8a8_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor):
    """The W8A8 product of ``x (..., K)`` and int8 codes ``(N, K)`` with fp16 scales ``(N, 1)``:
    fp32 ``(..., N)`` equal bit for bit to :func:`tinyseek.quant.ops.w8a8_reference`, or None (module
    docstring; any number of rows: at 1-256 rows it beat the ``torch._int_mm`` path, whose
    activation quantization in PyTorch ops costs more than the product, benchmarks/README.md)."""
    K = x.shape[-1]
    n = x.numel()
    lib = _lib_for(x, scale, K > 0)
    if lib is None:
        return None
    x = x.contiguous()
    N = qweight.shape[0]
    y = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)
    lib.ts_w8a8(x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), y.data_ptr(), n // K, N, K,
                torch.get_num_threads())
    return y


def quant_act(x_MK: torch.Tensor):
    """``(codes uint8 (M, K), scale fp32 (M,), zero point int32 (M,))`` of the C activation
    quantizer (what :func:`w8a8_mm` computes with), or None when the kernels are off; for tests
    against :func:`tinyseek.quant.ops.quantize_act`."""
    if not (x_MK.is_cpu and x_MK.dtype is torch.float32):
        return None
    lib = KERNELS.ready()
    if lib is None:
        return None
    x = x_MK.detach().contiguous()
    M, K = x.shape
    q = torch.empty(M, K, dtype=torch.uint8)
    s = torch.empty(M, dtype=torch.float32)
    z = torch.empty(M, dtype=torch.int32)
    lib.ts_quant_act(x.data_ptr(), q.data_ptr(), s.data_ptr(), z.data_ptr(), M, K, K)
    return q, s, z
