"""The routed-expert path of ``moe_impl="grouped"`` as ONE autograd node with a hand-written backward.

Forward, for the assignments (token, expert) sorted by expert (rows R of the expert layout):

    x_RD = x_ND[tok_R]                                  gather
    g_RF | u_RF = x_RD @ W_gate_up[e]                   one grouped GEMM (gate|up fused)
    act_RF = silu(g) * u * w_R                          routing weight on the F-wide activation
    y_RD = act_RF @ W_down[e]                           one grouped GEMM
    out_ND[n] = sum of y_RD over the rows of token n    combine

Why a custom node (measured per op on CPU; see ``benchmarks/README.md``, moe section): plain autograd
spends the non-GEMM time below on extra memory passes. The block as a whole gains only 0-3%, since
the GEMMs are ~85% of its time on CPU. Here:
- the combine (and the backward of the gather) is ``F.embedding_bag(mode="sum")`` over the rows of
  each token: one parallel, deterministic pass, ~7x faster on CPU than ``index_add_`` and no
  ``zeros`` + read-modify-write of the output; the backward of the combine is a gather again;
- ``silu`` / ``silu_backward`` run on a contiguous copy of the gate half: on CPU those kernels are
  ~6x slower on the strided ``chunk`` view than the copy costs;
- the backward writes the gate and up gradients straight into one (R, 2F) buffer (no ``cat`` from the
  ``chunk`` backward), computes the routing-weight gradient as a row dot product in the same pass
  structure, and reuses the activation gradient buffer in place;
- only x_RD, h, silu(g), the activation with and without the routing weight are saved; nothing
  is materialised twice.

With ``compiled=True`` (the ``compiled`` dispatch variant of ``MoE``) the elementwise work between the GEMMs (SwiGLU and
routing weight forward; their backward with the routing-weight gradient) is two ``torch.compile``d
functions, one fused loop each instead of ~4 and ~6 passes over memory. The first call compiles
(about 30 s on CPU, needs a C++ compiler); if compiling fails we warn once and use the eager code.

On CPU fp32 (kernels on and built) the node's forward and backward are instead the C training kernel
of :mod:`tinyseek.model.moe_train_kernel`: the same maths expert by expert, each expert's chain in
cache, with PyTorch's own BLAS GEMM; the code below is then only the fallback (and the path for
CUDA, float64, ``compiled``). Otherwise:

The GEMMs are ``torch._grouped_mm`` where it runs for the device and dtype (CPU fp32 in torch >= 2.9,
CUDA bf16), else the same per-expert ``torch.mm`` loop (:func:`grouped_mm`; e.g. float64, which
``gradcheck`` needs). With more than one torch thread on CPU the experts' GEMMs are shared out
over worker threads instead, one expert per thread (:func:`_grouped_mm_threads`: MKL runs these
small GEMMs no faster on two threads than on one). The backward makes the same GEMM calls as torch's own derivative of
``_grouped_mm``. Numerically the same maths as the per-expert reference loop in
:class:`tinyseek.model.moe.MoE` (tests compare outputs and every gradient, and ``gradcheck`` the node).
"""
from __future__ import annotations

import os
import threading
import warnings

import torch
import torch.nn.functional as F

from tinyseek.model import moe_train_kernel as _mtk

_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def _grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``torch._grouped_mm`` runs forward and backward here (probed once per device type, dtype)."""
    key = (device.type, dtype)
    if key not in _GROUPED_OK:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:  # probe fwd+bwd with grad on, whatever mode the first caller is in (no_grad, inference)
                with torch.inference_mode(False), torch.enable_grad(), \
                        torch.autocast(device.type, enabled=False):
                    _probe_grouped_mm(device, dtype)
            except Exception:
                ok = False
        _GROUPED_OK[key] = ok
    return _GROUPED_OK[key]


def _probe_grouped_mm(device: torch.device, dtype: torch.dtype) -> None:
    # deterministic inputs: the probe must not consume the global RNG (exact resume relies on it)
    a = torch.linspace(-1, 1, 32 * 16, device=device, dtype=dtype).view(32, 16).requires_grad_()
    b = torch.linspace(-1, 1, 2 * 16 * 16, device=device, dtype=dtype).view(2, 16, 16).requires_grad_()
    y = torch._grouped_mm(a, b, offs=torch.tensor([16, 32], device=device, dtype=torch.int32))
    y.backward(torch.ones_like(y))


def _aligned16(t: torch.Tensor) -> bool:
    """``torch._grouped_mm`` wants every non-unit stride to be a multiple of 16 bytes."""
    return all(st * t.element_size() % 16 == 0 for st in t.stride() if st != 1)


def grouped_mm(a: torch.Tensor, b: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``torch._grouped_mm(a, b, offs=offs_E)`` for the two layouts used here, or the same per-group
    ``torch.mm`` loop where that kernel does not run (older torch, float64, CUDA fp32, widths that
    are not a multiple of 16 bytes).

    (R, K) x (E, K, N) -> (R, N): rows of ``a`` grouped; (K, R) x (R, N) -> (E, K, N): the shared
    dimension grouped (weight gradients). Group g spans ``offs_E[g-1]:offs_E[g]``.

    >>> a, offs = torch.arange(6.0).view(3, 2).double(), torch.tensor([1, 3], dtype=torch.int32)
    >>> grouped_mm(a, torch.ones(2, 2, 1).double(), offs).flatten().tolist()   # row 0 | rows 1, 2
    [1.0, 5.0, 9.0]
    >>> grouped_mm(a.t(), torch.ones(3, 1).double(), offs).flatten().tolist()  # sums over the same rows
    [0.0, 1.0, 6.0, 8.0]
    """
    nt = torch.get_num_threads() if a.device.type == "cpu" else 1
    if nt > 1 and offs_E.numel() > 1 and a.shape[0] * a.shape[1] * b.shape[-1] >= PAR_MIN_MACS:
        return _grouped_mm_threads(a, b, offs_E, nt)
    if _grouped_mm_ok(a.device, a.dtype) and _aligned16(a) and _aligned16(b) and not (
            a.device.type == "cpu" and torch.compiler.is_compiling()):  # its fake-tensor rule wants bf16
        return torch._grouped_mm(a, b, offs=offs_E)
    spans = _spans(offs_E)
    out = _grouped_out(a, b, len(spans))
    _mm_groups(a, b, spans, range(len(spans)), out)
    return out


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
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(max_workers=nt, thread_name_prefix="tinyseek-experts", initializer=_one_thread)
    barrier = threading.Barrier(nt)
    for f in [pool.submit(barrier.wait, 60) for _ in range(nt)]:
        f.result()
    torch.set_num_threads(nt)
    return pool


def _spans(offs_E: torch.Tensor) -> list[tuple[int, int]]:
    ends = offs_E.tolist()
    return list(zip([0] + ends[:-1], ends))


def _grouped_out(a: torch.Tensor, b: torch.Tensor, n_groups: int) -> torch.Tensor:
    if b.dim() == 3:
        return a.new_empty(a.shape[0], b.shape[-1])
    return a.new_empty(n_groups, a.shape[0], b.shape[1])


@torch.no_grad()  # inside the autograd node's forward/backward; grad mode is per thread
def _mm_groups(a, b, spans, groups, out) -> None:
    """Groups ``groups`` of :func:`grouped_mm` into their slices of ``out`` (one ``torch.mm`` each)."""
    if b.dim() == 3:
        for g in groups:
            s, e = spans[g]
            torch.mm(a[s:e], b[g], out=out[s:e])
    else:
        for g in groups:
            s, e = spans[g]
            torch.mm(a[:, s:e], b[s:e], out=out[g])


def _grouped_mm_threads(a, b, offs_E, nt: int) -> torch.Tensor:
    """:func:`grouped_mm` with the groups split into ``nt`` contiguous runs of about equal rows, one
    per worker thread (the caller waits). Every output element comes from one single-threaded
    ``torch.mm`` call, whatever the thread count (deterministic)."""
    spans = _spans(offs_E)
    out = _grouped_out(a, b, len(spans))
    runs = expert_runs(spans, nt)
    pool = _pool(nt)
    for f in [pool.submit(_mm_groups, a, b, spans, range(lo, hi), out) for lo, hi in runs]:
        f.result()
    return out


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


def _pool(nt: int):
    """The process's pool of ``nt`` one-thread GEMM workers (a forked child gets pools of its own)."""
    pool = _POOL.get((nt, os.getpid()))
    if pool is None:
        pool = _POOL[(nt, os.getpid())] = _start_pool(nt)
    return pool


def combine_plan(order_S: torch.Tensor, n_assign: int, top_k: int,
                 keep_A: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Bags for ``F.embedding_bag``: for each token, the rows R holding its kept assignments.

    ``order_S[r]`` is the assignment (``token * top_k + slot``) in sorted row r; returns
    (row ids in token order, start offset of each token's bag). A token whose assignments were all
    dropped gets an empty bag (a zero output row).

    >>> order = torch.tensor([1, 2, 0, 3])          # rows sorted by expert; 2 tokens, top-2
    >>> [t.tolist() for t in combine_plan(order, 4, 2, None)]
    [[2, 0, 1, 3], [0, 2]]
    >>> keep = torch.tensor([True, False, True, True])   # assignment 1 dropped: rows for 2, 0, 3
    >>> [t.tolist() for t in combine_plan(torch.tensor([2, 0, 3]), 4, 2, keep)]
    [[1, 0, 2], [0, 1]]
    """
    dev = order_S.device
    if keep_A is None:
        rows_A = torch.empty(n_assign, dtype=torch.long, device=dev)
        rows_A[order_S] = torch.arange(n_assign, device=dev)
        return rows_A, torch.arange(0, n_assign, top_k, device=dev)
    rows_A = torch.full((n_assign,), -1, dtype=torch.long, device=dev)
    rows_A[order_S] = torch.arange(order_S.numel(), device=dev)
    kept_N = keep_A.view(-1, top_k).sum(1)
    return rows_A[keep_A], torch.cumsum(kept_N, 0) - kept_N


def _bag_sum(rows: torch.Tensor, starts: torch.Tensor, src_RD: torch.Tensor) -> torch.Tensor:
    """out[n] = sum of src_RD[rows[starts[n]:starts[n+1]]] (the combine, and the gather's backward)."""
    return F.embedding_bag(rows, src_RD, starts, mode="sum")


def swiglu_weighted(h_RF2: torch.Tensor, w_R: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(silu(gate) * up * w, silu(gate) * up) for h = gate|up: the form written for ``torch.compile``."""
    Fh = h_RF2.shape[1] // 2
    act0_RF = F.silu(h_RF2[:, :Fh]) * h_RF2[:, Fh:]
    return act0_RF * w_R[:, None], act0_RF


def swiglu_weighted_backward(dact_RF: torch.Tensor, h_RF2: torch.Tensor, w_R: torch.Tensor,
                             act0_RF: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients (d gate|up, d w) of :func:`swiglu_weighted` given d act; silu'(g) = s (1 + g (1 - s))."""
    Fh = h_RF2.shape[1] // 2
    g_RF, u_RF = h_RF2[:, :Fh], h_RF2[:, Fh:]
    s_RF = torch.sigmoid(g_RF)
    d0_RF = dact_RF * w_R[:, None]
    dg_RF = d0_RF * u_RF * s_RF * (1 + g_RF * (1 - s_RF))
    return torch.cat([dg_RF, d0_RF * g_RF * s_RF], dim=1), (dact_RF * act0_RF).sum(-1)


_COMPILED: dict[str, object] = {}


def _compiled(name: str):
    """The ``torch.compile``d version of one of the two functions above, or None where compiling
    failed (no C++ compiler, unsupported platform): then the eager code runs."""
    if name not in _COMPILED:
        fn = {"fwd": swiglu_weighted, "bwd": swiglu_weighted_backward}[name]
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def _run_compiled(name: str, *args):
    fn = _compiled(name)
    if fn is not None:
        try:
            return fn(*args)
        except Exception as e:  # compile errors surface on the first call
            warnings.warn(f"moe_impl='compiled': torch.compile failed ({type(e).__name__}: {e}); "
                          "using the eager MoE code", stacklevel=3)
            _COMPILED["fwd"] = _COMPILED["bwd"] = None
    return (swiglu_weighted if name == "fwd" else swiglu_weighted_backward)(*args)


class RoutedExperts(torch.autograd.Function):
    """(x_ND, W_gate_up (E, D, 2F), W_down (E, F, D), w_R, tok_R, bag rows, bag starts, offs_E) -> out_ND.

    ``tok_R``: token of each sorted row; ``w_R``: its routing weight; ``offs_E``: int32 cumulative
    row counts per expert (the ``offs`` of ``torch._grouped_mm``); bags from :func:`combine_plan`.
    Differentiable in x, both weights and w_R."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, compiled=False):
        Fh = w_down.shape[1]
        ctx.kern = _train_kernel(x_ND, w_gate_up, w_down, w_R, compiled)
        if ctx.kern is not None:  # each expert's chain in one C pass (moe_train_kernel)
            ctx.runs = kernel_runs(offs_E, x_ND.shape[1] * 2 * Fh * tok_R.shape[0]) or [(0, offs_E.numel())]
            y_RD, x_RD, h_RF2, act_RF = _mtk.forward(ctx.kern, x_ND, w_gate_up, w_down, w_R, tok_R, offs_E,
                                                     ctx.runs)
            ctx.save_for_backward(x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, h_RF2)
            return _bag_sum(bag_rows, bag_starts, y_RD)
        x_RD = x_ND.index_select(0, tok_R)
        h_RF2 = grouped_mm(x_RD, w_gate_up, offs_E)
        if compiled:
            act_RF, act0_RF = _run_compiled("fwd", h_RF2, w_R)
            act_saved = (h_RF2, act0_RF)
        else:
            g_RF = h_RF2[:, :Fh].contiguous()  # silu on the strided chunk view is ~6x slower on CPU
            silu_RF = F.silu(g_RF)
            act0_RF = silu_RF * h_RF2[:, Fh:]  # the expert's activation before the routing weight
            act_RF = act0_RF * w_R[:, None]
            act_saved = (g_RF, h_RF2[:, Fh:], silu_RF, act0_RF)
        y_RD = grouped_mm(act_RF, w_down, offs_E)
        ctx.compiled = compiled
        ctx.save_for_backward(x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E,
                              *act_saved)
        return _bag_sum(bag_rows, bag_starts, y_RD)

    @staticmethod
    def backward(ctx, dout_ND):
        x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, *act_saved = ctx.saved_tensors
        need_x, need_wgu, need_wd, need_w = ctx.needs_input_grad[:4]
        Fh = w_down.shape[1]
        if ctx.kern is not None:
            dx_RD, d_wgu, d_wd, d_w = _mtk.backward(ctx.kern, dout_ND, w_gate_up, w_down, w_R, tok_R, offs_E, x_RD,
                                                    act_saved[0], act_RF, ctx.runs, need_wgu, need_wd, need_w,
                                                    need_x)
            d_x = _bag_sum(bag_rows, bag_starts, dx_RD) if need_x else None
            return d_x, d_wgu, d_wd, d_w, None, None, None, None, None
        dy_RD = dout_ND.contiguous().index_select(0, tok_R)  # the combine's backward is a gather
        d_wd = grouped_mm(act_RF.t(), dy_RD, offs_E) if need_wd else None
        dact_RF = grouped_mm(dy_RD, w_down.transpose(-2, -1), offs_E)
        del dy_RD
        if ctx.compiled:
            h_RF2, act0_RF = act_saved
            dh_RF2, d_w = _run_compiled("bwd", dact_RF, h_RF2, w_R, act0_RF)
        else:
            g_RF, u_RF, silu_RF, act0_RF = act_saved
            d_w = torch.linalg.vecdot(dact_RF, act0_RF)  # d/dw_r of w_r * act0_r
            dact_RF.mul_(w_R[:, None])  # now the gradient of act0 = silu(g) * u
            dh_RF2 = torch.empty(dact_RF.shape[0], 2 * Fh, dtype=dact_RF.dtype, device=dact_RF.device)
            torch.mul(dact_RF, silu_RF, out=dh_RF2[:, Fh:])  # d up
            dact_RF.mul_(u_RF)
            dh_RF2[:, :Fh] = torch.ops.aten.silu_backward(dact_RF, g_RF)  # d gate (contiguous kernel, then copy)
        del dact_RF
        d_w = d_w if need_w else None
        d_wgu = grouped_mm(x_RD.t(), dh_RF2, offs_E) if need_wgu else None
        d_x = None
        if need_x:
            dx_RD = grouped_mm(dh_RF2, w_gate_up.transpose(-2, -1), offs_E)
            d_x = _bag_sum(bag_rows, bag_starts, dx_RD)  # the gather's backward: sum a token's rows
        return d_x, d_wgu, d_wd, d_w, None, None, None, None, None


def _train_kernel(x_ND, w_gate_up, w_down, w_R, compiled: bool):
    """The loaded training kernel (:mod:`tinyseek.model.moe_train_kernel`) where it runs, else None."""
    if compiled or torch.compiler.is_compiling() or not _mtk.applies(x_ND, w_gate_up, w_down, w_R):
        return None  # (under torch.compile tracing: no data pointers)
    return _mtk.ready()


def kernel_runs(offs_E: torch.Tensor, macs: int, head: int = 0) -> list[tuple[int, int]] | None:
    """Expert ranges for the training kernel, one per worker thread (``head``: work worth that many
    rows already given to the first, see :func:`expert_runs`), or None where the work stays on the
    calling thread: one torch thread, fewer than :data:`PAR_MIN_MACS` multiply-adds (as
    :func:`grouped_mm`), or a single expert and nothing beside it."""
    nt = torch.get_num_threads()
    if nt < 2 or macs < PAR_MIN_MACS or (offs_E.numel() < 2 and not head):
        return None
    return expert_runs(_spans(offs_E), nt, head)


def routed_experts(x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E,
                   compiled: bool = False) -> torch.Tensor:
    return RoutedExperts.apply(x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, compiled)
