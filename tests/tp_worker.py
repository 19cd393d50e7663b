"""Worker for tests/test_parallel_tp.py, launched as
``python -m torch.distributed.run --standalone --nproc_per_node=2 tests/tp_worker.py OUT_DIR CASE ...``
(gloo, CPU, fp32). For each case in turn (one launch, one process group), every rank builds the
same model twice from one seed: a plain one (the one-process reference) and one sharded with
:func:`tinyseek.train.tp.apply_tp` over a 2-rank ``tp`` mesh, then trains both for 5 AdamW steps
on the same global batch (the aux-free expert bias updated from the step's counts). Each rank
writes ``OUT_DIR/<case>.rank{r}.pt``: both loss curves, the reference's final parameters and the
TP model's gathered ones (``full_tensor()``), what the linear kernel saw in a no-grad forward (its
calls with DTensor and with plain weights, the seams' ``use_kernel``), and both forwards' logits.

Cases: ``mla`` (plain query projection), ``mla_lora_sp`` (q LoRA, sequence-parallel norms),
``gqa`` (qkv bias, o bias, Qwen3 q/k norms), ``gqa_sp``; with 4 ranks ``fsdp_<case>``: FSDP2
over ``dp_shard=2`` composed with ``tp=2`` (:func:`fsdp_case`); ``bad``: layouts that tp=2 does not
divide, a second apply_tp, a sequence-parallel forward whose length tp does not divide: their
one-line errors are recorded (raised before any collective: a hang would time out).
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.kernels import linear as linear_kernel
from tinyseek.model.layers import Linear
from tinyseek.model.transformer import Transformer
from tinyseek.train.tp import apply_tp, clip_grad_norm_

STEPS, B, T = 5, 2, 16
torch_clip = torch.nn.utils.clip_grad_norm_


def config(case: str):
    cfg = model_micro()  # MLA, 1 dense + 1 MoE layer (4 routed experts, 1 shared), 4 heads
    if case.startswith("mla_lora"):
        cfg.q_lora_rank = 16
    if case.startswith("gqa"):
        cfg.attn, cfg.n_kv_heads, cfg.qkv_bias, cfg.o_bias, cfg.qk_norm = "gqa", 2, True, True, True
    return cfg


def train(model: Transformer, batch: torch.Tensor, clip, dp_group=None) -> tuple[list[float], list[float]]:
    """5 AdamW steps on ``batch``, gradients clipped to norm 0.5 by ``clip``; with ``dp_group``
    (FSDP2) ``batch`` is this rank's share of the global batch: the loss reported is the group's
    mean and the expert counts the group's sum. Returns the losses and the gradient norms."""
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    losses, norms = [], []
    for _ in range(STEPS):
        opt.zero_grad(set_to_none=True)
        out = model(batch[:, :-1], batch[:, 1:])
        out.loss.backward()
        norms.append(float(clip(model.parameters(), 0.5)))
        counts, loss = out.expert_counts.float(), out.loss.detach().reshape(1)
        if dp_group is not None:
            dist.all_reduce(counts, group=dp_group)
            dist.all_reduce(loss, group=dp_group)
            loss /= dist.get_world_size(dp_group)
        model.update_expert_bias(counts)
        opt.step()
        losses.append(loss.item())
    return losses, norms


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone()
            for n, p in model.named_parameters()}


def run_case(case: str, mesh) -> dict:
    cfg = config(case)
    torch.manual_seed(0)
    ref = Transformer(cfg)
    model = apply_tp(copy.deepcopy(ref), mesh, sequence_parallel=case.endswith("_sp"))
    torch.manual_seed(1)
    batch = torch.randint(cfg.vocab_size, (B, T + 1))  # the global batch, the same on every rank
    (ref_losses, ref_norms), (tp_losses, tp_norms) = train(ref, batch, torch_clip), train(model, batch, clip_grad_norm_)
    res = {"ref_losses": ref_losses, "tp_losses": tp_losses, "ref_norms": ref_norms, "tp_norms": tp_norms,
           "ref_params": full_params(ref), "tp_params": full_params(model),
           "grad_placements": {n: (tuple(p.placements), tuple(p.grad.placements)) for n, p in model.named_parameters()
                               if isinstance(p, DTensor)}}
    # the linear kernel's seam under TP: who reaches linear_fitted in a no-grad forward (2*16 rows: in range)
    seen = {"dtensor": 0, "plain": 0}
    fitted = linear_kernel.linear_fitted

    def spy(x, weight, bias=None, lib=None):
        seen["dtensor" if isinstance(weight, DTensor) else "plain"] += 1
        return fitted(x, weight, bias, lib)

    linear_kernel.linear_fitted = spy
    try:
        with torch.no_grad():
            res["tp_logits"] = model(batch[:, :-1]).logits
    finally:
        linear_kernel.linear_fitted = fitted
    with torch.no_grad():
        res["ref_logits"] = ref(batch[:, :-1]).logits
    res["kernel_calls"] = seen
    res["use_kernel"] = {n: (isinstance(m.weight, DTensor), m.use_kernel)
                         for n, m in model.named_modules() if isinstance(m, Linear)}
    return res


def fsdp_case(case: str, mesh) -> dict:
    """``dp_shard`` x ``tp`` on a (2, 2) mesh: apply_tp over ``mesh["tp"]``, then FSDP2 over
    ``mesh["dp_shard"]`` (each block, then the root), each data-parallel rank fed its half of the
    global batch. The balance loss is off (it is not a mean over tokens: halves would change it)."""
    from torch.distributed.fsdp import fully_shard  # 0.6 s to import: the 4-rank slow cases only
    cfg = config(case.removeprefix("fsdp_"))
    cfg.aux_loss = "none"
    torch.manual_seed(0)
    ref = Transformer(cfg)
    model = apply_tp(copy.deepcopy(ref), mesh["tp"], sequence_parallel=case.endswith("_sp"))
    for block in model.blocks:
        fully_shard(block, mesh=mesh["dp_shard"])
    fully_shard(model, mesh=mesh["dp_shard"])
    torch.manual_seed(1)
    batch = torch.randint(cfg.vocab_size, (2 * B, T + 1))
    local = batch.chunk(2)[mesh["dp_shard"].get_local_rank()]
    (ref_losses, ref_norms), (tp_losses, tp_norms) = \
        train(ref, batch, torch_clip), train(model, local, clip_grad_norm_, mesh["dp_shard"].get_group())
    return {"ref_losses": ref_losses, "tp_losses": tp_losses, "ref_norms": ref_norms, "tp_norms": tp_norms,
            "ref_params": full_params(ref), "tp_params": full_params(model)}


def bad_layouts(mesh) -> dict:
    errors = {}
    for name, change in {"heads": dict(n_heads=3), "kv_heads": dict(attn="gqa", n_kv_heads=1),
                         "shared": dict(shared_d_ff=33)}.items():
        cfg = model_micro()
        for k, v in change.items():
            setattr(cfg, k, v)
        try:
            apply_tp(Transformer(cfg), mesh)
            errors[name] = None
        except UserError as e:
            errors[name] = str(e)
    torch.manual_seed(0)
    model = apply_tp(Transformer(model_micro()), mesh, sequence_parallel=True)
    for name, call in {"again": lambda: apply_tp(model, mesh),
                       "uneven_sequence": lambda: model(torch.zeros(2, 15, dtype=torch.long))}.items():
        try:
            call()
            errors[name] = None
        except UserError as e:
            errors[name] = str(e)
    errors["n_heads_after"] = model.blocks[0].attn.n_heads
    return errors


def main(out_dir: Path, cases: list[str]) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    if dist.get_world_size() == 4:
        mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp_shard", "tp"))
    else:
        mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    for case in cases:
        if case.startswith("fsdp_"):
            res = fsdp_case(case, mesh)
        else:
            res = bad_layouts(mesh) if case == "bad" else run_case(case, mesh)
        torch.save(res, out_dir / f"{case}.rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2:])
