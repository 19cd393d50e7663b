"""The routed experts as grouped GEMMs: ``moe_impl="grouped"`` as ONE autograd node with a hand-written
backward (:class:`RoutedExperts`), and the plain-autograd / padded forms (:func:`gemm_experts`).

Forward, for the assignments (token, expert) sorted by expert (rows R of the expert layout):

    x_RD = x_ND[tok_R]                                  gather
    g_RF | u_RF = x_RD @ W_gate_up[e]                   one grouped GEMM (gate|up fused)
    act_RF = silu(g) * u * w_R                          routing weight on the F-wide activation
    y_RD = act_RF @ W_down[e]                           one grouped GEMM
    out_ND[n] = sum of y_RD over the rows of token n    combine

Why a custom node (measured per op on CPU: ``benchmarks/README.md``, moe section): plain autograd
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

On CPU fp32 (kernels on and built) the node's forward and backward are instead the C training kernel
of :mod:`tinyseek.kernels.moe_train`: the same maths expert by expert, each expert's chain in
cache, with PyTorch's own BLAS GEMM; the code below is then only the fallback (and the path for
CUDA, float64). There the GEMMs are ``torch._grouped_mm`` where it runs for the device and dtype
(CPU fp32 in torch >= 2.9, CUDA bf16), else the same per-expert ``torch.mm`` loop
(:func:`grouped_mm`; e.g. float64, which ``gradcheck`` needs). With more than one torch thread on
CPU the experts' GEMMs are shared out over worker threads instead, one expert per thread
(:func:`_grouped_mm_threads`: MKL runs these small GEMMs no faster on two threads than on one).
The backward makes the same GEMM calls as torch's own derivative of ``_grouped_mm``. Numerically
the same maths as the per-expert reference loop in :class:`tinyseek.model.moe.MoE` (tests compare
outputs and every gradient, and ``gradcheck`` the node).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyseek.kernels import moe_train

_GROUPED_OK: dict[tuple[str, torch.dtype], bool] = {}


def grouped_mm_ok(device: torch.device, dtype: torch.dtype) -> bool:
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
    if nt > 1 and offs_E.numel() > 1 and a.shape[0] * a.shape[1] * b.shape[-1] >= moe_train.PAR_MIN_MACS:
        return _grouped_mm_threads(a, b, offs_E, nt)
    if grouped_mm_ok(a.device, a.dtype) and _aligned16(a) and _aligned16(b) and not (
            a.device.type == "cpu" and torch.compiler.is_compiling()):  # its fake-tensor rule wants bf16
        return torch._grouped_mm(a, b, offs=offs_E)
    spans = moe_train.group_spans(offs_E)
    out = _grouped_out(a, b, len(spans))
    _mm_groups(a, b, spans, range(len(spans)), out)
    return out


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
    spans = moe_train.group_spans(offs_E)
    out = _grouped_out(a, b, len(spans))
    runs = moe_train.expert_runs(spans, nt)
    workers = moe_train.pool(nt)
    for f in [workers.submit(_mm_groups, a, b, spans, range(lo, hi), out) for lo, hi in runs]:
        f.result()
    return out


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


def bag_sum(rows: torch.Tensor, starts: torch.Tensor, src_RD: torch.Tensor) -> torch.Tensor:
    """out[n] = sum of src_RD[rows[starts[n]:starts[n+1]]] (the combine, and the gather's backward)."""
    return F.embedding_bag(rows, src_RD, starts, mode="sum")


class RoutedExperts(torch.autograd.Function):
    """(x_ND, W_gate_up (E, D, 2F), W_down (E, F, D), w_R, tok_R, bag rows, bag starts, offs_E) -> out_ND.

    ``tok_R``: token of each sorted row; ``w_R``: its routing weight; ``offs_E``: int32 cumulative
    row counts per expert (the ``offs`` of ``torch._grouped_mm``); bags from :func:`combine_plan`.
    Differentiable in x, both weights and w_R."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E):
        Fh = w_down.shape[1]
        ctx.kern = moe_train.usable(x_ND, w_gate_up, w_down, w_R)
        if ctx.kern is not None:  # each expert's chain in one C pass (moe_train)
            ctx.runs = moe_train.kernel_runs(offs_E, x_ND.shape[1] * 2 * Fh * tok_R.shape[0]) or [(0, offs_E.numel())]
            y_RD, x_RD, h_RF2, act_RF = moe_train.forward(ctx.kern, x_ND, w_gate_up, w_down, w_R, tok_R, offs_E,
                                                     ctx.runs)
            ctx.save_for_backward(x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, h_RF2)
            return bag_sum(bag_rows, bag_starts, y_RD)
        x_RD = x_ND.index_select(0, tok_R)
        h_RF2 = grouped_mm(x_RD, w_gate_up, offs_E)
        g_RF = h_RF2[:, :Fh].contiguous()  # silu on the strided chunk view is ~6x slower on CPU
        silu_RF = F.silu(g_RF)
        act0_RF = silu_RF * h_RF2[:, Fh:]  # the expert's activation before the routing weight
        act_RF = act0_RF * w_R[:, None]
        act_saved = (g_RF, h_RF2[:, Fh:], silu_RF, act0_RF)
        y_RD = grouped_mm(act_RF, w_down, offs_E)
        ctx.save_for_backward(x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E,
                              *act_saved)
        return bag_sum(bag_rows, bag_starts, y_RD)

    @staticmethod
    def backward(ctx, dout_ND):
        x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, *act_saved = ctx.saved_tensors
        need_x, need_wgu, need_wd, need_w = ctx.needs_input_grad[:4]
        Fh = w_down.shape[1]
        if ctx.kern is not None:
            dx_RD, d_wgu, d_wd, d_w = moe_train.backward(ctx.kern, dout_ND, w_gate_up, w_down, w_R, tok_R, offs_E, x_RD,
                                                    act_saved[0], act_RF, ctx.runs, need_wgu, need_wd, need_w,
                                                    need_x)
            d_x = bag_sum(bag_rows, bag_starts, dx_RD) if need_x else None
            return d_x, d_wgu, d_wd, d_w, None, None, None, None
        dy_RD = dout_ND.contiguous().index_select(0, tok_R)  # the combine's backward is a gather
        d_wd = grouped_mm(act_RF.t(), dy_RD, offs_E) if need_wd else None
        dact_RF = grouped_mm(dy_RD, w_down.transpose(-2, -1), offs_E)
        del dy_RD
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
            d_x = bag_sum(bag_rows, bag_starts, dx_RD)  # the gather's backward: sum a token's rows
        return d_x, d_wgu, d_wd, d_w, None, None, None, None


def routed_experts(x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E) -> torch.Tensor:
    """:class:`RoutedExperts` applied: ``out[n]`` = the sum over token n's rows r of ``w_R[r] * expert_e(x[n])``."""
    return RoutedExperts.apply(x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E)


def gemm_experts(x_ND: torch.Tensor, w_gate_up: torch.Tensor, w_down: torch.Tensor, tok_R: torch.Tensor,
                 w_R: torch.Tensor, e_S: torch.Tensor, counts_E: torch.Tensor, padded: bool,
                 dtype: torch.dtype) -> torch.Tensor:
    """The routed experts with plain autograd: one gather of the inputs, two GEMM calls, one
    scatter-add of the outputs, computed in ``dtype`` and returned in ``x_ND``'s dtype. Rows are the
    kept assignments sorted by expert (``tok_R`` / ``w_R`` / ``e_S``: token, routing weight and
    expert of each; ``counts_E``: rows per expert). The routing weight scales the activation (F
    wide) rather than the output (D wide): fewer bytes when F < D.

    ``padded=False`` (``moe_impl`` ``grouped_autograd``): ``torch._grouped_mm`` over the rows (it
    must run here: :func:`grouped_mm_ok`). ``padded=True`` (``padded``): each expert's rows padded
    to the busiest expert's count C, one ``bmm`` per projection; wastes (E * C / rows - 1) of the
    expert FLOPs on padding (about 10-20% with a balanced router) for 1 GEMM call per projection
    instead of E, which pays only where a GEMM call is expensive to start (a busy multi-threaded
    CPU with OpenMP spin-waiting)."""
    E, dev = w_gate_up.shape[0], x_ND.device
    if padded:
        C = max(int(counts_E.max()), 1)
        starts_E = torch.cumsum(counts_E, 0) - counts_E
        row_S = e_S * C + (torch.arange(tok_R.shape[0], device=dev) - starts_E[e_S])
        # padding rows read token 0 with routing weight 0: they add exactly 0 to outputs and grads
        tok_R = torch.zeros(E * C, dtype=torch.long, device=dev).index_copy_(0, row_S, tok_R)
        w_R = torch.zeros(E * C, dtype=w_R.dtype, device=dev).index_copy(0, row_S, w_R)
    x_RD = x_ND.index_select(0, tok_R).to(dtype)
    w_up, w_down = w_gate_up.to(dtype), w_down.to(dtype)
    if padded:
        g, u = torch.bmm(x_RD.view(E, C, -1), w_up).chunk(2, dim=-1)
        act = F.silu(g) * u * w_R.view(E, C, 1).to(dtype)
        y_RD = torch.bmm(act, w_down).view(E * C, -1)
    else:
        offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
        g, u = torch._grouped_mm(x_RD, w_up, offs=offs).chunk(2, dim=-1)
        act = F.silu(g) * u * w_R[:, None].to(dtype)
        y_RD = torch._grouped_mm(act, w_down, offs=offs)
    return torch.zeros_like(x_ND).index_add_(0, tok_R, y_RD.to(x_ND.dtype))
