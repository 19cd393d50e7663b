"""Building blocks shared by attention and FFN: RMSNorm, RoPE, SwiGLU.

Shape suffix legend used across ``tinyseek/model``: B batch, T query tokens, L cache/key length,
H heads, D model width, K head width, F FFN width, E experts, N flattened tokens (B*T).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.model.linear_kernel import Linear


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x * rsqrt(mean(x^2) + eps) * weight in fp32: one fused op (the hand-written form cost 8
        # small ops, which dominate a decode step of a small model)
        w = self.weight
        if x.dtype == torch.float32 and w.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), w, self.eps)
        return F.rms_norm(x.float(), (x.shape[-1],), w.float(), self.eps).to(x.dtype)


class Rotary(nn.Module):
    """RoPE table, indexed by absolute positions (so every batch row may be at a different length).

    Uses the "rotate half" layout (Llama/HF ``rotate_half``), not the interleaved-pair layout of the
    DeepSeek-V3 reference code; HF export therefore sets ``rope_interleave=False``.
    """

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        inv = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (L, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", emb.sin(), persistent=False)

    def forward(self, pos_BT: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, dim) for broadcasting over heads."""
        return self.cos[pos_BT].unsqueeze(1), self.sin[pos_BT].unsqueeze(1)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x_BHTK: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    if cos.dtype != x_BHTK.dtype:
        cos, sin = cos.to(x_BHTK.dtype), sin.to(x_BHTK.dtype)
    return (x_BHTK * cos) + (rotate_half(x_BHTK) * sin)


class SwiGLU(nn.Module):
    """Dense FFN: down(silu(gate(x)) * up(x))."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = Linear(dim, hidden, bias=False)
        self.up_proj = Linear(dim, hidden, bias=False)
        self.down_proj = Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
