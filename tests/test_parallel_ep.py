"""Expert parallelism (tinyseek/train/ep.py): a real 2-process torchrun (gloo, CPU, fp32) against one
process on the same global batch.

One launch runs every case (tests/ep_worker.py): a model with a dense layer and two MoE layers (4
routed experts, top-2, a shared expert), the aux-loss-free bias update on, and (a) a sigmoid router
with the switch balance loss and capacity drops (capacity_factor 1), (b) a softmax router with the
variance balance loss, dropless. Each rank trains half of the global batch with 2 of the 4 experts.
The tests check: 5 AdamW steps give the one-process losses within 1e-5 and its parameters within
1e-5 (measured: at most 5e-7 and 1.6e-6; AdamW's eps is 1e-5, because with the default 1e-8 an
element whose gradient is float noise around zero (2e-8 against 1e-8 here, from a row whose other
elements are 1e-2) moves by about lr in either direction: 2e-3 in one embedding element), the
per-step tokens per expert and capacity drops equal one process's exactly, an evaluation forward
gives one process's logits, the all-to-all bytes follow one process's routing, and an ep that does
not divide the experts is a one-line error. The same launch checks plain data parallelism with the
load shared (ep.share_load) against one process; a slow 4-rank run checks dp=4,ep=2 (two EP groups,
the experts' gradients averaged over their replicas, the load over all four ranks). Control
(measured): with each rank's own load instead of the group's, the losses differ by 3e-4 to 7e-4,
the counts and (with capacity) the drops differ, the expert biases by 2e-2 to 3e-2.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from test_distributed import ROOT
from tinyseek.config import model_micro
from tinyseek.kernels.moe_grouped import grouped_mm_ok
from tinyseek.model.moe import Experts, MoE
from tinyseek.train import ep as EP

CASES = ["switch_cap", "variance_softmax"]


def launch(out, nproc: int, ep: int, cases: list[str]) -> dict[str, list[dict]]:
    """tests/ep_worker.py under ``torchrun --nproc_per_node=NPROC`` with ``--parallel dp=NPROC,ep=EP``."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(ROOT / "tests" / "ep_worker.py"), str(out), str(ep), *cases]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return {case: [torch.load(out / f"{case}.rank{r}.pt", weights_only=True) for r in range(nproc)]
            for case in cases}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    return launch(tmp_path_factory.mktemp("ep"), 2, 2, CASES + ["switch_cap:dp", "bad"])


def check_matches(ranks: list[dict], case: str, n_local: int, impl: str = "ep") -> None:
    """Losses and (gathered) parameters of every rank against one process; routing statistics equal."""
    ref = ranks[0]["ref"]
    assert ref["losses"][0] != ref["losses"][-1]  # it trained
    for r in ranks:
        ep = r["ep"]
        assert r["impl"] == [impl, impl] and r["n_local"] == [n_local, n_local]
        assert ep["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0)
        assert ep["losses"] == ranks[0]["ep"]["losses"]
        assert ep["params"].keys() == ref["params"].keys()
        for name, want in ref["params"].items():
            torch.testing.assert_close(ep["params"][name], want, atol=1e-5, rtol=0, msg=f"{case}: {name}")
            assert torch.equal(ep["params"][name], ranks[0]["ep"]["params"][name]), f"{case}: {name} differs"
        for step, (c_ref, c_ep, d_ref, d_ep) in enumerate(zip(ref["counts"], ep["counts"], ref["dropped"],
                                                                ep["dropped"])):
            assert torch.equal(c_ep.long(), c_ref.long()), f"step {step}: tokens per expert {c_ep} != {c_ref}"
            assert torch.equal(d_ep, d_ref), f"step {step}: dropped {d_ep} != {d_ref}"
            assert int(c_ref.sum()) == 2 * 8 * 16 * 2  # both MoE layers see the whole batch's 8*16 tokens, top-2
    dropped = sum(int(d.sum()) for d in ref["dropped"])
    assert (dropped > 0) == case.startswith("switch_cap"), dropped  # capacity really drops in the capacity case
    # an evaluation forward without gradient: each rank's rows of one process's logits
    for rank, r in enumerate(ranks):
        want = ref["eval_logits"].chunk(len(ranks))[rank]
        torch.testing.assert_close(r["ep"]["eval_logits"], want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("case", CASES)
def test_ep_matches_one_process(runs, case):
    check_matches(runs[case], case, n_local=2)


def check_bytes(ranks: list[dict], ep: int, n_local: int, d_model: int = 64) -> None:
    """Dropless: each rank's all-to-all payload per step and layer from one process's routing: its
    tokens' assignments to experts of other ranks of its EP group (out) plus theirs to its experts
    (back), D fp32 values each."""
    ref = ranks[0]["ref"]
    n_layers = len(ref["bytes_sent"][0])
    for rank, r in enumerate(ranks):
        me, peers = rank % ep, [q for q in range(rank - rank % ep, rank - rank % ep + ep) if q != rank]
        for step, sent in enumerate(r["ep"]["bytes_sent"]):
            for layer in range(n_layers):
                owner = (ref["routes"][step * n_layers + layer] // n_local).chunk(len(ranks))  # per rank's tokens
                rows = int((owner[rank] != me).sum()) + sum(int((owner[q] == me).sum()) for q in peers)
                assert sent[layer] == rows * d_model * 4, (rank, step, layer)
        assert sum(map(sum, r["ep"]["bytes_sent"])) > 0


def test_ep_bytes_sent_follow_the_routing(runs):
    check_bytes(runs["variance_softmax"], ep=2, n_local=2)


def test_dp_with_shared_load_matches_one_process(runs):
    """Plain data parallelism with ep.share_load: routing, drops and balance loss of the global batch."""
    check_matches(runs["switch_cap:dp"], "switch_cap:dp", n_local=4, impl="auto")


@pytest.mark.slow
def test_dp4_ep2_matches_one_process(tmp_path):
    """4 ranks, two EP groups of 2: the experts' gradients are averaged over their replicas too."""
    runs = launch(tmp_path, 4, 2, CASES)
    for case in CASES:
        check_matches(runs[case], case, n_local=2)
    check_bytes(runs["variance_softmax"], ep=2, n_local=2)


def test_ep_that_does_not_divide_the_experts_is_one_line(runs):
    for r in runs["bad"]:
        assert r["error"] == "expert parallelism: ep=2 does not divide n_routed_experts = 3"


# --- one process: the local expert computation ----------------------------------------------
@pytest.mark.parametrize("grouped", [True, False])
def test_local_experts_rows_and_scaled_gradient(monkeypatch, grouped):
    if grouped and not grouped_mm_ok(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm does not run here")
    monkeypatch.setattr(EP, "grouped_mm_ok", lambda device, dtype: grouped)
    torch.manual_seed(0)
    ex = Experts(3, 16, 8)
    torch.nn.init.normal_(ex.w_gate_up, std=0.3), torch.nn.init.normal_(ex.w_down, std=0.3)
    counts = torch.tensor([4, 0, 3])
    x = torch.randn(7, 16)
    y = EP.local_experts(ex, x, counts, torch.float32, grad_scale=0.5)
    e_of_row = torch.repeat_interleave(torch.arange(3), counts)
    want = torch.stack([ex.expert_forward(int(e), x[i:i + 1])[0] for i, e in enumerate(e_of_row)])
    torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)
    y.sum().backward()
    g_scaled = ex.w_gate_up.grad.clone()
    ex.w_gate_up.grad = None
    want.sum().backward()
    torch.testing.assert_close(g_scaled, 0.5 * ex.w_gate_up.grad, atol=1e-6, rtol=1e-5)
    assert torch.equal(g_scaled[1], torch.zeros_like(g_scaled[1]))  # the expert without rows: zero, not None


def test_local_experts_without_rows_keeps_the_graph():
    ex = Experts(2, 16, 8)
    torch.nn.init.normal_(ex.w_gate_up), torch.nn.init.normal_(ex.w_down)
    x = torch.zeros(0, 16, requires_grad=True)
    y = EP.local_experts(ex, x, torch.tensor([0, 0]), torch.float32, 0.5)
    assert y.shape == (0, 16) and y.grad_fn is not None  # the backward all-to-all still runs on this rank
    y.sum().backward()
    assert torch.equal(ex.w_gate_up.grad, torch.zeros_like(ex.w_gate_up))


def test_ep_dispatch_needs_apply_ep():
    moe = MoE(model_micro())
    moe.impl = "ep"  # registered by importing tinyseek.train.ep
    with pytest.raises(RuntimeError, match="apply_ep"):
        moe(torch.randn(1, 3, 64))
