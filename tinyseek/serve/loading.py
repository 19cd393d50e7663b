"""Load a checkpoint and its tokenizer for serving / chat.

The model comes from :func:`tinyseek.quant.load.load_model` (step dir, ckpt root or run dir;
quantized checkpoints included). The tokenizer is ``--tokenizer PATH`` when given (``bytes`` = the
byte-level fallback), else the first ``tokenizer`` directory / ``tokenizer.json`` found in the
checkpoint directory or up to three parents (a run dir keeps it beside ``ckpt/``), else the path
recorded in the checkpoint's ``meta.json`` under ``"tokenizer"``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from tinyseek.common import get_device
from tinyseek.errors import UserError
from tinyseek.tokenizer import load_tokenizer
from tinyseek.quant.load import load_model


def find_tokenizer(ckpt: str | Path, meta: dict | None = None) -> str | None:
    """Where the tokenizer of a checkpoint lives: a ``tokenizer`` dir (or ``tokenizer.json`` /
    ``tokenizer_config.json``) in the checkpoint dir or up to three parents, else ``meta["tokenizer"]``
    (a path, or ``"bytes"``)."""
    p = Path(ckpt).resolve()
    for d in [p, *list(p.parents)[:3]]:
        if (d / "tokenizer").is_dir():
            return str(d / "tokenizer")
        if (d / "tokenizer.json").is_file() or (d / "tokenizer_config.json").is_file():
            return str(d)
    spec = (meta or {}).get("tokenizer")
    if spec and (spec == "bytes" or Path(spec).exists()):
        return str(spec)
    return None


def load_tokenizer_for(ckpt: str | Path, spec: str = "", meta: dict | None = None):
    spec = spec or find_tokenizer(ckpt, meta)
    if not spec:
        raise UserError(f"no tokenizer found next to {ckpt}; pass --tokenizer DIR (or --tokenizer bytes)")
    if spec != "bytes" and not Path(spec).exists():
        raise UserError(f"tokenizer path {spec} does not exist")
    return load_tokenizer(spec)


def serving_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto``: bf16 on CUDA, fp32 elsewhere (this CPU has no fast bf16)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if name not in table:
        raise UserError(f"dtype must be auto/fp32/bf16/fp16, got {name!r}")
    return table[name]


def check_ckpt(ckpt: str) -> None:
    """:class:`UserError` for a missing ``--ckpt`` or a path that does not exist."""
    if not ckpt:
        raise UserError("--ckpt is required (a run dir, ckpt root or step dir)")
    if not Path(ckpt).exists():
        raise UserError(f"checkpoint path {ckpt} does not exist")


def load_for_serving(ckpt: str, tokenizer: str = "", device: str = "auto", dtype: str = "auto"):
    """``(model, tokenizer, meta)`` ready for :class:`tinyseek.serve.engine.Engine`."""
    check_ckpt(ckpt)
    dev = get_device(device)
    model, meta = load_model(ckpt, device=dev)
    dt = serving_dtype(dtype, dev)
    plain = all(type(p) is torch.nn.Parameter and p.is_floating_point() for p in model.parameters())
    if plain and dt != next(model.parameters()).dtype:
        model = model.to(dt)
    model.eval()
    tok = load_tokenizer_for(ckpt, tokenizer, meta)
    if tok.vocab_size > model.cfg.vocab_size:
        raise UserError(f"tokenizer has {tok.vocab_size} tokens but the model only {model.cfg.vocab_size}")
    return model, tok, meta
