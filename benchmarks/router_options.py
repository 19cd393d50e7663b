"""Router balancing and regularisation side by side: the same short pretraining run (same data, seed,
steps) with no balancing, the switch balance loss, the aux-loss-free bias, the routing-entropy term,
and load-aware routing; final train loss, held-out loss, max/mean expert load and routing entropy.

    .venv/bin/python benchmarks/router_options.py                      # cpu-tiny, 150 steps, 5 runs
    .venv/bin/python benchmarks/router_options.py --preset micro --steps 60 --variants none,entropy

The load and the entropy are measured on the final checkpoint in eval mode (the routing the model
serves with: the final bias / load counter) over the first ``--eval-batches`` held-out batches:
``load max/mean`` = the busiest expert's assignments over the mean, worst MoE layer (and the mean over
layers); ``entropy`` = :func:`tinyseek.model.moe.routing_entropy` (per token, normalized by ln N; 1 =
uniform affinities), mean over layers. ``train load`` is the trainer's last logged window
(``load_max_mean_worst``), measured while training. Each variant switches off what the others use:
only its own balancing runs. Not a unit test.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from tinyseek.data.loader import ShardLoader
from tinyseek.model.moe import Router, routing_entropy
from tinyseek.quant.load import load_model
from tinyseek.train import pretrain

OFF = {"aux_loss": "none", "bias_update_speed": 0.0, "router_entropy_coef": 0.0, "router_load_aware": 0.0}
VARIANTS = {  # name -> model overrides on top of OFF
    "none": {},
    "aux_loss": {"aux_loss": "switch", "aux_loss_alpha": 0.01},
    "aux_free_bias": {"bias_update_speed": 0.001},
    "entropy": {"router_entropy_coef": 0.1},
    "load_aware": {"router_load_aware": 0.1},
}


def routing_stats(run_dir: Path, val: Path, batches: int, batch_size: int, seq_len: int) -> dict:
    """Max/mean assignment load and routing entropy of the final checkpoint on held-out batches."""
    model, _ = load_model(run_dir)
    seen: dict[int, list] = {}
    routers = [m.router for m in model.moe_layers]

    def hook(mod: Router, _inp, out):
        idx_NK, _, scores_NE = out
        n = mod.cfg.n_routed_experts
        seen.setdefault(id(mod), []).append((torch.bincount(idx_NK.flatten(), minlength=n).double(),
                                             float(routing_entropy(scores_NE, mod.cfg.score_func == "softmax")),
                                             scores_NE.shape[0]))

    handles = [r.register_forward_hook(hook) for r in routers]
    loader = ShardLoader(val, batch_size, seq_len, 0, 1, "cpu", shuffle=False)
    with torch.no_grad():
        for _ in range(batches):
            x, _ = loader.next_batch()
            model(x)
    for h in handles:
        h.remove()
    ratios, ents = [], []
    for r in routers:
        rows = seen[id(r)]
        counts = sum(c for c, _, _ in rows)
        ratios.append(float(counts.max() / counts.mean()))
        ents.append(sum(e * n for _, e, n in rows) / sum(n for _, _, n in rows))
    return {"load_max_mean_worst": max(ratios), "load_max_mean_avg": sum(ratios) / len(ratios),
            "entropy": sum(ents) / len(ents)}


def run_variant(name: str, args, data: Path, out: Path) -> dict:
    cfg = pretrain.preset(args.preset)
    cfg.steps, cfg.seed, cfg.progress, cfg.peak_flops = args.steps, args.seed, False, 1e11  # no GEMM probe
    cfg.eval_every, cfg.ckpt_every, cfg.log_every = 0, 0, min(cfg.log_every, args.steps)
    cfg.data, cfg.val_data = str(data / "train"), str(data / "val")
    cfg.run_dir, cfg.name = str(out / name), name
    for k, v in {**OFF, **VARIANTS[name]}.items():
        setattr(cfg.model, k, v)
    t0 = time.perf_counter()
    res = pretrain.main(cfg)
    secs = time.perf_counter() - t0
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    train_load = [r["load_max_mean_worst"] for r in recs if "load_max_mean_worst" in r][-1]
    st = routing_stats(out / name, data / "val", args.eval_batches, cfg.batch_size, cfg.seq_len)
    return {"variant": name, "loss": res["loss"], "val_loss": res["val_loss"], "train_load": train_load, **st,
            "seconds": secs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="cpu-tiny", choices=["micro", "cpu-tiny"])
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--eval-batches", type=int, default=8)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default="", help="folder for the runs (default: a temporary one)")
    args = ap.parse_args()
    names = [v for v in args.variants.split(",") if v]
    bad = [v for v in names if v not in VARIANTS]
    if bad:
        sys.exit(f"router_options: unknown variant(s) {bad}; choose from {list(VARIANTS)}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        data = out / "data"
        if not (data / "val" / "index.json").is_file():
            pretrain.build_byte_shards(data)
        rows = [run_variant(n, args, data, out) for n in names]
    print(f"\n{time.strftime('%Y-%m-%d %H:%M')} | load average {os.getloadavg()[0]:.1f} | {platform.node()} | torch {torch.__version__} | threads {torch.get_num_threads()} | "
          f"preset {args.preset}, {args.steps} steps, seed {args.seed}")
    print("| variant | final loss | held-out loss | load max/mean (worst layer) | (mean of layers) "
          "| train load max/mean | routing entropy | s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['loss']:.4f} | {r['val_loss']:.4f} | {r['load_max_mean_worst']:.3f} | "
              f"{r['load_max_mean_avg']:.3f} | {r['train_load']:.3f} | {r['entropy']:.4f} | {r['seconds']:.0f} |")


if __name__ == "__main__":
    main()
