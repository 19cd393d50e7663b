"""Packed token shards (uint16/uint32 memmap) and a resumable, DDP-aware loader.

Layout of a shard folder::

    index.json          {"dtype": "uint16", "vocab_size": V, "n_tokens": N, "eos_id": e,
                         "shards": [{"file": "shard_00000.bin", "n_tokens": n, "sha256": h}, ...]}
    shard_00000.bin     raw little-endian token ids, documents joined with eos

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
import torch

from tinyseek.common import atomic_dir
from tinyseek.errors import UserError

SHARD_TOKENS = 1 << 24  # tokens per shard file (64 MB at uint32)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 65536 else np.dtype(np.uint32)


def write_shards(docs: Iterable[Iterable[int]], out_dir: str | Path, vocab_size: int, eos_id: int,
                 shard_tokens: int = SHARD_TOKENS, extra: dict | None = None) -> dict:
    """Write token documents (each followed by ``eos_id``) into shards, atomically.

    The folder appears complete or not at all (written to a temp dir, then renamed).
    Returns the index dict.
    """
    dt = token_dtype(vocab_size)
    out_dir = Path(out_dir)
    index = {"dtype": dt.name, "vocab_size": vocab_size, "eos_id": eos_id, "n_tokens": 0, "n_docs": 0, "shards": []}
    with atomic_dir(out_dir) as tmp:
        buf: list[np.ndarray] = []
        buffered = 0

        def flush(final: bool = False) -> None:
            nonlocal buf, buffered
            while buffered >= shard_tokens or (final and buffered > 0):
                arr = np.concatenate(buf) if len(buf) > 1 else buf[0]
                take, rest = arr[:shard_tokens], arr[shard_tokens:]
                name = f"shard_{len(index['shards']):05d}.bin"
                take.astype(dt).tofile(tmp / name)
                index["shards"].append({"file": name, "n_tokens": int(take.size),
                                        "sha256": hashlib.sha256(take.astype(dt).tobytes()).hexdigest()})
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


class ShardLoader:
    """Yields (x, y) int64 batches of shape (B, T) from a shard folder; resumable; DDP-aware."""

    def __init__(self, path: str | Path, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", shuffle: bool = True, seed: int = 0):
        self.path = Path(path)
        self.index = read_index(path)
        dt = np.dtype(self.index["dtype"])
        parts = []
        for s in self.index["shards"]:
            f = self.path / s["file"]
            if not f.exists():
                raise UserError(f"missing shard file {f}")
            if f.stat().st_size != s["n_tokens"] * dt.itemsize:
                raise UserError(f"shard {f} has {f.stat().st_size} bytes, index says {s['n_tokens']} tokens")
            parts.append(np.memmap(f, dtype=dt, mode="r"))
        self.parts = parts
        self.offsets = np.cumsum([0] + [p.size for p in parts])
        self.n_tokens = int(self.offsets[-1])
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.n_blocks = max(0, (self.n_tokens - 1) // seq_len)
        self.step_blocks = world_size * batch_size
        if self.n_blocks < self.step_blocks:
            raise UserError(f"shards at {path} hold {self.n_tokens} tokens, fewer than one global batch "
                            f"({self.step_blocks * seq_len + 1}); lower batch_size/seq_len or add data")
        self.device = torch.device(device)
        self.pos, self.epoch = 0, 0
        self._perm_epoch, self._perm = -1, None

    def _slice(self, start: int, n: int) -> np.ndarray:
        out, need, at = [], n, start
        while need > 0:
            i = int(np.searchsorted(self.offsets, at, side="right") - 1)
            local = at - int(self.offsets[i])
            take = min(need, self.parts[i].size - local)
            out.append(np.asarray(self.parts[i][local:local + take], dtype=np.int64))
            need -= take
            at += take
        return np.concatenate(out)

    def _order(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            if self.shuffle:
                self._perm = np.random.default_rng(self.seed + self.epoch).permutation(self.n_blocks)
            else:
                self._perm = np.arange(self.n_blocks)
            self._perm_epoch = self.epoch
        return self._perm

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.pos + self.step_blocks > self.n_blocks:
            self.pos, self.epoch = 0, self.epoch + 1
        start = self.pos + self.rank * self.B
        blocks = self._order()[start:start + self.B]
        rows = np.stack([self._slice(int(b) * self.T, self.T + 1) for b in blocks])
        self.pos += self.step_blocks
        buf = torch.from_numpy(rows)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, st: dict) -> None:
        self.pos, self.epoch = int(st["pos"]), int(st["epoch"])
