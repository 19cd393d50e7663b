"""Run report: ``runs/<name>/report/{index.html, report.md, *.png}``.

Collects what each stage left in the run folder (metrics.jsonl, stage markers, eval JSON) and
renders PNG plots with the numbers beside them: pretraining loss, expert load heatmap over
training, GRPO reward/accuracy/length, the quantization and evaluation tables, the serving smoke
result and the exact configuration. Sections of stages that did not run say so.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

from tinyseek.common import atomic_write_text, read_metrics
from tinyseek.config import to_dict
from tinyseek.plots import plot_expert_heatmap, plot_loss
from tinyseek.post.plots import plot_grpo
from tinyseek.stages import is_done, stage_result, stages_for


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (list, dict)):
        s = json.dumps(v)
        return s if len(s) <= 80 else s[:77] + "..."
    return str(v)


def _scalars(d: dict, skip: tuple[str, ...] = ()) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_") and k not in skip
            and isinstance(v, (int, float, str, bool)) and v is not None}


# ---------------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------------
def _plots(run: Path, rep: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    pre = read_metrics(run / "pretrain" / "metrics.jsonl")
    if pre:
        out["loss"] = plot_loss(pre, rep / "loss.png", title="pretraining loss")  # + held-out val_loss points
        p = plot_expert_heatmap(pre, rep / "expert_load.png")
        if p:
            out["expert_load"] = p
    if (run / "grpo" / "metrics.jsonl").exists():
        out["grpo"] = plot_grpo(run / "grpo" / "metrics.jsonl", rep / "grpo.png")
    sft = read_metrics(run / "sft" / "metrics.jsonl")
    if sft and any("loss" in r for r in sft):
        out["sft"] = plot_loss(sft, rep / "sft_loss.png", title="SFT loss")
    return out


# ---------------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------------
def summary_rows(run: Path) -> list[tuple[str, str]]:
    """(stage, one-line result) for every pipeline stage, from the stage markers."""
    preset = (_load(run / "pipeline_config.json") or {}).get("preset", "")
    rows = []
    for s in stages_for(preset):
        if not is_done(run, s):
            rows.append((s, "this report" if s == "report" else "not run"))
            continue
        r = stage_result(run, s)
        rows.append((s, _one_line(s, r)))
    return rows


def _one_line(stage: str, r: dict) -> str:
    g = lambda *ks: next((r[k] for k in ks if k in r and r[k] is not None), None)  # noqa: E731
    if stage == "data":
        return f"{g('train_docs')} docs, {g('train_tokens')} train tokens"
    if stage == "import":
        return f"{g('architecture')} ({_fmt(g('params'))} params, {g('format')}) from {g('source')}"
    if stage == "pretrain":
        return f"final loss {_fmt(g('loss', 'final_loss'))}, val loss {_fmt(g('val_loss'))}"
    if stage in ("sft", "grpo"):
        return ", ".join(f"{k} {_fmt(v)}" for k, v in list(_scalars(r).items())[:4])
    if stage == "quantize":
        return "; ".join(f"{m}: {_fmt(v.get('file_ratio'))}x smaller"
                         + (f", ppl {_fmt(v.get('ppl_float'))}->{_fmt(v.get('ppl_quant'))}" if v.get("ppl_float") else "")
                         for m, v in r.items() if isinstance(v, dict))
    if stage == "eval":
        return "; ".join(f"{m}: pass@1 {_fmt(v.get('pass@1'))}" for m, v in r.items() if isinstance(v, dict))
    if stage == "export":
        if "hf" in r and isinstance(r["hf"], dict):  # several formats
            return "; ".join(f"{f}: skipped ({v['skipped'][:60]})" if "skipped" in v else f"{f}: {v.get('out')}"
                             for f, v in r.items() if isinstance(v, dict))
        return f"skipped: {r['skipped']}" if "skipped" in r else f"HF {g('architecture', 'arch')} -> {g('out', 'out_dir')}"
    if stage == "serve":
        return f"HTTP ok in {_fmt(g('latency_s'))}s: {str(g('response'))[:60]!r}"
    if stage == "report":
        return str(g("index"))
    return ""


def _md_table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _sections(run: Path, cfg_dict: dict, plots: dict[str, Path]) -> list[tuple[str, str, str | None]]:
    """(title, markdown body, png name or None) per report section."""
    secs: list[tuple[str, str, str | None]] = []
    rows = summary_rows(run)
    secs.append(("Pipeline", _md_table(["stage", "seconds", "result"],
                                       [[s, stage_result(run, s).get("_seconds", ""), r] for s, r in rows]), None))
    data = _load(run / "data" / "report.json")
    if data:
        body = _md_table(["metric", "value"], [[k, v] for k, v in _scalars(data).items()])
        srcs = data.get("sources", {})
        if srcs:
            body += "\n\n" + _md_table(["source", "input", "kept", "dropped", "reconciled"],
                                       [[s, v.get("input"), v.get("kept"), v.get("dropped"), v.get("reconciled")]
                                        for s, v in srcs.items()])
        secs.append(("Data", body, None))
    pre, imp = stage_result(run, "pretrain"), stage_result(run, "import")
    if imp and not pre:  # a real pretrained model instead of pretraining
        secs.append(("Imported model", _md_table(["key", "value"], [[k, v] for k, v in _scalars(imp).items()]), None))
    else:
        secs.append(("Pretraining", _md_table(["metric", "value"], [[k, v] for k, v in _scalars(pre).items()])
                     if pre else "not run", "loss.png" if "loss" in plots else None))
    probe = pre.get("comm_probe") if pre else None
    if probe:
        body = (f"Layout `--parallel {pre.get('parallel', '')}`; one probed step (train/comm_meter.py): the busiest "
                "rank's bytes sent per parallel dimension (ring algorithms) and its serialized time (each "
                "collective waited on, no overlap: an upper bound of the exposed time).\n\n"
                + _md_table(["dimension", "bytes/step", "time (s)", "calls"],
                            [[d, r.get("bytes"), r.get("time_s"), r.get("calls")] for d, r in probe.items()]))
        secs.append(("Communication", body, None))
    if "expert_load" in plots:
        last = [r for r in read_metrics(run / "pretrain" / "metrics.jsonl") if "load_max_mean" in r]
        body = ("Share of routed tokens per expert over training (aux-loss-free bias balancing"
                " plus the balance loss). Last max/mean load per MoE layer: "
                + (_fmt(last[-1]["load_max_mean"]) if last else "n/a"))
        secs.append(("Expert load", body, "expert_load.png"))
    sft = stage_result(run, "sft")
    secs.append(("SFT cold start", _md_table(["metric", "value"], [[k, v] for k, v in _scalars(sft).items()])
                 if sft else "not run", "sft_loss.png" if "sft" in plots else None))
    grpo = stage_result(run, "grpo")
    secs.append(("GRPO", _md_table(["metric", "value"], [[k, v] for k, v in _scalars(grpo).items()])
                 if grpo else "not run", "grpo.png" if "grpo" in plots else None))
    ev = stage_result(run, "eval")
    if ev:
        keys = sorted({k for v in ev.values() if isinstance(v, dict) for k in _scalars(v)})
        secs.append(("Evaluation (held-out problems)", _md_table(["model"] + keys,
                     [[m] + [v.get(k, "") for k in keys] for m, v in ev.items() if isinstance(v, dict)]), None))
    q = stage_result(run, "quantize")
    if q:
        keys = ["method", "group_size", "file_bytes_float", "file_bytes_quant", "file_ratio", "ppl_float", "ppl_quant"]
        secs.append(("Quantization", _md_table(keys, [[v.get(k, "") for k in keys]
                                                        for v in q.values() if isinstance(v, dict)]), None))
    ex = stage_result(run, "export")
    if ex:
        secs.append(("Hugging Face export", _md_table(["key", "value"], [[k, v] for k, v in _scalars(ex).items()]), None))
    sv = stage_result(run, "serve")
    if sv:
        secs.append(("Serving smoke test", _md_table(["key", "value"], [[k, v] for k, v in _scalars(sv).items()]), None))
    secs.append(("Configuration", "```json\n" + json.dumps(cfg_dict, indent=2, default=str) + "\n```", None))
    return secs


def write_report(run: str | Path, cfg: Any = None) -> dict:
    """Render the report of run folder ``run``; returns the paths written."""
    run = Path(run)
    rep = run / "report"
    rep.mkdir(parents=True, exist_ok=True)
    cfg_dict = to_dict(cfg) if cfg is not None else _load(run / "pipeline_config.json")
    plots = _plots(run, rep)
    secs = _sections(run, cfg_dict, plots)
    md = [f"# tinyseek run report: {run.name}\n"]
    for title, body, png in secs:
        md.append(f"## {title}\n")
        if png:
            md.append(f"![{title}]({png})\n")
        md.append(body + "\n")
    atomic_write_text(rep / "report.md", "\n".join(md))
    h = ["<!doctype html><html><head><meta charset='utf-8'><title>tinyseek report</title>",
         "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto}table{border-collapse:collapse}"
         "td,th{border:1px solid #ccc;padding:2px 8px;font-size:90%}img{max-width:100%}"
         "pre{background:#f6f6f6;padding:1em;overflow:auto}</style></head><body>",
         f"<h1>tinyseek run report: {html.escape(run.name)}</h1>"]
    for title, body, png in secs:
        h.append(f"<h2>{html.escape(title)}</h2>")
        if png:
            h.append(f"<img src='{png}' alt='{html.escape(title)}'>")
        h.append(_md_to_html(body))
    h.append("</body></html>")
    atomic_write_text(rep / "index.html", "\n".join(h))
    return {"index": str(rep / "index.html"), "markdown": str(rep / "report.md"),
            "plots": {k: str(v) for k, v in plots.items()}, "sections": [s[0] for s in secs]}


def _md_to_html(body: str) -> str:
    """The tiny markdown subset we emit: tables, fenced code and paragraphs."""
    out, lines, i = [], body.splitlines(), 0
    while i < len(lines):
        ln = lines[i]
        if ln.startswith("```"):
            j = i + 1
            while j < len(lines) and not lines[j].startswith("```"):
                j += 1
            out.append("<pre>" + html.escape("\n".join(lines[i + 1:j])) + "</pre>")
            i = j + 1
        elif ln.startswith("|"):
            rows = []
            while i < len(lines) and lines[i].startswith("|"):
                if not lines[i].startswith("|---"):
                    rows.append([c.strip() for c in lines[i].strip("|").split("|")])
                i += 1
            out.append("<table>" + "".join(
                "<tr>" + "".join(f"<{'th' if r == 0 else 'td'}>{html.escape(c)}</{'th' if r == 0 else 'td'}>"
                                 for c in row) + "</tr>" for r, row in enumerate(rows)) + "</table>")
        else:
            if ln.strip():
                out.append(f"<p>{html.escape(ln)}</p>")
            i += 1
    return "\n".join(out)
