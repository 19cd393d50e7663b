/* fp32 y = x @ W^T (+ b) for few rows (decode), over nn.Linear's own weight layout W (N, K)
   row-major (tinyseek/kernels/linear.py is its Python glue, F.linear the reference). Every output is
   one accumulator with the same summation order whatever tile it sits in: a row's result does not
   depend on the other rows of the call nor on the thread count. */
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


#include "pyext.h"

#ifdef TS_PYEXT  /* the same function as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
static PyObject* py_linear_f32(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[10];
  if (ts_int_args(args, nargs, 10, v)) return NULL;
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
