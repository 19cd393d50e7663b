"""Data parallelism for the trainers: torchrun setup, DDP / FSDP2 wrapping, gradient compression
hooks, and measured communication accounting.

Under a device mesh (``tinyseek/train/mesh.py``) the same wrappers take the data-parallel part of
the mesh (``dp_mesh``): DDP all-reduces, and FSDP2 shards, over those ranks only.

Run any trainer under ``python -m torch.distributed.run --nproc_per_node=N`` (``torchrun``):
:func:`init_distributed` reads ``RANK`` / ``LOCAL_RANK`` / ``WORLD_SIZE``, starts gloo on CPU
(the only backend of the CPU torch build) or NCCL on CUDA; a world of one starts no process group
and every helper here becomes a no-op.

:func:`wrap_model` returns ``(wrapped, CommStats)``:

- ``mode="ddp"``: ``DistributedDataParallel`` with one gradient communication hook:

  ===================  ====================================================================
  ``none``             plain fp32 all-reduce (our hook, so its bytes are counted too)
  ``fp16``             torch ``fp16_compress_hook`` (cast bucket to fp16, all-reduce, cast back)
  ``bf16``             our :func:`bf16_compress_hook`: torch's own ``bf16_compress_hook`` is
                       documented for NCCL only and refuses gloo; gloo all-reduces bf16 fine
  ``powersgd``         torch ``powerSGD_hook`` (Vogels et al. 2019) with rank ``powersgd_rank``
  ``powersgd_fp16``    ``fp16_compress_wrapper(powerSGD_hook)``: P and Q travel as fp16
  ===================  ====================================================================

  PowerSGD keeps the replicas identical because every rank decompresses the same all-reduced
  P and Q (the random start of Q is drawn from a seed every rank shares, warm start reuses the
  all-reduced Q); error feedback keeps each rank's own residual locally (it is what makes the
  low-rank approximation converge) and never touches the parameters directly. Error feedback and
  warm start need ``start_powerSGD_iter >= 2`` (the first two steps are plain all-reduces while
  DDP rebuilds its buckets), so the first ``powersgd_start`` steps are uncompressed. After a
  bucket comes back non-finite (a NaN batch the trainer skips) its PowerSGD memory is dropped,
  else error feedback would carry the NaN into every later step.

  Where PowerSGD is weak for MoE: torch's hook views every weight as ``shape[0] x rest``, so a
  stacked expert tensor ``(E, D, 2F)`` becomes an ``E x 2DF`` matrix: for small E it is not
  worth compressing (sent whole), for large E the rank-r factor is shared *across* experts.

- ``mode="fsdp"``: FSDP2 (``torch.distributed.fsdp.fully_shard``) on every transformer block,
  then on the root (HSDP when given a 2-D ``(replicate, shard)`` mesh). Gradient compression there is the 16-bit variant only: ``fp16`` / ``bf16``
  set ``MixedPrecisionPolicy(reduce_dtype=...)`` so gradients are reduce-scattered in 16 bits;
  ``powersgd*`` is a DDP communication hook and raises :class:`ConfigError` with FSDP.

Communication accounting (the compression ratio is measured, not assumed). ``bytes`` is the
number of bytes this rank sends over the wire, modelled as the ring algorithm does it: an
all-reduce of an N-byte tensor sends ``2 (W-1)/W * N`` bytes per rank, an all-gather or
reduce-scatter of an N-byte (unsharded) tensor ``(W-1)/W * N``. ``raw_bytes`` is what a plain
fp32 all-reduce of the same gradients would have sent. For DDP every tensor that any hook
actually hands to ``all_reduce`` is counted (torch's hooks are observed through a counting proxy
of ``torch.distributed`` installed in their modules; ours count directly), so PowerSGD is
charged for its P and Q matrices, the 1-D and too-small tensors it sends uncompressed, and the
plain all-reduces of its first steps. For FSDP2 the bytes are an *estimate* from parameter
sizes: each forward of a sharded unit all-gathers its parameters (again in backward when the unit
reshards after forward, i.e. every unit but the root), and each backward that syncs gradients
reduce-scatters them in the reduce dtype (evaluation forwards are charged their all-gathers too).

Checkpoints: :func:`full_state_dict` and :func:`optim_state_dict` give the same (plain,
unsharded, integer-keyed optimizer) format under every mode, so runs resume across modes. The
PowerSGD hook state (error feedback, warm-start P and Q, step counter, RNG) is per rank:
:func:`comm_state_dict` / :func:`load_comm_state_dict` save and restore it per parameter, so it
survives DDP's bucket rebuild and a resumed PowerSGD run matches the uninterrupted one exactly.

Deviation from plain DDP worth knowing: MoE ``expert_bias`` buffers are updated from local
token counts; trainers should :func:`all_reduce_sum_` the counts before
``model.update_expert_bias`` so every rank applies the same update (DDP also re-broadcasts
buffers from rank 0 each forward; FSDP2 does not).
"""
from __future__ import annotations

import contextlib
import os
import threading
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch
import torch.distributed as tdist
import torch.nn as nn
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook as psgd
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from tinyseek.common import numpy_state_from_plain, numpy_state_to_plain
from tinyseek.config import ConfigError
from tinyseek.train.powersgd_state import LayoutTracker

MODES = ("ddp", "fsdp", "none")
COMPRESSIONS = ("none", "powersgd", "fp16", "bf16", "powersgd_fp16")


# ---------------------------------------------------------------------------------------------
# process group
# ---------------------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0                   # global rank (RANK)
    local_rank: int = 0             # rank on this machine (LOCAL_RANK); picks the CUDA device
    world_size: int = 1             # number of processes (WORLD_SIZE)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # this rank's device
    is_main: bool = True            # rank == 0: logs, checkpoints, prints
    backend: str | None = None      # "gloo" / "nccl"; None when no process group was started

    @property
    def enabled(self) -> bool:
        """True when a process group is running (world size > 1)."""
        return self.world_size > 1


def is_distributed_env() -> bool:
    """True when launched by torchrun with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, str(default))
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(f"environment variable {name} must be an integer, got {raw!r}") from None


def env_world_size() -> int:
    """``WORLD_SIZE`` of the torchrun environment (1 when not launched by torchrun)."""
    return _env_int("WORLD_SIZE", 1)


def init_distributed(device: str | torch.device = "auto", timeout_s: float = 600.0) -> Dist:
    """Read the torchrun environment and start the process group (gloo on CPU, NCCL on CUDA).

    ``device``: ``auto`` (CUDA if available, else CPU), ``cpu``, ``cuda``. On CUDA each rank uses
    ``cuda:LOCAL_RANK``. A world of one starts no process group.
    """
    rank, local_rank, world = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0), _env_int("WORLD_SIZE", 1)
    if world < 1 or not 0 <= rank < world:
        raise ConfigError(f"bad torchrun environment: RANK={rank} WORLD_SIZE={world}")
    name = str(device)
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(name)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device 'cuda' requested but CUDA is not available")
        if dev.index is None:
            if local_rank >= torch.cuda.device_count():
                raise ConfigError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices")
            dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    backend = None
    if world > 1:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if not tdist.is_available():
            raise ConfigError("torch.distributed is not available in this torch build")
        if not tdist.is_initialized():
            kw: dict[str, Any] = {}
            if backend == "nccl":
                kw["device_id"] = dev
            tdist.init_process_group(backend=backend, rank=rank, world_size=world,
                                     timeout=timedelta(seconds=timeout_s), **kw)
    return Dist(rank=rank, local_rank=local_rank, world_size=world, device=dev, is_main=rank == 0,
                backend=backend)


def cleanup(dist: Dist | None = None) -> None:
    """Destroy the process group if one is running (safe to call twice)."""
    _set_active_stats(None)
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def barrier(dist: Dist) -> None:
    if dist.enabled:
        tdist.barrier()


def all_reduce_sum_(t: torch.Tensor, dist: Dist, group=None) -> torch.Tensor:
    """Sum ``t`` over the ranks of ``group`` (default: all) in place (no-op for a world of one); returns ``t``."""
    if dist.enabled:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
    return t


def all_reduce_mean_(t: torch.Tensor, dist: Dist, group=None) -> torch.Tensor:
    """Average ``t`` over the ranks of ``group`` (default: all) in place (no-op for a world of one); returns ``t``."""
    if dist.enabled:
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM, group=group)
        t.div_(tdist.get_world_size(group))
    return t


def broadcast_object(obj: Any, dist: Dist, src: int = 0) -> Any:
    """Send a picklable object from ``src`` to every rank (identity for a world of one)."""
    if not dist.enabled:
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=src)
    return box[0]


# ---------------------------------------------------------------------------------------------
# communication accounting
# ---------------------------------------------------------------------------------------------
def ring_bytes(kind: str, nbytes: int, world: int) -> int:
    """Bytes one rank sends for a collective over an ``nbytes`` (full, unsharded) tensor.

    >>> ring_bytes("all_reduce", 1000, 2), ring_bytes("all_reduce", 1000, 4)
    (1000, 1500)
    >>> ring_bytes("all_gather", 1000, 4), ring_bytes("reduce_scatter", 1000, 1)
    (750, 0)
    """
    if world <= 1:
        return 0
    factor = {"all_reduce": 2, "all_gather": 1, "reduce_scatter": 1}[kind]
    return factor * (world - 1) * nbytes // world


class CommStats:
    """Thread-safe counters of bytes sent (and the plain-fp32 all-reduce equivalent).

    Hook callbacks may run on the backend's worker threads, hence the lock.
    """

    def __init__(self, world_size: int = 1, mode: str = "none", compression: str = "none"):
        self.world_size = world_size
        self.mode = mode
        self.compression = compression
        self._lock = threading.Lock()
        self._bytes = 0
        self._raw = 0
        self.total_bytes = 0
        self.total_raw_bytes = 0
        self.sync = True  # FSDP estimate: does the current backward reduce gradients?

    def add(self, sent: int = 0, raw: int = 0) -> None:
        with self._lock:
            self._bytes += int(sent)
            self._raw += int(raw)
            self.total_bytes += int(sent)
            self.total_raw_bytes += int(raw)

    def add_collective(self, kind: str, tensor: torch.Tensor) -> None:
        self.add(sent=ring_bytes(kind, tensor.numel() * tensor.element_size(), self.world_size))

    def take(self) -> dict:
        """Bytes sent since the last call and the uncompressed fp32 equivalent; resets both.

        ``ratio`` = bytes / raw_bytes (0.0 when nothing was reduced).
        """
        with self._lock:
            b, r = self._bytes, self._raw
            self._bytes = self._raw = 0
        return {"bytes": b, "raw_bytes": r, "ratio": (b / r) if r else 0.0}


_ACTIVE: CommStats | None = None  # the stats torch's hooks report into (one wrapped model a process)


def _set_active_stats(stats: CommStats | None) -> None:
    global _ACTIVE
    _ACTIVE = stats


class _CountingDist:
    """Stand-in for the ``torch.distributed`` module inside torch's DDP hook modules: every
    ``all_reduce`` is counted into the active :class:`CommStats`, everything else is forwarded."""

    def __init__(self, real):
        self._real = real

    def all_reduce(self, tensor, *args, **kwargs):
        stats = _ACTIVE
        if stats is not None:
            stats.add_collective("all_reduce", tensor)
        return self._real.all_reduce(tensor, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._real, name)


def _install_counting_proxy() -> None:
    """Route torch's default and PowerSGD hooks' collectives through :class:`_CountingDist`."""
    for mod in (default_hooks, psgd):
        if not isinstance(getattr(mod, "dist", None), _CountingDist):
            mod.dist = _CountingDist(tdist)


# ---------------------------------------------------------------------------------------------
# DDP communication hooks
# ---------------------------------------------------------------------------------------------
def _plain_allreduce_hook(state: Any, bucket) -> torch.futures.Future:
    """fp32 all-reduce average (what DDP does without a hook), counted; ``state`` is the process
    group (None: the whole world), as for torch's default hooks."""
    buf = bucket.buffer()
    world = tdist.get_world_size(state)
    buf.div_(world)
    stats = _ACTIVE
    if stats is not None:
        stats.add_collective("all_reduce", buf)
    fut = tdist.all_reduce(buf, group=state, async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])


def bf16_compress_hook(state: Any, bucket) -> torch.futures.Future:
    """Cast the gradient bucket to bf16, all-reduce (gloo and NCCL both do bf16), average, copy back.

    Divides before the reduction like torch's fp16 hook (keeps the sum in range). ``state`` is
    the process group (None: the whole world).
    """
    buf = bucket.buffer()
    world = tdist.get_world_size(state)
    low = buf.to(torch.bfloat16).div_(world)
    stats = _ACTIVE
    if stats is not None:
        stats.add_collective("all_reduce", low)
    fut = tdist.all_reduce(low, group=state, async_op=True).get_future()

    def decompress(f):
        buf.copy_(f.value()[0])
        return buf

    return fut.then(decompress)


def _drop_nonfinite_powersgd_state(state: Any, idx: int) -> None:
    """Forget a bucket's PowerSGD memory once it holds inf/NaN (a skipped non-finite step).

    Without this, error feedback and warm start carry one bad step's NaN into every later step and
    training never recovers. P and Q are all-reduced, hence identical on every rank, so every rank
    drops them together and re-draws Q from the shared seed; the error is local and dropped locally.
    """
    p, q = state.p_memory_dict.get(idx), state.q_memory_dict.get(idx)
    if (p is not None and not torch.isfinite(p).all()) or (q is not None and not torch.isfinite(q).all()):
        state.p_memory_dict.pop(idx, None)
        state.q_memory_dict.pop(idx, None)
    err = state.error_dict.get(idx)
    if err is not None and not torch.isfinite(err).all():
        state.error_dict.pop(idx, None)


def _counting_wrapper(hook: Callable, stats: CommStats, tracker: LayoutTracker | None = None) -> Callable:
    """Count the raw fp32 bytes of every bucket handed to ``hook`` (the sent bytes are counted at
    the all-reduce itself); for PowerSGD (``tracker`` given) also keep its state aligned with the
    bucket's parameter order and drop non-finite compression memory afterwards."""

    def wrapped(state, bucket):
        buf = bucket.buffer()
        stats.add(raw=ring_bytes("all_reduce", buf.numel() * 4, stats.world_size))
        if tracker is not None:
            tracker.before_hook(bucket)
        fut = hook(state, bucket)
        if tracker is None:  # not PowerSGD: no compression memory to sanitise
            return fut
        idx = bucket.index()

        def sanitize(f):
            _drop_nonfinite_powersgd_state(state, idx)
            return f.value()

        return fut.then(sanitize)

    wrapped.__name__ = f"counted_{getattr(hook, '__name__', 'hook')}"
    return wrapped


def _ddp_hook(compression: str, powersgd_rank: int, powersgd_start: int, group=None) -> tuple[Any, Callable]:
    """``(state, hook)`` for DDP's ``register_comm_hook``; ``group`` is the data-parallel process
    group (None: the whole world)."""
    def powersgd_state():
        return psgd.PowerSGDState(process_group=group, matrix_approximation_rank=powersgd_rank,
                                  start_powerSGD_iter=powersgd_start, use_error_feedback=True,
                                  warm_start=True, random_seed=0)

    if compression == "none":
        return group, _plain_allreduce_hook
    if compression == "fp16":
        return group, default_hooks.fp16_compress_hook
    if compression == "bf16":
        return group, bf16_compress_hook
    if compression == "powersgd":
        return powersgd_state(), psgd.powerSGD_hook
    if compression == "powersgd_fp16":
        return powersgd_state(), default_hooks.fp16_compress_wrapper(psgd.powerSGD_hook)
    raise ConfigError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")


# ---------------------------------------------------------------------------------------------
# wrapping
# ---------------------------------------------------------------------------------------------
def _check(mode: str, compression: str, powersgd_rank: int, powersgd_start: int) -> None:
    if mode not in MODES:
        raise ConfigError(f"unknown parallel mode {mode!r}; choose one of {', '.join(MODES)}")
    if compression not in COMPRESSIONS:
        raise ConfigError(f"unknown compression {compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if powersgd_rank < 1:
        raise ConfigError(f"powersgd_rank must be >= 1, got {powersgd_rank}")
    if powersgd_start < 2:
        raise ConfigError(f"powersgd_start must be >= 2 (error feedback and warm start need it), got {powersgd_start}")
    if mode == "fsdp" and compression.startswith("powersgd"):
        raise ConfigError(f"compression {compression!r} is a DDP communication hook; with mode 'fsdp' "
                          "use compression none, fp16 or bf16 (16-bit reduce-scatter)")


def wrap_model(model: nn.Module, dist: Dist, mode: str = "ddp", compression: str = "none",
               powersgd_rank: int = 2, powersgd_start: int = 2, dp_mesh: DeviceMesh | None = None,
               local_params: tuple[str, ...] = ()) -> tuple[nn.Module, CommStats]:
    """Wrap ``model`` (already on ``dist.device``) for data parallelism; returns (wrapped, stats).

    ``dp_mesh``: the data-parallel part of a device mesh (``tinyseek.train.mesh``) when the world
    holds more than one replica group: ``mode="ddp"`` takes a 1-D mesh (DDP over its group),
    ``mode="fsdp"`` a 1-D mesh (FSDP2) or a 2-D ``(replicate, shard)`` mesh (HSDP: FSDP2 shards
    over the second dim and all-reduces over the first). None: the whole world, as before.
    ``local_params``: names of parameters the wrapper leaves alone (each rank holds its own, e.g.
    expert parallelism's experts; the caller averages their gradients): DDP ignores them, FSDP2
    neither shards nor reduces them (``ignored_params``).

    A world of one (or a ``dp_mesh`` of one rank) returns ``model`` itself (no communication;
    stats stay at zero). A world larger than one with ``mode="none"`` is a ConfigError (ranks
    would silently drift apart).
    """
    _check(mode, compression, powersgd_rank, powersgd_start)
    replicas = dp_mesh.size() if dp_mesh is not None else dist.world_size
    stats = CommStats(replicas, mode, compression)
    if not dist.enabled or replicas == 1:
        return model, stats
    if mode == "none":
        raise ConfigError(f"parallel mode 'none' with {dist.world_size} processes would train "
                          "unsynchronised replicas; use 'ddp' or 'fsdp'")
    _set_active_stats(stats)
    if mode == "ddp":
        if dp_mesh is not None and dp_mesh.ndim != 1:
            raise ConfigError(f"DDP needs a 1-D data-parallel mesh, got {dp_mesh.ndim} dims")
        group = dp_mesh.get_group() if dp_mesh is not None else None
        if local_params:
            DDP._set_params_and_buffers_to_ignore_for_model(model, list(local_params))
        return _wrap_ddp(model, dist, compression, powersgd_rank, powersgd_start, stats, group), stats
    named = dict(model.named_parameters())
    missing = [n for n in local_params if n not in named]
    if missing:
        raise ConfigError(f"rank-local parameters not in the model: {', '.join(missing[:3])}")
    return _wrap_fsdp(model, dist, compression, stats, dp_mesh, {named[n] for n in local_params}), stats


def _wrap_ddp(model, dist, compression, powersgd_rank, powersgd_start, stats, group=None):
    kw: dict[str, Any] = {}
    if dist.device.type == "cuda":
        kw.update(device_ids=[dist.device.index], output_device=dist.device.index)
    if group is not None:
        kw["process_group"] = group
    ddp = DDP(model, **kw)
    _install_counting_proxy()
    state, hook = _ddp_hook(compression, powersgd_rank, powersgd_start, group)
    tracker = None
    if state is not None and hasattr(state, "error_dict"):
        tracker = LayoutTracker(state, {id(p): n for n, p in model.named_parameters()})
    ddp.register_comm_hook(state, _counting_wrapper(hook, stats, tracker))
    ddp._tinyseek_comm_tracker = tracker  # for comm_state_dict / load_comm_state_dict
    return ddp


def _fsdp_units(model: nn.Module) -> list[nn.Module]:
    """Modules sharded one by one before the root: the transformer blocks (a pipeline stage keeps
    its blocks in a ModuleDict keyed by layer index)."""
    blocks = getattr(model, "blocks", None)
    if isinstance(blocks, nn.ModuleDict):
        return list(blocks.values())
    return list(blocks) if isinstance(blocks, nn.ModuleList) else []


def _wrap_fsdp(model, dist, compression, stats, dp_mesh=None, ignored: set | None = None):
    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    except ImportError:  # torch < 2.6 kept FSDP2 under _composable
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy, fully_shard  # type: ignore

    reduce_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(compression)
    mp = MixedPrecisionPolicy(reduce_dtype=reduce_dtype)
    mesh = dp_mesh if dp_mesh is not None else init_device_mesh(dist.device.type, (dist.world_size,))
    shard, replicate = mesh.shape[-1], (mesh.shape[0] if mesh.ndim == 2 else 1)
    units = _fsdp_units(model)
    ignored = ignored or set()
    skip = {id(p) for p in ignored}
    extra = {"ignored_params": ignored} if ignored else {}  # (torch >= 2.7: kept out of the call otherwise)
    for unit in units:
        _count_fsdp_unit(unit, stats, reshard=True, reduce_dtype=reduce_dtype, exclude=skip, shard=shard,
                         replicate=replicate)
        fully_shard(unit, mesh=mesh, reshard_after_forward=True, mp_policy=mp, **extra)
    unit_params = {id(p) for u in units for p in u.parameters()} | skip
    _count_fsdp_unit(model, stats, reshard=False, reduce_dtype=reduce_dtype, exclude=unit_params, shard=shard,
                     replicate=replicate)
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp, **extra)
    return model


def _count_fsdp_unit(unit: nn.Module, stats: CommStats, reshard: bool, reduce_dtype, exclude,
                     shard: int, replicate: int = 1) -> None:
    """Forward pre-hook that charges the estimated collectives of one FSDP2 unit per forward.

    Sizes are taken now, before sharding, from the unit's own (not nested units') parameters.
    Gathers and reduce-scatters run over the ``shard`` ranks; under HSDP (``replicate`` > 1) each
    rank also all-reduces its gradient shard over the ``replicate`` ranks.
    """
    params = [p for p in unit.parameters() if id(p) not in exclude]
    numel = sum(p.numel() for p in params)
    train_numel = sum(p.numel() for p in params if p.requires_grad)
    psize = params[0].element_size() if params else 4
    rsize = torch.tensor([], dtype=reduce_dtype).element_size() if reduce_dtype is not None else psize
    w = shard

    def pre_hook(module, args):
        if _in_backward():
            return  # activation-checkpoint recompute: the backward gather is charged already
        sent = ring_bytes("all_gather", numel * psize, w)
        raw = 0
        if torch.is_grad_enabled():
            if reshard:
                sent += ring_bytes("all_gather", numel * psize, w)  # re-gather for backward
            if stats.sync:
                sent += ring_bytes("reduce_scatter", train_numel * rsize, w)
                sent += ring_bytes("all_reduce", train_numel * rsize // w, replicate)
                raw = ring_bytes("all_reduce", train_numel * 4, stats.world_size)
        stats.add(sent=sent, raw=raw)

    unit.register_forward_pre_hook(pre_hook)


def _in_backward() -> bool:
    """True while autograd runs a backward pass (e.g. a checkpointed block recomputing)."""
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def unwrap(wrapped: nn.Module) -> nn.Module:
    """The underlying model (DDP keeps it in ``.module``; FSDP2 shards in place)."""
    return getattr(wrapped, "module", wrapped) if _is_ddp(wrapped) else wrapped


def _is_ddp(m: nn.Module) -> bool:
    return isinstance(m, DDP)


@contextlib.contextmanager
def no_sync(wrapped: nn.Module, mode: str) -> Iterator[None]:
    """Skip gradient communication for grad-accumulation micro-steps (no-op when not wrapped)."""
    if _is_ddp(wrapped):
        with wrapped.no_sync():
            yield
        return
    if mode == "fsdp" and hasattr(wrapped, "set_requires_gradient_sync"):
        stats = _ACTIVE
        wrapped.set_requires_gradient_sync(False)
        if stats is not None:
            stats.sync = False
        try:
            yield
        finally:
            wrapped.set_requires_gradient_sync(True)
            if stats is not None:
                stats.sync = True
        return
    yield


def clip_grad_norm_(params, max_norm: float, split_params=(), split_group=None, norm_group=None) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` (2-norm) that also takes a mix of DTensor and plain
    parameters or DTensors on several meshes, as tensor parallelism leaves them (replicated modules
    stay plain; FSDP2 over them puts the TP'd ones on a larger mesh), parameters split over ranks
    (``split_params``, e.g. expert parallelism's local experts: every rank of ``split_group`` holds
    different ones), and a model cut over ranks (``norm_group``: a pipeline group, each rank holding
    other layers): the norm is the global one (:func:`grad_norm_sq`), every gradient is scaled by
    ``min(1, max_norm / (norm + 1e-6))``, and the norm comes back as a plain tensor. All-plain or
    all-DTensor parameters with nothing split or cut go to torch's function unchanged (a DTensor
    norm then)."""
    params = [p for p in params if p.grad is not None]
    split_ids = {id(p) for p in split_params}
    if norm_group is None and not split_ids and len({_grad_kind(p, split_ids) for p in params}) <= 1:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    total = grad_norm_sq(params, split_params, split_group, norm_group).sqrt()
    plain = [p for p in params if not isinstance(p.grad, DTensor)]
    for group in [plain] + [[p for p in params if isinstance(p.grad, DTensor) and p.grad.device_mesh == m]
                            for m in {p.grad.device_mesh for p in params if isinstance(p.grad, DTensor)}]:
        if group:
            torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def _grad_kind(p: torch.Tensor, split_ids: set):
    return "split" if id(p) in split_ids else p.grad.device_mesh if isinstance(p.grad, DTensor) else "plain"


def grad_norm_sq(params, split_params=(), split_group=None, norm_group=None) -> torch.Tensor:
    """The squared global 2-norm of the gradients of ``params`` as a plain fp32 scalar, the same on
    every rank: a DTensor gradient counts as its full tensor (each shard once), ``split_params``'
    squares are summed over ``split_group``, and the whole sum over ``norm_group`` (ranks holding
    disjoint parts of the model, e.g. pipeline stages). Collectives over those groups only."""
    split_ids = {id(p) for p in split_params}
    kinds: dict[Any, list] = {}  # "split", "plain", or the DeviceMesh of a DTensor gradient
    for p in params:
        if p.grad is not None:
            kinds.setdefault(_grad_kind(p, split_ids), []).append(p)
    sq = torch.zeros((), dtype=torch.float32)
    for key, group in kinds.items():
        n = torch.nn.utils.get_total_norm([p.grad for p in group], 2.0)
        n = (n.full_tensor() if isinstance(n, DTensor) else n).float() ** 2
        if key == "split" and split_group is not None and tdist.is_initialized():
            tdist.all_reduce(n, group=split_group)
        sq = sq.to(n.device) + n
    if norm_group is not None and tdist.is_initialized():
        tdist.all_reduce(sq, group=norm_group)
    return sq


def all_reduce_grads_mean_(params, group, stats: CommStats | None = None) -> None:
    """Average the gradients of ``params`` over ``group`` (parameters no wrapper reduces: expert
    parallelism's experts over their replicas, pipeline stages over theirs), counted into
    ``stats``; nothing when ``group`` is None."""
    if group is None:
        return
    n = tdist.get_world_size(group)
    for p in params:
        if p.grad is not None:
            g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # a TP shard: its replicas
            tdist.all_reduce(g, group=group)
            g.div_(n)
            if stats is not None:
                nbytes = p.grad.numel() * p.grad.element_size()
                stats.add(sent=ring_bytes("all_reduce", nbytes, n), raw=ring_bytes("all_reduce", p.grad.numel() * 4, n))


def full_state_dict(wrapped: nn.Module) -> dict[str, torch.Tensor]:
    """Plain (unsharded, CPU-free of DTensor) state dict of the underlying model on every rank.

    FSDP2 parameters are DTensors: ``full_tensor()`` all-gathers them, so call this on all ranks.
    """
    sd = unwrap(wrapped).state_dict()
    out = {}
    for k, v in sd.items():
        if hasattr(v, "full_tensor"):
            v = v.full_tensor()
        out[k] = v.detach()
    return out


# ---------------------------------------------------------------------------------------------
# checkpoint helpers (same on-disk format for every mode)
# ---------------------------------------------------------------------------------------------
# Load model weights into the plain model *before* wrap_model; build the optimizer after
# wrapping (FSDP2 replaces parameters by DTensors) and restore it with load_optim_state_dict.
def _dcp_state_dict():
    """``torch.distributed.checkpoint.state_dict`` (FSDP2's full-state gathers; ~0.7 s to import),
    imported by a sharded run's first checkpoint, never by an unsharded one."""
    import torch.distributed.checkpoint.state_dict as dcp_sd
    return dcp_sd


def _param_index_to_fqn(wrapped: nn.Module, opt: torch.optim.Optimizer) -> list[str]:
    names = {id(p): n for n, p in unwrap(wrapped).named_parameters()}
    return [names[id(p)] for g in opt.param_groups for p in g["params"]]


def optim_state_dict(wrapped: nn.Module, opt: torch.optim.Optimizer, mode: str) -> dict:
    """Full optimizer state dict in the plain ``opt.state_dict()`` format (integer parameter ids),
    so a checkpoint written under FSDP2 loads in a single process or DDP and back.

    Under FSDP2 this gathers the sharded state: call it on every rank.
    """
    if mode != "fsdp" or not _is_fsdp(wrapped):
        return opt.state_dict()
    dcp_sd = _dcp_state_dict()
    sd = dcp_sd.get_optimizer_state_dict(wrapped, opt, options=dcp_sd.StateDictOptions(full_state_dict=True))
    fqns = _param_index_to_fqn(wrapped, opt)
    index = {f: i for i, f in enumerate(fqns)}
    state = {index[f]: {k: (v.detach().clone() if isinstance(v, torch.Tensor) else v) for k, v in s.items()}
             for f, s in sd["state"].items()}
    groups = [{**g, "params": [index[f] for f in g["params"]]} for g in sd["param_groups"]]
    return {"state": state, "param_groups": groups}


def load_optim_state_dict(wrapped: nn.Module, opt: torch.optim.Optimizer, sd: dict, mode: str) -> None:
    """Inverse of :func:`optim_state_dict` (every rank passes the full state dict)."""
    if mode != "fsdp" or not _is_fsdp(wrapped):
        opt.load_state_dict(sd)
        return
    dcp_sd = _dcp_state_dict()

    fqns = _param_index_to_fqn(wrapped, opt)
    if len(sd["param_groups"]) != len(opt.param_groups) or \
            sum(len(g["params"]) for g in sd["param_groups"]) != len(fqns):
        raise ConfigError("optimizer state does not match the model's parameter groups")
    full = {"state": {fqns[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [fqns[i] for i in g["params"]]} for g in sd["param_groups"]]}
    dcp_sd.set_optimizer_state_dict(wrapped, opt, full, options=dcp_sd.StateDictOptions(full_state_dict=True))


def comm_state_dict(wrapped: nn.Module) -> dict | None:
    """This rank's gradient-compression state, or None when the hook keeps none.

    For PowerSGD: error feedback (local to each rank, so every rank saves its own), warm-start P
    and Q (per parameter, see :mod:`tinyseek.train.powersgd_state`), the step counter and the
    random generator that draws fresh Q (as plain lists), all on the CPU: tensors and plain values
    only, so ``torch.load(..., weights_only=True)`` reads it back.
    """
    tracker = getattr(wrapped, "_tinyseek_comm_tracker", None)
    if tracker is None:
        return None
    sd = tracker.state_dict()
    if isinstance(sd.get("rng"), tuple):  # numpy RandomState: plain lists, so comm.pt loads with weights_only=True
        sd["rng"] = numpy_state_to_plain(sd["rng"])
    return sd


def load_comm_state_dict(wrapped: nn.Module, sd: dict | None) -> bool:
    """Restore :func:`comm_state_dict` into a freshly wrapped model; returns whether it did.

    Nothing to restore (a checkpoint from a run without PowerSGD, or this run has none) leaves
    the hook's fresh state: it then restarts, which is correct but not bit-identical.
    """
    tracker = getattr(wrapped, "_tinyseek_comm_tracker", None)
    if sd is None or tracker is None or sd.get("kind") != "powersgd":
        return False
    tracker.load_state_dict({**sd, "rng": numpy_state_from_plain(sd["rng"])})
    return True


def _is_fsdp(m: nn.Module) -> bool:
    return hasattr(m, "set_requires_gradient_sync") and not _is_ddp(m)
