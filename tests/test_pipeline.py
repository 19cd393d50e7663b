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

from tinyseek.stages import PRETRAIN_STAGES as STAGE_ORDER
from tinyseek.stages import marker_inputs, stage_result

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


# ---------------------------------------------------------------------------------------------
# stage markers record their inputs: redoing a stage makes every stage reading it stale
# (the stages are stand-ins that record their calls, so these run in milliseconds)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def fake_stages(monkeypatch):
    from tinyseek import pipeline as P

    calls: list[str] = []

    def make(stage):
        def run_stage(cfg, run):
            calls.append(stage)
            (run / stage).mkdir(parents=True, exist_ok=True)
            (run / stage / "out.txt").write_text(stage)
            if stage == "quantize":  # metrics shaped like the real ones (the report reads them)
                return {m: {"file_ratio": 4.0} for m in cfg.quant.split(",")}
            return {"value": len(calls)}
        return run_stage

    monkeypatch.setattr(P, "STAGES", {s: make(s) for s in P.STAGES})
    return calls


def _run(tmp_path, *argv):
    from tinyseek.pipeline import main, preset
    from tinyseek.config import apply_overrides

    cfg = preset("micro")
    apply_overrides(cfg, ["--runs-dir", str(tmp_path), "--name", "r", *argv])
    return main(cfg.validate())


def test_rerun_skips_every_stage_with_unchanged_inputs(fake_stages, tmp_path, capsys):
    _run(tmp_path)
    assert fake_stages == list(STAGE_ORDER)
    fake_stages.clear()
    _run(tmp_path)
    assert fake_stages == []
    assert "stale" not in capsys.readouterr().out


def test_redo_makes_every_later_reader_stale(fake_stages, tmp_path, capsys):
    _run(tmp_path)
    fake_stages.clear()
    capsys.readouterr()
    _run(tmp_path, "--redo", "sft")
    assert fake_stages == ["sft", "grpo", "quantize", "eval", "export", "serve", "report"]
    out = capsys.readouterr().out
    assert "grpo (sft is redone)" in out and "[3/9] sft ... (--redo)" in out
    fake_stages.clear()
    _run(tmp_path)  # and afterwards everything is up to date again
    assert fake_stages == []


def test_changed_settings_make_the_stage_and_its_readers_stale(fake_stages, tmp_path, capsys):
    _run(tmp_path)
    fake_stages.clear()
    capsys.readouterr()
    _run(tmp_path, "--grpo.lr", "0.001")
    assert fake_stages == ["grpo", "quantize", "eval", "export", "serve", "report"]
    out = capsys.readouterr().out
    from tinyseek.pipeline import preset
    assert f"grpo (its settings changed (lr {preset('micro').grpo.lr} -> 0.001))" in out, out
    fake_stages.clear()
    _run(tmp_path, "--grpo.lr", "0.001", "--eval-problems", "7")  # an eval-only setting: eval, the report
    assert fake_stages == ["eval", "report"]


def test_killed_after_a_redo_still_redoes_the_readers(fake_stages, tmp_path, monkeypatch):
    """--redo sft, killed while GRPO runs: the next plain run redoes GRPO and everything after it
    (GRPO's old marker still names the old SFT, or is gone), not only the unfinished stage."""
    from tinyseek import pipeline as P

    _run(tmp_path)
    fake_stages.clear()
    real = P.STAGES["grpo"]

    def killed(cfg, run):
        raise KeyboardInterrupt
    monkeypatch.setitem(P.STAGES, "grpo", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--redo", "sft")
    assert fake_stages == ["sft"]
    for s in ("grpo", "quantize", "eval", "export", "serve", "report"):
        assert not (tmp_path / "r" / "stages" / f"{s}.json").exists(), s
    monkeypatch.setitem(P.STAGES, "grpo", real)
    fake_stages.clear()
    _run(tmp_path)
    assert fake_stages == ["grpo", "quantize", "eval", "export", "serve", "report"]


def test_a_stage_redone_behind_the_pipelines_back_is_detected(fake_stages, tmp_path, capsys):
    """A reader whose recorded input id no longer matches (its input was redone by a run that
    stopped early with --stop-after) is stale."""
    _run(tmp_path)
    fake_stages.clear()
    _run(tmp_path, "--redo", "sft", "--stop-after", "sft")
    assert fake_stages == ["sft"]
    fake_stages.clear()
    capsys.readouterr()
    _run(tmp_path)
    assert fake_stages == ["grpo", "quantize", "eval", "export", "serve", "report"]


def test_old_markers_without_inputs_are_kept_but_redo_still_propagates(fake_stages, tmp_path):
    _run(tmp_path)
    for m in (tmp_path / "r" / "stages").glob("*.json"):  # markers as written before they recorded inputs
        d = json.loads(m.read_text())
        d.pop("_marker")
        m.write_text(json.dumps(d))
    fake_stages.clear()
    _run(tmp_path)
    assert fake_stages == []
    _run(tmp_path, "--redo", "grpo")
    assert fake_stages == ["grpo", "quantize", "eval", "export", "serve", "report"]


def test_stage_result_hides_the_marker_bookkeeping(fake_stages, tmp_path):
    from tinyseek.pipeline import preset

    _run(tmp_path)
    run = tmp_path / "r"
    assert "_marker" not in stage_result(run, "grpo") and stage_result(run, "grpo")["value"] == 4  # 4th call
    m = marker_inputs(run, "grpo")
    assert m["after"] == {"sft": marker_inputs(run, "sft")["id"]} and m["settings"]["lr"] == preset("micro").grpo.lr


# ---------------------------------------------------------------------------------------------
# pretraining killed between its final checkpoint and its marker
# ---------------------------------------------------------------------------------------------
def _final_checkpoint(run: Path, steps: int, meta_extra: dict) -> Path:
    from tinyseek.common import MetricsLogger
    from tinyseek.model.transformer import Transformer
    from tinyseek.train import checkpoint as ck
    from tinyseek.train.pretrain import preset as pre_preset

    mc = pre_preset("micro").model
    model = Transformer(mc)
    log = MetricsLogger(run / "pretrain" / "metrics.jsonl")
    log.log(steps - 5, loss=2.5, tokens_per_s=1000.0, mfu=0.1)
    log.log(steps, loss=2.25, tokens_per_s=1200.0, mfu=0.12)
    log.log(steps, val_loss=2.4)
    return ck.save_checkpoint(run / "pretrain" / "ckpt", steps, model, None,
                              {"skipped_steps": 0, "tokens_seen": 1234, **meta_extra})


@pytest.mark.parametrize("meta_extra,loss,val", [
    ({}, 2.25, 2.4),                                      # losses from the last metrics.jsonl records
    ({"train_loss": 2.0, "val_loss": 2.1}, 2.0, 2.1),     # losses the final checkpoint's meta.json records
])
def test_pretrain_marker_from_the_final_checkpoint(tmp_path, monkeypatch, meta_extra, loss, val):
    from tinyseek import pipeline as P

    def must_not_train(c):
        raise AssertionError("pretraining ran again")
    monkeypatch.setattr(P.pretrain_stage, "main", must_not_train)
    cfg = P.preset("micro")
    run = tmp_path / "r"
    step_dir = _final_checkpoint(run, cfg.pretrain.steps, meta_extra)
    res = P._pretrain(cfg, run)
    assert res["step"] == cfg.pretrain.steps and res["loss"] == loss and res["val_loss"] == val, res
    assert res["tokens_seen"] == 1234 and res["from_checkpoint"] == str(step_dir)


def test_killed_pretraining_resumes_only_with_the_settings_it_started_with(fake_stages, tmp_path, monkeypatch):
    """A run killed while pretraining resumes its output; asked for other pretraining settings,
    it starts over instead (the settings recorded when pretraining started differ)."""
    from tinyseek import pipeline as P

    def killed(cfg, run):
        (run / "pretrain" / "partial").write_text("checkpoints so far")
        raise KeyboardInterrupt
    monkeypatch.setitem(P.STAGES, "pretrain", killed)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path)
    run = tmp_path / "r"
    assert P.plan(P.preset("micro"), run, STAGE_ORDER, set())["pretrain"] == "not done"
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "--device", "cpu")  # wired settings are not recorded: it resumes
    assert (run / "pretrain" / "partial").exists()
    cfg = P.preset("micro")
    cfg.pretrain.lr, cfg.pretrain.model.top_k = 1e-3, 1
    why = P.plan(cfg, run, STAGE_ORDER, set())["pretrain"]
    assert why == f"stale: its settings changed since it started (lr {P.preset('micro').pretrain.lr} -> 0.001, " \
                  f"model.top_k {P.preset('micro').pretrain.model.top_k} -> 1)", why
    monkeypatch.setitem(P.STAGES, "pretrain", lambda cfg, run: {"resumed": (run / "pretrain" / "partial").exists()})
    _run(tmp_path, "--pretrain.lr", "0.001")
    assert stage_result(run, "pretrain")["resumed"] is False  # started over
