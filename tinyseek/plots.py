"""PNG plots from run metrics (matplotlib, Agg backend: no display needed).

Every function reads plain data (a ``metrics.jsonl`` path or lists) and writes one PNG
atomically (temp file, then rename). Stages and the report add their own plot functions here.
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from tinyseek.common import read_metrics


def pyplot():
    """matplotlib's ``pyplot`` on the Agg backend (no display). matplotlib is imported here only, on the
    first plot: it costs ~0.4 s, which a stage that writes no PNG does not pay."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fig.clf()
        pyplot().close(fig)
    return out


def series(records: Iterable[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of ``key`` over the records that have a finite number for it.

    >>> series([{"step": 1, "loss": 2.0}, {"step": 2}, {"step": 3, "loss": float("nan")}], "loss")
    ([1], [2.0])
    """
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and v == v and abs(v) != float("inf"):
            xs.append(int(r.get("step", len(xs))))
            ys.append(float(v))
    return xs, ys


def smooth(values: Sequence[float], beta: float = 0.9) -> list[float]:
    """Bias-corrected exponential moving average (as TensorBoard's smoothing).

    >>> smooth([1.0, 1.0, 1.0])
    [1.0, 1.0, 1.0]
    >>> [round(v, 3) for v in smooth([0.0, 10.0], beta=0.5)]
    [0.0, 6.667]
    """
    out, m = [], 0.0
    for i, v in enumerate(values):
        m = beta * m + (1 - beta) * v
        out.append(m / (1 - beta ** (i + 1)))
    return out


def plot_loss(metrics: str | Path | list[dict], out: str | Path, keys: Sequence[str] = ("loss",),
              eval_key: str = "val_loss", title: str = "training loss") -> Path:
    """Loss curve(s) from ``metrics.jsonl`` (or records): raw, smoothed, and held-out points."""
    recs = read_metrics(metrics) if isinstance(metrics, (str, Path)) else list(metrics)
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for key in keys:
        xs, ys = series(recs, key)
        if not xs or key == eval_key:  # held-out points are drawn once, below
            continue
        if len(ys) > 20:  # enough points to smooth: raw faint, EMA bold
            ax.plot(xs, ys, alpha=0.3, lw=1, label=f"{key} (raw)")
            ax.plot(xs, smooth(ys, 0.9), lw=2, label=f"{key} (EMA 0.9)")
        else:
            ax.plot(xs, ys, lw=2, label=key)
    xs, ys = series(recs, eval_key)
    if xs:
        ax.plot(xs, ys, "o-", ms=4, label=eval_key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    return _save(fig, out)


def plot_lines(xs_by_label: dict[str, tuple[Sequence[float], Sequence[float]]], out: str | Path,
               xlabel: str = "step", ylabel: str = "", title: str = "", logy: bool = False) -> Path:
    """Generic multi-line plot: ``{label: (xs, ys)}``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, (xs, ys) in xs_by_label.items():
        ax.plot(list(xs), list(ys), lw=1.5, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if logy:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if xs_by_label:
        ax.legend()
    return _save(fig, out)


def plot_expert_heatmap(metrics: list[dict], out: str | Path) -> Path | None:
    """One heatmap per MoE layer: expert (rows) x logged step (columns), colour = load fraction
    (``load_frac`` of pretraining's metrics records); None when no record has it."""
    rows = [r for r in metrics if isinstance(r.get("load_frac"), list) and r["load_frac"]]
    if not rows:
        return None
    plt = pyplot()
    n_layers = len(rows[0]["load_frac"])
    fig, axes = plt.subplots(1, n_layers, figsize=(4 * n_layers, 3.2), squeeze=False)
    steps = [r["step"] for r in rows]
    for li, ax in enumerate(axes[0]):
        m = np.array([r["load_frac"][li] for r in rows]).T  # (E, steps)
        im = ax.imshow(m, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0], steps[-1], m.shape[0] - 0.5, -0.5))
        ax.set_title(f"MoE layer {li}: expert load share")
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return _save(fig, out)
