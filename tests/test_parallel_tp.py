"""Tensor parallelism (tinyseek/train/tp.py): a real 2-process torchrun (gloo, CPU, fp32) against one
process on the same global batch.

One launch runs every case (tests/tp_worker.py): an MLA model (plain query projection) and one with
q LoRA and sequence-parallel norms, a GQA model (qkv and o biases, Qwen3 q/k norms) with
sequence-parallel norms; each has a dense layer and an MoE layer with a shared expert. The tests
check: 5 AdamW steps (gradients clipped by :func:`tinyseek.train.tp.clip_grad_norm_`, which takes
the mixed DTensor / plain gradients torch's own refuses) give the one-process losses within 1e-5,
its gradient norms within 1e-5 (relative) and its parameters within 1e-4 (measured: at most 2e-5,
where Adam's normalisation amplifies float-order differences of near-zero gradients; leaving out
the k_pe gradient reduction gives 3e-2); both ranks hold the same parameters; the linear C kernel
never sees a DTensor shard; a layout that tp does not divide is a one-line UserError. A slow
4-rank test composes FSDP2 (dp_shard=2) with tp=2.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train.tp import check_tp, clip_grad_norm_

ROOT = Path(__file__).resolve().parents[1]
CASES = ["mla", "mla_lora_sp", "gqa_sp"]


def torchrun(args: list[str], timeout: float, nproc: int = 2) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS`` from the repository root."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("tp")
    torchrun([str(ROOT / "tests" / "tp_worker.py"), str(out), *CASES, "bad"], timeout=120)
    return {case: [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in (0, 1)]
            for case in CASES + ["bad"]}


@pytest.mark.parametrize("case", CASES)
def test_tp_matches_one_process(runs, case):
    r0, r1 = runs[case]
    assert r0["tp_losses"] == pytest.approx(r0["ref_losses"], abs=1e-5, rel=0)
    assert r0["tp_losses"] == r1["tp_losses"]
    # tp.clip_grad_norm_ (mixed DTensor / plain gradients) gives torch's norm of the one-process model
    assert r0["tp_norms"] == pytest.approx(r0["ref_norms"], rel=1e-5) and r0["tp_norms"] == r1["tp_norms"]
    assert min(r0["ref_norms"]) > 0.5  # so clipping acted
    assert r0["ref_losses"][-1] < r0["ref_losses"][0] - 0.5  # it trained
    assert r0["tp_params"].keys() == r0["ref_params"].keys()
    for name, ref in r0["ref_params"].items():
        torch.testing.assert_close(r0["tp_params"][name], ref, atol=1e-4, rtol=0, msg=f"{case}: {name}")
        assert torch.equal(r0["tp_params"][name], r1["tp_params"][name]), f"{case}: {name} differs between ranks"
    torch.testing.assert_close(r0["tp_logits"], r0["ref_logits"], atol=1e-4, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_what_is_sharded(runs, case):
    r0 = runs[case][0]
    sharded = {n for n, (is_dt, _) in r0["use_kernel"].items() if is_dt}
    heads = {"q_proj", "k_proj", "v_proj"} if case.startswith("gqa") else \
        {"q_b_proj" if "lora" in case else "q_proj", "kv_b_proj"}
    ffn = ["blocks.0.ffn", "blocks.1.ffn.shared"]
    assert sharded == {f"blocks.{i}.attn.{p}" for i in (0, 1) for p in heads | {"o_proj"}} | \
        {f"{f}.{p}" for f in ffn for p in ("gate_proj", "up_proj", "down_proj")}
    # replicated: routed experts, router, latent projections, embedding, LM head stay plain tensors
    placements = r0["grad_placements"]
    assert not any(".experts." in n or ".router." in n or "kv_a_proj" in n or n.startswith(("embed", "lm_head"))
                   for n in placements)
    # every DTensor gradient has its parameter's placement (Partial norm gradients are all-reduced)
    assert all(p == g for p, g in placements.values()), placements
    if case.endswith("_sp"):
        assert "blocks.0.attn_norm.weight" in placements and "norm.weight" in placements


@pytest.mark.parametrize("case", CASES)
def test_linear_kernel_never_sees_a_shard(runs, case):
    r0 = runs[case][0]
    # the seam re-selected when parallelize_module registered the DTensor weights: F.linear there
    assert all(not use for is_dt, use in r0["use_kernel"].values() if is_dt)
    assert r0["use_kernel"]["lm_head"] == (False, True)  # a replicated plain weight keeps the kernel
    assert r0["kernel_calls"]["dtensor"] == 0 and r0["kernel_calls"]["plain"] > 0


def test_bad_layout_is_one_line_error_before_any_collective(runs):
    errs = dict(runs["bad"][0])
    assert errs == runs["bad"][1]
    assert errs["heads"] == "tensor parallelism tp=2 must divide model.n_heads (3)"
    assert errs["kv_heads"] == "tensor parallelism tp=2 must divide model.n_kv_heads (1)"
    assert "shared expert's width" in errs["shared"] and "(33)" in errs["shared"]
    assert errs["again"].startswith("apply_tp: the model is already distributed")
    assert errs.pop("n_heads_after") == 2  # the refused second call changed nothing
    assert errs["uneven_sequence"] == "sequence-parallel forward: the sequence length 15 must be a multiple of tp=2"
    assert all("\n" not in e for e in errs.values())


@pytest.mark.slow
def test_fsdp2_composes_with_tp(tmp_path):
    """4 ranks: dp_shard=2 (FSDP2) x tp=2, with and without sequence parallelism, against one process
    on the global batch, gradients clipped (measured: losses within 5e-7, parameters within 2.1e-5,
    gradient norms within 4e-7 relative; 33 s at load 8 on 2 cores)."""
    cases = ["fsdp_mla", "fsdp_gqa_sp"]
    torchrun([str(ROOT / "tests" / "tp_worker.py"), str(tmp_path), *cases], timeout=300, nproc=4)
    for case in cases:
        runs = [torch.load(tmp_path / f"{case}.rank{r}.pt", weights_only=True) for r in range(4)]
        r0 = runs[0]
        assert r0["tp_losses"] == pytest.approx(r0["ref_losses"], abs=1e-5, rel=0)
        assert r0["tp_norms"] == pytest.approx(r0["ref_norms"], rel=1e-5)
        for name, ref in r0["ref_params"].items():
            torch.testing.assert_close(r0["tp_params"][name], ref, atol=1e-4, rtol=0, msg=f"{case}: {name}")
            assert all(torch.equal(r["tp_params"][name], r0["tp_params"][name]) for r in runs[1:]), name


def test_check_tp_is_pure():
    check_tp(model_micro(), 1)
    check_tp(model_micro(), 4)
    cfg = model_micro()
    cfg.n_routed_experts, cfg.n_dense_layers, cfg.d_ff = 0, 2, 130
    with pytest.raises(UserError, match=r"^tensor parallelism tp=4 must divide model.d_ff \(130\)$"):
        check_tp(cfg, 4)
    with pytest.raises(UserError, match="tp >= 1"):
        check_tp(model_micro(), 0)


@pytest.mark.parametrize("max_norm", [0.5, 1e9])
def test_clip_grad_norm_on_plain_tensors_is_torchs(max_norm):
    torch.manual_seed(0)
    models = [Transformer(model_micro()) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x = torch.randint(256, (2, 9))
    for m in models:
        m(x[:, :-1], x[:, 1:]).loss.backward()
    want = torch.nn.utils.clip_grad_norm_(models[0].parameters(), max_norm)
    assert clip_grad_norm_(models[1].parameters(), max_norm).item() == pytest.approx(want.item(), rel=1e-6)
    for p, q in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-6, atol=0)
