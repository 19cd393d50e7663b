"""fp32 CPU training kernel for the routed experts: each expert's whole chain in one pass, in cache.

The PyTorch path of :class:`tinyseek.model.moe_fused.RoutedExperts` runs every step of the routed path
over ALL experts before the next one starts: one grouped GEMM writes the (R, 2F) gate|up activations
of every expert (25 MB at 64 experts top-6 over 2048 tokens), the SwiGLU then reads them back from
memory, the down GEMM reads its input back again, and so on through ~10 elementwise passes of the
backward. Here each expert runs its chain while its rows are still in the core's cache:

    forward, per expert e (its sorted rows r):
        x_rD = x_ND[tok_r]                      gather (kept: the weight gradient needs it)
        h_r2F = x_rD @ W_gate_up[e]              GEMM   (kept)
        act_rF = silu(g) * u * w_r               one fused pass over h (kept: d W_down needs it)
        y_rD = act_rF @ W_down[e]                GEMM
    backward, per expert e:
        dy_rD = dout_ND[tok_r]                   gather into a per-call workspace
        d W_down[e] = act_rF^T @ dy_rD            GEMM
        dact_rF = dy_rD @ W_down[e]^T             GEMM   (workspace)
        d w_r, dh_r2F = SwiGLU backward          one fused pass (recomputes silu from h; workspace)
        d W_gate_up[e] = x_rD^T @ dh_r2F          GEMM
        dx_rD = dh_r2F @ W_gate_up[e]^T           GEMM

The GEMMs are PyTorch's own BLAS ``sgemm_`` (MKL in the x86 wheels), called from C through its address
in ``libtorch_cpu``: the same GEMM code as ``torch.mm`` and as the dense FFN we compare against, so the
kernel changes where data sits, not the arithmetic engine. The (R, F) / (R, 2F) gradient buffers of
the PyTorch path never exist (workspace of one expert), and 4 of its saved (R, F) tensors are not
kept. Measured (64 experts top-6, d=256, F=256, 2048 tokens, 1 thread): see ``benchmarks/README.md``.

A call covers a range of experts ``[e0, e1)`` on the calling thread; with several torch threads the
caller shares the experts out over worker threads (as :func:`tinyseek.model.moe_fused.grouped_mm`
does), each expert's GEMMs on one thread: every output element comes from one thread whatever the
thread count (deterministic). Expert weight gradients of experts without rows are zero. Every buffer
a worker writes (outputs, the backward's per-expert workspace) is allocated by the calling thread: a
worker's own glibc arena gives freed memory back to the kernel and faults it in again on every call.
On several threads the shared expert can ride along on the first worker
(:class:`tinyseek.model.moe_shared.ExpertsWithShared`, the ``first`` argument of :func:`run_split`).

Used by ``RoutedExperts`` when: CPU, fp32 everywhere, kernels on (``TINYSEEK_MODEL_KERNELS`` /
``KERNELS.enable``), the C build worked and ``sgemm_`` was found (else one printed line and the
PyTorch path). Results equal the PyTorch path up to float rounding (the SwiGLU's ``expf`` is the
compiler's vectorised one); tests compare both and the per-expert reference loop.
"""
from __future__ import annotations

import ctypes
import os
import threading

import torch

from tinyseek.kernels import loader as ckernels
from tinyseek.kernels.loader import I64, P

_SRC = r"""
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
""" + ckernels.PYEXT_PRELUDE + r"""
#ifdef TS_PYEXT  /* the GIL is released during the call: worker threads run experts side by side */
static PyObject* py_fwd(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[15];
  int rc;
  if (ts_int_args(args, nargs, 15, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_experts_fwd((const float*)(intptr_t)v[0], (const int64_t*)(intptr_t)v[1], (const float*)(intptr_t)v[2],
                      (const int32_t*)(intptr_t)v[3], v[4], v[5], v[6], v[7], (const float*)(intptr_t)v[8],
                      (const float*)(intptr_t)v[9], (float*)(intptr_t)v[10], (float*)(intptr_t)v[11],
                      (float*)(intptr_t)v[12], (float*)(intptr_t)v[13], (void*)(intptr_t)v[14]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_bwd(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[19];
  int rc;
  if (ts_int_args(args, nargs, 19, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_experts_bwd((const float*)(intptr_t)v[0], (const int64_t*)(intptr_t)v[1], (const float*)(intptr_t)v[2],
                      (const int32_t*)(intptr_t)v[3], v[4], v[5], v[6], v[7], (const float*)(intptr_t)v[8],
                      (const float*)(intptr_t)v[9], (const float*)(intptr_t)v[10], (const float*)(intptr_t)v[11],
                      (const float*)(intptr_t)v[12], (float*)(intptr_t)v[13], (float*)(intptr_t)v[14],
                      (float*)(intptr_t)v[15], (float*)(intptr_t)v[16], (float*)(intptr_t)v[17],
                      (void*)(intptr_t)v[18]);
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
"""

_SIGS = {"ts_experts_fwd": ([P, P, P, P, I64, I64, I64, I64, P, P, P, P, P, P, P], ctypes.c_int),
         "ts_experts_bwd": ([P, P, P, P, I64, I64, I64, I64, P, P, P, P, P, P, P, P, P, P, P], ctypes.c_int)}
KERNELS = ckernels.Kernels("_tinyseek_moe_train", _SRC, _SIGS, "TINYSEEK_MODEL_KERNELS",
                           "tinyseek.model.moe_train_kernel")

_SGEMM: dict = {}
_SGEMM_LOCK = threading.Lock()


def find_sgemm(lib_dir: str) -> int:
    """Address of the Fortran ``sgemm_`` exported by ``libtorch_cpu`` in ``lib_dir``, or 0."""
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib"):
        path = os.path.join(lib_dir, name)
        if os.path.isfile(path):
            try:
                return ctypes.cast(getattr(ctypes.CDLL(path), "sgemm_"), ctypes.c_void_p).value or 0
            except (OSError, AttributeError):
                return 0
    return 0


def sgemm_address() -> int:
    """:func:`find_sgemm` for the loaded torch, looked up once (one printed line where it is missing)."""
    if "addr" not in _SGEMM:
        with _SGEMM_LOCK:
            if "addr" not in _SGEMM:
                addr = find_sgemm(os.path.join(os.path.dirname(torch.__file__), "lib"))
                if not addr:
                    print("tinyseek.model.moe_train_kernel: no sgemm_ in this torch build, using the PyTorch path")
                _SGEMM["addr"] = addr
    return _SGEMM["addr"]


def ready():
    """(loaded library, sgemm address) when the kernel can run, else None (never raises)."""
    st = KERNELS.state
    if not st["enabled"] or st["failed"]:
        return None
    addr = sgemm_address()
    if not addr:
        return None
    lib = KERNELS.ready()
    return (lib, addr) if lib is not None else None


def applies(x_ND: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, w_R: torch.Tensor) -> bool:
    """CPU fp32 tensors (no autocast inside the node), and dims that fit a C int."""
    f32 = torch.float32
    return (x_ND.device.type == "cpu" and x_ND.dtype is f32 and w_gate_up.dtype is f32 and w_down.dtype is f32
            and w_R.dtype is f32 and w_gate_up.device.type == "cpu" and w_down.device.type == "cpu"
            and max(x_ND.shape[0] * max(w_gate_up.shape[-1], 1), w_gate_up.numel()) < 2 ** 31)


def _check(rc: int) -> None:
    if rc:
        raise MemoryError("moe training kernel: out of memory for its workspace")


def forward(kern, x_ND, w_gate_up, w_down, w_R, tok_R, offs_E, runs, first=None):
    """(y_RD, x_RD, h_R2F, act_RF); ``runs``: expert ranges, one per worker, ``first``: more work for
    the first run's thread (see :func:`run_split`)."""
    lib, addr = kern
    R, D = tok_R.shape[0], x_ND.shape[1]
    F = w_down.shape[1]
    x_ND, w_gate_up, w_down, w_R = x_ND.contiguous(), w_gate_up.contiguous(), w_down.contiguous(), w_R.contiguous()
    tok_R, offs_E = tok_R.contiguous(), offs_E.to(torch.int32).contiguous()
    x_RD, h, act, y = x_ND.new_empty(R, D), x_ND.new_empty(R, 2 * F), x_ND.new_empty(R, F), x_ND.new_empty(R, D)
    ptrs = (x_ND.data_ptr(), tok_R.data_ptr(), w_R.data_ptr(), offs_E.data_ptr())
    tail = (D, F, w_gate_up.data_ptr(), w_down.data_ptr(), x_RD.data_ptr(), h.data_ptr(), act.data_ptr(),
            y.data_ptr(), addr)
    run_split(lambda e0, e1: _check(lib.ts_experts_fwd(*ptrs, e0, e1, *tail)), runs, first)
    return y, x_RD, h, act


def backward(kern, dout_ND, w_gate_up, w_down, w_R, tok_R, offs_E, x_RD, h, act, runs,
             need_wgu: bool, need_wd: bool, need_w: bool, need_x: bool, first=None):
    """(dx_RD, d_w_gate_up, d_w_down, d_w_R), None for what is not needed."""
    lib, addr = kern
    R, D = x_RD.shape
    E, F = w_down.shape[0], w_down.shape[1]
    dout_ND = dout_ND.contiguous()
    w_gate_up, w_down, w_R = w_gate_up.contiguous(), w_down.contiguous(), w_R.contiguous()
    offs_E = offs_E.to(torch.int32).contiguous()
    d_wgu = x_RD.new_empty(E, D, 2 * F) if need_wgu else None
    d_wd = x_RD.new_empty(E, F, D) if need_wd else None
    d_w = x_RD.new_empty(R) if need_w else None
    dx = x_RD.new_empty(R, D) if need_x else None

    def p(t):
        return 0 if t is None else t.data_ptr()

    ptrs = (dout_ND.data_ptr(), tok_R.data_ptr(), w_R.data_ptr(), offs_E.data_ptr())
    tail = (D, F, w_gate_up.data_ptr(), w_down.data_ptr(), x_RD.data_ptr(), h.data_ptr(), act.data_ptr(),
            p(d_wgu), p(d_wd), p(d_w), p(dx))
    # each run's workspace comes from here (the calling thread): a worker's own malloc arena gives
    # freed memory back and faults it in again on every call
    ends = offs_E.tolist()
    counts = [b - a for a, b in zip([0] + ends[:-1], ends)]
    work = {r: x_RD.new_empty(max(counts[r[0]:r[1]], default=0) * (D + 3 * F)) for r in runs}
    run_split(lambda e0, e1: _check(lib.ts_experts_bwd(*ptrs, e0, e1, *tail, p(work[(e0, e1)]) if
                                                       work[(e0, e1)].numel() else 0, addr)), runs, first)
    return dx, d_wgu, d_wd, d_w


def run_split(fn, runs, first=None) -> None:
    """``fn(e0, e1)`` for each expert range: on the calling thread for one range, else one range per
    worker thread of :mod:`tinyseek.model.moe_fused`'s pool (the C calls release the GIL).
    ``first()``, if given, runs before the first range, on the same thread."""
    def run0():
        if first is not None:
            first()
        fn(*runs[0])

    if len(runs) == 1:
        run0()
        return
    from tinyseek.model.moe_fused import _pool
    pool = _pool(max(len(runs), torch.get_num_threads()))  # the workers grouped_mm uses too
    futs = [pool.submit(run0)] + [pool.submit(fn, *r) for r in runs[1:]]
    for f in futs:
        f.result()
