"""Worker for tests/test_parallel_ep.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/ep_worker.py OUT_DIR CASE ...``

For each case, on every rank: one process trains the whole global batch (the reference), then the
expert-parallel model (tinyseek/train/ep.py, the EP group = the world) trains rank r's half of it
(rows r*B/2 .. (r+1)*B/2), both for 5 AdamW steps from the same initial parameters, with the
aux-loss-free bias updated from the step's counts before the optimizer step. Replicated parameters'
gradients are averaged over the ranks explicitly (what DDP would do); the experts' are not (one copy
each). Writes ``OUT_DIR/<case>.rank<r>.pt``: the losses, per-step expert counts and drops, the final
parameters (expert shards gathered) of both runs. Case ``bad``: the error of an ep that does not
divide the experts.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from tinyseek.config import ConfigError, model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train.ep import apply_ep, expert_parameters, full_state_dict

B, T, STEPS = 4, 32, 5


def config(case: str):
    cfg = model_micro()  # 4 routed experts, top-2, one shared expert
    cfg.n_layers = 3  # a dense layer, then two MoE layers
    cfg.bias_update_speed = 0.01
    if case == "switch_cap":  # sigmoid router, switch loss, capacity drops
        cfg.aux_loss, cfg.aux_loss_alpha, cfg.capacity_factor = "switch", 0.05, 1.0
    elif case == "variance_softmax":  # softmax router, variance loss, dropless
        cfg.aux_loss, cfg.aux_loss_alpha, cfg.score_func = "variance", 0.5, "softmax"
    return cfg


def train(model, batches, ep: bool) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1, eps=1e-5)
    world, rank = dist.get_world_size(), dist.get_rank()
    experts = {id(p) for p in expert_parameters(model).values()}
    res = {"losses": [], "counts": [], "dropped": []}
    for batch in batches:
        if ep:
            batch = batch.chunk(world)[rank]  # this rank's half of the global batch
        opt.zero_grad(set_to_none=True)
        out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        loss = out.loss.detach().clone()
        if ep:
            for p in model.parameters():  # replicated: mean over the ranks, as DDP would
                if id(p) not in experts:
                    dist.all_reduce(p.grad)
                    p.grad /= world
            dist.all_reduce(loss)
            loss /= world
        model.update_expert_bias(out.expert_counts.float())  # already the whole batch's under EP
        opt.step()
        res["losses"].append(loss.item())
        res["counts"].append(out.expert_counts.clone())
        res["dropped"].append(out.dropped.clone())
    res["params"] = full_state_dict(model) if ep else model.state_dict()
    return res


def run_case(case: str) -> dict:
    cfg = config(case)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    model = apply_ep(copy.deepcopy(ref), dist.group.WORLD)
    torch.manual_seed(1)
    batches = [torch.randint(cfg.vocab_size, (B, T + 1)) for _ in range(STEPS)]  # the same on every rank
    return {"ref": train(ref, batches, ep=False), "ep": train(model, batches, ep=True),
            "impl": [m.impl for m in model.moe_layers], "n_local": [m.experts.n_experts for m in model.moe_layers]}


def bad() -> dict:
    cfg = model_micro()
    cfg.n_routed_experts = 3
    try:
        apply_ep(Transformer(cfg), dist.group.WORLD)
        return {"error": None}
    except ConfigError as e:
        return {"error": str(e)}


def main(out_dir: Path, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    for case in cases:
        res = bad() if case == "bad" else run_case(case)
        torch.save(res, out_dir / f"{case}.rank{dist.get_rank()}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
