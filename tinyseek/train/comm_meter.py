"""Measured communication per parallel dimension: the bytes and the time of every collective and
point-to-point op one rank dispatches while a :class:`CommMeter` is active.

Use, on every rank, around one probed step (a collective is made synchronous on every rank, so all
ranks must meter the same step)::

    groups = dim_groups(mesh, spec, {"dp": dp_group, "ep": ep_group, "edp": edp_group})
    with CommMeter(groups) as meter:
        loss = model(x, y).loss
        loss.backward()
    meter.by_dim()  # {"dp": {"bytes": ..., "time_s": ..., "calls": ...}, "tp": {...}, ...}

What it sees. A ``TorchDispatchMode`` sees every op that goes through the dispatcher on a thread
where the mode is active: the ``c10d.*`` ops (``torch.distributed.all_reduce`` and friends, the
methods of ``ProcessGroup`` that FSDP2, DDP's Python comm hooks and ``torch.distributed.pipelining``
call) and the functional collectives ``_c10d_functional.*`` (DTensor's redistributions,
``all_to_all_single_autograd`` forward and backward: the autograd wrapper op redispatches to the
native one, which is what is seen, once). DTensor ops are handed back (``NotImplemented``, as
torch's ``CommDebugMode`` does), so DTensor desugars them first and the mode sees the plain
collectives underneath. The backward pass: on CPU autograd runs on the calling thread (checked:
DDP's comm-hook all-reduces and the backward all-to-alls are seen); on CUDA it runs on a device
worker thread, to which the autograd engine copies the caller's ``at::ThreadLocalState``, and that
state carries the dispatch-mode stack (``torch_dispatch_mode_state_``), so the mode sees those
collectives too (read in torch's source; not run on a GPU here). DDP's per-forward broadcast of
buffers (C++ ``broadcast_coalesced``) reaches ``ProcessGroup`` through the dispatcher and is seen
(so, presumably, is DDP's built-in C++ all-reduce when no Python hook is registered; tinyseek always
registers one). Not seen: traffic below the dispatcher (a backend's own sub-operations, NCCL's
internals), ops on threads the mode was not propagated to (a user-started thread), and
``torch.compile``-d or CUDA-graph regions. Ops of the c10d namespaces the table does not know are
counted in :attr:`CommMeter.unknown`.

Bytes (:func:`sent_bytes`): what this rank puts on the wire under ring algorithms, the convention of
:func:`tinyseek.train.distributed.ring_bytes`: an all-reduce of ``N`` bytes over ``W`` ranks sends
``2 (W-1)/W N``; all-gather and reduce-scatter ``(W-1)/W`` of the full (unsharded) ``N``;
broadcast and reduce ``(W-1)/W N`` (a pipelined chain, averaged over its ranks); all-to-all the rows
that leave this rank (from the input split sizes; equal splits when none are given); send its
bytes, recv 0; gather: a non-root sends its input; scatter: the root sends the other ranks' parts;
barriers 0. An op on a one-rank group sends nothing and is counted as a call with zero time.

Time: in the metered step each collective is made synchronous: the mode waits on its ``Work`` (the
functional ones: ``wait_tensor`` on the result) and, on CUDA, calls ``torch.cuda.synchronize()``
before and after, and adds the wall time to its dimension. It is *serialized* time: no overlap with
compute or with other collectives, and it includes waiting for the slowest rank of the group (load
imbalance). It is measured on a probed step and is an upper bound of the step's exposed
communication time, not what an unmetered (overlapped) step pays. Point-to-point ops are *not* made
synchronous (a send waited before the matching recv is posted deadlocks a ``batch_isend_irecv``):
their time runs from posting to the first op dispatched after their ``Work`` reports completion
(which, on gloo, is when the caller has waited on it), or to the meter's exit; it includes the
wait for the peer (pipeline bubbles), again an upper bound.

Cost (measured, micro model, 2 rows x 64 tokens, gloo on a shared 2-core CPU): a Python dispatch
mode intercepts every aten op, ~9 us each (714 ops a forward + backward: 6.4 ms alone -> 12.5 ms
with a do-nothing mode, 13.3 ms with this meter); in a 2-rank DDP run the metered step took 47 ms
against 21 ms (medians of 18), the rest being the serialized gradient all-reduce. Meter a probe step
every N steps (all ranks the same step), not every step; larger models pay relatively less (the
per-op cost is fixed, the ops are bigger). Not for CUDA-graph captured or compiled regions.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from tinyseek.train.mesh import DIMS, ParallelSpec

KINDS = ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "broadcast", "reduce", "gather",
         "scatter", "send", "recv", "barrier")
P2P = ("send", "recv")
OTHER = "other"  # the dimension of a group the caller's map does not name
# the dimensions a run reports, in order: the mesh's data, tensor and pipeline dims, expert parallelism's
# all-to-alls ("ep") and expert-gradient averages ("edp"), and anything else (loss / statistic all-reduces
# over groups no dimension names)
DIMS_REPORTED = ("dp", "dp_shard", "tp", "ep", "edp", "pp", OTHER)
_NAMESPACES = ("c10d", "_c10d_functional", "_c10d_functional_autograd", "_dtensor")


def sent_bytes(kind: str, nbytes: int, world: int, rank: int = 0, root: int = 0,
               splits: tuple[int, ...] | list[int] = ()) -> int:
    """Bytes one rank sends for an op of ``kind`` (one of :data:`KINDS`) over ``world`` ranks.

    ``nbytes``: the full tensor (all-reduce, broadcast, reduce), the gathered / pre-scatter whole
    (all-gather, reduce-scatter, scatter), this rank's input (all-to-all, gather, send). ``rank``
    and ``root``: group ranks; ``splits``: an all-to-all's input split sizes (rows per peer).

    >>> sent_bytes("all_reduce", 1000, 4), sent_bytes("all_gather", 1000, 4), sent_bytes("reduce_scatter", 1000, 2)
    (1500, 750, 500)
    >>> sent_bytes("all_to_all", 100, 2, rank=0, splits=[3, 7]), sent_bytes("all_to_all", 100, 4)
    (70, 75)
    >>> sent_bytes("send", 64, 2), sent_bytes("recv", 64, 2), sent_bytes("barrier", 0, 8)
    (64, 0, 0)
    >>> sent_bytes("gather", 10, 4, rank=1, root=0), sent_bytes("gather", 10, 4, rank=0, root=0)
    (10, 0)
    >>> sent_bytes("scatter", 400, 4, rank=0, root=0), sent_bytes("scatter", 400, 4, rank=2, root=0)
    (300, 0)
    >>> sent_bytes("all_reduce", 1000, 1)
    0
    """
    if kind not in KINDS:
        raise ValueError(f"unknown op kind {kind!r}; one of {', '.join(KINDS)}")
    if world <= 1 or kind in ("recv", "barrier"):
        return 0
    if kind == "send":
        return nbytes
    if kind == "all_reduce":
        return 2 * (world - 1) * nbytes // world
    if kind == "all_to_all":
        if not splits:
            return (world - 1) * nbytes // world
        rows = sum(splits)
        return 0 if rows == 0 else (rows - splits[rank]) * nbytes // rows
    if kind == "gather":
        return 0 if rank == root else nbytes
    if kind == "scatter":
        return (world - 1) * nbytes // world if rank == root else 0
    return (world - 1) * nbytes // world  # all_gather, reduce_scatter, broadcast, reduce


def _nb(t: Any) -> int:
    """Bytes of a tensor or of a (nested) list of tensors."""
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    return sum(_nb(x) for x in t)


@dataclass(frozen=True)
class OpSpec:
    """How to read one op: its kind, the index of its group argument, and ``size(args, world, rank)``
    -> ``(nbytes, root, splits)`` in :func:`sent_bytes`' terms."""
    kind: str
    group_arg: int
    size: Callable[[tuple, int, int], tuple[int, int, tuple[int, ...]]]


def _plain(i: int, times_world: bool = False):
    return lambda a, w, r: (_nb(a[i]) * (w if times_world else 1), 0, ())


def _a2a_list(a: tuple, w: int, r: int) -> tuple[int, int, tuple[int, ...]]:
    sizes = tuple(_nb(t) for t in a[1])  # alltoall_(outputs, inputs): one input tensor per peer
    return sum(sizes), 0, sizes


# op name (``str(func.overloadpacket)`` less nothing: "c10d.allreduce_") -> how to read it
OPS: dict[str, OpSpec] = {
    "c10d.allreduce_": OpSpec("all_reduce", 1, _plain(0)),
    "c10d.allreduce_coalesced_": OpSpec("all_reduce", 1, _plain(0)),
    "c10d._allgather_base_": OpSpec("all_gather", 2, _plain(0)),
    "c10d.allgather_": OpSpec("all_gather", 2, _plain(0)),
    "c10d.allgather_coalesced_": OpSpec("all_gather", 2, _plain(0)),
    "c10d.allgather_into_tensor_coalesced_": OpSpec("all_gather", 2, _plain(0)),
    "c10d._reduce_scatter_base_": OpSpec("reduce_scatter", 2, _plain(1)),
    "c10d.reduce_scatter_": OpSpec("reduce_scatter", 2, _plain(1)),
    "c10d.reduce_scatter_tensor_coalesced_": OpSpec("reduce_scatter", 2, _plain(1)),
    "c10d.alltoall_base_": OpSpec("all_to_all", 2, lambda a, w, r: (_nb(a[1]), 0, tuple(a[4]))),
    "c10d.alltoall_": OpSpec("all_to_all", 2, _a2a_list),
    "c10d.broadcast_": OpSpec("broadcast", 1, lambda a, w, r: (_nb(a[0]), a[2], ())),
    "c10d.reduce_": OpSpec("reduce", 1, lambda a, w, r: (_nb(a[0]), a[3], ())),
    "c10d.gather_": OpSpec("gather", 2, lambda a, w, r: (_nb(a[1]), a[3], ())),
    "c10d.scatter_": OpSpec("scatter", 2, lambda a, w, r: (_nb(a[1]), a[3], ())),
    "c10d.send": OpSpec("send", 1, _plain(0)),
    "c10d.recv_": OpSpec("recv", 1, _plain(0)),
    "c10d.recv_any_source_": OpSpec("recv", 1, _plain(0)),
    "c10d.barrier": OpSpec("barrier", 1, lambda a, w, r: (0, 0, ())),
    "c10d.monitored_barrier_": OpSpec("barrier", 1, lambda a, w, r: (0, 0, ())),
    "_c10d_functional.all_reduce": OpSpec("all_reduce", 2, _plain(0)),
    "_c10d_functional.all_reduce_": OpSpec("all_reduce", 2, _plain(0)),
    "_c10d_functional.all_reduce_coalesced": OpSpec("all_reduce", 2, _plain(0)),
    "_c10d_functional.all_reduce_coalesced_": OpSpec("all_reduce", 2, _plain(0)),
    "_c10d_functional.all_gather_into_tensor": OpSpec("all_gather", 2, _plain(0, times_world=True)),
    "_c10d_functional.all_gather_into_tensor_out": OpSpec("all_gather", 2, _plain(0, times_world=True)),
    "_c10d_functional.all_gather_into_tensor_coalesced": OpSpec("all_gather", 2, _plain(0, times_world=True)),
    "_c10d_functional.reduce_scatter_tensor": OpSpec("reduce_scatter", 3, _plain(0)),
    "_c10d_functional.reduce_scatter_tensor_out": OpSpec("reduce_scatter", 3, _plain(0)),
    "_c10d_functional.reduce_scatter_tensor_coalesced": OpSpec("reduce_scatter", 3, _plain(0)),
    "_c10d_functional.all_to_all_single": OpSpec("all_to_all", 3, lambda a, w, r: (_nb(a[0]), 0, tuple(a[2]))),
    "_c10d_functional.broadcast": OpSpec("broadcast", 2, lambda a, w, r: (_nb(a[0]), a[1], ())),
    "_c10d_functional.broadcast_": OpSpec("broadcast", 2, lambda a, w, r: (_nb(a[0]), a[1], ())),
    "_c10d_functional.isend": OpSpec("send", 3, _plain(0)),
    "_c10d_functional.irecv": OpSpec("recv", 3, _plain(0)),
}
# not communication themselves (the work they wait on was counted where it was issued)
_QUIET = {"_c10d_functional.wait_tensor", "_c10d_functional._wrap_tensor_autograd"}


def op_sent_bytes(op: str, args: tuple, world: int, rank: int) -> tuple[str, int]:
    """``(kind, bytes this rank sends)`` for op ``op`` (a key of :data:`OPS`) called with ``args``
    on a group of ``world`` ranks where this one is ``rank``. Pure: no process group is touched.

    >>> t = torch.zeros(10)  # 40 bytes
    >>> op_sent_bytes("c10d.allreduce_", ([t], None), 2, 0)
    ('all_reduce', 40)
    >>> op_sent_bytes("_c10d_functional.all_gather_into_tensor", (t, 4, "g"), 4, 1)
    ('all_gather', 120)
    """
    spec = OPS[op]
    nbytes, root, splits = spec.size(args, world, rank)
    return spec.kind, sent_bytes(spec.kind, nbytes, world, rank, root, splits)


def group_name(group: Any) -> str:
    """The name of a process group (a ``ProcessGroup``, its boxed ``ScriptObject`` or a name)."""
    if isinstance(group, str):
        return group
    if isinstance(group, torch.ScriptObject):
        group = dist.ProcessGroup.unbox(group)
    return group.group_name


def _resolve(group: Any) -> Any:
    """A ``ProcessGroup`` from what an op carries: a boxed ScriptObject, a group or a group name."""
    if isinstance(group, str):
        return torch._C._distributed_c10d._resolve_process_group(group)
    if isinstance(group, torch.ScriptObject):
        return dist.ProcessGroup.unbox(group)
    return group


def dim_groups(mesh: DeviceMesh, spec: ParallelSpec, extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """``{group name: dimension}`` for :class:`CommMeter`: the group of each of ``mesh``'s dims
    (``pp``, ``dp``, ``dp_shard``, ``tp``; size-1 dims included), then ``extra``'s groups
    (``{"ep": ep_group, "edp": expert_dp_group, "dp": dp_group}``; ``None`` entries skipped). A
    group already named by a mesh dim keeps that name (e.g. ``dp_group`` is ``mesh["dp"]``'s group).
    Every rank builds its own map (the groups are this rank's)."""
    if tuple(mesh.mesh.shape) != spec.shape:
        raise ValueError(f"the mesh {tuple(mesh.mesh.shape)} was not built from --parallel {spec}")
    out: dict[str, str] = {}
    for d in DIMS:
        out.setdefault(group_name(mesh[d].get_group()), d)
    for d, g in (extra or {}).items():
        if g is not None:
            out.setdefault(group_name(g), d)
    return out


@dataclass(frozen=True)
class CommRecord:
    """One metered op: its dimension, op name and kind, the group's size, the bytes this rank sent,
    its (serialized) time, and whether it ran inside a backward pass."""
    dim: str
    op: str
    kind: str
    world: int
    bytes: int
    time_s: float
    backward: bool


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _work_of(out: Any) -> Any:
    """The ``Work`` a c10d op returned (alone, or second in a ``(tensors, work)`` pair), or None."""
    if isinstance(out, tuple) and len(out) == 2:
        out = out[1]
    return out if isinstance(out, torch.ScriptObject) else None


def _device(args: tuple) -> torch.device | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a.device
        if isinstance(a, (list, tuple)) and a:
            d = _device(tuple(a))
            if d is not None:
                return d
    return None


class CommMeter(TorchDispatchMode):
    """Records every collective and P2P op dispatched on this rank while active (the module
    docstring says what it sees, how bytes and time are counted). ``groups``: ``{process group or
    group name: dimension}`` (:func:`dim_groups`); ops on other groups go to ``"other"``.

    Guarantees: ``by_dim()`` holds exactly the dimensions that had a metered op; a dimension's
    ``bytes`` is the sum of :func:`sent_bytes` over its ops, ``time_s`` > 0 for every dimension
    with an op on a group of more than one rank and 0 where all its ops were on one-rank groups.
    Thread-safe (a backward on another thread records too). Re-entrant use is not supported:
    one meter, one ``with`` block at a time; :meth:`reset` clears it for the next probe.
    """

    def __init__(self, groups: Mapping[Any, str] | None = None):
        super().__init__()
        self.supports_higher_order_operators = True
        self.groups = {group_name(g): d for g, d in (groups or {}).items()}
        self.records: list[CommRecord] = []
        self.unknown: dict[str, int] = {}  # ops of the c10d namespaces the table does not know -> calls
        self._pending: list[tuple[float, Any, str, str, str, int, int, bool]] = []  # posted P2P ops
        self._lock = threading.Lock()

    # -- results ---------------------------------------------------------------------------
    def by_dim(self) -> dict[str, dict[str, Any]]:
        """``{dimension: {"bytes": int, "time_s": float, "calls": int}}`` over the records."""
        out: dict[str, dict[str, Any]] = {}
        with self._lock:
            for r in self.records:
                d = out.setdefault(r.dim, {"bytes": 0, "time_s": 0.0, "calls": 0})
                d["bytes"] += r.bytes
                d["time_s"] += r.time_s
                d["calls"] += 1
        return out

    def metrics(self, prefix: str = "comm/") -> dict[str, float]:
        """:meth:`by_dim` flattened for a metrics line: ``comm/<dim>/bytes``, ``.../time_s``, ``.../calls``."""
        return {f"{prefix}{d}/{k}": v for d, row in sorted(self.by_dim().items()) for k, v in row.items()}

    def reset(self) -> None:
        with self._lock:
            self.records.clear()
            self.unknown.clear()
            self._pending.clear()

    # -- the mode --------------------------------------------------------------------------
    def __exit__(self, *exc):
        try:
            self._flush(wait=exc[0] is None)
        finally:
            out = super().__exit__(*exc)
        return out

    def _add(self, rec: CommRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def _flush(self, wait: bool = False) -> None:
        """Record the posted P2P ops whose Work has completed (all of them, waiting, when ``wait``)."""
        if not self._pending:
            return
        with self._lock:
            pending, self._pending = self._pending, []
        keep = []
        for item in pending:
            t0, work, dim, op, kind, world, nbytes, bw = item
            w = torch._C._distributed_c10d.Work.unbox(work) if isinstance(work, torch.ScriptObject) else work
            if wait and w is not None:
                w.wait()
            if w is None or w.is_completed():
                self._add(CommRecord(dim, op, kind, world, nbytes, time.perf_counter() - t0, bw))
            else:
                keep.append(item)
        if keep:
            with self._lock:
                self._pending = keep + self._pending

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if isinstance(func, torch._ops.HigherOrderOperator):
            return func(*args, **kwargs)
        if any(issubclass(t, DTensor) for t in types):
            return NotImplemented  # let DTensor desugar into plain collectives first
        if self._pending:
            self._flush()
        if func.namespace not in _NAMESPACES:
            return func(*args, **kwargs)
        op = str(func.overloadpacket)
        spec = OPS.get(op)
        if spec is None:
            if op not in _QUIET:
                with self._lock:
                    self.unknown[op] = self.unknown.get(op, 0) + 1
            return func(*args, **kwargs)
        group = args[spec.group_arg] if len(args) > spec.group_arg else \
            kwargs.get("group_name", kwargs.get("process_group"))
        pg = _resolve(group) if group is not None else None
        if pg is None:  # no group to read: counted as unknown, run as is
            with self._lock:
                self.unknown[op] = self.unknown.get(op, 0) + 1
            return func(*args, **kwargs)
        world, rank = pg.size(), pg.rank()
        dim = self.groups.get(pg.group_name, OTHER)
        kind, nbytes = op_sent_bytes(op, args, world, rank)
        bw = _in_backward()
        if world <= 1:
            out = func(*args, **kwargs)
            self._add(CommRecord(dim, op, kind, world, 0, 0.0, bw))
            return out
        if kind in P2P:  # not made synchronous (see the module docstring)
            t0 = time.perf_counter()
            out = func(*args, **kwargs)
            with self._lock:
                self._pending.append((t0, _work_of(out) if func.namespace == "c10d" else None,
                                      dim, op, kind, world, nbytes, bw))
            return out
        cuda = (_device(args) or torch.device("cpu")).type == "cuda"
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = func(*args, **kwargs)
        if func.namespace == "c10d":
            work = _work_of(out)
            if work is not None:
                work.wait()
        else:  # functional: the result is registered with its Work; waiting twice is a no-op
            for t in (out if isinstance(out, (list, tuple)) else [out]):
                torch.ops._c10d_functional.wait_tensor(t)
        if cuda:
            torch.cuda.synchronize()
        self._add(CommRecord(dim, op, kind, world, nbytes, time.perf_counter() - t0, bw))
        return out
