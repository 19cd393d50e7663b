"""PNG plots for post-training runs (matplotlib, Agg backend, imported lazily)."""
from __future__ import annotations

from pathlib import Path

from tinyseek.common import read_metrics


def plot_grpo(metrics_path: str | Path, out_png: str | Path) -> Path:
    """Reward, accuracy, response length per step and held-out pass@1 from a GRPO metrics.jsonl."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = read_metrics(metrics_path)
    train = [r for r in rows if "reward_mean" in r]
    ev = [r for r in rows if "eval_pass1" in r]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.5))
    panels = [("reward_mean", "mean reward"), ("accuracy", "training accuracy"),
              ("response_length", "response length (tokens)")]
    for ax, (key, title) in zip(axes, panels):
        ax.plot([r["step"] for r in train], [r[key] for r in train], lw=1)
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
