"""``tinyseek <stage> [--preset NAME] [--key value ...]``.

Each stage module exposes ``Config`` (a dataclass with ``validate()``), ``preset(name) -> Config``
and ``main(cfg) -> dict``. Options are the config's fields in kebab-case (``--n-layers 4``) or
dotted for nested configs (``--model.top-k 2``). Bad input exits with status 2 and one line:
``tinyseek: error: <what is wrong>``.
"""
from __future__ import annotations

import importlib
import sys

from tinyseek.errors import UserError

# stage name -> module (one line each; a module provides Config, preset(), main())
STAGES: dict[str, str] = {
    "data": "tinyseek.data.pipeline",
    "tokenizer": "tinyseek.tokenizer",
    "pretrain": "tinyseek.train.pretrain",
    "sft": "tinyseek.post.sft",
    "grpo": "tinyseek.post.grpo",
    "dpo": "tinyseek.post.dpo",
    "rejection": "tinyseek.post.rejection",
    "distill": "tinyseek.post.distill",
    "import": "tinyseek.importer",
    "eval": "tinyseek.eval",
    "export": "tinyseek.export",
    "quantize": "tinyseek.quant.stage",
    "serve": "tinyseek.serve.server",
    "chat": "tinyseek.serve.chat",
    "run": "tinyseek.pipeline",
}

# stages that train: glibc malloc keeps their big per-step buffers mapped (tinyseek/malloc.py)
TRAINING_STAGES = {"pretrain", "sft", "grpo", "dpo", "rejection", "distill", "run"}


def usage() -> str:
    return ("usage: tinyseek <stage> [--preset NAME] [--option value ...]\n"
            "stages: " + ", ".join(STAGES) + "\n"
            "`tinyseek <stage> --help` lists that stage's options.")


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a dataclass."""
    import inspect
    import re

    out: dict[str, str] = {}
    for klass in reversed(cls.__mro__):  # subclasses override their bases' comments
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        for m in re.finditer(r"^\s+(\w+)\s*:[^#\n]*#\s*(.+)$", src, re.M):
            out[m.group(1)] = m.group(2).strip()
    return out


def stage_help(stage: str, mod) -> str:
    import dataclasses

    pos = getattr(mod, "POSITIONAL", None)
    head = f"usage: tinyseek {stage}" + (f" {pos.upper()}" if pos else "") + " [--preset NAME] [--option value ...]"
    lines = [head, "options (defaults shown):"]
    rows: list[tuple[str, str]] = []

    def walk(cfg, prefix=""):
        notes = field_comments(type(cfg))
        for f in dataclasses.fields(cfg):
            v = getattr(cfg, f.name)
            if dataclasses.is_dataclass(v):
                walk(v, prefix + f.name + ".")
            else:
                rows.append((f"  --{prefix}{f.name.replace('_', '-')} {v!r}", notes.get(f.name, "")))
    walk(mod.Config())
    width = min(48, max(len(a) for a, _ in rows) + 2)
    lines += [f"{a:<{width}}{b}".rstrip() if len(a) < width else f"{a}  {b}".rstrip() for a, b in rows]
    return "\n".join(lines)


def run_stage(stage: str, argv: list[str]):
    from tinyseek.config import apply_overrides

    if stage not in STAGES:
        raise UserError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    mod = importlib.import_module(STAGES[stage])
    if "-h" in argv or "--help" in argv:
        print(stage_help(stage, mod))
        return None
    preset = None
    rest = []
    i = 0
    while i < len(argv):
        if argv[i] == "--preset":
            if i + 1 >= len(argv):
                raise UserError("--preset needs a name")
            preset, i = argv[i + 1], i + 2
        elif argv[i].startswith("--preset="):
            preset, i = argv[i].split("=", 1)[1], i + 1
        else:
            rest.append(argv[i])
            i += 1
    cfg = mod.preset(preset) if preset else mod.Config()
    positional = getattr(mod, "POSITIONAL", None)  # e.g. `tinyseek import SRC`: a leading bare argument
    if positional and rest and not rest[0].startswith("--"):
        setattr(cfg, positional, rest.pop(0))
    apply_overrides(cfg, rest)
    cfg.validate()
    if stage in TRAINING_STAGES:
        from tinyseek import malloc
        malloc.tune()
    return mod.main(cfg)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    try:
        run_stage(argv[0], argv[1:])
    except UserError as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"tinyseek: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tinyseek: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
