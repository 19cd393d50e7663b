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
- ``rng.pt``: python / numpy / torch (and CUDA) RNG states at save time.
- ``meta.json``: ``{"step", "model_config", ...}`` plus whatever the trainer adds (train config,
  data-loader position, loop state such as skipped steps and tokens seen).

A LoRA adapter checkpoint (:mod:`tinyseek.model.lora`) has ``adapter.safetensors`` (the adapters'
``lora_A`` / ``lora_B`` weights only) instead of ``model.safetensors``, and its ``meta.json`` records
``{"lora": {"rank", "alpha", "targets", "dropout"}, "base": <absolute path of the base step dir>}``;
``optim.pt`` holds the adapters' optimizer state. :func:`load_model` loads the base (which may itself
be an adapter checkpoint), applies the adapters and merges them: callers get a plain model.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tinyseek.common import atomic_dir, rng_state
from tinyseek.errors import UserError

STEP_RE = re.compile(r"^step_(\d+)$")
WEIGHT_FILES = ("model.safetensors", "adapter.safetensors")  # a full model / LoRA adapters (one per step dir)


def step_dir(ckpt_root: str | Path, step: int) -> Path:
    return Path(ckpt_root) / f"step_{step:06d}"


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
    """State dict from a safetensors file, with tied aliases filled back in."""
    state = load_file(str(path), device=str(device))
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    for alias, name in json.loads(meta.get("aliases", "{}")).items():
        state[alias] = state[name]
    return state


# ---------------------------------------------------------------------------------------------
# save / find / load
# ---------------------------------------------------------------------------------------------
def save_checkpoint(ckpt_root: str | Path, step: int, model: nn.Module | None, optimizer: Any, meta: dict,
                    model_state: dict | None = None, optim_state: dict | None = None,
                    extra: dict[str, Any] | None = None, weights_file: str = "model.safetensors") -> Path:
    """Write ``ckpt_root/step_{step:06d}`` atomically and return its path.

    ``meta`` must be JSON-serialisable; ``step`` and (from ``model.cfg``) ``model_config`` are
    added when missing. ``model_state`` / ``optim_state`` override ``model.state_dict()`` /
    ``optimizer.state_dict()`` (for sharded models whose full state was gathered by the caller).
    ``extra`` maps file names to objects written with ``torch.save`` into the same directory.
    ``weights_file``: ``adapter.safetensors`` for a LoRA adapter checkpoint (see the module doc).
    """
    from tinyseek.config import to_dict

    meta = dict(meta)
    meta.setdefault("step", int(step))
    if "model_config" not in meta and model is not None and hasattr(model, "cfg"):
        meta["model_config"] = to_dict(model.cfg)
    if "model_config" not in meta:
        raise ValueError("save_checkpoint needs meta['model_config'] or a model with .cfg")
    if weights_file not in WEIGHT_FILES:
        raise ValueError(f"weights_file must be one of {WEIGHT_FILES}, got {weights_file!r}")
    state = model_state if model_state is not None else model.state_dict()
    if optim_state is None and optimizer is not None:
        optim_state = optimizer.state_dict()
    final = step_dir(ckpt_root, step)
    with atomic_dir(final) as tmp:
        save_weights(state, tmp / weights_file)
        if optim_state is not None:
            torch.save(optim_state, tmp / "optim.pt")
        torch.save(rng_state(), tmp / "rng.pt")
        for name, obj in (extra or {}).items():
            torch.save(obj, tmp / name)
        # meta.json last: its presence marks a complete directory even without the rename
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
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
    return json.loads((Path(step_path) / "meta.json").read_text())


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """Build the model recorded in a checkpoint and load its weights; returns ``(model, meta)``.

    ``path`` is a step dir, a ckpt root, or a run dir (latest step). A directory with
    ``quant_config.json`` is handed to ``tinyseek.quant.quantize.load_quantized``; a LoRA adapter
    checkpoint (``adapter.safetensors``) to :func:`_load_adapter`, which returns the base with the
    adapters merged (a plain model).
    """
    return _load_model(Path(path), device, ())


def _load_model(p: Path, device, chain: tuple):
    """:func:`load_model`; ``chain``: the adapter checkpoints whose base is being loaded (loop guard)."""
    if (p / "quant_config.json").is_file():
        from tinyseek.quant.quantize import load_quantized
        return load_quantized(p, device)
    d = resolve_checkpoint(p)
    if (d / "quant_config.json").is_file():
        from tinyseek.quant.quantize import load_quantized
        return load_quantized(d, device)
    if (d / "adapter.safetensors").is_file():
        return _load_adapter(d, device, chain)
    from tinyseek.config import ModelConfig, from_dict
    from tinyseek.model.transformer import Transformer

    meta = read_meta(d)
    model = Transformer(from_dict(ModelConfig, meta["model_config"]))
    model.load_state_dict(load_weights(d / "model.safetensors"), strict=True)
    model.to(device)
    model.eval()
    return model, meta


def _load_adapter(d: Path, device, chain: tuple):
    """The base checkpoint of adapter checkpoint ``d`` (loaded by :func:`load_model`, so it may be an
    adapter checkpoint too) with ``d``'s adapters applied and merged; ``(model, meta of d)``."""
    from tinyseek.model.lora import apply_lora, load_lora_state_dict, merge_lora

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


def load_training_state(step_path: str | Path, model: nn.Module, optimizer: Any | None,
                        map_location: str | torch.device = "cpu") -> tuple[dict, dict | None]:
    """Load weights into ``model`` and state into ``optimizer``; returns ``(meta, rng_states)``.
    For an adapter checkpoint ``model`` must carry the same adapters (:func:`tinyseek.model.lora.apply_lora`
    on its base); only the adapters are loaded."""
    d = Path(step_path)
    if (d / "adapter.safetensors").is_file():
        from tinyseek.model.lora import load_lora_state_dict
        load_lora_state_dict(model, load_weights(d / "adapter.safetensors", device="cpu"))
    else:
        model.load_state_dict(load_weights(d / "model.safetensors", device="cpu"), strict=True)
    if optimizer is not None:
        if not (d / "optim.pt").is_file():
            raise UserError(f"checkpoint {d} has no optim.pt; cannot resume training from it")
        optimizer.load_state_dict(torch.load(d / "optim.pt", map_location=map_location, weights_only=False))
    rng = torch.load(d / "rng.pt", weights_only=False) if (d / "rng.pt").is_file() else None
    return read_meta(d), rng
