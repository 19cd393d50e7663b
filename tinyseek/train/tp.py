"""Tensor parallelism (Megatron-LM's layout) over a 1-D ``tp`` device mesh, on PyTorch's DTensor:
:func:`apply_tp` shards a :class:`tinyseek.model.transformer.Transformer` in place with
``parallelize_module`` (``ColwiseParallel`` / ``RowwiseParallel``; ``SequenceParallel`` norms when
asked). Every rank of the mesh must feed the same batch; the result is the one-process model's up
to float summation order (tested: tests/test_parallel_tp.py).

What is split, per block (H heads over ``tp`` ranks, each rank computing ``H / tp`` of them):
- MLA: the query projection (``q_proj``, or ``q_b_proj`` after the replicated ``q_a_proj`` and its
  norm) and the key/value up-projection ``kv_b_proj`` column-wise over heads, ``o_proj``
  row-wise (one all-reduce). The latent down-projection ``kv_a_proj_with_mqa`` and its norm are
  replicated (small: the latent is what MLA is for). Its rope key ``k_pe`` is shared by all heads,
  so each rank's gradient of it covers its own heads only: a forward hook passes it through
  :func:`_sum_grads` (identity forward, all-reduce of the gradient: Megatron's ``f``).
- GQA: q/k/v column-wise over heads (``n_kv_heads`` must be a multiple of ``tp``, so every rank
  keeps whole groups), ``o_proj`` row-wise; Qwen3's per-head q/k norms are ``SequenceParallel``
  over the head axis (replicated weights whose gradient is summed over the ranks).
- The dense SwiGLU and the MoE's shared expert: gate/up column-wise, down row-wise. The routed
  experts, the router and the shared-expert gate stay replicated (every rank runs them on every
  token: expert parallelism is the mesh's ``ep`` dimension, :mod:`tinyseek.train.mesh`).
- Embedding and LM head: replicated (not vocab-parallel).
With ``sequence_parallel=True`` the residual stream between the sublayers is split over the
sequence (dim 1, each rank holding its chunk as a plain tensor): the norms run on the chunk
(``SequenceParallel``), each sublayer all-gathers its input and its last row-wise projection
reduce-scatters its output; the embedding output is chunked and the LM head's input gathered.
A replicated DTensor weight whose gradient comes out ``Partial`` (the norms'; the ranks saw
different tokens or heads) is all-reduced once it is accumulated, so every parameter's ``.grad``
has the parameter's own placement (optimizers and gradient clipping see true gradients).

Departures (on purpose): MLA under TP always runs the naive form (``impl = "naive"``: the
absorbed and folded decode forms read whole weights). The C kernels never see a shard:
:class:`tinyseek.model.layers.Linear` re-selects its variant when ``parallelize_module``
registers the DTensor weight, and :func:`tinyseek.kernels.linear.weight_fits` refuses tensor
subclasses, so sharded projections run ``F.linear`` (DTensor's sharded op); the MoE's fused
routed+shared node refuses non-plain shared weights (``moe._plain_cpu_f32``).
"""
from __future__ import annotations

import functools
import inspect

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard
from torch.distributed.tensor.parallel import (ColwiseParallel, PrepareModuleInput, PrepareModuleOutput,
                                               RowwiseParallel, SequenceParallel, parallelize_module)

from tinyseek.errors import UserError
from tinyseek.model.attention import MLA
from tinyseek.model.transformer import Transformer
from tinyseek.train.mesh import tp_widths
from tinyseek.train.distributed import clip_grad_norm_  # noqa: F401 (the one clip for DTensor / plain mixes)


def check_tp(cfg, tp: int) -> None:
    """Raise a one-line :class:`UserError` where ``tp`` does not split ``cfg``'s model evenly: the
    query heads, GQA's key/value heads, the dense FFN width and the shared expert's width must be
    multiples of ``tp``. Pure (no collective): call it before building a mesh.

    >>> from tinyseek.config import model_micro
    >>> check_tp(model_micro(), 2)
    >>> check_tp(model_micro(), 3)
    Traceback (most recent call last):
    ...
    tinyseek.errors.UserError: tensor parallelism tp=3 must divide model.n_heads (4)
    """
    if tp < 1:
        raise UserError(f"tensor parallelism needs tp >= 1, got {tp}")
    for name, n in tp_widths(cfg):
        if n % tp:
            raise UserError(f"tensor parallelism tp={tp} must divide {name} ({n})")


def apply_tp(model: Transformer, tp_mesh: DeviceMesh, sequence_parallel: bool = False) -> Transformer:
    """Shard ``model`` in place over the 1-D mesh ``tp_mesh`` (the layout in the module docstring)
    and return it. The layout is checked first (:func:`check_tp`: a one-line :class:`UserError`
    before any collective). Parameters become DTensors (sharded or replicated) except those of the
    replicated modules, which stay plain tensors; ``DTensor.full_tensor()`` gathers a shard.
    Every rank must hold the same initial weights (seed alike; shards are cut from rank 0's) and
    feed the same batch. With ``sequence_parallel`` a forward is a training/scoring forward (no KV
    cache, no ``logits_at`` / ``logits_mask``)."""
    if tp_mesh.ndim != 1:
        raise UserError(f"apply_tp needs a 1-D tensor-parallel mesh, got {tp_mesh.ndim} dims "
                        f"({tp_mesh.mesh_dim_names}): pass mesh['tp']")
    tp = tp_mesh.size()
    check_tp(model.cfg, tp)
    if any(isinstance(p, DTensor) for p in model.parameters()):
        raise UserError("apply_tp: the model is already distributed (apply tensor parallelism once, first)")
    if tp == 1:
        return model
    sp = sequence_parallel
    seq = Shard(1)
    # a sublayer's input: the sequence chunk all-gathered (sp) or the replicated stream as it is
    gather = dict(input_layouts=(seq,), desired_input_layouts=(Replicate(),)) if sp else None
    row_out = dict(output_layouts=seq) if sp else {}   # reduce-scatter (sp) or all-reduce
    for block in model.blocks:
        plan: dict[str, object] = {}
        attn = block.attn
        if isinstance(attn, MLA):
            q = "attn.q_proj" if hasattr(attn, "q_proj") else "attn.q_b_proj"
            plan |= {q: ColwiseParallel(), "attn.kv_b_proj": ColwiseParallel()}
            attn.impl = "naive"
            attn.kv_a_proj_with_mqa.register_forward_hook(
                functools.partial(_sum_rope_key_grads, latent=attn.kv_rank, mesh=tp_mesh))
        else:
            plan |= {"attn.q_proj": ColwiseParallel(), "attn.k_proj": ColwiseParallel(),
                     "attn.v_proj": ColwiseParallel()}
            if attn.q_norm is not None:  # (B, T, heads, hd): shared weights over the local heads
                plan |= {"attn.q_norm": SequenceParallel(sequence_dim=2, use_local_output=True),
                         "attn.k_norm": SequenceParallel(sequence_dim=2, use_local_output=True)}
            attn.n_kv = attn.n_kv // tp
        attn.n_heads = attn.n_heads // tp
        plan["attn.o_proj"] = RowwiseParallel(**row_out)
        ffn = "ffn" if not block.is_moe else "ffn.shared" if block.ffn.shared is not None else None
        if ffn is not None:
            plan |= {f"{ffn}.gate_proj": ColwiseParallel(), f"{ffn}.up_proj": ColwiseParallel(),
                     f"{ffn}.down_proj": RowwiseParallel(**(row_out if not block.is_moe else {}))}
        if sp:
            plan |= {"attn_norm": SequenceParallel(use_local_output=True),
                     "ffn_norm": SequenceParallel(use_local_output=True),
                     "attn": PrepareModuleInput(input_layouts=(seq,) + (None,) * 5,
                                                desired_input_layouts=(Replicate(),) + (None,) * 5,
                                                use_local_output=True),
                     "ffn": PrepareModuleInput(**gather, use_local_output=True)}
        parallelize_module(block, tp_mesh, plan)
        if sp and block.is_moe:  # (y, stats): y is replicated (routed experts and all-reduced shared
            # expert): keep this rank's chunk (its gradient is all-gathered)
            parallelize_module(block.ffn, tp_mesh, PrepareModuleOutput(
                output_layouts=(Replicate(), None), desired_output_layouts=(seq, None), use_local_output=True))
    if sp:
        model.register_forward_pre_hook(functools.partial(_check_sequence, tp=tp), with_kwargs=True)
        parallelize_module(model, tp_mesh, {
            "embed": PrepareModuleOutput(output_layouts=Replicate(), desired_output_layouts=seq,
                                         use_local_output=True),
            "norm": SequenceParallel(use_local_output=True),
            "lm_head": PrepareModuleInput(**gather, use_local_output=True)})
    for p in model.parameters():
        if isinstance(p, DTensor) and all(isinstance(pl, Replicate) for pl in p.placements):
            p.register_post_accumulate_grad_hook(_replicate_grad)
    return model


def _check_sequence(model: nn.Module, args: tuple, kwargs: dict, tp: int) -> None:
    """Forward pre-hook of a sequence-parallel model: a one-line UserError (before any collective: every rank
    sees the same batch) where the sequence does not split into ``tp`` equal chunks, a ValueError where the call
    asks for logits at some positions only (the stream is chunked there)."""
    call = _FORWARD.bind(model, *args, **kwargs).arguments
    T = call["idx_BT"].shape[1]
    if T % tp:
        raise UserError(f"sequence-parallel forward: the sequence length {T} must be a multiple of tp={tp}")
    for name in ("logits_at", "logits_mask"):
        if call.get(name) is not None:
            raise ValueError(f"sequence-parallel forward: {name} is not supported (a training/scoring forward only)")


_FORWARD = inspect.signature(Transformer.forward)


def _sum_rope_key_grads(mod: nn.Module, args: tuple, out: torch.Tensor, latent: int, mesh: DeviceMesh):
    """Forward hook of MLA's ``kv_a_proj_with_mqa`` (output ``[c_kv | k_pe]``): ``k_pe`` through
    :func:`_sum_grads` (every head uses it; ``c_kv`` feeds the column-wise ``kv_b_proj``, whose input
    gradient DTensor already sums)."""
    return torch.cat([out[..., :latent], _sum_grads(out[..., latent:], mesh)], dim=-1)


def _sum_grads(x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
    """Identity forward; backward all-reduces (sums) the gradient over ``mesh`` (Megatron's ``f``):
    for a replicated activation that each rank consumes with its own heads only."""
    return DTensor.from_local(x, mesh, [Replicate()], run_check=False).to_local(grad_placements=[Partial()])


def _replicate_grad(p: DTensor) -> None:
    """Post-accumulate-grad hook of a replicated DTensor parameter: a ``Partial`` gradient (partial
    sums from the ranks' tokens or heads) is all-reduced into the parameter's placement."""
    g = p.grad
    if isinstance(g, DTensor) and g.placements != p.placements:
        p.grad = g.redistribute(p.device_mesh, p.placements)
