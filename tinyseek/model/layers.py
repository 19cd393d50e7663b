"""Building blocks shared by attention and FFN: Linear (the seam of the linear C kernel), RMSNorm,
RoPE, SwiGLU.

Shape suffix legend used across ``tinyseek/model``: B batch, T query tokens, L cache/key length,
H heads, D model width, K head width, F FFN width, E experts, N flattened tokens (B*T).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.kernels import gemm
from tinyseek.kernels import linear as linear_kernel


def _reselect(module: nn.Module, incompatible_keys) -> None:
    module.select_variant()


class KernelSeam:
    """Mixin of a module whose op has a C variant (``tinyseek.kernels``) beside its PyTorch
    reference: ``select_variant()`` sets ``use_kernel`` (``MoE``: its ``variants``) from the
    module's tensors, once when the module is built (its ``__init__`` ends with :meth:`init_seam`)
    and again after every conversion or move (``nn.Module._apply``: ``.to``, ``.float``, ``.cpu``,
    ``to_empty``) and every ``load_state_dict`` (``assign=True`` replaces the tensors), not per
    call. Per call the kernel variant still falls back to the reference where a call needs it (a
    gradient to record, inputs the kernel does not take, the kernels switched off: the switch stays
    live for A/B runs)."""

    use_kernel = False

    def select_variant(self) -> None:
        raise NotImplementedError

    def init_seam(self) -> None:
        self.select_variant()
        self.register_load_state_dict_post_hook(_reselect)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.select_variant()
        return out


class Linear(KernelSeam, nn.Linear):
    """``nn.Linear`` with a kernel variant chosen once (the seam of ``F.linear``): the C kernel
    (:mod:`tinyseek.kernels.linear`) where the weights are plain CPU fp32 (also re-chosen when a
    parameter is replaced: tied, assigned, sharded), else ``F.linear``. Per call the kernel variant
    falls back, for training, more than ``MAX_ROWS`` rows or the kernels off, to the machine's faster
    GEMM (:func:`many_rows`: oneDNN where it measured faster than MKL, else ``F.linear``), and to
    ``F.linear`` under autocast or ``torch.compile``. Results equal ``F.linear`` up to float summation order. No
    parameters or buffers of its own (same state_dict, repr and ``isinstance`` checks)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.init_seam()

    def select_variant(self) -> None:
        """The kernel where :func:`tinyseek.kernels.linear.weight_fits` takes the weight and bias."""
        self.use_kernel = linear_kernel.weight_fits(self.weight, self.bias)

    def register_parameter(self, name: str, param) -> None:
        super().register_parameter(name, param)
        if "weight" in self._parameters and hasattr(self, "bias"):  # built (nn.Linear sets bias last)
            self.select_variant()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_kernel:
            y = linear_kernel.linear_fitted(x, self.weight, self.bias)
            if y is not None:
                return y
            return many_rows(x, self.weight, self.bias)
        return F.linear(x, self.weight, self.bias)


def many_rows(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """A plain CPU fp32 product the decode kernel did not take (training, many rows, kernels off):
    the machine's faster GEMM (:func:`tinyseek.kernels.gemm.backend`, oneDNN or ``F.linear``'s
    MKL), ``F.linear`` under ``torch.compile`` tracing or where oneDNN does not take the tensors."""
    if not torch.compiler.is_compiling() and gemm.backend() == "onednn" and gemm.fits(x, weight, bias):
        return gemm.linear(x, weight, bias)
    return F.linear(x, weight, bias)


def linear_or_f(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` for a bare weight (a folded or stacked one, no module of its own): the C kernel
    where :func:`tinyseek.kernels.linear.linear` applies, else :func:`many_rows` for plain CPU fp32
    weights, else ``F.linear`` (same result up to summation order)."""
    y = linear_kernel.linear(x, weight, bias)
    if y is not None:
        return y
    return many_rows(x, weight, bias) if linear_kernel.weight_fits(weight, bias) else F.linear(x, weight, bias)


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


# ---------------------------------------------------------------------------------------------
# RoPE inverse frequencies, one pure function per rope type (the maths of transformers'
# modeling_rope_utils, op for op, so imported models match HF to the last bit of the table)
# ---------------------------------------------------------------------------------------------
def inv_freq_default(dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(2i/dim)`` for i < dim/2 (plain RoPE).

    >>> inv_freq_default(4, 100.0).tolist()
    [1.0, 0.10000000149011612]
    """
    return 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq_linear(dim: int, theta: float, factor: float) -> torch.Tensor:
    """Position interpolation: every frequency divided by ``factor`` (positions / factor).

    >>> inv_freq_linear(4, 100.0, 2.0).tolist()
    [0.5, 0.05000000074505806]
    """
    return inv_freq_default(dim, theta) / factor


def inv_freq_llama3(dim: int, theta: float, factor: float, low_freq_factor: float, high_freq_factor: float,
                    original_max_len: int) -> torch.Tensor:
    """Llama 3.1: wavelengths longer than ``original_max_len / low_freq_factor`` are divided by ``factor``,
    shorter than ``original_max_len / high_freq_factor`` kept, and the band between blended smoothly.

    >>> f = inv_freq_llama3(8, 10000.0, 8.0, 1.0, 4.0, 64)   # wavelengths 6.3, 63, 628, 6283
    >>> [round(a / b, 4) for a, b in zip(f.tolist(), inv_freq_default(8, 10000.0).tolist())]
    [1.0, 0.1304, 0.125, 0.125]
    """
    inv_freq = inv_freq_default(dim, theta)
    low_freq_wavelen = original_max_len / low_freq_factor
    high_freq_wavelen = original_max_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_llama / factor + smooth * inv_llama
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, inv_llama)


def inv_freq_yarn(dim: int, theta: float, factor: float, original_max_len: int, beta_fast: float = 32.0,
                  beta_slow: float = 1.0, truncate: bool = True) -> torch.Tensor:
    """YaRN: dims that rotate more than ``beta_fast`` times over ``original_max_len`` keep their frequency
    (extrapolation), fewer than ``beta_slow`` times are divided by ``factor`` (interpolation), a linear
    ramp between. The cos/sin scale that goes with it is :func:`yarn_attention_factor`.

    >>> f = inv_freq_yarn(8, 10000.0, 4.0, 64)
    >>> [round(a / b, 4) for a, b in zip(f.tolist(), inv_freq_default(8, 10000.0).tolist())]
    [1.0, 0.625, 0.25, 0.25]
    """
    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original_max_len / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # no singularity
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = theta ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1 - ramp
    return (1.0 / (factor * pos_freqs)) * (1 - extrapolation) + (1.0 / pos_freqs) * extrapolation


def yarn_get_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's ``0.1 * mscale * ln(scale) + 1`` (1 for scale <= 1).

    >>> round(yarn_get_mscale(40.0, 1.0), 6), yarn_get_mscale(1.0, 5.0)
    (1.368888, 1.0)
    """
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_attention_factor(factor: float, mscale: float = 0.0, mscale_all_dim: float = 0.0,
                          attn_factor: float = 0.0) -> float:
    """The scale YaRN puts on cos and sin (HF ``attention_factor``): ``attn_factor`` if set, else
    ``mscale(factor, mscale) / mscale(factor, mscale_all_dim)`` when both are set (DeepSeek-V3: 1.0 for
    equal values), else ``mscale(factor)``.

    >>> yarn_attention_factor(40.0, 1.0, 1.0), round(yarn_attention_factor(4.0), 6), yarn_attention_factor(4.0, attn_factor=0.5)
    (1.0, 1.138629, 0.5)
    """
    if attn_factor:
        return attn_factor
    if mscale and mscale_all_dim:
        return float(yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim))
    return yarn_get_mscale(factor)


# rope_type -> (dim, cfg) -> (inverse frequencies (dim/2,), cos/sin scale); cfg a ModelConfig
ROPE_TYPES = {
    "default": lambda dim, c: (inv_freq_default(dim, c.rope_theta), 1.0),
    "linear": lambda dim, c: (inv_freq_linear(dim, c.rope_theta, c.rope_factor), 1.0),
    "llama3": lambda dim, c: (inv_freq_llama3(dim, c.rope_theta, c.rope_factor, c.rope_low_freq_factor,
                                              c.rope_high_freq_factor, c.rope_original_max_len), 1.0),
    "yarn": lambda dim, c: (inv_freq_yarn(dim, c.rope_theta, c.rope_factor, c.rope_original_max_len,
                                          c.yarn_beta_fast, c.yarn_beta_slow, c.yarn_truncate),
                            yarn_attention_factor(c.rope_factor, c.yarn_mscale, c.yarn_mscale_all_dim,
                                                  c.yarn_attn_factor)),
}


def rope_frequencies(cfg, dim: int) -> tuple[torch.Tensor, float]:
    """(inverse frequencies, cos/sin scale) of ``cfg.rope_type`` for a rotary width ``dim``."""
    return ROPE_TYPES[cfg.rope_type](dim, cfg)


def mla_softmax_mscale(cfg) -> float:
    """YaRN's ``mscale(factor, mscale_all_dim)`` for a scaled RoPE with ``yarn_mscale_all_dim`` set, else 1:
    MLA multiplies its softmax scale by its square (DeepSeek-V3's reference code, HF ``yarn_apply_mscale``).

    >>> from tinyseek.config import ModelConfig
    >>> mla_softmax_mscale(ModelConfig()), round(mla_softmax_mscale(ModelConfig(rope_type="yarn", rope_factor=40.0, yarn_mscale_all_dim=1.0)), 6)
    (1.0, 1.368888)
    """
    if cfg.rope_type == "default" or not cfg.yarn_mscale_all_dim:
        return 1.0
    return yarn_get_mscale(cfg.rope_factor, cfg.yarn_mscale_all_dim)


class Rotary(nn.Module):
    """RoPE table, indexed by absolute positions (so every batch row may be at a different length).

    Uses the "rotate half" layout (Llama/HF ``rotate_half``), not the interleaved-pair layout of the
    DeepSeek-V3 reference code; HF import/export permute the RoPE rows of interleaved checkpoints.
    ``inv_freq`` (from :func:`rope_frequencies`) replaces the plain ``theta`` frequencies; the table is
    multiplied by ``scale`` (YaRN's attention factor, as HF does to cos and sin).
    """

    def __init__(self, dim: int, max_len: int, theta: float = 10000.0, inv_freq: torch.Tensor | None = None,
                 scale: float = 1.0):
        super().__init__()
        inv = inv_freq_default(dim, theta) if inv_freq is None else inv_freq.float()
        t = torch.arange(max_len, dtype=torch.float32)
        freqs = torch.outer(t, inv)  # (L, dim/2)
        emb = torch.cat([freqs, freqs], dim=-1)
        cos, sin = emb.cos(), emb.sin()
        if scale != 1.0:
            cos, sin = cos * scale, sin * scale
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

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
