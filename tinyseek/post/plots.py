"""PNG plots for post-training runs (matplotlib through :func:`tinyseek.plots.pyplot`: Agg backend, imported on first use)."""
from __future__ import annotations

from pathlib import Path

from tinyseek.common import read_metrics
from tinyseek.plots import pyplot


def moving_average(xs: list[float], w: int) -> list[float]:
    """Trailing mean over up to ``w`` points.

    >>> moving_average([1, 2, 3, 4], 2)
    [1.0, 1.5, 2.5, 3.5]
    """
    out, acc = [], 0.0
    for i, x in enumerate(xs):
        acc += x
        if i >= w:
            acc -= xs[i - w]
        out.append(acc / min(i + 1, w))
    return out


def plot_grpo(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Reward, accuracy, response length per step and held-out pass@1 from a GRPO metrics.jsonl."""
    return _plot_rl(metrics_path, out_png, [("reward_mean", "mean reward"), ("accuracy", "training accuracy"),
                                            ("response_length", "response length (tokens)")])


def plot_ppo(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Reward, value loss, KL to the reference per step and held-out pass@1 from a PPO metrics.jsonl."""
    return _plot_rl(metrics_path, out_png, [("reward_mean", "mean reward"), ("value_loss", "value loss"),
                                            ("kl", "KL to reference (k3, token mean)")])


def _plot_rl(metrics_path: str | Path, out_png: str | Path, panels: list[tuple[str, str]]) -> Path:
    """Three per-step panels (``(metric key, title)``: raw and a moving mean) and held-out pass@1,
    written atomically to ``out_png``."""
    plt = pyplot()
    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward_mean" in r]
    ev = [r for r in rows if "eval_pass1" in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    for ax, (key, title) in zip(axes, panels):
        pts = [(r["step"], r[key]) for r in train if key in r]
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        ax.plot(xs, ys, lw=0.8, alpha=0.4)
        w = max(1, len(ys) // 15)
        ax.plot(xs, moving_average(ys, w), lw=2, label=f"{w}-step mean")
        ax.legend(loc="best", fontsize=8)
        ax.set_title(title)
        ax.set_xlabel("step")
    axes[3].plot([r["step"] for r in ev], [r["eval_pass1"] for r in ev], marker="o")
    axes[3].set_title("held-out pass@1 (greedy)")
    axes[3].set_xlabel("step")
    fig.tight_layout()
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(out)
    return out
