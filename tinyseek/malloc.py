"""glibc malloc settings for training processes: keep big CPU tensor buffers mapped between steps.

PyTorch's CPU allocator is plain ``malloc``/``free``. With glibc's defaults a training step that frees
and re-allocates the same large buffers every step pays the kernel to zero fresh pages each time:

- a block above ``M_MMAP_THRESHOLD`` (dynamic, at most 32 MB) is its own ``mmap`` and is unmapped on
  ``free``; the dynamic threshold is raised to the size of a freed block, but a block of that same
  size still counts as "at or above" it, so a tensor re-allocated every step is mmapped every step
  (seen: the 25 MB gate|up activations and the 33.5 MB weight gradient of a 64-expert MoE layer);
- the top of the heap is given back (``M_TRIM_THRESHOLD``, dynamic) once enough is free, and the
  next step faults it in again.

Measured on the 64-expert top-6 MoE block (d=256, expert width 256, 2048 tokens), fwd+bwd: 16-25 ms
of a ~250 ms step was kernel time (page faults) on one thread; on two threads the weight-gradient
GEMM, whose fresh output both threads fault in, took 59 ms instead of 20. :func:`tune` sets
``M_MMAP_THRESHOLD`` to 64 MB (the glibc maximum is version dependent; 32 MB if 64 is refused) and
``M_TRIM_THRESHOLD`` to 1 GB: the fault time goes to ~0 (when the re-allocated block fits the freed
one: small allocations carved from a freed block, or THP's 2 MB alignment slack, can still send it to
fresh heap pages; a 5-allocation probe measured 1 to 2,660 faults from one process to the next on
2026-12-06), at the price of the process keeping its
peak heap (measured: RSS ~900 MB instead of 650-730 MB over 60 steps of that block with AdamW,
flat after ~30 steps). Setting these fixes the values (glibc's dynamic adjustment stops).

Called by the training stages of the CLI (``tinyseek pretrain/sft/grpo/dpo/rejection/distill/run``)
and by ``benchmarks/moe_vs_hf.py`` (both sides of every comparison run in the same process).
``TINYSEEK_MALLOC_TUNE=0`` leaves malloc alone; not glibc (macOS, musl): nothing to do.
"""
from __future__ import annotations

import ctypes
import os
import platform

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
MB = 1 << 20
_DONE: dict[str, object] = {}


def is_glibc() -> bool:
    """Whether this process runs on glibc, from ``confstr(CS_GNU_LIBC_VERSION)`` (one libc call).
    Not ``platform.libc_ver()``, which reads the whole Python executable through the heap just
    before the training process's first big allocations."""
    try:
        return os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc")
    except (ValueError, OSError, AttributeError):  # not a POSIX confstr name here
        return False


def tune(mmap_threshold_mb: int = 64, trim_threshold_mb: int = 1024) -> dict | None:
    """Apply the settings once per process; returns what was set ({"mmap_threshold_mb", ...}), or
    None where nothing was done (switched off, not glibc, mallopt refused)."""
    if "result" in _DONE:
        return _DONE["result"]
    result = None
    if os.environ.get("TINYSEEK_MALLOC_TUNE", "1") != "0" and platform.system() == "Linux" and is_glibc():
        try:
            libc = ctypes.CDLL("libc.so.6")
            mmap_mb = next((mb for mb in (mmap_threshold_mb, 32) if libc.mallopt(M_MMAP_THRESHOLD, mb * MB) == 1),
                           None)
            if mmap_mb is not None and libc.mallopt(M_TRIM_THRESHOLD, trim_threshold_mb * MB) == 1:
                result = {"mmap_threshold_mb": mmap_mb, "trim_threshold_mb": trim_threshold_mb}
        except (OSError, AttributeError):
            result = None
    _DONE["result"] = result
    return result
