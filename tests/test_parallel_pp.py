"""Pipeline parallelism (tinyseek/train/pp.py): real torchrun runs (gloo, CPU, fp32) against one
process.

One 2-process torchrun launch (tests/pp_worker.py) trains every configuration in turn: a 4-layer
micro MoE (layer 0 dense, 1-3 MoE: both stages hold MoE layers, so a non-last stage's balance loss
must reach the backward), 5 AdamW steps with the aux-loss-free bias update, on the same global
batches as the one-process reference (``pretrain.forward_backward`` with ``accum`` = micro-batches),
for GPipe, 1F1B and interleaved 1F1B with 2 and 4 micro-batches, gradient clipping, a DeviceMesh.
Checked: losses (total, cross-entropy, balance) within 1e-5, the global gradient norms and the
held-out loss of ``pp.evaluate`` on every rank, the first step's gradients and the final parameters and expert biases (the union of the
stages' state dicts) equal to the reference's, and a control run that leaves the non-last stages'
aux gradient out differs. Slow tests do the same on 4 processes: 4 stages, and pp=2 x dp=2 with
FSDP2. Without processes: two stages chained by hand give the full model's gradients (with and
without activation checkpointing), the layer split, and the one-line errors.
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pp_worker import CLIP, ref_name, tiny_config
from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train import pp

ROOT = Path(__file__).resolve().parents[1]

CONFIGS = ["gpipe:2", "gpipe:4:clip", "1f1b:2:mesh", "1f1b:4", "interleaved1f1b:2", "1f1b:2:noaux"]
# pp=4 (one layer a stage, the first stage dense); pp=2 x dp=2 with FSDP2 (``dp2``)
CONFIGS_4 = ["1f1b:4", "gpipe:2:clip", "1f1b:2:dp2", "gpipe:1:dp2:clip"]


def torchrun(nproc: int, args: list[str], timeout: float = 180) -> None:
    """``python -m torch.distributed.run --standalone --nproc_per_node=NPROC ARGS`` (free port)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"torchrun failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def launch(out: Path, nproc: int, configs: list[str]) -> dict[str, dict]:
    torchrun(nproc, [str(ROOT / "tests" / "pp_worker.py"), str(out), *configs])
    res = {}
    for spec in configs:
        name = spec.replace(":", "-")
        ranks = [torch.load(out / f"{name}.rank{r}.pt", weights_only=True) for r in range(nproc)]
        res[spec] = {"ranks": ranks, "ref": torch.load(out / f"{ref_name(spec)}.pt", weights_only=True)}
    return res


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, dict]:
    return launch(tmp_path_factory.mktemp("pp"), 2, CONFIGS)


@pytest.fixture(scope="module")
def runs4(tmp_path_factory) -> dict[str, dict]:
    return launch(tmp_path_factory.mktemp("pp4"), 4, CONFIGS_4)


def merged(ranks: list[dict], key: str) -> dict[str, torch.Tensor]:
    out = {}
    for r in ranks:
        assert not set(out) & set(r[key]), "a tensor on two stages"
        out.update(r[key])
    return out


def check_matches(run: dict, dp: int = 1, atol: float = 1e-6) -> None:
    """Losses and norms on every rank; the union of the stages of data-parallel replica 0 (ranks
    pp_rank * dp) against the reference; the other replicas hold the same."""
    everyone, ref = run["ranks"], run["ref"]
    ranks = everyone[::dp]
    for first, r in ((everyone[i - i % dp], everyone[i]) for i in range(len(everyone))):
        for k in first["state"]:
            assert torch.equal(r["state"][k], first["state"][k]), f"replicas differ: {k}"
    for r in everyone:  # every rank returns the global loss (total, ce, aux) and gradient norm of every step
        assert torch.tensor(r["losses"]) == pytest.approx(torch.tensor(ref["losses"]), abs=1e-5, rel=0)
        assert r["norms"] == pytest.approx(ref["norms"], rel=1e-5)
        assert r["val"] == pytest.approx(ref["val"], abs=1e-5)  # pp.evaluate: forward only, eval mode
    assert min(l[2] for l in ref["losses"]) > 0.1  # the balance loss is a real part of the loss
    grads, want = merged(ranks, "grads"), ref["grads"]
    assert grads.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(grads[k], want[k], atol=1e-6, rtol=1e-5, msg=k)
    state, want = merged(ranks, "state"), ref["state"]
    assert state.keys() == want.keys()  # every parameter and expert bias, under the full model's names
    for k in want:
        torch.testing.assert_close(state[k], want[k], atol=atol, rtol=1e-5, msg=k)
    assert any(not torch.equal(v, torch.zeros_like(v)) for k, v in state.items() if k.endswith("expert_bias"))


@pytest.mark.parametrize("spec", [c for c in CONFIGS if "noaux" not in c])
def test_matches_one_process(runs, spec):
    check_matches(runs[spec])
    assert any(".router." in k for k in runs[spec]["ranks"][0]["grads"])  # first stage's routers: aux gradient


def test_clipping_acts(runs):
    assert min(runs["gpipe:4:clip"]["ref"]["norms"]) > CLIP  # so the clipped run tests the global norm


@pytest.mark.slow
@pytest.mark.parametrize("spec", CONFIGS_4)
def test_four_ranks_match_one_process(runs4, spec):
    """dp2: the replicas' gradients are averaged in another order than one process sums its
    micro-batches, and AdamW magnifies that rounding where the second moment is tiny: the
    parameters agree within 1e-5 (measured: 4.4e-6 at most), the pure pipelines bit for bit."""
    dp = 2 if ":dp2" in spec else 1
    check_matches(runs4[spec], dp=dp, atol=1e-5 if dp > 1 else 1e-6)


def test_stages_split_the_layers(runs):
    names = [set(r["state"]) for r in runs["1f1b:2:mesh"]["ranks"]]
    assert {k.split(".")[1] for k in names[0] if k.startswith("blocks.")} == {"0", "1"}
    assert {k.split(".")[1] for k in names[1] if k.startswith("blocks.")} == {"2", "3"}
    assert "embed.weight" in names[0] and "lm_head.weight" in names[1] and "norm.weight" in names[1]
    looped = [set(r["state"]) for r in runs["interleaved1f1b:2"]["ranks"]]  # stages 0, 2 | 1, 3
    assert {k.split(".")[1] for k in looped[0] if k.startswith("blocks.")} == {"0", "2"}


def test_aux_gradient_of_non_last_stages_matters(runs):
    """The control: without :class:`pp._AuxGrad` on the first stage its routers miss the balance
    loss gradient, and the run leaves one process's parameters (so the test above can tell)."""
    ranks, ref = runs["1f1b:2:noaux"]["ranks"], runs["1f1b:2:noaux"]["ref"]
    grads = ranks[0]["grads"]
    router = [k for k in grads if ".router." in k]
    assert router and any(not torch.allclose(grads[k], ref["grads"][k], atol=1e-6) for k in router)
    state = merged(ranks, "state")
    assert max((state[k] - ref["state"][k]).abs().max().item() for k in state) > 1e-3


# --- without processes ---------------------------------------------------------------------------
@pytest.mark.parametrize("n_layers,n_stages,sizes", [(4, 2, [2, 2]), (5, 2, [3, 2]), (7, 3, [3, 2, 2]), (3, 3, [1, 1, 1]),
                                                     (2, 1, [2])])
def test_stage_layers_contiguous_balanced(n_layers, n_stages, sizes):
    ranges = pp.stage_layers(n_layers, n_stages)
    assert [len(r) for r in ranges] == sizes
    assert [i for r in ranges for i in r] == list(range(n_layers))


def test_more_stages_than_layers_is_one_line_error():
    model = Transformer(model_micro())  # 2 layers; no process group exists: the check comes first
    with pytest.raises(UserError) as e:
        pp.split_model(model, 0, 3)
    assert "\n" not in str(e.value) and "3 stages" in str(e.value) and "2 layers" in str(e.value)
    with pytest.raises(UserError):
        pp.split_stages(Transformer(tiny_config()), 0, 2, virtual=3)  # 6 virtual stages, 4 layers


def test_tied_embeddings_and_bad_schedule_refused():
    with pytest.raises(UserError, match="untied"):
        pp.split_model(Transformer(dataclasses.replace(model_micro(), tie_embeddings=True)), 0, 2)
    stage = pp.split_model(Transformer(model_micro()), 0, 2)
    with pytest.raises(UserError, match="unknown pipeline schedule"):
        pp.build_schedule(stage, None, 2, "zigzag")
    with pytest.raises(UserError, match="interleaved1f1b"):
        pp.build_schedule(stage, None, 2, "interleaved1f1b")


def test_single_stage_forward_equals_model():
    """A 1-stage pipeline's module is the whole model: same logits, same aux loss recorded."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    stage = pp.split_model(model, 0, 1)
    x = torch.randint(0, 256, (2, 16))
    out = model(x)
    torch.testing.assert_close(stage(x), out.logits, rtol=0, atol=0)
    assert stage.records[-1]["aux"] == out.aux_loss.detach()
    torch.testing.assert_close(stage.records[-1]["counts"], out.expert_counts.float())


@pytest.mark.parametrize("ckpt", [False, True])
def test_aux_gradient_through_stages_single_process(ckpt):
    """Two stages chained by hand in one process (what the schedule does between ranks): the
    cross-entropy of the last stage's logits, backpropagated, gives the full model's gradients
    of ``ce + aux``: the first stage's balance loss arrives through :class:`pp._AuxGrad`."""
    torch.manual_seed(0)
    model = Transformer(tiny_config()).train()
    model.grad_checkpointing = ckpt
    x, y = torch.randint(0, 256, (2, 16)), torch.randint(0, 256, (2, 16))
    model(x, y).loss.backward()
    want = {k: p.grad.clone() for k, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    first, last = pp.split_model(model, 0, 2), pp.split_model(model, 1, 2)
    h = first(x)
    h_in = h.detach().requires_grad_()  # the P2P boundary
    pp.ce_loss(last(h_in), y).backward()
    h.backward(h_in.grad)
    for k, p in model.named_parameters():
        torch.testing.assert_close(p.grad, want[k], atol=1e-7, rtol=1e-5, msg=k)
