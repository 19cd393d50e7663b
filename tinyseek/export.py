"""``tinyseek export --ckpt RUN_OR_STEP_DIR --out DIR --format hf|gguf``.

``hf``: a Hugging Face transformers model directory (config.json + model.safetensors + tokenizer files)
that ``AutoModelForCausalLM.from_pretrained(DIR)`` loads as an existing architecture (an imported model
as its own architecture; our own models as DeepseekV3, DeepseekV2, Llama, Glm4Moe or Ernie4_5_Moe; see
:mod:`tinyseek.interop.hf_export` for which settings go where).

``gguf``: one GGUF file for llama.cpp (and ollama, LM Studio, transformers' GGUF loader) of a model
that the Llama architecture expresses exactly (GQA, dense SwiGLU, no biases or q/k norms: SmolLM2 and
other imported Llama models), weights in ``--qtype`` f32, f16 (default) or q8_0, norms in f32, and the
tokenizer (vocabulary, merges, special ids, chat template) in the file's metadata. ``--out`` ending in
``.gguf`` names the file, else it is ``<out>/model-<qtype>.gguf``.

The tokenizer comes from ``--tokenizer`` (a dir, ``bytes``, or ``none``), else from ``<run dir>/tokenizer``
when the checkpoint's run has one; without one only the model files are written (GGUF needs one).
A checkpoint of LoRA adapters is merged into its base first (:func:`tinyseek.train.checkpoint.load_model`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinyseek.config import ConfigError
from tinyseek.errors import UserError
from tinyseek.interop.gguf_io import write_gguf
from tinyseek.interop.hf_export import export_hf, hf_state
from tinyseek.post.common import find_run_dir
from tinyseek.tokenizer import load_tokenizer
from tinyseek.quant.load import load_model

FORMATS = ("hf", "gguf")
GGUF_QTYPES = ("f32", "f16", "q8_0")


@dataclass
class Config:
    ckpt: str = ""          # checkpoint to export: step dir, ckpt root or run dir (latest step)
    out: str = ""           # output directory; "" = <run dir>/export/hf (beside the checkpoint)
    format: str = "hf"      # output format: "hf" (Hugging Face transformers, safetensors) or "gguf" (llama.cpp, Llama models)
    tokenizer: str = ""     # tokenizer dir or "bytes"; "" = <run dir>/tokenizer if present; "none" = skip
    qtype: str = "f16"      # gguf weight type: f32, f16 or q8_0 (norms stay f32)

    def validate(self) -> "Config":
        if not self.ckpt:
            raise ConfigError("export needs --ckpt PATH (a checkpoint step dir, ckpt root or run dir)")
        if self.format not in FORMATS:
            raise ConfigError(f"export.format must be one of {', '.join(FORMATS)}, got {self.format!r}")
        if self.qtype not in GGUF_QTYPES:
            raise ConfigError(f"export.qtype must be one of {', '.join(GGUF_QTYPES)}, got {self.qtype!r}")
        if self.format == "gguf" and self.tokenizer in ("none", "bytes"):
            raise ConfigError("a GGUF file carries its tokenizer: give --tokenizer DIR (a tokenizer.json dir) or leave it empty")
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "hf": Config}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def _tokenizer_dir(cfg: Config, ckpt: Path) -> str | None:
    """The tokenizer to export: ``--tokenizer``, else ``<run dir>/tokenizer``, else None."""
    if cfg.tokenizer == "none":
        return None
    if cfg.tokenizer:
        if cfg.tokenizer != "bytes" and not Path(cfg.tokenizer).exists():
            raise UserError(f"tokenizer path {cfg.tokenizer} does not exist")
        return cfg.tokenizer
    run = find_run_dir(ckpt)
    if run is not None and (run / "tokenizer").exists():
        return str(run / "tokenizer")
    return None


def _tokenizer(cfg: Config, ckpt: Path):
    d = _tokenizer_dir(cfg, ckpt)
    return load_tokenizer(d) if d else None


def main(cfg: Config) -> dict:
    cfg.validate()
    ckpt = Path(cfg.ckpt)
    if not ckpt.exists():
        raise UserError(f"checkpoint path {ckpt} does not exist")
    model, meta = load_model(ckpt, device="cpu")
    if hasattr(model, "qat") or any(hasattr(m, "qweight") for m in model.modules()):
        raise UserError(f"{ckpt} is a quantized checkpoint: export the float one (quantize after exporting "
                        "with --format gguf --qtype q8_0, or let transformers quantize the HF export)")
    tok = _tokenizer(cfg, ckpt)
    out = Path(cfg.out) if cfg.out else (find_run_dir(ckpt) or ckpt) / "export" / cfg.format
    if cfg.format == "gguf":
        return _export_gguf(cfg, model, meta, tok, out, ckpt)
    summary = export_hf(model, out, tokenizer=tok)
    summary["step"] = meta.get("step")
    summary["tokenizer"] = getattr(tok, "kind", None)
    print(f"exported step {summary['step']} as {summary['architecture']} to {out} "
          f"({summary['params']:,} params; tokenizer: {summary['tokenizer'] or 'none'})")
    print(f"load with: transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return summary


def _export_gguf(cfg: Config, model, meta: dict, tok, out: Path, ckpt: Path) -> dict:
    """One GGUF file of a model the Llama architecture expresses (see the module docstring)."""
    tok_dir = _tokenizer_dir(cfg, ckpt)
    if tok is None or tok_dir is None or not (Path(tok_dir) / "tokenizer.json").is_file():
        raise UserError("GGUF export needs a byte-level BPE tokenizer dir with tokenizer.json (--tokenizer DIR)")
    hf_cfg, tensors = hf_state(model, tokenizer=tok)
    arch = hf_cfg["architectures"][0]
    if arch != "LlamaForCausalLM":
        raise UserError(f"GGUF export writes the llama architecture only; this model is {arch} "
                        "(export it with --format hf instead)")
    path = out if out.suffix == ".gguf" else out / f"model-{cfg.qtype}.gguf"
    summary = write_gguf(hf_cfg, tensors, tok_dir, path, qtype=cfg.qtype)
    summary["step"] = meta.get("step")
    print(f"exported step {summary['step']} as GGUF ({cfg.qtype}, llama) to {path} ({summary.get('bytes', 0):,} bytes)")
    print(f"run with: llama-cli -m {path}   |   transformers: AutoModelForCausalLM.from_pretrained"
          f"({str(path.parent)!r}, gguf_file={path.name!r})")
    return {**summary, "out": str(path), "architecture": "llama (GGUF)"}
