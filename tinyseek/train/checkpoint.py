"""Checkpoints: ``ckpt_root/step_000100/{model.safetensors, optim.pt, rng.pt, meta.json}``.

Each step directory is written into a ``.tmp-*`` directory beside it and renamed into place only
when every file is on disk (:func:`tinyseek.common.atomic_dir`), so a crash mid-write leaves a
temp directory that :func:`latest_checkpoint` never picks up. ``latest_checkpoint`` also requires
``meta.json`` and ``model.safetensors`` to be present, and ignores anything not named
``step_<digits>``.

- ``model.safetensors``: the model state dict (fp32 as trained; buffers such as the MoE
  ``expert_bias`` included). Tied tensors (``lm_head.weight`` is ``embed.weight``) are stored once;
  the alias is recorded in the safetensors metadata and restored on load.
- ``optim.pt``: the optimizer state dict (``torch.save``), absent when no optimizer was given.
- ``rng.pt``: python / numpy / torch (and CUDA) RNG states at save time, as tuples, lists of ints
  and tensors (:func:`tinyseek.common.rng_state`).
- ``meta.json``: ``{"step", "model_config", ...}`` plus whatever the trainer adds (train config,
  data-loader position, loop state such as skipped steps and tokens seen).
- ``checksums.json``: ``{"algorithm": "sha256", "quick_check": {"chunks", "chunk_bytes"},
  "files": {name: {"sha256", "quick_sha256", "bytes"}}}`` for every other file of the directory,
  meta.json included (:func:`write_checksums`; ``quick_sha256`` is the sampled hash of
  :mod:`tinyseek.integrity`).

Reading is safe and checked. Every ``.pt`` file is read with ``torch.load(..., weights_only=True)``
(tensors, numbers, strings, tuples, lists, dicts; a file that needs any other class is refused,
nothing is unpickled). Each file is compared with ``checksums.json`` before it is read
(:func:`verify_file`); ``TINYSEEK_VERIFY`` picks how, as for token shards (:mod:`tinyseek.integrity`):
``quick`` (default: files up to 256 MiB hashed whole, larger ones by the sampled hash, every size
checked), ``full`` (sha256 of every file read, about 0.45 s per 500 MB on the 2-core CPU machines),
``off``. A mismatch, or a file that is truncated or does not parse, is a one-line
:class:`UserError` naming the file. Checkpoints written before checksums existed have no
``checksums.json`` and load unverified; their ``rng.pt`` (numpy state as an ndarray) is read with
``weights_only=True`` plus an allowlist of numpy's array reconstruction only. Checksums catch
damage (disk, copy, truncation), not tampering: whoever can rewrite a file can rewrite
``checksums.json``.

:func:`save_checkpoint` refuses weights holding NaN or inf (a diverged run is an error, not a
checkpoint).

A LoRA adapter checkpoint (:mod:`tinyseek.model.lora`) has ``adapter.safetensors`` (the adapters'
``lora_A`` / ``lora_B`` weights only) instead of ``model.safetensors``, and its ``meta.json`` records
``{"lora": {"rank", "alpha", "targets", "dropout"}, "base": <absolute path of the base step dir>}``;
``optim.pt`` holds the adapters' optimizer state. :func:`load_model` loads the base (which may itself
be an adapter checkpoint), applies the adapters and merges them: callers get a plain model.

Checkpoint formats: a registry (:data:`CHECKPOINT_FORMATS`, :func:`register_format`) so that
``train/`` loads what layers above it define without importing them. A :class:`CheckpointFormat`
names a format, says whether it claims a directory (cheaply: a marker file) and loads it.
:func:`load_model` asks the registered formats in order, on the path as given and then on the
step directory it resolves to; the float checkpoint (``model.safetensors``) is the fallback when
none claims it. Registered here: LoRA adapters. Registered above: quantized checkpoints
(``quant_config.json``), by :mod:`tinyseek.quant.quantize` when it is imported. Code that may meet
any checkpoint (serve, post, eval, export, pipeline, benchmarks) therefore calls
:func:`tinyseek.quant.load.load_model`, which imports every registering module first; this module's
:func:`load_model` knows only the formats registered so far (float and LoRA when nothing above is
imported). Why a registry rather than a table of module names imported on demand: the dependency
then points the way the layers do (quant -> train), visible to a reader and to the import checks
(tests/test_imports.py), instead of a string that hides an upward import.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyseek.common import atomic_dir, rng_state, set_rng_state
from tinyseek.config import ModelConfig, from_dict, to_dict
from tinyseek.errors import UserError
from tinyseek.integrity import (FULL_CHECK_BYTES, QUICK_CHUNK_BYTES, QUICK_CHUNKS, quick_sha256_file, sha256_file,
                                verify_mode)
from tinyseek.model.lora import apply_lora, load_lora_state_dict, merge_lora
from tinyseek.model.transformer import Transformer

try:
    from numpy._core.multiarray import _reconstruct as _np_reconstruct
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import _reconstruct as _np_reconstruct

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter.safetensors")  # a full model / LoRA adapters (one per step dir)
CHECKSUMS = "checksums.json"
_VERIFIED: dict[tuple, bool] = {}  # (path, size, mtime_ns, sha256) already hashed in this process


def step_dir(ckpt_root: str | Path, step: int) -> Path:
    return Path(ckpt_root) / f"step_{step:06d}"


# ---------------------------------------------------------------------------------------------
# integrity: checksums, damaged files, safe torch.load
# ---------------------------------------------------------------------------------------------
def _first_line(e: BaseException) -> str:
    """The first sentence of an exception's message, short enough for a one-line error."""
    text = str(e).strip().splitlines()
    line = (text[0] if text else type(e).__name__).split(". ")[0]
    return line if len(line) <= 120 else line[:117] + "..."


def damaged(path: str | Path, why: str) -> UserError:
    """The one-line error for an unreadable checkpoint file."""
    path = Path(path)
    return UserError(f"checkpoint file {path} is damaged ({why}): restore it, or move {path.parent.name} aside to "
                     "--resume from an earlier checkpoint (or name another one with --init / --ckpt)")


def write_checksums(d: str | Path) -> dict:
    """Write ``d/checksums.json``: sha256 and size of every regular file directly in ``d`` (itself
    excepted). Call it last, inside the atomic directory the files were written to."""
    d = Path(d)
    files = {p.name: {"sha256": sha256_file(p), "quick_sha256": quick_sha256_file(p, QUICK_CHUNKS, QUICK_CHUNK_BYTES),
                      "bytes": p.stat().st_size}
             for p in sorted(d.iterdir()) if p.is_file() and p.name != CHECKSUMS}
    out = {"algorithm": "sha256", "quick_check": {"chunks": QUICK_CHUNKS, "chunk_bytes": QUICK_CHUNK_BYTES},
           "files": files}
    (d / CHECKSUMS).write_text(json.dumps(out, indent=2, sort_keys=True) + "\n")
    return out


def _checksums(d: Path) -> dict | None:
    """``checksums.json`` of ``d`` (None when absent), each file entry carrying the sampled-hash
    parameters under ``"_qc"``."""
    p = d / CHECKSUMS
    if not p.is_file():
        return None  # written before checksums existed: nothing to compare with
    try:
        doc = json.loads(p.read_text())
        files, qc = doc["files"], doc.get("quick_check", {})
        if not isinstance(files, dict) or not isinstance(qc, dict):
            raise TypeError("files / quick_check is not an object")
        return {k: dict(v, _qc=(int(qc.get("chunks", QUICK_CHUNKS)), int(qc.get("chunk_bytes", QUICK_CHUNK_BYTES))))
                for k, v in files.items()}
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise damaged(p, _first_line(e)) from None


def verify_file(path: str | Path) -> None:
    """Compare ``path`` with the ``checksums.json`` beside it (see the module doc for
    ``TINYSEEK_VERIFY``); a :class:`UserError` naming the file on a mismatch. Files not listed, and
    directories without ``checksums.json`` (older checkpoints), pass unchecked."""
    path = Path(path)
    mode = verify_mode()
    if mode == "off":
        return
    entry = (_checksums(path.parent) or {}).get(path.name)
    if entry is None:
        return
    if not path.is_file():
        raise UserError(f"checkpoint file {path} is missing (listed in {CHECKSUMS}): restore it or pick another checkpoint")
    st = path.stat()
    if st.st_size != entry.get("bytes"):
        raise damaged(path, f"{st.st_size} bytes, {CHECKSUMS} records {entry.get('bytes')}")
    whole = mode == "full" or st.st_size <= FULL_CHECK_BYTES
    if not whole and "quick_sha256" not in entry:
        return  # written before sampled hashes: quick mode checks the size only
    want = entry.get("sha256") if whole else entry["quick_sha256"]
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, want)
    if key in _VERIFIED:
        return
    if (sha256_file(path) if whole else quick_sha256_file(path, *entry["_qc"])) != want:
        raise damaged(path, f"{'sha256' if whole else 'sampled sha256'} differs from {CHECKSUMS}")
    _VERIFIED[key] = True


def _numpy_globals() -> list:
    """What an old-format rng.pt / comm.pt needs beyond weights_only's defaults: numpy's ndarray
    reconstruction (the RNG key, a uint32 array) and nothing that runs code."""
    # a file written under numpy 1.x names the function numpy.core.multiarray._reconstruct
    return [_np_reconstruct, (_np_reconstruct, "numpy.core.multiarray._reconstruct"), np.ndarray, np.dtype,
            type(np.dtype(np.uint32))]


def load_torch(path: str | Path, map_location: Any = "cpu", numpy_ok: bool = False) -> Any:
    """``torch.load(path, weights_only=True)`` after :func:`verify_file`: tensors, numbers,
    strings and containers only. ``numpy_ok`` also admits numpy arrays (checkpoints written before
    RNG states were stored as lists). Anything else is refused, never unpickled; a damaged file or a
    refused one is a one-line :class:`UserError`."""
    path = Path(path)
    verify_file(path)
    try:
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError:
            if not numpy_ok:
                raise
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower() or "unsupported global" in str(e).lower():
            raise UserError(f"checkpoint file {path} holds pickled objects other than tensors and plain values: "
                            "refused (tinyseek never unpickles code); restore it from a trusted copy") from None
        raise damaged(path, _first_line(e)) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile, KeyError, TypeError) as e:
        raise damaged(path, _first_line(e)) from None


def read_json(path: str | Path) -> dict:
    """A checksum-verified JSON object file; a damaged one is a one-line :class:`UserError`."""
    path = Path(path)
    verify_file(path)
    try:
        out = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise damaged(path, f"not valid JSON: {_first_line(e)}") from None
    if not isinstance(out, dict):
        raise damaged(path, "not a JSON object")
    return out


# ---------------------------------------------------------------------------------------------
# model weights (safetensors, tied tensors stored once)
# ---------------------------------------------------------------------------------------------
def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop later names that share storage with an earlier one; return (unique state, alias -> name)."""
    seen: dict[tuple, str] = {}
    out, aliases = {}, {}
    for k, v in state.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()))
        if v.numel() > 0 and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        out[k] = v.detach().to("cpu").contiguous()
    return out, aliases


def save_weights(state: dict[str, torch.Tensor], path: str | Path) -> None:
    tensors, aliases = _dedupe(state)
    save_file(tensors, str(path), metadata={"format": "pt", "aliases": json.dumps(aliases)})


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """State dict from a safetensors file (checked by :func:`verify_file`), with tied aliases filled
    back in. A damaged file is a one-line :class:`UserError`."""
    path = Path(path)
    verify_file(path)
    try:
        state = load_file(str(path), device=str(device))
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        for alias, name in json.loads(meta.get("aliases", "{}")).items():
            state[alias] = state[name]
    except FileNotFoundError:
        raise UserError(f"checkpoint file {path} does not exist") from None
    except Exception as e:  # safetensors raises its own SafetensorError (an Exception) for a bad header
        raise damaged(path, _first_line(e)) from None
    return state


def check_finite_state(state: dict[str, torch.Tensor], what: str) -> None:
    """:class:`UserError` naming the first floating tensor of ``state`` with a NaN or inf."""
    for k, v in state.items():
        if torch.is_tensor(v) and v.is_floating_point() and v.numel() and not bool(torch.isfinite(v).all()):
            raise UserError(f"{what}: tensor {k} holds NaN or inf (training diverged): nothing saved; "
                            "lower --lr or check the model settings")


# ---------------------------------------------------------------------------------------------
# save / find / load
# ---------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: str | Path, step: int, model: nn.Module | None, optimizer: Any, meta: dict,
                    model_state: dict | None = None, optim_state: dict | None = None,
                    extra: dict[str, Any] | None = None, weights_file: str = "model.safetensors",
                    dirs: dict[str, Path] | None = None) -> Path:
    """Write ``ckpt_root/step_{step:06d}`` atomically and return its path.

    ``meta`` must be JSON-serialisable; ``step`` and (from ``model.cfg``) ``model_config`` are
    added when missing. ``model_state`` / ``optim_state`` override ``model.state_dict()`` /
    ``optimizer.state_dict()`` (for sharded models whose full state was gathered by the caller).
    ``extra`` maps file names to objects written with ``torch.save`` into the same directory.
    ``weights_file``: ``adapter.safetensors`` for a LoRA adapter checkpoint (see the module doc).
    ``dirs`` maps folder names to finished folders (e.g. a distributed checkpoint, which carries its
    own ``checksums.json``) moved into the checkpoint (same file system: a rename) before it is
    renamed into place (a failed write removes them with the temp folder: they are temp folders too).
    """
    meta = dict(meta)
    meta.setdefault("step", int(step))
    if "model_config" not in meta and model is not None and hasattr(model, "cfg"):
        meta["model_config"] = to_dict(model.cfg)
    if "model_config" not in meta:
        raise ValueError("save_checkpoint needs meta['model_config'] or a model with .cfg")
    if weights_file not in WEIGHT_FILES:
        raise ValueError(f"weights_file must be one of {WEIGHT_FILES}, got {weights_file!r}")
    state = model_state if model_state is not None else model.state_dict()
    final = step_dir(ckpt_root, step)
    check_finite_state(state, f"checkpoint {final}")
    if optim_state is None and optimizer is not None:
        optim_state = optimizer.state_dict()
    with atomic_dir(final) as tmp:
        save_weights(state, tmp / weights_file)
        if optim_state is not None:
            torch.save(optim_state, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        for name, src in (dirs or {}).items():
            os.replace(src, tmp / name)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        write_checksums(tmp)  # last: covers every file above, meta.json included
    return final


def list_checkpoints(ckpt_root: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints under ``ckpt_root`` as sorted (step, path); temp/partial dirs excluded."""
    root = Path(ckpt_root)
    if not root.is_dir():
        return []
    out = []
    for d in root.iterdir():
        m = STEP_RE.match(d.name)
        if not m or not d.is_dir():
            continue
        if not (d / "meta.json").is_file() or not any((d / f).is_file() for f in WEIGHT_FILES):
            continue
        try:
            json.loads((d / "meta.json").read_text())
        except (json.JSONDecodeError, OSError):
            continue
        out.append((int(m.group(1)), d))
    return sorted(out)


def latest_checkpoint(ckpt_root: str | Path) -> Path | None:
    """The highest complete ``step_*`` directory (full or adapter checkpoint), or None. Never a
    ``.tmp-*`` or partial dir."""
    ck = list_checkpoints(ckpt_root)
    return ck[-1][1] if ck else None


def prune_checkpoints(ckpt_root: str | Path, keep_last: int) -> list[Path]:
    """Delete all but the newest ``keep_last`` complete checkpoints (0 = keep all); returns removed."""
    if keep_last <= 0:
        return []
    removed = []
    for _, d in list_checkpoints(ckpt_root)[:-keep_last]:
        shutil.rmtree(d, ignore_errors=True)
        removed.append(d)
    return removed


def remove_partial(ckpt_root: str | Path) -> list[Path]:
    """Delete leftovers of interrupted writes (``.tmp-step_*`` / ``.old-step_*`` dirs). Call only
    when no other process writes to ``ckpt_root`` (the trainer does at start-up)."""
    root = Path(ckpt_root)
    gone = [d for d in root.glob(".tmp-step_*") if d.is_dir()] + [d for d in root.glob(".old-step_*") if d.is_dir()]
    for d in gone:
        shutil.rmtree(d, ignore_errors=True)
    return gone


def resolve_checkpoint(path: str | Path) -> Path:
    """A step dir; or the latest step of a ckpt root; or of ``run_dir/ckpt``."""
    p = Path(path)
    if (p / "meta.json").is_file():
        return p
    for root in (p, p / "ckpt"):
        d = latest_checkpoint(root)
        if d is not None:
            return d
    raise UserError(f"no checkpoint found at {path}")


def read_meta(step_path: str | Path) -> dict:
    """``meta.json`` of a step dir, checksum-verified; damaged or missing: a one-line UserError."""
    p = Path(step_path) / "meta.json"
    if not p.is_file():
        raise UserError(f"checkpoint {step_path} has no meta.json: pick another checkpoint")
    return read_json(p)


@dataclass(frozen=True)
class CheckpointFormat:
    """One checkpoint format for :func:`load_model` (module docstring)."""
    name: str                                  # e.g. "lora-adapter", "tinyseek-quant"
    claims: Callable[[Path], bool]             # whether a directory is in this format (a marker file)
    load: Callable[[Path, Any, tuple], tuple]  # (dir, device, chain) -> (model in eval mode, meta)
    # chain: the adapter checkpoints whose base is being loaded (loop guard); pass it on to load_model's
    # recursion if the format loads another checkpoint, else ignore it


CHECKPOINT_FORMATS: list[CheckpointFormat] = []  # asked in order; the float checkpoint is the fallback


def register_format(fmt: CheckpointFormat) -> None:
    """Add ``fmt`` to :data:`CHECKPOINT_FORMATS` (replacing a format of the same name in place:
    importing a module twice, or reloading it, registers once)."""
    for i, old in enumerate(CHECKPOINT_FORMATS):
        if old.name == fmt.name:
            CHECKPOINT_FORMATS[i] = fmt
            return
    CHECKPOINT_FORMATS.append(fmt)


def checkpoint_format(d: Path) -> CheckpointFormat | None:
    """The first registered format that claims directory ``d``; None: a float checkpoint (or none)."""
    return next((f for f in CHECKPOINT_FORMATS if f.claims(d)), None)


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model recorded in a checkpoint and load its weights; returns ``(model, meta)``, the
    model in eval mode on ``device``.

    ``path`` is a step dir, a ckpt root, or a run dir (latest step). A directory a registered format
    claims is loaded by that format (a LoRA adapter checkpoint: the base with the adapters merged,
    a plain model); anything else as a float checkpoint. Only the formats registered so far are
    known: callers that may meet any checkpoint use :func:`tinyseek.quant.load.load_model`.
    """
    return _load_model(Path(path), device, ())


def _load_model(p: Path, device, chain: tuple):
    """:func:`load_model`; ``chain``: the adapter checkpoints whose base is being loaded (loop guard)."""
    fmt = checkpoint_format(p)
    if fmt is None:
        p = resolve_checkpoint(p)
        fmt = checkpoint_format(p)
    return fmt.load(p, device, chain) if fmt is not None else _load_float(p, device)


def _load_float(d: Path, device):
    meta = read_meta(d)
    try:
        model = Transformer(from_dict(ModelConfig, meta["model_config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise damaged(d / "meta.json", f"bad model_config: {_first_line(e)}") from None
    load_state_strict(model, load_weights(d / "model.safetensors"), d / "model.safetensors")
    model.to(device)
    model.eval()
    return model, meta


def _load_adapter(d: Path, device, chain: tuple):
    """The base checkpoint of adapter checkpoint ``d`` (loaded by :func:`load_model`, so it may be an
    adapter checkpoint too) with ``d``'s adapters applied and merged; ``(model, meta of d)``."""
    meta = read_meta(d)
    lora, base = meta.get("lora"), meta.get("base")
    if not isinstance(lora, dict) or not base:
        raise UserError(f"adapter checkpoint {d} has no 'lora' / 'base' entries in meta.json")
    if not Path(base).exists():
        raise UserError(f"adapter checkpoint {d}: its base checkpoint {base} does not exist (moved or deleted?)")
    key = str(d.resolve())
    if key in chain or len(chain) > 64:
        raise UserError(f"adapter checkpoint {d}: its chain of base checkpoints loops")
    model, _ = _load_model(Path(base), "cpu", chain + (key,))
    apply_lora(model, lora["rank"], lora["alpha"], lora["targets"], lora.get("dropout", 0.0))
    load_lora_state_dict(model, load_weights(d / "adapter.safetensors"))
    merge_lora(model)
    model.to(device)
    model.eval()
    return model, meta


def _is_adapter(d: Path) -> bool:
    return (d / "adapter.safetensors").is_file() and (d / "meta.json").is_file()


register_format(CheckpointFormat("lora-adapter", _is_adapter, _load_adapter))


def load_state_strict(model: nn.Module, state: dict, path: Path) -> None:
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise UserError(f"checkpoint file {path} does not fit the model its meta.json describes "
                        f"({_first_line(e)}): pick another checkpoint") from None


def load_optim_state(d: str | Path, map_location: Any = "cpu") -> dict:
    """``optim.pt`` of step dir ``d`` (verified, ``weights_only``); missing: a one-line UserError."""
    p = Path(d) / "optim.pt"
    if not p.is_file():
        raise UserError(f"checkpoint {d} has no optim.pt; cannot resume training from it")
    osd = load_torch(p, map_location=map_location)
    if not isinstance(osd, dict) or "state" not in osd or "param_groups" not in osd:
        raise damaged(p, "not an optimizer state dict")
    return osd


def load_optimizer(optimizer: Any, osd: dict, path: Path) -> None:
    try:
        optimizer.load_state_dict(osd)
    except (ValueError, KeyError, TypeError, RuntimeError) as e:
        raise UserError(f"checkpoint file {path} does not fit this optimizer ({_first_line(e)}): "
                        "pick another checkpoint") from None


def load_rng_state(d: str | Path) -> dict | None:
    """``rng.pt`` of step dir ``d`` (verified, ``weights_only``; the older numpy-array format too),
    or None when the checkpoint has none."""
    p = Path(d) / "rng.pt"
    if not p.is_file():
        return None
    st = load_torch(p, numpy_ok=True)
    if not isinstance(st, dict) or not {"python", "numpy", "torch"} <= set(st):
        raise damaged(p, "not an RNG state")
    return st


def restore_rng_state(st: dict, d: str | Path) -> None:
    """:func:`tinyseek.common.set_rng_state`, with a malformed state a one-line UserError."""
    try:
        set_rng_state(st)
    except (ValueError, TypeError, KeyError, IndexError) as e:
        raise damaged(Path(d) / "rng.pt", f"bad RNG state: {_first_line(e)}") from None


def load_training_state(step_path: str | Path, model: nn.Module, optimizer: Any | None,
                        map_location: str | torch.device = "cpu") -> tuple[dict, dict | None]:
    """Load weights into ``model`` and state into ``optimizer``; returns ``(meta, rng_states)``.
    For an adapter checkpoint ``model`` must carry the same adapters (:func:`tinyseek.model.lora.apply_lora`
    on its base); only the adapters are loaded. Every file is verified and read safely (module doc)."""
    d = Path(step_path)
    meta = read_meta(d)
    if (d / "adapter.safetensors").is_file():
        load_lora_state_dict(model, load_weights(d / "adapter.safetensors", device="cpu"))
    else:
        load_state_strict(model, load_weights(d / "model.safetensors", device="cpu"), d / "model.safetensors")
    if optimizer is not None:
        load_optimizer(optimizer, load_optim_state(d, map_location), d / "optim.pt")
    return meta, load_rng_state(d)
