"""End to end on CPU: SFT cold start -> GRPO raises training reward and held-out accuracy (2 seeds).

A fresh micro model is SFT'd on worked solutions of one-operation problems from two templates
(``arithmetic`` "Compute 3 - 7." and ``chain_sum`` "What is 3 - 7?", difficulty 1), then trained
with GRPO on new training problems (32 prompts x 8 samples a step, lr 2e-4, one update per batch,
150 steps) and the exponential moving average of its weights (decay 0.95) is kept. Held-out
problems are every distinct problem of the tasks' eval split (~104): their prompt texts never
occur in training (what transfers is the arithmetic fact, seen under the other template), so
there is no problem-sampling noise left; what remains is training noise, and it is large for
greedy decoding: greedy pass@1 of one GRPO run evaluated every 25 steps moved 0.22 -> 0.16 ->
0.29 -> ... -> 0.30 (seed 0) and 0.48 -> 0.24 -> 0.54 -> ... -> 0.46 (seed 1), because this
122k-parameter model's answers are often off by one and near-tied answers change argmax.

Measured by this test (2 cores, seeds 0 / 1): training reward 0.402 -> 0.448 / 0.448 -> 0.519;
held-out greedy pass@1 0.260 -> 0.317 / 0.471 -> 0.490; held-out sampled accuracy (T=1, 8 samples a
problem) 0.203 -> 0.228 / 0.269 -> 0.349 (other runs of the same recipe with 1 thread: greedy +0.025 /
+0.031, sampled +0.043 / +0.019). The greedy gain is within the checkpoint noise above, so the test
asserts only that greedy pass@1 does not fall below the SFT start by more than 0.05; the reward and
sampled-accuracy gains are asserted with margins about half the smallest measured gains.
Takes ~4 minutes on 2 busy cores, hence ``-m slow``.
"""
import pytest

from tinyseek.eval import evaluate, heldout_problems
from tinyseek.post import grpo, sft
from tinyseek.tokenizer import byte_tokenizer
from tinyseek.train.checkpoint import load_model

pytestmark = pytest.mark.slow
TASKS = "arithmetic,chain_sum"


def heldout(path):
    model, _ = load_model(path)
    probs = list({p.prompt: p for p in heldout_problems(TASKS, 512, 0, 1)}.values())  # every distinct one
    assert len(probs) >= 100
    return evaluate(model, byte_tokenizer(), probs, k=8, n_samples=8, max_new_tokens=24, seed=0)


@pytest.mark.parametrize("seed", [0, 1])
def test_sft_then_grpo_improves_reward_and_heldout_accuracy(tmp_path, seed):
    s = sft.main(sft.Config(out_dir=str(tmp_path), name="sft", tasks=TASKS, difficulty=1, n_examples=2000, epochs=5,
                            batch_size=32, lr=3e-3, seed=seed, log_every=100))
    g = grpo.main(grpo.Config(init=s["run_dir"], out_dir=str(tmp_path), name="grpo", tasks=TASKS, difficulty=1,
                              steps=150, prompts_per_step=32, group_size=8, max_new_tokens=24, lr=2e-4, mu=1,
                              ema=0.95, eval_every=0, eval_problems=16, seed=seed, plots=False))
    before, after = heldout(s["run_dir"]), heldout(g["run_dir"])
    print(f"seed {seed}: train reward {g['reward_first']:.3f} -> {g['reward_last']:.3f}; held-out greedy pass@1 "
          f"{before['pass@1']:.3f} -> {after['pass@1']:.3f}, sampled {before['sampled_accuracy']:.3f} -> "
          f"{after['sampled_accuracy']:.3f}, pass@8 {before['pass@8']:.3f} -> {after['pass@8']:.3f}")
    assert g["reward_last"] > g["reward_first"] + 0.02, g
    assert after["sampled_accuracy"] > before["sampled_accuracy"] + 0.01, (before, after)
    assert after["pass@1"] > before["pass@1"] - 0.05, (before, after)
