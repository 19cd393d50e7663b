"""Reward-model pair accuracy vs the share of labelled pairs (the recipe's "one fifth" claim).

From one micro SFT checkpoint (benchmarks/micro_sft.py), build (correct, incorrect) pairs once from
graded samples of held-out-free training problems (``tinyseek rm``'s own builder: ``--k`` samples a
problem, up to ``--pairs-per-problem`` pairs each), then train a reward model on 100%, 50% and 20% of
the training pairs (the smaller sets are prefixes of the larger, the held-out pairs, whose prompts no
run trains on, the same for all) and print held-out pair accuracy per fraction and seed.

    .venv/bin/python benchmarks/reward_model.py                        # ~4 minutes on 2 shared cores
    .venv/bin/python benchmarks/reward_model.py --seeds 0 1 2 --n-problems 3072 --json out.json
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
from tinyseek.post import common as C
from tinyseek.post import reward_model as R
from tinyseek.post.rejection import write_jsonl


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="", help="work dir (default: a temp dir); an SFT run there is reused")
    ap.add_argument("--n-problems", type=int, default=1536)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--pairs-per-problem", type=int, default=2)
    ap.add_argument("--fractions", type=float, nargs="+", default=[1.0, 0.5, 0.2])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--lr", type=float, default=3e-4)
    ap.add_argument("--sft", default="", help="start from this SFT run (default: the micro SFT run under --out)")
    ap.add_argument("--tasks", default=TASKS, help="task generators (comma list; the --sft run's tasks)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (1 when two runs share 2 cores)")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = Path(args.out or tempfile.mkdtemp(prefix="rm_bench_"))
    t0 = time.time()
    sft_dir = args.sft or sft_checkpoint(out)
    cfg = R.Config(init=sft_dir, tasks=args.tasks, n_problems=args.n_problems, k=args.k, temperature=1.0,
                   pairs_per_problem=args.pairs_per_problem, max_new_tokens=24, seed=3)
    if (out / "pairs.jsonl").is_file():  # a rerun with other fractions / seeds reuses the labelled pairs
        pairs = R.load_pairs(str(out / "pairs.jsonl"))
    else:
        _, tok, model = C.load_sampling_model(sft_dir, "", cfg.seed, "cpu")
        pairs = R.build_pairs(model, tok, cfg)
        write_jsonl(out / "pairs.jsonl", pairs)
    print(f"{len(pairs)} pairs from {args.n_problems} problems x {args.k} samples ({time.time() - t0:.0f} s so far)")
    rows = []
    for seed in args.seeds:
        for frac in args.fractions:
            res = R.main(R.Config(init=sft_dir, pairs=str(out / "pairs.jsonl"), label_fraction=frac,
                                  heldout_fraction=0.25, epochs=args.epochs, lr=args.lr, batch_size=16, seed=seed,
                                  out_dir=str(out), name=f"rm_f{frac}_s{seed}", device="cpu"))
            rows.append({"fraction": frac, "seed": seed, "train_pairs": res["n_train_pairs"],
                         "heldout_pairs": res["n_heldout_pairs"], "acc_start": res["heldout_acc_start"],
                         "acc": res["heldout_acc"], "train_s": res["elapsed_s"]})
    print(f"\n{'labelled':>9} {'train pairs':>11} {'held-out':>8} " + " ".join(f"{'seed ' + str(s):>8}" for s in args.seeds)
          + f" {'mean':>6} {'untrained':>9}")
    for frac in args.fractions:
        rs = [r for r in rows if r["fraction"] == frac]
        accs = [r["acc"] for r in rs]
        print(f"{frac:>8.0%} {rs[0]['train_pairs']:>11} {rs[0]['heldout_pairs']:>8} "
              + " ".join(f"{a:>8.3f}" for a in accs)
              + f" {statistics.mean(accs):>6.3f} {statistics.mean(r['acc_start'] for r in rs):>9.3f}")
    print(f"(held-out pairs depend on the seed: each seed shuffles the prompts; total {time.time() - t0:.0f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"pairs": len(pairs), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
