"""Fused CPU kernels for the decode case (a few rows times a quantized weight), on by default.

The PyTorch-op path of :class:`tinyseek.quant.modules.QuantLinear` converts the whole int8/int4
weight to float on every call before the GEMM; at decode (one row per sequence) that conversion
costs more than the matmul itself. These kernels read the integer codes directly, convert in
registers and accumulate in fp32 (``y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k]``):

- ``ts_mm``       x (M, K) times an int8 (N, K) or packed-int4 (N, ceil(K/2)) weight, fp16 scales
- ``ts_swiglu``   one whole SwiGLU expert (gate|up matmul, ``silu(g) * u``, down matmul) in one call
- ``ts_ffn``      a dense SwiGLU FFN of three separate matrices (``QuantSwiGLU``) in one call
- ``ts_moe``      all routed experts of a MoE layer for a few tokens, weighted and summed, in one call
- ``ts_dequant``  float rows of a quantized matrix, all of them or gathered by index (embedding lookup)

They are plain C (no PyTorch headers; AVX-512 intrinsics where the CPU has them, portable loops
otherwise), compiled once (:mod:`tinyseek.kernels.loader`) with the system C compiler (``cc -O3 -march=native -ffast-math -fopenmp
-shared``, well under a second) into a private per-user cache (``$TINYSEEK_KERNEL_CACHE``,
``$XDG_CACHE_HOME/tinyseek/kernels`` or ``~/.cache/tinyseek/kernels``, owner and mode checked, else a
fresh private directory; keyed by source, compiler and its version, flags and CPU flags; written to a
temp file then renamed, so concurrent first uses are safe; see :mod:`tinyseek.kernels.loader`). Built as a small CPython extension where
``Python.h`` exists (a call costs ~0.2 us), else loaded through ``ctypes`` (~1.7 us); the tensors
travel as data pointers. Large products run on PyTorch's own OpenMP pool (the same ``libgomp``,
``torch.get_num_threads()`` threads); small ones stay on the calling thread.

Used when all of these hold: the kernels are enabled (the default; ``TINYSEEK_QUANT_KERNELS=0`` or
:func:`enable(False) <enable>` turns them off), they built (no compiler: one printed line, then
the PyTorch-op path), the input is a CPU fp32 tensor without autograd, it has at most
``MAX_ROWS`` rows, and the scales are fp16 (format v2, and v1 int4; v1 int8 checkpoints with fp32
scales take the PyTorch-op path). Results agree with that path to float summation order (tested).

Measured here (1 thread, one row, median, a loaded 2-core machine): 4096x4096: fp32 ``F.linear``
7.0 ms, int8 kernel 1.0 ms, int4 (group 32 or 128) 1.1 ms, the PyTorch-op path 62 ms (int8) and
188 ms (int4). 384x128 (cpu-tiny): fp32 ``F.linear`` 3.7 us, a QuantLinear call on the kernels
6.2 us (int8) / 7.0 us (int4, group 32) including the module call, the PyTorch-op path 12.6 us /
50.5 us. The first version of these kernels (compiler-vectorised loops, one row at a time) took
4.6 us (int8) and 72 us (int4 g32) for the 384x128 product alone: one accumulator chain per row
is latency-bound; four rows (int8) or two (int4) at a time, 16 codes a step, fix that. Without
AVX-512 (``TS_PORTABLE`` forces it, for tests) the portable loops take 7.5 us (int8) / 15.3 us
(int4 g32) per 384x128 call here, still under the PyTorch-op path's 13.8 / 52.9 us.

PyTorch's own CPU weight-only kernels were tried and are not used: ``torch._weight_int8pack_mm``
(present in 2.11 and 2.13) wants the scales in the input dtype and is fast only for bf16 input
(fp32: 33 us at 384x128, 20.6 ms at 4096x4096; bf16: 4.8 us / 1.0 ms, but that means bf16
activations, and bf16 elsewhere is 3x slower than fp32 on this CPU); likewise
``torch._weight_int4pack_mm_for_cpu`` (fp32 207 us, bf16 9.4 us at 384x128; asymmetric
scale+zero-point format).
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyseek.kernels import loader as ckernels
from tinyseek.kernels.loader import I64 as _I64, INT as _INT, P as _P

MAX_ROWS = 8  # above this, dequantise + one BLAS GEMM is faster

_SRC = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define PAR_WORK 1048576  /* multiply-adds below which a call stays on one thread */

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
  float f;
  if (e == 0) {                      /* zero / subnormal: m * 2^-24 */
    f = (float)m * 5.9604644775390625e-8f;
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7F800000u | (m << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && !defined(TS_PORTABLE)
#include <immintrin.h>
#define TS_AVX512 1
#endif

/* int8 codes q (N, K), one fp16 scale per row: y (M, N) = x (M, K) @ (q * s)^T.
   Rows go in blocks of 4 (4 independent accumulator chains; a block past N repeats row N-1). */
static void mm8(const float* x, const int8_t* q, const uint16_t* s, float* y,
                int64_t M, int64_t N, int64_t K, int nt) {
  const int64_t NB = (N + 3) / 4;
  #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t n = 4 * b;
    const int8_t* r[4];
    for (int i = 0; i < 4; ++i) r[i] = q + (n + i < N ? n + i : N - 1) * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[4];
#ifdef TS_AVX512
      const int64_t K16 = K & ~(int64_t)15;
      const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
      __m512 a[4];
      for (int i = 0; i < 4; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = k < K16 ? (__mmask16)0xFFFF : tail;
        const __m512 xv = _mm512_maskz_loadu_ps(mk, xr + k);
        for (int i = 0; i < 4; ++i)
          a[i] = _mm512_fmadd_ps(
              xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, r[i] + k))), a[i]);
      }
      for (int i = 0; i < 4; ++i) acc[i] = _mm512_reduce_add_ps(a[i]);
#else
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      #pragma omp simd reduction(+:a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xr[k];
        a0 += xv * (float)r[0][k]; a1 += xv * (float)r[1][k]; a2 += xv * (float)r[2][k]; a3 += xv * (float)r[3][k];
      }
      acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
#endif
      for (int i = 0; i < 4 && n + i < N; ++i) y[m * N + n + i] = acc[i] * h2f(s[n + i]);
    }
  }
}

/* packed int4 p (N, H = ceil(K/2)): byte j = code(2j) + 8 | (code(2j+1) + 8) << 4; fp16 scales
   (N, G), group size gs (even). x is split once into its even / odd columns (xe, xo: M x H16,
   zero past K), so byte j meets xe[j] (low nibble) and xo[j] (high nibble). AVX-512: 16 bytes a
   step, two rows at a time, each 16-byte step inside one group (gs / 2 is a multiple of 16). */
static void mm4(const float* x, const uint8_t* p, const uint16_t* s, float* y,
                int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  const int64_t H = (K + 1) / 2, H16 = (H + 15) & ~(int64_t)15, hg = G == 1 ? H : gs / 2;
  float* xe = (float*)calloc((size_t)(2 * M * H16), sizeof(float));
  float* xo = xe + M * H16;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) (k & 1 ? xo : xe)[m * H16 + k / 2] = x[m * K + k];
#ifdef TS_AVX512
  if (G == 1 || hg % 16 == 0) {
    const int64_t Hf = H & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (H - Hf)) - 1u);
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const int64_t NB = (N + 1) / 2;
    #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t n = 2 * b;
      const int two = n + 1 < N;
      const uint8_t* r0 = p + n * H;
      const uint8_t* r1 = two ? r0 + H : r0;
      const uint16_t* s0 = s + n * G;
      const uint16_t* s1 = two ? s0 + G : s0;
      for (int64_t m = 0; m < M; ++m) {
        const float* e = xe + m * H16;
        const float* o = xo + m * H16;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t j = 0; j < H; j += 16) {
          const __mmask16 mk = j < Hf ? (__mmask16)0xFFFF : tail;
          const int64_t g = G == 1 ? 0 : j / hg;
          const __m512 ev = _mm512_loadu_ps(e + j), ov = _mm512_loadu_ps(o + j);
          const __m512i b0 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r0 + j));
          const __m512i b1 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r1 + j));
          __m512 t0 = _mm512_mul_ps(ev, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b0, low), eight)));
          __m512 t1 = _mm512_mul_ps(ev, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b1, low), eight)));
          t0 = _mm512_fmadd_ps(ov, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b0, 4), eight)), t0);
          t1 = _mm512_fmadd_ps(ov, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b1, 4), eight)), t1);
          a0 = _mm512_fmadd_ps(t0, _mm512_set1_ps(_cvtsh_ss(s0[g])), a0);
          a1 = _mm512_fmadd_ps(t1, _mm512_set1_ps(_cvtsh_ss(s1[g])), a1);
        }
        y[m * N + n] = _mm512_reduce_add_ps(a0);
        if (two) y[m * N + n + 1] = _mm512_reduce_add_ps(a1);
      }
    }
    free(xe);
    return;
  }
#endif
  /* portable: one vectorisable loop over the bytes of a row, the group scale gathered per byte */
  int32_t* gidx = (int32_t*)malloc((size_t)H * sizeof(int32_t));
  for (int64_t j = 0; j < H; ++j) gidx[j] = (int32_t)(j / hg < G ? j / hg : G - 1);
  #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = p + n * H;
    float sf[G];
    for (int64_t g = 0; g < G; ++g) sf[g] = h2f(s[n * G + g]);
    for (int64_t m = 0; m < M; ++m) {
      const float* e = xe + m * H16;
      const float* o = xo + m * H16;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int64_t j = 0; j < H; ++j) {
        const int b = row[j];
        acc += (e[j] * (float)((b & 0x0F) - 8) + o[j] * (float)((b >> 4) - 8)) * sf[gidx[j]];
      }
      y[m * N + n] = acc;
    }
  }
  free(gidx);
  free(xe);
}

static void mm(int bits, const float* x, const void* q, const uint16_t* s, float* y,
               int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  if (bits == 8) mm8(x, (const int8_t*)q, s, y, M, N, K, nt);
  else mm4(x, (const uint8_t*)q, s, y, M, N, K, G, gs, nt);
}

/* AWQ smoothing: the weight was quantized as W * sm per input column, so the input is divided by
   sm (fp16, length K) first; returns x itself when sm is NULL, else a new buffer (*buf, freed by
   the caller). */
static const float* smooth_input(const float* x, const uint16_t* sm, int64_t M, int64_t K, float** buf) {
  *buf = NULL;
  if (!sm) return x;
  float* xs = (float*)malloc((size_t)(M * K) * sizeof(float));
  for (int64_t k = 0; k < K; ++k) {
    const float d = h2f(sm[k]);
    for (int64_t m = 0; m < M; ++m) xs[m * K + k] = x[m * K + k] / d;
  }
  *buf = xs;
  return xs;
}

void ts_mm(int bits, const float* x, const void* q, const uint16_t* s, const uint16_t* sm, float* y,
           int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  float* buf;
  const float* xs = smooth_input(x, sm, M, K, &buf);
  mm(bits, xs, q, s, y, M, N, K, G, gs, nt);
  free(buf);
}

/* SwiGLU expert: h = x @ Wgu^T (M, 2F; rows 0..F-1 gate, F..2F-1 up), a = silu(g) * u,
   y = a @ Wd^T (M, D). Wgu: (2F, D) codes, scales (2F, G1); Wd: (D, F) codes, scales (D, G2);
   smgu / smd: optional AWQ smoothing of each matrix's input (NULL: none). */
void ts_swiglu(int bits, const float* x, const void* qgu, const uint16_t* sgu, const uint16_t* smgu,
               const void* qd, const uint16_t* sd, const uint16_t* smd, float* y, int64_t M, int64_t D,
               int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  float* buf;
  const float* xs = smooth_input(x, smgu, M, D, &buf);
  float* h = (float*)malloc((size_t)(3 * M * F) * sizeof(float));
  float* a = h + 2 * M * F;
  mm(bits, xs, qgu, sgu, h, M, 2 * F, D, G1, gs, nt);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) {
      const float g = h[m * 2 * F + f], u = h[m * 2 * F + F + f];
      a[m * F + f] = g / (1.f + expf(-g)) * u;
      if (smd) a[m * F + f] /= h2f(smd[f]);
    }
  mm(bits, a, qd, sd, y, M, D, F, G2, gs, nt);
  free(h);
  free(buf);
}

/* Dense SwiGLU FFN from three separate matrices (QuantLinear gate_proj, up_proj: (F, D); down_proj:
   (D, F)): y (M, D) = (silu(x Wg^T) * (x Wu^T)) Wd^T, each matrix with its optional AWQ smoothing. */
void ts_ffn(int bits, const float* x, const void* qg, const uint16_t* sg, const uint16_t* smg, const void* qu,
            const uint16_t* su, const uint16_t* smu, const void* qd, const uint16_t* sd, const uint16_t* smd,
            float* y, int64_t M, int64_t D, int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  float *bg, *bu;
  const float* xg = smooth_input(x, smg, M, D, &bg);
  const float* xu = smooth_input(x, smu, M, D, &bu);
  float* h = (float*)malloc((size_t)(3 * M * F) * sizeof(float));
  float* u = h + M * F;
  float* a = u + M * F;
  mm(bits, xg, qg, sg, h, M, F, D, G1, gs, nt);
  mm(bits, xu, qu, su, u, M, F, D, G1, gs, nt);
  for (int64_t i = 0; i < M * F; ++i) {
    a[i] = h[i] / (1.f + expf(-h[i])) * u[i];
    if (smd) a[i] /= h2f(smd[i % F]);
  }
  mm(bits, a, qd, sd, y, M, D, F, G2, gs, nt);
  free(h);
  free(bu);
  free(bg);
}

/* All routed experts of a MoE layer for a few tokens (decode): y (N, D) with
   y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n]); stacked experts as ts_swiglu's matrices, expert e
   at e times the per-expert strides. Returns -1 (y partly written) on an expert outside [0, E). */
int ts_moe(int bits, const float* x, const int64_t* idx, const float* w, int64_t N, int64_t TK, int64_t E,
           const uint8_t* qgu, const uint16_t* sgu, const uint16_t* smgu, const uint8_t* qd, const uint16_t* sd,
           const uint16_t* smd, float* y, int64_t D, int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  const int64_t rgu = bits == 8 ? D : (D + 1) / 2, rd = bits == 8 ? F : (F + 1) / 2;  /* bytes a row */
  float* t = (float*)malloc((size_t)D * sizeof(float));
  memset(y, 0, (size_t)(N * D) * sizeof(float));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < TK; ++k) {
      const int64_t e = idx[n * TK + k];
      if (e < 0 || e >= E) {
        free(t);
        return -1;
      }
      ts_swiglu(bits, x + n * D, qgu + e * 2 * F * rgu, sgu + e * 2 * F * G1, smgu ? smgu + e * D : NULL,
                qd + e * D * rd, sd + e * D * G2, smd ? smd + e * F : NULL, t, 1, D, F, G1, G2, gs, nt);
      const float wk = w[n * TK + k];
      float* yr = y + n * D;
      for (int64_t d = 0; d < D; ++d) yr[d] += wk * t[d];
    }
  free(t);
  return 0;
}

/* out (R, K) float rows of a quantized (V, K) matrix: row r is idx[r] (idx may be NULL: r).
   Returns -1 (writing nothing more) on an index outside [0, V). */
int ts_dequant(int bits, const int64_t* idx, int64_t R, int64_t V, const void* q, const uint16_t* s,
               float* out, int64_t K, int64_t G, int64_t gs) {
  const int64_t H = bits == 8 ? K : (K + 1) / 2;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t v = idx ? idx[r] : r;
    if (v < 0 || v >= V) return -1;
    float* o = out + r * K;
    if (bits == 8) {
      const int8_t* row = (const int8_t*)q + v * K;
      const float sc = h2f(s[v]);
      #pragma omp simd
      for (int64_t k = 0; k < K; ++k) o[k] = (float)row[k] * sc;
    } else {
      const uint8_t* row = (const uint8_t*)q + v * H;
      for (int64_t k = 0; k < K; ++k) {
        const int b = row[k / 2];
        o[k] = (float)((k & 1 ? (b >> 4) : (b & 0x0F)) - 8) * h2f(s[v * G + k / gs]);
      }
    }
  }
  return 0;
}

""" + ckernels.PYEXT_PRELUDE + r"""
#ifdef TS_PYEXT  /* the same functions as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
#define PTR(t, i) ((t)(intptr_t)v[i])
static PyObject* py_mm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[12];
  if (ts_int_args(args, nargs, 12, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_mm((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
        PTR(float*, 5), v[6], v[7], v[8], v[9], v[10], (int)v[11]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_swiglu(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[16];
  if (ts_int_args(args, nargs, 16, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_swiglu((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
            PTR(const void*, 5), PTR(const uint16_t*, 6), PTR(const uint16_t*, 7), PTR(float*, 8), v[9], v[10],
            v[11], v[12], v[13], v[14], (int)v[15]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_dequant(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[10];
  int rc;
  if (ts_int_args(args, nargs, 10, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_dequant((int)v[0], PTR(const int64_t*, 1), v[2], v[3], PTR(const void*, 4), PTR(const uint16_t*, 5),
                  PTR(float*, 6), v[7], v[8], v[9]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_moe(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[20];
  int rc;
  if (ts_int_args(args, nargs, 20, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_moe((int)v[0], PTR(const float*, 1), PTR(const int64_t*, 2), PTR(const float*, 3), v[4], v[5], v[6],
              PTR(const uint8_t*, 7), PTR(const uint16_t*, 8), PTR(const uint16_t*, 9), PTR(const uint8_t*, 10),
              PTR(const uint16_t*, 11), PTR(const uint16_t*, 12), PTR(float*, 13), v[14], v[15], v[16], v[17],
              v[18], (int)v[19]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_ffn(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[19];
  if (ts_int_args(args, nargs, 19, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_ffn((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
         PTR(const void*, 5), PTR(const uint16_t*, 6), PTR(const uint16_t*, 7), PTR(const void*, 8),
         PTR(const uint16_t*, 9), PTR(const uint16_t*, 10), PTR(float*, 11), v[12], v[13], v[14], v[15], v[16],
         v[17], (int)v[18]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyMethodDef methods[] = {
  {"ts_ffn", (PyCFunction)(void (*)(void))py_ffn, METH_FASTCALL, NULL},
  {"ts_moe", (PyCFunction)(void (*)(void))py_moe, METH_FASTCALL, NULL},
  {"ts_mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL, NULL},
  {"ts_swiglu", (PyCFunction)(void (*)(void))py_swiglu, METH_FASTCALL, NULL},
  {"ts_dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_quant", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_quant(void) { return PyModule_Create(&module); }
#endif
"""

_NAME = "_tinyseek_quant"  # the extension's module name (PyInit__tinyseek_quant above)
_SIGS = {
    "ts_mm": ([_INT, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_swiglu": ([_INT, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_ffn": ([_INT, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _I64, _INT], None),
    "ts_moe": ([_INT, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _P, _P, _P, _I64, _I64, _I64, _I64, _I64, _INT],
               _INT),
    "ts_dequant": ([_INT, _P, _I64, _I64, _P, _P, _P, _I64, _I64, _I64], _INT),
}
KERNELS = ckernels.Kernels(_NAME, _SRC, _SIGS, "TINYSEEK_QUANT_KERNELS", "tinyseek.quant.kernels")
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


def _group(bits: int, group_size: int, k: int) -> int:
    return group_size if bits == 4 and group_size > 0 else k + k % 2


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


def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int,
             smooth: torch.Tensor | None = None):
    """``(x / smooth) @ W_hat^T`` for ``x (..., K)`` with the fused kernel, or None when not enabled
    / not applicable (see the module docstring). ``qweight`` / ``scale`` / ``smooth`` (fp16, K; None
    = no AWQ smoothing) as stored by :class:`tinyseek.quant.modules.QuantLinear` (contiguous).
    Kept lean: it runs once per Linear per decode step."""
    K = x.shape[-1]
    n = x.numel()
    lib = _lib_for(x, scale, n <= MAX_ROWS * K, smooth)
    if lib is None:
        return None
    x = x.contiguous()
    N = qweight.shape[0]
    y = torch.empty(x.shape[:-1] + (N,), dtype=torch.float32)
    lib.ts_mm(bits, x.data_ptr(), qweight.data_ptr(), scale.data_ptr(), _ptr(smooth), y.data_ptr(), n // K, N, K,
              scale.shape[-1], _group(bits, group_size, K), torch.get_num_threads())
    return y


def swiglu(x_MD: torch.Tensor, q_gu: torch.Tensor, s_gu: torch.Tensor, q_d: torch.Tensor, s_d: torch.Tensor,
           e: int, bits: int, group_size: int, sm_gu: torch.Tensor | None = None, sm_d: torch.Tensor | None = None):
    """Expert ``e`` of stacked quantized experts (``q_gu (E, 2F, D')``, ``q_d (E, D, F')``, optional
    AWQ smoothing ``sm_gu (E, D)`` / ``sm_d (E, F)``) applied to ``x (M, D)`` in one call:
    ``(silu(g) * u) @ W_down``; None when not applicable."""
    M, D = x_MD.shape
    lib = _lib_for(x_MD, s_gu, M <= MAX_ROWS, sm_gu)
    if lib is None:
        return None
    x_MD = x_MD.contiguous()
    F2 = q_gu.shape[1]
    y = torch.empty(M, D, dtype=torch.float32)
    # expert e's slices by pointer offset (no view objects); the buffers are contiguous
    lib.ts_swiglu(bits, x_MD.data_ptr(), q_gu.data_ptr() + e * q_gu.stride(0) * q_gu.element_size(),
                  s_gu.data_ptr() + e * s_gu.stride(0) * 2, _row_ptr(sm_gu, e),
                  q_d.data_ptr() + e * q_d.stride(0) * q_d.element_size(), s_d.data_ptr() + e * s_d.stride(0) * 2,
                  _row_ptr(sm_d, e), y.data_ptr(), M, D, F2 // 2, s_gu.shape[-1], s_d.shape[-1],
                  _group(bits, group_size, D), torch.get_num_threads())
    return y


def ffn(x: torch.Tensor, gate, up, down):
    """``down(silu(gate(x)) * up(x))`` for three :class:`~tinyseek.quant.modules.QuantLinear` of
    one bit width / group size in one call, ``x (..., D)``; None when not applicable."""
    D = x.shape[-1]
    n = x.numel()
    g, u, d = gate._buffers, up._buffers, down._buffers
    lib = _lib_for(x, g["scale"], n <= MAX_ROWS * D, u["scale"], d["scale"], g["smooth"], u["smooth"], d["smooth"])
    if lib is None:
        return None
    x = x.contiguous()
    bits, gs = gate.bits, gate.group_size
    y = torch.empty(x.shape, dtype=torch.float32)
    lib.ts_ffn(bits, x.data_ptr(), g["qweight"].data_ptr(), g["scale"].data_ptr(), _ptr(g["smooth"]),
               u["qweight"].data_ptr(), u["scale"].data_ptr(), _ptr(u["smooth"]), d["qweight"].data_ptr(),
               d["scale"].data_ptr(), _ptr(d["smooth"]), y.data_ptr(), n // D, D, gate.out_features,
               g["scale"].shape[-1], d["scale"].shape[-1], _group(bits, gs, D), torch.get_num_threads())
    return y


def _ptr(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


def moe(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, q_gu: torch.Tensor, s_gu: torch.Tensor,
        q_d: torch.Tensor, s_d: torch.Tensor, bits: int, group_size: int, sm_gu: torch.Tensor | None = None,
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
    rc = lib.ts_moe(bits, x_ND.data_ptr(), idx_NK.data_ptr(), w_NK.data_ptr(), N, idx_NK.shape[1], E,
                    q_gu.data_ptr(), s_gu.data_ptr(), _ptr(sm_gu), q_d.data_ptr(), s_d.data_ptr(), _ptr(sm_d),
                    y.data_ptr(), D, F2 // 2,
                    s_gu.shape[-1], s_d.shape[-1], _group(bits, group_size, D), torch.get_num_threads())
    if rc != 0:
        raise IndexError(f"expert index out of range for {E} experts")
    return y


def _row_ptr(t: torch.Tensor | None, e: int) -> int:
    """Address of row ``e`` of a contiguous fp16 ``(E, K)`` tensor (0 = NULL for None)."""
    return 0 if t is None else t.data_ptr() + e * t.stride(0) * 2


def dequant_rows(qweight: torch.Tensor, scale: torch.Tensor, bits: int, k: int, group_size: int,
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
        rc = lib.ts_dequant(bits, flat.data_ptr(), flat.numel(), V, qweight.data_ptr(), scale.data_ptr(),
                            out.data_ptr(), k, scale.shape[-1], _group(bits, group_size, k))
    else:
        out = torch.empty(V, k, dtype=torch.float32)
        rc = lib.ts_dequant(bits, 0, V, V, qweight.data_ptr(), scale.data_ptr(), out.data_ptr(), k,
                            scale.shape[-1], _group(bits, group_size, k))
    if rc != 0:
        raise IndexError(f"index out of range in the quantized table of {V} rows")
    return out
