"""``tinyseek pretrain`` rejects bad configuration with exit status 2 and exactly one stderr line."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

BAD = {
    "top_k > n_experts": (["--preset", "micro", "--model.top-k", "9"], "top_k"),
    "unknown preset": (["--preset", "huge"], "unknown preset"),
    "unknown option": (["--preset", "micro", "--no-such-option", "3"], "unknown option"),
    "wrong type": (["--steps", "many"], "expects int"),
}
# the same code path, run in-process (cli.main) to keep the suite fast
BAD_INPROC = {
    "bad value": (["--lr", "-1"], "lr"),
    "bad choice": (["--schedule", "linear"], "schedule"),
    "seq_len > max_seq_len": (["--preset", "micro", "--seq-len", "4096"], "max_seq_len"),
    "bad bool": (["--resume", "maybe"], "boolean"),
    "dangling preset": (["--preset"], "--preset needs a name"),
}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Launch every bad invocation at once (each pays the interpreter start-up in parallel)."""
    cwd = tmp_path_factory.mktemp("cli")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = {k: subprocess.Popen([sys.executable, "-m", "tinyseek", "pretrain", *argv], cwd=cwd, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for k, (argv, _) in BAD.items()}
    out = {k: (p.wait(timeout=120), *p.communicate()) for k, p in procs.items()}
    assert not (cwd / "runs").exists()  # nothing was started
    return out


@pytest.mark.parametrize("case", list(BAD))
def test_bad_config_exits_2_with_one_line(results, case):
    rc, stdout, stderr = results[case]
    lines = stderr.strip().splitlines()
    assert rc == 2, (rc, stderr)
    assert len(lines) == 1, stderr
    assert lines[0].startswith("tinyseek: error: ") and BAD[case][1] in lines[0], lines[0]


@pytest.mark.parametrize("case", list(BAD_INPROC))
def test_bad_config_in_process(case, capsys, tmp_path, monkeypatch):
    from tinyseek.cli import main

    monkeypatch.chdir(tmp_path)
    argv, needle = BAD_INPROC[case]
    assert main(["pretrain", *argv]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tinyseek: error: ") and needle in lines[0], lines
    assert not (tmp_path / "runs").exists()


def test_presets_validate():
    from tinyseek.train.pretrain import preset

    for name in ("micro", "cpu-tiny", "gpu-small"):
        cfg = preset(name).validate()
        assert cfg.name == name and cfg.seq_len <= cfg.model.max_seq_len
    assert preset("gpu-small").target_tokens_per_step > 0 and preset("gpu-small").model.is_moe


def test_help_lists_options():
    from tinyseek.cli import main, stage_help
    from tinyseek.train import pretrain

    text = stage_help("pretrain", pretrain)
    assert text.startswith("usage: tinyseek pretrain ")
    assert "--target-tokens-per-step" in text and "--model.top-k" in text
    line = next(l for l in text.splitlines() if l.strip().startswith("--resume "))
    assert "continue from the latest checkpoint" in line           # the field's comment is its help
    assert main(["pretrain", "--help"]) == 0


@pytest.mark.parametrize("stage", ["data", "tokenizer", "sft", "grpo", "dpo", "quantize", "serve", "eval", "run"])
def test_every_stage_documents_its_options(stage):
    """Every option of every stage has a one-line description in its --help."""
    import importlib

    from tinyseek.cli import STAGES, stage_help

    rows = [l for l in stage_help(stage, importlib.import_module(STAGES[stage])).splitlines() if l.startswith("  --")]
    undocumented = [l.split()[0] for l in rows if len(l.split(None, 2)) < 3]
    assert rows and not undocumented, undocumented
