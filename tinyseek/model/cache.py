"""Preallocated KV cache with a per-row length, so rows of a batch may be at different positions.

That per-row length is what lets the serving engine admit a new request into a running batch
(continuous batching): each slot is an independent sequence. For MLA the cache stores the
compressed latent (``kv_lora_rank`` + ``qk_rope_head_dim`` floats per token, shared by all heads,
in one ``latent`` buffer ``[c_kv | k_pe]`` so that absorbed decoding attends over it without a copy),
which is the whole point of MLA; for GQA it stores keys and values of the ``n_kv_heads`` heads.

With a sliding window the cache is still full length (no ring buffer): the window is applied as a
mask. That keeps the code simple; memory is not saved by the window here.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, cfg, batch_size: int, max_len: int | None = None,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        self.max_len = max_len or cfg.max_seq_len
        self.batch_size = batch_size
        self.lengths = torch.zeros(batch_size, dtype=torch.long, device=device)  # tokens held per row
        self.layers: list[dict[str, torch.Tensor]] = []
        for _ in range(cfg.n_layers):
            if cfg.attn == "mla":
                width = cfg.kv_lora_rank + cfg.qk_rope_head_dim  # [c_kv | k_pe] per token
                self.layers.append({"latent": torch.zeros(batch_size, self.max_len, width, device=device, dtype=dtype)})
            else:
                hd = cfg.gqa_head_dim
                self.layers.append({
                    "k": torch.zeros(batch_size, cfg.n_kv_heads, self.max_len, hd, device=device, dtype=dtype),
                    "v": torch.zeros(batch_size, cfg.n_kv_heads, self.max_len, hd, device=device, dtype=dtype),
                })

    def reset(self, rows: torch.Tensor | list[int] | None = None) -> None:
        """Forget the contents of ``rows`` (all rows if None). The memory is reused."""
        if rows is None:
            self.lengths.zero_()
        else:
            self.lengths[torch.as_tensor(rows, dtype=torch.long, device=self.lengths.device)] = 0

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for layer in self.layers for t in layer.values())


def write_rows(buf: torch.Tensor, new: torch.Tensor, pos_BT: torch.Tensor, seq_dim: int) -> None:
    """Write ``new`` (B, ..T..) into ``buf`` (B, ..L..) at positions ``pos_BT`` along ``seq_dim``."""
    if new.dtype != buf.dtype:
        new = new.to(buf.dtype)
    if seq_dim == 1:  # buf (B, L, C), new (B, T, C)
        buf.scatter_(1, pos_BT.unsqueeze(-1).expand(-1, -1, buf.shape[-1]), new)
    else:  # seq_dim == 2: buf (B, H, L, K), new (B, H, T, K)
        buf.scatter_(2, pos_BT[:, None, :, None].expand(-1, buf.shape[1], -1, buf.shape[-1]), new)
