"""The device mesh of a parallel run: which rank holds which slice of the model and of the data.

``--parallel dp=2,dp_shard=1,tp=2,pp=1,ep=2`` names five sizes (missing ones are 1):

=============  =======================================================================================
``pp``         pipeline stages (consecutive blocks per stage; ``torch.distributed.pipelining``)
``dp``         replicated data parallelism (DDP; HSDP's replicate dimension when ``dp_shard`` > 1 too)
``dp_shard``   sharded data parallelism (FSDP2 ``fully_shard`` over this dimension)
``tp``         tensor parallelism inside a layer (DTensor over attention heads and FFN widths)
``ep``         expert parallelism: routed experts split over ``ep`` ranks *carved from the data-parallel
               ranks* (``dp * dp_shard``), so it does not multiply the world size
=============  =======================================================================================

Rank layout (the contract every parallel piece shares): the world is the row-major grid
``(pp, dp, dp_shard, tp)`` -- ``rank = ((pp_i * dp + dp_i) * dp_shard + shard_i) * tp + tp_i`` --
which is exactly what :func:`build_mesh` hands to ``init_device_mesh`` (dims named ``"pp"``, ``"dp"``,
``"dp_shard"``, ``"tp"``, size-1 dims included). ``tp`` is innermost, so a tensor-parallel group is
made of neighbouring ranks (one node's fast links on a GPU cluster). The data-parallel coordinate is
``dp_i * dp_shard + shard_i`` out of ``dp * dp_shard``: ranks that differ only in ``tp`` or ``pp``
read the same batch. An EP group is a block of ``ep`` consecutive data-parallel coordinates with the
same ``pp`` and ``tp`` coordinates (inside one ``dp_shard`` group first, when ``ep`` divides it).

Every check of a layout (:meth:`ParallelSpec.validate`) is pure arithmetic on the world size and the
model config and raises a one-line :class:`ConfigError` before any collective could hang; the
trainer runs it when ``WORLD_SIZE`` is known from the environment (its ``Config.validate``) and
again after the process group has started.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as tdist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from tinyseek.config import ConfigError, ModelConfig

DIMS = ("pp", "dp", "dp_shard", "tp")  # mesh dims, outermost first (the rank layout above)
KEYS = ("dp", "dp_shard", "tp", "pp", "ep")  # what --parallel accepts


@dataclass(frozen=True)
class ParallelSpec:
    dp: int = 1        # replicated data-parallel degree (DDP / HSDP replicate)
    dp_shard: int = 1  # sharded data-parallel degree (FSDP2)
    tp: int = 1        # tensor-parallel degree
    pp: int = 1        # pipeline stages
    ep: int = 1        # expert-parallel degree, carved from dp * dp_shard

    @property
    def world_size(self) -> int:
        """Processes this layout needs: ``pp * dp * dp_shard * tp`` (``ep`` reuses data-parallel ranks).

        >>> ParallelSpec(dp=2, tp=2, ep=2).world_size
        4
        """
        return self.pp * self.dp * self.dp_shard * self.tp

    @property
    def dp_world(self) -> int:
        """Data-parallel replicas of the batch: ``dp * dp_shard`` (the loader's world)."""
        return self.dp * self.dp_shard

    @property
    def shape(self) -> tuple[int, int, int, int]:
        """Mesh shape in :data:`DIMS` order."""
        return (self.pp, self.dp, self.dp_shard, self.tp)

    def coords(self, rank: int) -> dict[str, int]:
        """This rank's index along every mesh dim.

        >>> ParallelSpec(dp=2, tp=2).coords(3)
        {'pp': 0, 'dp': 1, 'dp_shard': 0, 'tp': 1}
        """
        out, r = {}, rank
        for name, size in reversed(list(zip(DIMS, self.shape))):
            out[name], r = r % size, r // size
        return {d: out[d] for d in DIMS}

    def rank_of(self, pp: int = 0, dp: int = 0, dp_shard: int = 0, tp: int = 0) -> int:
        """Inverse of :meth:`coords`."""
        return ((pp * self.dp + dp) * self.dp_shard + dp_shard) * self.tp + tp

    def dp_rank(self, rank: int) -> int:
        """Data-parallel coordinate of ``rank`` in ``[0, dp_world)``: the loader's rank.

        >>> [ParallelSpec(dp=2, tp=2).dp_rank(r) for r in range(4)]
        [0, 0, 1, 1]
        """
        c = self.coords(rank)
        return c["dp"] * self.dp_shard + c["dp_shard"]

    def dp_groups(self) -> list[list[int]]:
        """Rank lists of the data-parallel groups (same ``pp`` and ``tp``; the gradient reductions).

        >>> ParallelSpec(dp=2, tp=2).dp_groups()
        [[0, 2], [1, 3]]
        """
        return [[self.rank_of(p, d // self.dp_shard, d % self.dp_shard, t) for d in range(self.dp_world)]
                for p in range(self.pp) for t in range(self.tp)]

    def ep_groups(self) -> list[list[int]]:
        """Rank lists of the expert-parallel groups: each data-parallel group cut into blocks of
        ``ep`` consecutive data-parallel coordinates.

        >>> ParallelSpec(dp=4, ep=2).ep_groups()
        [[0, 1], [2, 3]]
        >>> ParallelSpec(dp=2, tp=2, ep=2).ep_groups()
        [[0, 2], [1, 3]]
        """
        return [g[i:i + self.ep] for g in self.dp_groups() for i in range(0, len(g), self.ep)]

    def edp_groups(self) -> list[list[int]]:
        """Rank lists of the expert-data-parallel groups: the ranks holding the same experts (the
        same position in their EP group), over which expert gradients are averaged.

        >>> ParallelSpec(dp=4, ep=2).edp_groups()
        [[0, 2], [1, 3]]
        """
        return [g[j::self.ep] for g in self.dp_groups() for j in range(self.ep)]

    def __str__(self) -> str:
        """The ``--parallel`` text of this layout (every key, so a log line is unambiguous).

        >>> str(ParallelSpec(dp=2))
        'dp=2,dp_shard=1,tp=1,pp=1,ep=1'
        """
        return ",".join(f"{k}={getattr(self, k)}" for k in KEYS)

    def validate(self, world_size: int, model_cfg: ModelConfig) -> "ParallelSpec":
        """Check the layout against the world size and the model; returns ``self``.

        Raises a one-line :class:`ConfigError` naming the numbers when ``pp * dp * dp_shard * tp``
        differs from ``world_size``; when ``tp`` does not divide the query heads (and, for GQA, the
        key/value heads), the dense FFN width (if the model has a dense block) or the shared-expert
        width (if it has one); when ``ep > 1`` on a dense model, or ``ep`` does not divide the routed
        experts or ``dp * dp_shard``; when ``pp`` exceeds the number of layers. Routed experts are
        not split by ``tp`` (that is what ``ep`` is for), so ``moe_d_ff`` is not checked.
        """
        m = model_cfg
        for k in KEYS:
            if getattr(self, k) < 1:
                raise ConfigError(f"--parallel {k} must be >= 1, got {getattr(self, k)}")
        if self.world_size != world_size:
            raise ConfigError(f"--parallel {self} needs pp*dp*dp_shard*tp = {self.pp}*{self.dp}*{self.dp_shard}*"
                              f"{self.tp} = {self.world_size} processes, but the world has {world_size}")
        if self.tp > 1:
            for name, n in tp_widths(m):
                if n % self.tp:
                    raise ConfigError(f"--parallel tp={self.tp} does not divide {name} = {n}")
        if self.ep > 1:
            if not m.is_moe:
                raise ConfigError(f"--parallel ep={self.ep} needs a MoE model (model.n_routed_experts = "
                                  f"{m.n_routed_experts}, n_layers = {m.n_layers}, n_dense_layers = {m.n_dense_layers})")
            if m.n_routed_experts % self.ep:
                raise ConfigError(f"--parallel ep={self.ep} does not divide model.n_routed_experts = {m.n_routed_experts}")
            if self.dp_world % self.ep:
                raise ConfigError(f"--parallel ep={self.ep} must divide dp*dp_shard = {self.dp}*{self.dp_shard} = "
                                  f"{self.dp_world} (experts are split over data-parallel ranks)")
        if self.pp > m.n_layers:
            raise ConfigError(f"--parallel pp={self.pp} exceeds model.n_layers = {m.n_layers} (at least one block a stage)")
        return self


def tp_widths(m: ModelConfig) -> list[tuple[str, int]]:
    """``(name, size)`` of every width tensor parallelism splits (``tinyseek/train/tp.py``): the query
    heads, GQA's key/value heads, the dense FFN width (if the model has a dense block) and the
    shared expert's width (if it has one); ``tp`` must divide each.

    >>> from tinyseek.config import model_micro
    >>> [n for n, _ in tp_widths(model_micro())]
    ['model.n_heads', 'model.d_ff', "the shared expert's width (model.shared_d_ff or n_shared_experts * moe_d_ff)"]
    """
    widths = [("model.n_heads", m.n_heads)]
    if m.attn == "gqa":
        widths.append(("model.n_kv_heads", m.n_kv_heads))
    if m.n_dense_layers > 0 or not m.is_moe:
        widths.append(("model.d_ff", m.d_ff))
    if m.is_moe and m.shared_width:
        widths.append(("the shared expert's width (model.shared_d_ff or n_shared_experts * moe_d_ff)", m.shared_width))
    return widths


def parse_parallel(text: str) -> ParallelSpec:
    """``"dp=2,tp=2"`` -> ``ParallelSpec(dp=2, tp=2)``; missing keys are 1, ``""`` is all ones.

    Unknown keys, repeated keys, non-integers and sizes below 1 raise a one-line ConfigError.

    >>> parse_parallel(" dp=2 , tp=2 ")
    ParallelSpec(dp=2, dp_shard=1, tp=2, pp=1, ep=1)
    >>> parse_parallel("tp=0")
    Traceback (most recent call last):
    ...
    tinyseek.config.ConfigError: --parallel tp must be a positive integer, got '0'
    """
    vals: dict[str, int] = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, raw = (s.strip() for s in item.partition("="))
        if not eq or key not in KEYS:
            raise ConfigError(f"--parallel: {item!r} is not one of {', '.join(k + '=N' for k in KEYS)}")
        if key in vals:
            raise ConfigError(f"--parallel: {key} is given twice")
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"--parallel {key} must be a positive integer, got {raw!r}")
        vals[key] = int(raw)
    return ParallelSpec(**vals)


def resolve(text: str, world_size: int, dist_mode: str = "ddp") -> ParallelSpec:
    """The layout a run uses: ``--parallel`` when given, else plain data parallelism over the whole
    world as ``--dist-mode`` says (``ddp`` -> ``dp=world``, ``fsdp`` -> ``dp_shard=world``).

    >>> resolve("", 4, "fsdp")
    ParallelSpec(dp=1, dp_shard=4, tp=1, pp=1, ep=1)
    """
    if text.strip():
        return parse_parallel(text)
    return ParallelSpec(dp_shard=world_size) if dist_mode == "fsdp" else ParallelSpec(dp=world_size)


def build_mesh(spec: ParallelSpec, device_type: str) -> DeviceMesh:
    """The 4-D DeviceMesh ``(pp, dp, dp_shard, tp)`` of ``spec`` (size-1 dims included), e.g.
    ``mesh["tp"]`` for ``parallelize_module``, ``mesh["dp", "dp_shard"]`` for HSDP.

    Needs the default process group (``distributed.init_distributed``) over ``spec.world_size``
    ranks; every rank must call it. Check the spec with :meth:`ParallelSpec.validate` first: a
    mismatch raises here with the same one-line message instead of inside torch.
    """
    if not tdist.is_initialized():
        raise ConfigError("build_mesh needs a running process group (start the run under torchrun)")
    if tdist.get_world_size() != spec.world_size:
        raise ConfigError(f"--parallel {spec} needs {spec.world_size} processes, but the world has "
                          f"{tdist.get_world_size()}")
    return init_device_mesh(device_type, spec.shape, mesh_dim_names=DIMS)


def _check_mesh(mesh: DeviceMesh, spec: ParallelSpec) -> None:
    if tuple(mesh.mesh.shape) != spec.shape:
        raise ConfigError(f"the mesh {tuple(mesh.mesh.shape)} was not built from --parallel {spec} {spec.shape}")


def _my_group(groups: list[list[int]]):
    """Create one process group per rank list (every rank creates all of them, in the same order, as
    ``new_group`` requires) and return the one holding this rank."""
    me, mine = tdist.get_rank(), None
    for ranks in groups:
        g = tdist.new_group(ranks)
        if me in ranks:
            mine = g
    return mine


def dp_group(mesh: DeviceMesh, spec: ParallelSpec):
    """This rank's data-parallel process group (``dp * dp_shard`` ranks with its ``pp`` and ``tp``
    coordinates): where losses and expert counts of replicas are reduced. The whole world when the
    layout is plain data parallelism; otherwise a collective to set up (every rank calls it once)."""
    _check_mesh(mesh, spec)
    if spec.dp_world == spec.world_size:
        return tdist.group.WORLD
    return _my_group(spec.dp_groups())


def ep_group(mesh: DeviceMesh, spec: ParallelSpec):
    """This rank's expert-parallel process group (see :meth:`ParallelSpec.ep_groups`), or None when
    ``spec.ep == 1``. A collective to set up: every rank calls it, once, after :func:`build_mesh`."""
    _check_mesh(mesh, spec)
    if spec.ep == 1:
        return None
    return _my_group(spec.ep_groups())


def expert_dp_group(mesh: DeviceMesh, spec: ParallelSpec):
    """This rank's expert-data-parallel process group (see :meth:`ParallelSpec.edp_groups`), or None
    when there is nothing to average (``ep == 1`` or ``ep == dp * dp_shard``). A collective to set up."""
    _check_mesh(mesh, spec)
    if spec.ep == 1 or spec.ep == spec.dp_world:
        return None
    return _my_group(spec.edp_groups())

