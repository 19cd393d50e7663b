"""One switch for how hard artifact readers check what they read: ``TINYSEEK_VERIFY``.

Token shards (:mod:`tinyseek.data.shards`) and checkpoints (:mod:`tinyseek.train.checkpoint`) record
a sha256 of each file when they are written, plus a *sampled* sha256 (``chunks`` evenly spaced pieces
of ``chunk_bytes``, the first and last included). Readers compare them according to
``TINYSEEK_VERIFY`` (or an explicit ``verify=``):

- ``quick`` (default): files up to :data:`FULL_CHECK_BYTES` (256 MiB) are hashed whole; larger ones
  by the sampled hash (16 x 1 MiB), so a change between the pieces of a large file goes unnoticed.
  Every file's byte size is checked in every mode but ``off``.
- ``full``: every file hashed whole (measured on the 2-core CPU machines: ~0.45 s per 500 MB).
- ``off``: sizes only for shards, nothing for checkpoints.

Checksums catch damage (disk, copy, truncation), not tampering: whoever can rewrite a file can
rewrite the checksum beside it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

from tinyseek.errors import UserError

VERIFY_ENV = "TINYSEEK_VERIFY"
VERIFY_MODES = ("full", "quick", "off")
FULL_CHECK_BYTES = 1 << 28  # quick verification hashes files up to this size whole, samples larger ones
QUICK_CHUNKS, QUICK_CHUNK_BYTES = 16, 1 << 20  # what the sampled hash covers (recorded beside it)


def verify_mode(verify: str | None = None) -> str:
    """``verify`` if given, else ``$TINYSEEK_VERIFY``, else ``quick``; anything else is a UserError."""
    mode = (verify if verify is not None else os.environ.get(VERIFY_ENV, "") or "quick").strip().lower()
    if mode not in VERIFY_MODES:
        raise UserError(f"{VERIFY_ENV} must be one of {', '.join(VERIFY_MODES)}, got {mode!r}")
    return mode


def quick_ranges(size: int, chunks: int = QUICK_CHUNKS, chunk_bytes: int = QUICK_CHUNK_BYTES) -> list[tuple[int, int]]:
    """Byte ranges ``(start, stop)`` the sampled hash covers: the whole file when it is at most
    ``chunks * chunk_bytes`` bytes, else ``chunks`` evenly spaced pieces (starts rounded down to a
    multiple of 8), the first and the last (ending at ``size``) included.

    >>> quick_ranges(10, 4, 4)
    [(0, 10)]
    >>> quick_ranges(100, 3, 10)
    [(0, 10), (40, 50), (90, 100)]
    """
    if size <= chunks * chunk_bytes or chunks < 2:
        return [(0, size)]
    step = (size - chunk_bytes) / (chunks - 1)
    starts = [int(i * step) // 8 * 8 for i in range(chunks - 1)] + [size - chunk_bytes]
    return [(a, a + chunk_bytes) for a in starts]


def quick_sha256(data, ranges: list[tuple[int, int]]) -> str:
    """sha256 of the concatenated byte ``ranges`` of ``data`` (bytes or a memoryview-able buffer)."""
    h = hashlib.sha256()
    mv = memoryview(data)
    for a, b in ranges:
        h.update(mv[a:b])
    return h.hexdigest()


def sha256_file(path: str | Path) -> str:
    """sha256 of a whole file (streamed)."""
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def quick_sha256_file(path: str | Path, chunks: int = QUICK_CHUNKS, chunk_bytes: int = QUICK_CHUNK_BYTES) -> str:
    """The sampled hash of a file: sha256 of its :func:`quick_ranges` (the whole file when small)."""
    path = Path(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for a, b in quick_ranges(path.stat().st_size, chunks, chunk_bytes):
            f.seek(a)
            left = b - a
            while left > 0:
                buf = f.read(min(left, 1 << 22))
                if not buf:
                    break
                h.update(buf)
                left -= len(buf)
    return h.hexdigest()
