"""Quantization-aware training: fake-quant weights with a straight-through estimator, then convert.

:func:`prepare_qat` swaps the modules that :mod:`tinyseek.quant.quantize` would quantize for
``QATLinear`` / ``QATExperts``: they keep float master weights (what the optimizer updates) and
compute with ``fake_quantize(w)``, i.e. the exact weights the quantized model will use (same
min-max scales, same rounding, same fp16 scale storage), while gradients flow to the float
weights unchanged (STE). :func:`convert_qat` then replaces them by ``QuantLinear`` /
``QuantExperts`` built from the final float weights, so the converted model reproduces the
fake-quant forward up to float summation order.

Activations: for a W8A8 format (``fmt.act_bits``) every fake-quant product also fake-quantizes its
input per token (:func:`tinyseek.quant.ops.fake_quantize_act`: dynamic asymmetric uint8 with a zero
point, exactly what the converted model's integer product computes with; straight-through
gradient, nothing clipped since each token's range is its own min-max); weight-only formats leave
activations float (W8A16 / W4A16).

Deviation from torchao's QAT: the scales are recomputed from the current weights (and, for W8A8,
from each token's activations) every step (no learned or frozen ranges).
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.quant.formats import QuantFormat, quant_format
from tinyseek.quant.modules import QuantEmbedding, QuantExperts, QuantLinear
from tinyseek.quant.quantize import (check_tied, head_is_tied, prefer_per_expert_dispatch, prepare_decode, quant_targets,
                                     tie_quantized_head)


class QATLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight."""

    def __init__(self, in_features: int, out_features: int, fmt: QuantFormat | str | int, group_size: int = 0,
                 device=None, bias: bool = False):
        super().__init__(in_features, out_features, bias=bias, device=device)
        self.fmt = quant_format(fmt)
        self.bits, self.group_size = self.fmt.bits, self.fmt.group(group_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self.fmt.fake_quantize_act(x), self.fmt.fake_quantize(self.weight, self.group_size).to(x.dtype), b)


class QATEmbedding(nn.Embedding):
    """``nn.Embedding`` whose lookups read the fake-quantized table (rows quantized like a Linear's)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, fmt: QuantFormat | str | int, group_size: int = 0,
                 device=None):
        super().__init__(num_embeddings, embedding_dim, device=device)
        self.fmt = quant_format(fmt)
        self.bits, self.group_size = self.fmt.bits, self.fmt.group(group_size)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return F.embedding(idx, self.fmt.fake_quantize(self.weight, self.group_size))


class QATExperts(nn.Module):
    """Stacked experts with float master weights ``weight_gate_up (E, D, 2F)`` / ``weight_down
    (E, F, D)``; ``w_gate_up`` / ``w_down`` return the fake-quantized stacks (quantized per expert
    in the ``(out, in)`` layout, like ``QuantExperts``)."""

    def __init__(self, n_experts: int, dim: int, hidden: int, fmt: QuantFormat | str | int, group_size: int = 0):
        super().__init__()
        self.fmt = quant_format(fmt)
        self.n_experts, self.hidden, self.bits = n_experts, hidden, self.fmt.bits
        self.group_size = self.fmt.group(group_size)
        self.weight_gate_up = nn.Parameter(torch.empty(n_experts, dim, 2 * hidden))
        self.weight_down = nn.Parameter(torch.empty(n_experts, hidden, dim))

    def _fq(self, w_EKN: torch.Tensor) -> torch.Tensor:
        E, K, N = w_EKN.shape
        w_NK = w_EKN.transpose(1, 2).reshape(E * N, K)
        return self.fmt.fake_quantize(w_NK, self.group_size).view(E, N, K).transpose(1, 2)

    @property
    def w_gate_up(self) -> torch.Tensor:
        return self._fq(self.weight_gate_up)

    @property
    def w_down(self) -> torch.Tensor:
        return self._fq(self.weight_down)

    def expert_forward(self, e: int, x_MD: torch.Tensor) -> torch.Tensor:
        fa = self.fmt.fake_quantize_act  # identity unless W8A8
        g, u = (fa(x_MD) @ self._fq(self.weight_gate_up[e:e + 1])[0]).chunk(2, dim=-1)
        return fa(F.silu(g) * u) @ self._fq(self.weight_down[e:e + 1])[0]


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


@torch.no_grad()
def prepare_qat(model: nn.Module, method: str = "int4", group_size: int = 128, lm_head: bool = True,
                embed: bool = True) -> nn.Module:
    """Swap the quantization targets of ``model`` for fake-quant modules (in place); returns it.
    A tied head keeps sharing its (master) weight with the fake-quant embedding."""
    fmt = quant_format(method)
    tied = check_tied(model, lm_head, embed)
    linears, experts = quant_targets(model, lm_head)
    for name in linears:
        old = model.get_submodule(name)
        new = QATLinear(old.in_features, old.out_features, fmt, group_size, device=old.weight.device,
                        bias=old.bias is not None)
        new.weight.copy_(old.weight)
        if old.bias is not None:
            new.bias.copy_(old.bias)
        _set(model, name, new)
    for name in experts:
        old = model.get_submodule(name)
        E, D, F2 = old.w_gate_up.shape
        new = QATExperts(E, D, F2 // 2, fmt, group_size).to(old.w_gate_up.device)
        new.weight_gate_up.copy_(old.w_gate_up)
        new.weight_down.copy_(old.w_down)
        _set(model, name, new)
    if embed:
        old = model.embed
        new = QATEmbedding(old.num_embeddings, old.embedding_dim, fmt, group_size, device=old.weight.device)
        new.weight.copy_(old.weight)
        model.embed = new
        if tied:
            model.lm_head.weight = new.weight
    prefer_per_expert_dispatch(model)
    model.qat = {"method": method, "group_size": fmt.group(group_size), "lm_head": lm_head, "embed": embed}
    return model


@torch.no_grad()
def convert_qat(model: nn.Module) -> dict[str, str]:
    """Replace fake-quant modules by real quantized ones (in place); returns the ``modules`` table
    for :func:`tinyseek.quant.quantize.quant_config`."""
    tied = head_is_tied(model)
    kinds = {}
    for name, m in list(model.named_modules()):
        if isinstance(m, QATEmbedding):
            _set(model, name, QuantEmbedding.from_float(m.weight, m.fmt, m.group_size))
            kinds[name] = "embedding"
        elif isinstance(m, QATLinear) and tied and name == "lm_head":
            _set(model, name, QuantLinear(m.in_features, m.out_features, m.fmt, m.group_size, device=m.weight.device))
            kinds[name] = "linear_tied"
        elif isinstance(m, QATLinear):
            _set(model, name, QuantLinear.from_float(m.weight, m.fmt, m.group_size, bias_N=m.bias))
            kinds[name] = "linear"
        elif isinstance(m, QATExperts):
            _set(model, name, QuantExperts.from_float(m.weight_gate_up, m.weight_down, m.fmt, m.group_size))
            kinds[name] = "experts"
    if kinds.get("lm_head") == "linear_tied":
        tie_quantized_head(model)
    prepare_decode(model)
    return kinds


def qat_finetune(model: nn.Module, next_batch: Callable[[], tuple[torch.Tensor, torch.Tensor]], steps: int,
                 lr: float = 3e-4, grad_clip: float = 1.0, log: Callable[[int, float], None] | None = None) -> list[float]:
    """A short AdamW fine-tune of a prepared model (fake-quant forward, STE backward); returns losses.

    Routers keep training too; the aux-loss-free expert bias is updated as in pretraining.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.95))
    model.train()
    losses = []
    for step in range(steps):
        x, y = next_batch()
        out = model(x, y)
        out.loss.backward()
        if out.expert_counts is not None:
            model.update_expert_bias(out.expert_counts)
        if grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(out.ce_loss.detach()))
        if log is not None:
            log(step, losses[-1])
    model.eval()
    return losses


def iter_batches(batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
    """Cycle a finite list of ``(x, y)`` batches as a ``next_batch`` function."""
    data = list(batches)
    state = {"i": 0}

    def nxt():
        b = data[state["i"] % len(data)]
        state["i"] += 1
        return b
    return nxt
