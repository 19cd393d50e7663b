"""LoRA adapters (Hu et al. 2021) on the model's ``nn.Linear`` projections.

A wrapped projection computes ``y = W x + (alpha / rank) * B (A dropout(x))`` with the base ``W``
frozen, ``A`` (rank, in) Kaiming-uniform and ``B`` (out, rank) zeros, so a fresh adapter returns the
base output exactly (``B A x`` is exactly zero). Only ``A`` and ``B`` train.

- Targets are the last name component of ``nn.Linear`` modules (``q_proj``, ``kv_b_proj``,
  ``gate_proj``, ...); ``all-linear`` (the default of the stages) is every ``nn.Linear`` except the
  LM head. A router is never adapted; ``lm_head`` only when named (and not when it is tied to the
  embedding). A name that matches nothing is a one-line :class:`UserError` listing the names there are.
- :class:`LoRALinear` is a wrapper, not an ``nn.Linear``: code that reads a projection's weight
  directly (MLA's folded / absorbed decode weights, the fused shared-expert node) sees a module it
  cannot fold and takes the plain path that calls the module, so adapters are always applied.
- :func:`merge_lora` adds ``(alpha / rank) B A`` into each base weight and puts the plain module
  back (in place): the result is a plain model, the same up to float rounding.
- :func:`adapters_disabled` / :class:`BaseView`: the base model without a copy (the KL / DPO reference).
- :func:`merged`: for a block of inference (GRPO rollouts), plain projections with the adapters
  added in, so the fast decode paths run (the wrapped model decodes correctly but up to 5x slower:
  MLA then re-expands its cached keys every step).

State dict keys of the adapters: ``<module path>.lora_A.weight`` and ``<module path>.lora_B.weight``
(:func:`lora_state_dict`); the base weight of a wrapped module sits at ``<module path>.base.weight``.
"""
from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.config import ConfigError
from tinyseek.errors import UserError
from tinyseek.model.layers import Linear

ALL_LINEAR = "all-linear"  # every nn.Linear except the LM head (and routers)


def check_options(rank: int, alpha: float, targets: str, dropout: float) -> None:
    """:class:`ConfigError` for bad LoRA options (``rank`` 0 = off; the rest is checked only when on).

    >>> check_options(0, 16.0, "", 0.0)
    >>> check_options(-1, 16.0, "q_proj", 0.0)
    Traceback (most recent call last):
    ...
    tinyseek.config.ConfigError: lora_rank must be >= 0 (0 = off), got -1
    """
    if rank < 0:
        raise ConfigError(f"lora_rank must be >= 0 (0 = off), got {rank}")
    if rank == 0:
        return
    if not alpha > 0:
        raise ConfigError(f"lora_alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ConfigError(f"lora_dropout must be in [0, 1), got {dropout}")
    if not parse_targets(targets):
        raise ConfigError(f"lora_targets must name nn.Linear modules (e.g. q_proj,o_proj) or {ALL_LINEAR}")


def parse_targets(spec: str | list[str]) -> list[str]:
    """``"q_proj, o_proj"`` -> ``["q_proj", "o_proj"]`` (a list passes through, stripped)."""
    items = spec.split(",") if isinstance(spec, str) else spec
    return [s.strip() for s in items if s.strip()]


class LoRALinear(nn.Module):
    """``base(x) + scale * lora_B(lora_A(dropout(x)))`` around a frozen ``nn.Linear``."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be > 0, got {rank}")
        self.base = base
        self.rank, self.alpha, self.scale, self.dropout = rank, float(alpha), float(alpha) / rank, dropout
        w = base.weight
        self.lora_A = Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # nn.Linear's own init (as PEFT)
        nn.init.zeros_(self.lora_B.weight)
        self.enabled = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout > 0 else x
        return y + self.lora_B(self.lora_A(h)) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """``scale * B @ A`` (out, in) in fp32."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, dropout={self.dropout:g}"


def _is_router(name: str) -> bool:
    return any(part == "router" or part.endswith("router") for part in name.split("."))


def linear_names(model: nn.Module) -> dict[str, nn.Linear]:
    """``{path: module}`` of the ``nn.Linear`` modules LoRA may wrap (routers and adapters excluded)."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name and not _is_router(name) \
                and not any(p in ("lora_A", "lora_B") for p in name.split(".")):
            out[name] = m
    return out


def select_targets(model: nn.Module, targets: str | list[str]) -> list[str]:
    """Module paths matched by ``targets`` (last name component, or ``all-linear``); a name that
    matches nothing, or an ``lm_head`` tied to the embedding, is a :class:`UserError`."""
    names = parse_targets(targets)
    linears = {n: m for n, m in linear_names(model).items() if not isinstance(m, LoRALinear)}
    last = {n: n.rsplit(".", 1)[-1] for n in linears}
    available = sorted(set(last.values()))
    picked: list[str] = []
    for t in names:
        if t == ALL_LINEAR:
            hit = [n for n, l in last.items() if l != "lm_head"]
        else:
            hit = [n for n, l in last.items() if l == t]
        if not hit:
            raise UserError(f"LoRA target {t!r} matches no nn.Linear module; available: "
                            f"{', '.join(available + [ALL_LINEAR])}")
        picked += [n for n in hit if n not in picked]
    tied = getattr(getattr(model, "cfg", None), "tie_embeddings", False)
    if tied and any(last[n] == "lm_head" for n in picked):
        raise UserError("LoRA on lm_head needs an untied LM head (this model ties it to the embedding)")
    return sorted(picked, key=list(linears).index)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: str | list[str] = ALL_LINEAR,
               dropout: float = 0.0, base: str | None = None) -> list[str]:
    """Freeze every parameter of ``model`` and wrap the target projections in :class:`LoRALinear`
    (in place). Records ``model.lora_info`` (rank, alpha, targets, dropout, base: an opaque string
    such as the base checkpoint's path) and returns the wrapped module paths."""
    if has_lora(model):
        raise UserError("the model already has LoRA adapters (merge them first)")
    if rank <= 0:
        raise ValueError(f"LoRA rank must be > 0, got {rank}")
    picked = select_targets(model, targets)
    model._lora_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(False)
    for name in picked:
        parent, _, child = name.rpartition(".")
        holder = model.get_submodule(parent) if parent else model
        lin = getattr(holder, child)
        wrapped = LoRALinear(lin, rank, alpha, dropout)
        wrapped.train(lin.training)
        setattr(holder, child, wrapped)
    model.lora_info = {"rank": int(rank), "alpha": float(alpha), "targets": parse_targets(targets),
                       "dropout": float(dropout), "base": base}
    return picked


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def has_lora(model: nn.Module) -> bool:
    return any(isinstance(m, LoRALinear) for m in model.modules())


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters an optimizer should get: those with ``requires_grad`` (all of a plain model,
    only the adapters after :func:`apply_lora`), in ``model.parameters()`` order."""
    return [p for p in model.parameters() if p.requires_grad]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' weights: ``{<path>.lora_A.weight, <path>.lora_B.weight}`` (detached)."""
    out = {}
    for name, m in lora_modules(model).items():
        out[f"{name}.lora_A.weight"] = m.lora_A.weight.detach()
        out[f"{name}.lora_B.weight"] = m.lora_B.weight.detach()
    return out


@torch.no_grad()
def load_lora_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Copy adapter weights into a model wrapped by :func:`apply_lora` (same targets); missing or
    unexpected keys and shape mismatches are a :class:`UserError`."""
    own = lora_state_dict(model)
    missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
    if missing or unexpected:
        raise UserError(f"adapter weights do not fit the model: missing {missing[:3]}, unexpected {unexpected[:3]}")
    for k, t in own.items():
        if t.shape != state[k].shape:
            raise UserError(f"adapter weight {k} has shape {tuple(state[k].shape)}, the model {tuple(t.shape)}")
        t.copy_(state[k])


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Add every adapter into its base weight and put the plain module back (in place); restores
    the ``requires_grad`` flags :func:`apply_lora` found. Returns ``model``."""
    for name, m in lora_modules(model).items():
        w = m.base.weight
        w.copy_((w.float() + m.delta_weight()).to(w.dtype))  # in place: bumps the version (folded caches see it)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, m.base)
    flags = getattr(model, "_lora_requires_grad", None)
    for n, p in model.named_parameters():
        p.requires_grad_(flags.get(n, True) if flags is not None else True)
    for attr in ("_lora_requires_grad", "lora_info"):
        if hasattr(model, attr):
            delattr(model, attr)
    return model


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block the model computes its base outputs (every adapter switched off)."""
    mods = list(lora_modules(model).values())
    was = [m.enabled for m in mods]
    for m in mods:
        m.enabled = False
    try:
        yield model
    finally:
        for m, w in zip(mods, was):
            m.enabled = w


@contextlib.contextmanager
def merged(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block every wrapped projection is a plain ``Linear`` holding ``W + scale * B A``
    (new tensors, computed as :func:`merge_lora` does; base and adapters untouched), so inference
    runs the fast paths that need plain projections (MLA's folded decode and the mixed serving
    step, the C kernels): generation then equals the merged model's exactly, at the cost of one
    temporary copy of the wrapped weights. The wrappers are put back on exit. No-op without adapters."""
    swapped = []
    with torch.no_grad():
        for name, m in lora_modules(model).items():
            w = m.base.weight
            lin = Linear(m.in_features, m.out_features, bias=False, device=w.device, dtype=w.dtype)
            lin.weight = nn.Parameter((w.float() + m.delta_weight()).to(w.dtype), requires_grad=False)
            lin.bias = m.base.bias
            lin.train(m.training)
            parent, _, child = name.rpartition(".")
            holder = model.get_submodule(parent) if parent else model
            setattr(holder, child, lin)
            swapped.append((holder, child, m))
    try:
        yield model
    finally:
        for holder, child, m in swapped:
            setattr(holder, child, m)


class BaseView:
    """The frozen base of a LoRA model as a callable model (the KL / DPO reference without a second
    copy): calls run in eval mode with the adapters off, without gradients. ``cfg`` and other
    attributes read through to the model."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, *args, **kwargs):
        m = self.model
        was = m.training
        m.eval()
        try:
            with torch.no_grad(), adapters_disabled(m):
                return m(*args, **kwargs)
        finally:
            m.train(was)

    def __getattr__(self, name):
        return getattr(self.model, name)

    def parameters(self):
        return self.model.parameters()
