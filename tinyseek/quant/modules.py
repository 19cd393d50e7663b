"""Quantized drop-in modules: :class:`QuantLinear` (for ``nn.Linear``), :class:`QuantExperts`
(for the stacked MoE experts) and :class:`QuantEmbedding` (for the token embedding). They hold
only integer codes + fp16 scales (int4: two codes per byte), so the weights really take ~8 or
~4.5 bits in memory; the float weight exists only transiently inside a forward call.

Each module holds its :class:`~tinyseek.quant.formats.QuantFormat` (``fmt``; given as a format, its
name or its bit width), chosen once when it is built: it quantizes, dequantizes and names the fused
kernel (``fmt.kernel``, None: PyTorch ops only). Which path a call takes then depends only on the
call (rows, dtype, device, autograd) and the kernels' on/off switch (:mod:`tinyseek.kernels.quant`).

- one scale a row, unpacked codes (``fmt.scales_rows``: int8, W8A16): for a few rows (decode)
  ``linear(x, q) * s`` (scale the small output), for many rows (prefill) dequantise the weight
  once (``q * s``) and do one float GEMM.
- group scales or packed codes (int4, W4A16): unpack nibbles -> int8 codes -> ``codes * group
  scale`` -> one float GEMM. The dequantised weight is never cached across calls (that would undo
  the memory saving).
- decode (at most ``kq.MAX_ROWS`` rows, fp32, CPU): fused C kernels that read the codes
  directly (:mod:`tinyseek.kernels.quant`; on by default where a C compiler builds them), one call
  per Linear, one per whole SwiGLU expert, one per dense / shared-expert FFN (:class:`QuantSwiGLU`)
  and one for all routed experts of a MoE layer (:func:`quant_fused_dispatch`).
- W8A8 (``fmt.act_bits``): every product quantizes its input per token and multiplies integers
  (:meth:`~tinyseek.quant.formats.QuantFormat.linear`: the C kernel ``ts_w8a8`` for any number of
  rows, ``torch._int_mm`` without it); an expert runs one such product for gate|up and one for
  down. At decode the fused calls below take W8A8 too (kernel format ``KERNEL_W8A8``: the same
  integer products, their SiLU in C, so equal to the module path up to float rounding).
- embedding: only the looked-up rows are dequantised (``codes[idx] * scale[idx]``); with tied
  embeddings the ``lm_head`` QuantLinear shares the same code and scale tensors (same (V, D)
  layout, scales along D).
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

from tinyseek.kernels import quant as kq
from tinyseek.model.layers import SwiGLU
from tinyseek.model.moe import register_dispatch
from tinyseek.quant.formats import QuantFormat, quant_format


class QuantLinear(nn.Module):
    """Weight-only quantized ``nn.Linear``. A bias (imported Qwen2 q/k/v projections, Llama with
    ``attention_bias``) stays float (fp32) and is added after the quantized product."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str | int, group_size: int = 0,
                 smooth: bool = False, device=None, scale_dtype: torch.dtype | None = None, bias: bool = False):
        super().__init__()
        self.fmt = quant_format(fmt)
        self.in_features, self.out_features, self.bits = in_features, out_features, self.fmt.bits
        self.group_size, self.kernel = self.fmt.group(group_size), self.fmt.kernel
        q, s = self.fmt.empty(out_features, in_features, self.group_size, device, scale_dtype)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)
        self.register_buffer("smooth", torch.ones(in_features, device=device, dtype=torch.float16) if smooth else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_float(cls, w_NK: torch.Tensor, fmt: QuantFormat | str | int, group_size: int = 0, clip_NG=None,
                   smooth_K: torch.Tensor | None = None, bias_N: torch.Tensor | None = None) -> "QuantLinear":
        N, K = w_NK.shape
        m = cls(K, N, fmt, group_size, smooth=smooth_K is not None, device=w_NK.device, bias=bias_N is not None)
        q, s = m.fmt.quantize(w_NK, m.group_size, clip_NG, smooth_K)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        if bias_N is not None:
            m.bias.copy_(bias_N.detach().float())
        if smooth_K is not None:
            m.smooth.copy_(smooth_K)
        return m

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight this module computes with, ``(out, in)`` (``1 / smooth`` folded in)."""
        w = self.fmt.dequantize(self.qweight, self.scale, self.in_features, self.group_size, dtype)
        return w / self.smooth.to(dtype) if self.smooth is not None else w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self._buffers  # direct dict reads: this runs once per Linear per decode step
        y = self._product(x, b)
        return y if b["bias"] is None else y + b["bias"].to(y.dtype)

    def _product(self, x: torch.Tensor, b: dict) -> torch.Tensor:
        """``x @ W^T`` without the bias."""
        if self.fmt.act_bits:
            if b["smooth"] is not None:
                x = x / b["smooth"].to(x.dtype)
            return self.fmt.linear(x, b["qweight"], b["scale"])
        if self.kernel is not None:
            y = kq.quant_mm(x, b["qweight"], b["scale"], self.kernel, self.group_size, b["smooth"])
            if y is not None:
                return y
        if b["smooth"] is not None:
            x = x / b["smooth"].to(x.dtype)
        if self.fmt.scales_rows and x.numel() // self.in_features <= self.in_features:
            return F.linear(x, self.qweight.to(x.dtype)) * self.scale.view(-1).to(x.dtype)
        return F.linear(x, self.fmt.dequantize(self.qweight, self.scale, self.in_features, self.group_size, x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, smooth={self.smooth is not None}, bias={self.bias is not None}")


class QuantSwiGLU(SwiGLU):
    """A ``SwiGLU`` (dense FFN, shared expert) whose three projections are ``QuantLinear`` of one
    bit width and group size: the same children (same state dict), but a decode call runs the
    whole FFN in one fused kernel call (:func:`tinyseek.kernels.quant.ffn`) instead of three module calls plus
    two elementwise ops; otherwise ``SwiGLU.forward``."""

    def __init__(self, src: SwiGLU):
        nn.Module.__init__(self)
        self.gate_proj, self.up_proj, self.down_proj = src.gate_proj, src.up_proj, src.down_proj

    @staticmethod
    def fits(m: nn.Module) -> bool:
        """Whether ``m`` is a plain SwiGLU of three QuantLinear with one format."""
        if type(m) is not SwiGLU:
            return False
        parts = (m.gate_proj, m.up_proj, m.down_proj)
        return all(type(p) is QuantLinear for p in parts) and len({(p.fmt, p.group_size) for p in parts}) == 1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        if g.kernel is not None:
            gb, ub, db = g._buffers, u._buffers, d._buffers
            y = kq.ffn(x, gb["qweight"], gb["scale"], gb["smooth"], ub["qweight"], ub["scale"], ub["smooth"],
                       db["qweight"], db["scale"], db["smooth"], g.kernel, g.group_size)
            if y is not None:
                return y
        return super().forward(x)


class QuantExperts(nn.Module):
    """Quantized stand-in for ``tinyseek.model.moe.Experts`` (stacked SwiGLU experts)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, fmt: QuantFormat | str | int, group_size: int = 0,
                 smooth: bool = False, device=None, scale_dtype: torch.dtype | None = None):
        super().__init__()
        self.fmt = quant_format(fmt)
        self.n_experts, self.dim, self.hidden, self.bits = n_experts, dim, hidden, self.fmt.bits
        self.group_size, self.kernel = self.fmt.group(group_size), self.fmt.kernel
        for name, (n_out, k_in) in (("gate_up", (2 * hidden, dim)), ("down", (dim, hidden))):
            q, s = self.fmt.empty(n_out, k_in, self.group_size, device, scale_dtype)
            q, s = q.expand(n_experts, *q.shape).clone(), s.expand(n_experts, *s.shape).clone()
            self.register_buffer(f"q_{name}", q)
            self.register_buffer(f"s_{name}", s)
            self.register_buffer(f"smooth_{name}",
                                 torch.ones(n_experts, k_in, device=device, dtype=torch.float16) if smooth else None)

    @classmethod
    def from_float(cls, w_gate_up_EDF: torch.Tensor, w_down_EFD: torch.Tensor, fmt: QuantFormat | str | int,
                   group_size: int = 0, smooth: dict[str, torch.Tensor] | None = None) -> "QuantExperts":
        """From ``Experts`` weights; ``smooth`` maps "gate_up"/"down" to ``(E, K)`` column scales."""
        E, D, F2 = w_gate_up_EDF.shape
        m = cls(E, D, F2 // 2, fmt, group_size, smooth=smooth is not None, device=w_gate_up_EDF.device)
        for name, w in (("gate_up", w_gate_up_EDF), ("down", w_down_EFD)):
            for e in range(E):
                s_K = smooth[name][e] if smooth is not None else None
                q, s = m.fmt.quantize(w[e].t(), m.group_size, None, s_K)
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
        w = self.fmt.dequantize(q.reshape(E_ * N, -1), s.reshape(E_ * N, -1), k, self.group_size,
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
        if self.fmt.act_bits:  # W8A8: both products quantize their input per token
            b = self._buffers
            g, u = self.fmt.linear(x_MD, b["q_gate_up"][e], b["s_gate_up"][e]).chunk(2, dim=-1)
            return self.fmt.linear(F.silu(g) * u, b["q_down"][e], b["s_down"][e])
        if x_MD.shape[0] <= kq.MAX_ROWS and self.kernel is not None:
            b = self._buffers  # the whole expert in one call
            y = kq.swiglu(x_MD, b["q_gate_up"], b["s_gate_up"], b["q_down"], b["s_down"], e,
                          self.kernel, self.group_size, b["smooth_gate_up"], b["smooth_down"])
            if y is not None:
                return y
        g, u = (x_MD @ self._dequant("gate_up", e, x_MD.dtype)).chunk(2, dim=-1)
        return (F.silu(g) * u) @ self._dequant("down", e, x_MD.dtype)

    def extra_repr(self) -> str:
        return (f"n_experts={self.n_experts}, dim={self.dim}, hidden={self.hidden}, bits={self.bits}, "
                f"group_size={self.group_size}, smooth={self.smooth_gate_up is not None}")


class QuantEmbedding(nn.Module):
    """Quantized ``nn.Embedding``: the ``(V, D)`` table as codes + scales (per row for int8,
    per group of D for int4); a lookup dequantises only the rows it returns (fp32)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat | str | int, group_size: int = 0,
                 device=None):
        super().__init__()
        self.fmt = quant_format(fmt)
        self.num_embeddings, self.embedding_dim, self.bits = num_embeddings, embedding_dim, self.fmt.bits
        self.group_size, self.kernel = self.fmt.group(group_size), self.fmt.kernel
        q, s = self.fmt.empty(num_embeddings, embedding_dim, self.group_size, device)
        self.register_buffer("qweight", q)
        self.register_buffer("scale", s)

    @classmethod
    def from_float(cls, w_VD: torch.Tensor, fmt: QuantFormat | str | int, group_size: int = 0) -> "QuantEmbedding":
        V, D = w_VD.shape
        m = cls(V, D, fmt, group_size, device=w_VD.device)
        q, s = m.fmt.quantize(w_VD, m.group_size)
        m.qweight.copy_(q)
        m.scale.copy_(s)
        return m

    def dequant(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The whole float table ``(V, D)``."""
        return self.fmt.dequantize(self.qweight, self.scale, self.embedding_dim, self.group_size, dtype)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        b = self._buffers
        if self.kernel is not None:
            y = kq.dequant_rows(b["qweight"], b["scale"], self.kernel, self.embedding_dim, self.group_size, idx)
            if y is not None:
                return y
        flat = idx.reshape(-1)
        w = self.fmt.dequantize(b["qweight"].index_select(0, flat), b["scale"].index_select(0, flat),
                                self.embedding_dim, self.group_size, torch.float32)
        return w.view(*idx.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={self.bits}, group_size={self.group_size}"


QUANT_DISPATCH = "quant_fused"  # MoE.impl of quantized experts (see prefer_per_expert_dispatch)


def quant_fused_dispatch(moe: nn.Module, x_ND, idx_NK, w_NK, keep_A, counts_E):
    """MoE dispatch for ``QuantExperts``: a few tokens without capacity drops (decode) go through
    ONE fused kernel call over all their (token, expert) pairs (:func:`tinyseek.kernels.quant.moe`), skipping the
    sort, gathers, per-expert calls, concatenation and scatter-add; anything else (prefill, capacity
    drops, kernels off) takes the ``sorted`` dispatch. Same maths up to float summation order."""
    ex = moe.experts
    if keep_A is None and x_ND.shape[0] <= kq.MAX_ROWS and isinstance(ex, QuantExperts) and ex.kernel is not None:
        b = ex._buffers
        y = kq.moe(x_ND, idx_NK, w_NK, b["q_gate_up"], b["s_gate_up"], b["q_down"], b["s_down"], ex.kernel,
                        ex.group_size, b["smooth_gate_up"], b["smooth_down"])
        if y is not None:
            return y
    return moe._sorted(x_ND, idx_NK, w_NK, keep_A, counts_E)


register_dispatch(QUANT_DISPATCH, quant_fused_dispatch)  # MoE.impl = QUANT_DISPATCH selects it
