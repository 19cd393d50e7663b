"""AdamW with parameter groups, and learning-rate schedules as pure functions.

Weight decay applies to matrices only (attention / FFN / expert / router weights and the LM
head). It is *not* applied to norms, biases, embeddings, or anything 1-D; the aux-loss-free
router ``expert_bias`` is a buffer, not a parameter, so the optimizer never sees it (it is
moved by the sign rule in ``Transformer.update_expert_bias``). A tied LM head shares the
embedding's tensor and so is not decayed either (it appears once, under the embedding's name).

Schedules map a step (0-based, the step about to be taken) to a learning rate:

- ``cosine``: linear warmup to ``lr``, then half-cosine down to ``min_lr`` at ``total``.
- ``poly`` ("elastic"): linear warmup, then ``min_lr + (lr - min_lr) * (1 - progress) ** power``;
  power 1 is linear decay, power < 1 stays high longer, power > 1 drops early.
- ``constant``: linear warmup, then ``lr``.

Steps past ``total`` stay at the final value.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn as nn


def _warmup(step: int, warmup: int, lr: float) -> float | None:
    """Warmup value for ``step`` (reaches ``lr`` at step ``warmup - 1``), None after warmup."""
    if warmup > 0 and step < warmup:
        return lr * (step + 1) / warmup
    return None


def _progress(step: int, total: int, warmup: int) -> float:
    """Fraction of the decay phase done, in [0, 1]."""
    span = max(1, total - warmup)
    return min(1.0, max(0.0, (step - warmup) / span))


def cosine_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0, power: float = 1.0) -> float:
    """Linear warmup then cosine decay from ``lr`` to ``min_lr`` at step ``total``.

    >>> [round(cosine_lr(s, 10, 2, 1.0, 0.1), 4) for s in (0, 1, 2, 6, 10, 50)]
    [0.5, 1.0, 1.0, 0.55, 0.1, 0.1]
    """
    w = _warmup(step, warmup, lr)
    if w is not None:
        return w
    p = _progress(step, total, warmup)
    return min_lr + (lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * p))


def poly_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0, power: float = 1.0) -> float:
    """Linear warmup then polynomial ("elastic") decay ``(1 - progress) ** power`` to ``min_lr``.

    >>> [round(poly_lr(s, 10, 0, 1.0, 0.0, power=1.0), 3) for s in (0, 5, 10)]
    [1.0, 0.5, 0.0]
    >>> [round(poly_lr(s, 10, 0, 1.0, 0.0, power=2.0), 3) for s in (0, 5, 10)]
    [1.0, 0.25, 0.0]
    >>> round(poly_lr(5, 10, 0, 1.0, 0.0, power=0.5), 3)   # stays high longer
    0.707
    >>> poly_lr(0, 10, 4, 2.0)   # warmup: (step + 1) / warmup * lr
    0.5
    """
    w = _warmup(step, warmup, lr)
    if w is not None:
        return w
    p = _progress(step, total, warmup)
    return min_lr + (lr - min_lr) * (1.0 - p) ** power


def constant_lr(step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0, power: float = 1.0) -> float:
    """Linear warmup then a constant ``lr``.

    >>> [constant_lr(s, 10, 2, 1.0) for s in (0, 1, 2, 9, 100)]
    [0.5, 1.0, 1.0, 1.0, 1.0]
    """
    w = _warmup(step, warmup, lr)
    return lr if w is None else w


SCHEDULES: dict[str, Callable[..., float]] = {"cosine": cosine_lr, "poly": poly_lr, "constant": constant_lr}


def lr_at(schedule: str, step: int, total: int, warmup: int, lr: float, min_lr: float = 0.0,
          power: float = 1.0) -> float:
    """Dispatch to one of :data:`SCHEDULES` by name.

    >>> lr_at("cosine", 0, 100, 0, 3e-4, 3e-5)
    0.0003
    """
    return SCHEDULES[schedule](step, total, warmup, lr, min_lr, power)


# ---------------------------------------------------------------------------------------------
# parameter groups
# ---------------------------------------------------------------------------------------------
def no_decay(name: str, p: torch.Tensor) -> bool:
    """True for parameters that get no weight decay: 1-D (norms, biases), embeddings, biases.

    >>> no_decay("blocks.0.attn_norm.weight", torch.ones(4)), no_decay("embed.weight", torch.ones(4, 4))
    (True, True)
    >>> no_decay("blocks.1.ffn.experts.w_down", torch.ones(2, 4, 4))
    False
    """
    return p.dim() < 2 or name.endswith("bias") or "embed" in name.split(".")[0]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: decayed matrices and undecayed rest. Tied tensors appear once."""
    decay, keep, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        (keep if no_decay(name, p) else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "name": "decay"},
              {"params": keep, "weight_decay": 0.0, "name": "no_decay"}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95),
                    eps: float = 1e-8, fused: bool | None = None) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`. ``fused`` defaults to True on CUDA (one kernel), else foreach."""
    groups = param_groups(model, weight_decay)
    if fused is None:
        fused = any(p.is_cuda for g in groups for p in g["params"])
    kw = {"fused": True} if fused else {}
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, **kw)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for g in optimizer.param_groups:
        g["lr"] = lr
