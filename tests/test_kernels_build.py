"""Every C source in tinyseek/kernels/ compiles without a single warning (``-Wall -Werror``).

Each ``*.c`` there (whatever files exist: the test lists the directory) is compiled as the loader
builds it, with the system compiler (:func:`loader._compiler`), the loader's first usable flag set
(``-O3 -march=native -ffast-math -fopenmp``: the optimiser's warnings, such as maybe-uninitialized,
show only when optimising) and its extra flags, in two variants that between them take every
``#ifdef`` branch: the CPython extension with the native code paths (``-DTS_PYEXT`` and the Python
headers, AVX-512 where this CPU has it) and the portable plain-C build (``-DTS_PORTABLE``, what the
ctypes fallback without AVX-512 compiles). ``#include "x.h"`` resolves in tinyseek/kernels/, as
:func:`loader.source` inlines it.
"""
from __future__ import annotations

import functools
import os
import re
import subprocess

import pytest

from tinyseek.kernels import loader

SOURCES = sorted(p.name for p in loader.KERNEL_DIR.glob("*.c"))


@functools.lru_cache(maxsize=1)
def _flags() -> list[str]:
    """The loader's first flag set that this compiler takes (as :func:`loader.build` tries them)."""
    cc = loader._compiler()
    for flags in loader.FLAG_SETS:
        r = subprocess.run([cc, *flags, "-x", "c", "-c", "-", "-o", os.devnull], input="int ts_probe;\n",
                           capture_output=True, text=True)
        if r.returncode == 0:
            return list(flags)
    pytest.fail(f"{cc} takes none of the loader's flag sets {loader.FLAG_SETS}")


def _compiler() -> str:
    try:
        return loader._compiler()
    except RuntimeError:
        pytest.skip("no C compiler")


def test_the_kernel_sources_are_files_not_python_strings():
    """The C sources ship as files here, and no Python module of the package holds C (a line
    ``#include <...>`` inside a string)."""
    assert {"attn.c", "linear.c"} <= set(SOURCES), SOURCES
    c_in_py = [str(p.relative_to(loader.KERNEL_DIR.parent)) for p in loader.KERNEL_DIR.parent.rglob("*.py")
               if re.search(r"^[ \t]*#[ \t]*include[ \t]*<", p.read_text(encoding="utf-8"), re.M)]
    assert not c_in_py, c_in_py


@pytest.mark.parametrize("name", SOURCES)
@pytest.mark.parametrize("kind,portable", [("pyext", False), ("ctypes", True)])
def test_kernel_source_compiles_without_warnings(name, kind, portable):
    cc = _compiler()
    try:
        extra = loader.extra_flags(kind, portable)
    except RuntimeError:  # no Python.h: the extension variant is not built on this machine
        pytest.skip("no Python.h for the extension variant")
    cmd = [cc, *_flags(), "-Wall", "-Werror", *extra, f"-I{loader.KERNEL_DIR}", "-c",
           str(loader.KERNEL_DIR / name), "-o", os.devnull]
    r = subprocess.run(cmd, capture_output=True, text=True)
    assert r.returncode == 0 and not r.stderr.strip(), f"{' '.join(cmd)}\n{r.stderr}"
