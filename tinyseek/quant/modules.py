"""Quantized drop-in modules: :class:`QuantLinear` (for ``nn.Linear``) and :class:`QuantExperts`
(for the stacked MoE experts). Both hold only integer codes + scales (int4: two codes per byte),
so the weights really take 8 or ~4.5 bits in memory; the float weight exists only transiently
inside a forward call.

- int8 (W8A16): for a few rows (decode) ``linear(x, q) * s`` (scale the small output), for many
  rows (prefill) dequantise the weight once (``q * s``) and do one float GEMM.
- int4 (W4A16): unpack nibbles -> int8 codes -> ``codes * group scale`` -> one float GEMM. The
  dequantised weight is never cached across calls (that would undo the memory saving).
- decode (at most ``kernels.MAX_ROWS`` rows, fp32, CPU): optional fused C++ kernels that read the
  codes directly (:mod:`tinyseek.quant.kernels`; off unless enabled).
- ``smooth`` (optional, AWQ-style smoothing; see ``calibrate.py``): the weight was quantized as
  ``W * s`` per input column (``s`` in fp16), so the input is divided by ``s`` first. For experts
  the ``1 / s`` is folded into the dequantised weight.

``QuantExperts`` stores each expert in the ``(out, in)`` layout (the transpose of ``Experts``) so
scales/groups run along the input dimension like a Linear; its ``w_gate_up`` / ``w_down``
properties return the dequantised stacked tensors in the ``Experts`` layout, and
``expert_forward(e, x)`` dequantises one expert only, so every MoE dispatch path (loop, sorted,
grouped) runs unchanged on it.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.quant import kernels
from tinyseek.quant.ops import SCALE_DTYPE, dequantize, group_scales, n_groups, pack_int4, quantize, unpack_int4


def quantize_weight(w_NK: torch.Tensor, bits: int, group_size: int, clip_NG=None,
                    smooth_K: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(stored codes, scales) of one ``(N, K)`` weight: int8 ``(N, K)`` + fp32 ``(N, 1)``, or packed
    uint8 ``(N, Kp/2)`` + fp16 ``(N, G)``. ``smooth_K`` multiplies the columns first (AWQ)."""
    w = w_NK.detach().float()
    if smooth_K is not None:
        w = w * smooth_K.to(w.device, torch.float16).float()[None, :]
    gs = group_size if bits == 4 else 0
    s = group_scales(w, bits, gs, clip_NG)
    q = quantize(w, bits, gs, s)
    if bits == 4:
        q = pack_int4(q)
    return q, s.to(SCALE_DTYPE[bits])


def dequantize_weight(qweight: torch.Tensor, scale: torch.Tensor, bits: int, k: int, group_size: int,
                      dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``(N, k)`` from :func:`quantize_weight`'s output."""
    q = unpack_int4(qweight) if bits == 4 else qweight
    return dequantize(q, scale, k, group_size if bits == 4 else 0, dtype)


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear`` (no bias: the model has none)."""

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int = 0,
                 smooth: bool = False, device=None):
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else 0
        if bits == 8:
            q = torch.zeros(out_features, in_features, dtype=torch.int8, device=device)
            s = torch.ones(out_features, 1, dtype=SCALE_DTYPE[8], device=device)
        else:
            q = torch.zeros(out_features, (in_features + 1) // 2, dtype=torch.uint8, device=device)
            s = torch.ones(out_features, n_groups(in_features, self.group_size), dtype=SCALE_DTYPE[4], device=device)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.register_buffer("smooth", torch.ones(in_features, device=device, dtype=torch.float16) if smooth else None)

    @classmethod
    def from_float(cls, w_NK: torch.Tensor, bits: int, group_size: int = 0, clip_NG=None,
                   smooth_K: torch.Tensor | None = None) -> "QuantLinear":
        N, K = w_NK.shape
        m = cls(K, N, bits, group_size, smooth=smooth_K is not None, device=w_NK.device)
        q, s = quantize_weight(w_NK, bits, group_size, clip_NG, smooth_K)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        if smooth_K is not None:
            m.smooth.copy_(smooth_K)
        return m

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with, ``(out, in)`` (``1 / smooth`` folded in)."""
        w = dequantize_weight(self.qweight, self.scale, self.bits, self.in_features, self.group_size, dtype)
        return w / self.smooth.to(dtype) if self.smooth is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.smooth is not None:
            x = x / self.smooth.to(x.dtype)
        y = kernels.quant_mm(x, self.qweight, self.scale, self.bits, self.group_size)
        if y is not None:
            return y
        if self.bits == 8 and x.numel() // self.in_features <= self.in_features:
            return F.linear(x, self.qweight.to(x.dtype)) * self.scale.view(-1).to(x.dtype)
        return F.linear(x, dequantize_weight(self.qweight, self.scale, self.bits, self.in_features, self.group_size, x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, smooth={self.smooth is not None}")


class QuantExperts(nn.Module):
    """Quantized stand-in for ``tinyseek.model.moe.Experts`` (stacked SwiGLU experts)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, bits: int, group_size: int = 0,
                 smooth: bool = False, device=None):
        super().__init__()
        self.n_experts, self.dim, self.hidden, self.bits = n_experts, dim, hidden, bits
        self.group_size = group_size if bits == 4 else 0
        for name, (n_out, k_in) in (("gate_up", (2 * hidden, dim)), ("down", (dim, hidden))):
            if bits == 8:
                q = torch.zeros(n_experts, n_out, k_in, dtype=torch.int8, device=device)
                s = torch.ones(n_experts, n_out, 1, dtype=SCALE_DTYPE[8], device=device)
            else:
                q = torch.zeros(n_experts, n_out, (k_in + 1) // 2, dtype=torch.uint8, device=device)
                s = torch.ones(n_experts, n_out, n_groups(k_in, self.group_size), dtype=SCALE_DTYPE[4], device=device)
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"s_{name}", s)
            self.register_buffer(f"smooth_{name}",
                                 torch.ones(n_experts, k_in, device=device, dtype=torch.float16) if smooth else None)

    @classmethod
    def from_float(cls, w_gate_up_EDF: torch.Tensor, w_down_EFD: torch.Tensor, bits: int, group_size: int = 0,
                   smooth: dict[str, torch.Tensor] | None = None) -> "QuantExperts":
        """From ``Experts`` weights; ``smooth`` maps "gate_up"/"down" to ``(E, K)`` column scales."""
        E, D, F2 = w_gate_up_EDF.shape
        m = cls(E, D, F2 // 2, bits, group_size, smooth=smooth is not None, device=w_gate_up_EDF.device)
        for name, w in (("gate_up", w_gate_up_EDF), ("down", w_down_EFD)):
            for e in range(E):
                s_K = smooth[name][e] if smooth is not None else None
                q, s = quantize_weight(w[e].t(), bits, group_size, None, s_K)
                getattr(m, f"q_{name}")[e].copy_(q)
                getattr(m, f"s_{name}")[e].copy_(s)
                if s_K is not None:
                    getattr(m, f"smooth_{name}")[e].copy_(s_K)
        return m

    def _dequant(self, name: str, e: int | None, dtype: torch.dtype) -> torch.Tensor:
        """Dequantised weight in the ``Experts`` layout: ``(K, N)`` for one expert, ``(E, K, N)`` stacked."""
        q, s, ins = getattr(self, f"q_{name}"), getattr(self, f"s_{name}"), getattr(self, f"smooth_{name}")
        k = self.dim if name == "gate_up" else self.hidden
        if e is not None:
            q, s, ins = q[e:e + 1], s[e:e + 1], (ins[e:e + 1] if ins is not None else None)
        E_, N = q.shape[0], q.shape[1]
        w = dequantize_weight(q.reshape(E_ * N, -1), s.reshape(E_ * N, -1), self.bits, k, self.group_size,
                              dtype).view(E_, N, k)
        if ins is not None:
            w = w / ins.to(dtype)[:, None, :]
        w = w.transpose(1, 2)
        return w[0] if e is not None else w

    @property
    def w_gate_up(self) -> torch.Tensor:
        return self._dequant("gate_up", None, torch.float32).contiguous()

    @property
    def w_down(self) -> torch.Tensor:
        return self._dequant("down", None, torch.float32).contiguous()

    def expert_forward(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        if x_MD.shape[0] == 0:
            return x_MD.new_zeros(0, self.dim)
        if x_MD.shape[0] <= kernels.MAX_ROWS:
            y = self._fused(e, x_MD)
            if y is not None:
                return y
        g, u = (x_MD @ self._dequant("gate_up", e, x_MD.dtype)).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self._dequant("down", e, x_MD.dtype)

    def _fused(self, e: int, x_MD: torch.Tensor) -> torch.Tensor | None:
        """Decode path with the fused kernels (None when they are off or not applicable)."""
        if self.smooth_gate_up is not None:
            x_MD = x_MD / self.smooth_gate_up[e].to(x_MD.dtype)
        h = kernels.quant_mm(x_MD, self.q_gate_up[e], self.s_gate_up[e], self.bits, self.group_size)
        if h is None:
            return None
        g, u = h.chunk(2, dim=-1)
        h = F.silu(g) * u
        if self.smooth_down is not None:
            h = h / self.smooth_down[e].to(h.dtype)
        return kernels.quant_mm(h, self.q_down[e], self.s_down[e], self.bits, self.group_size)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, bits={self.bits}, "
                f"group_size={self.group_size}, smooth={self.smooth_gate_up is not None}")
