"""End to end on CPU: SFT cold start -> GRPO raises training reward and held-out greedy pass@1 (2 seeds).

Recipe (per seed): a fresh micro model (122k parameters) is SFT'd on 2000 worked solutions x 5 epochs
of one-operation problems from two templates (``arithmetic`` "Compute 3 - 7." and ``chain_sum``
"What is 3 - 7?", difficulty 1), then trained with GRPO on new training problems: 32 prompts x 8
samples a step, 150 steps, lr 2e-4, beta 0.04, one update per batch, rollouts at **temperature 0.3**,
and the exponential moving average of the weights (decay 0.95) is the result. Held-out problems are
every distinct problem of the tasks' eval split (99): no prompt text of it occurs in training.

Why temperature 0.3: greedy pass@1 is decided by the ranking of the top answers. At temperature 1
most of a group's samples are far-off answers, and the update spends itself pushing those down, which
leaves the argmax where it was (held-out greedy +0.02..+0.06 in the previous recipe, inside the noise).
At 0.3 a group mostly compares the top answer with the runner-up, so the update moves the argmax.

The two seeds run in parallel processes (one thread each): 59 s wall on 2 idle cores, 3 min 45 s
when the cores were shared with two other training runs. Results are deterministic (both runs
printed the same numbers).

Measured while choosing this recipe (held-out greedy pass@1 on the 99 problems, before -> after):

- this test: seed 0: 0.212 -> 0.333 (train reward 0.588 -> 0.664); seed 1: 0.424 -> 0.707
  (0.670 -> 0.787). Seeds 2 and 3 of the same code: 0.323 -> 0.444 (0.606 -> 0.669) and
  0.232 -> 0.303 (0.511 -> 0.553). Over the 4 seeds the greedy gain is +0.07..+0.28 (mean +0.15)
  and the reward gain +0.04..+0.12.
- noise, null control: the same recipe with ``shuffle_rewards`` (rewards permuted within each
  group: updates as large, no signal) from a seed-0 SFT model: 0.253 -> 0.141, train reward
  0.379 -> 0.285: signal-free updates only hurt, so a gain is not an artefact of update noise.
- noise, checkpoints: the EMA model evaluated every 25 steps on 64 held-out problems swings by up to
  0.14 (seed 1: .75 .61 .70 .77) and 0.22 (seed 0: .30 .52 .38 .41) between neighbours; the
  previous temperature-1 recipe's gains (+0.02..+0.06) were inside that swing.

Asserted margins: greedy pass@1 +0.05 and train reward +0.03 per seed: below every measured gain
(+0.07 / +0.04 at the least), 0.16 and 0.12 above the null control's changes, and failed by the
temperature-1 recipe's seed-1 gain (+0.02). Honest reading: every seed gains and the null control
loses, but single seeds vary (+0.07..+0.28), about as much as one checkpoint swing.
"""
import multiprocessing as mp
from concurrent.futures import ProcessPoolExecutor

import pytest

TASKS = "arithmetic,chain_sum"
SEEDS = (0, 1)


def heldout_eval(path: str) -> dict:
    from tinyseek.eval import evaluate
    from tinyseek.post.heldout import heldout_problems
    from tinyseek.tokenizer import byte_tokenizer
    from tinyseek.train.checkpoint import load_model
    model, _ = load_model(path)
    probs = list({p.prompt: p for p in heldout_problems(TASKS, 300, 0, 1)}.values())  # every distinct one
    assert len(probs) >= 90
    return evaluate(model, byte_tokenizer(), probs, k=8, n_samples=8, max_new_tokens=24, seed=0)


def sft_then_grpo(seed: int, root: str) -> dict:
    """One seed of the recipe (runs in a worker process)."""
    import torch

    from tinyseek.post import grpo, sft
    torch.set_num_threads(1)
    s = sft.main(sft.Config(out_dir=root, name=f"sft{seed}", tasks=TASKS, difficulty=1, n_examples=2000, epochs=5,
                            batch_size=32, lr=3e-3, seed=seed, log_every=100))
    g = grpo.main(grpo.Config(init=s["run_dir"], out_dir=root, name=f"grpo{seed}", tasks=TASKS, difficulty=1,
                              steps=150, prompts_per_step=32, group_size=8, max_new_tokens=24, temperature=0.3,
                              lr=2e-4, beta=0.04, mu=1, ema=0.95, eval_every=0, eval_problems=16, seed=seed,
                              plots=False))
    return {"grpo": g, "before": heldout_eval(s["run_dir"]), "after": heldout_eval(g["run_dir"])}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("post_e2e"))
    with ProcessPoolExecutor(len(SEEDS), mp_context=mp.get_context("spawn")) as ex:
        return dict(zip(SEEDS, ex.map(sft_then_grpo, SEEDS, [root] * len(SEEDS))))


@pytest.mark.parametrize("seed", SEEDS)
def test_sft_then_grpo_improves_reward_and_heldout_greedy_pass1(results, seed):
    r = results[seed]
    g, before, after = r["grpo"], r["before"], r["after"]
    print(f"seed {seed}: train reward {g['reward_first']:.3f} -> {g['reward_last']:.3f}; held-out greedy pass@1 "
          f"{before['pass@1']:.3f} -> {after['pass@1']:.3f}, pass@8 {before['pass@8']:.3f} -> {after['pass@8']:.3f}, "
          f"sampled {before['sampled_accuracy']:.3f} -> {after['sampled_accuracy']:.3f}")
    assert g["reward_last"] > g["reward_first"] + 0.03, g
    assert after["pass@1"] > before["pass@1"] + 0.05, (before, after)
