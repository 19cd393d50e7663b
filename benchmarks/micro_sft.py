"""The SFT checkpoint that benchmarks/reward_model.py and benchmarks/ppo_vs_grpo.py start from: the
micro model (tinyseek.config.model_micro) cold-started from scratch on worked arithmetic solutions,
under a minute on 2 CPU cores; reused when ``<out>/sft/result.json`` already exists."""
from __future__ import annotations

import json
from pathlib import Path

from tinyseek.post import sft

TASKS = "arithmetic"


def sft_checkpoint(out: str | Path, seed: int = 0) -> str:
    """The run dir of a micro SFT run under ``out`` (trained now unless it is there already)."""
    done = Path(out) / "sft" / "result.json"
    if done.is_file():
        return json.loads(done.read_text())["run_dir"]
    res = sft.main(sft.Config(out_dir=str(out), name="sft", tasks=TASKS, difficulty=1, n_examples=2000, epochs=5,
                              batch_size=32, lr=3e-3, seed=seed, log_every=50))
    return res["run_dir"]
