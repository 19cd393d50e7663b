"""Calibration: activation statistics on a calibration set, and the AWQ-style scale search.

Weight-only quantization leaves activations in float, so what a calibration set can still decide
is *which weight columns matter*. We run the float model over the calibration batches, record a
sample of every quantized matrix's input rows (``X``, per expert for MoE experts), and reduce each
input channel to one activation range ``a_k`` with the chosen calibrator:

- ``minmax``: ``a_k = max |x_k|``;
- ``percentile``: ``a_k`` = the p-th percentile of ``|x_k|`` (robust to rare spikes);
- ``kl``: the TensorRT entropy calibrator per channel: the clip threshold of ``|x_k|`` whose
  8-bit quantized histogram has the least KL divergence from the float histogram.

AWQ-style search (Lin et al. 2023): columns are scaled by ``s = a^beta`` (normalised to geometric
mean 1) before quantization and the input is divided by ``s`` at run time, which protects the
salient channels. ``beta`` is grid-searched per matrix to minimise the output error
``||X W^T - X W_hat^T||^2`` on the calibration rows; ``beta = 0`` (plain round-to-nearest) is in
the grid, so the search never does worse than no smoothing on the calibration set (held-out
perplexity is what the benchmark reports). Deviations from AWQ: the range statistic is pluggable
(AWQ uses mean |x|), no clip search, and experts are calibrated on the tokens routed to them.
"""
from __future__ import annotations

import contextlib
from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.quant.formats import QuantFormat, quant_format

CALIBRATIONS = ("minmax", "percentile", "kl")


# ---------------------------------------------------------------------------------------------
# activation ranges (pure functions)
# ---------------------------------------------------------------------------------------------
def kl_thresholds(absx_MK: torch.Tensor, n_bins: int = 512, n_levels: int = 128, step: int = 16) -> torch.Tensor:
    """Per-column KL-optimal clip threshold of ``|x|`` (TensorRT entropy calibration), ``(K,)``.

    For every candidate threshold (bin edge ``i``) the reference distribution ``P`` is the
    histogram clipped at ``i`` (outliers folded into the last bin) and ``Q`` is ``P`` re-binned to
    ``n_levels`` levels and spread back uniformly over the non-empty bins; the threshold with the
    least ``KL(P || Q)`` wins.

    >>> x = torch.cat([torch.rand(4000, 1), torch.tensor([[50.0]])])   # one huge outlier
    >>> t = kl_thresholds(x, n_bins=256, n_levels=16)
    >>> bool(t[0] < 10), bool(t[0] > 0.5)
    (True, True)
    """
    M, K = absx_MK.shape
    amax = absx_MK.amax(0).clamp_min(1e-12)                                   # (K,)
    idx = (absx_MK / amax * n_bins).long().clamp_(max=n_bins - 1)             # (M, K)
    hist = torch.zeros(K, n_bins, dtype=torch.float32)
    hist.scatter_add_(1, idx.t(), torch.ones(K, M, dtype=torch.float32))
    best_kl = torch.full((K,), float("inf"), dtype=torch.float32)
    best_i = torch.full((K,), n_bins, dtype=torch.long)
    for i in range(n_levels, n_bins + 1, step):
        p = hist[:, :i].clone()
        p[:, -1] += hist[:, i:].sum(1)
        level = torch.arange(i) * n_levels // i                              # bin -> level
        src = hist[:, :i]
        nz = (src > 0).float()
        tot = torch.zeros(K, n_levels, dtype=torch.float32).index_add_(1, level, src)
        cnt = torch.zeros(K, n_levels, dtype=torch.float32).index_add_(1, level, nz)
        q = (tot / cnt.clamp_min(1))[:, level] * nz
        p = p / p.sum(1, keepdim=True).clamp_min(1e-12)
        q = q / q.sum(1, keepdim=True).clamp_min(1e-12)
        kl = torch.where(p > 0, p * (torch.log(p.clamp_min(1e-12)) - torch.log(q.clamp_min(1e-12))), 0.0).sum(1)
        better = kl < best_kl
        best_kl = torch.where(better, kl, best_kl)
        best_i = torch.where(better, torch.full_like(best_i, i), best_i)
    return (best_i.float() / n_bins * amax).float()


def activation_range(x_MK: torch.Tensor, method: str, percentile: float = 99.9) -> torch.Tensor:
    """One range per input channel, ``(K,)``, by ``minmax``, ``percentile`` or ``kl``.

    >>> x = torch.tensor([[1.0, -2.0], [3.0, 0.5], [-0.5, 0.1]])
    >>> activation_range(x, "minmax").tolist()
    [3.0, 2.0]
    >>> activation_range(x, "percentile", 50.0).tolist()
    [1.0, 0.5]
    """
    a = x_MK.detach().float().abs()
    if method == "minmax":
        return a.amax(0)
    if method == "percentile":
        return torch.quantile(a, percentile / 100.0, dim=0)
    if method == "kl":
        return kl_thresholds(a)
    raise ValueError(f"unknown calibration {method!r}; choose one of {', '.join(CALIBRATIONS)}")


def smooth_scales(range_K: torch.Tensor, beta: float) -> torch.Tensor:
    """AWQ column scales ``a^beta`` normalised to geometric mean 1 (``beta = 0`` gives ones),
    clamped to [1e-3, 1e3] and rounded to fp16 (their storage dtype).

    >>> smooth_scales(torch.tensor([1.0, 4.0]), 0.5).tolist()
    [0.70703125, 1.4140625]
    """
    s = range_K.float().clamp_min(1e-5) ** beta
    return (s / torch.exp(torch.log(s).mean())).clamp(1e-3, 1e3).half().float()


def search_smoothing(w_NK: torch.Tensor, x_MK: torch.Tensor, range_K: torch.Tensor, fmt: QuantFormat | str | int,
                     group_size: int, grid: Iterable[float] = (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75),
                     min_gain: float = 0.02) -> tuple[float, torch.Tensor | None, dict]:
    """Grid-search ``beta``; returns ``(beta, s_K or None when beta == 0, {"err": .., "err_rtn": ..})``.

    Errors are relative: ``||X (W - W_hat)^T||^2 / ||X W^T||^2`` on the calibration rows. A
    smoothing is kept only if it cuts the error by at least ``min_gain`` (relative) versus plain
    round-to-nearest; otherwise the matrix stays unsmoothed (no scale vector is stored).
    """
    fmt = quant_format(fmt)
    w = w_NK.detach().float()
    x = x_MK.detach().float().to(w.device)
    range_K = range_K.to(w.device)
    ref = x @ w.t()
    denom = ref.pow(2).sum().clamp_min(1e-20)
    best = (float("inf"), 0.0, None)
    errs = {}
    for beta in grid:
        s = smooth_scales(range_K, beta) if beta > 0 else None
        q, sc = fmt.quantize(w, group_size, None, s)
        w_hat = fmt.dequantize(q, sc, w.shape[1], group_size)
        if s is not None:
            w_hat = w_hat / s[None, :]  # s is already fp16-rounded, as stored
        err = float((x @ w_hat.t() - ref).pow(2).sum() / denom)
        errs[beta] = err
        if err < best[0] - 1e-12:
            best = (err, beta, s)
    rtn = errs.get(0.0, float("inf"))
    if best[1] > 0 and best[0] > (1 - min_gain) * rtn:
        best = (rtn, 0.0, None)
    return best[1], best[2], {"err": best[0], "err_rtn": rtn}


# ---------------------------------------------------------------------------------------------
# collecting calibration inputs
# ---------------------------------------------------------------------------------------------
class _RowSampler:
    """Keeps at most ``cap`` rows per call, randomly chosen with a fixed generator."""

    def __init__(self, cap_per_call: int, seed: int = 0):
        self.cap = cap_per_call
        self.gen = torch.Generator().manual_seed(seed)
        self.rows: dict[str, list[torch.Tensor]] = {}

    def add(self, key: str, x: torch.Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float().cpu()
        if x.shape[0] > self.cap:
            x = x[torch.randperm(x.shape[0], generator=self.gen)[: self.cap]]
        self.rows.setdefault(key, []).append(x)

    def result(self, max_rows: int) -> dict[str, torch.Tensor]:
        out = {}
        for k, xs in self.rows.items():
            x = torch.cat(xs)
            if x.shape[0] > max_rows:
                x = x[torch.randperm(x.shape[0], generator=self.gen)[:max_rows]]
            out[k] = x
        return out


@torch.no_grad()
def collect_inputs(model: nn.Module, batches: Iterable[torch.Tensor], linear_names: list[str],
                   experts_names: list[str], max_rows: int = 2048, seed: int = 0) -> dict[str, torch.Tensor]:
    """Run the float ``model`` on ``batches`` (token ids ``(B, T)``) and return input rows:
    ``name`` for each Linear, ``name/gate_up/e`` and ``name/down/e`` for expert ``e``."""
    batches = list(batches)
    sampler = _RowSampler(max(64, max_rows // max(1, len(batches))), seed)
    modules = dict(model.named_modules())
    handles = []
    with contextlib.ExitStack() as stack:
        for name in linear_names:
            handles.append(modules[name].register_forward_pre_hook(
                lambda m, args, name=name: sampler.add(name, args[0])))
        for name in experts_names:
            experts = modules[name]
            moe = modules[name.rsplit(".", 1)[0]]
            orig_impl, orig_fwd = moe.impl, experts.expert_forward

            def recording(e, x_MD, experts=experts, name=name):
                if x_MD.shape[0]:
                    sampler.add(f"{name}/gate_up/{e}", x_MD)
                    g, u = (x_MD @ experts.w_gate_up[e]).chunk(2, dim=-1)
                    h = F.silu(g) * u
                    sampler.add(f"{name}/down/{e}", h)
                    return h @ experts.w_down[e]
                return x_MD.new_zeros(0, x_MD.shape[1])

            moe.impl = "sorted"
            experts.expert_forward = recording
            stack.callback(setattr, moe, "impl", orig_impl)
            stack.callback(delattr, experts, "expert_forward")
            del orig_fwd
        for h in handles:
            stack.callback(h.remove)
        was = model.training
        model.eval()
        for idx in batches:
            model(idx)
        model.train(was)
    return sampler.result(max_rows)
