"""Expert parallelism: the routed experts of every MoE layer split over the ranks of an EP group.

:func:`apply_ep` keeps ``n_routed_experts / ep`` consecutive experts on each rank (rank i of the group
holds global experts ``[i * E/ep, (i + 1) * E/ep)``; the router keeps scoring all E) and sets two
things on each :class:`~tinyseek.model.moe.MoE` through its seams, once:

- ``moe.load_scope``: an :class:`ExpertParallel`, a :class:`GroupLoad` over the *load group* (the EP
  group by default; the whole data-parallel group in a ``dp x ep`` layout, so that the statistics
  are the global batch's). Expert counts (the balance loss, ``stats["counts"]`` for the
  aux-loss-free bias update) and capacity drops are all-reduced over it, the balance loss's mean
  probabilities P too (its value is the whole batch's, its gradient flows through this rank's
  share), and capacity is decided on the whole batch's assignments (an all-gather of expert ids and
  weights, only when ``capacity_factor`` > 0): every rank sees what one process computes on the
  concatenation of the load group's batches in rank order. The drops are enforced before sending,
  so dropped assignments never travel. :func:`share_load` gives plain data parallelism the same.
- ``moe.impl = "ep"`` (a variant in ``DISPATCH``): the kept assignments, sorted by expert, go to the
  rank holding their expert with ``all_to_all_single_autograd`` (split sizes exchanged first), run
  there through that rank's experts (grouped GEMMs where they run), and come back the same way; the
  routing weights are applied here on the sender, so the router's gradient stays local. Backward
  runs the same all-to-alls in reverse, so every rank of the group must run the same forwards and
  backwards (training and evaluation alike); the ranks of a load group need equal token counts.

Gradients, and what the pretrain wiring must do (DDP's rule: each gradient is the mean over the
ranks holding a copy of its parameter, of those ranks' local-loss gradients):

- Replicated parameters (embedding, attention, dense FFNs, router, shared experts, norms, head):
  mean over the data-parallel group as today (DDP / FSDP over dp, the EP ranks included).
- Expert parameters (:func:`expert_parameters`): an expert's gradient sums the losses of every rank
  that sent it tokens, so the dispatch scales it by 1/ep in the graph; they must be left out of DDP
  over the dp group (``DDP._set_params_and_buffers_to_ignore_for_model``) and averaged over the
  *expert-data-parallel* group instead (the ranks with the same EP index in the other EP groups:
  ``dp * dp_shard / ep`` of them; nothing to do when ep == dp * dp_shard).
- ``apply_ep(model, ep_group, load_group=dp_group)``: ``stats["counts"]`` / ``dropped`` are then
  already the global batch's on every rank; the trainer must not sum them over the dp group again
  (the sign rule of the bias update would not care, the logged loads and drops would).
- Each rank's ``aux_loss`` value is the whole batch's; the mean over ranks of ``loss`` is one process's.
- Checkpoints: :mod:`tinyseek.train.dist_ckpt` presents each rank's slices to torch.distributed.checkpoint as
  DTensors of the global shape (any layout resumes them); :func:`full_state_dict` gathers one process's state dict.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed._functional_collectives import all_to_all_single_autograd

from tinyseek.config import ConfigError
from tinyseek.kernels.moe_grouped import gemm_experts, grouped_mm_ok
from tinyseek.model.moe import Experts, LoadScope, MoE, register_dispatch


class GroupLoad(LoadScope):
    """Load statistics over the batches of ``load_group``'s ranks (equal token counts each), in rank
    order: counts and drops all-reduced, P averaged, capacity decided on the gathered assignments."""

    def __init__(self, load_group):
        self.load_group = load_group
        self.load_size, self.load_rank = dist.get_world_size(load_group), dist.get_rank(load_group)

    def __deepcopy__(self, memo):  # a copy of the model runs on the same groups
        return self

    def total(self, t: torch.Tensor) -> torch.Tensor:
        out = t.detach().clone()
        dist.all_reduce(out, group=self.load_group)
        return out

    def mean(self, P_E: torch.Tensor) -> torch.Tensor:
        """The group's mean; gradient through this rank's ``P_E``: averaged over the ranks (DDP) that
        is the whole batch's gradient."""
        return self.total(P_E) / self.load_size + (P_E - P_E.detach())

    def capacity_keep(self, e_A, w_A, n_experts, top_k, capacity_factor):
        """This rank's slice of the keep-mask one process computes on the group's assignments."""
        n = self.load_size
        es, ws = [torch.empty_like(e_A) for _ in range(n)], [torch.empty_like(w_A) for _ in range(n)]
        dist.all_gather(es, e_A.contiguous(), group=self.load_group)
        dist.all_gather(ws, w_A.contiguous(), group=self.load_group)
        keep = super().capacity_keep(torch.cat(es), torch.cat(ws), n_experts, top_k, capacity_factor)
        return keep[self.load_rank * e_A.numel():(self.load_rank + 1) * e_A.numel()]


class ExpertParallel(GroupLoad):
    """A MoE's EP group: ``size`` ranks, this one holding global experts ``first .. first + n_local - 1``;
    its load statistics over ``load_group`` (default: the EP group). ``bytes_sent``: the payload its
    forwards' all-to-alls sent to other ranks (token rows out, expert outputs back; a backward sends
    as many again), for communication accounting (the reader resets it)."""

    def __init__(self, group, n_experts: int, load_group=None):
        super().__init__(group if load_group is None else load_group)
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if n_experts % self.size:
            raise ConfigError(f"expert parallelism: ep={self.size} does not divide n_routed_experts = {n_experts}")
        self.n_local = n_experts // self.size
        self.first = self.rank * self.n_local
        self.bytes_sent = 0


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (the experts' 1/ep, see the module docstring)."""

    @staticmethod
    def forward(ctx, t, scale: float):
        ctx.scale = scale
        return t.view_as(t)

    @staticmethod
    def backward(ctx, g):
        return g * ctx.scale, None


def local_experts(experts: Experts, x_RD: torch.Tensor, counts_J: torch.Tensor, dtype: torch.dtype,
                  grad_scale: float = 1.0) -> torch.Tensor:
    """Each row of ``x_RD`` (sorted by local expert, ``counts_J`` rows each) through its expert,
    unweighted, computed in ``dtype``; the weights' gradient times ``grad_scale``. Grouped GEMMs where
    they run (:func:`tinyseek.kernels.moe_grouped.gemm_experts`), else one slice per expert. Every
    expert weight takes part, so each gets a gradient (zero without rows), as in one process."""
    w_up = _ScaleGrad.apply(experts.w_gate_up, grad_scale)
    w_down = _ScaleGrad.apply(experts.w_down, grad_scale)
    R = x_RD.shape[0]
    if R == 0:  # keeps the graph: the backward all-to-alls must run on every rank
        return x_RD * 0 + (w_up.sum() + w_down.sum()).to(x_RD.dtype) * 0
    if grouped_mm_ok(x_RD.device, dtype):
        ones = torch.ones(R, dtype=dtype, device=x_RD.device)
        return gemm_experts(x_RD, w_up, w_down, torch.arange(R, device=x_RD.device), ones, None, counts_J,
                            False, dtype)
    outs = []
    for j, xs in enumerate(x_RD.to(dtype).split(counts_J.tolist())):
        g, u = (xs @ w_up[j].to(dtype)).chunk(2, dim=-1)
        outs.append((F.silu(g) * u) @ w_down[j].to(dtype))
    return torch.cat(outs).to(x_RD.dtype)


def dispatch(moe: MoE, x_ND, idx_NK, w_NK, keep_A, counts_E):
    """``DISPATCH["ep"]``: the routed experts of ``moe`` over its EP group (see the module docstring)."""
    ep = moe.load_scope
    if not isinstance(ep, ExpertParallel):
        raise RuntimeError("moe_impl 'ep' runs on a model prepared by tinyseek.train.ep.apply_ep")
    order_S, _, counts_E = moe.plan(idx_NK, keep_A, counts_E)  # kept assignments by global expert
    tok_S, w_S = moe.sorted_rows(w_NK, order_S)
    send_PJ = counts_E.reshape(ep.size, ep.n_local).contiguous()  # rows for rank p's expert j
    recv_PJ = torch.empty_like(send_PJ)
    dist.all_to_all_single(recv_PJ, send_PJ, group=ep.group)  # recv[p, j]: rows rank p sends my expert j
    send, recv = send_PJ.sum(1).tolist(), recv_PJ.sum(1).tolist()
    x_RD = all_to_all_single_autograd(x_ND.index_select(0, tok_S), recv, send, ep.group)
    # received by source rank, then local expert: regroup by expert (stable: source order kept)
    j_R = torch.arange(ep.n_local, device=x_ND.device).repeat(ep.size).repeat_interleave(recv_PJ.flatten())
    perm = torch.argsort(j_R, stable=True)
    y_RD = local_experts(moe.experts, x_RD.index_select(0, perm), recv_PJ.sum(0), moe._compute_dtype(x_ND),
                         1.0 / ep.size)
    y_SD = all_to_all_single_autograd(y_RD.index_select(0, torch.argsort(perm)), send, recv, ep.group)
    rows_out = sum(send) - send[ep.rank] + sum(recv) - recv[ep.rank]  # to other ranks, both ways
    ep.bytes_sent += rows_out * x_ND.shape[1] * x_ND.element_size()
    return torch.zeros_like(x_ND).index_add_(0, tok_S, y_SD * w_S[:, None].to(y_SD.dtype))


register_dispatch("ep", dispatch)


def share_load(model: nn.Module, load_group) -> nn.Module:
    """Every MoE layer's load statistics over ``load_group``'s batches (:class:`GroupLoad`; in place,
    returns ``model``): plain data parallelism then routes, drops and balances as one process on the
    global batch. Every rank of the group must run the same forwards. (An expert-parallel model gets
    its load group from :func:`apply_ep`; ConfigError here.)"""
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        if isinstance(moe.load_scope, ExpertParallel):
            raise ConfigError("share_load: the model is expert-parallel; pass load_group to apply_ep instead")
        moe.load_scope = GroupLoad(load_group)
    return model


def apply_ep(model: nn.Module, ep_group, load_group=None) -> nn.Module:
    """Split the routed experts of every MoE layer of ``model`` over ``ep_group`` (in place; returns
    ``model``), their load statistics over ``load_group`` (default ``ep_group``; pass the
    data-parallel group in a ``dp x ep`` layout). Every rank must call it on the same model (same seed
    or same state): rank i of the EP group keeps the slice ``[i * E/ep, (i + 1) * E/ep)`` of the
    stacked expert weights (``ExpertParallel.first`` on). ConfigError where ep does not divide E."""
    for moe in [m for m in model.modules() if isinstance(m, MoE)]:
        full = moe.experts
        if type(full) is not Experts or full.n_experts != moe.n_experts:
            raise ConfigError("apply_ep: the MoE's experts are already split or not plain Experts")
        ep = ExpertParallel(ep_group, moe.n_experts, load_group)
        sl = slice(ep.first, ep.first + ep.n_local)
        local = Experts(ep.n_local, full.w_gate_up.shape[1], full.hidden)
        for name in ("w_gate_up", "w_down"):
            w = getattr(full, name)
            setattr(local, name, nn.Parameter(w.detach()[sl].clone(), requires_grad=w.requires_grad))
        moe.load_scope = ep
        moe.experts = local
        moe.impl = "ep"
    return model


def expert_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters :func:`apply_ep` split (name -> parameter): not replicated over the EP group."""
    return {f"{name}.experts.{p}": getattr(m.experts, p) for name, m in model.named_modules()
            if isinstance(m, MoE) and isinstance(m.load_scope, ExpertParallel) for p in ("w_gate_up", "w_down")}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every split expert weight gathered from its EP group (global expert
    order): one process's state dict. A collective: every rank of the group calls it."""
    sd = model.state_dict()
    for name, m in model.named_modules():
        if isinstance(m, MoE) and isinstance(m.load_scope, ExpertParallel):
            ep = m.load_scope
            for p in ("w_gate_up", "w_down"):
                w = getattr(m.experts, p).detach().contiguous()
                parts = [torch.empty_like(w) for _ in range(ep.size)]
                dist.all_gather(parts, w, group=ep.group)
                sd[f"{name}.experts.{p}"] = torch.cat(parts)
    return sd
