"""Every failure of a command ends in one line ``tinyseek: error: ...``: what failed, which file,
what to do (status 2); ``--debug`` / ``TINYSEEK_DEBUG=1`` show the traceback; output cut short by
the reader (``tinyseek --help | head -1``) ends quietly; ``eval`` and ``serve`` refuse a checkpoint
without a tokenizer with the same error.

Each stage that writes output is run with its output under (a) a path through a regular file
(ENOTDIR; real on every machine), (b) a read-only folder (chmod 0500 when not root; as root, which
ignores modes, writes under it are refused with EACCES by patched ``os.mkdir`` / ``os.open`` /
``open``), (c) a disk that fills up (ENOSPC from ``os.fsync``, which every atomic write calls).
"""
from __future__ import annotations

import builtins
import errno
import io
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tinyseek.cli import error_line, main
from tinyseek.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    """A tiny run dir: ``ckpt/step_000001`` (micro model) and the byte tokenizer beside it."""
    from tinyseek.model.transformer import Transformer
    from tinyseek.tokenizer import byte_tokenizer
    from tinyseek.train import checkpoint as ck
    from tinyseek.train.pretrain import preset

    run = tmp_path_factory.mktemp("errors") / "run"
    tok = byte_tokenizer()
    mc = preset("micro").model
    mc.vocab_size = tok.vocab_size
    ck.save_checkpoint(run / "ckpt", 1, Transformer(mc), None, {})
    tok.save(run / "tokenizer")
    (run.parent / "corpus.txt").write_text("the cat sat on the mat. " * 200)
    return run


def stage_argv(stage: str, out: Path, ck: Path) -> list[str]:
    """The smallest command line of ``stage`` that writes its output under ``out``."""
    c = str(ck)
    return {
        "data": ["data", "--preset", "sample", "--run-dir", str(out)],
        "tokenizer": ["tokenizer", "--inputs", str(ck.parent / "corpus.txt"), "--vocab-size", "270", "--out", str(out)],
        "pretrain": ["pretrain", "--preset", "micro", "--run-dir", str(out)],
        "sft": ["sft", "--preset", "micro", "--init", c, "--out-dir", str(out)],
        "grpo": ["grpo", "--preset", "micro", "--init", c, "--out-dir", str(out)],
        "dpo": ["dpo", "--init", c, "--out-dir", str(out)],
        "distill": ["distill", "--teacher", c, "--out-dir", str(out)],
        "rejection": ["rejection", "--ckpt", c, "--n-problems", "1", "--k", "1", "--max-new-tokens", "2",
                      "--out", str(out / "r.jsonl")],
        "eval": ["eval", "--ckpt", c, "--n-problems", "1", "--n-samples", "0", "--max-new-tokens", "2",
                 "--out", str(out / "eval.json")],
        "export": ["export", "--ckpt", c, "--out", str(out)],
        "quantize": ["quantize", "--ckpt", c, "--out", str(out)],
        "run": ["run", "--preset", "micro", "--runs-dir", str(out)],
    }[stage]


WRITERS = ["data", "tokenizer", "pretrain", "sft", "grpo", "dpo", "distill", "rejection", "eval", "export",
           "quantize", "run"]


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("tinyseek: error: ") and "Traceback" not in err[0], err
    return err[0]


def _leftovers(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp")]


@pytest.mark.parametrize("stage", WRITERS)
def test_output_path_through_a_file(stage, ckpt, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert main(stage_argv(stage, blocker / "out", ckpt)) == 2
    line = _one_error_line(capsys)
    assert str(blocker) in line and ("not a folder" in line or "already exists" in line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file"]  # nothing else written


@pytest.fixture
def readonly(tmp_path, monkeypatch):
    """A folder nothing can be written under: chmod 0500, or (as root) refused writes."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o500)
        yield ro
        ro.chmod(0o700)
        return

    def refuse(path):
        if Path(os.fsdecode(path)).absolute().is_relative_to(ro):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fsdecode(path))

    real_mkdir, real_os_open, real_open = os.mkdir, os.open, builtins.open
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT

    def mkdir(path, *a, **k):
        refuse(path)
        return real_mkdir(path, *a, **k)

    def os_open(path, flags, *a, **k):
        if flags & write_flags:
            refuse(path)
        return real_os_open(path, flags, *a, **k)

    def open_(file, mode="r", *a, **k):
        if isinstance(file, (str, bytes, os.PathLike)) and any(c in mode for c in "wax+"):
            refuse(file)
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    yield ro


@pytest.mark.parametrize("stage", WRITERS)
def test_read_only_output_folder(stage, ckpt, readonly, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(stage_argv(stage, readonly / "out", ckpt)) == 2
    line = _one_error_line(capsys)
    assert str(readonly) in line and "permission denied" in line, line
    assert not any(readonly.iterdir())


@pytest.mark.parametrize("stage,written", [("eval", "eval.json"), ("export", "config.json"),
                                           ("quantize", "quant_config.json")])
def test_full_disk_names_the_file_and_leaves_nothing_half_written(stage, written, ckpt, tmp_path, capsys,
                                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, "fsync", fsync)
    out = tmp_path / "out"
    assert main(stage_argv(stage, out, ckpt)) == 2
    line = _one_error_line(capsys)
    assert f"no space left on device writing {out}" in line and ".tmp" not in line, line  # the final name
    if stage == "eval":
        assert f"writing {out / written}: " in line, line
    assert not _leftovers(tmp_path), _leftovers(tmp_path)
    assert not (out / written).exists() and not (out / "eval.json").exists()


@pytest.mark.parametrize("exc,needle,status", [
    (OSError(errno.ENOSPC, "No space left on device"), "no space left on device writing under /o/x", 2),
    (Exception("IoError: No space left on device (os error 28)"), "no space left on device", 2),  # safetensors
    (OSError(errno.EROFS, "Read-only file system", "/o/x/f"), "cannot write /o/x/f: read-only file system", 2),
    (OSError(errno.EXDEV, "Invalid cross-device link", "/a", None, "/b"), "cannot access /a -> /b", 2),
    (RuntimeError("shape mismatch\nmore"), "internal error: RuntimeError: shape mismatch (rerun with --debug", 1),
    (UserError("bad value\nsecond line"), "bad value", 2),
])
def test_error_line_table(exc, needle, status):
    from tinyseek.eval import Config

    msg, code = error_line(exc, Config(ckpt="c", out="/o/x"))
    assert needle in msg and "\n" not in msg and code == status, msg
    assert "--out" in msg or status == 1 or isinstance(exc, UserError) or "-> /b" in msg


def test_internal_errors_are_one_line_and_debug_shows_the_traceback(monkeypatch, capsys, tmp_path):
    from tinyseek.train import pretrain

    def boom(cfg):
        raise ValueError("something broke")
    monkeypatch.setattr(pretrain, "main", boom)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("TINYSEEK_DEBUG", raising=False)
    assert main(["pretrain", "--preset", "micro"]) == 1
    line = _one_error_line(capsys)
    assert "internal error: ValueError: something broke" in line and "--debug" in line
    assert main(["pretrain", "--debug", "--preset", "micro"]) == 1  # --debug anywhere, not an option
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and err.strip().splitlines()[-1] == line
    monkeypatch.setenv("TINYSEEK_DEBUG", "1")
    assert main(["pretrain", "--steps", "0"]) == 2  # a UserError keeps its status, with the traceback
    err = capsys.readouterr().err
    assert "Traceback" in err and err.strip().splitlines()[-1].startswith("tinyseek: error: ")


@pytest.mark.parametrize("argv", [["--help"], ["pretrain", "--help"]])
def test_help_into_a_closed_pipe_is_quiet(argv):
    """``tinyseek --help | head -1``: the reader leaves before tinyseek writes; no traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    p = subprocess.Popen([sys.executable, "-m", "tinyseek", *argv], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    p.stdout.close()  # the reader is gone before anything is written
    err = p.stderr.read().decode()
    rc = p.wait(timeout=60)
    p.stderr.close()
    assert err == "" and rc == 141, (rc, err)


def test_eval_and_serve_refuse_a_checkpoint_without_tokenizer_alike(ckpt, tmp_path, capsys):
    """No tokenizer beside the checkpoint: the same one-line error from eval as from serve (eval
    used to fall back to the byte tokenizer silently); --tokenizer bytes asks for it explicitly."""
    import shutil

    from tinyseek.serve.loading import load_for_serving

    bare = tmp_path / "a" / "b" / "c" / "run"  # no tokenizer here or in the 3 folders above
    shutil.copytree(ckpt / "ckpt", bare / "ckpt")
    with pytest.raises(UserError) as serve_err:
        load_for_serving(str(bare), device="cpu")
    argv = ["eval", "--ckpt", str(bare), "--n-problems", "1", "--n-samples", "0", "--max-new-tokens", "2",
            "--device", "cpu", "--out", str(tmp_path / "e.json")]
    assert main(argv) == 2
    assert _one_error_line(capsys) == f"tinyseek: error: {serve_err.value}"
    assert "no tokenizer found" in str(serve_err.value) and not (tmp_path / "e.json").exists()
    assert main([*argv, "--tokenizer", "bytes"]) == 0
    assert (tmp_path / "e.json").is_file()


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a small tmpfs (options given per call); needs root with mount rights, else skip."""
    mounted: list[Path] = []

    def mount(name: str, opts: str) -> Path:
        d = tmp_path / name
        d.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)], capture_output=True)
        if r.returncode != 0:
            pytest.skip("cannot mount a tmpfs here (not root, or no mount rights)")
        mounted.append(d)
        return d
    yield mount
    for d in mounted:
        subprocess.run(["umount", str(d)], check=False)


@pytest.mark.parametrize("stage", ["eval", "export", "quantize", "pretrain"])
def test_real_read_only_and_full_file_systems(stage, ckpt, tmpfs, tmp_path, capsys, monkeypatch):
    """The same errors from real file systems: a read-only mount (EROFS) and a 64 KiB one that fills
    up (ENOSPC; safetensors and torch report it in their own exception types)."""
    if os.geteuid() != 0:
        pytest.skip("mounting needs root")
    monkeypatch.chdir(tmp_path)
    ro = tmpfs("ro", "ro,size=1m")
    assert main(stage_argv(stage, ro / "out", ckpt)) == 2
    line = _one_error_line(capsys)
    assert f"cannot write {ro}" in line and "read-only file system" in line and ".tmp" not in line, line
    full = tmpfs("full", "size=64k")
    if stage == "eval":  # its JSON is small: leave it no room
        with pytest.raises(OSError), open(full / "filler", "wb") as f:
            for _ in range(1000):
                f.write(b"\0" * 4096)
                f.flush()
    argv = stage_argv(stage, full / "out", ckpt) + (["--steps", "2", "--progress", "false"] if stage == "pretrain" else [])
    assert main(argv) == 2
    line = _one_error_line(capsys)
    assert "no space left on device writing" in line and str(full) in line, line
    assert not _leftovers(full), _leftovers(full)
