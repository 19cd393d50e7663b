"""PPO (value head, GAE, rule rewards) against GRPO on the same task, SFT checkpoint, steps, batch and seeds.

Both start from one micro SFT checkpoint (benchmarks/micro_sft.py), see the same problems each step
(PPO draws GRPO's fixed-difficulty seeds), sample the same number of completions per step
(``--prompts`` x ``--samples``) at the same temperature and use the same rule reward
(accuracy 1.0 + format 0.1) and learning rate; GRPO's KL is k3 in the loss (beta 0.04), PPO's k1
in the reward (kl_coef 0.05). Printed per algorithm and seed: held-out greedy pass@1 before and
after (64 problems of the eval split), mean training reward over the last fifth of the steps, and
the wall time of the training loop (evals excluded). ``--rm PATH`` adds a PPO run rewarded by that
reward model alone.

    .venv/bin/python benchmarks/ppo_vs_grpo.py                       # ~5 minutes on 2 shared cores
    .venv/bin/python benchmarks/ppo_vs_grpo.py --steps 60 --seeds 0 1 2 --json out.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import tinyseek  # noqa: F401  (first: sets OMP_WAIT_POLICY=PASSIVE before torch loads libgomp, as the CLI does)
import torch

from micro_sft import TASKS, sft_checkpoint
from tinyseek.post import grpo, ppo


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="work dir (default: a temp dir); an SFT run there is reused")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--temperature", type=float, default=0.6)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--ema", type=float, default=0.0, help="weight average decay for both (0 = off)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--eval-problems", type=int, default=64)
    ap.add_argument("--sft", default="", help="start from this SFT run (default: the micro SFT run under --out)")
    ap.add_argument("--tasks", default=TASKS, help="task generators (comma list; the --sft run's tasks)")
    ap.add_argument("--algos", nargs="+", default=["grpo", "ppo (rule)"], help="which of grpo, 'ppo (rule)' to run")
    ap.add_argument("--rm", default="", help="also run PPO with --reward rm on this reward model")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share 2 cores)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="ppo_vs_grpo_"))
    sft_dir = args.sft or sft_checkpoint(out)
    common = dict(init=sft_dir, tasks=args.tasks, difficulty=1, steps=args.steps, prompts_per_step=args.prompts,
                  max_new_tokens=24, temperature=args.temperature, lr=args.lr, warmup_steps=args.warmup,
                  eval_every=0, eval_problems=args.eval_problems, ema=args.ema, plots=False, device="cpu",
                  out_dir=str(out))
    runs = {"grpo": lambda s: grpo.main(grpo.Config(**common, group_size=args.samples, beta=0.04, seed=s,
                                                    name=f"grpo_s{s}")),
            "ppo (rule)": lambda s: ppo.main(ppo.Config(**common, samples_per_prompt=args.samples, reward="rule",
                                                        seed=s, name=f"ppo_s{s}"))}
    runs = {k: v for k, v in runs.items() if k in args.algos}
    if args.rm:
        runs["ppo (rm)"] = lambda s: ppo.main(ppo.Config(**common, samples_per_prompt=args.samples, reward="rm",
                                                         rm=args.rm, seed=s, name=f"ppo_rm_s{s}"))
    rows = []
    for seed in args.seeds:
        for name, run in runs.items():
            t0 = time.time()
            r = run(seed)
            rows.append({"algo": name, "seed": seed, "pass1_start": r["eval_pass1_start"],
                         "pass1_end": r["eval_pass1_end"], "reward_last": r["reward_last"],
                         "accuracy_last": r["accuracy_last"], "train_s": r["elapsed_s"],
                         "total_s": round(time.time() - t0, 1),
                         **({"value_loss_first": r["value_loss_first"], "value_loss_last": r["value_loss_last"]}
                            if "value_loss_first" in r else {})})
    print(f"\n{'algorithm':<11} {'seed':>4} {'pass@1 start':>12} {'pass@1 end':>10} {'reward (last 1/5)':>17} "
          f"{'train acc':>9} {'train s':>8} {'value loss first->last':>22}")
    for r in rows:
        vl = f"{r['value_loss_first']:.3f} -> {r['value_loss_last']:.3f}" if "value_loss_first" in r else ""
        print(f"{r['algo']:<11} {r['seed']:>4} {r['pass1_start']:>12.3f} {r['pass1_end']:>10.3f} {r['reward_last']:>17.3f} "
              f"{r['accuracy_last']:>9.3f} {r['train_s']:>8.1f} {vl:>22}")
    for name in runs:
        rs = [r for r in rows if r["algo"] == name]
        print(f"{name:<11} mean {statistics.mean(r['pass1_start'] for r in rs):>12.3f} "
              f"{statistics.mean(r['pass1_end'] for r in rs):>10.3f} {statistics.mean(r['reward_last'] for r in rs):>17.3f} "
              f"{statistics.mean(r['accuracy_last'] for r in rs):>9.3f} {statistics.mean(r['train_s'] for r in rs):>8.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
