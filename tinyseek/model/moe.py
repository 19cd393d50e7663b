"""DeepSeek-V3-style MoE layer: fine-grained routed experts + shared experts.

Routing (``Router``): softmax (V2) or sigmoid (V3) scores; optional group-limited routing
(pick ``topk_groups`` of ``n_groups`` expert groups, then top-k inside them); the aux-loss-free
``expert_bias`` is added to the scores for *selection only*, the mixing weights use the original
scores (V3 ``Gate``). The bias is updated outside the forward by :func:`update_bias` (the trainer
calls it before the optimizer step) with the sign rule and speed gamma; token counts come back from
the forward as statistics and are only produced in training mode.

Router regularisation beside the balancing (both off by default; off = today's maths exactly):
- routing entropy (``router_entropy_coef`` c): the aux loss gains ``-c * routing_entropy(scores)``,
  the mean over tokens of the entropy of each token's normalized affinities, divided by ln N
  (:func:`routing_entropy`). c > 0 *raises* that entropy: every token keeps some affinity for
  every expert, so no expert's affinity collapses to zero everywhere (a never-chosen expert keeps
  getting router gradient and can come back: "experts do not degenerate"); c < 0 lowers it
  (sharper, more confident routing). It is per token, not the batch-average load: spreading the
  load over the batch is the balance losses' and the bias's job, and this term does not do it.
- load-aware routing (``router_load_aware`` lambda > 0): the router keeps a per-expert load
  counter, the buffer ``expert_load`` (an EMA over training steps, momentum
  ``router_load_momentum``, of each expert's share of the step's assignments; starts at 1/N),
  and subtracts ``lambda * (N * load_i - 1)`` (the relative overload, 0 when balanced) from the
  selection scores, like the bias: the choice only, never the gating weights (:func:`load_penalty`,
  :func:`update_load`). Unlike the aux-loss-free bias (an integral controller: a fixed step
  ``gamma * sign(error)`` added every step, unbounded, blind to how large the error is), it is a
  proportional controller on the smoothed load: the push is proportional to the current overload
  and vanishes once the load is even (the bias keeps what it accumulated). Both may run together;
  they then add. Not in the paper; our own, with the entropy term, for issue 19.

Balance losses (pure functions): ``switch`` = N * sum_i f_i P_i (Switch Transformer), ``variance`` =
sum_i (p_i - 1/N)^2 (the seeds' formula), each times ``aux_loss_alpha``. Deviation: we compute them
over the whole micro-batch, not per sequence (V3 uses a complementary *sequence-wise* loss).

Shared experts: one SwiGLU of width ``cfg.shared_width`` (S experts of ``moe_d_ff`` fused, or
``shared_d_ff``) added to every token's output, optionally scaled by a sigmoid gate (``SharedGate``,
Qwen2-MoE's ``shared_expert_gate``).

Capacity: ``capacity_factor`` > 0 caps each expert at ceil(cf * tokens * k / N) assignments; an
over-full expert keeps its highest-weight assignments and drops the rest (the token still gets the
shared expert and the residual). 0 = dropless (default, as in V3).

Load scope (``MoE.load_scope``, a :class:`LoadScope`): the tokens whose statistics the counts, the
balance loss and the capacity use; by default the batch of the call. Expert parallelism
(``tinyseek.train.ep``) widens it to its group's batches and adds the ``ep`` dispatch.

Dispatch (the routed experts for the chosen assignments), all numerically the same maths
(``DISPATCH``; each ``fn(moe, x_ND, idx_NK, w_NK, keep_A or None, counts_E) -> y_ND``):
- ``loop``: readable per-expert loop with boolean masks: the reference the tests compare against.
- ``sorted``: assignments sorted by expert, one slice per expert (no masks).
- ``grouped``: sorted assignments, the routed path one autograd node with a hand-written backward
  over grouped GEMMs (``tinyseek.kernels.moe_grouped``; on CPU fp32 each expert's chain is one C
  pass, ``tinyseek.kernels.moe_train``); on several CPU threads the shared expert rides along in
  the same node (``tinyseek.kernels.moe_shared``).
- ``grouped_autograd``: the same GEMMs with plain autograd (``auto``'s path without gradients where
  the C kernel does not run).
- ``padded``: sorted assignments padded per expert to the busiest expert's count, one ``bmm`` per
  projection (``tinyseek.kernels.moe_grouped.gemm_experts``).
- ``kernel``: inference on CPU fp32: all routed experts in one C call (``tinyseek.kernels.moe_infer``).
A variant for comparison only, ``compiled`` (``torch.compile``d elementwise), lives in
``benchmarks/moe_compiled.py``; other packages add theirs with :func:`register_dispatch`.

The seam (a :class:`tinyseek.model.layers.KernelSeam`): :meth:`MoE.select_variant` turns ``impl`` (``cfg.moe_impl``) into two variants, one for
calls that need a gradient and one for calls that do not, once: when the module is built, its
``impl`` set, its experts or shared expert replaced, its state loaded or it is moved (``.to()``),
not per call. Per call ``forward`` only branches on whether a gradient is needed (and, under
autocast, on its dtype: chosen once per dtype). ``auto`` gives ``grouped`` for training where the
grouped GEMMs run (CPU fp32 in torch >= 2.9, CUDA bf16), else ``sorted``; without gradients
``kernel`` for plain experts on CPU fp32, else ``infer`` (``sorted`` for one token or without
grouped GEMMs, else ``grouped_autograd``). A C variant falls back to its PyTorch path per call
where it does not apply (kernels switched off or not built, capacity drops, a gradient needed).
The router's top-k and the sort of assignments by expert are C passes on CPU (``kernels.route``).
Measured in ``benchmarks/moe_vs_hf.py`` (see ``benchmarks/README.md``).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.kernels import moe_infer, moe_train
from tinyseek.kernels.moe_grouped import combine_plan, gemm_experts, grouped_mm_ok, routed_experts
from tinyseek.kernels.moe_shared import ExpertsWithShared, kernel_runs_with_shared
from tinyseek.kernels.route import sort_by_expert, topk_indices
from tinyseek.model.layers import KernelSeam, Linear, SwiGLU, linear_or_f

# ---------------------------------------------------------------------------------------------
# pure functions
# ---------------------------------------------------------------------------------------------


def route(scores_NE: torch.Tensor, top_k: int, bias_E: torch.Tensor | None = None, n_groups: int = 1,
          topk_groups: int = 1, score_func: str = "softmax", norm_topk_prob: bool = True,
          routed_scaling: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick experts with bias-adjusted scores, weight them with the original scores.

    >>> s = torch.tensor([[0.1, 0.5, 0.4]])
    >>> idx, w = route(s, 1, bias_E=torch.tensor([0.0, 0.0, 0.2]))
    >>> idx.tolist(), w.tolist()   # the bias moves the choice to expert 2, weight stays its score
    ([[2]], [[0.4000000059604645]])
    >>> route(s, 2, norm_topk_prob=False)[1].tolist()
    [[0.5, 0.4000000059604645]]
    """
    N, E = scores_NE.shape
    sel = scores_NE.detach()
    if bias_E is not None:
        sel = sel + bias_E
    if n_groups > 1:
        g = sel.view(N, n_groups, E // n_groups)
        gscore = g.topk(min(2, E // n_groups), dim=-1).values.sum(-1) if score_func == "sigmoid" else g.amax(-1)
        keep_g = torch.zeros_like(gscore, dtype=torch.bool).scatter_(1, gscore.topk(topk_groups, dim=-1).indices, True)
        sel = sel.masked_fill(~keep_g.repeat_interleave(E // n_groups, dim=1), float("-inf"))
    idx_NK = topk_indices(sel, top_k)  # sel.topk(top_k).indices (a C pass on CPU fp32)
    w_NK = scores_NE.gather(1, idx_NK)
    if norm_topk_prob and (top_k > 1 or score_func == "sigmoid"):
        w_NK = w_NK / (w_NK.sum(-1, keepdim=True) + 1e-20)
    return idx_NK, (w_NK * routed_scaling if routed_scaling != 1.0 else w_NK)


def balance_loss(kind: str, scores_NE: torch.Tensor, idx_NK: torch.Tensor,
                 counts_E: torch.Tensor | None = None, normalized: bool = False, mean=None) -> torch.Tensor:
    """Auxiliary load-balance loss (before the alpha coefficient).

    ``switch``: N * sum_i f_i * P_i, f_i = share of assignments to i, P_i = mean routing prob of i.
    ``variance``: sum_i (P_i - 1/N)^2. Both are minimal (1 and 0) for a uniform router.
    ``counts_E`` (assignments per expert) may be passed to save a ``bincount``; ``normalized=True``
    says the scores already sum to one per token (softmax), which skips the renormalisation.
    When the batch is split over ranks (expert parallelism), ``counts_E`` are the whole batch's and
    ``mean`` (:meth:`LoadScope.mean`) maps this shard's P to the whole batch's: f_i = counts_i / their
    sum, so the loss is the one of the whole batch.

    >>> s = torch.full((4, 2), 0.5); idx = torch.tensor([[0], [1], [0], [1]])
    >>> float(balance_loss("switch", s, idx)), float(balance_loss("variance", s, idx))
    (1.0, 0.0)
    >>> s = torch.tensor([[1.0, 0.0]] * 4); idx = torch.zeros(4, 1, dtype=torch.long)
    >>> float(balance_loss("switch", s, idx)), float(balance_loss("variance", s, idx))
    (2.0, 0.5)
    """
    N, E = scores_NE.shape
    if kind == "none":
        return scores_NE.new_zeros(())
    probs = scores_NE if normalized else scores_NE / (scores_NE.sum(-1, keepdim=True) + 1e-20)  # -> distribution
    P_E = probs.mean(0) if mean is None else mean(probs.mean(0))
    if kind == "switch":
        if counts_E is None:
            counts_E = torch.bincount(idx_NK.flatten(), minlength=E)
        f_E = counts_E.to(P_E.dtype) / counts_E.sum()
        return E * (f_E * P_E).sum()
    if kind == "variance":
        return ((P_E - 1.0 / E) ** 2).sum()
    raise ValueError(f"unknown balance loss {kind!r}")


def capacity_keep(e_A: torch.Tensor, w_A: torch.Tensor, n_experts: int, capacity: int) -> torch.Tensor:
    """Boolean keep-mask over assignments: each expert keeps its ``capacity`` highest-weight ones.

    >>> capacity_keep(torch.tensor([0, 0, 0, 1]), torch.tensor([0.1, 0.9, 0.5, 0.3]), 2, 2).tolist()
    [False, True, True, True]
    """
    order = torch.argsort(-w_A, stable=True)
    order = order[torch.argsort(e_A[order], stable=True)]  # by expert, then by weight descending
    counts = torch.bincount(e_A, minlength=n_experts)
    starts = torch.cumsum(counts, 0) - counts
    rank_sorted = torch.arange(e_A.numel(), device=e_A.device) - starts[e_A[order]]
    keep = torch.empty_like(e_A, dtype=torch.bool)
    keep[order] = rank_sorted < capacity
    return keep


def routing_entropy(scores_NE: torch.Tensor, normalized: bool = False) -> torch.Tensor:
    """Mean over tokens of the entropy of each token's affinity distribution (the scores divided by
    their sum; ``normalized=True``: already summing to one, softmax), divided by ln N: 1 for a
    uniform router, 0 for one-hot affinities; differentiable. 0 for N = 1.

    >>> float(routing_entropy(torch.full((3, 4), 0.25), normalized=True))
    1.0
    >>> float(routing_entropy(torch.tensor([[0.9, 0.0, 0.0, 0.0]]))) == 0.0
    True
    """
    N, E = scores_NE.shape
    if E < 2:
        return scores_NE.new_zeros(())
    p = scores_NE if normalized else scores_NE / (scores_NE.sum(-1, keepdim=True) + 1e-20)
    return -(p * torch.log(p.clamp_min(1e-20))).sum(-1).mean() / math.log(E)


def load_penalty(load_E: torch.Tensor, strength: float) -> torch.Tensor:
    """Load-aware routing's offset to subtract from the selection scores: ``strength`` times the
    relative overload ``N * load_i - 1`` (``load_E``: shares summing to one; 0 where balanced).

    >>> load_penalty(torch.tensor([0.5, 0.25, 0.25]), 0.5).tolist()   # expert 0 is 1.5x its share
    [0.25, -0.125, -0.125]
    """
    return strength * (load_E * load_E.numel() - 1.0)


def update_load(load_E: torch.Tensor, counts_E: torch.Tensor, momentum: float) -> torch.Tensor:
    """Load-aware routing's counter step (in place): ``load = momentum * load + (1 - momentum) *
    counts / sum(counts)``; a step without assignments leaves it. Returns ``load_E``.

    >>> update_load(torch.full((2,), 0.5), torch.tensor([3, 1]), 0.5).tolist()
    [0.625, 0.375]
    """
    total = counts_E.sum()
    if total > 0:
        load_E.mul_(momentum).add_(counts_E.to(load_E.dtype) / total.to(load_E.dtype), alpha=1.0 - momentum)
    return load_E


def update_bias(bias_E: torch.Tensor, counts_E: torch.Tensor, speed: float) -> torch.Tensor:
    """Aux-loss-free balancing step (in place): raise the bias of under-loaded experts, lower the
    over-loaded ones, by ``speed`` (DeepSeek-V3 sec. 2.1.2). Returns the bias.

    >>> update_bias(torch.zeros(3), torch.tensor([10.0, 1.0, 1.0]), 0.1).tolist()
    [-0.10000000149011612, 0.10000000149011612, 0.10000000149011612]
    """
    load = counts_E.float()
    bias_E += speed * torch.sign(load.mean() - load).to(bias_E.dtype)
    return bias_E


class LoadScope:
    """The tokens a MoE's load statistics cover: expert counts (balance loss, aux-loss-free bias
    and load-aware counter updates), mean routing probabilities (balance loss; the routing entropy's
    value too) and capacity drops. This one: the batch of the
    call. Expert parallelism (``tinyseek.train.ep``) sets ``moe.load_scope`` to its group's union of
    batches, so that every rank sees the statistics one process computes on the whole batch."""

    def total(self, t: torch.Tensor) -> torch.Tensor:
        """A per-batch sum (counts, drops) over the whole batch."""
        return t

    def mean(self, P_E: torch.Tensor) -> torch.Tensor:
        """This batch's mean routing probabilities -> the whole batch's (gradient through this batch's)."""
        return P_E

    def capacity_keep(self, e_A: torch.Tensor, w_A: torch.Tensor, n_experts: int, top_k: int,
                      capacity_factor: float) -> torch.Tensor:
        """Keep-mask over this batch's assignments: each expert keeps its ceil(cf * tokens * k / N)
        highest-weight assignments of the whole batch (:func:`capacity_keep`)."""
        n_tokens = e_A.numel() // top_k
        return capacity_keep(e_A, w_A, n_experts, math.ceil(capacity_factor * n_tokens * top_k / n_experts))


LOCAL = LoadScope()


# ---------------------------------------------------------------------------------------------
# modules
# ---------------------------------------------------------------------------------------------
class Router(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.d_model))
        # aux-loss-free balancing bias: a buffer (not trained by gradients), saved in checkpoints
        self.register_buffer("expert_bias", torch.zeros(cfg.n_routed_experts))
        if cfg.router_load_aware > 0:  # load-aware routing's counter (only then: state dicts stay as they were)
            self.register_buffer("expert_load", torch.full((cfg.n_routed_experts,), 1.0 / cfg.n_routed_experts))

    def selection_offset(self) -> torch.Tensor | None:
        """What is added to the scores for the choice of experts only: the aux-loss-free bias (when
        ``bias_update_speed`` > 0) minus the load-aware penalty (when ``router_load_aware`` > 0)."""
        c = self.cfg
        off = self.expert_bias if c.bias_update_speed > 0 else None
        if c.router_load_aware > 0:
            pen = load_penalty(self.expert_load, c.router_load_aware)
            off = -pen if off is None else off - pen
        return off

    def forward(self, x_ND: torch.Tensor):
        c = self.cfg
        dev = x_ND.device.type
        if torch.is_autocast_enabled(dev):  # routing decisions in fp32 even under bf16 autocast
            with torch.autocast(dev, enabled=False):
                logits = F.linear(x_ND.float(), self.weight.float())
        else:
            logits = linear_or_f(x_ND.float(), self.weight.float())  # C kernel at fp32 inference
        scores_NE = logits.softmax(-1) if c.score_func == "softmax" else logits.sigmoid()
        idx_NK, w_NK = route(scores_NE, c.top_k, self.selection_offset(), c.n_groups, c.topk_groups, c.score_func,
                             c.norm_topk_prob, c.routed_scaling)
        return idx_NK, w_NK, scores_NE


class Experts(nn.Module):
    """E SwiGLU experts stored as stacked weights: gate|up fused (E, D, 2F) and down (E, F, D)."""

    def __init__(self, n_experts: int, dim: int, hidden: int):
        super().__init__()
        self.n_experts, self.hidden = n_experts, hidden
        self.w_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.w_down = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def expert_forward(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        g, u = (x_MD @ self.w_gate_up[e]).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self.w_down[e]


class SharedGate(nn.Module):
    """Qwen2-MoE's shared-expert gate: ``sigmoid(x . w)`` per token, shape (N, 1). Not an ``nn.Linear``
    (like the router it stays float when a model is quantized: one row of D weights)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(1, dim))

    def forward(self, x_ND: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(linear_or_f(x_ND, self.weight))


class MoE(KernelSeam, nn.Module):
    """``y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n]) (+ gate(x[n]) * shared(x[n]))`` over the
    router's top-k (minus capacity drops). ``forward(x_BTD) -> (y_BTD, stats)``: ``stats["aux_loss"]``
    (alpha times the balance loss, minus ``router_entropy_coef`` times the routing entropy,
    in training; else 0); in training also ``counts`` (assignments per
    expert before drops) and ``dropped``, both over the batch of ``load_scope``. Every dispatch
    variant gives this result up to float summation order."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.n_experts, self.top_k = cfg.n_routed_experts, cfg.top_k
        self.router = Router(cfg)
        self.experts = Experts(cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff)
        self.shared = SwiGLU(cfg.d_model, cfg.shared_width) if cfg.n_shared_experts > 0 else None
        self.shared_gate = SharedGate(cfg.d_model) if cfg.shared_expert_gate and self.shared is not None else None
        self.load_scope = LOCAL  # whose tokens the load statistics cover (LoadScope)
        self.impl = cfg.moe_impl  # chooses the variants (select_variant)
        self.init_seam()

    # --- the seam: which dispatch variant runs, chosen once ----------------------------------------
    @property
    def impl(self) -> str:
        """The dispatch asked for: ``auto`` or a name in :data:`DISPATCH`. Setting it chooses the
        variants again (:meth:`select_variant`)."""
        return self._impl

    @impl.setter
    def impl(self, name: str) -> None:
        if name != "auto" and name not in DISPATCH:
            raise ValueError(f"unknown MoE dispatch {name!r}: auto or one of {sorted(DISPATCH)}")
        self._impl = name
        self.select_variant()

    def select_variant(self) -> None:
        """Fix the dispatch variants for ``impl``, the experts' type, device and dtype: ``variants``
        = (with a gradient, without). Called when any of those may have changed (built, ``impl`` set,
        experts or shared expert replaced, state loaded with ``assign``, ``.to()``); cheap."""
        w = getattr(self.experts, "w_gate_up", None)
        self._device = w.device if isinstance(w, torch.Tensor) else torch.device("cpu")
        self._dtype = w.dtype if isinstance(w, torch.Tensor) else torch.get_default_dtype()
        self._by_amp: dict = {}
        self.variants = self._variants_for(self._dtype, amp=False)

    def _variants_for(self, dtype: torch.dtype, amp: bool) -> tuple[str, str]:
        if self.impl != "auto":
            return self.impl, self.impl
        train = "grouped" if grouped_mm_ok(self._device, dtype) else "sorted"
        kernel = (isinstance(self.experts, Experts) and self._device.type == "cpu" and dtype is torch.float32
                  and not amp and not moe_infer.KERNELS.state["failed"])
        return train, "kernel" if kernel else "infer"

    def variant(self, x_ND: torch.Tensor) -> str:
        """The variant that runs for ``x_ND`` now: ``variants[0]`` where a gradient is needed (grad mode
        on and ``x_ND`` or the experts' weights require grad), else ``variants[1]``; under autocast
        those chosen for its dtype (once per dtype)."""
        pair = self.variants
        dev = self._device.type
        if torch.is_autocast_enabled(dev):
            amp = torch.get_autocast_dtype(dev)
            pair = self._by_amp.get(amp) or self._by_amp.setdefault(amp, self._variants_for(amp, amp=True))
        if pair[0] == pair[1]:
            return pair[0]
        needs_grad = torch.is_grad_enabled() and (x_ND.requires_grad or self.experts.w_gate_up.requires_grad)
        return pair[0] if needs_grad else pair[1]

    def __setattr__(self, name, value):
        super().__setattr__(name, value)
        if name in ("experts", "shared", "shared_gate") and "_impl" in self.__dict__:
            self.select_variant()

    # --- forward ---------------------------------------------------------------------------------
    def forward(self, x_BTD: torch.Tensor) -> tuple[torch.Tensor, dict]:
        B, T, D = x_BTD.shape
        x_ND = x_BTD.reshape(-1, D)
        idx_NK, w_NK, scores_NE = self.router(x_ND)
        e_A = idx_NK.reshape(-1)  # assignment a = n * top_k + k
        counts_E = torch.bincount(e_A, minlength=self.n_experts)  # this batch's, before capacity drops
        scope = self.load_scope
        load_E = scope.total(counts_E) if self.training else counts_E  # the whole batch's
        aux = balance_loss(self.cfg.aux_loss, scores_NE, idx_NK, load_E, normalized=self.cfg.score_func == "softmax",
                           mean=scope.mean) * self.cfg.aux_loss_alpha \
            if self.training and self.cfg.aux_loss != "none" else x_ND.new_zeros(())
        if self.training and self.cfg.router_entropy_coef != 0:  # the routing-entropy term (sign: see the top)
            ent = scope.mean(routing_entropy(scores_NE, normalized=self.cfg.score_func == "softmax"))
            aux = aux - self.cfg.router_entropy_coef * ent
        keep_A = None
        dropped = torch.zeros((), dtype=torch.long, device=x_ND.device)
        if self.cfg.capacity_factor > 0:
            keep_A = scope.capacity_keep(e_A, w_NK.detach().reshape(-1), self.n_experts, self.top_k,
                                         self.cfg.capacity_factor)
            dropped = (~keep_A).sum()
        impl = self.variant(x_ND)
        y_ND = None
        if impl == "grouped" and self.shared is not None and self.shared_gate is None:
            # routed + shared in one node where it pays
            y_ND = self._grouped_with_shared(x_ND, idx_NK, w_NK.to(x_ND.dtype), keep_A, counts_E)
        if y_ND is None:
            y_ND = DISPATCH[impl](self, x_ND, idx_NK, w_NK.to(x_ND.dtype), keep_A, counts_E)
            if self.shared is not None:
                s_ND = self.shared(x_ND)
                if self.shared_gate is not None:
                    s_ND = self.shared_gate(x_ND) * s_ND
                y_ND = y_ND + s_ND
        stats = {"aux_loss": aux}
        if self.training:  # token counts drive the aux-free bias update: training only
            stats["counts"] = load_E.detach()
            stats["dropped"] = scope.total(dropped).detach()
        return y_ND.view(B, T, D), stats

    @torch.no_grad()
    def update_balance(self, counts_E: torch.Tensor) -> None:
        """The per-step balancing updates from one training step's assignments per expert (before the
        optimizer step): the aux-loss-free bias's sign rule (``bias_update_speed`` > 0) and the
        load-aware counter's EMA (``router_load_aware`` > 0). Deterministic: the same counts, the
        same buffers."""
        c = self.cfg
        if c.bias_update_speed > 0:
            update_bias(self.router.expert_bias, counts_E, c.bias_update_speed)
        if c.router_load_aware > 0:
            update_load(self.router.expert_load, counts_E, c.router_load_momentum)

    def _compute_dtype(self, x: torch.Tensor) -> torch.dtype:
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    # --- the reference dispatch: (x_ND, idx_NK, w_NK, keep_A or None, counts_E) -> y_ND ------------
    def _loop(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """Reference: for each expert, find its (token, slot) pairs, run it, scatter-add back."""
        hit_NK = torch.ones_like(idx_NK, dtype=torch.bool) if keep_A is None else keep_A.view_as(idx_NK)
        out = torch.zeros_like(x_ND)
        for e in range(self.n_experts):
            tok, slot = ((idx_NK == e) & hit_NK).nonzero(as_tuple=True)
            if tok.numel() > 0:
                y = self.experts.expert_forward(e, x_ND[tok]) * w_NK[tok, slot, None]
                out = out.index_add(0, tok, y)
        return out

    def plan(self, idx_NK, keep_A, counts_E):
        """Sort the kept assignments by expert once: (assignment ids, their experts, per-expert counts).
        Assignment a is token a // top_k; dropped assignments sort last (key E) and are cut off."""
        e_A = idx_NK.reshape(-1)
        if keep_A is not None:
            e_A = e_A.masked_fill(~keep_A, self.n_experts)
        e_S, order_S, counts = sort_by_expert(e_A, self.n_experts + 1, counts=keep_A is not None)  # stable
        if keep_A is not None:
            counts_E = counts[:self.n_experts]
            n = int(counts_E.sum())
            e_S, order_S = e_S[:n], order_S[:n]
        return order_S, e_S, counts_E

    def sorted_rows(self, w_NK, order_S):
        """Token id and routing weight of each sorted assignment (assignment a is token a // top_k)."""
        return torch.div(order_S, self.top_k, rounding_mode="floor"), w_NK.reshape(-1).index_select(0, order_S)

    def _sorted(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """Sorted assignments, one contiguous slice per expert (experts without tokens are skipped)."""
        order_S, _, counts_E = self.plan(idx_NK, keep_A, counts_E)
        tok_S, w_S = self.sorted_rows(w_NK, order_S)
        x_SD = x_ND.index_select(0, tok_S)
        outs = [self.experts.expert_forward(e, xs) for e, xs in enumerate(x_SD.split(counts_E.tolist()))
                if xs.shape[0] > 0]
        y_SD = torch.cat(outs) if outs else x_SD
        return torch.zeros_like(x_ND).index_add_(0, tok_S, y_SD * w_S[:, None])

    # --- the fast variants: adapters from this module to the kernels' tensor functions ------------
    def grouped_plan(self, idx_NK, w_NK, keep_A, counts_E):
        """(routing weight and token of each sorted row, combine bags, int32 cumulative rows per expert):
        the arguments of :func:`tinyseek.kernels.moe_grouped.routed_experts` after the weights."""
        order_S, _, counts_E = self.plan(idx_NK, keep_A, counts_E)
        tok_R, w_R = self.sorted_rows(w_NK, order_S)
        bag_rows, bag_starts = combine_plan(order_S, idx_NK.numel(), self.top_k, keep_A)
        return w_R, tok_R, bag_rows, bag_starts, torch.cumsum(counts_E, 0, dtype=torch.int32)

    def _grouped(self, x_ND, idx_NK, w_NK, keep_A, counts_E, plan=None):
        """The routed path as one autograd node over grouped GEMMs (``plan``: a :meth:`grouped_plan`
        already made), computed in the autocast dtype where autocast is on, except on CPU with fp32
        weights and the fp32 training kernel available: there the routed experts stay fp32 in the C
        kernel (under bf16 autocast the PyTorch grouped path in bf16 made a cpu-tiny training step
        0.98x of fp32; with the experts in the kernel and the rest in bf16 it is 1.11-1.15x)."""
        dt = self._compute_dtype(x_ND)
        if dt is not torch.float32 and self._fp32_kernel_for(x_ND):
            dt = torch.float32
        w_R, tok_R, bag_rows, bag_starts, offs_E = plan or self.grouped_plan(idx_NK, w_NK, keep_A, counts_E)
        with torch.autocast(x_ND.device.type, enabled=False):  # inputs are cast to the compute dtype here
            y_ND = routed_experts(x_ND.to(dt), self.experts.w_gate_up.to(dt), self.experts.w_down.to(dt),
                                  w_R.to(dt), tok_R, bag_rows, bag_starts, offs_E)
        return y_ND.to(x_ND.dtype)

    def _fp32_kernel_for(self, x_ND) -> bool:
        """Whether the fp32 training kernel can take the routed experts once the inputs are cast to
        fp32: CPU, fp32 expert weights, kernels on and built, not traced. Asked without casting
        anything (the node checks the cast tensors again and, in the rare case of sizes past a C int,
        runs its PyTorch path, in fp32)."""
        ex = self.experts
        f32 = torch.float32
        return (x_ND.device.type == "cpu" and ex.w_gate_up.dtype is f32 and ex.w_down.dtype is f32
                and ex.w_gate_up.device.type == "cpu" and not torch.compiler.is_compiling()
                and moe_train.ready() is not None)

    def _grouped_with_shared(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """``grouped`` plus the shared expert in one node (:class:`tinyseek.kernels.moe_shared.
        ExpertsWithShared`: on several CPU threads the shared expert's GEMMs run beside the routed
        experts' C kernel; apart where the work is too small to share out), or None where it does
        not apply. Checked per call, as they change without this module knowing: one thread, not
        CPU fp32 (autocast, sharded or quantized weights), training kernel off, and a shared expert
        that is not a plain bias-free SwiGLU or has hooks (LoRA, per-sample gradient tools): the
        node bypasses its modules' ``__call__``."""
        if torch.get_num_threads() < 2 or not _shared_foldable(self.shared):
            return None
        ex, sh = self.experts, self.shared
        if torch.is_autocast_enabled(x_ND.device.type) or not _plain_cpu_f32(
                ex.w_gate_up, ex.w_down, sh.gate_proj.weight, sh.up_proj.weight, sh.down_proj.weight):
            return None
        kern = moe_train.usable(x_ND, ex.w_gate_up, ex.w_down, w_NK)
        if kern is None:
            return None
        plan = self.grouped_plan(idx_NK, w_NK, keep_A, counts_E)
        runs = kernel_runs_with_shared(plan[4], x_ND.shape[0], x_ND.shape[1], sh.gate_proj.out_features, ex.hidden)
        if runs is None:
            return self._grouped(x_ND, idx_NK, w_NK, keep_A, counts_E, plan=plan) + sh(x_ND)
        return ExpertsWithShared.apply(x_ND, ex.w_gate_up, ex.w_down, *plan, sh.gate_proj.weight, sh.up_proj.weight,
                                       sh.down_proj.weight, kern, runs)

    def _grouped_autograd(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """``grouped`` without the fused node: plain autograd over ``torch._grouped_mm``."""
        return self._gemm(x_ND, idx_NK, w_NK, keep_A, counts_E, padded=False)

    def _padded(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """Each expert's rows padded to the busiest expert's count, one ``bmm`` per projection (see
        :func:`tinyseek.kernels.moe_grouped.gemm_experts`). Not chosen by ``auto``."""
        return self._gemm(x_ND, idx_NK, w_NK, keep_A, counts_E, padded=True)

    def _gemm(self, x_ND, idx_NK, w_NK, keep_A, counts_E, padded: bool):
        order_S, e_S, counts_E = self.plan(idx_NK, keep_A, counts_E)
        tok_R, w_R = self.sorted_rows(w_NK, order_S)
        return gemm_experts(x_ND, self.experts.w_gate_up, self.experts.w_down, tok_R, w_R, e_S, counts_E, padded,
                            self._compute_dtype(x_ND))

    def _infer(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """``auto``'s PyTorch path without gradients: ``sorted`` for one token (only top_k experts run,
        where grouped GEMMs visit every expert) or where grouped GEMMs do not run for the compute
        dtype, else ``grouped_autograd`` (the fused node pays for its backward plan up front)."""
        if x_ND.shape[0] == 1 or not grouped_mm_ok(x_ND.device, self._compute_dtype(x_ND)):
            return self._sorted(x_ND, idx_NK, w_NK, keep_A, counts_E)
        return self._grouped_autograd(x_ND, idx_NK, w_NK, keep_A, counts_E)

    def _kernel(self, x_ND, idx_NK, w_NK, keep_A, counts_E):
        """All routed experts in one C call (:func:`tinyseek.kernels.moe_infer.routed_experts`: CPU fp32,
        no gradient, kernels on), else :meth:`_infer` (also for capacity drops and other experts)."""
        ex = self.experts
        if keep_A is None and isinstance(ex, Experts):
            y = moe_infer.routed_experts(x_ND, idx_NK, w_NK, ex.w_gate_up, ex.w_down)
            if y is not None:
                return y
        return self._infer(x_ND, idx_NK, w_NK, keep_A, counts_E)


DISPATCH = {"loop": MoE._loop, "sorted": MoE._sorted, "grouped": MoE._grouped, "padded": MoE._padded,
            "grouped_autograd": MoE._grouped_autograd, "kernel": MoE._kernel, "infer": MoE._infer}


def register_dispatch(name: str, fn) -> None:
    """Add a dispatch variant ``fn(moe, x_ND, idx_NK, w_NK, keep_A, counts_E) -> y_ND`` selected by
    ``moe.impl = name`` (e.g. the quantized experts' fused kernel, ``tinyseek/quant/modules.py``)."""
    if name in DISPATCH and DISPATCH[name] is not fn:
        raise ValueError(f"MoE dispatch {name!r} is already registered")
    DISPATCH[name] = fn


def _shared_foldable(sh) -> bool:
    """A plain SwiGLU of bias-free linear layers, without module hooks (global ones included)."""
    if type(sh) is not SwiGLU:
        return False
    mods = (sh, sh.gate_proj, sh.up_proj, sh.down_proj)
    if any(type(m) not in (nn.Linear, Linear) or m.bias is not None for m in mods[1:]):
        return False
    hooks = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
    if any(getattr(m, h, None) for m in mods for h in hooks):
        return False
    g = nn.modules.module
    return not any(getattr(g, name, None) for name in ("_global_forward_hooks", "_global_forward_pre_hooks",
                                                        "_global_backward_hooks", "_global_backward_pre_hooks"))


def _plain_cpu_f32(*ws) -> bool:
    """Plain (no tensor subclass) CPU fp32 tensors; the input's dtype and device are
    ``moe_train.usable``'s to check."""
    return all(type(w) in (nn.Parameter, torch.Tensor) and w.dtype is torch.float32 and w.device.type == "cpu"
               for w in ws)
