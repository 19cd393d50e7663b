"""``tinyseek export --ckpt RUN_OR_STEP_DIR --out DIR --format hf``: write a checkpoint as a Hugging Face
transformers model directory (config.json + model.safetensors + tokenizer files) that
``AutoModelForCausalLM.from_pretrained(DIR)`` loads as an existing architecture (DeepseekV3, DeepseekV2,
Llama, Glm4Moe or Ernie4_5_Moe; see :mod:`tinyseek.model.hf_export` for which settings go where).

The tokenizer comes from ``--tokenizer`` (a dir, ``bytes``, or ``none``), else from ``<run dir>/tokenizer``
when the checkpoint's run has one; without one only the model files are written.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinyseek.config import ConfigError
from tinyseek.errors import UserError

FORMATS = ("hf",)


@dataclass
class Config:
    ckpt: str = ""          # checkpoint to export: step dir, ckpt root or run dir (latest step)
    out: str = ""           # output directory; "" = <run dir>/export/hf (beside the checkpoint)
    format: str = "hf"      # output format: "hf" (Hugging Face transformers, safetensors)
    tokenizer: str = ""     # tokenizer dir or "bytes"; "" = <run dir>/tokenizer if present; "none" = skip

    def validate(self) -> "Config":
        if not self.ckpt:
            raise ConfigError("export needs --ckpt PATH (a checkpoint step dir, ckpt root or run dir)")
        if self.format not in FORMATS:
            raise ConfigError(f"export.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "hf": Config}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def _run_dir(ckpt: Path) -> Path | None:
    from tinyseek.post.common import find_run_dir
    return find_run_dir(ckpt)


def _tokenizer(cfg: Config, ckpt: Path):
    from tinyseek.tokenizer import load_tokenizer
    if cfg.tokenizer == "none":
        return None
    if cfg.tokenizer:
        if cfg.tokenizer != "bytes" and not Path(cfg.tokenizer).exists():
            raise UserError(f"tokenizer path {cfg.tokenizer} does not exist")
        return load_tokenizer(cfg.tokenizer)
    run = _run_dir(ckpt)
    if run is not None and (run / "tokenizer").exists():
        return load_tokenizer(run / "tokenizer")
    return None


def main(cfg: Config) -> dict:
    from tinyseek.model.hf_export import export_hf
    from tinyseek.train.checkpoint import load_model

    cfg.validate()
    ckpt = Path(cfg.ckpt)
    if not ckpt.exists():
        raise UserError(f"checkpoint path {ckpt} does not exist")
    model, meta = load_model(ckpt, device="cpu")
    tok = _tokenizer(cfg, ckpt)
    out = Path(cfg.out) if cfg.out else (_run_dir(ckpt) or ckpt) / "export" / cfg.format
    summary = export_hf(model, out, tokenizer=tok)
    summary["step"] = meta.get("step")
    summary["tokenizer"] = getattr(tok, "kind", None)
    print(f"exported step {summary['step']} as {summary['architecture']} to {out} "
          f"({summary['params']:,} params; tokenizer: {summary['tokenizer'] or 'none'})")
    print(f"load with: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return summary
