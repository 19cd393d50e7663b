"""Router regularisation (issue 19): the routing-entropy term moves the entropy the way its sign says,
load-aware routing evens out a skewed load, both off is today's maths bit for bit, the fast paths
equal the reference loop with both on, the counter is a deterministic checkpointed buffer, and the
data-parallel / pipeline aux paths give one process's losses and buffers (2 gloo ranks)."""
from __future__ import annotations

import json
import os

import pytest
import torch

from tinyseek import cli
from tinyseek.config import ConfigError, ModelConfig, apply_overrides, model_micro
from tinyseek.interop.hf_export import export_hf
from tinyseek.kernels.moe_grouped import grouped_mm_ok
from tinyseek.model.moe import MoE, balance_loss, load_penalty, route, routing_entropy
from tinyseek.model.transformer import Transformer
from tinyseek.train.pretrain import Config as PretrainConfig
from test_distributed import torchrun
from test_parallel_pretrain import COMMON, WORKER, losses, shards
from safetensors.torch import load_file


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, d_ff=64, n_dense_layers=1,
                n_routed_experts=8, n_shared_experts=1, moe_d_ff=24, top_k=2, score_func="sigmoid",
                aux_loss="none", bias_update_speed=0.0)
    base.update(kw)
    return ModelConfig(**base).validate()


def make_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


def router_scores(m: MoE, x: torch.Tensor) -> torch.Tensor:
    return m.router(x.reshape(-1, x.shape[-1]))[2]


# --- config -------------------------------------------------------------------------------------
@pytest.mark.parametrize("over,needle", [
    (dict(router_load_aware=-0.1), "model.router_load_aware must be >= 0"),
    (dict(router_load_momentum=1.0), "model.router_load_momentum must be in [0, 1)"),
    (dict(router_load_momentum=-0.5), "model.router_load_momentum must be in [0, 1)"),
    (dict(router_entropy_coef=float("nan")), "model.router_entropy_coef must be a finite number"),
])
def test_config_validation_one_line(over, needle):
    with pytest.raises(ConfigError) as e:
        moe_cfg(**over)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_cli_flags_set_the_fields():
    cfg = apply_overrides(PretrainConfig(), ["--model.router-entropy-coef", "-0.05", "--model.router-load-aware", "0.2"])
    assert (cfg.model.router_entropy_coef, cfg.model.router_load_aware) == (-0.05, 0.2)


# --- both off: today's maths --------------------------------------------------------------------
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_off_is_todays_maths_bit_for_bit(score_func):
    """Options off: no new state, and output and aux loss are the pure functions' composition (route
    with the aux-free bias, balance_loss, the reference loop) exactly. A load-aware router whose
    counter is still at its start (1/N each) and any entropy coefficient leave the output bit-identical."""
    cfg = moe_cfg(score_func=score_func, aux_loss="switch", bias_update_speed=0.01)
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.router.expert_bias.copy_(0.05 * torch.randn(8))
    assert "router.expert_load" not in m.state_dict()
    x = torch.randn(2, 16, 32)
    m.impl = "loop"
    y, stats = m(x)
    x_ND = x.reshape(-1, 32)
    s = router_scores(m, x)
    idx, w = route(s, 2, m.router.expert_bias, score_func=score_func)
    aux = balance_loss("switch", s, idx, normalized=score_func == "softmax") * cfg.aux_loss_alpha
    y_ref = m._loop(x_ND, idx, w, None, None).view_as(y) + m.shared(x_ND).view_as(y)
    assert torch.equal(y, y_ref) and torch.equal(stats["aux_loss"], aux)

    on = make_moe(moe_cfg(score_func=score_func, aux_loss="switch", bias_update_speed=0.01, router_load_aware=0.5,
                          router_entropy_coef=0.3)).train()
    on.load_state_dict(m.state_dict(), strict=False)  # same weights and bias; its counter is 1/N each
    on.impl = "loop"
    y_on, stats_on = on(x)
    assert torch.equal(y_on, y)
    ent = routing_entropy(s, normalized=score_func == "softmax")
    assert torch.equal(stats_on["aux_loss"], aux - 0.3 * ent)


# --- the entropy term ---------------------------------------------------------------------------
def entropy_after_training(coef: float, steps: int = 25) -> float:
    cfg = moe_cfg(router_entropy_coef=coef)
    m = make_moe(cfg).train()
    g = torch.Generator().manual_seed(1)
    x, target = torch.randn(4, 16, 32, generator=g), torch.randn(4, 16, 32, generator=g)
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    for _ in range(steps):
        y, stats = m(x)
        (torch.nn.functional.mse_loss(y, target) + stats["aux_loss"]).backward()
        opt.step()
        opt.zero_grad()
    with torch.no_grad():
        return float(routing_entropy(router_scores(m, x)))


def test_entropy_moves_as_the_coefficient_says():
    """A few Adam steps on a task loss plus the term: c > 0 ends with a higher per-token routing entropy
    than c = 0, c < 0 with a lower one."""
    neg, zero, pos = (entropy_after_training(c) for c in (-0.5, 0.0, 0.5))
    assert neg + 0.02 < zero < pos - 0.02, (neg, zero, pos)


def test_entropy_bounds():
    s = torch.rand(10, 8)
    h = float(routing_entropy(s))
    assert 0.0 < h < 1.0
    assert float(routing_entropy(torch.full((3, 8), 0.7))) == pytest.approx(1.0, abs=1e-6)


# --- load-aware routing -------------------------------------------------------------------------
def skewed_run(strength: float, steps: int = 40, seed: int = 0):
    """Training-mode forwards on inputs that all lean towards experts 0 and 1, the counter updated each
    step; returns the max/mean assignment ratio of the last 10 steps and the final counter (or None)."""
    cfg = moe_cfg(router_load_aware=strength, router_load_momentum=0.8)
    m = make_moe(cfg, seed).train()
    g = torch.Generator().manual_seed(seed + 1)
    direction = torch.randn(32, generator=g)
    with torch.no_grad():
        m.router.weight[:2] += 0.5 * direction  # experts 0 and 1: high affinity for every token below
    total = torch.zeros(8)
    for step in range(steps):
        x = direction + 0.5 * torch.randn(2, 16, 32, generator=g)
        _, stats = m(x)
        m.update_balance(stats["counts"])
        if step >= steps - 10:
            total += stats["counts"].float()
    return float(total.max() / total.mean()), (m.router.expert_load.clone() if strength > 0 else None)


def test_load_aware_reduces_max_over_mean_load():
    off, _ = skewed_run(0.0)
    on, load = skewed_run(0.3)
    assert off > 3.0, off  # the skew: experts 0 and 1 take most assignments
    assert on < 0.6 * off, (on, off)
    assert load.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_load_counter_deterministic_and_checkpointed(tmp_path):
    """The same steps give the same counter bit for bit; it is a buffer in the state dict, and a model
    loaded from it routes as the original (and differs from a fresh counter's routing)."""
    _, a = skewed_run(0.3)
    _, b = skewed_run(0.3)
    assert torch.equal(a, b)
    cfg = moe_cfg(router_load_aware=0.3)
    m = make_moe(cfg).eval()
    with torch.no_grad():
        m.router.expert_load.copy_(a)
    torch.save(m.state_dict(), tmp_path / "sd.pt")
    back = MoE(cfg).eval()
    back.load_state_dict(torch.load(tmp_path / "sd.pt", weights_only=True))
    assert torch.equal(back.router.expert_load, a)
    x = torch.randn(64, 32)
    assert torch.equal(back.router(x)[0], m.router(x)[0])
    fresh = make_moe(cfg).eval()
    assert not torch.equal(fresh.router(x)[0], m.router(x)[0])


def test_transformer_step_updates_counter():
    """``Transformer.update_expert_bias`` (what every trainer calls once a step) moves the counter
    towards the step's shares, and the aux-free bias with it where that is on too."""
    cfg = model_micro()
    cfg.router_load_aware, cfg.router_load_momentum = 0.1, 0.5
    m = Transformer(cfg)
    counts = torch.tensor([[6.0, 2.0, 0.0, 0.0]])
    m.update_expert_bias(counts)
    r = m.moe_layers[0].router
    assert torch.allclose(r.expert_load, torch.tensor([0.5, 0.25, 0.125, 0.125]))
    assert torch.equal(r.expert_bias, torch.tensor([-0.001, 0.0, 0.001, 0.001]))
    assert load_penalty(r.expert_load, 0.1).tolist() == pytest.approx([0.1, 0.0, -0.05, -0.05])


# --- fast paths vs the reference, options on ----------------------------------------------------
def _run(m: MoE, impl: str, x: torch.Tensor):
    m.impl = impl
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, stats = m(x)
    w = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)
    ((y * w).sum() + stats["aux_loss"]).backward()
    return y.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}, stats


@pytest.mark.parametrize("impl", ["auto", "sorted", "grouped", "padded"])
@pytest.mark.parametrize("score_func", ["sigmoid", "softmax"])
def test_fast_paths_match_reference_with_options_on(impl, score_func):
    """Both options on, the counter skewed: every dispatch variant (the C top-k / sort included) gives
    the reference loop's routing, output, aux loss and gradients; so does inference (``kernel``)."""
    if impl == "grouped" and not grouped_mm_ok(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm unavailable on this CPU build")
    cfg = moe_cfg(score_func=score_func, aux_loss="switch", bias_update_speed=0.01, router_load_aware=0.2,
                  router_entropy_coef=0.1)
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.router.expert_load.copy_(torch.tensor([0.3, 0.2, 0.1, 0.1, 0.1, 0.1, 0.05, 0.05]))
        m.router.expert_bias.copy_(0.02 * torch.randn(8))
    x = torch.randn(2, 24, 32)
    ref = _run(m, "loop", x)
    got = _run(m, impl, x)
    assert torch.equal(got[3]["counts"], ref[3]["counts"])
    torch.testing.assert_close(got[3]["aux_loss"], ref[3]["aux_loss"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got[0], ref[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1], ref[1], atol=1e-5, rtol=1e-5)
    for n in ref[2]:
        torch.testing.assert_close(got[2][n], ref[2][n], atol=1e-5, rtol=1e-5, msg=n)
    m.eval()
    with torch.no_grad():
        m.impl = "loop"
        y_ref, _ = m(x)
        m.impl = "auto"
        y_fast, _ = m(x)
    torch.testing.assert_close(y_fast, y_ref, atol=1e-5, rtol=1e-5)


# --- the aux path under data parallelism and a pipeline: one process's -------------------------
OPTS = ["--model.router-entropy-coef", "0.05", "--model.router-load-aware", "0.1", "--model.aux-loss", "switch"]
RUNS = {"dp2": ["--parallel", "dp=2", *OPTS], "pp2": ["--parallel", "pp=2", "--batch-size", "8", *OPTS]}


@pytest.fixture(scope="module")
def par_runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("ropt")
    (out / "worker.py").write_text(WORKER)
    data = shards(out)
    torchrun([str(out / "worker.py"), str(out), str(data), json.dumps({k: COMMON + v for k, v in RUNS.items()})],
             cwd=out, timeout=180)
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        assert cli.main(["pretrain", *COMMON, *OPTS, "--batch-size", "8", "--data", str(data),
                         "--run-dir", str(out / "one")]) == 0
        assert cli.main(["pretrain", *COMMON, "--model.aux-loss", "switch", "--batch-size", "8", "--data", str(data),
                         "--run-dir", str(out / "plain")]) == 0
    finally:
        os.environ.update(env)
    return out


@pytest.mark.parametrize("layout", list(RUNS))
def test_parallel_aux_path_matches_one_process(par_runs, layout):
    """dp=2 (load statistics shared over the group: the entropy's value is the global batch's) and pp=2
    (the stages' aux terms summed, their gradient injected per stage): losses, weights and the load
    counters equal one process's within 1e-5; and the options changed the run (against plain)."""
    par, one, plain = (dict(losses(par_runs / r)) for r in (layout, "one", "plain"))
    assert par.keys() == one.keys() and max(abs(par[s] - one[s]) for s in one) < 1e-5, (par, one)
    assert max(abs(plain[s] - one[s]) for s in one) > 1e-4
    a = load_file(par_runs / layout / "ckpt/step_000005/model.safetensors")
    b = load_file(par_runs / "one/ckpt/step_000005/model.safetensors")
    assert a.keys() == b.keys() and any(k.endswith("router.expert_load") for k in b)
    for k in b:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_hf_export_folds_the_load_penalty(tmp_path):
    """A load-aware model exports to DeepseekV3 with the penalty folded into ``e_score_correction_bias``:
    transformers' logits equal ours (and the skewed counter really changes them)."""
    transformers = pytest.importorskip("transformers")
    cfg = model_micro()
    cfg.router_load_aware = 0.3
    torch.manual_seed(0)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("router.weight"):
                p.normal_(0.0, 0.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(idx).logits
        for mo in m.moe_layers:
            mo.router.expert_load.copy_(torch.tensor([0.55, 0.15, 0.2, 0.1]))
            mo.router.expert_bias.copy_(torch.tensor([0.02, -0.01, 0.0, 0.03]))
        ours = m(idx).logits
    assert (before - ours).abs().max() > 1e-3
    export_hf(m, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"), dtype=torch.float32).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    with torch.no_grad():
        theirs = hf(input_ids=idx).logits
    assert (ours - theirs).abs().max() < 1e-4
