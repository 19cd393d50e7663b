"""fp32 CPU kernel for ``y = x @ W^T (+ b)`` at few rows (decode), and the :class:`Linear` that uses it.

At decode the model's linear layers see 1-64 rows; MKL's fp32 GEMM (2024.2 does not use AVX-512 on
this AMD CPU) spends most of such a call outside the arithmetic (a 1x128 @ 128x384 call reaches ~31
GFLOP/s, 16 rows ~77). ``ts_linear_f32`` computes each output in dot-product form over nn.Linear's
own weight layout ``W (N, K)`` row-major (no packing):

- outputs go in chunks of 16 weight rows; inside a chunk, rows of ``x`` in tiles of 4 rows x 4
  outputs, then 2 x 8 for a remaining pair, 1 x 16 for a last row: always 16 AVX-512 accumulators
  over K in steps of 16 (a masked last step: any K), so each weight load feeds up to 4 rows;
- one transposing reduction turns the 16 accumulators into the 16 dot products as one vector (the
  same addition tree for every accumulator), the bias is added and each row stored masked (any N);
- every output ``y[m, n]`` is one accumulator with the same summation order whatever tile it sits in,
  so a row's result does not depend on the other rows of the call (bitwise: the serving engine's
  greedy tokens are the same alone and batched; tested), nor on the thread count;
- portable loops (``TS_PORTABLE``, or no AVX-512): one row at a time against 8 weight rows.

Calls with ``M * N * K`` >= 1M multiply-adds and ``torch.get_num_threads() > 1`` share the output
chunks over OpenMP; smaller ones stay on the calling thread (no OpenMP call at all).

Measured here (AMD Zen 5 EPYC, 1 thread, thread CPU time per call incl. the Python wrapper, medians
of interleaved runs; kernel / F.linear): cpu-tiny shapes (K, N) = (128, 384): 4.3 / 4.1 us at M=1,
5.8 / 8.4 at 4, 14.0 / 20.5 at 16, 47.8 / 67.5 at 64; (128, 2048) (lm_head): 13.4 / 17.1, 20.2 /
46.5, 65.8 / 110, 246 / 365; (96, 128): 2.8 / 2.0, 3.2 / 3.3, 5.5 / 6.2, 14.5 / 18.0. The k-loop runs
at the FMA peak (2 x 16 lanes a cycle); the reduction costs ~20% at K=128, so ~140 GFLOP/s from 16
rows on (MKL 2024.2: ~77 at 16 rows, ~95 at 64-256). One row is bound by L2 bandwidth (~60 GFLOP/s
for the kernel alone) and, at the smallest shapes, by the wrapper's ~2.3 us (the output allocation
~0.8 of it): break-even with F.linear. It stays faster than MKL up to 2048 rows on one thread, but
with two threads MKL wins from ~256 rows at K=1024: hence :data:`MAX_ROWS` 128. Whole cpu-tiny decode
step (``model(x, cache=cache)``, 24 linear calls) at B = 1 / 4 / 16 / 64 rows: ~0.66 / 0.75 / 1.05 /
2.2 ms with the kernel, ~0.67 / 0.88 / 1.3 / 3.05 ms without.

:func:`linear` returns None where the kernel does not apply and the caller runs ``F.linear``: a
gradient needed (training keeps exactly the PyTorch op), not CPU fp32 plain tensors (no tensor
subclasses), an autocast on, under ``torch.compile`` tracing, more than :data:`MAX_ROWS` rows, a
weight whose rows are not contiguous, kernels off (``TINYSEEK_LINEAR_KERNELS=0`` or
``KERNELS.enable(False)``) or not built (no compiler: one printed line). Results equal ``F.linear``
up to float summation order.

:class:`Linear` is ``nn.Linear`` (same parameters, state_dict keys and repr; ``isinstance`` checks
keep working) whose forward tries :func:`linear` first. Opacus keys its per-sample gradient rules
on the exact module type: :func:`register_opacus` gives this class nn.Linear's rules.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.kernels import loader as ckernels
from tinyseek.kernels.loader import I64 as _I64, INT as _INT, P as _P

MAX_ROWS = 128  # rows (product of x's leading dims) above which F.linear (MKL) is used

_SRC = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) && !defined(TS_PORTABLE)
#include <immintrin.h>
#define TS_AVX512 1
#endif

#define PAR_WORK 1048576  /* multiply-adds (M N K) below which a call stays on one thread */
#define NC 16             /* outputs (weight rows) per chunk */

#ifdef TS_AVX512
static inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* lane k of the result = sum of the 16 lanes of a[k], by the same tree for every k:
   128-bit blocks (0 + 2) + (1 + 3), then inside a block (e0 + e2) + (e1 + e3) */
static inline __attribute__((always_inline)) __m512 reduce16(const __m512* a) {
  __m512 w[8], x[4], y[2];
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44),
                         _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(perm, z);
}

/* R rows x C outputs (R * C == 16): y[r * sy + c] = x[r * sx] . w[c * sw] (+ b[c]) for r < nr,
   c < nc; rows / outputs past nr / nc repeat the first one (computed, not stored). Accumulator
   r * C + c holds output (r, c); lane r * C + c of the reduced vector its dot product. */
static inline __attribute__((always_inline)) void tile(const int R, const int C, const float* x, int64_t sx,
                                                       const float* w, int64_t sw, const float* b, float* y,
                                                       int64_t sy, int64_t K, int nr, int nc) {
  const float* xr[4];
  const float* wr[16];
  for (int r = 0; r < R; ++r) xr[r] = x + (r < nr ? r : 0) * sx;
  for (int c = 0; c < C; ++c) wr[c] = w + (c < nc ? c : 0) * sw;
  __m512 a[16];
  for (int i = 0; i < 16; ++i) a[i] = _mm512_setzero_ps();
  const int64_t K16 = K & ~(int64_t)15;
  int64_t k = 0;
  for (; k < K16; k += 16) {
    __m512 xv[4];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_loadu_ps(xr[r] + k);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_loadu_ps(wr[c] + k);
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm512_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
  if (k < K) {
    const __mmask16 m = tail_mask(K - k);
    __m512 xv[4];
    for (int r = 0; r < R; ++r) xv[r] = _mm512_maskz_loadu_ps(m, xr[r] + k);
    for (int c = 0; c < C; ++c) {
      const __m512 wv = _mm512_maskz_loadu_ps(m, wr[c] + k);
      for (int r = 0; r < R; ++r) a[r * C + c] = _mm512_fmadd_ps(xv[r], wv, a[r * C + c]);
    }
  }
  __m512 s = reduce16(a);
  const __m512i lane = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  const __mmask16 om = tail_mask(nc);
  if (b) {  /* lane r * C + c gets b[c] */
    const __m512 bv = _mm512_maskz_loadu_ps(om, b);
    s = _mm512_add_ps(s, C == 16 ? bv : _mm512_permutexvar_ps(_mm512_and_si512(lane, _mm512_set1_epi32(C - 1)), bv));
  }
  for (int r = 0; r < nr; ++r) {  /* row r's C results moved down to lanes 0..C-1 */
    const __m512 v = r == 0 ? s : _mm512_permutexvar_ps(_mm512_add_epi32(lane, _mm512_set1_epi32(r * C)), s);
    _mm512_mask_storeu_ps(y + r * sy, om, v);
  }
}

/* one chunk: outputs [n0, n0 + nn) of all M rows */
static void chunk(const float* x, int64_t sx, const float* w, int64_t sw, const float* b, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t n0, int nn) {
  const float* wc = w + n0 * sw;
  const float* bc = b ? b + n0 : NULL;
  int64_t m = 0;
  for (; m + 4 <= M; m += 4)
    for (int c = 0; c < nn; c += 4)
      tile(4, 4, x + m * sx, sx, wc + c * sw, sw, bc ? bc + c : NULL, y + m * N + n0 + c, N, K, 4,
           nn - c < 4 ? nn - c : 4);
  if (M - m >= 2) {
    for (int c = 0; c < nn; c += 8)
      tile(2, 8, x + m * sx, sx, wc + c * sw, sw, bc ? bc + c : NULL, y + m * N + n0 + c, N, K, 2,
           nn - c < 8 ? nn - c : 8);
    m += 2;
  }
  if (m < M) tile(1, 16, x + m * sx, sx, wc, sw, bc, y + m * N + n0, N, K, 1, nn);
}
#else
/* portable: one row against 8 weight rows (outputs past nc repeat the first; not stored) */
static void chunk(const float* x, int64_t sx, const float* w, int64_t sw, const float* b, float* y, int64_t M,
                  int64_t N, int64_t K, int64_t n0, int nn) {
  for (int c0 = 0; c0 < nn; c0 += 8) {
    const int nc = nn - c0 < 8 ? nn - c0 : 8;
    const float* wr[8];
    for (int c = 0; c < 8; ++c) wr[c] = w + (n0 + c0 + (c < nc ? c : 0)) * sw;
    const float *w0 = wr[0], *w1 = wr[1], *w2 = wr[2], *w3 = wr[3], *w4 = wr[4], *w5 = wr[5], *w6 = wr[6],
                *w7 = wr[7];
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * sx;
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f, a4 = 0.f, a5 = 0.f, a6 = 0.f, a7 = 0.f;
      #pragma omp simd reduction(+:a0, a1, a2, a3, a4, a5, a6, a7)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xr[k];
        a0 += xv * w0[k]; a1 += xv * w1[k]; a2 += xv * w2[k]; a3 += xv * w3[k];
        a4 += xv * w4[k]; a5 += xv * w5[k]; a6 += xv * w6[k]; a7 += xv * w7[k];
      }
      const float acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
      float* yr = y + m * N + n0 + c0;
      for (int c = 0; c < nc; ++c) yr[c] = b ? acc[c] + b[n0 + c0 + c] : acc[c];
    }
  }
}
#endif

#define PF_DIST 2  /* chunks ahead whose weight rows are prefetched (single-thread calls) */
/* Ask for the cache lines of weight rows [0, n) (row stride sw floats, K used) ahead of their use.
   A decode step's weights are cold (the model does not stay in cache between steps) and the 16
   rows a chunk streams at once defeat the hardware prefetcher: cold calls at 16 rows took ~1.6-2x
   the hot time, with this ~1.3x (lm_head 2048x128: 132 -> 104 us; 384x128: 34 -> 21 us). */
static inline void prefetch_rows(const float* w, int64_t sw, int64_t n, int64_t K) {
  for (int64_t r = 0; r < n; ++r)
    for (int64_t k = 0; k < K; k += 16) __builtin_prefetch(w + r * sw + k, 0, 3);
}

/* y (M, N) contiguous = x (M, K) @ w^T (+ b): x[m, k] at x[m * sx + k], w[n, k] at w[n * sw + k],
   b (N) or NULL. */
void ts_linear_f32(const float* x, int64_t sx, const float* w, int64_t sw, const float* b, float* y, int64_t M,
                   int64_t N, int64_t K, int nt) {
  const int64_t nb = (N + NC - 1) / NC;
  if (nt > 1 && nb > 1 && M * N * K >= PAR_WORK) {
    #pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t j = 0; j < nb; ++j) {
      const int64_t n0 = j * NC;
      chunk(x, sx, w, sw, b, y, M, N, K, n0, N - n0 < NC ? (int)(N - n0) : NC);
    }
    return;
  }
  for (int64_t j = 0; j < nb; ++j) {  /* small: no OpenMP call at all (its serial team costs ~0.3 us) */
    const int64_t n0 = j * NC;
    if (j + PF_DIST < nb) {
      const int64_t n1 = n0 + PF_DIST * NC;
      prefetch_rows(w + n1 * sw, sw, N - n1 < NC ? N - n1 : NC, K);
    }
    chunk(x, sx, w, sw, b, y, M, N, K, n0, N - n0 < NC ? (int)(N - n0) : NC);
  }
}

""" + ckernels.PYEXT_PRELUDE + r"""
#ifdef TS_PYEXT  /* the same function as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
static PyObject* py_linear_f32(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[10];
  if (ts_int_args(args, nargs, 10, v)) return NULL;
#define PTR(t, i) ((t)(intptr_t)v[i])
  if (v[6] * v[7] * v[8] < 65536) {  /* short: not worth releasing the GIL */
    ts_linear_f32(PTR(const float*, 0), v[1], PTR(const float*, 2), v[3], PTR(const float*, 4), PTR(float*, 5),
                  v[6], v[7], v[8], (int)v[9]);
  } else {
    Py_BEGIN_ALLOW_THREADS
    ts_linear_f32(PTR(const float*, 0), v[1], PTR(const float*, 2), v[3], PTR(const float*, 4), PTR(float*, 5),
                  v[6], v[7], v[8], (int)v[9]);
    Py_END_ALLOW_THREADS
  }
  Py_RETURN_NONE;
}
static PyMethodDef methods[] = {
  {"ts_linear_f32", (PyCFunction)(void (*)(void))py_linear_f32, METH_FASTCALL, "y = x @ w^T (+ b), fp32"},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_linear", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_linear(void) { return PyModule_Create(&module); }
#endif
"""

_SIGS = {"ts_linear_f32": ([_P, _I64, _P, _I64, _P, _P, _I64, _I64, _I64, _INT], None)}

KERNELS = ckernels.Kernels("_tinyseek_linear", _SRC, _SIGS, "TINYSEEK_LINEAR_KERNELS", "tinyseek.model.linear_kernel")

# any autocast on (then F.linear, whose dtype autocast decides); the C query costs ~0.04 us, the
# public torch.is_autocast_enabled("cpu") ~0.13
_autocast_on = getattr(torch._C, "_is_any_autocast_enabled", None) or (lambda: torch.is_autocast_enabled("cpu"))
_PLAIN = (torch.Tensor, nn.Parameter)  # tensor subclasses (DTensor, fake / functorch tensors) take F.linear
_F32 = torch.float32


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, lib=None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` through the C kernel, or None where it does not apply (see the
    module docstring; the caller then runs ``F.linear``, which also reports bad shapes). ``lib``: a
    loaded kernel library to use instead of :data:`KERNELS` (tests compare builds)."""
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
    if (x.dtype is not _F32 or weight.dtype is not _F32 or not x.is_cpu or not weight.is_cpu
            or type(x) not in _PLAIN or type(weight) not in _PLAIN or _autocast_on()):
        return None
    ws = weight.stride()
    if len(ws) != 2 or ws[1] != 1:
        return None
    N, K = weight.shape
    shape = x.shape
    nd = len(shape)
    if nd == 0 or shape[-1] != K or K == 0 or N == 0:
        return None
    b = 0
    if bias is not None:
        if (bias.dtype is not _F32 or not bias.is_cpu or type(bias) not in _PLAIN or bias.shape != (N,)
                or bias.stride(0) != 1):
            return None
        b = bias.data_ptr()
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
    lib.ts_linear_f32(x.data_ptr(), sx, weight.data_ptr(), ws[0], b, y.data_ptr(), M, N, K, torch.get_num_threads())
    return y


def linear_or_f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`linear` where it applies, else ``F.linear`` (same result up to summation order)."""
    y = linear(x, weight, bias)
    return F.linear(x, weight, bias) if y is None else y


class Linear(nn.Linear):
    """``nn.Linear`` whose forward uses :func:`linear` where it applies (CPU fp32 inference at up to
    :data:`MAX_ROWS` rows), else ``F.linear``: with a gradient needed, exactly ``nn.Linear``'s op.
    No parameters or buffers of its own (same state_dict, repr and ``isinstance`` checks)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if torch.is_grad_enabled() and w.requires_grad:  # training: exactly nn.Linear's op, no checks
            return F.linear(x, w, self.bias)
        return linear_or_f(x, w, self.bias)


def register_opacus() -> None:
    """Give :class:`Linear` Opacus' per-sample gradient (and ghost-clipping norm) rules of
    ``nn.Linear``: Opacus looks them up by exact module type, so without this it would fall back to
    its slower functorch rule. Needs opacus (the caller imports it first)."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    for cls in (GradSampleModule, GradSampleModuleFastGradientClipping):
        for table in ("GRAD_SAMPLERS", "NORM_SAMPLERS"):
            rules = getattr(cls, table, None)
            if isinstance(rules, dict) and nn.Linear in rules:
                rules.setdefault(Linear, rules[nn.Linear])
