"""C kernels for the MoE router's bookkeeping on CPU: per-token top-k expert selection and the stable
sort of assignments by expert.

On CPU, ``torch.topk`` over (2048 tokens, 64 experts) for k=6 takes ~1.3 ms and the stable
``torch.sort`` of the 12288 assignments ~0.4 ms on one thread: together ~1.5% of a 64-expert MoE
block's training step (fwd+bwd) at d=256. Here:

- :func:`topk_indices`: k masked arg-max passes over each row, AVX-512 (portable loops otherwise;
  equal scores: the lower expert id first), ~0.22 ms;
- :func:`sort_by_expert`: a counting sort (stable: assignments of one expert keep their order), the
  same ``(sorted ids, order)`` as ``torch.sort(e_A, stable=True)``, ~0.03 ms.

Used for CPU fp32 / int64 tensors when the model kernels are on (``TINYSEEK_MODEL_KERNELS``), built,
and not under ``torch.compile`` tracing; else the PyTorch ops run (same results; for top-k also the
same order wherever scores are distinct: ``torch.topk`` does not define the order of ties).
"""
from __future__ import annotations

import torch

from tinyseek.kernels import loader as ckernels
from tinyseek.kernels.loader import I64, INT, P

_SRC = r"""
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
""" + ckernels.PYEXT_PRELUDE + r"""
#ifdef TS_PYEXT
static PyObject* py_topk(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[5];
  if (ts_int_args(args, nargs, 5, v)) return NULL;
  return PyLong_FromLong(ts_topk_f32((const float*)(intptr_t)v[0], v[1], v[2], v[3], (int64_t*)(intptr_t)v[4]));
}
static PyObject* py_sort(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[6];
  if (ts_int_args(args, nargs, 6, v)) return NULL;
  return PyLong_FromLong(ts_sort_ids((const int64_t*)(intptr_t)v[0], v[1], v[2], (int64_t*)(intptr_t)v[3],
                                     (int64_t*)(intptr_t)v[4], (int64_t*)(intptr_t)v[5]));
}
static PyMethodDef methods[] = {
  {"ts_topk_f32", (PyCFunction)(void (*)(void))py_topk, METH_FASTCALL, NULL},
  {"ts_sort_ids", (PyCFunction)(void (*)(void))py_sort, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_route", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_route(void) { return PyModule_Create(&module); }
#endif
"""

_SIGS = {"ts_topk_f32": ([P, I64, I64, I64, P], INT), "ts_sort_ids": ([P, I64, I64, P, P, P], INT)}
KERNELS = ckernels.Kernels("_tinyseek_route", _SRC, _SIGS, "TINYSEEK_MODEL_KERNELS", "tinyseek.model.route_kernel")
MAX_K = 64  # the kernel's top-k limit (torch.topk beyond)


def _lib():
    st = KERNELS.state
    if not st["enabled"] or st["failed"] or torch.compiler.is_compiling():  # tracing: the torch ops
        return None
    return st["lib"] if st["lib"] is not None else KERNELS.ready()


def topk_indices(sel_NE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, largest first (``sel.topk(k).indices``).

    >>> topk_indices(torch.tensor([[0.1, 0.7, 0.2, 0.7]]), 3).tolist()   # the tie: lower id first
    [[1, 3, 2]]
    """
    lib = _lib() if sel_NE.dim() == 2 and 1 <= k <= min(MAX_K, sel_NE.shape[1]) else None
    if lib is None or sel_NE.dtype is not torch.float32 or sel_NE.device.type != "cpu" or sel_NE.requires_grad:
        return sel_NE.topk(k, dim=-1).indices
    sel_NE = sel_NE.contiguous()
    N, E = sel_NE.shape
    idx = torch.empty(N, k, dtype=torch.int64)
    if lib.ts_topk_f32(sel_NE.data_ptr(), N, E, k, idx.data_ptr()):
        raise ValueError(f"top-k: k={k} does not fit {E} experts")
    return idx


def sort_by_expert(e_A: torch.Tensor, n_bins: int, counts: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``torch.sort(e_A, stable=True)`` plus the count of each value in ``[0, n_bins)`` (the kernel
    has them for free; on the PyTorch path only with ``counts``, since a CUDA ``bincount`` waits
    for the device).

    >>> [t.tolist() for t in sort_by_expert(torch.tensor([2, 0, 2, 1, 0]), 3)]
    [[0, 0, 1, 2, 2], [1, 4, 3, 0, 2], [2, 1, 2]]
    """
    lib = _lib()
    if lib is None or e_A.dtype is not torch.int64 or e_A.device.type != "cpu" or e_A.dim() != 1:
        e_S, order_S = torch.sort(e_A, stable=True)
        return e_S, order_S, torch.bincount(e_A, minlength=n_bins)[:n_bins] if counts else None
    e_A = e_A.contiguous()
    A = e_A.shape[0]
    e_S, order_S, counts_B = torch.empty(A, dtype=torch.int64), torch.empty(A, dtype=torch.int64), \
        torch.empty(n_bins, dtype=torch.int64)
    if lib.ts_sort_ids(e_A.data_ptr(), A, n_bins, e_S.data_ptr(), order_S.data_ptr(), counts_B.data_ptr()):
        raise IndexError(f"expert id outside [0, {n_bins})")
    return e_S, order_S, counts_B
