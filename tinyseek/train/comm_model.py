"""An analytic model of the bytes one rank sends per optimizer step, per parallel dimension.

:func:`comm_bytes` takes a :class:`~tinyseek.config.ModelConfig`, a
:class:`~tinyseek.train.mesh.ParallelSpec` and the step's geometry (per-rank micro-batch, sequence
length, gradient-accumulation micro-batches) and returns, for each of ``dp``, ``dp_shard``, ``tp``,
``ep`` and ``pp``, the bytes the busiest rank puts on the wire, with the ring costs of
:func:`tinyseek.train.distributed.ring_bytes` (an all-reduce of an N-byte tensor over W ranks sends
``2 (W-1)/W N``, an all-gather or reduce-scatter ``(W-1)/W N``). What each term assumes:

``dp``        DDP's all-reduce of this rank's replicated gradients, once per step (accumulation runs
              under ``no_sync``); the parameters DDP holds are this rank's pipeline stage (the largest
              one), tensor-parallel projections at ``1/tp``, routed experts left out when ``ep`` > 1
              (those are all-reduced over the expert-data-parallel group, ``dp * dp_shard / ep``
              ranks, counted here too). Under HSDP (``dp_shard`` > 1) it is the all-reduce of the
              gradient *shard* over the ``dp`` replicas. Uncompressed gradients (no PowerSGD / fp16 hook).
``dp_shard``  FSDP2 over ``dp_shard`` ranks: per micro-batch an all-gather of every block's
              parameters in the forward and again in the backward (``reshard_after_forward=True``),
              the root's parameters (embedding, final norm, head) gathered once; one reduce-scatter of
              the gradients per step. As train/distributed.py wraps it (one unit per block + the root).
``tp``        DTensor tensor parallelism as train/tp.py lays it out (no sequence parallelism), per
              layer and micro-batch, each an all-reduce of a ``(micro, seq_len, width)`` activation:
              forward, the row-wise ``o_proj`` and FFN ``down_proj`` outputs (the FFN is the dense
              SwiGLU or the MoE's shared expert; routed experts are replicated); backward, the input
              gradient of every column-wise projection, one all-reduce each as DTensor runs them
              (MLA: the query's input of width ``d_model`` or ``q_lora_rank``, ``kv_b_proj``'s
              ``kv_lora_rank``, the shared rope key's ``qk_rope_head_dim``; GQA: q, k, v at
              ``d_model`` each; FFN: gate and up at ``d_model`` each). The replicated norms' tiny
              gradient all-reduces are left out.
``ep``        all-to-all of routed token rows (width ``d_model``) per MoE layer and micro-batch:
              dispatch and combine in the forward, the same two in the backward. Under uniform
              routing a fraction ``(ep-1)/ep`` of the ``tokens * top_k`` rows leaves the rank; capacity
              drops (which shrink it) and the small split-size / load-statistic collectives are left out.
``pp``        the residual stream ``(micro, seq_len, d_model)`` sent to the next stage in the forward
              and its gradient to the previous one in the backward, per micro-batch; a middle stage
              sends both, an end stage one (the busiest rank is reported).

Activations are ``act_bytes`` wide (4 for fp32 training), parameters ``param_bytes``, gradients
``grad_bytes``. Parameter counts are read off the model built on the meta device (no memory, no
weights), so they are the module's, not a formula's. Departures from real clusters: ring algorithms
only (NCCL's tree and NVLink SHARP reductions send less), no overlap or latency terms.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from tinyseek.config import ModelConfig
from tinyseek.model.transformer import Transformer
from tinyseek.train.distributed import ring_bytes
from tinyseek.train.mesh import ParallelSpec
from tinyseek.train.pp import stage_layers

DIMS = ("dp", "dp_shard", "tp", "ep", "pp")
# parameters train/tp.py shards over tp (column-wise or row-wise)
_TP_SHARDED = re.compile(r"\.(attn\.(q_proj|q_b_proj|kv_b_proj|k_proj|v_proj|o_proj)|"
                         r"ffn\.(shared\.)?(gate_proj|up_proj|down_proj))\.weight$")
_EXPERT = re.compile(r"\.ffn\.experts\.")


@dataclass(frozen=True)
class ParamCounts:
    """Parameter counts of a model: ``root`` (outside the blocks), per block ``tp_sharded`` (split by
    tensor parallelism), ``experts`` (routed experts) and ``other`` (replicated everywhere); ``head``:
    the part of ``root`` after the blocks (final norm and LM head: a pipeline's last stage holds it,
    the first stage the rest of ``root``, the embedding)."""
    root: int
    tp_sharded: tuple[int, ...]
    experts: tuple[int, ...]
    other: tuple[int, ...]
    head: int = 0

    @property
    def total(self) -> int:
        return self.root + sum(self.tp_sharded) + sum(self.experts) + sum(self.other)


def param_counts(cfg: ModelConfig) -> ParamCounts:
    """Count ``cfg``'s parameters by role, on the meta device.

    >>> from tinyseek.config import model_micro
    >>> pc = param_counts(model_micro())
    >>> pc.total == Transformer(model_micro()).num_params(), pc.experts[0], pc.experts[1] > 0
    (True, 0, True)
    """
    with torch.device("meta"):
        model = Transformer(cfg)
    n = cfg.n_layers
    sharded, experts, other, root, head = [0] * n, [0] * n, [0] * n, 0, 0
    for name, p in model.named_parameters():
        m = re.match(r"blocks\.(\d+)(\..*)$", name)
        if m is None:
            root += p.numel()
            head += p.numel() if not name.startswith("embed.") else 0
            continue
        i, rest = int(m.group(1)), m.group(2)
        bucket = experts if _EXPERT.search(rest) else sharded if _TP_SHARDED.search(rest) else other
        bucket[i] += p.numel()
    return ParamCounts(root, tuple(sharded), tuple(experts), tuple(other), head)


def stage_blocks(n_layers: int, pp: int) -> list[range]:
    """Consecutive blocks of each pipeline stage, as :func:`tinyseek.train.pp.stage_layers` cuts them.

    >>> stage_blocks(4, 2), stage_blocks(5, 2)
    ([range(0, 2), range(2, 4)], [range(0, 3), range(3, 5)])
    """
    return stage_layers(n_layers, pp)


def local_params(pc: ParamCounts, spec: ParallelSpec) -> dict[str, int]:
    """Parameters the busiest rank holds before FSDP sharding: ``replicated`` (DDP's / FSDP's share,
    tensor-parallel projections at 1/tp, routed experts included when ep == 1), ``experts`` (its
    E/ep routed experts when ep > 1, else 0) and ``root`` (its part of the embedding / norm / head).
    The largest pipeline stage is taken; the embedding goes to the first stage, the final norm and the
    LM head (``head``) to the last.

    >>> pc = ParamCounts(root=10, tp_sharded=(8, 8), experts=(0, 40), other=(2, 2))
    >>> local_params(pc, ParallelSpec())
    {'replicated': 70, 'experts': 0, 'root': 10}
    >>> local_params(pc, ParallelSpec(dp=2, tp=2, ep=2))
    {'replicated': 22, 'experts': 20, 'root': 10}
    """
    best = None
    for s, blocks in enumerate(stage_blocks(len(pc.other), spec.pp)):
        root = pc.root if spec.pp == 1 else ((pc.root - pc.head if s == 0 else 0)
                                             + (pc.head if s == spec.pp - 1 else 0))
        exp = sum(pc.experts[i] for i in blocks)
        rep = root + sum(pc.tp_sharded[i] // spec.tp + pc.other[i] for i in blocks) + (exp if spec.ep == 1 else 0)
        cur = {"replicated": rep, "experts": exp // spec.ep if spec.ep > 1 else 0, "root": root}
        if best is None or cur["replicated"] + cur["experts"] > best["replicated"] + best["experts"]:
            best = cur
    return best


def comm_bytes(cfg: ModelConfig, spec: ParallelSpec, micro: int, seq_len: int, grad_accum: int = 1,
               act_bytes: int = 4, param_bytes: int = 4, grad_bytes: int = 4) -> dict[str, int]:
    """Bytes the busiest rank sends per optimizer step, per dimension (the module docstring says what
    each term assumes), plus ``"total"``. One process sends nothing; every term scales linearly in
    its payload.

    >>> from tinyseek.config import model_micro
    >>> cfg = model_micro()
    >>> comm_bytes(cfg, ParallelSpec(), 8, 64)["total"]
    0
    >>> b = comm_bytes(cfg, ParallelSpec(dp=2), 4, 64)
    >>> b["dp"] == param_counts(cfg).total * 4, b["tp"], b["ep"]     # ring all-reduce, 2 ranks: N bytes
    (True, 0, 0)
    >>> e2 = comm_bytes(cfg, ParallelSpec(dp=2, ep=2), 4, 64)["ep"]
    >>> e2 == 4 * (4 * 64 * cfg.top_k // 2) * cfg.d_model * 4      # 1 MoE layer, half the rows leave
    True
    """
    pc = param_counts(cfg)
    loc = local_params(pc, spec)
    out = dict.fromkeys(DIMS, 0)
    S = spec.dp_shard
    rep = loc["replicated"]
    # data-parallel gradient traffic
    if S == 1:
        out["dp"] = ring_bytes("all_reduce", rep * grad_bytes, spec.dp)
    else:
        blocks = rep - loc["root"]
        gathers = 2 * blocks * param_bytes + loc["root"] * param_bytes  # blocks re-gathered for backward
        out["dp_shard"] = (grad_accum * ring_bytes("all_gather", gathers, S)
                           + ring_bytes("reduce_scatter", rep * grad_bytes, S))
        out["dp"] = ring_bytes("all_reduce", rep * grad_bytes // S, spec.dp)
    if spec.ep > 1:  # the replicas of this rank's experts
        out["dp"] += ring_bytes("all_reduce", loc["experts"] * grad_bytes, spec.dp_world // spec.ep)
    # activations
    tokens = micro * seq_len
    stages = stage_blocks(cfg.n_layers, spec.pp)
    d = cfg.d_model
    if spec.tp > 1:  # the busiest stage
        out["tp"] = grad_accum * max(sum(_tp_layer_bytes(cfg, i, tokens, act_bytes, spec.tp) for i in blocks)
                                     for blocks in stages)
    if spec.ep > 1 and cfg.is_moe:
        n_moe = max(sum(1 for i in blocks if i >= cfg.n_dense_layers) for blocks in stages)
        rows = tokens * cfg.top_k * (spec.ep - 1) // spec.ep
        out["ep"] = grad_accum * n_moe * 4 * rows * d * act_bytes
    if spec.pp > 1:
        sends = 2 if spec.pp > 2 else 1  # a middle stage sends both ways
        out["pp"] = grad_accum * sends * tokens * d * act_bytes
    out["total"] = sum(out[k] for k in DIMS)
    return out


def _tp_layer_bytes(cfg: ModelConfig, layer: int, tokens: int, act_bytes: int, tp: int) -> int:
    """Tensor-parallel all-reduces of one layer for one micro-batch of ``tokens`` (forward + backward)."""
    d = cfg.d_model
    moe = cfg.is_moe and layer >= cfg.n_dense_layers
    ffn = not moe or cfg.shared_width > 0  # a dense SwiGLU or a shared expert is split
    widths = [d] + ([d] if ffn else [])  # forward: o_proj, down_proj outputs
    if cfg.attn == "mla":  # backward: column-wise inputs
        widths += [cfg.q_lora_rank or d, cfg.kv_lora_rank, cfg.qk_rope_head_dim]
    else:
        widths += [d, d, d]
    widths += [d, d] if ffn else []  # backward: gate, up inputs
    return sum(ring_bytes("all_reduce", tokens * w * act_bytes, tp) for w in widths)


def state_bytes_per_rank(cfg: ModelConfig, spec: ParallelSpec, param_bytes: int = 4, grad_bytes: int = 4,
                         optim_bytes: int = 8) -> int:
    """Bytes of weights, gradients and AdamW moments (fp32 each by default: 16 bytes a parameter)
    on the busiest rank; FSDP divides all three by ``dp_shard``. Activations are not included.

    >>> from tinyseek.config import model_micro
    >>> one = state_bytes_per_rank(model_micro(), ParallelSpec())
    >>> one == 16 * param_counts(model_micro()).total, state_bytes_per_rank(model_micro(), ParallelSpec(dp_shard=2)) * 2 == one
    (True, True)
    """
    loc = local_params(param_counts(cfg), spec)
    return (loc["replicated"] // spec.dp_shard + loc["experts"]) * (param_bytes + grad_bytes + optim_bytes)
