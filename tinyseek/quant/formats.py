"""Quantization formats: the one table (:data:`FORMATS`) that the quantized modules, QAT, the
quantizer and the checkpoint loader ask for bit width, code range, grouping, packing, scale dtype
and fused kernel, instead of branching on bit widths.

A :class:`QuantFormat` is a frozen value; its methods are the whole weight-level contract:

- :meth:`~QuantFormat.quantize` ``(N, K)`` float -> ``(codes, scales)`` in the stored layout;
- :meth:`~QuantFormat.dequantize` the inverse up to rounding, ``(N, k)`` float (fp32 through the
  fused kernel's row dequantiser when one applies, else PyTorch ops; the same values);
- :meth:`~QuantFormat.fake_quantize` ``dequantize(quantize(w))`` with a straight-through gradient
  (QAT), bit-identical to what :meth:`~QuantFormat.quantize` stores;
- :meth:`~QuantFormat.empty` zero codes and unit scales of a weight (a module about to be loaded);
- ``kernel``: which format the fused C decode kernels (:mod:`tinyseek.kernels.quant`) read the codes
  in, or None (the modules then take their PyTorch path);
- ``act_bits``: 0 = activations stay float (weight-only: W8A16, W4A16); 8 = every product also
  quantizes its input per token (:meth:`~QuantFormat.linear`, W8A8) and QAT fake-quantizes it
  (:meth:`~QuantFormat.fake_quantize_act`).

The formats (symmetric, round-to-nearest, scales rounded up to fp16 so nothing clips; maths in
:mod:`tinyseek.quant.ops`):

========  ====  ========================================  ==============  ===================
name      bits  codes                                     scales          stored codes
========  ====  ========================================  ==============  ===================
int8      8     [-127, 127]                               one a row       int8 ``(N, K)``
int4      4     [-7, 7] (level -8 unused)                 per group of    uint8 ``(N, ceil(K/2))``,
                                                          32 / 64 / 128   two codes a byte
w8a8      8     weights as int8; activations per token:   one a row       int8 ``(N, K)``
                uint8 [0, 255] with a zero point, dynamic
========  ====  ========================================  ==============  ===================

W8A8's weights are int8's (same codes, scales, checkpoint tensors); what differs is the product:
each input row (token) is quantized at run time to uint8 codes with its own fp32 scale and zero
point (asymmetric min-max, :func:`tinyseek.quant.ops.quantize_act`), multiplied with the int8
codes in int32 (:func:`tinyseek.kernels.quant.w8a8_mm`: VNNI; PyTorch: ``torch._int_mm``), the
zero point corrected with the weight row sums, then scaled to fp32. uint8 + zero point rather
than int8 + zero point: the same maths (``code - 128``), but VNNI's ``vpdpbusd`` multiplies
unsigned by signed bytes, so uint8 codes feed it directly. Embeddings of a W8A8 model are int8
rows (a lookup has no input to quantize).

A new format is one :class:`QuantFormat` entry here plus its test (tests/test_quant_formats.py
runs every entry of the table through the same checks): the modules, QAT, ``QuantSpec``
validation and ``quant_config.json`` (its ``method``, ``bits`` and ``group_size`` keys) follow the
table. A format without a C kernel (``kernel=None``) runs on PyTorch ops everywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyseek.kernels import quant as kq
from tinyseek.quant.ops import (SCALE_DTYPE, dequantize, fake_quantize, fake_quantize_act, group_scales, n_groups, pack_int4,
                                quantize, unpack_int4, w8a8_linear)


@dataclass(frozen=True)
class QuantFormat:
    name: str                        # the method name: QuantSpec.method, quant_config.json "method"
    bits: int                        # bits a weight code ("bits" in quant_config.json); unique among weight-only formats
    qmax: int                        # codes in [-qmax, qmax]
    group_sizes: tuple[int, ...]     # inputs per scale it accepts; () = one scale per output row
    packed: bool                     # two 4-bit codes a byte (ops.pack_int4) instead of one int8 a code
    kernel: int | None               # the fused C kernels' format (tinyseek.kernels.quant.KERNEL_*); None: none
    v1_scale_dtype: torch.dtype = SCALE_DTYPE  # scales as format version 1 stored them (int8: fp32)
    act_bits: int = 0                # 0: float activations (weight-only); 8: per-token uint8 activations (W8A8)

    def __deepcopy__(self, memo) -> "QuantFormat":
        return self  # an immutable value: copies of a module share it

    @property
    def grouped(self) -> bool:
        return bool(self.group_sizes)

    @property
    def scales_rows(self) -> bool:
        """Codes multiply the input as they are (unpacked, one scale a row), so few rows compute
        ``linear(x, codes) * scale`` instead of dequantising the whole weight first."""
        return not self.packed and not self.grouped

    @property
    def code_dtype(self) -> torch.dtype:
        return torch.uint8 if self.packed else torch.int8

    def group(self, group_size: int) -> int:
        """The group size this format uses for a requested one: itself when grouped, else 0
        (stored as 0 in ``quant_config.json``)."""
        return group_size if self.grouped else 0

    def valid_group(self, group_size: int) -> bool:
        return group_size in self.group_sizes if self.grouped else group_size == 0

    def scale_dtype(self, format_version: int) -> torch.dtype:
        """The scales' dtype in a checkpoint of that format version (fp16 from version 2 on)."""
        return self.v1_scale_dtype if format_version == 1 else SCALE_DTYPE

    def stored_cols(self, k: int) -> int:
        """Columns of the stored codes of a ``(N, k)`` weight."""
        return (k + 1) // 2 if self.packed else k

    def empty(self, n: int, k: int, group_size: int, device=None,
              scale_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Zero codes + unit scales of an ``(n, k)`` weight in the stored layout."""
        q = torch.zeros(n, self.stored_cols(k), dtype=self.code_dtype, device=device)
        s = torch.ones(n, n_groups(k, self.group(group_size)), dtype=scale_dtype or SCALE_DTYPE, device=device)
        return q, s

    def quantize(self, w_NK: torch.Tensor, group_size: int, clip_NG=None,
                 smooth_K: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(stored codes, fp16 scales ``(N, G)``) of one ``(N, K)`` weight; ``smooth_K`` multiplies
        the columns first (AWQ; rounded to fp16, its storage dtype), ``clip_NG`` the absmax."""
        w = w_NK.detach().float()
        if smooth_K is not None:
            w = w * smooth_K.to(w.device, torch.float16).float()[None, :]
        gs = self.group(group_size)
        s = group_scales(w, self.qmax, gs, clip_NG)
        q = quantize(w, self.qmax, gs, s)
        return (pack_int4(q, pad=True) if self.packed else q), s.to(SCALE_DTYPE)

    def dequantize(self, codes: torch.Tensor, scale: torch.Tensor, k: int, group_size: int,
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Float ``(N, k)`` from :meth:`quantize`'s output."""
        gs = self.group(group_size)
        if dtype == torch.float32 and self.kernel is not None:
            w = kq.dequant_rows(codes, scale, self.kernel, k, gs)
            if w is not None:
                return w
        return dequantize(unpack_int4(codes) if self.packed else codes, scale, k, gs, dtype)

    def fake_quantize(self, w_NK: torch.Tensor, group_size: int) -> torch.Tensor:
        """The weight :meth:`quantize` would store, dequantised, with a straight-through gradient."""
        return fake_quantize(w_NK, self.qmax, self.group(group_size))

    def fake_quantize_act(self, x: torch.Tensor) -> torch.Tensor:
        """The input a product of this format computes with, with a straight-through gradient: ``x``
        itself for weight-only formats, per-token fake-quantized for W8A8."""
        return fake_quantize_act(x) if self.act_bits else x

    def linear(self, x: torch.Tensor, codes: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """W8A8 (``act_bits``) product ``x (..., K) @ W_hat^T`` of one-scale-a-row int8 codes: the C
        kernel where it applies, else the PyTorch path (``torch._int_mm``); the same values bit for
        bit (:func:`tinyseek.quant.ops.w8a8_reference`)."""
        y = kq.w8a8_mm(x, codes, scale)
        if y is not None:
            return y
        shp = x.shape
        return w8a8_linear(x.reshape(-1, shp[-1]), codes, scale.view(-1)).view(*shp[:-1], codes.shape[0]).to(x.dtype)


FORMATS: dict[str, QuantFormat] = {
    "int8": QuantFormat("int8", 8, 127, (), packed=False, kernel=kq.KERNEL_INT8, v1_scale_dtype=torch.float32),
    "int4": QuantFormat("int4", 4, 7, (32, 64, 128), packed=True, kernel=kq.KERNEL_INT4),
    "w8a8": QuantFormat("w8a8", 8, 127, (), packed=False, kernel=kq.KERNEL_W8A8, act_bits=8),
}
_BY_BITS = {f.bits: f for f in FORMATS.values() if not f.act_bits}  # a bit width names a weight-only format


def quant_format(fmt: QuantFormat | str | int) -> QuantFormat:
    """The format named ``fmt`` (``"int8"``), or with that many bits (``8``), or ``fmt`` itself; a
    ``ValueError`` listing the formats otherwise."""
    if isinstance(fmt, QuantFormat):
        return fmt
    out = FORMATS.get(fmt) if isinstance(fmt, str) else _BY_BITS.get(fmt)
    if out is None:
        raise ValueError(f"unknown quantization format {fmt!r}: one of {', '.join(FORMATS)} "
                         f"(bits {', '.join(str(f.bits) for f in FORMATS.values())})")
    return out
