"""Quantization maths as pure functions: symmetric int8 / int4 weights, int4 packing, dequantise.

A weight matrix is always seen as ``(N out, K in)`` (the ``nn.Linear`` layout); scales run along
the input dimension K:

- int8 (W8A16): one scale per output row (per-channel), ``q = round(w / s)`` in [-127, 127].
- int4 (W4A16): one scale per group of ``group_size`` consecutive inputs of a row, ``q`` in
  [-7, 7] (symmetric, level -8 unused), stored as the nibble ``q + 8`` and packed two per byte:
  byte ``j`` of a row holds element ``2j`` in its low nibble and ``2j + 1`` in its high nibble.
  When K is not a multiple of the group size the last group is partial (its scale comes from
  the real columns only; dequantisation pads it for one reshape and slices the pad off), so any
  width works (``moe_d_ff=96`` with group 64 or 128) and nothing but an odd last nibble is stored.

Scales are stored in fp16 (format v2; v1 stored int8 scales in fp32). They are rounded to fp16
*inside* :func:`group_scales`, upwards (``absmax / scale`` never exceeds qmax, so nothing clips
however coarse a subnormal fp16 scale is), so fake quantization (QAT) and the stored weights agree
bit for bit. fp16 rather than bf16: 11 significant bits instead of 8, and scales of trained weights
(1e-5 .. 1e-1) are well inside its range.

The functions take ``qmax`` (the largest code) and a group size (``<= 0``: one scale per row);
which values a format uses, and whether its codes are packed, is :mod:`tinyseek.quant.formats`.

Shape legend: N output rows, K inputs, G groups per row (ceil(K / group_size)).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

SCALE_DTYPE = torch.float16  # every scale (format v2): int8 costs 8 + 16/K bits a weight, int4 at group 32 4.5


def n_groups(k: int, group_size: int) -> int:
    """Scales per row: ``ceil(k / group_size)`` (one per row when ``group_size <= 0``).

    >>> n_groups(96, 64), n_groups(128, 32), n_groups(7, 0)
    (2, 4, 1)
    """
    return -(-k // group_size) if group_size > 0 else 1


def group_view(w_NK: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(N, K)`` -> ``(N, G, group)`` (zero-padded); ``group_size <= 0`` means one group per row.

    >>> group_view(torch.ones(2, 5), 4).shape
    torch.Size([2, 2, 4])
    """
    N, K = w_NK.shape
    if group_size <= 0:
        return w_NK.reshape(N, 1, K)
    kp = -(-K // group_size) * group_size
    if kp != K:
        w_NK = F.pad(w_NK, (0, kp - K))
    return w_NK.reshape(N, kp // group_size, group_size)


def group_scales(w_NK: torch.Tensor, qmax: int, group_size: int, clip_NG: torch.Tensor | float | None = None,
                 dtype: torch.dtype = SCALE_DTYPE) -> torch.Tensor:
    """Symmetric scales ``(N, G)``: ``clip / qmax`` with ``clip = absmax * ratio`` (ratio 1 = min-max),
    rounded up to the storage ``dtype`` (fp16) and kept away from zero; returned as fp32.

    >>> group_scales(torch.tensor([[-2.54, 1.0]]), 127, 0).tolist()
    [[0.0200042724609375]]
    >>> group_scales(torch.tensor([[7.0, 1.0, 0.0, -3.5]]), 7, 2).tolist()
    [[1.0, 0.5]]
    """
    amax = group_view(w_NK.detach().float(), group_size).abs().amax(-1)
    if clip_NG is not None:
        amax = amax * clip_NG
    s = (amax / qmax).clamp_min(1e-7)
    h = s.to(dtype)
    h = torch.where(h.float() < s, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    return h.float()


def quantize(w_NK: torch.Tensor, qmax: int, group_size: int, scale_NG: torch.Tensor) -> torch.Tensor:
    """Integer codes ``(N, K)`` int8 in [-qmax, qmax]: ``round(w / s)`` of each element's group scale.

    >>> quantize(torch.tensor([[0.26, -1.0, 0.5]]), 127, 0, torch.tensor([[0.01]])).tolist()
    [[26, -100, 50]]
    >>> quantize(torch.tensor([[0.26, -1.0, 0.5]]), 7, 2, torch.tensor([[0.2, 0.1]])).tolist()
    [[1, -5, 5]]
    """
    N, K = w_NK.shape
    wg = group_view(w_NK.float(), group_size)
    q = torch.round(wg / scale_NG.float().unsqueeze(-1)).clamp_(-qmax, qmax).to(torch.int8)
    return q.reshape(N, -1)[:, :K]


def dequantize(q_NK: torch.Tensor, scale_NG: torch.Tensor, k: int, group_size: int,
               dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Float ``(N, k)`` from integer codes (``k`` or more columns) and per-group scales; the last
    group may be partial. ``group_size <= 0``: one scale per row.

    >>> dequantize(torch.tensor([[2, -4, 6, 0]], dtype=torch.int8), torch.tensor([[0.5, 2.0]]), 3, 2).tolist()
    [[1.0, -2.0, 12.0]]
    """
    N = q_NK.shape[0]
    G = scale_NG.shape[1]
    q = q_NK[:, :k]
    if G == 1:
        return q.to(dtype) * scale_NG.to(dtype)
    kp = G * group_size
    if kp != k:
        q = F.pad(q, (0, kp - k))
    w = q.to(dtype).view(N, G, group_size) * scale_NG.to(dtype).unsqueeze(-1)
    return w.view(N, kp)[:, :k]


def fake_quantize(w_NK: torch.Tensor, qmax: int, group_size: int) -> torch.Tensor:
    """Quantize then dequantize (min-max scales) with a straight-through gradient: the forward
    sees the quantized weight, the backward passes the gradient to ``w`` unchanged.

    >>> w = torch.tensor([[0.3, -0.71]], requires_grad=True)
    >>> y = fake_quantize(w, 7, 2); y.sum().backward()
    >>> [round(v, 4) for v in y.tolist()[0]], w.grad.tolist()
    ([0.3043, -0.7101], [[1.0, 1.0]])
    """
    s = group_scales(w_NK, qmax, group_size)
    wq = dequantize(quantize(w_NK.detach(), qmax, group_size, s), s, w_NK.shape[1], group_size,
                    torch.float32).to(w_NK.dtype)
    return w_NK + (wq - w_NK).detach()


# ---------------------------------------------------------------------------------------------
# int4 packing: two codes per byte
# ---------------------------------------------------------------------------------------------
def pack_int4(q_NK: torch.Tensor, pad: bool = False) -> torch.Tensor:
    """Pack int8 codes in [-8, 7] into uint8 ``(N, K/2)``: low nibble = even column. An odd K is a
    ``ValueError``, or with ``pad`` gets one zero code appended (the stored odd last nibble).

    >>> pack_int4(torch.tensor([[1, -2, 7, -8]], dtype=torch.int8)).tolist()
    [[105, 15]]
    >>> pack_int4(torch.tensor([[1, -2, 7]], dtype=torch.int8), pad=True).tolist()
    [[105, 143]]
    """
    if q_NK.shape[-1] % 2:
        if not pad:
            raise ValueError(f"pack_int4 needs an even number of columns, got {q_NK.shape[-1]}")
        q_NK = F.pad(q_NK, (0, 1))
    u = (q_NK.to(torch.int16) + 8).to(torch.uint8)
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(p_NH: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(N, H)`` -> int8 codes ``(N, 2H)`` in [-8, 7].

    >>> unpack_int4(torch.tensor([[105, 15]], dtype=torch.uint8)).tolist()
    [[1, -2, 7, -8]]
    """
    lo = (p_NH & 0x0F).to(torch.int8)
    hi = (p_NH >> 4).to(torch.int8)
    return (torch.stack((lo, hi), dim=-1).flatten(-2) - 8)


# ---------------------------------------------------------------------------------------------
# W8A8: per-token dynamic asymmetric uint8 activations x symmetric int8 weights, int32 accumulation
# ---------------------------------------------------------------------------------------------
ACT_QMAX = 255                      # activation codes are uint8 in [0, 255] (VNNI's u8 x s8 operand)
INV_ACT_QMAX = 1.0 / ACT_QMAX       # rounded to fp32 where used: the scale is a product, never a division
ACT_MIN_SCALE = 1e-30               # an all-zero row gets this scale (codes = zero point = 0)


def quantize_act(x_MK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token (row) dynamic asymmetric uint8 quantization of fp32 activations: ``(codes (M, K)
    uint8, scale (M,) fp32, zero point (M,) int32)`` with ``x ~= scale * (code - zp)``.

    The range always holds 0 (``lo = min(x, 0)``, ``hi = max(x, 0)``), so zero is exact and
    ``zp`` in [0, 255]; ``scale = max((hi - lo) * fp32(1/255), 1e-30)``, ``inv = 1 / scale``,
    ``zp = round(-lo * inv)``, ``code = clamp(round(x * inv) + zp, 0, 255)`` (round half to
    even). Every step is one IEEE fp32 operation in this order, so the C kernel
    (``ts_quant_act`` in ``kernels/quant.c``) produces the same codes bit for bit.

    >>> q, s, z = quantize_act(torch.tensor([[-1.0, 0.0, 0.5, 1.55]]))
    >>> q.tolist(), [round(v, 6) for v in s.tolist()], z.tolist()
    ([[0, 100, 150, 255]], [0.01], [100])
    """
    x = x_MK.float()
    lo = x.amin(-1).clamp_max(0.0)
    hi = x.amax(-1).clamp_min(0.0)
    inv255 = torch.tensor(INV_ACT_QMAX, dtype=torch.float32)
    s = ((hi - lo) * inv255).clamp_min(ACT_MIN_SCALE)
    inv = 1.0 / s
    zp = torch.round(-lo * inv).clamp_(0, ACT_QMAX)
    q = (torch.round(x * inv[:, None]) + zp[:, None]).clamp_(0, ACT_QMAX).to(torch.uint8)
    return q, s, zp.to(torch.int32)


def fake_quantize_act(x: torch.Tensor) -> torch.Tensor:
    """``scale * (code - zp)`` of :func:`quantize_act` per token (last dim), with a straight-through
    gradient (QAT for activations: the forward sees what W8A8 computes with, the backward passes
    the gradient to ``x`` unchanged; no clipping happens, the range is each token's own min-max).

    >>> x = torch.tensor([[-1.0, 0.3, 1.55]], requires_grad=True)
    >>> y = fake_quantize_act(x); y.sum().backward()
    >>> [round(v, 4) for v in y.tolist()[0]], x.grad.tolist()
    ([-1.0, 0.3, 1.55], [[1.0, 1.0, 1.0]])
    """
    shp = x.shape
    q, s, zp = quantize_act(x.detach().reshape(-1, shp[-1]))
    xq = ((q.float() - zp[:, None].float()) * s[:, None]).view(shp).to(x.dtype)
    return x + (xq - x).detach()


def w8a8_epilogue(acc_MN: torch.Tensor, s_x_M: torch.Tensor, s_w_N: torch.Tensor) -> torch.Tensor:
    """fp32 ``y = float(acc) * (s_x[m] * s_w[n])`` from the exact int32 (or integer-valued) product."""
    return acc_MN.float() * (s_x_M.float()[:, None] * s_w_N.float().view(1, -1))


def w8a8_reference(x_MK: torch.Tensor, q_NK: torch.Tensor, s_N: torch.Tensor) -> torch.Tensor:
    """The readable reference of the W8A8 product ``x @ W_hat^T`` (fp32 ``(M, N)``): quantize ``x``
    (:func:`quantize_act`), the exact integer product ``sum_k (code - zp) * q`` (in float64, exact
    for any K below 2^31 / (255 * 127) ~ 66k: the int32 the kernels accumulate in), then the
    fp32 epilogue (:func:`w8a8_epilogue`). Every fast path equals it bit for bit."""
    qx, sx, zp = quantize_act(x_MK)
    acc = (qx.double() - zp[:, None].double()) @ q_NK.double().t()
    return w8a8_epilogue(acc, sx, s_N)


def w8a8_linear(x_MK: torch.Tensor, q_NK: torch.Tensor, s_N: torch.Tensor) -> torch.Tensor:
    """The PyTorch fast path of :func:`w8a8_reference`, bit-identical: the int8 x int8 -> int32 GEMM
    ``torch._int_mm`` on the activation codes shifted to int8 (``code - 128``) and the weight, then
    the zero-point correction from the weight row sums: ``sum_k (c - zp) q = sum_k (c - 128) q -
    (zp - 128) * sum_k q``. Off the CPU (untested there; CUDA's ``_int_mm`` wants more than 16 rows
    and multiples of 8) it is the reference itself."""
    if not x_MK.is_cpu:
        return w8a8_reference(x_MK, q_NK, s_N)
    qx, sx, zp = quantize_act(x_MK)
    qs = (qx.to(torch.int16) - 128).to(torch.int8)
    acc = torch._int_mm(qs, q_NK.t())
    rowsum = q_NK.sum(1, dtype=torch.int32)
    acc = acc - (zp - 128)[:, None] * rowsum[None, :]
    return w8a8_epilogue(acc, sx, s_N)
