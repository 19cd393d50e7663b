"""Worker for tests/test_parallel_ep.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=W tests/ep_worker.py OUT_DIR EP CASE ...``

The layout is ``--parallel dp=W,ep=EP`` (tinyseek/train/mesh.py's groups). For each case, on every
rank: one process trains the whole global batch (the reference), then the expert-parallel model
(tinyseek/train/ep.py) trains rank r's 1/W of it (its rows), both for 5 AdamW steps from the same
initial parameters, with the aux-loss-free bias updated from the step's counts before the optimizer
step. Gradients are reduced explicitly as the pretrain wiring must (ep.py's docstring): replicated
parameters' averaged over the data-parallel group (what DDP would do), the experts' over the
expert-data-parallel group (the ranks holding the same experts; none when EP == W); the load
statistics span the data-parallel group (the world). Case ``NAME:dp``: the same without expert
parallelism, plain data parallelism with the load shared (ep.share_load). Writes
``OUT_DIR/<case>.rank<r>.pt``: the losses, per-step expert counts and drops, the final parameters
(expert shards gathered) of both runs, and the logits of an evaluation forward (no gradient) of the
last batch (this rank's rows under EP), the experts each training forward's router chose, and the
bytes each EP layer's all-to-alls sent per step. Case ``bad``: the error of an ep that does not divide the
experts.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tinyseek.config import ConfigError, model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train.ep import apply_ep, expert_parameters, full_state_dict, share_load
from tinyseek.train.mesh import ParallelSpec, build_mesh, ep_group

B, T, STEPS = 8, 16, 5


def config(case: str):
    cfg = model_micro()  # 4 routed experts, top-2, one shared expert
    cfg.n_layers = 3  # a dense layer, then two MoE layers
    cfg.bias_update_speed = 0.01
    if case == "switch_cap":  # sigmoid router, switch loss, capacity drops
        cfg.aux_loss, cfg.aux_loss_alpha, cfg.capacity_factor = "switch", 0.05, 1.0
    elif case == "variance_softmax":  # softmax router, variance loss, dropless
        cfg.aux_loss, cfg.aux_loss_alpha, cfg.score_func = "variance", 0.5, "softmax"
    return cfg


def groups(spec: ParallelSpec):
    """(this rank's EP group, its expert-data-parallel group or None): every rank creates all groups."""
    group = ep_group(build_mesh(spec, "cpu"), spec)
    mine = None
    eps = spec.ep_groups()  # dp only here: blocks of ep consecutive ranks
    for ranks in ([g[i] for g in eps] for i in range(spec.ep)):
        pg = dist.new_group(ranks) if len(ranks) > 1 else None
        if dist.get_rank() in ranks:
            mine = pg
    return group, mine


def train(model, batches, ep: bool, edp=None) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-5)
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = {id(p) for p in expert_parameters(model).values()}
    res = {"losses": [], "counts": [], "dropped": [], "routes": [], "bytes_sent": []}
    for m in model.moe_layers:  # every training forward's expert choices (idx_NK), layer by layer
        m.router.register_forward_hook(lambda mod, args, out: res["routes"].append(out[0].clone()))
    for batch in batches:
        if ep:
            batch = batch.chunk(world)[rank]  # this rank's share of the global batch
        opt.zero_grad(set_to_none=True)
        out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        loss = out.loss.detach().clone()
        if ep:
            for p in model.parameters():  # replicated: mean over the ranks, as DDP would
                if id(p) not in experts:
                    dist.all_reduce(p.grad)
                    p.grad /= world
                elif edp is not None:  # experts (already scaled by 1/ep): mean over their replicas
                    dist.all_reduce(p.grad, group=edp)
                    p.grad /= dist.get_world_size(edp)
            dist.all_reduce(loss)
            loss /= world
        model.update_expert_bias(out.expert_counts.float())  # already the whole batch's under EP
        opt.step()
        res["losses"].append(loss.item())
        res["counts"].append(out.expert_counts.clone())
        res["dropped"].append(out.dropped.clone())
        scopes = [m.load_scope for m in model.moe_layers]
        res["bytes_sent"].append([getattr(sc, "bytes_sent", 0) for sc in scopes])
        for sc in scopes:
            if hasattr(sc, "bytes_sent"):
                sc.bytes_sent = 0
    res["params"] = full_state_dict(model) if ep else model.state_dict()
    model.eval()
    with torch.no_grad():  # evaluation: no gradient, every rank of the group runs it
        res["eval_logits"] = model(batch[:, :-1]).logits
    return res


def run_case(case: str, group, edp) -> dict:
    name, _, mode = case.partition(":")
    cfg = config(name)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    if mode == "dp":
        model = share_load(copy.deepcopy(ref), dist.group.WORLD)
    else:
        model = apply_ep(copy.deepcopy(ref), group, load_group=dist.group.WORLD)
    torch.manual_seed(1)
    batches = [torch.randint(cfg.vocab_size, (B, T + 1)) for _ in range(STEPS)]  # the same on every rank
    return {"ref": train(ref, batches, ep=False), "ep": train(model, batches, ep=True, edp=edp),
            "impl": [m.impl for m in model.moe_layers], "n_local": [m.experts.n_experts for m in model.moe_layers]}


def bad(group) -> dict:
    cfg = model_micro()
    cfg.n_routed_experts = 3
    try:
        apply_ep(Transformer(cfg), group)
        return {"error": None}
    except ConfigError as e:
        return {"error": str(e)}


def main(out_dir: Path, ep: int, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    group, edp = groups(ParallelSpec(dp=dist.get_world_size(), ep=ep))
    for case in cases:
        res = bad(group) if case == "bad" else run_case(case, group, edp)
        torch.save(res, out_dir / f"{case}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3:])
