"""Build and load small C kernels on first use (shared by the quantized and the fp32 decode kernels).

A kernel source is plain C (no PyTorch headers; tensors travel as data pointers), a file
``tinyseek/kernels/<op>.c`` read with :func:`source` (which inlines the local headers such as
``pyext.h``; every source compiles with ``-Wall -Werror``: tests/test_kernels_build.py). It is compiled
once with the system C compiler (``cc -O3 -march=native -ffast-math -fopenmp -shared``, plainer
flag sets where those fail) into a per-user cache, and loaded from there by later processes. Built as
a small CPython extension where ``Python.h`` exists (the source's ``#ifdef TS_PYEXT`` part: a call
costs ~0.2 us), else loaded through ``ctypes`` (~1.7 us a call). ``TS_PORTABLE`` is defined for
portable builds (no AVX-512 paths; for tests). Without a compiler :class:`Kernels` prints one line
and reports "not available", and callers take their PyTorch path.

The cache runs code, so it is private (:func:`cache_dir`, :func:`trusted_file`):

- the directory is ``$TINYSEEK_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/tinyseek/kernels``, else
  ``~/.cache/tinyseek/kernels``, created 0700; it is used only if it is owned by this user and not
  writable by group or others (one of ours that others may read is chmod-ed to 0700), and
  every directory above it is owned by this user or root and not writable by others (unless sticky,
  like ``/tmp``). Otherwise (``$HOME`` not writable, a shared or foreign directory) this process
  builds into a fresh ``tempfile.mkdtemp`` directory (0700, removed at exit), never into a shared
  directory under a predictable name;
- a library's file name carries a hash of the source, the compiler (path and ``--version``), the
  flag sets, the Python headers and the CPU flags; a cached library is loaded only if it is a
  regular file (not a link) owned by this user and not writable by group or others, else it is
  ignored and rebuilt over;
- a build writes a fresh temporary file (``mkstemp``) and renames it into place (atomic: concurrent
  first uses are safe, and no half-written library is ever loaded).
"""
from __future__ import annotations

import atexit
import ctypes
import functools
import hashlib
import importlib.util
import os
import platform
import re
import shutil
import stat
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

FLAG_SETS = (["-O3", "-march=native", "-ffast-math", "-fopenmp"], ["-O3", "-ffast-math", "-fopenmp"],
             ["-O3", "-ffast-math"])
P, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


_PRIVATE: dict = {}              # this process's fallback cache directory (made once)
_PRIVATE_LOCK = threading.Lock()

KERNEL_DIR = Path(__file__).resolve().parent  # the C sources (``*.c``, ``*.h``) ship here as package data


_LOCAL_INCLUDE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([A-Za-z0-9_.-]+\.h)"[ \t]*$', re.M)


def source(name: str) -> str:
    """The text of the C source ``tinyseek/kernels/<name>`` (e.g. ``"moe_infer.c"``), each line
    ``#include "x.h"`` naming a header shipped here replaced by that header's text (recursively), so
    the built source is self-contained and its cache key covers the headers; the compiler sees the
    same text as ``cc -I tinyseek/kernels`` on the file. A missing file is a
    :class:`FileNotFoundError` naming it (a broken install, not user input)."""
    text = (KERNEL_DIR / name).read_text(encoding="utf-8")
    return _LOCAL_INCLUDE.sub(lambda m: source(m.group(1)).rstrip("\n"), text)


def _default_dir() -> str:
    if os.environ.get("TINYSEEK_KERNEL_CACHE"):
        return os.environ["TINYSEEK_KERNEL_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "tinyseek", "kernels")


def _safe_ancestors(d: Path) -> bool:
    """Every directory above ``d`` is owned by this user or root and not writable by group or
    others, unless it is sticky (``/tmp``: others cannot rename or remove what is ours)."""
    euid = os.geteuid()
    for parent in d.parents:
        try:
            st = os.stat(parent)
        except OSError:
            return False
        if st.st_uid not in (0, euid) or (st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX):
            return False
    return True


def private_dir(d: str | Path) -> Path | None:
    """``d`` (made 0700 if missing) when it is a safe private cache: a real directory owned by this
    user, not writable by group or others, safe ancestors; else None. A directory of ours that
    others may only read (0755, an older cache) is tightened to 0700."""
    d = Path(os.path.realpath(d))  # the checks below apply to where the files really are
    try:
        missing = [p for p in (d, *d.parents) if not os.path.lexists(p)]
        for p in reversed(missing):  # every directory we create is 0700 (whatever the umask)
            p.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(d)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid():
            return None
        if st.st_mode & 0o022:          # others could have written into it: not ours alone
            return None
        if stat.S_IMODE(st.st_mode) & 0o077:  # ours but readable by others (an older cache): tighten
            os.chmod(d, 0o700)
            if stat.S_IMODE(os.lstat(d).st_mode) & 0o077:
                return None
        if not os.access(d, os.W_OK | os.X_OK) or not _safe_ancestors(d):
            return None
    except OSError:
        return None
    return d


def _process_private_dir() -> Path:
    with _PRIVATE_LOCK:
        if "dir" not in _PRIVATE:
            d = tempfile.mkdtemp(prefix="tinyseek-kernels-")  # 0700, unpredictable name
            atexit.register(shutil.rmtree, d, True)
            _PRIVATE["dir"] = Path(d)
        return _PRIVATE["dir"]


def cache_dir(requested: str | Path | None = None) -> Path:
    """The kernel cache for this process: ``requested`` (else the default, see the module docstring)
    when :func:`private_dir` accepts it, else a fresh private directory for this process only."""
    d = private_dir(requested if requested is not None else _default_dir())
    return d if d is not None else _process_private_dir()


def trusted_file(path: Path) -> bool:
    """``path`` is a regular file (not a symlink) owned by this user, not writable by group/others."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o022


@functools.lru_cache(maxsize=8)
def _compiler_id(cc: str) -> str:
    """The compiler's resolved path and the first line of ``cc --version`` (part of the cache key)."""
    path = shutil.which(cc) or cc
    try:
        r = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
        version = (r.stdout.strip().splitlines() or [""])[0]
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return f"{os.path.realpath(path)}\0{version}"


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _python_include() -> str | None:
    inc = sysconfig.get_paths().get("include")
    return inc if inc and os.path.isfile(os.path.join(inc, "Python.h")) else None


def _compiler() -> str:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
    return cc


def extra_flags(kind: str, portable: bool) -> list[str]:
    """The flags a ``kind`` build adds to a flag set: ``-DTS_PYEXT`` and the Python headers for
    "pyext" (a :class:`RuntimeError` without ``Python.h``), ``-DTS_PORTABLE`` for portable builds."""
    extra = []
    if kind == "pyext":
        inc = _python_include()
        if inc is None:
            raise RuntimeError("no Python.h for the extension build")
        extra = ["-DTS_PYEXT", f"-I{inc}"]
    if portable:
        extra.append("-DTS_PORTABLE")
    return extra


def lib_name(name: str, src: str, kind: str, cc: str, extra: list[str]) -> str:
    """The cached library's file name: ``name``, ``kind`` and a hash of the source, the compiler
    (path and version), the flag sets and extra flags, the machine and its CPU flags."""
    key = hashlib.sha256("\0".join([src, _compiler_id(cc), kind, *extra, platform.machine(), _cpu_flags(),
                                     repr(FLAG_SETS)]).encode())
    return f"{name}_{kind}_{key.hexdigest()[:24]}.so"


def build(name: str, src: str, kind: str = "pyext", cache: Path | None = None, portable: bool = False) -> Path:
    """Compile ``src`` (or reuse the cached build); returns the shared library's path. ``kind``:
    "pyext" (a CPython extension named ``name``; needs Python.h) or "ctypes" (plain C). ``cache``
    is checked like the default (:func:`cache_dir`); a cached file that fails :func:`trusted_file`
    is ignored and rebuilt over. The returned file passed :func:`trusted_file`."""
    cc = _compiler()
    extra = extra_flags(kind, portable)
    cache = cache_dir(cache)
    lib = cache / lib_name(name, src, kind, cc, extra)
    if trusted_file(lib):
        return lib
    stem = lib.name[:-len(".so")]
    fd, c_tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".c", dir=cache)
    with os.fdopen(fd, "w") as f:
        f.write(src)
    fd, tmp = tempfile.mkstemp(prefix=f".{stem}.", suffix=".so", dir=cache)
    os.close(fd)
    err = ""
    try:
        for flags in FLAG_SETS:  # -march=native or OpenMP may be missing: try plainer flag sets
            r = subprocess.run([cc, *flags, *extra, "-shared", "-fPIC", c_tmp, "-o", tmp, "-lm"],
                               capture_output=True, text=True)
            if r.returncode == 0:
                os.chmod(tmp, 0o700)        # whatever the umask: private, as trusted_file requires
                os.replace(tmp, lib)        # atomic: concurrent builders each rename a complete file
                os.replace(c_tmp, cache / f"{stem}.c")  # the source next to its library, for reading
                if not trusted_file(lib):   # pragma: no cover - only if the directory was tampered with
                    raise RuntimeError(f"the {name} kernel library {lib} is not private after the build")
                return lib
            err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    finally:
        for leftover in (tmp, c_tmp):
            if os.path.exists(leftover):
                os.unlink(leftover)
    raise RuntimeError(f"compiling the {name} kernels failed: {err}")


def load(name: str, src: str, signatures: dict, kind: str = "pyext", portable: bool = False,
         cache: Path | None = None):
    """Build (if needed) and load; returns an object whose functions take integers (pointers as
    ints, 0 = NULL). ``signatures``: ``{function: (argtypes, restype)}`` for the ctypes form.
    Only a library that :func:`build` checked (or built) is loaded."""
    path = build(name, src, kind, cache, portable)
    if kind == "pyext":
        spec = importlib.util.spec_from_file_location(name, path)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    lib = ctypes.CDLL(str(path))
    for fn, (argtypes, restype) in signatures.items():
        getattr(lib, fn).argtypes = argtypes
        getattr(lib, fn).restype = restype
    return lib


def lazy_lib(state: dict, lock: threading.Lock, loader, label: str):
    """``state["lib"]``, loading it with ``loader(kind)`` on first use (the extension, else ctypes);
    on failure prints one line, marks ``state["failed"]`` and returns None (callers fall back)."""
    if state["lib"] is not None or state["failed"]:
        return state["lib"]
    with lock:
        if state["lib"] is None and not state["failed"]:
            errors = []
            for kind in ("pyext", "ctypes"):  # the extension calls faster; plain C needs no Python.h
                try:
                    state["lib"] = loader(kind)
                    break
                except Exception as e:
                    errors.append(str(e).splitlines()[0][:200] if str(e) else type(e).__name__)
            else:  # no compiler / failed build: the caller's PyTorch path is used
                state["failed"] = True
                print(f"{label}: not available, using the PyTorch path ({errors[-1]})")
    return state["lib"]


REGISTRY: list["Kernels"] = []  # every Kernels made (the fp32 model and the quant kernels register on import)


def enable_all(flag: bool) -> list[bool]:
    """Switch every registered :class:`Kernels` on or off (A/B runs); returns their previous
    switches for :func:`restore`."""
    before = [k.state["enabled"] for k in REGISTRY]
    for k in REGISTRY:
        k.state["enabled"] = flag
    return before


def restore(before: list[bool]) -> None:
    for k, flag in zip(REGISTRY, before):
        k.state["enabled"] = flag


class Kernels:
    """One kernel library, built and loaded lazily on first use (thread-safe), with an on/off switch
    (``env_var=0`` turns it off). ``state`` is a plain dict (``enabled``, ``lib``, ``failed``) that
    tests may patch."""

    def __init__(self, name: str, src: str, signatures: dict, env_var: str, label: str):
        self.name, self.src, self.signatures, self.label = name, src, signatures, label
        self.state = {"enabled": os.environ.get(env_var, "1") != "0", "lib": None, "failed": False}
        self._lock = threading.Lock()
        REGISTRY.append(self)

    def load(self, kind: str = "pyext", portable: bool = False):
        return load(self.name, self.src, self.signatures, kind, portable)

    def lib(self):
        return lazy_lib(self.state, self._lock, self.load, self.label)

    def ready(self):
        """The loaded kernels when enabled (building them on first use), else None."""
        return self.lib() if self.state["enabled"] else None

    def enable(self, flag: bool = True) -> bool:
        """Turn the kernels on or off; returns whether they are usable (building them if needed)."""
        self.state["enabled"] = flag
        return not flag or self.lib() is not None
