/* The MoE router's bookkeeping on CPU (tinyseek/kernels/route.py is its Python glue, route() and
   MoE._plan in tinyseek/model/moe.py the PyTorch reference): per-token top-k expert selection and the
   stable counting sort of assignments by expert. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

/* idx[n, :k] = the k largest of s[n, :E], largest first (ties: lower index first). k passes of a
   masked arg-max per row (an insertion list mispredicts its branches: ~5 ns an element); an index
   is always valid and distinct, even for NaN scores (then the first index not taken yet). */
#if defined(__AVX512F__) && !defined(TS_PORTABLE)
#include <immintrin.h>
int ts_topk_f32(const float* s, int64_t N, int64_t E, int64_t k, int64_t* idx) {
  if (k < 1 || k > E || k > 64) return -1;
  const int64_t V = (E + 15) / 16;
  __mmask16* live = (__mmask16*)malloc((size_t)V * sizeof(__mmask16));
  if (!live) return -2;
  const __mmask16 tail = (E % 16) ? (__mmask16)((1u << (E % 16)) - 1) : (__mmask16)0xFFFF;
  for (int64_t n = 0; n < N; ++n) {
    const float* row = s + n * E;
    for (int64_t v = 0; v < V; ++v) live[v] = v == V - 1 ? tail : (__mmask16)0xFFFF;
    for (int64_t c = 0; c < k; ++c) {
      __m512 mx = _mm512_set1_ps(-INFINITY);
      for (int64_t v = 0; v < V; ++v)
        mx = _mm512_mask_max_ps(mx, live[v], mx, _mm512_maskz_loadu_ps(live[v], row + 16 * v));
      const __m512 m = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
      int64_t bi = -1;
      for (int64_t v = 0; v < V && bi < 0; ++v) {
        __mmask16 eq = _mm512_mask_cmp_ps_mask(live[v], _mm512_maskz_loadu_ps(live[v], row + 16 * v), m, _CMP_EQ_OQ);
        if (eq) bi = 16 * v + __builtin_ctz((unsigned)eq);
      }
      for (int64_t v = 0; v < V && bi < 0; ++v)  /* NaN: the first index not taken yet */
        if (live[v]) bi = 16 * v + __builtin_ctz((unsigned)live[v]);
      live[bi / 16] &= (__mmask16)~(1u << (bi % 16));
      idx[n * k + c] = bi;
    }
  }
  free(live);
  return 0;
}
#else
int ts_topk_f32(const float* s, int64_t N, int64_t E, int64_t k, int64_t* idx) {
  if (k < 1 || k > E || k > 64) return -1;
  unsigned char* taken = (unsigned char*)malloc((size_t)E);
  if (!taken) return -2;
  for (int64_t n = 0; n < N; ++n) {
    const float* row = s + n * E;
    memset(taken, 0, (size_t)E);
    for (int64_t c = 0; c < k; ++c) {
      int64_t bi = -1;
      for (int64_t j = 0; j < E; ++j)
        if (!taken[j] && (bi < 0 || row[j] > row[bi])) bi = j;
      taken[bi] = 1;
      idx[n * k + c] = bi;
    }
  }
  free(taken);
  return 0;
}
#endif

/* stable counting sort of e[0..A) with values in [0, B): sorted values, source positions, counts */
int ts_sort_ids(const int64_t* e, int64_t A, int64_t B, int64_t* sorted, int64_t* order, int64_t* counts) {
  memset(counts, 0, (size_t)B * sizeof(int64_t));
  for (int64_t a = 0; a < A; ++a) {
    if (e[a] < 0 || e[a] >= B) return -1;
    counts[e[a]]++;
  }
  int64_t pos = 0;
  for (int64_t b = 0; b < B; ++b) {  /* counts -> start offsets, written back after the scatter */
    int64_t c = counts[b];
    counts[b] = pos;
    pos += c;
  }
  for (int64_t a = 0; a < A; ++a) {
    int64_t p = counts[e[a]]++;
    sorted[p] = e[a];
    order[p] = a;
  }
  for (int64_t b = B - 1; b > 0; --b) counts[b] -= counts[b - 1];  /* ends -> counts */
  return 0;
}

#include "pyext.h"
#ifdef TS_PYEXT
static PyObject* py_topk(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[5];
  if (ts_int_args(args, nargs, 5, v)) return NULL;
  return PyLong_FromLong(ts_topk_f32(PTR(const float*, 0), v[1], v[2], v[3], PTR(int64_t*, 4)));
}
static PyObject* py_sort(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[6];
  if (ts_int_args(args, nargs, 6, v)) return NULL;
  return PyLong_FromLong(ts_sort_ids(PTR(const int64_t*, 0), v[1], v[2], PTR(int64_t*, 3),
                                     PTR(int64_t*, 4), PTR(int64_t*, 5)));
}
static PyMethodDef methods[] = {
  {"ts_topk_f32", (PyCFunction)(void (*)(void))py_topk, METH_FASTCALL, NULL},
  {"ts_sort_ids", (PyCFunction)(void (*)(void))py_sort, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_route", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_route(void) { return PyModule_Create(&module); }
#endif
