"""Worker for tests/test_comm_meter.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/comm_meter_worker.py OUT_DIR LAYOUT ...``
(gloo, CPU, fp32). For each layout in turn (one launch, one process group), every rank builds the
micro model (seed 0) laid out as ``--parallel LAYOUT`` says, the way the pretrain wiring does
(train/mesh.py's 4-D mesh and groups; DDP over ``mesh["dp"]`` with expert parameters left out under
ep; ``apply_tp`` over ``mesh["tp"]``; ``apply_ep`` with the dp group as load group; a 1F1B pipeline
of ``MICRO`` micro-batches over ``mesh["pp"]``), runs one unmetered forward + backward (DDP's bucket
build, the pipeline's shape inference), then one under :class:`tinyseek.train.comm_meter.CommMeter`
with :func:`dim_groups`' map. Writes ``OUT_DIR/<layout>.rank<r>.pt``: ``by_dim``, the records (as
dicts), the unknown ops, and for ep the metered step's ``ExpertParallel.bytes_sent`` summed over the
MoE layers. Layout ``overhead`` (optional, not in the test): wall time of metered vs unmetered DDP
steps (forward + backward), ``REPS`` each, alternated.
"""
from __future__ import annotations

import dataclasses
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train import distributed as D
from tinyseek.train import mesh as M
from tinyseek.train import pp as PP
from tinyseek.train.comm_meter import CommMeter, dim_groups
from tinyseek.train.ep import apply_ep, expert_parameters
from tinyseek.train.tp import apply_tp

B, T, MICRO, REPS = 2, 64, 2, 20  # per-rank batch, sequence, pipeline micro-batches, overhead repetitions


def config():
    return model_micro()  # 2 layers: 1 dense + 1 MoE (4 routed experts, top-2, one shared)


def batch(rows: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    t = torch.randint(0, config().vocab_size, (rows, T + 1), generator=g)
    return t[:, :-1], t[:, 1:]


def setup(layout: str):
    """``(step function, {dimension: group}, MoE load scopes)`` of ``layout`` on this rank."""
    spec = M.parse_parallel(layout).validate(dist.get_world_size(), config())
    mesh = M.build_mesh(spec, "cpu")
    dp_group = M.dp_group(mesh, spec)
    ep_group, edp_group = M.ep_group(mesh, spec), M.expert_dp_group(mesh, spec)
    groups = dim_groups(mesh, spec, {"dp": dp_group, "ep": ep_group, "edp": edp_group})
    rank = dist.get_rank()
    torch.manual_seed(0)
    model = Transformer(config()).train()
    if spec.pp > 1:
        pp_rank = mesh["pp"].get_local_rank()
        pipe = PP.build_schedule(PP.split_stages(model, pp_rank, spec.pp), mesh, MICRO, "1f1b")
        x, y = batch(B * MICRO, 1)  # the pipeline's whole batch, on both stages

        def step():
            PP.step(pipe, x, y)
        return step, groups, []
    if spec.tp > 1:
        apply_tp(model, mesh["tp"])
    experts = {}
    if spec.ep > 1:
        apply_ep(model, ep_group, load_group=dp_group)
        experts = expert_parameters(model)
    wrapped = model
    if spec.dp > 1:
        d = D.Dist(rank=rank, local_rank=rank, world_size=dist.get_world_size(), is_main=rank == 0, backend="gloo")
        wrapped, _ = D.wrap_model(model, d, "ddp", dp_mesh=mesh["dp"], local_params=tuple(experts))
    x, y = batch(B, 1 + spec.dp_rank(rank))  # this replica's rows

    def step():
        wrapped(x, y).loss.backward()
    return step, groups, [m.load_scope for m in model.moe_layers]


def run(layout: str) -> dict:
    step, groups, scopes = setup(layout)
    step()  # warm-up: DDP's buckets, the pipeline's shape inference
    for sc in scopes:
        if hasattr(sc, "bytes_sent"):
            sc.bytes_sent = 0
    with CommMeter(groups) as meter:
        step()
    return {"by_dim": meter.by_dim(), "records": [dataclasses.asdict(r) for r in meter.records],
            "unknown": dict(meter.unknown), "groups": groups,
            "ep_bytes_sent": sum(getattr(sc, "bytes_sent", 0) for sc in scopes)}


def overhead() -> dict:
    """Wall time of metered and unmetered DDP (dp=2) forward + backward steps, alternated."""
    step, groups, _ = setup("dp=2")
    step()
    plain, metered = [], []
    for _ in range(REPS):
        dist.barrier()
        t0 = time.perf_counter()
        step()
        plain.append(time.perf_counter() - t0)
        dist.barrier()
        t0 = time.perf_counter()
        with CommMeter(groups) as meter:
            step()
        metered.append(time.perf_counter() - t0)
    return {"plain": plain, "metered": metered, "by_dim": meter.by_dim()}


def main(out_dir: Path, layouts: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for layout in layouts:
        res = overhead() if layout == "overhead" else run(layout)
        torch.save(res, out_dir / f"{layout}.rank{dist.get_rank()}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
