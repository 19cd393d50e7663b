"""The C-kernel cache is private: planted or shared files are never loaded (tinyseek.kernels.loader).

The marker for "was it loaded?": a planted file is not even a library, so ``dlopen`` of it would
raise; each test asserts that the loader rebuilt a working library over it instead.
"""
from __future__ import annotations

import ctypes
import os
import shutil
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

from tinyseek.kernels import loader as ckernels

SRC = "int ts_probe_add(int a, int b) { return a + b + 1000; }\n"
SIGS = {"ts_probe_add": ([ctypes.c_int, ctypes.c_int], ctypes.c_int)}
NAME = "_tinyseek_cache_probe"
NOBODY = 65534
needs_cc = pytest.mark.skipif(not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
                              reason="no C compiler")


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A clean environment: no cache variables, a fresh per-process fallback directory."""
    for var in ("TINYSEEK_KERNEL_CACHE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(ckernels, "_PRIVATE", {})
    yield tmp_path
    if "dir" in ckernels._PRIVATE:
        shutil.rmtree(ckernels._PRIVATE["dir"], ignore_errors=True)


def lib_path(cache: Path) -> Path:
    return cache / ckernels.lib_name(NAME, SRC, "ctypes", ckernels._compiler(), ckernels.extra_flags("ctypes", False))


def plant(path: Path, mode: int = 0o644) -> None:
    path.write_bytes(b"planted: not a shared library\n")
    os.chmod(path, mode)


def loads_real_library(cache: Path) -> Path:
    """Load through the cache; assert the function runs and the file is now a private ELF library."""
    lib = ckernels.load(NAME, SRC, SIGS, "ctypes", cache=cache)
    assert lib.ts_probe_add(2, 3) == 1005
    path = lib_path(cache)
    st = os.lstat(path)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077
    assert path.read_bytes()[:4] == b"\x7fELF"
    return path


def private(d: Path) -> bool:
    st = os.lstat(d)
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


@needs_cc
def test_planted_writable_library_is_rebuilt_not_loaded(env):
    cache = ckernels.private_dir(env / "cache")
    plant(lib_path(cache), 0o666)                    # right owner, but others could have written it
    loads_real_library(cache)


@needs_cc
@pytest.mark.parametrize("how", ["chown", "stat"])
def test_planted_foreign_library_is_rebuilt_not_loaded(env, monkeypatch, how):
    """A library owned by another user is ignored: really chown-ed where we are root, and (as any
    user) with ``os.lstat`` reporting another owner for the planted file only."""
    cache = ckernels.private_dir(env / "cache")
    path = lib_path(cache)
    plant(path)
    if how == "chown":
        if os.geteuid() != 0:
            pytest.skip("chown to another user needs root")
        os.chown(path, NOBODY, NOBODY)
    else:
        planted, real_lstat = os.lstat(path).st_ino, os.lstat

        def lstat(p, *a, **k):
            st = real_lstat(p, *a, **k)
            if st.st_ino != planted:
                return st
            fields = list(st)
            fields[stat.ST_UID] = os.geteuid() + 1
            return os.stat_result(fields)
        monkeypatch.setattr(os, "lstat", lstat)
        assert not ckernels.trusted_file(path)
    loads_real_library(cache)


@needs_cc
def test_symlinked_library_is_not_followed(env):
    cache = ckernels.private_dir(env / "cache")
    target = env / "elsewhere.so"
    plant(target)
    lib_path(cache).symlink_to(target)
    path = loads_real_library(cache)
    assert not path.is_symlink() and target.read_bytes().startswith(b"planted")


@needs_cc
def test_cached_library_is_reused_and_private_under_any_umask(env):
    cache = ckernels.private_dir(env / "cache")
    old = os.umask(0)
    try:
        first = ckernels.build(NAME, SRC, "ctypes", cache)
    finally:
        os.umask(old)
    assert not os.lstat(first).st_mode & 0o077
    ino = os.lstat(first).st_ino
    assert ckernels.build(NAME, SRC, "ctypes", cache) == first and os.lstat(first).st_ino == ino  # not rebuilt
    assert not [p for p in cache.iterdir() if p.name.startswith(".")]        # no temp files left


def test_shared_cache_directories_are_refused(env, monkeypatch):
    """Group/other-writable, foreign-owned, under a writable non-sticky parent, or a file: refused,
    and the cache is a fresh private directory of this process (not a predictable temp name)."""
    shared = env / "shared"
    shared.mkdir(mode=0o777)
    os.chmod(shared, 0o777)
    loose = env / "loose"
    loose.mkdir()
    os.chmod(loose, 0o777)
    afile = env / "afile"
    afile.write_text("x")
    refused = [shared, loose / "cache", afile, afile / "cache"]
    if os.geteuid() == 0:
        foreign = env / "foreign"
        foreign.mkdir(mode=0o700)
        os.chown(foreign, NOBODY, NOBODY)
        refused += [foreign, foreign / "cache"]   # root may create inside it, but it is not ours
    for d in refused:
        assert ckernels.private_dir(d) is None, d
        monkeypatch.setenv("TINYSEEK_KERNEL_CACHE", str(d))
        got = ckernels.cache_dir()
        assert got != d and private(got) and got.parent == Path(tempfile.gettempdir()).resolve()
        assert got.name.startswith("tinyseek-kernels-") and len(got.name) > len("tinyseek-kernels-") + 4
    assert len({ckernels.cache_dir(d) for d in refused}) == 1             # one per process


def test_acceptable_cache_directories(env, monkeypatch):
    sticky = env / "sticky"
    sticky.mkdir()
    os.chmod(sticky, 0o1777)                     # like /tmp: others cannot replace what is ours
    old = env / "old"
    old.mkdir()
    os.chmod(old, 0o755)                         # an older cache: tightened to 0700
    for d in (sticky / "a" / "b", old):
        got = ckernels.private_dir(d)
        assert got == d.resolve() and private(got)
    assert stat.S_IMODE(os.lstat(sticky / "a").st_mode) == 0o700    # created directories are 0700
    monkeypatch.setenv("XDG_CACHE_HOME", str(env / "xdg"))
    assert ckernels.cache_dir() == (env / "xdg" / "tinyseek" / "kernels").resolve()


@needs_cc
def test_unwritable_home_falls_back_to_a_private_directory(env, monkeypatch):
    home = env / "home"
    home.write_text("not a directory")           # ~/.cache cannot be made, even by root
    monkeypatch.setenv("HOME", str(home))
    got = ckernels.cache_dir()
    assert private(got) and got != Path(tempfile.gettempdir()) and not str(got).startswith(str(home))
    loads_real_library(got)


def test_cache_key_covers_source_compiler_and_flags(monkeypatch):
    cc = "cc"
    if shutil.which(cc):
        version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout.splitlines()[0]
        assert ckernels._compiler_id(cc) == f"{os.path.realpath(shutil.which(cc))}\0{version}"
    base = ckernels.lib_name(NAME, SRC, "ctypes", cc, [])
    assert ckernels.lib_name(NAME, SRC, "ctypes", cc, []) == base
    assert ckernels.lib_name(NAME, SRC + " ", "ctypes", cc, []) != base
    assert ckernels.lib_name(NAME, SRC, "ctypes", cc, ["-DTS_PORTABLE"]) != base
    assert ckernels.lib_name(NAME, SRC, "pyext", cc, []) != base
    monkeypatch.setattr(ckernels, "_compiler_id", lambda c: "/usr/bin/cc\0gcc (Debian 99.0) 99.0")
    other_cc = ckernels.lib_name(NAME, SRC, "ctypes", cc, [])
    monkeypatch.setattr(ckernels, "FLAG_SETS", (["-O0"],))
    other_flags = ckernels.lib_name(NAME, SRC, "ctypes", cc, [])
    assert len({base, other_cc, other_flags}) == 3
