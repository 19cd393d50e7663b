"""Files written whole or not at all: atomic files and folders, leftovers of killed writers removed,
files moved aside instead of overwritten. No torch: the data stage and its workers import only this."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator


def move_aside(path: str | Path) -> Path | None:
    """Rename ``path`` (e.g. ``metrics.jsonl`` before a fresh start) to ``<stem>.<UTC time>.<suffix>``
    beside it, never overwriting; returns the new path, or None when ``path`` does not exist.
    Nothing is deleted."""
    path = Path(path)
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for i in range(1000):
        dst = path.with_name(f"{path.stem}.{stamp}{'' if i == 0 else f'-{i}'}{path.suffix}")
        if not dst.exists():
            os.replace(path, dst)
            return dst
    raise FileExistsError(f"no free name to move {path} aside")


@contextlib.contextmanager
def atomic_file(path: str | Path, mode: str = "w", fsync: bool = True) -> Iterator[IO]:
    """A file object for ``path`` written via a private temp file in the same folder, renamed to
    ``path`` when the block ends normally (after an ``fsync`` unless ``fsync=False``); removed
    otherwise, so ``path`` is either whole or as it was. ``mode``: ``"w"`` or ``"wb"``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(e, OSError) and e.filename is None:
            e.filename = str(path)  # a full disk's error names no file: name the one being written
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file in the same folder and ``os.replace``."""
    with atomic_file(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_temps(final: str | Path) -> list[Path]:
    """Delete ``.tmp-<name>-<pid>-*`` / ``.old-<name>-<pid>`` leftovers of :func:`atomic_dir` for
    ``final`` whose writing process (on this machine) no longer runs; returns what was removed."""
    final = Path(final)
    gone = []
    if not final.parent.is_dir():
        return gone
    pat = re.compile(rf"^\.(?:tmp-{re.escape(final.name)}-(\d+)-[a-z0-9_]{{8}}|old-{re.escape(final.name)}-(\d+))$")
    for p in final.parent.iterdir():
        m = pat.match(p.name)
        pid = int(m.group(1) or m.group(2)) if m else 0
        if m and p.is_dir() and not p.is_symlink() and pid != os.getpid() and not _pid_alive(pid):
            shutil.rmtree(p, ignore_errors=True)
            gone.append(p)
    return gone


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp directory beside ``final``; on success it is renamed to ``final``.

    A crash inside the block leaves only a ``.tmp-<name>-<pid>-*`` directory, which readers ignore
    and which the next ``atomic_dir`` for the same ``final`` removes once process ``pid`` is gone
    (:func:`remove_stale_temps`). An existing ``final`` is replaced (moved aside first, then removed).
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(final)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-{os.getpid()}-"))
    try:
        yield tmp
        for p in tmp.rglob("*"):
            if p.is_file():
                with open(p, "rb") as f:
                    os.fsync(f.fileno())
        if final.exists():
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):  # name the file as it would have been (not the removed temp), or the folder
            name = Path(os.fsdecode(e.filename)) if e.filename is not None else None
            e.filename = str(final / name.relative_to(tmp) if name and name.is_relative_to(tmp) else name or final)
        raise
