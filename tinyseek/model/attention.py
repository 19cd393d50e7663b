"""Attention: MLA (DeepSeek-V2/V3 multi-head latent attention) and GQA, both with RoPE, an optional
sliding window, and the per-row KV cache of :mod:`tinyseek.model.cache`.

Deviations from the DeepSeek-V3 reference, on purpose:
- MLA caches the normalised latent ``c_kv`` and the roped shared key ``k_pe`` and re-expands keys and
  values with ``kv_b_proj`` at every step ("naive" mode, no weight absorption). Simple and exact;
  the absorbed variant only pays off at large head counts.
- No YaRN scaling (our contexts are short); softmax scale is 1/sqrt(qk_nope + qk_rope).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.model.cache import write_rows
from tinyseek.model.layers import RMSNorm, apply_rope


def attention_mask(pos_BT: torch.Tensor, key_len: int, window: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, L): query at absolute position p sees keys j with p-window < j <= p.

    >>> attention_mask(torch.tensor([[0, 1, 2]]), 3, 0).int().squeeze().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> attention_mask(torch.tensor([[0, 1, 2]]), 3, 2).int().squeeze().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    j = torch.arange(key_len, device=pos_BT.device)
    p = pos_BT.unsqueeze(-1)  # (B, T, 1)
    m = j <= p
    if window > 0:
        m = m & (j > p - window)
    return m.unsqueeze(1)


def _sdpa(q, k, v, pos_BT, key_len, window, cached, scale, gqa=False):
    if not cached and window == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(pos_BT, key_len, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class MLA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.window = cfg.sliding_window
        qk = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.q_a_proj = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = nn.Linear(cfg.d_model, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(cfg.d_model, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.kv_b_proj = nn.Linear(self.kv_rank, self.n_heads * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.vdim, cfg.d_model, bias=False)
        self.scale = qk ** -0.5

    def forward(self, x_BTD, cos, sin, pos_BT, cache_layer=None, key_len=None):
        B, T, _ = x_BTD.shape
        H = self.n_heads
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BHTK = q.view(B, T, H, self.nope + self.rope).transpose(1, 2)
        q_nope, q_pe = q_BHTK.split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        ckv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        ckv_BTC = self.kv_a_layernorm(ckv)
        kpe_BTR = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        if cache_layer is not None:
            write_rows(cache_layer["ckv"], ckv_BTC, pos_BT, 1)
            write_rows(cache_layer["kpe"], kpe_BTR, pos_BT, 1)
            ckv_BTC = cache_layer["ckv"][:, :key_len].to(x_BTD.dtype)
            kpe_BTR = cache_layer["kpe"][:, :key_len].to(x_BTD.dtype)
        L = ckv_BTC.shape[1]
        kv = self.kv_b_proj(ckv_BTC).view(B, L, H, self.nope + self.vdim).transpose(1, 2)
        k_nope, v_BHLK = kv.split([self.nope, self.vdim], dim=-1)
        k_BHLK = torch.cat([k_nope, kpe_BTR.unsqueeze(1).expand(B, H, L, self.rope)], dim=-1)
        q_BHTK = torch.cat([q_nope, q_pe], dim=-1)
        o = _sdpa(q_BHTK, k_BHLK, v_BHLK, pos_BT, L, self.window, cache_layer is not None, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.vdim))


class GQA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.hd = cfg.gqa_head_dim
        self.window = cfg.sliding_window
        self.q_proj = nn.Linear(cfg.d_model, self.n_heads * self.hd, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, self.n_kv * self.hd, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.hd, cfg.d_model, bias=False)

    def forward(self, x_BTD, cos, sin, pos_BT, cache_layer=None, key_len=None):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.hd).transpose(1, 2)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_layer is not None:
            write_rows(cache_layer["k"], k, pos_BT, 2)
            write_rows(cache_layer["v"], v, pos_BT, 2)
            k = cache_layer["k"][:, :, :key_len].to(x_BTD.dtype)
            v = cache_layer["v"][:, :, :key_len].to(x_BTD.dtype)
        o = _sdpa(q, k, v, pos_BT, k.shape[2], self.window, cache_layer is not None, self.hd ** -0.5,
                  gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def build_attention(cfg) -> nn.Module:
    return MLA(cfg) if cfg.attn == "mla" else GQA(cfg)
