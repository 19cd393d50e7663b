"""The resumable, DDP-aware batch loader over a shard folder (:mod:`tinyseek.data.shards` writes and
verifies the folder; see its docstring for the layout, the integrity checks and the block order)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tinyseek.data.shards import TooFewTokens, read_index, verify_shards
from tinyseek.errors import UserError


class ShardLoader:
    """Yields (x, y) int64 batches of shape (B, T) from a shard folder; resumable; DDP-aware.

    The folder is verified on open (``verify``: full / quick / off, default ``$TINYSEEK_VERIFY`` or
    quick; see the module docstring). ``vocab_size`` (the model's) tightens the id check: no batch
    ever holds an id >= ``min(vocab_size, index vocab_size)``; one that would is a ``UserError``
    naming the shard file."""

    def __init__(self, path: str | Path, batch_size: int, seq_len: int, rank: int = 0, world_size: int = 1,
                 device: torch.device | str = "cpu", shuffle: bool = True, seed: int = 0,
                 vocab_size: int | None = None, verify: str | None = None):
        self.path = Path(path)
        self.index = read_index(path)
        dt = np.dtype(self.index["dtype"])
        self.verify = verify_shards(self.path, self.index, verify, vocab_size)
        iv = int(self.index["vocab_size"])
        self.id_limit = min(iv, vocab_size) if vocab_size else iv
        self.parts = [np.memmap(self.path / s["file"], dtype=dt, mode="r") for s in self.index["shards"]]
        self.offsets = np.cumsum([0] + [p.size for p in self.parts])
        self.n_tokens = int(self.offsets[-1])
        self.B, self.T, self.rank, self.world = batch_size, seq_len, rank, world_size
        self.shuffle, self.seed = shuffle, seed
        self.n_blocks = max(0, (self.n_tokens - 1) // seq_len)
        self.step_blocks = world_size * batch_size
        if self.n_blocks < self.step_blocks:
            raise TooFewTokens(f"shards at {path} hold {self.n_tokens} tokens, fewer than one global batch "
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
        if rows.size and int(rows.max()) >= self.id_limit:
            self._oov(rows, blocks)
        self.pos += self.step_blocks
        buf = torch.from_numpy(rows)
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _oov(self, rows: np.ndarray, blocks: np.ndarray) -> None:
        r, c = np.argwhere(rows >= self.id_limit)[0]
        at = int(blocks[r]) * self.T + int(c)
        i = int(np.searchsorted(self.offsets, at, side="right") - 1)
        f = self.path / self.index["shards"][i]["file"]
        raise UserError(f"shard {f} holds token id {int(rows[r, c])} at token {at - int(self.offsets[i])}, outside "
                        f"the vocabulary [0, {self.id_limit}); rebuild the shards with the model's tokenizer")

    def state_dict(self) -> dict:
        return {"pos": self.pos, "epoch": self.epoch}

    def load_state_dict(self, st: dict) -> None:
        self.pos, self.epoch = int(st["pos"]), int(st["epoch"])
