"""Worker for tests/test_dist_ckpt.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=W tests/dist_ckpt_worker.py OUT_DIR LAYOUT ...``
(gloo, CPU, fp32, one process group for every case; the layouts of :data:`SPECS` for W ranks).

``OUT_DIR/one3`` holds the one-process run after 3 of the 5 batches of :func:`batches` (written by the
test without a process group). For each layout L in turn (:data:`LAYOUTS`), every rank:

1. builds L from another seed (so the load has something to do) and loads ``one3`` into it, then
   saves it unchanged to ``OUT_DIR/L-loaded`` (the test compares it with ``one3``);
2. trains batches 3 and 4 (the losses: the test compares them with the one-process run's);
3. saves ``OUT_DIR/L-5``, builds L again from a third seed, loads ``L-5`` into it and records
   whether every local model and optimizer tensor (AdamW steps included) is bit-identical, then
   trains one more batch on both: the two losses must be equal.

Then the cross-layout loads of :data:`CROSS` (``X<-Y``: ``Y-5`` loaded into X, saved to
``OUT_DIR/X-from-Y``), and rank 0 alone reads the first layout's ``-5`` with ``load_full_model_state`` while the
process group is up (the others wait at a barrier). Rank r writes ``OUT_DIR/results.rank{r}.pt``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train import dist_ckpt, pp
from tinyseek.train.ep import apply_ep, expert_parameters, share_load
from tinyseek.train.mesh import ParallelSpec, build_mesh, ep_group, expert_dp_group
from tinyseek.train.tp import apply_tp

B, T, LR = 4, 16, 3e-3
SPECS = {"tp": ParallelSpec(tp=2), "ep": ParallelSpec(dp=2, ep=2), "pp": ParallelSpec(pp=2),
         "fsdp": ParallelSpec(dp_shard=2), "ddp": ParallelSpec(dp=2),
         # 4 ranks: experts replicated over 2 expert-data-parallel groups, FSDP2 and TP over 4
         "ep4": ParallelSpec(dp=4, ep=2), "fsdp4": ParallelSpec(dp_shard=4), "tp4": ParallelSpec(tp=4)}
CROSS = [("pp", "tp"), ("ep", "pp"), ("tp", "ep"), ("fsdp", "ep"),  # (load into, saved by)
         ("ep4", "tp4"), ("fsdp4", "ep4")]


def config():
    cfg = model_micro()  # MLA, a dense block then a MoE block (4 routed experts, 1 shared)
    cfg.bias_update_speed = 0.01
    return cfg


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1234)
    return [torch.randint(0, 256, (B, T + 1), generator=g) for _ in range(5)]


def one_step(model: Transformer, opt: torch.optim.Optimizer, batch: torch.Tensor) -> float:
    """One process's step on the whole batch (the reference every layout must follow)."""
    opt.zero_grad(set_to_none=True)
    out = model(batch[:, :-1], batch[:, 1:])
    out.loss.backward()
    model.update_expert_bias(out.expert_counts.float())
    opt.step()
    return out.loss.item()


@dataclass
class Run:
    """One layout on this rank: what is checkpointed (``model``, ``opt``) and its training step."""
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    spec: ParallelSpec
    step: Callable[[torch.Tensor], float]


def build(layout: str, seed: int) -> Run:
    """``layout`` set up as tinyseek/train/pretrain.py does, from a model drawn with ``seed``."""
    spec, rank, world = SPECS[layout], dist.get_rank(), dist.get_world_size()
    torch.manual_seed(seed)
    model = Transformer(config())
    mesh = build_mesh(spec, "cpu")
    if spec.pp > 1:  # the optimizer over the whole model, as pretrain builds it
        stage = pp.split_model(model, rank, 2)
        pipe = pp.build_schedule(stage, mesh, 1, "gpipe")
        opt = torch.optim.AdamW(model.parameters(), lr=LR)

        def step(batch):
            opt.zero_grad(set_to_none=True)
            out = pp.step(pipe, batch[:, :-1], batch[:, 1:])
            pipe.update_expert_bias(out["counts"])
            opt.step()
            return out["loss"].item()
        return Run(stage, opt, spec, step)
    if spec.tp > 1:  # every rank the whole batch
        apply_tp(model, mesh["tp"])
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        return Run(model, opt, spec, lambda batch: one_step(model, opt, batch))
    # data parallel: rank r trains its half of the batch, load statistics over the world
    experts: set[int] = set()
    edp = None
    if spec.ep > 1:
        apply_ep(model, ep_group(mesh, spec), load_group=dist.group.WORLD)
        edp = expert_dp_group(mesh, spec)  # None when ep == world
        experts = {id(p) for p in expert_parameters(model).values()}
    else:
        share_load(model, dist.group.WORLD)
    wrapped = model
    if spec.dp_shard > 1:
        for block in model.blocks:
            fully_shard(block, mesh=mesh["dp_shard"])
        fully_shard(model, mesh=mesh["dp_shard"], reshard_after_forward=False)
    elif spec.ep == 1:
        wrapped = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=LR)

    def step(batch):
        opt.zero_grad(set_to_none=True)
        mine = batch.chunk(world)[rank]
        out = wrapped(mine[:, :-1], mine[:, 1:])
        out.loss.backward()
        if spec.ep > 1:  # replicated parameters averaged as DDP would, experts over their replicas
            for p in model.parameters():
                group = edp if id(p) in experts else dist.group.WORLD
                if id(p) not in experts or edp is not None:
                    dist.all_reduce(p.grad, group=group)
                    p.grad /= dist.get_world_size(group)
        model.update_expert_bias(out.expert_counts.float())  # the whole batch's counts already
        opt.step()
        loss = out.loss.detach().clone()
        dist.all_reduce(loss)
        return (loss / world).item()
    return Run(wrapped, opt, spec, step)


def local_tensors(run: Run) -> dict[str, torch.Tensor]:
    """This rank's local model and optimizer tensors by name (shards as held)."""
    out = {}
    for k, v in run.model.state_dict().items():
        out[f"model.{k}"] = (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
    params = [p for g in run.opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        for k, v in run.opt.state.get(p, {}).items():
            out[f"optim.{i}.{k}"] = (v.to_local() if isinstance(v, DTensor) else v).detach().clone()
    return out


def layout_case(layout: str, out: Path, data: list[torch.Tensor]) -> dict:
    run = build(layout, seed=1)
    dist_ckpt.load(out / "one3", run.model, run.opt, run.spec)
    dist_ckpt.save(out / f"{layout}-loaded", run.model, run.opt, run.spec)
    losses = [run.step(b) for b in data[3:]]
    dist_ckpt.save(out / f"{layout}-5", run.model, run.opt, run.spec)
    again = build(layout, seed=2)
    dist_ckpt.load(out / f"{layout}-5", again.model, again.opt, again.spec)
    a, b = local_tensors(run), local_tensors(again)
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    n_state = sum(1 for k in a if k.startswith("optim."))
    return {"losses": losses, "roundtrip_equal": same, "n_optim_tensors": n_state,
            "next": (run.step(data[0]), again.step(data[0]))}


def main(out: Path, layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    data = batches()
    res: dict = {}
    for layout in layouts:
        res[layout] = layout_case(layout, out, data)
    for dst, src in CROSS:
        if dst in layouts and src in layouts:
            run = build(dst, seed=3)
            dist_ckpt.load(out / f"{src}-5", run.model, run.opt, run.spec)
            dist_ckpt.save(out / f"{dst}-from-{src}", run.model, run.opt, run.spec)
    if dist.get_rank() == 0:  # one rank alone, the group up: no collective
        res["full"] = dist_ckpt.load_full_model_state(out / f"{layouts[0]}-5", config())
    dist.barrier()
    torch.save(res, out / f"results.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
