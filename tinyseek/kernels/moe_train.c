/* fp32 CPU training kernel of the routed experts (tinyseek/kernels/moe_train.py is its Python glue,
   tinyseek/kernels/moe_grouped.py RoutedExperts the PyTorch path it replaces, MoE._loop in
   tinyseek/model/moe.py the reference): each expert's forward or backward chain in one pass, with
   PyTorch's own BLAS sgemm_ passed in by address. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

/* Fortran BLAS sgemm (column-major), as exported by PyTorch's libtorch_cpu (MKL, LP64) */
typedef void (*sgemm_t)(const char*, const char*, const int*, const int*, const int*, const float*,
                        const float*, const int*, const float*, const int*, const float*, float*, const int*);

/* row-major C (M x N, ldc) = op(A) @ op(B); ta/tb: 'N' or 'T' of the row-major operands.
   Row-major X is column-major X^T, so C^T = op(B)^T op(A)^T in column-major terms. */
static void mm(sgemm_t g, char ta, char tb, int M, int N, int K, const float* A, int lda,
               const float* B, int ldb, float* C, int ldc) {
  const float one = 1.f, zero = 0.f;
  g(&tb, &ta, &N, &M, &K, &one, B, &ldb, A, &lda, &zero, C, &ldc);
}

static inline float sigm(float g) { return 1.f / (1.f + expf(-g)); }

/* forward for experts [e0, e1): offs[e] = end row of expert e (int32, cumulative) */
int ts_experts_fwd(const float* x, const int64_t* tok, const float* w, const int32_t* offs,
                   int64_t e0, int64_t e1, int64_t D, int64_t F, const float* wgu, const float* wd,
                   float* xr, float* h, float* act, float* y, void* gemm) {
  sgemm_t g = (sgemm_t)gemm;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t s = e ? offs[e - 1] : 0, t = offs[e], R = t - s;
    if (R <= 0) continue;
    for (int64_t r = s; r < t; ++r) memcpy(xr + r * D, x + tok[r] * D, (size_t)D * sizeof(float));
    mm(g, 'N', 'N', (int)R, (int)(2 * F), (int)D, xr + s * D, (int)D, wgu + e * D * 2 * F, (int)(2 * F),
       h + s * 2 * F, (int)(2 * F));
    /* while the SwiGLU pass runs on hot rows, pull this expert's W_down and the next used expert's
       W_gate_up towards the cache (the GEMMs that read them next would otherwise wait on memory) */
    const char* pf0 = (const char*)(wd + e * F * D);
    int64_t pf0_n = F * D * (int64_t)sizeof(float);
    int64_t en = e + 1;
    while (en < e1 && offs[en] - offs[en - 1] <= 0) ++en;
    const char* pf1 = en < e1 ? (const char*)(wgu + en * D * 2 * F) : NULL;
    int64_t pf1_n = pf1 ? D * 2 * F * (int64_t)sizeof(float) : 0;
    int64_t step0 = (pf0_n + R * 64 - 1) / (R * 64) * 64, step1 = (pf1_n + R * 64 - 1) / (R * 64) * 64;
    for (int64_t r = s; r < t; ++r) {
      const float* hr = h + r * 2 * F;
      float* ar = act + r * F;
      const float wr = w[r];
      for (int64_t o = (r - s) * step0; o < (r - s + 1) * step0 && o < pf0_n; o += 64) __builtin_prefetch(pf0 + o, 0, 2);
      for (int64_t o = (r - s) * step1; o < (r - s + 1) * step1 && o < pf1_n; o += 64) __builtin_prefetch(pf1 + o, 0, 1);
      #pragma omp simd
      for (int64_t j = 0; j < F; ++j) {
        float gg = hr[j];
        ar[j] = gg * sigm(gg) * hr[F + j] * wr;
      }
    }
    mm(g, 'N', 'N', (int)R, (int)D, (int)F, act + s * F, (int)F, wd + e * F * D, (int)D, y + s * D, (int)D);
  }
  return 0;
}

/* backward for experts [e0, e1); any of dwgu / dwd / dw / dx may be NULL (not needed) */
int ts_experts_bwd(const float* dout, const int64_t* tok, const float* w, const int32_t* offs,
                   int64_t e0, int64_t e1, int64_t D, int64_t F, const float* wgu, const float* wd,
                   const float* xr, const float* h, const float* act,
                   float* dwgu, float* dwd, float* dw, float* dx, float* work, void* gemm) {
  sgemm_t g = (sgemm_t)gemm;
  int64_t maxR = 0;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t R = offs[e] - (e ? offs[e - 1] : 0);
    if (R > maxR) maxR = R;
  }
  /* workspace: the caller's (maxR x (D + 3F) floats), else our own */
  float* ws = work ? work : (maxR ? (float*)malloc((size_t)maxR * (D + 3 * F) * sizeof(float)) : NULL);
  if (maxR && !ws) return -2;
  float* dy = ws; float* dact = ws + maxR * D; float* dh = dact + maxR * F;
  for (int64_t e = e0; e < e1; ++e) {
    int64_t s = e ? offs[e - 1] : 0, t = offs[e], R = t - s;
    if (R <= 0) {
      if (dwgu) memset(dwgu + e * D * 2 * F, 0, (size_t)(D * 2 * F) * sizeof(float));
      if (dwd) memset(dwd + e * F * D, 0, (size_t)(F * D) * sizeof(float));
      continue;
    }
    for (int64_t r = 0; r < R; ++r) memcpy(dy + r * D, dout + tok[s + r] * D, (size_t)D * sizeof(float));
    if (dwd) mm(g, 'T', 'N', (int)F, (int)D, (int)R, act + s * F, (int)F, dy, (int)D, dwd + e * F * D, (int)D);
    if (!(dwgu || dw || dx)) continue;
    mm(g, 'N', 'T', (int)R, (int)F, (int)D, dy, (int)D, wd + e * F * D, (int)D, dact, (int)F);
    /* during the SwiGLU backward pass: this expert's W_gate_up and gathered x (the two GEMMs after it) */
    const char* pf0 = (const char*)(wgu + e * D * 2 * F);
    int64_t pf0_n = dx ? D * 2 * F * (int64_t)sizeof(float) : 0;
    const char* pf1 = (const char*)(xr + s * D);
    int64_t pf1_n = dwgu ? R * D * (int64_t)sizeof(float) : 0;
    int64_t step0 = (pf0_n + R * 64 - 1) / (R * 64) * 64, step1 = (pf1_n + R * 64 - 1) / (R * 64) * 64;
    for (int64_t r = 0; r < R; ++r) {
      const float* hr = h + (s + r) * 2 * F;
      const float* da = dact + r * F;
      float* dhr = dh + r * 2 * F;
      const float wr = w[s + r];
      for (int64_t o = r * step0; o < (r + 1) * step0 && o < pf0_n; o += 64) __builtin_prefetch(pf0 + o, 0, 2);
      for (int64_t o = r * step1; o < (r + 1) * step1 && o < pf1_n; o += 64) __builtin_prefetch(pf1 + o, 0, 2);
      float dot = 0.f;
      #pragma omp simd reduction(+:dot)
      for (int64_t j = 0; j < F; ++j) {
        float gg = hr[j], u = hr[F + j], sg = sigm(gg), si = gg * sg;
        dot += da[j] * si * u;
        float d0 = da[j] * wr;
        dhr[F + j] = d0 * si;
        dhr[j] = d0 * u * sg * (1.f + gg * (1.f - sg));
      }
      if (dw) dw[s + r] = dot;
    }
    if (dwgu) mm(g, 'T', 'N', (int)D, (int)(2 * F), (int)R, xr + s * D, (int)D, dh, (int)(2 * F),
                 dwgu + e * D * 2 * F, (int)(2 * F));
    if (dx) mm(g, 'N', 'T', (int)R, (int)D, (int)(2 * F), dh, (int)(2 * F), wgu + e * D * 2 * F, (int)(2 * F),
               dx + s * D, (int)D);
  }
  if (!work) free(ws);
  return 0;
}

#include "pyext.h"
#ifdef TS_PYEXT  /* the GIL is released during the call: worker threads run experts side by side */
static PyObject* py_fwd(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[15];
  int rc;
  if (ts_int_args(args, nargs, 15, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_experts_fwd(PTR(const float*, 0), PTR(const int64_t*, 1), PTR(const float*, 2),
                      PTR(const int32_t*, 3), v[4], v[5], v[6], v[7], PTR(const float*, 8),
                      PTR(const float*, 9), PTR(float*, 10), PTR(float*, 11),
                      PTR(float*, 12), PTR(float*, 13), PTR(void*, 14));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_bwd(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[19];
  int rc;
  if (ts_int_args(args, nargs, 19, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_experts_bwd(PTR(const float*, 0), PTR(const int64_t*, 1), PTR(const float*, 2),
                      PTR(const int32_t*, 3), v[4], v[5], v[6], v[7], PTR(const float*, 8),
                      PTR(const float*, 9), PTR(const float*, 10), PTR(const float*, 11),
                      PTR(const float*, 12), PTR(float*, 13), PTR(float*, 14),
                      PTR(float*, 15), PTR(float*, 16), PTR(float*, 17),
                      PTR(void*, 18));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyMethodDef methods[] = {
  {"ts_experts_fwd", (PyCFunction)(void (*)(void))py_fwd, METH_FASTCALL, NULL},
  {"ts_experts_bwd", (PyCFunction)(void (*)(void))py_bwd, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_moe_train", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_moe_train(void) { return PyModule_Create(&module); }
#endif
