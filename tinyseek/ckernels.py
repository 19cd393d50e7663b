"""Build and load small C kernels on first use (shared by the quantized and the fp32 decode kernels).

A kernel source is plain C (no PyTorch headers; tensors travel as data pointers). It is compiled
once with the system C compiler (``cc -O3 -march=native -ffast-math -fopenmp -shared``, plainer
flag sets where those fail) into a per-machine cache (``$TINYSEEK_KERNEL_CACHE`` or
``~/.cache/tinyseek/kernels``), keyed by source, compiler, flags and CPU flags, and written to a
temp name then renamed (concurrent first uses are safe). Built as a small CPython extension where
``Python.h`` exists (the source's ``#ifdef TS_PYEXT`` part: a call costs ~0.2 us), else loaded
through ``ctypes`` (~1.7 us a call). ``TS_PORTABLE`` is defined for portable builds (no AVX-512
paths; for tests). Without a compiler :class:`Kernels` prints one line and reports "not
available", and callers take their PyTorch path.
"""
from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sysconfig
import tempfile
import threading
from pathlib import Path

# C for a source's ``#ifdef TS_PYEXT`` part: Python.h and ``ts_int_args`` (the METH_FASTCALL
# arguments as integers). Concatenate it in front of the wrappers.
PYEXT_PRELUDE = r"""
#ifdef TS_PYEXT
#define PY_SSIZE_T_CLEAN
#include <Python.h>
/* v[0..want) = the call's integer arguments: 0, or -1 with a Python exception set */
static int ts_int_args(PyObject* const* args, Py_ssize_t nargs, Py_ssize_t want, long long* v) {
  if (nargs != want) {
    PyErr_Format(PyExc_TypeError, "expected %zd integer arguments, got %zd", want, nargs);
    return -1;
  }
  for (Py_ssize_t i = 0; i < want; ++i) {
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return -1;
  }
  return 0;
}
#endif
"""

FLAG_SETS = (["-O3", "-march=native", "-ffast-math", "-fopenmp"], ["-O3", "-ffast-math", "-fopenmp"],
             ["-O3", "-ffast-math"])
P, I64, INT, F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float


def cache_dir() -> Path:
    d = os.environ.get("TINYSEEK_KERNEL_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "tinyseek",
                                                                 "kernels")
    try:
        Path(d).mkdir(parents=True, exist_ok=True)
        if os.access(d, os.W_OK):
            return Path(d)
    except OSError:
        pass
    return Path(tempfile.gettempdir())


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _python_include() -> str | None:
    inc = sysconfig.get_paths().get("include")
    return inc if inc and os.path.isfile(os.path.join(inc, "Python.h")) else None


def build(name: str, src: str, kind: str = "pyext", cache: Path | None = None, portable: bool = False) -> Path:
    """Compile ``src`` (or reuse the cached build); returns the shared library's path. ``kind``:
    "pyext" (a CPython extension named ``name``; needs Python.h) or "ctypes" (plain C)."""
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        raise RuntimeError("no C compiler (cc/gcc/clang) on PATH")
    extra = []
    if kind == "pyext":
        inc = _python_include()
        if inc is None:
            raise RuntimeError("no Python.h for the extension build")
        extra = ["-DTS_PYEXT", f"-I{inc}"]
    if portable:
        extra.append("-DTS_PORTABLE")
    cache = cache or cache_dir()
    key = hashlib.sha1("\0".join([src, cc, kind, *extra, platform.machine(), _cpu_flags(), repr(FLAG_SETS)]).encode())
    stem = f"{name}_{kind}_{key.hexdigest()[:16]}"
    lib = cache / f"{stem}.so"
    if lib.is_file():
        return lib
    c_file = cache / f"{stem}.c"
    tmp = cache / f".{stem}.{os.getpid()}.{threading.get_ident()}.so"
    c_file.write_text(src)
    err = ""
    for flags in FLAG_SETS:  # -march=native or OpenMP may be missing: try plainer flag sets
        r = subprocess.run([cc, *flags, *extra, "-shared", "-fPIC", str(c_file), "-o", str(tmp), "-lm"],
                           capture_output=True, text=True)
        if r.returncode == 0:
            os.replace(tmp, lib)  # atomic: concurrent builders each rename a complete file
            return lib
        err = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"exit {r.returncode}"
    tmp.unlink(missing_ok=True)
    raise RuntimeError(f"compiling the {name} kernels failed: {err}")


def load(name: str, src: str, signatures: dict, kind: str = "pyext", portable: bool = False):
    """Build (if needed) and load; returns an object whose functions take integers (pointers as
    ints, 0 = NULL). ``signatures``: ``{function: (argtypes, restype)}`` for the ctypes form."""
    path = build(name, src, kind, portable=portable)
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
