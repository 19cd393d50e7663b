/* The routed experts of a MoE layer at fp32 inference in one call (tinyseek/kernels/moe_infer.py is
   its Python glue, MoE._loop in tinyseek/model/moe.py the PyTorch reference):
   y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n]), expert_e(x) = (silu(x Wg_e) * (x Wu_e)) Wd_e. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define PAR_WORK 2097152  /* multiply-adds (N K 3 D F) below which a call stays on one thread */
#define TB 4              /* tokens per block: each weight load feeds TB tokens */

#if defined(__AVX512F__) && !defined(TS_PORTABLE)
#include <immintrin.h>
#define TS_AVX512 1
#endif

/* Ask for [p, p + n) in L2 ahead of its use. A decode step's weights are cold (the whole model does
   not stay in cache from one step to the next) and the hardware prefetcher does not run ahead from
   one expert's weights to the next's: at 16 tokens of cpu-tiny (8 experts) a call took ~5x longer
   with cold weights than with hot ones; asking for the next expert while this one computes took
   the cold call from ~120-170 to ~65-120 us (noisy shared machine, interleaved runs). */
static inline void prefetch_l2(const char* p, int64_t n) {
  for (int64_t o = 0; o < n; o += 64) __builtin_prefetch(p + o, 0, 2);
}

/* Y[t][0:Nc] = sum_k X[t][k] * W[k * Nc + 0:Nc] for t < T (W row-major (Kd, Nc)). */
#ifdef TS_AVX512
static inline __attribute__((always_inline)) void tile(const int T, const float* const* X, const float* W,
                                                       int64_t Kd, int64_t Nc, int64_t j, float* const* Y) {
  __mmask16 m[4];
  for (int v = 0; v < 4; ++v) {
    const int64_t r = Nc - j - 16 * v;
    m[v] = r >= 16 ? (__mmask16)0xFFFF : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1u);
  }
  __m512 acc[TB][4];
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_setzero_ps();
  const float* wp = W + j;
  for (int64_t k = 0; k < Kd; ++k, wp += Nc) {
    __m512 wv[4];
    for (int v = 0; v < 4; ++v) wv[v] = _mm512_maskz_loadu_ps(m[v], wp + 16 * v);
    for (int t = 0; t < T; ++t) {
      const __m512 xb = _mm512_set1_ps(X[t][k]);
      for (int v = 0; v < 4; ++v) acc[t][v] = _mm512_fmadd_ps(xb, wv[v], acc[t][v]);
    }
  }
  for (int t = 0; t < T; ++t)
    for (int v = 0; v < 4; ++v) _mm512_mask_storeu_ps(Y[t] + j + 16 * v, m[v], acc[t][v]);
}
static inline __attribute__((always_inline)) void gemm_t(const int T, const float* const* X, const float* W,
                                                         int64_t Kd, int64_t Nc, float* const* Y) {
  for (int64_t j = 0; j < Nc; j += 64) tile(T, X, W, Kd, Nc, j, Y);
}
#else
static inline __attribute__((always_inline)) void gemm_t(const int T, const float* const* X, const float* W,
                                                         int64_t Kd, int64_t Nc, float* const* Y) {
  for (int64_t j0 = 0; j0 < Nc; j0 += 64) {
    const int64_t nj = Nc - j0 < 64 ? Nc - j0 : 64;
    float acc[TB][64];
    for (int t = 0; t < T; ++t)
      for (int64_t j = 0; j < 64; ++j) acc[t][j] = 0.f;
    for (int64_t k = 0; k < Kd; ++k) {
      const float* wr = W + k * Nc + j0;
      for (int t = 0; t < T; ++t) {
        const float xv = X[t][k];
        float* a = acc[t];
        #pragma omp simd
        for (int64_t j = 0; j < nj; ++j) a[j] += xv * wr[j];
      }
    }
    for (int t = 0; t < T; ++t) memcpy(Y[t] + j0, acc[t], (size_t)nj * sizeof(float));
  }
}
#endif

static void gemm(int T, const float* const* X, const float* W, int64_t Kd, int64_t Nc, float* const* Y) {
  switch (T) {  /* constant T: the tile's loops unroll and its accumulators stay in registers */
    case 1: gemm_t(1, X, W, Kd, Nc, Y); break;
    case 2: gemm_t(2, X, W, Kd, Nc, Y); break;
    case 3: gemm_t(3, X, W, Kd, Nc, Y); break;
    default: gemm_t(4, X, W, Kd, Nc, Y); break;
  }
}

/* Routed experts for N tokens: x (N, D), idx / w (N, K) expert ids and routing weights, stacked
   wgu (E, D, 2F) (gate columns [0, F), up [F, 2F)) and wd (E, F, D); y (N, D). Returns -1 (y not
   written) on an expert id outside [0, E), -2 when out of memory, else 0. */
int ts_moe_f32(const float* x, const int64_t* idx, const float* w, int64_t N, int64_t K, int64_t E,
               const float* wgu, const float* wd, float* y, int64_t D, int64_t F, int nt) {
  const int64_t A = N * K;
  for (int64_t a = 0; a < A; ++a)
    if (idx[a] < 0 || idx[a] >= E) return -1;
  int64_t* start = (int64_t*)calloc((size_t)(E + 1), sizeof(int64_t));
  int64_t* order = (int64_t*)malloc((size_t)(A > 0 ? A : 1) * sizeof(int64_t));
  float* yA = K == 1 ? y : (float*)malloc((size_t)(A > 0 ? A * D : 1) * sizeof(float));
  if (!start || !order || !yA) {
    free(start); free(order); if (yA != y) free(yA);
    return -2;
  }
  /* counting sort of the assignments by expert (stable: token order inside an expert) */
  for (int64_t a = 0; a < A; ++a) start[idx[a] + 1]++;
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  int64_t nblk = 0;
  for (int64_t e = 0; e < E; ++e) nblk += (start[e + 1] - start[e] + TB - 1) / TB;
  int64_t* blk = (int64_t*)malloc((size_t)(nblk > 0 ? 2 * nblk : 1) * sizeof(int64_t));  /* (expert, first) */
  if (!blk) {
    free(start); free(order); if (yA != y) free(yA);
    return -2;
  }
  {
    int64_t* fill = (int64_t*)malloc((size_t)E * sizeof(int64_t));
    if (!fill) {
      free(blk); free(start); free(order); if (yA != y) free(yA);
      return -2;
    }
    memcpy(fill, start, (size_t)E * sizeof(int64_t));
    for (int64_t a = 0; a < A; ++a) order[fill[idx[a]]++] = a;
    free(fill);
  }
  for (int64_t e = 0, b = 0; e < E; ++e)
    for (int64_t s = start[e]; s < start[e + 1]; s += TB, ++b) { blk[2 * b] = e; blk[2 * b + 1] = s; }
  int fail = 0;
  const int par = nt > 1 && A * 3 * D * F >= PAR_WORK;
  #pragma omp parallel if (par) num_threads(nt)
  {
    float* h = (float*)malloc((size_t)(TB * 3 * F) * sizeof(float));  /* gate|up (TB, 2F), act (TB, F) */
    if (!h) {
      #pragma omp atomic write
      fail = 1;
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t b = 0; b < nblk; ++b) {
      if (!h) continue;
      const int64_t e = blk[2 * b], s = blk[2 * b + 1];
      const int T = (int)(start[e + 1] - s < TB ? start[e + 1] - s : TB);
      if (!par && s == start[e]) {  /* an expert's first block: ask for the next used expert's weights */
        int64_t e2 = e + 1;
        while (e2 < E && start[e2 + 1] == start[e2]) ++e2;
        if (e2 < E) {
          prefetch_l2((const char*)(wgu + e2 * D * 2 * F), D * 2 * F * (int64_t)sizeof(float));
          prefetch_l2((const char*)(wd + e2 * F * D), F * D * (int64_t)sizeof(float));
        }
      }
      const float* xs[TB];
      float* hs[TB];
      const float* as[TB];
      float* ys[TB];
      float* act = h + TB * 2 * F;
      for (int t = 0; t < T; ++t) {
        const int64_t a = order[s + t];
        xs[t] = x + (a / K) * D;
        hs[t] = h + t * 2 * F;
        as[t] = act + t * F;
        ys[t] = yA + a * D;
      }
      gemm(T, xs, wgu + e * D * 2 * F, D, 2 * F, hs);
      for (int t = 0; t < T; ++t) {
        const float wt = w[order[s + t]];
        const float* g = hs[t];
        float* o = act + t * F;
        #pragma omp simd
        for (int64_t f = 0; f < F; ++f) o[f] = g[f] / (1.f + expf(-g[f])) * g[F + f] * wt;
      }
      gemm(T, as, wd + e * F * D, F, D, ys);
    }
    free(h);
  }
  if (!fail && K > 1) {  /* each token's rows summed in slot order */
    for (int64_t n = 0; n < N; ++n) {
      float* o = y + n * D;
      const float* r = yA + n * K * D;
      memcpy(o, r, (size_t)D * sizeof(float));
      for (int64_t k = 1; k < K; ++k) {
        const float* rk = r + k * D;
        #pragma omp simd
        for (int64_t d = 0; d < D; ++d) o[d] += rk[d];
      }
    }
  }
  free(blk); free(start); free(order); if (yA != y) free(yA);
  return fail ? -2 : 0;
}

#include "pyext.h"
#ifdef TS_PYEXT  /* the same function as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
static PyObject* py_moe_f32(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[12];
  int rc;
  if (ts_int_args(args, nargs, 12, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_moe_f32(PTR(const float*, 0), PTR(const int64_t*, 1), PTR(const float*, 2),
                  v[3], v[4], v[5], PTR(const float*, 6), PTR(const float*, 7),
                  PTR(float*, 8), v[9], v[10], (int)v[11]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyMethodDef methods[] = {
  {"ts_moe_f32", (PyCFunction)(void (*)(void))py_moe_f32, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_moe", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_moe(void) { return PyModule_Create(&module); }
#endif
