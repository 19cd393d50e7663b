"""End to end: `tinyseek run --preset micro`, killed mid-run and run again.

One real pipeline run (a subprocess, SIGKILLed while GRPO runs, then re-run to the end) checks:
every artifact exists, completed stages are not redone after the kill, nothing half-written is
left, the report lists every stage, and the final model answers in the task's format.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tinyseek.pipeline import PRETRAIN_STAGES as STAGE_ORDER

ROOT = Path(__file__).resolve().parents[1]


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cmd(runs: Path) -> list[str]:
    return [sys.executable, "-m", "tinyseek", "run", "--preset", "micro", "--runs-dir", str(runs),
            "--name", "e2e"]


@pytest.fixture(scope="module")
def killed_then_finished(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    run = runs / "e2e"
    log1 = open(runs / "first.log", "w")
    p = subprocess.Popen(_cmd(runs), cwd=ROOT, env=_env(), stdout=log1, stderr=subprocess.STDOUT)
    deadline = time.time() + 600
    try:
        # kill while GRPO is running: SFT is marked done, GRPO is not
        while time.time() < deadline and p.poll() is None:
            if (run / "stages" / "sft.json").exists() and (run / "grpo").exists():
                time.sleep(1.0)
                break
            time.sleep(0.2)
        assert p.poll() is None, (runs / "first.log").read_text()[-3000:]
        p.send_signal(signal.SIGKILL)
        p.wait()
    finally:
        if p.poll() is None:
            p.kill()
        log1.close()
    marked_before = {s for s in STAGE_ORDER if (run / "stages" / f"{s}.json").exists()}
    r = subprocess.run(_cmd(runs), cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return run, marked_before, r.stdout


def test_kill_and_rerun_skips_completed_stages(killed_then_finished):
    run, marked_before, out = killed_then_finished
    assert {"data", "pretrain", "sft"} <= marked_before
    assert "grpo" not in marked_before
    for s in ("data", "pretrain", "sft"):
        assert f"{s}: done already, skipped" in out
    assert "grpo: done in" in out


def test_every_artifact_exists_and_nothing_half_written(killed_then_finished):
    run, _, _ = killed_then_finished
    for rel in ["data/shards/index.json", "data/report.json", "data/manifest.json", "tokenizer/tokenizer.json",
                "quantize/int8/quant_config.json", "quantize/int4/quant_config.json",
                "eval/grpo.json", "eval/sft.json", "export/hf/config.json",
                "report/index.html", "report/report.md", "report/loss.png", "report/grpo.png",
                "report/expert_load.png"]:
        assert (run / rel).is_file(), rel
    for stage in ("pretrain", "sft", "grpo"):
        steps = sorted((run / stage / "ckpt").glob("step_*"))
        assert steps and (steps[-1] / "model.safetensors").is_file() and (steps[-1] / "meta.json").is_file()
    for s in STAGE_ORDER:
        json.loads((run / "stages" / f"{s}.json").read_text())
    leftovers = [p for p in run.rglob("*") if p.name.startswith((".tmp-", ".old-")) or p.name.endswith(".tmp")]
    assert not leftovers, leftovers


def test_report_lists_every_stage(killed_then_finished):
    run, _, _ = killed_then_finished
    md = (run / "report" / "report.md").read_text()
    for s in STAGE_ORDER:
        assert f"| {s} |" in md, s
    html = (run / "report" / "index.html").read_text()
    for png in ("loss.png", "grpo.png", "expert_load.png"):
        assert png in html


def test_final_model_answers_in_the_task_format(killed_then_finished):
    run, _, _ = killed_then_finished
    ev = json.loads((run / "eval" / "grpo.json").read_text())
    assert ev["format_rate"] >= 0.5, ev
    serve = json.loads((run / "stages" / "serve.json").read_text())
    assert serve["health"] == 200
    assert serve["response"].strip() and serve["usage"]["completion_tokens"] > 0


@pytest.mark.parametrize("argv,needle", [
    (["--preset", "nope"], "unknown preset 'nope'"),
    (["--redo", "bogus"], "unknown stage 'bogus'"),
    (["--quant", "int3"], "quant variants are int8 and int4"),
    (["--eval-problems", "0"], "eval_problems must be > 0"),
    (["--sft.epochs", "x"], "--sft.epochs expects int"),
])
def test_bad_run_options_are_one_line_errors(argv, needle, tmp_path, capsys):
    from tinyseek.cli import main as cli_main
    assert cli_main(["run", "--runs-dir", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyseek: error:") and needle in err and "\n" not in err
    assert not any(tmp_path.iterdir())  # nothing written for a rejected run
