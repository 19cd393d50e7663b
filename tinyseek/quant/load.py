"""Load any checkpoint, every format registered: the loader for code above ``train/`` and ``quant/``.

:func:`tinyseek.train.checkpoint.load_model` loads float checkpoints and LoRA adapter checkpoints,
plus whatever formats have registered with it (:func:`tinyseek.train.checkpoint.register_format`);
``train/`` cannot import the layers above it that define more formats. This module imports every
module that registers one (today :mod:`tinyseek.quant.quantize`: quantized checkpoints,
``quant_config.json``), so its :func:`load_model` knows them all whatever the caller imported
before. Serve, post, eval, export, pipeline and the benchmarks load checkpoints through it.

A new checkpoint format: a :class:`~tinyseek.train.checkpoint.CheckpointFormat` registered by the
module that defines it, that module imported here, and its test (tests/test_checkpoint_formats.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

import tinyseek.quant.quantize  # noqa: F401  (registers the quantized checkpoint format)
from tinyseek.train import checkpoint


def load_model(path: str | Path, device: str | torch.device = "cpu"):
    """``(model, meta)`` of any checkpoint (float, LoRA adapters merged into their base, quantized),
    the model in eval mode on ``device``; ``path`` is a step dir, a ckpt root or a run dir (latest
    step), as for :func:`tinyseek.train.checkpoint.load_model`."""
    return checkpoint.load_model(path, device)
