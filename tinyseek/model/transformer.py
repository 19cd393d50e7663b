"""Decoder-only transformer: embedding -> blocks (RMSNorm, attention, RMSNorm, dense or MoE FFN)
-> RMSNorm -> LM head. The first ``n_dense_layers`` blocks use a dense SwiGLU (V3 first_k_dense).

``forward`` returns a :class:`ModelOutput` with logits, the loss (cross-entropy + balance loss),
and per-MoE-layer statistics (expert token counts, dropped assignments) in training mode. Callers
that do aux-loss-free balancing pass those counts to :meth:`Transformer.update_expert_bias` before
the optimizer step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from tinyseek.config import ModelConfig
from tinyseek.model.attention import build_attention
from tinyseek.model.cache import KVCache
from tinyseek.model.layers import Linear, RMSNorm, Rotary, SwiGLU, rope_frequencies
from tinyseek.model.moe import MoE


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    loss: torch.Tensor | None = None       # ce_loss + aux_loss (None without targets)
    ce_loss: torch.Tensor | None = None
    aux_loss: torch.Tensor | None = None
    expert_counts: torch.Tensor | None = None  # (n_moe_layers, E) token counts, training only
    dropped: torch.Tensor | None = None        # (n_moe_layers,) assignments dropped by capacity


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = build_attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.is_moe = cfg.n_routed_experts > 0 and layer_id >= cfg.n_dense_layers
        self.ffn = MoE(cfg) if self.is_moe else SwiGLU(cfg.d_model, cfg.d_ff)

    def forward(self, x, cos, sin, pos_BT, cache_layer=None, key_len=None):
        return self._ffn(x + self.attn(self.attn_norm(x), cos, sin, pos_BT, cache_layer, key_len))

    def forward_ragged(self, x_1ND, cos, sin, rows_N, pos_N, cache_layer):
        return self._ffn(x_1ND + self.attn.forward_ragged(self.attn_norm(x_1ND), cos, sin, rows_N, pos_N,
                                                          cache_layer["latent"]))

    def _ffn(self, x):
        h = self.ffn_norm(x)
        if self.is_moe:
            y, stats = self.ffn(h)
        else:
            y, stats = self.ffn(h), {}
        return x + y, stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.n_layers)])
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        rope_dim = cfg.qk_rope_head_dim if cfg.attn == "mla" else cfg.gqa_head_dim
        inv_freq, rope_scale = rope_frequencies(cfg, rope_dim)
        self.rotary = Rotary(rope_dim, cfg.max_seq_len, inv_freq=inv_freq, scale=rope_scale)
        self.grad_checkpointing = False
        self.reset_parameters()

    # --- init ------------------------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        for name, p in self.named_parameters():
            if name.endswith(".bias"):
                nn.init.zeros_(p)  # projection biases (qkv_bias / o_bias) start at zero
                continue
            if p.dim() == 1:
                continue  # norms stay at one
            nn.init.normal_(p, mean=0.0, std=std)
            if name.endswith(("o_proj.weight", "down_proj.weight", "w_down")):
                p.mul_((2 * self.cfg.n_layers) ** -0.5)  # GPT-2 style residual scaling
        for b in self.blocks:
            if b.is_moe:
                b.ffn.router.expert_bias.zero_()
                if hasattr(b.ffn.router, "expert_load"):
                    b.ffn.router.expert_load.fill_(1.0 / self.cfg.n_routed_experts)

    @property
    def moe_layers(self) -> list[MoE]:
        return [b.ffn for b in self.blocks if b.is_moe]

    def num_params(self, active: bool = False) -> int:
        """Total parameters, or parameters touched per token (top-k of the routed experts)."""
        n = sum(p.numel() for p in self.parameters())
        if active:
            for m in self.moe_layers:
                per = m.experts.w_gate_up[0].numel() + m.experts.w_down[0].numel()
                n -= per * (m.n_experts - m.top_k)
        return n

    # --- forward ---------------------------------------------------------------------------
    def forward(self, idx_BT: torch.Tensor, targets_BT: torch.Tensor | None = None,
                cache: KVCache | None = None, logits_at: torch.Tensor | None = None,
                logits_mask: torch.Tensor | None = None) -> ModelOutput:
        """``targets`` use -100 for positions without loss. With ``cache``, ``idx`` continues each
        row from ``cache.lengths`` and the lengths advance by T. ``logits_at`` (B,) positions:
        logits only there, shape (B, 1, V) (a prefill needs the last prompt position only). ``logits_mask``
        (B, T) bool: logits only where it is true, shape (N, V) in row-major order (RL and SFT losses
        need the response positions only: with a 49k vocabulary the LM head over every prompt token
        was a third of a GRPO step's memory)."""
        B, T = idx_BT.shape
        if cache is None:
            pos_BT = torch.arange(T, device=idx_BT.device).expand(B, T)
            key_len = None
        else:
            pos_BT = cache.lengths[:, None] + torch.arange(T, device=idx_BT.device)
            key_len = int(cache.lengths.max()) + T
        need = T if cache is None else key_len
        limit = self.cfg.max_seq_len if cache is None else min(cache.max_len, self.cfg.max_seq_len)
        if need > limit:
            raise ValueError(f"sequence of length {need} exceeds the limit {limit} (max_seq_len / cache length)")
        cos, sin = self.rotary(pos_BT)
        x = self.embed(idx_BT)
        aux = x.new_zeros((), dtype=torch.float32)
        counts, dropped = [], []
        for i, block in enumerate(self.blocks):
            layer_cache = cache.layers[i] if cache is not None else None
            if self.grad_checkpointing and self.training and torch.is_grad_enabled():
                x, stats = checkpoint(block, x, cos, sin, pos_BT, layer_cache, key_len, use_reentrant=False)
            else:
                x, stats = block(x, cos, sin, pos_BT, layer_cache, key_len)
            if "aux_loss" in stats:
                aux = aux + stats["aux_loss"].float()
            if "counts" in stats:
                counts.append(stats["counts"])
                dropped.append(stats["dropped"])
        if cache is not None:
            cache.lengths += T
        if logits_at is not None:
            if targets_BT is not None:
                raise ValueError("logits_at and targets are exclusive (the loss needs every position)")
            x = x[torch.arange(B, device=x.device), logits_at][:, None]
        elif logits_mask is not None:
            if targets_BT is not None:
                raise ValueError("logits_mask and targets are exclusive (the loss needs every position)")
            x = x[logits_mask]
        logits = self.lm_head(self.norm(x))
        out = ModelOutput(logits=logits, aux_loss=aux,
                          expert_counts=torch.stack(counts) if counts else None,
                          dropped=torch.stack(dropped) if dropped else None)
        if targets_BT is not None:
            out.ce_loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets_BT.reshape(-1),
                                          ignore_index=-100)
            out.loss = out.ce_loss + aux
        return out

    def can_ragged(self, cache: KVCache | None) -> bool:
        """Whether :meth:`forward_ragged` runs here: MLA layers whose absorbed form folds, the
        latent-attention C kernel available (CPU fp32), inference (no gradient), an MLA cache."""
        if self.cfg.attn != "mla" or cache is None or "latent" not in cache.layers[0] or torch.is_grad_enabled():
            return False
        probe = cache.layers[0]["latent"][:0, 0]  # dtype / device of the activations' kind
        return all(b.attn.can_ragged(probe) for b in self.blocks)

    @torch.no_grad()
    def forward_ragged(self, idx_N: torch.Tensor, rows_N: torch.Tensor, pos_N: torch.Tensor, cache: KVCache,
                       logits_at: torch.Tensor) -> torch.Tensor:
        """One forward over a ragged batch: token ``idx_N[n]`` at position ``pos_N[n]`` of cache row
        ``rows_N[n]`` (the serving engine's mixed step: one token of each decoding row plus whole
        prompts of newly admitted ones, so a prefill rides along with a decode step instead of
        costing a forward of its own). Each row's tokens must be given in position order and the
        row's earlier positions already be in the cache. ``cache.lengths`` is left alone (the caller
        advances it). Returns the logits (len(logits_at), V) of the tokens ``logits_at`` (indices
        into N). Per token, the same operations as :meth:`forward` with a cache (the absorbed MLA
        form, the C kernels: a token's result does not depend on the others'; tested). Only where
        :meth:`can_ragged` holds."""
        if int(pos_N.max()) >= min(cache.max_len, self.cfg.max_seq_len):
            raise ValueError(f"position {int(pos_N.max())} exceeds the cache length {cache.max_len}")
        cos, sin = self.rotary(pos_N[None])
        x = self.embed(idx_N[None])
        for i, block in enumerate(self.blocks):
            x, _ = block.forward_ragged(x, cos, sin, rows_N, pos_N, cache.layers[i])
        return self.lm_head(self.norm(x[:, logits_at]))[0]

    # --- aux-loss-free balancing, load-aware routing's counter ---------------------------------
    @torch.no_grad()
    def update_expert_bias(self, counts_LE: torch.Tensor) -> None:
        """Each MoE layer's per-step balancing updates (:meth:`MoE.update_balance`: the sign-rule
        bias, the load-aware counter) from accumulated training token counts."""
        for m, c in zip(self.moe_layers, counts_LE):
            m.update_balance(c)

    def new_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        p = next(self.parameters())
        return KVCache(self.cfg, batch_size, max_len, device=p.device, dtype=dtype or p.dtype)
