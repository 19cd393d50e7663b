"""``tinyseek <stage> [--preset NAME] [--key value ...]``.

Each stage module exposes ``Config`` (a dataclass with ``validate()``), ``preset(name) -> Config``
and ``main(cfg) -> dict``. Options are the config's fields in kebab-case (``--n-layers 4``) or
dotted for nested configs (``--model.top-k 2``). Bad input exits with status 2 and one line:
``tinyseek: error: <what is wrong>``.

Every failure ends in one line on stderr: a :class:`UserError` as is; a failed file operation
(``OSError``: a full disk, a read-only or missing folder, a path through a file) as what failed,
which file and what to do, also with status 2; anything else as ``internal error: <type>: <message>``
with status 1. ``--debug`` anywhere on the command line (or ``TINYSEEK_DEBUG=1``) prints the
traceback before that line. Output cut short by the reader (``tinyseek --help | head -1``) ends the
command quietly with status 141 (128 + SIGPIPE, what shells report for a process killed by it).
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import inspect
import os
import re
import select
import shutil
import sys
import traceback
from pathlib import Path

from tinyseek import malloc
from tinyseek.config import apply_overrides
from tinyseek.errors import UserError

# stage name -> module (one line each; a module provides Config, preset(), main())
STAGES: dict[str, str] = {
    "data": "tinyseek.data.pipeline",
    "tokenizer": "tinyseek.tokenizer",
    "pretrain": "tinyseek.train.pretrain",
    "sft": "tinyseek.post.sft",
    "grpo": "tinyseek.post.grpo",
    "dpo": "tinyseek.post.dpo",
    "rm": "tinyseek.post.reward_model",
    "ppo": "tinyseek.post.ppo",
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
TRAINING_STAGES = {"pretrain", "sft", "grpo", "dpo", "rm", "ppo", "rejection", "distill", "run"}


def usage() -> str:
    return ("usage: tinyseek <stage> [--preset NAME] [--option value ...]\n"
            "stages: " + ", ".join(STAGES) + "\n"
            "`tinyseek <stage> --help` lists that stage's options.")


def field_comments(cls) -> dict[str, str]:
    """``{field: comment}`` from the ``name: type = default  # comment`` lines of a dataclass."""
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


def run_stage(stage: str, argv: list[str], ctx: dict | None = None):
    """Parse ``argv`` into ``stage``'s config and run it (``--help``: print its options instead).
    ``ctx["cfg"]`` receives the parsed config (error messages name its output folder)."""
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
    if ctx is not None:
        ctx["cfg"] = cfg
    cfg.validate()
    if stage in TRAINING_STAGES:
        malloc.tune()
    return mod.main(cfg)


DEBUG_ENV = "TINYSEEK_DEBUG"  # set to 1 for tracebacks (as --debug does)
# config fields naming where a stage writes, in order of preference: (field, option)
_OUT_FIELDS = (("out", "--out"), ("run_dir", "--run-dir"), ("out_dir", "--out-dir"), ("runs_dir", "--runs-dir"))


def output_option(cfg) -> tuple[str, str]:
    """``(option, value)`` of the setting that says where ``cfg``'s stage writes (``("", "")`` if none)."""
    fields = getattr(cfg, "__dataclass_fields__", {})
    for name, opt in _OUT_FIELDS:
        if name in fields and getattr(cfg, name, ""):
            return opt, str(getattr(cfg, name))
    if isinstance(getattr(type(cfg), "out_dir", None), property) and "run_dir" in fields:  # runs/<name>
        return "--run-dir", str(cfg.out_dir)
    return "", ""


# the temp names of tinyseek.common's atomic writes (``.tmp-<name>-XXXXXXXX`` folders, ``.<name>.XXXXXXXX.tmp``
# files): an error names the file the user asked for instead
_TEMP_NAMES = (re.compile(r"^\.tmp-(.+)-[a-z0-9_]{8}$"), re.compile(r"^\.(.+)\.[a-z0-9_]{8}\.tmp$"))


def final_name(path: str) -> str:
    """``path`` with a temp name of an atomic write replaced by the final name.

    >>> final_name("/r/.tmp-export-ab_cd123"), final_name("/r/.eval.json.x1y2z3w4.tmp"), final_name("/r/a.tmp")
    ('/r/export', '/r/eval.json', '/r/a.tmp')
    """
    p = Path(path)
    for pat in _TEMP_NAMES:
        m = pat.match(p.name)
        if m:
            return str(p.with_name(m.group(1)))
    return path


def _where(e: BaseException, cfg) -> str:
    """The file an error is about: the exception's own file name(s), else the stage's output setting."""
    if isinstance(e, OSError) and e.filename is not None:
        names = [final_name(os.fsdecode(e.filename))]
        names += [final_name(os.fsdecode(e.filename2))] if e.filename2 is not None else []
        return " -> ".join(names)
    return f"under {output_option(cfg)[1]}" if output_option(cfg)[1] else "(file not named)"


def _errno_of(e: BaseException) -> int | None:
    """The errno of ``e`` or of an ``OSError`` it was raised from; else one its message names
    (safetensors' Rust errors say "No space left on device (os error 28)")."""
    seen = set()
    x: BaseException | None = e
    while x is not None and id(x) not in seen:
        seen.add(id(x))
        if isinstance(x, OSError) and x.errno:
            return x.errno
        x = x.__cause__ or x.__context__
    text = str(e)
    for code in (errno.ENOSPC, errno.EROFS, errno.EACCES):
        if os.strerror(code) in text or f"os error {code})" in text:
            return code
    return None


def _disk_full(cfg) -> bool:
    """Whether the disk under the stage's output folder has (almost) no space left."""
    p = Path(output_option(cfg)[1] or ".").absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    try:
        return shutil.disk_usage(p).free < 1 << 20
    except OSError:
        return False


def error_line(e: BaseException, cfg=None) -> tuple[str, int]:
    """``(one-line message, exit status)`` for an exception that ended a command: what failed,
    which file, what to do. Status 2 for bad input and failed file operations, 1 for internal errors."""
    if isinstance(e, UserError):
        return (str(e).splitlines()[0] if str(e).strip() else type(e).__name__), 2
    code = _errno_of(e)
    if code is None and not isinstance(e, OSError) and "write" in str(e).lower() and _disk_full(cfg):
        code = errno.ENOSPC  # torch's writer says only "file write failed"
    opt = output_option(cfg)[0] or "output path"
    where = _where(e, cfg)
    msgs = {
        errno.ENOSPC: f"no space left on device writing {where}: free some space or choose another {opt}",
        errno.EDQUOT: f"disk quota exceeded writing {where}: free some space or choose another {opt}",
        errno.EROFS: f"cannot write {where}: read-only file system; choose another {opt}",
        errno.EACCES: f"cannot write or read {where}: permission denied (read-only or not yours); "
                      f"fix its permissions or choose another {opt}",
        errno.EPERM: f"cannot write {where}: operation not permitted; fix its permissions or choose another {opt}",
        errno.ENOTDIR: f"cannot use {where}: part of that path is a file, not a folder; choose another {opt}",
        errno.EEXIST: f"cannot create {where}: something else already exists there; remove it or choose another {opt}",
        errno.EISDIR: f"cannot use {where}: it is a folder where a file was expected",
        errno.ENOENT: f"{where} does not exist: check the path",
        errno.ENAMETOOLONG: f"file name too long: {where}; choose a shorter path",
        errno.EMFILE: f"too many open files (at {where}): raise the limit (ulimit -n)",
        errno.EIO: f"input/output error on {where}: the disk or file system failed; check it",
        errno.EPIPE: f"broken pipe writing {where}: the reader went away",
    }
    if code in msgs:
        return msgs[code], 2
    if isinstance(e, OSError):
        return f"cannot access {where}: {e.strerror or e}", 2
    first = str(e).strip().splitlines()[0][:300] if str(e).strip() else ""
    return (f"internal error: {type(e).__name__}" + (f": {first}" if first else "")
            + " (rerun with --debug for the traceback; please report it)"), 1


def _stdout_closed() -> bool:
    """Whether stdout is a pipe whose reader has gone (poll reports an error on it)."""
    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(ev & select.POLLERR for _, ev in poller.poll(0))
    except (AttributeError, OSError, ValueError):  # not a real file (captured), or closed
        return False


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's final flush cannot fail again (Python's
    documented way to handle SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (AttributeError, OSError, ValueError):
        pass


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "").strip() not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    ctx: dict = {}
    try:
        if not argv or argv[0] in ("-h", "--help", "help"):
            print(usage())
        else:
            run_stage(argv[0], argv[1:], ctx)
        sys.stdout.flush()  # a reader that went away shows here, inside the handlers below
    except KeyboardInterrupt:
        print("tinyseek: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError as e:
        if _stdout_closed():
            _silence_stdout()
            return 141
        return _fail(e, ctx.get("cfg"), debug)
    except Exception as e:
        return _fail(e, ctx.get("cfg"), debug)
    return 0


def _fail(e: BaseException, cfg, debug: bool) -> int:
    msg, status = error_line(e, cfg)
    try:
        if debug:
            traceback.print_exception(e, file=sys.stderr)
        print(f"tinyseek: error: {msg}", file=sys.stderr)
    except OSError:  # stderr gone too: the status still says it
        pass
    return status


if __name__ == "__main__":
    sys.exit(main())
