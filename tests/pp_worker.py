"""Worker for tests/test_parallel_pp.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=N tests/pp_worker.py OUT_DIR SCHEDULE:MICROBATCHES[:FLAG...] ...``

For each configuration in turn (one launch, one process group) every rank builds the same
:func:`tiny_config` model (seed 0), takes its pipeline stage(s) (``interleaved1f1b`` runs two
virtual stages per rank) and trains ``STEPS`` AdamW steps on the global batches of
:func:`batches` (the same on every rank), with the aux-loss-free bias update from the stage's
counts; the pipeline is the whole world (``pp`` = N). Flags: ``noaux`` leaves the non-last
stages' balance-loss gradient out (the control that shows the test can tell); ``clip`` clips the
gradient norm to ``CLIP`` (below the measured norms, so it acts) with ``Pipe.clip_grad_norm_``;
``mesh`` hands ``build_schedule`` the DeviceMesh of ``train/mesh.py`` (``--parallel pp=N``: dims
``pp, dp, dp_shard, tp``, the others of size 1) instead of the process group; ``dp2`` composes
with data parallelism: ``--parallel pp=N/2,dp=2``, FSDP2
(``fully_shard`` over ``"dp"``) on each block and each stage, each replica pipelining its half of
the global batch (rank = pp_rank * 2 + dp_rank; losses and expert counts reduced over ``"dp"``).
Each rank writes ``OUT_DIR/<spec with - for :>.rank{r}.pt``: its losses, its stages' state dict,
the gradients of the first step, the gradient norms and the held-out loss (``pp.evaluate``) of the
first batch after training. The ranks then write the one-process
reference ``OUT_DIR/ref-<microbatches>[-clip].pt`` (``pretrain.forward_backward`` with ``accum`` =
micro-batches over the same micro-batches, ``torch.nn.utils.clip_grad_norm_``) for each one used.
"""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train import pp
from tinyseek.train.mesh import build_mesh, parse_parallel
from tinyseek.train.pretrain import forward_backward

STEPS, BATCH, SEQ, LR, CLIP = 5, 4, 32, 3e-3, 0.5


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
    dp = 2 if "dp2" in flags else 1
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    virtual = 2 if schedule == "interleaved1f1b" else 1
    if dp > 1 or "mesh" in flags:  # the shared layout: train/mesh.py's spec, validation and mesh
        spec_ = parse_parallel(f"pp={world // dp},dp={dp}").validate(world, tiny_config())
        mesh = build_mesh(spec_, "cpu")
        pp_rank, dp_rank, group = mesh["pp"].get_local_rank(), mesh["dp"].get_local_rank(), mesh
    else:
        pp_rank, dp_rank, group = rank, 0, dist.group.WORLD
    stages = pp.split_stages(model, pp_rank, world // dp, virtual, aux_grad="noaux" not in flags)
    if dp > 1:  # FSDP2 over the data-parallel dim: each block, then the stage
        for st in stages:
            for block in st.blocks.values():
                fully_shard(block, mesh=mesh["dp"])
            fully_shard(st, mesh=mesh["dp"], reshard_after_forward=False)
    pipe = pp.build_schedule(stages, group, int(n_mb), schedule)
    opt = torch.optim.AdamW(list(pipe.parameters()), lr=LR, weight_decay=0.0)
    losses, norms, first_grads = [], [], {}
    for s, (x, y) in enumerate(batches()):
        opt.zero_grad(set_to_none=True)
        out = pp.step(pipe, x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank])  # this replica's rows
        if s == 0:
            first_grads = {k: full(v) for st in pipe.stages for k, v in grads(st.named_parameters()).items()}
        counts = out["counts"]
        if dp > 1:  # the global batch's loss and expert counts, as DDP runs reduce them
            for k in ("loss", "ce_loss", "aux_loss"):
                dist.all_reduce(out[k], group=mesh["dp"].get_group())
                out[k] /= dp
            for c in counts:
                if c is not None:
                    dist.all_reduce(c, group=mesh["dp"].get_group())
        pipe.update_expert_bias(counts)
        norms.append(pipe.clip_grad_norm_(CLIP if "clip" in flags else float("inf")).item())
        opt.step()
        losses.append([out["loss"].item(), out["ce_loss"].item(), out["aux_loss"].item()])
    x, y = batches()[0]
    val = pp.evaluate(pipe, x.chunk(dp)[dp_rank], y.chunk(dp)[dp_rank])
    if dp > 1:
        dist.all_reduce(val, group=mesh["dp"].get_group())
    val = val.item() / dp
    state = {k: full(v) for k, v in pipe.state_dict().items()}
    return {"losses": losses, "state": state, "grads": first_grads, "norms": norms, "val": val}


def full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (FSDP2 keeps sharded DTensors)."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def ref_name(spec: str) -> str:
    """The reference a spec compares with: its micro-batches over the whole global batch."""
    n_mb = int(spec.split(":")[1]) * (2 if ":dp2" in spec else 1)
    return f"ref-{n_mb}{'-clip' if ':clip' in spec else ''}"


def run_reference(n_mb: int, clip: bool) -> dict:
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.0)
    losses, norms, first_grads = [], [], {}
    for s, (x, y) in enumerate(batches()):
        opt.zero_grad(set_to_none=True)
        micro = iter(zip(x.chunk(n_mb), y.chunk(n_mb)))
        out = forward_backward(model, lambda: next(micro), n_mb)
        if s == 0:
            first_grads = grads(model.named_parameters())
        model.update_expert_bias(out["counts"])
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP if clip else float("inf")).item())
        opt.step()
        losses.append([out["loss"].item(), out["ce_loss"].item(), out["aux_loss"].item()])
    x, y = batches()[0]
    model.eval()
    with torch.no_grad():
        val = torch.stack([model(a, b).ce_loss for a, b in zip(x.chunk(n_mb), y.chunk(n_mb))]).mean().item()
    return {"losses": losses, "state": model.state_dict(), "grads": first_grads, "norms": norms, "val": val}


def main(out_dir: str, specs: list[str]) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    out = Path(out_dir)
    for spec in specs:
        torch.save(run_pp(spec, rank, world), out / f"{spec.replace(':', '-')}.rank{rank}.pt")
    for name in sorted({ref_name(s) for s in specs})[rank::world]:  # the references, shared out
        torch.save(run_reference(int(name.split("-")[1]), name.endswith("-clip")), out / f"{name}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
