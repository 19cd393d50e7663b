"""fp32 CPU training kernel for the routed experts: each expert's whole chain in one pass, in cache.

The PyTorch path of :class:`tinyseek.kernels.moe_grouped.RoutedExperts` runs every step of the routed path
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
kept. Measured: ``benchmarks/README.md`` (moe section).

A call covers a range of experts ``[e0, e1)`` on the calling thread; with several torch threads the
caller shares the experts out over the worker threads of :func:`pool` (as
:func:`tinyseek.kernels.moe_grouped.grouped_mm` does), each expert's GEMMs on one thread: every
output element comes from one thread whatever the thread count (deterministic). Expert weight
gradients of experts without rows are zero. Every buffer a worker writes (outputs, the backward's
per-expert workspace) is allocated by the calling thread: a worker's own glibc arena gives freed
memory back to the kernel and faults it in again on every call. On several threads the shared
expert can ride along on the first worker (:class:`tinyseek.kernels.moe_shared.ExpertsWithShared`,
the ``first`` argument of :func:`run_split`).

Used by ``RoutedExperts`` (:func:`usable`) when: CPU, fp32 everywhere, kernels on
(``TINYSEEK_MODEL_KERNELS`` / ``KERNELS.enable``), the C build worked and ``sgemm_`` was found
(else one printed line and the PyTorch path). Results equal the PyTorch path up to float rounding
(the SwiGLU's ``expf`` is the compiler's vectorised one); tests compare both and the per-expert
reference loop.
"""
from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor

import torch

from tinyseek.kernels import loader
from tinyseek.kernels.loader import I64, P

_SIGS = {"ts_experts_fwd": ([P, P, P, P, I64, I64, I64, I64, P, P, P, P, P, P, P], ctypes.c_int),
         "ts_experts_bwd": ([P, P, P, P, I64, I64, I64, I64, P, P, P, P, P, P, P, P, P, P, P], ctypes.c_int)}
KERNELS = loader.Kernels("_tinyseek_moe_train", loader.source("moe_train.c"), _SIGS, "TINYSEEK_MODEL_KERNELS",
                         "tinyseek.kernels.moe_train")

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
                    print("tinyseek.kernels.moe_train: no sgemm_ in this torch build, using the PyTorch path")
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


def usable(x_ND, w_gate_up, w_down, w_R):
    """The loaded kernel (``kern`` of :func:`forward` / :func:`backward`) where it runs for these
    tensors (:func:`applies`, kernels on and built, ``sgemm_`` found, not under ``torch.compile``
    tracing: no data pointers there), else None."""
    if torch.compiler.is_compiling() or not applies(x_ND, w_gate_up, w_down, w_R):
        return None
    return ready()


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
    worker thread of :func:`pool` (the C calls release the GIL).
    ``first()``, if given, runs before the first range, on the same thread."""
    def run0():
        if first is not None:
            first()
        fn(*runs[0])

    if len(runs) == 1:
        run0()
        return
    workers = pool(max(len(runs), torch.get_num_threads()))  # the workers grouped_mm uses too
    futs = [workers.submit(run0)] + [workers.submit(fn, *r) for r in runs[1:]]
    for f in futs:
        f.result()


# Multi-threaded CPU: the experts' GEMMs are shared out over threads, each expert's GEMM on one
# thread. Measured (2 threads, 64 experts x ~192 rows, width 256/512): MKL runs such small GEMMs no
# faster on two threads than on one (the grouped GEMMs of a fwd+bwd took 178 ms on 2 threads, 181
# on 1, while a dense FFN's 2048-row GEMMs scaled 1.8x), so the MoE block fell to ~0.6x the dense FFN
# on 2 threads; one thread per expert group gets ~1.7-1.9x.
PAR_MIN_MACS = 4_000_000  # multiply-adds of a grouped GEMM below which it stays on the calling thread
_POOL: dict = {}


def _one_thread() -> None:
    """Make the calling (worker) thread a one-thread torch/MKL thread for good. PyTorch sets a
    thread's count lazily, on its first parallel op, to the LAST count anyone stored; so the count
    must be initialised first (``get_num_threads``) and set after, or the caller's
    ``set_num_threads(nt)`` below would reach the workers on their first torch op (it did: the
    workers ran MKL on 2 threads each, 4 threads on 2 cores, until this was found)."""
    torch.get_num_threads()
    torch.set_num_threads(1)


def _start_pool(nt: int):
    """``nt`` worker threads that run one-thread GEMMs. ``torch.set_num_threads`` is per thread for
    OpenMP and MKL, but it also stores the count that threads started later begin with: so all
    workers are started (and set to 1, :func:`_one_thread`) here, then the caller's count is stored
    again."""
    workers = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="tinyseek-experts", initializer=_one_thread)
    barrier = threading.Barrier(nt)
    for f in [workers.submit(barrier.wait, 60) for _ in range(nt)]:
        f.result()
    torch.set_num_threads(nt)
    return workers


def group_spans(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def expert_runs(spans: list[tuple[int, int]], nt: int, head: int = 0) -> list[tuple[int, int]]:
    """Groups ``[lo, hi)`` in at most ``nt`` contiguous runs of about equal rows: each cut at the group
    boundary closest to k/nt of the work. ``head``: work worth that many rows already given to run
    0 (which may then be left with no group: ``(0, 0)``). Empty runs after the first are left out.

    >>> expert_runs([(0, 10), (10, 12), (12, 20), (20, 30)], 2)
    [(0, 2), (2, 4)]
    >>> expert_runs([(0, 10), (10, 12), (12, 20), (20, 30)], 2, head=14)
    [(0, 1), (1, 4)]
    >>> expert_runs([(0, 10), (10, 20)], 2, head=40)
    [(0, 0), (0, 2)]
    """
    ends = [0] + [e for _, e in spans]
    total = ends[-1] + head
    bounds = [0]
    for k in range(1, nt):
        target = total * k / nt
        lo = bounds[-1]
        bounds.append(min(range(lo, len(spans) + 1), key=lambda g: (abs(head + ends[g] - target), g)))
    bounds.append(len(spans))
    runs = [(lo, hi) for lo, hi in zip(bounds, bounds[1:])]
    return runs[:1] + [r for r in runs[1:] if r[1] > r[0]] if head else [r for r in runs if r[1] > r[0]]


def pool(nt: int):
    """The process's pool of ``nt`` one-thread GEMM workers (a forked child gets pools of its own)."""
    workers = _POOL.get((nt, os.getpid()))
    if workers is None:
        workers = _POOL[(nt, os.getpid())] = _start_pool(nt)
    return workers


def kernel_runs(offs_E: torch.Tensor, macs: int, head: int = 0) -> list[tuple[int, int]] | None:
    """Expert ranges for the training kernel, one per worker thread (``head``: work worth that many
    rows already given to the first, see :func:`expert_runs`), or None where the work stays on the
    calling thread: one torch thread, fewer than :data:`PAR_MIN_MACS` multiply-adds (as
    :func:`tinyseek.kernels.moe_grouped.grouped_mm`), or a single expert and nothing beside it."""
    nt = torch.get_num_threads()
    if nt < 2 or macs < PAR_MIN_MACS or (offs_E.numel() < 2 and not head):
        return None
    return expert_runs(group_spans(offs_E), nt, head)
