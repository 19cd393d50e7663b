"""The training state through ``torch.distributed.checkpoint`` (DCP): every rank writes its own
shards into one directory, and a checkpoint saved under one parallel layout loads under any other
(DCP reshards by global shape and offset).

What is saved, :func:`train_state` (flattened by DCP into keys such as ``model.embed.weight`` and
``optim.state.embed.weight.exp_avg``)::

    {"model": {fqn: Tensor | DTensor},                      # parameters and persistent buffers
     "optim": {"state": {fqn: {"step": ..., "exp_avg": ..., "exp_avg_sq": ...}}}}

Keys are the one-process model's names whatever the layout: DDP's ``module.`` is stripped
(``get_model_state_dict``), FSDP2 and tensor parallelism give DTensors (global shapes), a pipeline
:class:`~tinyseek.train.pp.Stage` gives its own parameters and buffers only (the full model's names;
the stale copies of other stages' blocks never appear), and expert parallelism's local expert
slices (plain ``(E/ep, ...)`` tensors, :mod:`tinyseek.train.ep`) and their optimizer moments are
presented as DTensors of global shape ``(E, ...)``: ``Shard(0)`` over the ``ep`` dim of one world
mesh ``(pp, edp, ep, tp)`` (:func:`expert_mesh`, the row-major rank layout of
:mod:`tinyseek.train.mesh` with the data-parallel coordinate cut into ``edp * ep``), replicated over
the others; DCP's planner writes each duplicate (edp replicas, tp copies) once.

The optimizer may be built over the full model while this rank trains one pipeline stage (as
``pretrain`` does): only the parameters of ``model`` are saved and loaded, and a parameter without
optimizer state (never stepped) simply has no entry. Only tensors are saved: ``param_groups``
(learning rate, betas, weight decay) are not, the run's config rebuilds them (the trainer sets the
learning rate every step), so nothing but torch's own metadata is pickled.

Loading (:func:`load`) builds this rank's target state in *its* layout (a fresh optimizer first gets
its state tensors from one AdamW step at learning rate 0 on zero gradients of this rank's
parameters, which leaves the parameters bit-identical), reads the checkpoint into it in place,
then writes it back: ``set_model_state_dict`` (so the kernel seams' load hooks re-select their
variants), the expert slices into EP's plain parameters and moments; the state of parameters that
have none in the checkpoint is dropped, so the optimizer holds exactly what was saved (AdamW
``step`` counts included) and a training step continues like the uninterrupted run.

Integrity. DCP's ``.metadata`` is a pickle written by torch, which torch's own reader loads with
plain ``pickle.load`` (a file written by someone else could run code). Every read here goes through
:class:`SafeReader` instead: its unpickler resolves only the classes DCP's metadata is made of
(:func:`_allowed`: the dataclasses of ``torch.distributed.checkpoint.metadata``, the file system
writer's ``_StorageInfo``, ``torch.Size``, dtypes, layouts, memory formats, paths) and refuses any
other global in one line, so a planted ``__reduce__`` payload never runs. (The shard files are
read by torch with ``torch.load(weights_only=True)``.) :func:`save` also
writes ``checksums.json`` (sha256 of every file of the directory, :func:`tinyseek.train.checkpoint.write_checksums`)
once DCP has finished, and every reader here requires it and checks each file against it
(``TINYSEEK_VERIFY``, :mod:`tinyseek.integrity`) before DCP opens anything. Checksums catch damage
(disk, copy, truncation), not tampering: only load checkpoints you or your runs wrote.
``TINYSEEK_VERIFY=off`` skips the comparison (not the presence check). Every failure to read a
checkpoint, a checkpoint whose tensors do not match the model (another config), or a missing
directory is a one-line :class:`~tinyseek.errors.UserError` naming the path; these checks read the
same files on every rank, so every rank raises the same error before any collective of
``dcp.load`` could hang.

Importing this module costs ~0.7 s (DCP): import it where a parallel run first checkpoints.
"""
from __future__ import annotations

import contextlib
import pickle
import warnings
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as tdist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import CheckpointException, FileSystemReader
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.metadata import Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from tinyseek.config import ModelConfig
from tinyseek.errors import UserError
from tinyseek.model.moe import MoE
from tinyseek.model.transformer import Transformer
from tinyseek.train.checkpoint import CHECKSUMS, damaged, verify_file, write_checksums
from tinyseek.train.distributed import unwrap
from tinyseek.train.ep import ExpertParallel
from tinyseek.train.mesh import ParallelSpec
from tinyseek.train.pp import Stage

MESH_DIMS = ("pp", "edp", "ep", "tp")  # expert_mesh's dims, outermost first
EXPERT_WEIGHTS = ("w_gate_up", "w_down")  # the stacked routed-expert tensors apply_ep splits on dim 0
_MESHES: dict[tuple, DeviceMesh] = {}  # (spec, device_type, world group) -> expert_mesh (building it is a collective)


# ---------------------------------------------------------------------------------------------
# this rank's state, in DCP's terms
# ---------------------------------------------------------------------------------------------
def expert_mesh(spec: ParallelSpec, device_type: str = "cpu") -> DeviceMesh:
    """The world DeviceMesh ``(pp, dp_world // ep, ep, tp)`` (dims :data:`MESH_DIMS`) on which expert
    slices become DTensors. Row-major like :mod:`tinyseek.train.mesh`'s ``(pp, dp, dp_shard, tp)``:
    the data-parallel coordinate ``d = edp * ep + ep_i`` and an EP group is ``ep`` consecutive
    data-parallel coordinates. A collective the first time (every rank calls it), cached after."""
    key = (spec, device_type, id(tdist.group.WORLD))
    if key not in _MESHES:
        if tdist.get_world_size() != spec.world_size:
            raise UserError(f"--parallel {spec} needs {spec.world_size} processes, but the world has "
                            f"{tdist.get_world_size()}")
        shape = (spec.pp, spec.dp_world // spec.ep, spec.ep, spec.tp)
        _MESHES[key] = init_device_mesh(device_type, shape, mesh_dim_names=MESH_DIMS)
    return _MESHES[key]


def _experts(module: nn.Module) -> dict[str, ExpertParallel]:
    """FQN -> EP group of every expert-parallel stacked expert weight of ``module``."""
    return {f"{name}.experts.{w}": m.load_scope for name, m in module.named_modules()
            if isinstance(m, MoE) and isinstance(m.load_scope, ExpertParallel) for w in EXPERT_WEIGHTS}


def _expert_mesh_for(experts: dict[str, ExpertParallel], spec: ParallelSpec | None, device_type: str
                     ) -> DeviceMesh | None:
    """:func:`expert_mesh` when the model has expert slices (checked against it), else None. Built
    on every rank of an ``ep > 1`` layout, those without experts too (a pipeline stage of dense
    layers): building it is a collective over the whole world."""
    if spec is not None and spec.ep > 1 and tdist.is_initialized():
        mesh = expert_mesh(spec, device_type)
    if not experts:
        return None
    if spec is None:
        raise UserError("the model is expert-parallel: pass the run's ParallelSpec (spec=) to checkpoint it")
    mesh = expert_mesh(spec, device_type)
    ep = next(iter(experts.values()))
    if ep.size != spec.ep or ep.rank != mesh.get_local_rank("ep"):
        raise UserError(f"the model's EP group (rank {ep.rank} of {ep.size}) does not follow --parallel {spec}'s "
                        "layout (tinyseek/train/mesh.py ep_groups): split the experts with mesh.ep_group")
    return mesh


def _global(t: torch.Tensor, mesh: DeviceMesh) -> DTensor:
    """A local expert slice as the DTensor of global shape ``(E, ...)`` (shares ``t``'s storage)."""
    return DTensor.from_local(t, mesh, [Replicate(), Replicate(), Shard(0), Replicate()], run_check=False)


def _param_names(module: nn.Module) -> dict[int, str]:
    """id(parameter) -> its FQN in ``module`` (a tied parameter: its first name)."""
    return {id(p): n for n, p in module.named_parameters()}


def train_state(model: nn.Module, opt: torch.optim.Optimizer | None = None, spec: ParallelSpec | None = None,
                device_type: str = "cpu") -> dict:
    """This rank's DCP-ready state ``{"model": {fqn: tensor}, "optim": {"state": {fqn: {name: tensor}}}}``
    (see the module docstring; ``"optim"`` absent without ``opt``). ``model`` is what this rank
    trains: a plain, DDP- or FSDP2-wrapped, tensor-parallel or expert-parallel model, or a pipeline
    ``Stage``. The tensors share storage with the parameters and the optimizer's state (DCP loads
    into them in place). ``spec`` (the run's layout) is needed when the model is expert-parallel;
    building its mesh is then a collective the first time (every rank calls this)."""
    module = unwrap(model)
    experts = _experts(module)
    mesh = _expert_mesh_for(experts, spec, device_type)
    msd = get_model_state_dict(model)
    for fqn in experts:
        msd[fqn] = _global(msd[fqn], mesh)
    out: dict = {"model": msd}
    if opt is not None:
        names = _param_names(module)
        state: dict[str, dict[str, torch.Tensor]] = {}
        for p, s in opt.state.items():
            fqn = names.get(id(p))
            if fqn is None or not s:  # another stage's parameter, or never stepped
                continue
            bad = [k for k, v in s.items() if not isinstance(v, torch.Tensor)]
            if bad:
                raise UserError(f"optimizer state {fqn}.{bad[0]} is not a tensor: dist_ckpt saves tensors only")
            state[fqn] = {k: (_global(v, mesh) if fqn in experts and v.dim() > 0 else v) for k, v in s.items()}
        out["optim"] = {"state": state}
    return out


def _distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized()


@contextlib.contextmanager
def _one_process_quiet() -> Iterator[None]:
    """Silence DCP's warning that a call without a process group runs in one process (that is meant)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _flat(state: dict, prefix: str = "") -> dict[str, torch.Tensor]:
    """DCP's flattened keys (nested dict keys joined by ``.``) -> tensor."""
    out = {}
    for k, v in state.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def save(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
         spec: ParallelSpec | None = None, device_type: str = "cpu") -> None:
    """Write :func:`train_state` to the directory ``path`` with ``dcp.save``: under a process group a
    collective (every rank calls it with the same ``path``, each writes its own shard files), else
    one process. Then rank 0 writes ``checksums.json`` and, under a process group, every rank waits
    for it (a barrier), so ``path`` is complete on return. ``path`` must be new or empty (a
    :class:`UserError` otherwise: stale shards of an earlier save would be mixed in). For an atomic
    checkpoint write into a temporary directory every rank agrees on and let rank 0 rename it."""
    path = Path(path)
    if path.is_dir() and any(path.iterdir()):
        raise UserError(f"DCP checkpoint directory {path} already holds files: save into a new or empty directory")
    state = train_state(model, opt, spec, device_type)
    distributed = _distributed()
    with _one_process_quiet():
        dcp.save(state, checkpoint_id=str(path), no_dist=not distributed)
    if not distributed or tdist.get_rank() == 0:
        write_checksums(path)
    if distributed:
        tdist.barrier()


_SAFE_GLOBALS = {("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("torch.serialization", "_get_layout"),
                 ("torch", "Size"), ("collections", "OrderedDict"), ("pathlib", "PosixPath"),
                 ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
                 ("pathlib", "Path")}


def _allowed(module: str, name: str) -> bool:
    """Whether DCP metadata may name the global ``module.name``: a class of DCP's metadata module,
    a torch dtype / layout / memory format, or one of :data:`_SAFE_GLOBALS`.

    >>> _allowed("torch.distributed.checkpoint.metadata", "Metadata"), _allowed("torch", "float32")
    (True, True)
    >>> _allowed("builtins", "eval"), _allowed("os", "system"), _allowed("torch", "load")
    (False, False, False)
    """
    if (module, name) in _SAFE_GLOBALS:
        return True
    if module == "torch.distributed.checkpoint.metadata":
        return isinstance(getattr(dcp_metadata, name, None), type)
    if module == "torch":
        return isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format))
    return False


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if not _allowed(module, name):
            raise pickle.UnpicklingError(f"refused global {module}.{name} (not part of DCP's metadata)")
        return super().find_class(module, name)


class SafeReader(FileSystemReader):
    """``FileSystemReader`` whose ``.metadata`` is unpickled with an allowlist (:func:`_allowed`)."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        path = (self._get_metadata_path(kwargs.get("rank")) if hasattr(self, "_get_metadata_path")
                else self.fs.concat_path(self.path, ".metadata"))  # (torch < 2.12 names it inline)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if hasattr(dcp_metadata, "StorageMeta") and getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        if getattr(metadata, "storage_meta", None) is not None and hasattr(self, "load_id"):
            metadata.storage_meta.load_id = self.load_id
        return metadata


def _read_metadata(path: str | Path) -> Metadata:
    """The checkpoint's DCP metadata, after checking every file of ``path`` against its
    ``checksums.json`` (a one-line UserError for a missing directory, a missing ``checksums.json``
    or ``.metadata``, a damaged file). No collective."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"DCP checkpoint {path} does not exist or is not a directory: name the directory "
                        "dist_ckpt.save wrote")
    listed = path / CHECKSUMS
    if not listed.is_file() or not (path / ".metadata").is_file():
        missing = CHECKSUMS if not listed.is_file() else ".metadata"
        raise UserError(f"DCP checkpoint {path} has no {missing}: it is incomplete or was not written by "
                        "dist_ckpt.save; restore it or pick another checkpoint")
    for f in sorted(path.iterdir()):
        if f.is_file() and f.name != CHECKSUMS:
            verify_file(f)
    try:
        return SafeReader(str(path)).read_metadata()
    except Exception as e:  # noqa: BLE001 (a damaged pickle raises anything)
        raise damaged(path / ".metadata", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def _saved_shapes(meta: Metadata) -> dict[str, torch.Size]:
    return {k: v.size for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}


def _check(path: Path, saved: dict[str, torch.Size], target: dict[str, torch.Tensor], exact: bool) -> None:
    """A one-line UserError when a target tensor is missing from the checkpoint or has another
    global shape, or (``exact``) the checkpoint holds model tensors the target lacks."""
    hint = "was it written for another model config? load it with the model it was saved from"
    for k, t in target.items():
        if k not in saved:
            raise UserError(f"DCP checkpoint {path} has no tensor {k}: {hint}")
        if tuple(saved[k]) != tuple(t.shape):
            raise UserError(f"DCP checkpoint {path}: {k} has shape {tuple(saved[k])}, the model {tuple(t.shape)}: {hint}")
    extra = sorted(k for k in saved if k.startswith("model.") and k not in target)
    if exact and extra:
        raise UserError(f"DCP checkpoint {path} holds {extra[0]}, which the model lacks: {hint}")


def _init_optim_state(module: nn.Module, opt: torch.optim.Optimizer) -> list[nn.Parameter]:
    """Give every trainable parameter of ``module`` that has no optimizer state its state tensors:
    one optimizer step at learning rate 0 on zero gradients of those parameters only (the
    parameters stay bit-identical: AdamW multiplies by ``1 - 0 * wd`` and adds ``0 * ...``). Other
    gradients are kept aside and put back. Returns the parameters it gave state to."""
    owned = {id(p) for p in module.parameters()}
    params = [p for g in opt.param_groups for p in g["params"]]
    fresh = [p for p in params if id(p) in owned and p.requires_grad and not opt.state.get(p)]
    if not fresh:
        return fresh
    kept = {id(p): p.grad for p in params}
    lrs = [g["lr"] for g in opt.param_groups]
    try:
        for p in params:
            p.grad = None
        for p in fresh:
            p.grad = torch.zeros_like(p)
        for g in opt.param_groups:
            g["lr"] = torch.zeros_like(g["lr"]) if isinstance(g["lr"], torch.Tensor) else 0.0
        opt.step()
    finally:
        for g, lr in zip(opt.param_groups, lrs):
            g["lr"] = lr
        for p in params:
            p.grad = kept[id(p)]
    return fresh


def load(path: str | Path, model: nn.Module, opt: torch.optim.Optimizer | None = None,
         spec: ParallelSpec | None = None, device_type: str = "cpu") -> None:
    """Restore ``model`` (and ``opt``'s state for ``model``'s parameters) from the DCP checkpoint
    ``path``, whatever layout wrote it, into this rank's layout (module docstring). Under a process
    group a collective: every rank calls it. Call it before training (gradients are kept, but the
    optimizer's state is replaced). A missing, damaged or mismatched checkpoint (another config,
    another optimizer's state names) is a one-line :class:`UserError` on every rank."""
    path = Path(path)
    saved = _saved_shapes(_read_metadata(path))
    module = unwrap(model)
    fresh = _init_optim_state(module, opt) if opt is not None else []
    try:
        target = _target(path, saved, model, module, opt, spec, device_type)
    except UserError:
        for p in fresh:  # refused: the optimizer as it was
            opt.state.pop(p, None)
        raise
    try:
        with _one_process_quiet():
            dcp.load(target, storage_reader=SafeReader(str(path)), no_dist=not _distributed())
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (a BaseException: DCP's every-rank failure)
        raise UserError(f"DCP checkpoint {path} could not be read ({type(e).__name__}): restore it or pick "
                        "another checkpoint") from None
    _write_back(target, model, module, opt)


def _target(path: Path, saved: dict[str, torch.Size], model: nn.Module, module: nn.Module,
            opt: torch.optim.Optimizer | None, spec: ParallelSpec | None, device_type: str) -> dict:
    """:func:`load`'s target: :func:`train_state`, less the optimizer entries the checkpoint lacks
    (their state dropped from ``opt``), checked against the checkpoint's tensors (:func:`_check`)."""
    target = train_state(model, opt, spec, device_type)
    if opt is not None:  # the optimizer ends up holding exactly the checkpoint's entries
        in_ckpt: dict[str, set[str]] = {}
        for k in saved:
            if k.startswith("optim.state."):
                fqn, _, name = k[len("optim.state."):].rpartition(".")
                in_ckpt.setdefault(fqn, set()).add(name)
        by_name = {n: p for n, p in module.named_parameters()}
        for fqn in list(target["optim"]["state"]):
            if fqn not in in_ckpt:
                del target["optim"]["state"][fqn]
                del opt.state[by_name[fqn]]
            elif in_ckpt[fqn] != set(target["optim"]["state"][fqn]):
                raise UserError(f"DCP checkpoint {path}: the optimizer state of {fqn} holds "
                                f"{sorted(in_ckpt[fqn])}, this optimizer {sorted(target['optim']['state'][fqn])}: "
                                "resume with the optimizer the run was saved with")
    _check(path, saved, _flat(target), exact=not isinstance(module, Stage))
    return target


def _write_back(target: dict, model: nn.Module, module: nn.Module, opt: torch.optim.Optimizer | None) -> None:
    """The loaded ``target`` into the model (``set_model_state_dict``: kernel seams re-select on
    load) and the optimizer; expert DTensors back to EP's local slices."""
    experts = _experts(module)
    msd = {k: (v.to_local() if k in experts else v) for k, v in target["model"].items()}
    for fqn, p in module.named_parameters():
        if fqn in experts and msd[fqn].data_ptr() != p.data_ptr():
            p.data.copy_(msd[fqn])  # from_local shared the storage on every torch tried; kept as a guard
    set_model_state_dict(model, msd)
    if opt is not None:
        by_name = {n: p for n, p in module.named_parameters()}
        for fqn, st in target["optim"]["state"].items():
            for name, v in st.items():
                local = v.to_local() if fqn in experts and isinstance(v, DTensor) else v
                dst = opt.state[by_name[fqn]][name]
                if local is not dst and local.data_ptr() != dst.data_ptr():
                    dst.copy_(local)


def read_flat(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of the DCP checkpoint ``path`` whole (global shapes, plain CPU tensors in the saved
    dtype), keyed by DCP's flattened names (``model.<fqn>``, ``optim.state.<fqn>.<name>``); no
    collective. For inspection and tests; :func:`load_full_model_state` gives the model's weights."""
    path = Path(path)
    meta = _read_metadata(path)
    out = {k: torch.empty(tuple(v.size), dtype=v.properties.dtype) for k, v in meta.state_dict_metadata.items()
           if isinstance(v, TensorStorageMetadata)}
    _dcp_load_one_process(path, out)
    return out


def _dcp_load_one_process(path: Path, state: dict) -> None:
    """``dcp.load(state)`` in this process alone (``no_dist``), its failures a one-line UserError."""
    try:
        with _one_process_quiet():
            dcp.load(state, storage_reader=SafeReader(str(path)), no_dist=True)
    except (Exception, CheckpointException) as e:  # noqa: BLE001 (a BaseException: DCP's read failure)
        raise UserError(f"DCP checkpoint {path} could not be read ({type(e).__name__}): restore it or pick "
                        "another checkpoint") from None


def load_full_model_state(path: str | Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The one-process weights of the DCP checkpoint ``path`` (what ``Transformer(model_cfg).state_dict()``
    holds: full expert stacks, persistent buffers, plain CPU tensors in the saved dtype; a tied
    ``lm_head.weight`` is the same tensor as ``embed.weight``), read without any collective
    (``no_dist``: rank 0 alone may call it after a collective :func:`save`, e.g. to write
    ``model.safetensors``). The optimizer's part is not read. A missing, damaged, or other-config
    checkpoint is a one-line :class:`UserError`."""
    path = Path(path)
    meta = _read_metadata(path)
    saved = _saved_shapes(meta)
    with torch.device("meta"):
        ref = Transformer(model_cfg)
    first: dict[int, str] = {}
    alias: dict[str, str] = {}
    for k, t in ref.state_dict(keep_vars=True).items():
        alias[k] = first.setdefault(id(t), k)
    _check(path, saved, {f"model.{k}": t for k, t in ref.state_dict(keep_vars=True).items()}, exact=True)
    dtypes = {k: v.properties.dtype for k, v in meta.state_dict_metadata.items() if isinstance(v, TensorStorageMetadata)}
    own = {k: torch.empty(tuple(saved[f"model.{k}"]), dtype=dtypes[f"model.{k}"]) for k in set(alias.values())}
    _dcp_load_one_process(path, {"model": own})
    return {k: own[a] for k, a in alias.items()}
