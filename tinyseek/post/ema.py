"""Polyak / exponential moving average of a policy's trainable weights (``--ema D`` in GRPO and PPO).

After every optimizer step the shadow moves toward the weights, ``shadow += (1 - D) * (w - shadow)``
(a window of about ``1 / (1 - D)`` steps). Mid-run evaluations score the shadow (:meth:`WeightEMA.applied`),
and at the end it replaces the weights (:meth:`WeightEMA.copy_to`), so what a stage evaluates is what it
returns. Not in the DeepSeek papers: on the tiny CPU runs single RL steps move held-out pass@1 by 0.05-0.10,
and the average damps that (benchmarks/README.md, grpo_diagnostics.py).
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch


@contextlib.contextmanager
def swapped(params: list[torch.Tensor], values: list[torch.Tensor] | None) -> Iterator[None]:
    """``params`` hold ``values`` inside the block and their own weights again after it (restored
    exactly, also on an exception); nothing happens when ``values`` is None."""
    if values is None:
        yield
        return
    with torch.no_grad():
        saved = [p.detach().clone() for p in params]
        for p, v in zip(params, values):
            p.copy_(v)
    try:
        yield
    finally:
        with torch.no_grad():
            for p, v in zip(params, saved):
                p.copy_(v)


class WeightEMA:
    """The shadow copy of ``params`` with ``decay`` in (0, 1); starts equal to the weights."""

    def __init__(self, params: list[torch.Tensor], decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]

    @torch.no_grad()
    def update(self) -> None:
        """One step of the average (call after each optimizer step)."""
        for e, p in zip(self.shadow, self.params):
            e.lerp_(p.detach(), 1.0 - self.decay)

    def applied(self):
        """A context in which the parameters hold the average (restored exactly after it)."""
        return swapped(self.params, self.shadow)

    @torch.no_grad()
    def copy_to(self) -> None:
        """The average becomes the weights (the end of a run)."""
        for e, p in zip(self.shadow, self.params):
            p.copy_(e)


def averaged(ema: WeightEMA | None):
    """``ema.applied()``, or a block that changes nothing when there is no average (``--ema 0``)."""
    return ema.applied() if ema is not None else contextlib.nullcontext()
