"""The ``compiled`` MoE dispatch variant, kept for comparison only (``moe_vs_hf.py --impls compiled``):
``grouped``'s autograd node (:class:`tinyseek.kernels.moe_grouped.RoutedExperts`, PyTorch path) with
the elementwise work between its GEMMs (SwiGLU and routing weight forward; their backward with the
routing-weight gradient) as two ``torch.compile``d functions, one fused loop each instead of ~4 and
~6 passes over memory. It gained 0-2% over ``grouped`` on CPU, so it left the package. The first call
compiles (about 30 s on CPU, needs a C++ compiler); if compiling fails we warn once and use the eager
code. Importing this module registers it: ``moe.impl = "compiled"``.
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F

from tinyseek.kernels.moe_grouped import bag_sum, grouped_mm
from tinyseek.model.moe import register_dispatch


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


def _run_compiled(name: str, *args):
    """The ``torch.compile``d form of one of the two functions above; the eager one where compiling
    failed (no C++ compiler, unsupported platform: one warning)."""
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile({"fwd": swiglu_weighted, "bwd": swiglu_weighted_backward}[name], dynamic=True)
    fn = _COMPILED[name]
    if fn is not None:
        try:
            return fn(*args)
        except Exception as e:  # compile errors surface on the first call
            warnings.warn(f"moe_impl='compiled': torch.compile failed ({type(e).__name__}: {e}); "
                          "using the eager MoE code", stacklevel=3)
            _COMPILED["fwd"] = _COMPILED["bwd"] = None
    return (swiglu_weighted if name == "fwd" else swiglu_weighted_backward)(*args)


class CompiledRoutedExperts(torch.autograd.Function):
    """The arguments and result of :class:`tinyseek.kernels.moe_grouped.RoutedExperts`."""

    @staticmethod
    def forward(ctx, x_ND, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E):
        x_RD = x_ND.index_select(0, tok_R)
        h_RF2 = grouped_mm(x_RD, w_gate_up, offs_E)
        act_RF, act0_RF = _run_compiled("fwd", h_RF2, w_R)
        y_RD = grouped_mm(act_RF, w_down, offs_E)
        ctx.save_for_backward(x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, h_RF2,
                              act0_RF)
        return bag_sum(bag_rows, bag_starts, y_RD)

    @staticmethod
    def backward(ctx, dout_ND):
        x_RD, act_RF, w_gate_up, w_down, w_R, tok_R, bag_rows, bag_starts, offs_E, h_RF2, act0_RF = ctx.saved_tensors
        need_x, need_wgu, need_wd, need_w = ctx.needs_input_grad[:4]
        dy_RD = dout_ND.contiguous().index_select(0, tok_R)  # the combine's backward is a gather
        d_wd = grouped_mm(act_RF.t(), dy_RD, offs_E) if need_wd else None
        dact_RF = grouped_mm(dy_RD, w_down.transpose(-2, -1), offs_E)
        dh_RF2, d_w = _run_compiled("bwd", dact_RF, h_RF2, w_R, act0_RF)
        d_wgu = grouped_mm(x_RD.t(), dh_RF2, offs_E) if need_wgu else None
        d_x = bag_sum(bag_rows, bag_starts, grouped_mm(dh_RF2, w_gate_up.transpose(-2, -1), offs_E)) if need_x else None
        return d_x, d_wgu, d_wd, d_w if need_w else None, None, None, None, None


def compiled_dispatch(moe, x_ND, idx_NK, w_NK, keep_A, counts_E):
    """MoE dispatch ``compiled``: ``grouped`` (``MoE._grouped``) with :class:`CompiledRoutedExperts`."""
    dt = moe._compute_dtype(x_ND)
    w_R, tok_R, bag_rows, bag_starts, offs_E = moe.grouped_plan(idx_NK, w_NK, keep_A, counts_E)
    with torch.autocast(x_ND.device.type, enabled=False):
        y_ND = CompiledRoutedExperts.apply(x_ND.to(dt), moe.experts.w_gate_up.to(dt), moe.experts.w_down.to(dt),
                                           w_R.to(dt), tok_R, bag_rows, bag_starts, offs_E)
    return y_ND.to(x_ND.dtype)


register_dispatch("compiled", compiled_dispatch)
