"""Packed token shards (uint16/uint32 memmap); the resumable, DDP-aware loader is :mod:`tinyseek.data.loader`.

Layout of a shard folder::

    index.json          {"dtype": "uint16", "vocab_size": V, "n_tokens": N, "eos_id": e, "max_id": m,
                         "quick_check": {"chunks": 16, "chunk_bytes": 1048576},
                         "shards": [{"file": "shard_00000.bin", "n_tokens": n, "max_id": m,
                                     "sha256": h, "quick_sha256": q}, ...]}
    shard_00000.bin     raw little-endian token ids, documents joined with eos

Integrity (checked when a :class:`ShardLoader` opens the folder; ``verify=`` or the environment
variable ``TINYSEEK_VERIFY=full|quick|off``, default ``quick``; :mod:`tinyseek.integrity`):

- always: every file exists and has the size the index says; the index's ``max_id`` is below the
  vocabulary (the index's, or the model's when the loader is given ``vocab_size``); and every batch
  the loader yields is checked for out-of-vocabulary ids (an error naming the shard, never an
  ``IndexError`` or a device-side assert in the embedding).
- ``quick``: shards up to ``FULL_CHECK_BYTES`` (256 MiB; the default shards are 32-64 MB) are hashed
  whole (sha256) and scanned for their largest id; a larger shard is checked by ``quick_sha256``,
  the sha256 of ``chunks`` evenly spaced ``chunk_bytes`` pieces (the first and last included), so
  a change outside those pieces goes unnoticed until a batch reads an out-of-range id.
- ``full``: every shard hashed whole and scanned. ``off``: sizes only.
A mismatch is a one-line ``UserError`` naming the file. Measured (2-core CPU, page cache): a 100M-token
uint16 shard (200 MB) hashes and scans in 0.2 s.

The loader treats all shards as one token stream cut into blocks of ``T`` tokens (each row reads
its block plus the next token as the last target). Every micro-step the *global* batch takes
``world * B`` blocks; rank r reads its own ``B``, so ranks never overlap. With ``shuffle`` (default)
the blocks of each epoch are visited in a seeded permutation (``seed + epoch``), so a batch mixes
documents and domains instead of reading one long document; without it they are read in order.
The position is one integer (``pos``, in blocks) plus an ``epoch`` counter, so resuming is exact;
at the end of an epoch it wraps to the next. ``state_dict()`` goes into checkpoints.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable

import numpy as np

from tinyseek.fsutil import atomic_dir
from tinyseek.errors import UserError
from tinyseek.integrity import (FULL_CHECK_BYTES, QUICK_CHUNK_BYTES, QUICK_CHUNKS, quick_ranges, quick_sha256,
                                verify_mode)

SHARD_TOKENS = 1 << 24  # tokens per shard file (64 MB at uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def _scan(f: Path, dt: np.dtype, ranges: list[tuple[int, int]] | None) -> tuple[str, int]:
    """sha256 and largest id of the whole file (``ranges=None``) or of the given byte ranges."""
    h, mx = hashlib.sha256(), -1
    step = 1 << 22
    with open(f, "rb") as fh:
        for a, b in ranges or [(0, f.stat().st_size)]:
            fh.seek(a)
            at = a
            while at < b:
                buf = fh.read(min(step, b - at))
                if not buf:
                    break
                h.update(buf)
                off = (-at) % dt.itemsize  # ranges start aligned; guard anyway
                ids = np.frombuffer(buf, dtype=dt, count=(len(buf) - off) // dt.itemsize, offset=off)
                if ids.size:
                    mx = max(mx, int(ids.max()))
                at += len(buf)
    return h.hexdigest(), mx


def verify_shards(path: str | Path, index: dict | None = None, verify: str | None = None,
                  vocab_size: int | None = None) -> str:
    """Check a shard folder against its index (see the module docstring for what each mode covers);
    returns the mode used. Raises a one-line ``UserError`` naming the first bad file."""
    path = Path(path)
    index = index if index is not None else read_index(path)
    mode = verify_mode(verify)
    dt = np.dtype(index["dtype"])
    limit = min(int(index["vocab_size"]), vocab_size) if vocab_size else int(index["vocab_size"])
    if vocab_size and int(index.get("max_id", -1)) >= vocab_size:
        raise UserError(f"shards at {path} hold token ids up to {index['max_id']} but the model's vocabulary has "
                        f"{vocab_size} entries; use shards built with this model's tokenizer")
    qc = index.get("quick_check", {})
    for s in index["shards"]:
        f = path / s["file"]
        if not f.exists():
            raise UserError(f"missing shard file {f}; rebuild the shards with `tinyseek data`")
        st = f.stat()
        if st.st_size != s["n_tokens"] * dt.itemsize:
            raise UserError(f"shard {f} has {st.st_size} bytes, index says {s['n_tokens']} tokens "
                            f"({s['n_tokens'] * dt.itemsize} bytes); rebuild the shards with `tinyseek data`")
        if "max_id" in s and int(s["max_id"]) >= limit:
            raise UserError(f"shard {f}: index records token id {s['max_id']}, outside the vocabulary "
                            f"[0, {limit}); rebuild the shards with the model's tokenizer")
        if mode == "off":
            continue
        whole = mode == "full" or st.st_size <= FULL_CHECK_BYTES or "quick_sha256" not in s
        ranges = None if whole else quick_ranges(st.st_size, int(qc.get("chunks", QUICK_CHUNKS)),
                                                 int(qc.get("chunk_bytes", QUICK_CHUNK_BYTES)))
        digest, mx = _scan(f, dt, ranges)
        want = s.get("sha256") if whole else s["quick_sha256"]
        if want is not None and digest != want:
            what = "sha256" if whole else f"sampled sha256 ({len(ranges)} x {ranges[0][1] - ranges[0][0]} bytes)"
            raise UserError(f"shard {f} fails its {what} check (index {want[:12]}..., file {digest[:12]}...): "
                            f"it changed after it was written; rebuild the shards with `tinyseek data`")
        if mx >= limit:
            raise UserError(f"shard {f} holds token id {mx}, outside the vocabulary [0, {limit}); "
                            f"rebuild the shards with the model's tokenizer")
    return mode


def write_shards(docs: Iterable[Iterable[int]], out_dir: str | Path, vocab_size: int, eos_id: int,
                 shard_tokens: int = SHARD_TOKENS, extra: dict | None = None) -> dict:
    """Write token documents (each followed by ``eos_id``) into shards, atomically.

    The folder appears complete or not at all (written to a temp dir, then renamed).
    Returns the index dict.
    """
    dt = token_dtype(vocab_size)
    out_dir = Path(out_dir)
    index = {"dtype": dt.name, "vocab_size": vocab_size, "eos_id": eos_id, "n_tokens": 0, "n_docs": 0, "max_id": -1,
             "quick_check": {"chunks": QUICK_CHUNKS, "chunk_bytes": QUICK_CHUNK_BYTES}, "shards": []}
    qc = (QUICK_CHUNKS, QUICK_CHUNK_BYTES)
    with atomic_dir(out_dir) as tmp:
        buf: list[np.ndarray] = []
        buffered = 0

        def flush(final: bool = False) -> None:
            nonlocal buf, buffered
            while buffered >= shard_tokens or (final and buffered > 0):
                arr = np.concatenate(buf) if len(buf) > 1 else buf[0]
                take, rest = arr[:shard_tokens], arr[shard_tokens:]
                name = f"shard_{len(index['shards']):05d}.bin"
                raw = take.astype(dt).tobytes()
                (tmp / name).write_bytes(raw)
                mx = int(take.max())
                index["max_id"] = max(index["max_id"], mx)
                index["shards"].append({"file": name, "n_tokens": int(take.size), "max_id": mx,
                                        "sha256": hashlib.sha256(raw).hexdigest(),
                                        "quick_sha256": quick_sha256(raw, quick_ranges(len(raw), *qc))})
                buf, buffered = ([rest] if rest.size else []), int(rest.size)

        eos = np.array([eos_id], dtype=np.int64)
        for doc in docs:
            body = doc.astype(np.int64) if isinstance(doc, np.ndarray) else np.fromiter(doc, dtype=np.int64)
            ids = np.concatenate([body, eos])
            if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
                raise UserError(f"token id out of range [0, {vocab_size}) in document {index['n_docs']}")
            buf.append(ids)
            buffered += ids.size
            index["n_tokens"] += int(ids.size)
            index["n_docs"] += 1
            flush()
        flush(final=True)
        if extra:
            index.update(extra)
        (tmp / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return index


def read_index(path: str | Path) -> dict:
    p = Path(path) / "index.json"
    if not p.exists():
        raise UserError(f"no token shards at {path} (missing index.json); run `tinyseek data` first")
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt shard index {p}: {e}") from None


class TooFewTokens(UserError):
    """The shards hold fewer tokens than one global batch (a caller may fall back to other data)."""
