"""fp32 CPU kernel for ``y = x @ W^T (+ b)`` at few rows (decode): the C variant of ``F.linear``.

At decode the model's linear layers see 1-64 rows, where MKL's fp32 GEMM spends most of a call
outside the arithmetic. ``ts_linear_f32`` (``linear.c``) computes each output in dot-product form
over nn.Linear's own weight layout ``W (N, K)`` row-major (no packing): outputs in chunks of 16
weight rows, rows of ``x`` in tiles of 4 x 4, 2 x 8, 1 x 16 (16 AVX-512 accumulators over K, a
masked last step: any K and N), one transposing reduction per tile; portable loops (``TS_PORTABLE``
or no AVX-512) take one row against 8 weight rows. Calls with ``M * N * K`` >= 1M multiply-adds and
``torch.get_num_threads() > 1`` share the output chunks over OpenMP.

Guarantees: the result equals ``F.linear`` up to float summation order, and every output
``y[m, n]`` is one accumulator with the same summation order whatever tile it sits in, so a row's
result does not depend on the other rows of the call nor on the thread count (bitwise: the serving
engine's greedy tokens are the same alone and batched; tested).

Where it applies: a plain CPU fp32 weight with contiguous rows (and such a bias), checked once by
:func:`weight_fits` (the seam, :class:`tinyseek.model.layers.Linear`, asks when it is built, loaded or
moved); per call :func:`linear_fitted` then takes the kernel only for inference (no gradient to
record), a plain CPU fp32 ``x`` of 1 to :data:`MAX_ROWS` rows, no autocast, outside
``torch.compile`` tracing, the kernels on (``TINYSEEK_LINEAR_KERNELS=0`` or
``KERNELS.enable(False)`` turns them off) and built (no compiler: one printed line); otherwise it
returns None and the caller runs ``F.linear``. :data:`MAX_ROWS` is 128 because with two threads MKL
wins from ~256 rows at K=1024 (timings: benchmarks/README.md, "Kernel timings").
"""
from __future__ import annotations

import torch
import torch.nn as nn

from tinyseek.kernels import loader
from tinyseek.kernels.loader import I64, INT, P

MAX_ROWS = 128  # rows (product of x's leading dims) above which F.linear (MKL) is used

KERNELS = loader.Kernels("_tinyseek_linear", loader.source("linear.c"),
                         {"ts_linear_f32": ([P, I64, P, I64, P, P, I64, I64, I64, INT], None)},
                         "TINYSEEK_LINEAR_KERNELS", "tinyseek.kernels.linear")

# any autocast on (then F.linear, whose dtype autocast decides); the C query costs ~0.04 us, the
# public torch.is_autocast_enabled("cpu") ~0.13
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: torch.is_autocast_enabled("cpu"))
_PLAIN = (torch.Tensor, nn.Parameter)  # tensor subclasses (DTensor, fake / functorch tensors) take F.linear
_F32 = torch.float32


def _plain_f32(t: torch.Tensor) -> bool:
    return type(t) in _PLAIN and t.dtype is _F32 and t.is_cpu


def weight_fits(weight: torch.Tensor, bias: torch.Tensor | None = None) -> bool:
    """Whether the kernel can compute with this weight (N, K) and bias (N,): plain CPU fp32 tensors
    (no subclass), the weight's rows contiguous, N and K non-zero, the bias contiguous. A property
    of the weights alone: the seam asks once, not per call."""
    if not _plain_f32(weight) or weight.dim() != 2 or weight.stride(1) != 1 or 0 in weight.shape:
        return False
    return bias is None or (_plain_f32(bias) and bias.shape == weight.shape[:1] and bias.stride(0) == 1)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, lib=None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the C kernel, or None where it does not apply (the
    module docstring; the caller then runs ``F.linear``, which also reports bad shapes). Checks the
    weight too (:func:`weight_fits`), for weights without a seam of their own. ``lib``: a loaded
    kernel library to use instead of :data:`KERNELS` (tests compare builds)."""
    if not weight_fits(weight, bias):
        return None
    return linear_fitted(x, weight, bias, lib)


def linear_fitted(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  lib=None) -> torch.Tensor | None:
    """:func:`linear` for a weight and bias that :func:`weight_fits` accepted (not checked again but
    for the weight's dtype): checks what changes per call (gradient mode, ``x``, autocast, tracing,
    the switch)."""
    # kept lean: it runs ~24 times a decode step, where F.linear itself takes 2-4 us (each tensor
    # attribute costs ~0.05-0.15 us, an output allocation ~0.9)
    if torch.compiler.is_compiling():  # traced by torch.compile: the graph gets F.linear
        return None
    if lib is None:
        st = KERNELS.state
        if not st["enabled"]:
            return None
        lib = st["lib"]
        if lib is None:
            lib = KERNELS.ready()
            if lib is None:
                return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    # the weight's dtype once more: memory safety against a tensor swapped in behind the seam's back
    # (FSDP2 writes module._parameters directly); a device mismatch is x's (F.linear raises)
    if x.dtype is not _F32 or weight.dtype is not _F32 or not x.is_cpu or type(x) not in _PLAIN or _autocast_on():
        return None
    N, K = weight.shape
    shape = x.shape
    nd = len(shape)
    if nd == 0 or shape[-1] != K:
        return None
    xs = x.stride()
    if nd == 3:  # (B, T, K): one row stride when the rows are evenly spaced (no reshape)
        B, T = shape[0], shape[1]
        M = B * T
        if M > MAX_ROWS or M == 0:
            return None
        if xs[2] == 1 and (T == 1 or B == 1 or xs[0] == T * xs[1]):
            sx = xs[0] if T == 1 else xs[1]
        else:
            x = x.contiguous()
            sx = K
        y = torch.empty(B, T, N)
    elif nd == 2:
        M = shape[0]
        if M > MAX_ROWS or M == 0:
            return None
        if xs[1] == 1:
            sx = xs[0]
        else:
            x = x.contiguous()
            sx = K
        y = torch.empty(M, N)
    else:
        M = x.numel() // K
        if M > MAX_ROWS or M == 0:
            return None
        x = x.reshape(M, K).contiguous()
        sx = K
        y = torch.empty(shape[:-1] + (N,))
    if y.dtype is not _F32:  # a changed default dtype (cheaper than passing dtype= every call)
        y = y.float()
    lib.ts_linear_f32(x.data_ptr(), sx, weight.data_ptr(), weight.stride(0), 0 if bias is None else bias.data_ptr(),
                      y.data_ptr(), M, N, K, torch.get_num_threads())
    return y
