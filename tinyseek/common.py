"""Small shared utilities: device/dtype, seeding, rank-0 printing, JSONL metrics, atomic writes."""
from __future__ import annotations

import contextlib
import json
import os
import random
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinyseek.fsutil import (_pid_alive, atomic_dir, atomic_write_json, atomic_write_text,  # noqa: F401
                             move_aside, remove_stale_temps)


def get_device(name: str = "auto") -> torch.device:
    """``auto`` -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(name: str, device: torch.device) -> torch.dtype | None:
    """Mixed-precision dtype for autocast: ``auto`` = bf16 on CUDA, none (fp32) on CPU.

    CPUs without native bf16 run bf16 GEMMs ~3x slower than fp32; with AVX512_BF16 (the Zen 5 test
    machine) bf16 GEMMs are ~2x fp32 and a cpu-tiny training step under ``--dtype bf16`` 1.11-1.15x
    (benchmarks/README.md, honest baselines). ``auto`` stays fp32 on CPU so a run's numerics do not
    depend on the machine; ``bf16`` is the opt-in.
    """
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else None
    return {"fp32": None, "float32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}[name]


def autocast_ctx(device: torch.device, dtype: torch.dtype | None):
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def numpy_state_to_plain(st: tuple) -> list:
    """A ``np.random.get_state()`` / ``RandomState.get_state()`` tuple as plain Python values
    (``[name, key as a list of ints, pos, has_gauss, cached_gaussian]``): what ``torch.load(...,
    weights_only=True)`` and JSON can read back. :func:`numpy_state_from_plain` inverts it exactly.

    >>> rs = np.random.RandomState(3); s = rs.get_state()
    >>> back = numpy_state_from_plain(numpy_state_to_plain(s))
    >>> back[0] == s[0] and (back[1] == s[1]).all() and back[2:] == s[2:]
    True
    """
    name, key, pos, has_gauss, cached = st[:5]
    return [str(name), [int(k) for k in np.asarray(key).tolist()], int(pos), int(has_gauss), float(cached)]


def numpy_state_from_plain(st: Any) -> tuple:
    """The ``set_state`` tuple for a :func:`numpy_state_to_plain` list (an old-format tuple with an
    ndarray key is accepted as is). A malformed state raises ``ValueError``."""
    if not isinstance(st, (list, tuple)) or len(st) < 5:
        raise ValueError("numpy RNG state must be a 5-item list")
    key = np.asarray(st[1], dtype=np.uint32)
    if key.shape != (624,):
        raise ValueError(f"numpy RNG key must hold 624 words, got shape {key.shape}")
    return (str(st[0]), key, int(st[2]), int(st[3]), float(st[4]))


def rng_state() -> dict:
    """All RNG states needed for exact resume (python, numpy, torch cpu, cuda if present), in types
    that ``torch.load(..., weights_only=True)`` reads back (tuples/lists of ints, tensors): no pickled
    numpy objects."""
    st = {"python": random.getstate(), "numpy": numpy_state_to_plain(np.random.get_state()),
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    """Restore :func:`rng_state` (also the older format whose numpy state holds an ndarray).
    A malformed state raises ``ValueError`` / ``TypeError`` before any generator is changed."""
    py = st["python"]
    py = (int(py[0]), tuple(int(v) for v in py[1]), py[2])
    npst = numpy_state_from_plain(st["numpy"])
    th = st["torch"]
    if not isinstance(th, torch.Tensor) or th.dtype != torch.uint8:
        raise TypeError("torch RNG state must be a uint8 tensor")
    random.setstate(py)
    np.random.set_state(npst)
    torch.set_rng_state(th)
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def print0(*args: Any, **kwargs: Any) -> None:
    if rank() == 0:
        print(*args, **kwargs, flush=True)


class MetricsLogger:
    """Appends one JSON object per line to ``metrics.jsonl`` (rank 0 only); optional TensorBoard."""

    def __init__(self, path: str | Path, tensorboard: bool = False, enabled: bool | None = None):
        self.path = Path(path)
        self.enabled = (rank() == 0) if enabled is None else enabled
        self.tb = None
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if tensorboard:
                try:
                    from torch.utils.tensorboard import SummaryWriter
                    self.tb = SummaryWriter(str(self.path.parent / "tb"))
                except Exception:  # tensorboard not installed: JSONL is always there
                    self.tb = None

    def log(self, step: int, **metrics: Any) -> None:
        if not self.enabled:
            return
        rec = {"step": step, "time": round(time.time(), 3)}
        for k, v in metrics.items():
            if isinstance(v, torch.Tensor):
                v = v.item() if v.numel() == 1 else v.tolist()
            rec[k] = v
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k not in ("step", "time"):
                    self.tb.add_scalar(k, v, step)

    def truncate_after(self, step: int) -> None:
        """Drop records with step > ``step`` (used on resume so the curve has no duplicates)."""
        if not self.enabled or not self.path.exists():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                if json.loads(line).get("step", -1) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a torn last line from a killed run
        atomic_write_text(self.path, "".join(l + "\n" for l in keep))


def read_metrics(path: str | Path) -> list[dict]:
    out = []
    p = Path(path)
    if not p.exists():
        return out
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
