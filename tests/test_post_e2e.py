"""End to end on CPU: SFT cold start -> GRPO raises training reward and held-out pass@1 (2 seeds).

A fresh micro model is SFT'd on a few hundred worked solutions of one-operation sums
(``chain_sum`` difficulty 1: ``What is 3 - 7?``), then trained with GRPO on new training problems.
Held-out problems come from the tasks' eval split (their prompt texts never occur in training).
Both seeds must improve by margins far above the run-to-run spread of the starting points.
"""
import pytest

from tinyseek.post import grpo, sft

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_then_grpo_improves_reward_and_heldout_pass1(tmp_path, seed):
    s = sft.main(sft.Config(out_dir=str(tmp_path), name="sft", tasks="chain_sum", difficulty=1, n_examples=E2E["n_sft"],
                            epochs=E2E["sft_epochs"], batch_size=32, lr=3e-3, seed=seed, log_every=50))
    g = grpo.main(grpo.Config(init=s["run_dir"], out_dir=str(tmp_path), name="grpo", tasks="chain_sum", difficulty=1,
                              steps=E2E["steps"], prompts_per_step=8, group_size=8, max_new_tokens=24,
                              lr=E2E["lr"], eval_every=0, eval_problems=64, seed=seed, plots=False))
    assert g["reward_last"] > g["reward_first"] + 0.15, g
    assert g["eval_pass1_end"] > g["eval_pass1_start"] + 0.1, g


E2E = {"n_sft": 800, "sft_epochs": 8, "steps": 40, "lr": 3e-4}
