"""Worker for tests/test_parallel_pp.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/pp_worker.py OUT_DIR SCHEDULE:MICROBATCHES[:noaux] ...``

For each configuration in turn (one launch, one process group) every rank builds the same
:func:`tiny_config` model (seed 0), takes its pipeline stage(s) (``interleaved1f1b`` runs two
virtual stages per rank) and trains ``STEPS`` AdamW steps on the global batches of
:func:`batches` (the same on every rank), with the aux-loss-free bias update from the stage's
counts. ``noaux`` leaves the non-last stages' balance-loss gradient out (the control that shows
the test can tell). Each rank writes ``OUT_DIR/<spec with - for :>.rank{r}.pt``: its losses, its
stages' state dict and the gradients of the first step. Rank 0 then writes the one-process
reference ``OUT_DIR/ref-<microbatches>.pt`` (``pretrain.forward_backward`` with ``accum`` =
micro-batches over the same micro-batches), for every micro-batch count used.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train import pp
from tinyseek.train.pretrain import forward_backward

STEPS, BATCH, SEQ, LR = 5, 4, 32, 3e-3


def tiny_config():
    """model_micro with 4 layers (1 dense, 3 MoE: both stages hold MoE layers) and a balance loss
    strong enough that leaving its gradient out changes the run visibly."""
    return dataclasses.replace(model_micro(), n_layers=4, n_dense_layers=1, aux_loss_alpha=0.1)


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    out = []
    for _ in range(STEPS):
        t = torch.randint(0, 256, (BATCH, SEQ + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def grads(named) -> dict[str, torch.Tensor]:
    return {k: p.grad.detach().clone() for k, p in named if p.grad is not None}


def run_pp(spec: str, rank: int, world: int) -> dict:
    schedule, n_mb, *flags = spec.split(":")
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    virtual = 2 if schedule == "interleaved1f1b" else 1
    stages = pp.split_stages(model, rank, world, virtual, aux_grad="noaux" not in flags)
    pipe = pp.build_schedule(stages, dist.group.WORLD, int(n_mb), schedule)
    opt = torch.optim.AdamW(list(pipe.parameters()), lr=LR, weight_decay=0.0)
    losses, first_grads = [], {}
    for s, (x, y) in enumerate(batches()):
        opt.zero_grad(set_to_none=True)
        out = pp.step(pipe, x, y)
        if s == 0:
            first_grads = {k: v for st in pipe.stages for k, v in grads(st.named_parameters()).items()}
        pipe.update_expert_bias(out["counts"])
        opt.step()
        losses.append([out["loss"].item(), out["ce_loss"].item(), out["aux_loss"].item()])
    return {"losses": losses, "state": pipe.state_dict(), "grads": first_grads}


def run_reference(n_mb: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, first_grads = [], {}
    for s, (x, y) in enumerate(batches()):
        opt.zero_grad(set_to_none=True)
        micro = iter(zip(x.chunk(n_mb), y.chunk(n_mb)))
        out = forward_backward(model, lambda: next(micro), n_mb)
        if s == 0:
            first_grads = grads(model.named_parameters())
        model.update_expert_bias(out["counts"])
        opt.step()
        losses.append([out["loss"].item(), out["ce_loss"].item(), out["aux_loss"].item()])
    return {"losses": losses, "state": model.state_dict(), "grads": first_grads}


def main(out_dir: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    for spec in specs:
        torch.save(run_pp(spec, rank, world), out / f"{spec.replace(':', '-')}.rank{rank}.pt")
    if rank == 0:
        for n_mb in sorted({int(s.split(":")[1]) for s in specs}):
            torch.save(run_reference(n_mb), out / f"ref-{n_mb}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
