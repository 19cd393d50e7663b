"""Mixed precision for the training loop: the dtype names, fp16's dynamic loss scaling, FP8 linear layers.

- ``--dtype`` picks autocast's dtype (:data:`DTYPES`; :func:`tinyseek.common.autocast_dtype` maps the
  name): weights, gradients and the optimizer state stay fp32 (master weights) in every mode.
- fp16 (``--dtype fp16``) has 5 exponent bits, so small gradients underflow: the loss is multiplied
  by a scale before backward and the gradients divided by it before clipping and the optimizer
  step (:class:`LossScaler`, GradScaler's rule; Micikevicius et al. 2018). The scale is dynamic: a step whose
  gradients hold inf/nan is skipped (no optimizer step) and halves the scale; 2000 finite steps in a
  row double it. :func:`loss_scaler` builds a scaler that is a pass-through for every other dtype,
  so the loop has one code path. :func:`update_scale` makes the scale follow the loop's own skip
  decision (which is global: loss and gradient norm are reduced over all ranks) instead of each
  rank's local inf check, so every rank keeps the same scale. The first steps of an fp16 run may be
  skipped while the scale settles; they count as skipped steps like any non-finite step.
- The scaler's state (:func:`scaler_state`: scale, growth/backoff factors, growth interval, the
  count of finite steps since the last change) is five numbers, stored in the checkpoint's
  ``meta.json`` and restored by :func:`load_scaler_state`, so an fp16 resume continues with the same
  scale and the same growth schedule.
- FP8 (``--fp8 true``): :func:`convert_fp8` swaps the qualifying ``nn.Linear`` layers
  (:func:`fp8_eligible`) for torchao's ``Float8Linear`` (dynamic tensor-wise scaling of inputs,
  weights and output gradients to float8 e4m3/e5m2). On CUDA it needs FP8 tensor cores (compute
  capability 8.9+: H100, L4, ...); on CPU it runs in torchao's emulation (the same casts and scales,
  the matmul in fp32), which tests the numerics, not the speed. The router and the LM head stay in
  the autocast dtype, as in DeepSeek-V3 (section 3.3, which also keeps embeddings, norms and the
  attention core out of FP8). Departures from the paper: one scale per tensor instead of its 1x128
  activation tiles and 128x128 weight blocks, and the routed experts (stacked weights, not
  ``nn.Linear``) stay in the autocast dtype where DeepSeek-V3 runs them in FP8. torchao is imported
  here only, lazily.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from tinyseek.errors import UserError

DTYPES = ("auto", "fp32", "float32", "bf16", "bfloat16", "fp16", "float16")  # the --dtype names
FP8_MULTIPLE = 16  # float8 GEMMs (torch._scaled_mm) need both dims of the weight divisible by 16
FP8_SKIP = ("lm_head", "router")  # name components never converted (output logits, routing decisions)
SCALER_KEYS = ("scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker")


# ---------------------------------------------------------------------------------------------
# fp16: dynamic loss scaling
# ---------------------------------------------------------------------------------------------
class LossScaler:
    """Dynamic loss scaling (the contract of ``torch.amp.GradScaler``, without its per-device inf
    checks): ``scale(loss)`` multiplies by the scale (a power of two, so scaling and unscaling are
    exact), ``unscale_(opt)`` divides every gradient of the optimizer's parameters by it in place
    (plain tensors and DTensors alike: tensor parallelism and FSDP2 leave a mix, which GradScaler's
    fused check refuses), ``step(opt)`` is ``opt.step()``, and ``update(skipped)`` takes the loop's
    own skip decision (global: loss and gradient norm are reduced over all ranks), so every rank
    keeps the same scale: backoff (x0.5) after a skipped step, growth (x2) after
    ``growth_interval`` finite steps in a row. Disabled, it is a pass-through. The state names
    (:data:`SCALER_KEYS`) are GradScaler's, so checkpoints written with it still load."""

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000):
        self.enabled = enabled
        self._scale, self.growth_factor, self.backoff_factor = float(init_scale), float(growth_factor), float(backoff_factor)
        self.growth_interval, self._growth_tracker = int(growth_interval), 0

    def is_enabled(self) -> bool:
        return self.enabled

    def get_scale(self) -> float:
        return self._scale if self.enabled else 1.0

    def get_backoff_factor(self) -> float:
        return self.backoff_factor

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self._scale if self.enabled else loss

    @torch.no_grad()
    def unscale_(self, opt: torch.optim.Optimizer) -> None:
        if not self.enabled:
            return
        inv = 1.0 / self._scale
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        plain = [g for g in grads if type(g) is torch.Tensor]
        if plain:
            torch._foreach_mul_(plain, inv)
        for g in grads:
            if type(g) is not torch.Tensor:  # a DTensor: its local shard
                g.mul_(inv)

    def step(self, opt: torch.optim.Optimizer) -> None:
        opt.step()

    def update(self, skipped: bool) -> None:
        if not self.enabled:
            return
        if skipped:
            self._scale *= self.backoff_factor
            self._growth_tracker = 0
        else:
            self._growth_tracker += 1
            if self._growth_tracker == self.growth_interval:
                self._scale *= self.growth_factor
                self._growth_tracker = 0

    def state_dict(self) -> dict[str, float | int]:
        return {"scale": self._scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "_growth_tracker": self._growth_tracker}

    def load_state_dict(self, st: dict) -> None:
        self._scale, self.growth_factor, self.backoff_factor = float(st["scale"]), float(st["growth_factor"]), float(st["backoff_factor"])
        self.growth_interval, self._growth_tracker = int(st["growth_interval"]), int(st["_growth_tracker"])


def loss_scaler(amp_dtype: torch.dtype | None, device: torch.device) -> LossScaler:
    """A :class:`LossScaler`, enabled only when autocast runs in fp16; disabled, ``scale`` returns
    the loss, ``unscale_`` / ``update`` do nothing and ``step`` is ``opt.step()``. (``device``: kept
    for the call sites; the scaler is device-free.)"""
    return LossScaler(enabled=amp_dtype == torch.float16)


def update_scale(scaler: LossScaler, skipped: bool) -> None:
    """``scaler.update(skipped)``: the scale follows the loop's global skip decision. Call it once per
    step, after ``unscale_``."""
    scaler.update(skipped)


def scaler_state(scaler: LossScaler) -> dict[str, float | int] | None:
    """The scaler's state as JSON numbers (None when disabled).

    >>> s = LossScaler(init_scale=1024.0)
    >>> scaler_state(s)["scale"], scaler_state(LossScaler(enabled=False))
    (1024.0, None)
    """
    if not scaler.is_enabled():
        return None
    st = scaler.state_dict()
    return {k: (int(st[k]) if k in ("growth_interval", "_growth_tracker") else float(st[k])) for k in SCALER_KEYS}


def load_scaler_state(scaler: LossScaler, state: Any, where: str | Path) -> bool:
    """Restore :func:`scaler_state` output into an enabled scaler; returns whether it did.

    ``state`` None (a checkpoint written without fp16) leaves the fresh scaler. A state that is not
    five finite numbers with a positive scale is a one-line :class:`UserError` naming ``where``.
    """
    if not scaler.is_enabled() or state is None:
        return False
    ok = isinstance(state, dict) and all(isinstance(state.get(k), (int, float)) and not isinstance(state.get(k), bool)
                                         and math.isfinite(state[k]) for k in SCALER_KEYS)
    if not ok or state["scale"] <= 0 or state["growth_interval"] < 1 or state["_growth_tracker"] < 0:
        raise UserError(f"checkpoint file {where}: loss scaler state {state!r} is not five finite numbers with a "
                        "positive scale: restore the file or resume from an earlier checkpoint")
    scaler.load_state_dict({k: state[k] for k in SCALER_KEYS})
    return True


# ---------------------------------------------------------------------------------------------
# FP8 linear layers (torchao float8 training)
# ---------------------------------------------------------------------------------------------
def fp8_eligible(name: str, module: nn.Module) -> bool:
    """Whether :func:`convert_fp8` converts ``module`` (at dotted path ``name``): an ``nn.Linear``
    whose in and out features are multiples of 16, not the LM head, not a router.

    >>> fp8_eligible("layers.0.attn.o_proj", nn.Linear(64, 64)), fp8_eligible("lm_head", nn.Linear(64, 256))
    (True, False)
    >>> fp8_eligible("layers.0.attn.kv_a_proj", nn.Linear(64, 40)), fp8_eligible("norm", nn.LayerNorm(64))
    (False, False)
    """
    if not isinstance(module, nn.Linear):
        return False
    if any(part in FP8_SKIP for part in name.split(".")):
        return False
    return module.in_features % FP8_MULTIPLE == 0 and module.out_features % FP8_MULTIPLE == 0


def fp8_emulate(device: torch.device) -> bool:
    """True on CPU (torchao's emulation), False on a CUDA device with FP8 tensor cores; a one-line
    :class:`UserError` for any other device."""
    if device.type == "cpu":
        return True
    if device.type == "cuda":
        cap = torch.cuda.get_device_capability(device)
        if cap < (8, 9):
            raise UserError(f"--fp8 needs FP8 tensor cores (compute capability 8.9+, e.g. H100); "
                            f"{torch.cuda.get_device_name(device)} is {cap[0]}.{cap[1]}: drop --fp8")
        return False
    raise UserError(f"--fp8 runs on CUDA (compute capability 8.9+) or, emulated, on CPU; not on {device.type}")


def convert_fp8(model: nn.Module, device: torch.device) -> list[str]:
    """Swap ``model``'s qualifying linear layers (:func:`fp8_eligible`) for torchao ``Float8Linear``
    in place and return their names. Parameters are kept (the same ``nn.Parameter`` objects, so the
    state dict, checkpoints and an optimizer built afterwards are unchanged); call it after moving
    the model to ``device`` and before wrapping it for data parallelism or building the optimizer.

    A one-line :class:`UserError` when torchao is missing, the device cannot run FP8, or no layer
    qualifies."""
    emulate = fp8_emulate(device)
    try:
        from torchao.float8 import Float8LinearConfig, convert_to_float8_training
    except ImportError as e:
        raise UserError(f"--fp8 needs torchao (pip install torchao): {e}") from None
    names = [n for n, m in model.named_modules() if fp8_eligible(n, m)]
    if not names:
        raise UserError(f"--fp8: no linear layer qualifies (in/out features multiples of {FP8_MULTIPLE}, "
                        "not the LM head or a router): drop --fp8 for this model")
    chosen = set(names)
    convert_to_float8_training(model, module_filter_fn=lambda m, fqn: fqn in chosen,
                               config=Float8LinearConfig(emulate=emulate))
    return names
