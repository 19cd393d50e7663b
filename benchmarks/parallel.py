"""Parallel layouts on CPU ranks (gloo): tokens/s and bytes per step, measured next to the analytic model.

For each layout, ``tinyseek pretrain --preset micro --parallel <layout>`` runs under torchrun on the
same global batch (``--global-batch`` sequences a micro-step, ``--grad-accum`` micro-steps a step),
and one process runs the same batch as the baseline. From each run's metrics.jsonl: the median
``tokens_per_s`` of the steps after the probed one (the whole world's tokens), and the ``comm_probe``
of step 2 (:mod:`tinyseek.train.comm_meter`: every collective and P2P op of that step, the busiest
rank's bytes per parallel dimension and its serialized time). Printed next to each measured
dimension, :func:`tinyseek.train.comm_model.comm_bytes` for the same layout (``measured / model``
KiB; the model's ``dp`` term covers both the dp gradient all-reduce and the expert replicas'
``edp`` one). The probe also sees what the model leaves out (DDP's buffer broadcasts, the MoE
load-statistic and loss all-reduces: ``other`` and the small excess of ``dp``).

``--plan`` prints the scaling plan instead (computed, nothing runs): per-rank bytes per step and model-state
memory for gpu-small and a ~1B-parameter MoE on 8 and 64 GPUs.

    python benchmarks/parallel.py --steps 6              # 2 ranks
    python benchmarks/parallel.py --steps 6 --ranks 4    # 4 ranks (slow on 2 cores)
    python benchmarks/parallel.py --plan
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from tinyseek.config import ModelConfig, model_gpu_small, model_micro
from tinyseek.data.shards import write_shards
from tinyseek.train.comm_meter import DIMS_REPORTED
from tinyseek.train.comm_model import comm_bytes, param_counts, state_bytes_per_rank
from tinyseek.train.mesh import parse_parallel

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = {2: ["dp=2", "dp_shard=2", "tp=2", "pp=2", "dp=2,ep=2", "dp_shard=2,ep=2"],
           4: ["dp=4", "tp=4", "dp=4,ep=4", "dp=2,tp=2", "pp=2,dp=2", "dp=4,ep=2", "dp=2,dp_shard=2",
               "pp=2,tp=2", "pp=2,dp=2,ep=2", "dp=2,tp=2,ep=2"]}


def model_1b_moe() -> ModelConfig:
    """A ~1B-parameter DeepSeek-V3-style MoE (~0.2B active) for the scaling plan (computed only)."""
    return replace(model_gpu_small(), vocab_size=32768, d_model=1024, n_layers=16, n_heads=16, max_seq_len=4096,
                   q_lora_rank=512, kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64,
                   d_ff=4096, n_dense_layers=1, n_routed_experts=40, n_shared_experts=1, moe_d_ff=512, top_k=6,
                   n_groups=8, topk_groups=3)


def run(layout: str, ranks: int, args, data: Path, out: Path) -> dict:
    spec = parse_parallel(layout) if layout else None
    micro = args.global_batch // (spec.dp_world if spec else 1)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    name = layout.replace(",", "_").replace("=", "") or "one"
    flags = ["pretrain", "--preset", "micro", "--steps", str(args.steps), "--batch-size", str(micro),
             "--grad-accum", str(args.grad_accum), "--log-every", "1", "--eval-every", "0", "--eval-batches", "1",
             "--ckpt-every", "0", "--progress", "false", "--data", str(data), "--run-dir", str(out / name)]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}",
               "-m", "tinyseek", *flags, "--parallel", layout] if layout else [sys.executable, "-m", "tinyseek", *flags])
    proc = subprocess.run(launch, cwd=out, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"{layout or 'one process'} failed:\n{proc.stderr[-3000:]}")
    recs = [json.loads(line) for line in (out / name / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "tokens_per_s" in r and r["step"] > 2]  # after the probed step 2
    probe = next((r for r in recs if r.get("event") == "comm_probe"), {})
    measured = {d: probe.get(f"comm/{d}/bytes", 0) for d in DIMS_REPORTED}
    cfg = replace(model_micro(), vocab_size=257)  # the shards' vocabulary
    model = comm_bytes(cfg, spec, micro, args.seq_len, args.grad_accum) if spec else None
    return {"layout": layout or "one process", "ranks": ranks if layout else 1,
            "tok_s": statistics.median(r["tokens_per_s"] for r in steps), "measured": measured, "model": model,
            "comm_s": sum(probe.get(f"comm/{d}/time_s", 0) for d in DIMS_REPORTED),
            "probe_s": probe.get("step_time_s", 0)}


def bench(args) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        rng = random.Random(0)
        docs = [[rng.randrange(256) for _ in range(rng.randrange(200, 2000))] for _ in range(60)]
        write_shards(docs, out / "train", 257, 256)
        base = run("", 1, args, out / "train", out)
        rows = [run(layout, args.ranks, args, out / "train", out) for layout in LAYOUTS[args.ranks]]
    print(f"global batch {args.global_batch} x {args.grad_accum} micro-steps x seq 64; {args.steps} steps, "
          f"median tokens/s of steps 3..{args.steps}; probed step 2: bytes per step of the busiest rank, "
          "measured / model (KiB), and its serialized communication time")
    print("| layout | ranks | tokens/s | vs 1 process | dp (+edp) | dp_shard | tp | ep | pp | other "
          "| comm time / probe step (ms) |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| one process | 1 | {base['tok_s']:,.0f} | 1.00x | - | - | - | - | - | - | - |")
    kib = lambda b: f"{b / 1024:,.1f}"  # noqa: E731
    for r in rows:
        me, mo = r["measured"], r["model"]
        cells = [f"{kib(me['dp'] + me['edp'])} / {kib(mo['dp'])}"]
        cells += [f"{kib(me[d])} / {kib(mo[d])}" if me[d] or mo[d] else "0" for d in ("dp_shard", "tp", "ep", "pp")]
        print(f"| {r['layout']} | {r['ranks']} | {r['tok_s']:,.0f} | {r['tok_s'] / base['tok_s']:.2f}x | "
              + " | ".join(cells) + f" | {kib(me['other'])} | {r['comm_s'] * 1e3:.1f} / {r['probe_s'] * 1e3:.1f} |")


PLAN = [  # (model, GPUs, layout, per-rank micro-batch, seq_len, grad_accum)
    ("gpu-small", 8, "dp=8", 16, 1024, 1),
    ("gpu-small", 64, "dp=8,dp_shard=8,ep=8", 2, 1024, 1),
    ("moe-1b", 8, "dp_shard=8,ep=8", 4, 4096, 4),
    ("moe-1b", 64, "dp=8,dp_shard=8,ep=8", 4, 4096, 1),
]


def plan() -> None:
    models = {"gpu-small": model_gpu_small(), "moe-1b": model_1b_moe()}
    for name, cfg in models.items():
        pc = param_counts(cfg)
        print(f"{name}: {pc.total / 1e6:,.0f}M params ({sum(pc.experts) / 1e6:,.0f}M in routed experts)")
    print("| model | GPUs | layout | tokens/step | bytes/step/GPU dp / dp_shard / ep (MiB) | total (MiB) "
          "| model states/GPU (GiB) |")
    print("|---|---|---|---|---|---|---|")
    for name, gpus, layout, micro, seq, accum in PLAN:
        cfg, spec = models[name], parse_parallel(layout)
        assert spec.world_size == gpus, (layout, gpus)
        b = comm_bytes(cfg, spec, micro, seq, accum, act_bytes=2, param_bytes=4, grad_bytes=4)
        mib = lambda x: f"{x / 2**20:,.0f}"  # noqa: E731
        print(f"| {name} | {gpus} | {layout} | {micro * seq * accum * spec.dp_world:,} | {mib(b['dp'])} / "
              f"{mib(b['dp_shard'])} / {mib(b['ep'])} | {mib(b['total'])} | "
              f"{state_bytes_per_rank(cfg, spec) / 2**30:.2f} |")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--ranks", type=int, default=2, choices=(2, 4))
    ap.add_argument("--global-batch", type=int, default=8, help="sequences per micro-step, all ranks together")
    ap.add_argument("--grad-accum", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64, help="the micro preset's (not passed to pretrain)")
    ap.add_argument("--plan", action="store_true", help="print the computed scaling plan and exit")
    a = ap.parse_args()
    plan() if a.plan else bench(a)
