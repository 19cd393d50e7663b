"""DP-SGD for SFT through Opacus (``tinyseek sft --dp true``): per-example clipping + Gaussian noise.

What it needs from the model (Opacus 1.6, checked on this code base):
- A dense model: ``--model.n-routed-experts 0``. The MoE ``Router`` holds a buffer (the
  aux-loss-free ``expert_bias``) inside a trainable module, which Opacus refuses ("trainable layer
  with buffers"), and the stacked expert weights are used through data-dependent routing that has
  no per-sample gradient rule. So MoE models are rejected here with a clear message.
- Nothing to swap in attention: we have no ``nn.MultiheadAttention`` (MLA/GQA are plain
  ``nn.Linear`` + functional SDPA). ``nn.Linear`` and ``nn.Embedding`` use Opacus' own per-sample
  gradient rules; our custom ``RMSNorm`` (a bare ``weight``) falls back to Opacus' functorch
  (``vmap``) rule automatically. ``ModuleValidator.validate`` is run and must report no errors.
- Batches come from Opacus' Poisson-sampling data loader (variable batch size), which the
  epsilon accounting (RDP accountant) assumes. Loss reduction is "mean".

Opacus' secure RNG (``secure_mode``) is off: fine for experiments, not for a production guarantee.
``epsilon(delta)`` is reported in the SFT metrics and result. Starting from a checkpoint loaded
with ``--init`` works as long as that model is dense.
"""
from __future__ import annotations

import warnings

import torch

from tinyseek.errors import UserError
from tinyseek.model.layers import Linear


class DPEngine:
    def __init__(self, engine, loader):
        self._engine = engine
        self.loader = loader

    def epsilon(self, delta: float) -> float:
        return float(self._engine.get_epsilon(delta))

    def batches(self):
        """Index batches from the Poisson sampler (may be empty; callers skip those)."""
        for (idx,) in self.loader:
            yield idx.tolist()


def register_opacus() -> None:
    """Give the model's :class:`~tinyseek.model.layers.Linear` Opacus' per-sample gradient (and
    ghost-clipping norm) rules of ``nn.Linear``: Opacus looks them up by exact module type, so without
    this it would fall back to its slower functorch rule. Needs opacus installed."""
    from opacus.grad_sample import GradSampleModule
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping import GradSampleModuleFastGradientClipping

    for cls in (GradSampleModule, GradSampleModuleFastGradientClipping):
        for table in ("GRAD_SAMPLERS", "NORM_SAMPLERS"):
            rules = getattr(cls, table, None)
            if isinstance(rules, dict) and torch.nn.Linear in rules:
                rules.setdefault(Linear, rules[torch.nn.Linear])


def make_private(model, optimizer, cfg, n_examples: int):
    """Wrap (model, optimizer) for DP-SGD; returns (GradSampleModule, DPOptimizer, DPEngine)."""
    try:
        from opacus import PrivacyEngine
        from opacus.validators import ModuleValidator
    except ImportError:
        raise UserError("--dp needs opacus (pip install opacus)") from None
    register_opacus()  # the model's Linear (an nn.Linear subclass) gets Opacus' nn.Linear rules
    if getattr(model.cfg, "is_moe", False):
        raise UserError("DP-SGD needs a dense model (Opacus has no per-sample gradients for the MoE router "
                        "and stacked experts): set --model.n-routed-experts 0")
    errors = ModuleValidator.validate(model, strict=False)
    if errors:
        raise UserError(f"Opacus cannot handle this model: {errors[0]}")
    ds = torch.utils.data.TensorDataset(torch.arange(n_examples))
    loader = torch.utils.data.DataLoader(ds, batch_size=cfg.batch_size, shuffle=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "secure RNG turned off": fine for experiments, noted in the docstring
        engine = PrivacyEngine(accountant="rdp")
        model, optimizer, loader = engine.make_private(
            module=model, optimizer=optimizer, data_loader=loader,
            noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_max_grad_norm,
            loss_reduction="mean", poisson_sampling=True)
    # Opacus' hooks on the first layer (the embedding: integer inputs) make torch warn at every backward
    warnings.filterwarnings("ignore", message="Full backward hook is firing")
    return model, optimizer, DPEngine(engine, loader)
