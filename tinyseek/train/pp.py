"""Pipeline parallelism: the transformer cut into contiguous stages, run with PyTorch's own engine
(``torch.distributed.pipelining``: ``PipelineStage`` and the GPipe, 1F1B and interleaved 1F1B
schedules), micro-batches sent stage to stage.

Use, on every rank of the pipeline group (each rank builds the same full model first, same seed)::

    stage = split_model(model, pp_rank, pp_size)   # split_stages(..., virtual=2): interleaved 1F1B
    pipe = build_schedule(stage, mesh, n_microbatches, "1f1b")   # mesh["pp"], or a process group
    opt = AdamW(pipe.parameters())
    out = step(pipe, x, y)         # the pipeline's whole batch on every rank: x feeds the first
    pipe.update_expert_bias(out["counts"])   # stage, y the last; the loss comes back everywhere
    pipe.clip_grad_norm_(1.0)      # the global norm over every stage
    opt.step()
    val = evaluate(pipe, x_val, y_val)   # held-out cross-entropy, forward only

With data parallelism (``--parallel pp=2,dp=2``; rank layout of ``train/mesh.py``) each replica
pipelines its own rows: FSDP2 (``fully_shard`` over ``mesh["dp"]``) on each of the stage's blocks
and on the stage averages the gradients, the caller averages ``loss`` and sums ``counts`` over the
``dp`` group as a data-parallel run does (tests/pp_worker.py, ``dp2``). ``Stage.blocks`` is a
``ModuleDict`` keyed by layer index, so shard ``stage.blocks.values()``.

The split (:func:`stage_layers`): contiguous layer ranges balanced by layer count, the embedding on
the first stage, the final norm and the LM head on the last. Every stage keeps the full model's
parameter names (``blocks.3.attn...``), so the union of the stages' state dicts is the full
model's state dict.

The loss (the contract :func:`step` keeps): with ``n`` micro-batches, the loss and the gradients
are those of one process running ``tinyseek.train.pretrain.forward_backward`` with
``accum = n`` over the same micro-batches: ``mean_i (ce_i + aux_i)``, where ``aux_i`` is the sum of
the balance losses of *every* MoE layer for micro-batch ``i`` (the balance loss is a batch
statistic, so it is computed per micro-batch, exactly as gradient accumulation does).

How the balance losses of a non-last stage reach the backward: the schedule's loss function sees
only the last stage's logits, so each stage adds its own layers' balance loss to the backward with
a small autograd function, :class:`_AuxGrad`, applied to the stage's output hidden state. Its
forward returns the hidden state unchanged; its backward passes the incoming gradient through and
gives the stage's aux loss the gradient 1 (the weight of ``aux_i`` in ``ce_i + aux_i``). The
schedule then divides every gradient by ``n`` (``scale_grads``), as ``loss / accum`` does. The
last stage does the same at its final hidden state, so the schedule's loss function is the plain
cross-entropy. The aux loss *values* are kept per stage and summed over the pipeline group in
:func:`step` (one all-reduce of two numbers), so every rank returns the global loss. Chosen over
carrying the aux loss through the stage outputs because the stage's interface stays one tensor
(what PipelineStage's shape inference and every schedule expect), and stages without MoE layers
need nothing. tests/test_parallel_pp.py checks the gradients, the losses and the parameters after
five AdamW steps against one process, and that they differ when the aux gradient is left out.

Cost: ``torch.distributed.pipelining`` pulls in ``torch._dynamo`` (~1.3 s), so it is imported
when a schedule is first built, not with this module.

Departures: tied embeddings are refused for ``pp > 1`` (embedding and head would sit on different
stages); the aux-loss-free bias update of a stage's layers uses that stage's counts (which are the
full batch's counts for those layers: no communication needed over the pipeline; data-parallel
ranks still all-reduce them).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train.distributed import clip_grad_norm_

# schedule name -> torch.distributed.pipelining class (imported in Pipe.build only: the package pulls in
# torch._dynamo, ~1.3 s, which a run without pipeline parallelism should not pay)
SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved1f1b": "ScheduleInterleaved1F1B"}


def stage_layers(n_layers: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, sizes differing by at most one (the first stages get
    the extra layers: the last stage also holds the norm, the LM head and the loss).

    >>> stage_layers(5, 2)
    [range(0, 3), range(3, 5)]
    >>> stage_layers(4, 4)
    [range(0, 1), range(1, 2), range(2, 3), range(3, 4)]
    """
    if n_stages < 1 or n_stages > n_layers:
        raise UserError(f"pipeline of {n_stages} stages needs 1 <= stages <= n_layers ({n_layers} layers)")
    base, extra = divmod(n_layers, n_stages)
    bounds = [0]
    for s in range(n_stages):
        bounds.append(bounds[-1] + base + (1 if s < extra else 0))
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


class _AuxGrad(torch.autograd.Function):
    """``h`` unchanged forward; backward: ``h``'s gradient passes through and ``aux`` gets 1, so the
    stage's balance loss joins the backward that the next stage's gradient drives."""

    @staticmethod
    def forward(ctx, h: torch.Tensor, aux: torch.Tensor) -> torch.Tensor:
        ctx.aux_meta = (aux.dtype, aux.device)
        return h.view_as(h)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        dtype, device = ctx.aux_meta
        return g, torch.ones((), dtype=dtype, device=device)


class Stage(nn.Module):
    """One pipeline stage: the full model's blocks ``layers`` (sharing its parameters), plus the
    embedding when ``first`` and the final norm and LM head when ``last``. ``forward`` takes token
    ids (first stage) or a hidden state (B, T, D) and returns a hidden state or the logits (last).
    In training mode each forward records its balance loss (detached) and expert counts in
    ``self.records`` (one entry per micro-batch; :func:`step` clears and reads them)."""

    def __init__(self, model: Transformer, layers: range, first: bool, last: bool, aux_grad: bool = True):
        super().__init__()
        self.cfg, self.layer_ids, self.first, self.last = model.cfg, layers, first, last
        self.aux_grad = aux_grad  # False only for the test that shows the aux gradient matters
        self.embed = model.embed if first else None
        self.blocks = nn.ModuleDict({str(i): model.blocks[i] for i in layers})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.rotary = model.rotary
        self.grad_checkpointing = model.grad_checkpointing
        self.records: list[dict] = []
        self.loss_scale = 1.0  # fp16's loss scale (set by step): the aux loss's gradient is scaled alike

    @property
    def moe_layers(self) -> list[nn.Module]:
        return [b.ffn for b in self.blocks.values() if b.is_moe]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T = x.shape[:2]
        pos_BT = torch.arange(T, device=x.device).expand(B, T)
        cos, sin = self.rotary(pos_BT)
        if self.first:
            x = self.embed(x)
        aux = x.new_zeros((), dtype=torch.float32)
        counts, dropped = [], []
        for block in self.blocks.values():
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, stats = checkpoint(block, x, cos, sin, pos_BT, None, None, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, pos_BT)
            if "aux_loss" in stats:
                aux = aux + stats["aux_loss"].float()
            if "counts" in stats:
                counts.append(stats["counts"])
                dropped.append(stats["dropped"])
        if self.training:
            self.records.append({"aux": aux.detach(), "counts": torch.stack(counts).float() if counts else None,
                                 "dropped": torch.stack(dropped) if dropped else None})
        if self.aux_grad and aux.requires_grad:
            x = _AuxGrad.apply(x, aux * self.loss_scale if self.loss_scale != 1.0 else aux)
        if self.last:
            x = self.lm_head(self.norm(x))
        return x

    @torch.no_grad()
    def update_expert_bias(self, counts_LE: torch.Tensor) -> None:
        """The balancing updates of this stage's MoE layers (``Transformer.update_expert_bias``)."""
        for m, c in zip(self.moe_layers, counts_LE):
            m.update_balance(c)


def split_stages(model: Transformer, pp_rank: int, pp_size: int, virtual: int = 1,
                 aux_grad: bool = True) -> list[Stage]:
    """This rank's stages: ``virtual`` of them (stage indices ``pp_rank + k * pp_size``, the looped
    layout the interleaved schedule expects) out of ``pp_size * virtual`` contiguous ranges.
    Raises a one-line :class:`UserError` (before any collective) when there are more stages than
    layers or the embeddings are tied across stages."""
    n = pp_size * virtual
    ranges = stage_layers(model.cfg.n_layers, n)
    if not 0 <= pp_rank < pp_size:
        raise UserError(f"pipeline rank {pp_rank} outside 0..{pp_size - 1}")
    if n > 1 and model.cfg.tie_embeddings:
        raise UserError("pipeline parallelism needs untied embeddings (tie_embeddings=False)")
    return [Stage(model, ranges[s], first=s == 0, last=s == n - 1, aux_grad=aux_grad)
            for s in range(pp_rank, n, pp_size)]


def split_model(model: Transformer, pp_rank: int, pp_size: int, aux_grad: bool = True) -> Stage:
    """This rank's one stage of a ``pp_size``-stage pipeline (see :func:`split_stages`)."""
    return split_stages(model, pp_rank, pp_size, 1, aux_grad)[0]


def ce_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The cross-entropy of ``Transformer.forward`` (fp32, ``-100`` ignored): the schedule's loss."""
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)


@dataclass
class Pipe:
    """A pipeline: this rank's stages, the pipeline process group, the schedule's name and loss.
    The torch schedule is built by :func:`step` for the micro-batch shape it meets (and rebuilt
    when the shape changes), with every stage's input and output shapes given up front: PipelineStage's
    dynamic mode would otherwise run one extra forward and backward on uninitialised tensors to
    learn them (and that forward would route garbage through the MoE)."""
    stages: list[Stage]
    group: dist.ProcessGroup
    n_microbatches: int
    schedule_name: str
    loss_fn: object
    schedule: object = None
    shape: tuple | None = None
    loss_scale: float = 1.0  # fp16's loss scale for the step (:func:`step` sets it)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The schedule's loss: ``loss_fn`` times the loss scale (what the backward starts from)."""
        loss = self.loss_fn(logits, targets)
        return loss * self.loss_scale if self.loss_scale != 1.0 else loss

    @property
    def first(self) -> bool:
        return any(s.first for s in self.stages)

    @property
    def last(self) -> bool:
        return any(s.last for s in self.stages)

    def parameters(self):
        for s in self.stages:
            yield from s.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """This rank's part of the full model's state dict (the full model's names)."""
        out = {}
        for s in self.stages:
            out.update(s.state_dict())
        return out

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, split_params=(), split_group=None) -> torch.Tensor:
        """``torch.nn.utils.clip_grad_norm_`` over the whole model (:func:`tinyseek.train.distributed.clip_grad_norm_`
        with the pipeline group as ``norm_group``): this rank's stages' squared gradient norm (DTensor
        gradients of FSDP2 or tensor parallelism made whole over their mesh; expert parallelism's
        ``split_params`` summed over ``split_group``) summed over the pipeline group, so every rank
        scales by the same factor and returns the same global norm (non-finite when any gradient
        is: the caller skips the step, as the trainer does)."""
        return clip_grad_norm_(list(self.parameters()), max_norm, split_params, split_group, norm_group=self.group)

    def update_expert_bias(self, counts: list[torch.Tensor | None]) -> None:
        """Apply :func:`step`'s ``counts`` (one entry per local stage) to the local MoE layers."""
        for s, c in zip(self.stages, counts):
            if c is not None:
                s.update_expert_bias(c)

    def build(self, shape: tuple[int, int]) -> None:
        """The torch schedule for micro-batches of ``shape`` (b, T)."""
        import torch.distributed.pipelining as pipelining  # noqa: PLC0415 (heavy: see SCHEDULES)
        b, T = shape
        size, rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        p = next(self.stages[0].parameters())
        cfg = self.stages[0].cfg
        hidden = torch.empty(b, T, cfg.d_model, dtype=p.dtype, device="meta", requires_grad=True)
        tokens = torch.empty(b, T, dtype=torch.long, device="meta")
        logits = torch.empty(b, T, cfg.vocab_size, dtype=p.dtype, device="meta", requires_grad=True)
        wrapped = [pipelining.PipelineStage(s, rank + k * size, size * len(self.stages), p.device,
                                            input_args=tokens if s.first else hidden,
                                            output_args=logits if s.last else hidden, group=self.group)
                   for k, s in enumerate(self.stages)]
        cls = getattr(pipelining, SCHEDULES[self.schedule_name])
        many = self.schedule_name == "interleaved1f1b"
        self.schedule = cls(wrapped if many else wrapped[0], self.n_microbatches, loss_fn=self._loss,
                            scale_grads=True)
        self.shape = shape


def build_schedule(stages: Stage | list[Stage], group, n_microbatches: int, schedule: str = "1f1b",
                   loss_fn=ce_loss) -> Pipe:
    """This rank's stage(s) with the named schedule (:data:`SCHEDULES`) over the pipeline's process
    group (or a DeviceMesh with a ``"pp"`` dimension, or a 1-D mesh). ``loss_fn(logits, targets)``
    is per micro-batch and a mean (gradients are scaled by ``1 / n_microbatches``).
    ``"interleaved1f1b"`` needs two or more stages per rank (``split_stages(..., virtual=2)``);
    the others exactly one. Checks only (no collective); the torch schedule is built by
    :func:`step`."""
    stages = [stages] if isinstance(stages, Stage) else list(stages)
    if schedule not in SCHEDULES:
        raise UserError(f"unknown pipeline schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if (schedule == "interleaved1f1b") != (len(stages) > 1):
        raise UserError(f"schedule {schedule!r} with {len(stages)} stages per rank: interleaved1f1b needs "
                        "virtual >= 2, gpipe and 1f1b one stage per rank")
    if n_microbatches < 1:
        raise UserError(f"n_microbatches must be >= 1, got {n_microbatches}")
    if hasattr(group, "mesh_dim_names"):  # a DeviceMesh
        names = group.mesh_dim_names or ()
        group = group["pp"].get_group() if "pp" in names else group.get_group()
    return Pipe(stages, group, n_microbatches, schedule, loss_fn)


def _ready(pipe: Pipe, x: torch.Tensor) -> None:
    """Build (or rebuild) the torch schedule for ``x``'s micro-batch shape."""
    B, T = x.shape
    n = pipe.n_microbatches
    if B % n:
        raise UserError(f"batch of {B} rows does not split into {n} micro-batches")
    if pipe.shape != (B // n, T):
        pipe.build((B // n, T))


def step(pipe: Pipe, x: torch.Tensor, y: torch.Tensor, loss_scale: float = 1.0) -> dict:
    """One forward/backward of the pipeline's batch ``(x, y)`` (every rank of the pipeline passes
    the same batch; it is cut into ``n_microbatches`` along dim 0), gradients accumulated in
    ``.grad`` -- times ``loss_scale`` (fp16's dynamic loss scale, the same on every rank: the
    cross-entropy and every stage's balance loss are scaled before their backward, as
    ``scaler.scale(loss).backward()`` does; the returned losses are unscaled). Returns, on every
    rank, the keys of ``pretrain.forward_backward``: the step's global
    ``loss`` = ``ce_loss + aux_loss`` (means over micro-batches; ``aux_loss`` summed over every
    stage's MoE layers), and ``counts`` / ``dropped``: per local stage, summed over micro-batches,
    (n_moe_layers_of_stage, E) or None."""
    n = pipe.n_microbatches
    _ready(pipe, x)
    pipe.loss_scale = float(loss_scale)
    for s in pipe.stages:
        s.records.clear()
        s.loss_scale = pipe.loss_scale
    losses: list[torch.Tensor] = []
    args = (x,) if pipe.first else ()
    pipe.schedule.step(*args, target=y if pipe.last else None, losses=losses if pipe.last else None,
                       return_outputs=False)
    for s in pipe.stages:
        if len(s.records) != n:
            raise RuntimeError(f"stage recorded {len(s.records)} forwards for {n} micro-batches")
    ce = torch.stack([t.detach().float() for t in losses]).mean() / pipe.loss_scale if losses else torch.zeros(())
    aux = sum((r["aux"] for s in pipe.stages for r in s.records), torch.zeros(())) / n
    both = torch.stack([ce, aux])
    dist.all_reduce(both, group=pipe.group)  # ce lives on the last stage, aux on every stage
    counts, dropped = [], []
    for s in pipe.stages:
        c = [r["counts"] for r in s.records]
        d = [r["dropped"] for r in s.records]
        counts.append(torch.stack(c).sum(0) if c[0] is not None else None)
        dropped.append(torch.stack(d).sum(0) if d[0] is not None else None)
    return {"loss": both[0] + both[1], "ce_loss": both[0], "aux_loss": both[1], "counts": counts,
            "dropped": dropped}


@torch.no_grad()
def evaluate(pipe: Pipe, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The held-out cross-entropy of the batch ``(x, y)`` (mean over micro-batches, which is the
    batch's mean: every micro-batch has the same number of targets) on every rank, forward only,
    the stages in eval mode (as ``pretrain``'s held-out loss: ``ce_loss``, no balance loss)."""
    _ready(pipe, x)
    was = [s.training for s in pipe.stages]
    for s in pipe.stages:
        s.eval()
    losses: list[torch.Tensor] = []
    try:
        pipe.schedule.eval(*((x,) if pipe.first else ()), target=y if pipe.last else None,
                           losses=losses if pipe.last else None)
    finally:
        for s, w in zip(pipe.stages, was):
            s.train(w)
    ce = torch.stack([t.float() for t in losses]).mean() if losses else torch.zeros(())
    dist.all_reduce(ce, group=pipe.group)  # from the last stage to every rank
    return ce
