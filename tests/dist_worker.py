"""Worker for tests/test_distributed.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/dist_worker.py OUT_DIR MODE:COMPRESSION[:FLAG...] ...``
Flags: ``ckpt`` turns on per-block activation checkpointing; ``nan`` poisons rank 0's loss at
step 4 (the step is skipped, as the trainer does); ``resume`` stops two steps before
the end, takes the model, optimizer and compression-hook state through the checkpoint helpers, rebuilds everything
from them and finishes the run.

For each configuration in turn (one launch, one process group, so the suite pays the process
start-up once) it trains a fresh ``model_micro`` for a few steps on a fixed random batch per rank
(different data on each rank, so gradients really need syncing), with 2 grad-accumulation
micro-steps (the first under ``no_sync``) and the aux-free expert bias updated from all-reduced
counts. Each rank writes ``OUT_DIR/<spec with - for :>.rank{r}.pt`` with its final parameters,
its loss curve and the per-step communication stats.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train import distributed as D


def build(dist: D.Dist, mode: str, compression: str, ckpt: bool, state: dict | None = None):
    torch.manual_seed(0)  # same init on every rank (DDP broadcasts anyway; FSDP2 does not)
    model = Transformer(model_micro()).to(dist.device)
    model.grad_checkpointing = ckpt
    if state is not None:
        model.load_state_dict(state["model"])  # weights go in before wrapping
    wrapped, stats = D.wrap_model(model, dist, mode=mode, compression=compression, powersgd_rank=2)
    opt = torch.optim.AdamW(wrapped.parameters(), lr=3e-3, weight_decay=0.0)
    if state is not None:
        D.load_optim_state_dict(wrapped, opt, state["optim"], mode)
        D.load_comm_state_dict(wrapped, state["comm"])
    return wrapped, stats, opt


def step(dist, wrapped, opt, mode, micro, poison: bool = False) -> float:
    opt.zero_grad(set_to_none=True)
    counts, total = None, 0.0
    for i, batch in enumerate(micro):
        ctx = D.no_sync(wrapped, mode) if i < len(micro) - 1 else torch.enable_grad()
        with ctx:
            out = wrapped(batch[:, :-1], batch[:, 1:])
            loss = out.loss / len(micro)
            if poison and i == 0:
                loss = loss * float("nan")  # a bad batch on rank 0 only
            loss.backward()
        total += loss.item()
        c = out.expert_counts.detach().float()
        counts = c if counts is None else counts + c
    total_t = D.all_reduce_mean_(torch.tensor([total]), dist)
    if not torch.isfinite(total_t).all():  # skip the step like the trainer does
        opt.zero_grad(set_to_none=True)
        return float("nan")
    D.all_reduce_sum_(counts, dist)
    D.unwrap(wrapped).update_expert_bias(counts)
    opt.step()
    return total_t.item()


def train(dist: D.Dist, mode: str, compression: str, steps: int, flags: list[str]) -> dict:
    ckpt = "ckpt" in flags
    wrapped, stats, opt = build(dist, mode, compression, ckpt)
    g = torch.Generator().manual_seed(1234 + dist.rank)
    micro = [torch.randint(0, 256, (4, 33), generator=g) for _ in range(2)]
    losses, comm, extra = [], [], {}
    for s in range(steps):
        if "resume" in flags and s == steps - 2:
            state = {"model": D.full_state_dict(wrapped), "optim": D.optim_state_dict(wrapped, opt, mode),
                     "comm": D.comm_state_dict(wrapped)}
            extra["optim_state_keys"] = sorted(state["optim"]["state"])
            extra["optim_n_params"] = [len(gr["params"]) for gr in state["optim"]["param_groups"]]
            wrapped, stats, opt = build(dist, mode, compression, ckpt, state)
        poison = "nan" in flags and s == 3 and dist.rank == 0
        losses.append(step(dist, wrapped, opt, mode, micro, poison))
        comm.append(stats.take())
    params = {k: v.detach().clone() for k, v in D.full_state_dict(wrapped).items()}
    return {"params": params, "losses": losses, "comm": comm, "rank": dist.rank,
            "world": dist.world_size, **extra}


def main(out_dir: str, configs: list[str], steps: int = 8) -> None:
    dist = D.init_distributed("cpu")
    try:
        for spec in configs:
            mode, compression, *flags = spec.split(":")
            res = train(dist, mode, compression, steps, flags)
            torch.save(res, Path(out_dir) / f"{spec.replace(':', '-')}.rank{dist.rank}.pt")
            D.barrier(dist)
    finally:
        D.cleanup(dist)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
