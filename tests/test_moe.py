"""MoE layer: fast dispatch paths == the readable reference loop, routing, balancing, capacity, config."""
from __future__ import annotations

import pytest
import torch

from tinyseek.config import ConfigError, ModelConfig, model_micro
from tinyseek.kernels import moe_infer
from tinyseek.kernels.moe_grouped import grouped_mm_ok
from tinyseek.model.layers import SwiGLU
from tinyseek.model.moe import MoE, balance_loss, capacity_keep, route, update_bias
from tinyseek.model.transformer import Transformer


def moe_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=2, max_seq_len=32, kv_lora_rank=16,
                qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, d_ff=64, n_dense_layers=1,
                n_routed_experts=8, n_shared_experts=1, moe_d_ff=24, top_k=2, score_func="softmax")
    base.update(kw)
    return ModelConfig(**base).validate()


def make_moe(cfg: ModelConfig, seed: int = 0) -> MoE:
    torch.manual_seed(seed)
    m = MoE(cfg)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_(0.0, 0.2)
    return m


def run(m: MoE, impl: str, x: torch.Tensor):
    """Forward + backward of a fixed scalar loss; returns output, dx, and every parameter grad."""
    m.impl = impl
    m.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    y, stats = m(x)
    w = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)  # non-symmetric loss weights
    ((y * w).sum() + stats["aux_loss"]).backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}
    return y.detach(), x.grad.clone(), grads, stats


ROUTINGS = {
    "softmax": dict(score_func="softmax"),
    "sigmoid": dict(score_func="sigmoid", routed_scaling=2.5, aux_loss="variance"),
    "softmax-groups": dict(score_func="softmax", n_groups=4, topk_groups=2, top_k=3),
    "sigmoid-groups": dict(score_func="sigmoid", n_groups=4, topk_groups=2, top_k=4, norm_topk_prob=False),
    "top1-noshared": dict(top_k=1, n_shared_experts=0),
}


@pytest.mark.parametrize("impl", ["grouped", "grouped_autograd", "sorted", "padded", "infer"])
@pytest.mark.parametrize("capacity", [0.0, 1.0])
@pytest.mark.parametrize("routing", list(ROUTINGS))
def test_fast_paths_match_reference_loop(impl, capacity, routing):
    if impl.startswith("grouped") and not grouped_mm_ok(torch.device("cpu"), torch.float32):
        pytest.skip("torch._grouped_mm unavailable on this CPU build")
    cfg = moe_cfg(capacity_factor=capacity, **ROUTINGS[routing])
    m = make_moe(cfg).train()
    x = torch.randn(3, 11, cfg.d_model, generator=torch.Generator().manual_seed(1))
    y_ref, dx_ref, g_ref, s_ref = run(m, "loop", x)
    y, dx, g, s = run(m, impl, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    assert set(g) == set(g_ref) and {"router.weight", "experts.w_gate_up", "experts.w_down"} <= set(g)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=name)
    assert torch.equal(s["counts"], s_ref["counts"]) and int(s["dropped"]) == int(s_ref["dropped"])
    if capacity > 0:
        assert int(s["dropped"]) > 0  # cf=1 with a random router must drop something: test is not vacuous


@pytest.mark.parametrize("impl", ["grouped", "grouped_autograd", "sorted", "padded"])
def test_fast_paths_handle_empty_experts(impl):
    """Experts that receive no token (zero-size groups) must not break the grouped kernels."""
    cfg = moe_cfg(n_routed_experts=8, top_k=1, score_func="sigmoid", aux_loss="none")
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.router.weight.zero_()
        m.router.weight[2, 0] = 5.0
        m.router.weight[5, 0] = -5.0
    x = torch.randn(2, 7, cfg.d_model, generator=torch.Generator().manual_seed(3))
    y_ref, dx_ref, g_ref, s = run(m, "loop", x)
    assert (s["counts"] == 0).sum() >= 6  # only experts 2 and 5 are used
    y, dx, g, _ = run(m, impl, x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=name)


@pytest.mark.parametrize("impl", ["loop", "sorted", "grouped", "padded", "auto"])
def test_one_expert_top1_equals_dense_swiglu(impl):
    cfg = moe_cfg(n_routed_experts=1, top_k=1, n_shared_experts=0, moe_d_ff=40)
    m = make_moe(cfg)
    m.impl = impl
    dense = SwiGLU(cfg.d_model, cfg.moe_d_ff)
    with torch.no_grad():  # same weights: gate|up fused (D, 2F), down (F, D)
        m.experts.w_gate_up[0].copy_(torch.cat([dense.gate_proj.weight.T, dense.up_proj.weight.T], dim=1))
        m.experts.w_down[0].copy_(dense.down_proj.weight.T)
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya, _ = m(xa)
    yb = dense(xb)
    torch.testing.assert_close(ya, yb, atol=1e-5, rtol=1e-5)
    ya.square().sum().backward()
    yb.square().sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.experts.w_down.grad[0], dense.down_proj.weight.grad.T, atol=1e-5, rtol=1e-5)
    F = cfg.moe_d_ff
    torch.testing.assert_close(m.experts.w_gate_up.grad[0][:, :F], dense.gate_proj.weight.grad.T, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(m.experts.w_gate_up.grad[0][:, F:], dense.up_proj.weight.grad.T, atol=1e-5, rtol=1e-5)


def _load_ratio(counts: torch.Tensor) -> float:
    c = counts.float()
    return float(c.max() / c.mean())


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_free_bias_moves_toward_balance(score_func):
    cfg = moe_cfg(n_routed_experts=8, top_k=2, score_func=score_func, aux_loss="none", bias_update_speed=0.005)
    m = make_moe(cfg).train()
    g = torch.Generator().manual_seed(4)
    x = torch.randn(4, 32, cfg.d_model, generator=g)
    with torch.no_grad():  # skew: experts 0 and 1 win for almost every token
        m.router.weight.mul_(0.1)
        x[..., 0] = x[..., 0].abs() + 1.0
        m.router.weight[0, 0] += 1.0
        m.router.weight[1, 0] += 0.7
    ratios = []
    for _ in range(80):
        with torch.no_grad():
            _, stats = m(x)
        ratios.append(_load_ratio(stats["counts"]))
        update_bias(m.router.expert_bias, stats["counts"], cfg.bias_update_speed)
    assert ratios[0] > 3.0, ratios[0]  # genuinely skewed at the start (4.0 = two experts take all)
    late = sum(ratios[-20:]) / 20  # the sign rule oscillates a little: average the tail
    assert late < 0.6 * ratios[0], ratios
    assert m.router.expert_bias[0] < 0 and m.router.expert_bias[1] < 0  # the hot experts were pushed down


def test_expert_bias_is_a_buffer_moved_by_update_bias_not_by_the_optimizer():
    """The bias is state, not a parameter: the optimizer never sees it, a backward + step leaves it
    as it was, and only :func:`update_bias` moves it (and it is saved with the module's state)."""
    cfg = moe_cfg(aux_loss="switch", aux_loss_alpha=0.1, bias_update_speed=0.01)
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, cfg.n_routed_experts))
    assert "router.expert_bias" in dict(m.named_buffers())
    assert "router.expert_bias" not in dict(m.named_parameters()) and "router.expert_bias" in m.state_dict()
    opt = torch.optim.SGD(m.parameters(), lr=1.0, weight_decay=0.5)
    assert all(p is not m.router.expert_bias for g in opt.param_groups for p in g["params"])
    before, router_before = m.router.expert_bias.clone(), m.router.weight.detach().clone()
    y, stats = m(torch.randn(2, 6, cfg.d_model, generator=torch.Generator().manual_seed(3)))
    (y.square().sum() + stats["aux_loss"]).backward()
    opt.step()
    assert not torch.equal(m.router.weight.detach(), router_before)    # the step did train the router
    assert torch.equal(m.router.expert_bias, before)                   # ... and left the bias alone
    update_bias(m.router.expert_bias, stats["counts"], cfg.bias_update_speed)
    assert (m.router.expert_bias - before).abs().max() == pytest.approx(cfg.bias_update_speed)


def test_bias_not_updated_and_no_counts_in_eval():
    cfg = moe_cfg(bias_update_speed=0.05)
    model = Transformer(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    model.train()
    out = model(idx, idx)
    assert out.expert_counts is not None and out.expert_counts.shape == (len(model.moe_layers), cfg.n_routed_experts)
    assert int(out.expert_counts.sum()) == len(model.moe_layers) * idx.numel() * cfg.top_k
    model.update_expert_bias(out.expert_counts)
    bias_after_train = [mm.router.expert_bias.clone() for mm in model.moe_layers]
    assert any(b.abs().sum() > 0 for b in bias_after_train)  # training counts did move the bias
    model.eval()
    with torch.no_grad():
        for _ in range(3):
            out = model(idx, idx)
            assert out.expert_counts is None and out.dropped is None
    for mm, b in zip(model.moe_layers, bias_after_train):
        assert torch.equal(mm.router.expert_bias, b)
    _, stats = model.moe_layers[0](torch.randn(1, 4, cfg.d_model))
    assert "counts" not in stats and float(stats["aux_loss"]) == 0.0


def test_capacity_drop_counts_hand_computed():
    """E=2, top-1, 6 tokens: 4 go to expert 0, 2 to expert 1. cf=1 -> capacity ceil(6*1/2)=3, so
    expert 0 drops its lowest-weight assignment (1 dropped); cf=0.5 -> capacity 2, 2 dropped."""
    cfg = moe_cfg(d_model=4, n_routed_experts=2, top_k=1, n_shared_experts=0, aux_loss="none",
                  bias_update_speed=0.0, moe_d_ff=8)
    m = make_moe(cfg).train()
    with torch.no_grad():
        m.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0]]))
    # token margins (x0 - x1) for expert 0: 3, 2, 0.5, 1 -> token 2 has the lowest weight
    x = torch.tensor([[3.0, 0, 1, 1], [2.0, 0, 1, 1], [0.5, 0, 1, 1], [1.0, 0, 1, 1],
                      [0.0, 2.0, 1, 1], [0.0, 1.0, 1, 1]]).view(1, 6, 4)
    _, s = m(x)
    assert s["counts"].tolist() == [4, 2] and int(s["dropped"]) == 0
    for impl in ("loop", "sorted", "grouped", "padded"):
        m.impl = impl
        m.cfg.capacity_factor = 1.0
        y, s = m(x)
        assert int(s["dropped"]) == 1 and s["counts"].tolist() == [4, 2]
        dropped_rows = (y[0].abs().sum(-1) == 0).nonzero().flatten().tolist()
        assert dropped_rows == [2], impl  # no shared expert: the dropped token gets zero output
        m.cfg.capacity_factor = 0.5
        y, s = m(x)
        assert int(s["dropped"]) == 2
        assert (y[0].abs().sum(-1) == 0).nonzero().flatten().tolist() == [2, 3]
    m.cfg.capacity_factor = 0.0


def test_capacity_keep_pure():
    e = torch.tensor([1, 0, 1, 1, 0, 1])
    w = torch.tensor([0.2, 0.5, 0.9, 0.1, 0.4, 0.3])
    # expert 1 has 4 assignments (w .2 .9 .1 .3), capacity 2 keeps .9 and .3; expert 0 keeps both
    assert capacity_keep(e, w, 2, 2).tolist() == [False, True, True, False, True, True]
    assert capacity_keep(e, w, 2, 10).all()
    assert capacity_keep(e, w, 2, 1).tolist() == [False, True, True, False, False, False]


def test_balance_losses_hand_computed():
    scores = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    idx = torch.tensor([[0], [0]])
    # f = (1, 0), P = (0.7, 0.3): switch = 2 * (1*0.7 + 0*0.3) = 1.4; variance = 0.2^2 + 0.2^2 = 0.08
    assert float(balance_loss("switch", scores, idx)) == pytest.approx(1.4)
    assert float(balance_loss("variance", scores, idx)) == pytest.approx(0.08)
    assert float(balance_loss("none", scores, idx)) == 0.0
    # sigmoid scores are normalised to a distribution first: (0.6, 0.2) -> (0.75, 0.25)
    sig = torch.tensor([[0.6, 0.2]])
    assert float(balance_loss("variance", sig, torch.tensor([[1]]))) == pytest.approx(2 * 0.25 ** 2)
    assert float(balance_loss("switch", sig, torch.tensor([[1]]))) == pytest.approx(2 * 0.25)
    # top-2 of 4: f counts assignments (k per token)
    s4 = torch.full((2, 4), 0.25)
    idx4 = torch.tensor([[0, 1], [0, 2]])  # f = (0.5, 0.25, 0.25, 0)
    assert float(balance_loss("switch", s4, idx4)) == pytest.approx(4 * 0.25 * 1.0)
    with pytest.raises(ValueError):
        balance_loss("bogus", scores, idx)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("kind", ["switch", "variance"])
def test_aux_loss_reported_with_alpha_in_training(score_func, kind):
    """``MoE.forward``'s aux loss == alpha * the balance loss of the scores as a distribution: for
    sigmoid scores (not summing to one) the forward must normalise them, computed here by hand."""
    cfg = moe_cfg(aux_loss=kind, aux_loss_alpha=0.1, score_func=score_func)
    m = make_moe(cfg).train()
    x = torch.randn(2, 5, cfg.d_model, generator=torch.Generator().manual_seed(2))
    _, s = m(x)
    idx, _, scores = m.router(x.view(-1, cfg.d_model))
    E = cfg.n_routed_experts
    P = (scores / scores.sum(-1, keepdim=True)).mean(0)
    f = torch.bincount(idx.flatten(), minlength=E).float() / idx.numel()
    want = E * (f * P).sum() if kind == "switch" else ((P - 1.0 / E) ** 2).sum()
    assert float(s["aux_loss"].detach()) == pytest.approx(0.1 * float(want.detach()), rel=1e-5)
    assert s["aux_loss"].requires_grad  # it trains the router


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_uniform_router_has_minimal_balance_loss_in_forward(score_func):
    """A uniform router (zero weights: softmax 1/E, sigmoid 0.5 for every expert) has switch loss
    exactly 1 and variance loss 0, whatever experts the ties pick (sigmoid scores taken as already
    normalised would give E * 0.5 = 4 here)."""
    for kind, want in (("switch", 1.0), ("variance", 0.0)):
        cfg = moe_cfg(aux_loss=kind, aux_loss_alpha=1.0, score_func=score_func)
        m = make_moe(cfg).train()
        with torch.no_grad():
            m.router.weight.zero_()
        _, s = m(torch.randn(2, 7, cfg.d_model, generator=torch.Generator().manual_seed(0)))
        assert float(s["aux_loss"].detach()) == pytest.approx(want, abs=1e-6), kind


@pytest.mark.parametrize("score_func,top_k", [("softmax", 2), ("sigmoid", 2), ("sigmoid", 1)])
def test_router_bias_picks_experts_but_weights_are_the_raw_scores(score_func, top_k):
    """With a non-zero ``expert_bias`` the router selects by score + bias, but mixes with the raw
    scores of the chosen experts (renormalised over the k chosen where the config says so)."""
    cfg = moe_cfg(score_func=score_func, top_k=top_k, bias_update_speed=0.01, routed_scaling=1.5)
    m = make_moe(cfg).train()
    E = cfg.n_routed_experts
    with torch.no_grad():
        m.router.expert_bias.copy_(torch.tensor([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.6, 0.9])[:E])
    x = torch.randn(16, cfg.d_model, generator=torch.Generator().manual_seed(8))
    idx, w, scores = m.router(x)
    biased = (scores + m.router.expert_bias).topk(top_k, -1).indices
    assert torch.equal(idx.sort(-1).values, biased.sort(-1).values)
    assert not torch.equal(idx.sort(-1).values, scores.topk(top_k, -1).indices.sort(-1).values)  # bias mattered
    raw = scores.gather(1, idx)
    want = raw / raw.sum(-1, keepdim=True) if (top_k > 1 or score_func == "sigmoid") else raw
    torch.testing.assert_close(w, want * 1.5)


def test_sigmoid_top1_routing_weight_is_one_and_softmax_top1_is_the_probability():
    """Top-1 routing, hand-computed: sigmoid scores renormalised over the one chosen expert give
    weight 1 (times ``routed_scaling``; DeepSeek-V3's rule), softmax top-1 keeps the probability
    (V2's rule: renormalise only for k > 1); ``norm_topk_prob=False`` keeps the raw sigmoid score."""
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 1.0, 3.0]])
    sig, soft = logits.sigmoid(), logits.softmax(-1)
    idx, w = route(sig, 1, score_func="sigmoid", routed_scaling=2.5)
    assert idx.tolist() == [[0], [2]] and w.tolist() == [[2.5], [2.5]]
    _, w = route(sig, 1, score_func="sigmoid", norm_topk_prob=False)
    torch.testing.assert_close(w, sig[[0, 1], [0, 2]][:, None])
    _, w = route(soft, 1, score_func="softmax")
    torch.testing.assert_close(w, soft[[0, 1], [0, 2]][:, None])
    # in the layer: sigmoid top-1 without shared experts is exactly routed_scaling * the chosen expert
    cfg = moe_cfg(score_func="sigmoid", top_k=1, n_shared_experts=0, routed_scaling=2.5, aux_loss="none")
    m = make_moe(cfg).eval()
    x = torch.randn(1, 5, cfg.d_model, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        y, _ = m(x)
        e = m.router(x.view(-1, cfg.d_model))[0][:, 0]
        want = torch.stack([2.5 * m.experts.expert_forward(int(e[n]), x[0, n:n + 1])[0] for n in range(5)])
    torch.testing.assert_close(y[0], want, atol=1e-5, rtol=1e-5)


def test_group_limited_routing_stays_in_selected_groups():
    g = torch.Generator().manual_seed(6)
    scores = torch.rand(50, 12, generator=g)
    idx, w = route(scores, 3, n_groups=4, topk_groups=2, score_func="softmax")
    groups = idx // 3
    assert ((groups[:, :, None] == groups[:, None, :]).any(-1)).all()
    assert all(len(set(r)) <= 2 for r in groups.tolist())
    # the chosen groups are the 2 with the highest max score
    top_groups = scores.view(50, 4, 3).amax(-1).topk(2, dim=-1).indices.sort(-1).values
    for r, tg in zip(groups.tolist(), top_groups.tolist()):
        assert set(r) <= set(tg)
    torch.testing.assert_close(w.sum(-1), torch.ones(50))  # renormalised
    # without groups, top-3 over all 12
    idx_all, _ = route(scores, 3)
    assert torch.equal(idx_all.sort(-1).values, scores.topk(3, dim=-1).indices.sort(-1).values)


@pytest.mark.parametrize("kw, fragment", [
    (dict(top_k=9, n_routed_experts=8), "top_k"),
    (dict(top_k=0), "top_k"),
    (dict(n_groups=3), "n_groups"),
    (dict(n_groups=4, topk_groups=5), "topk_groups"),
    (dict(n_groups=4, topk_groups=1, top_k=3), "top_k"),
    (dict(score_func="relu"), "score_func"),
    (dict(aux_loss="l2"), "aux_loss"),
    (dict(capacity_factor=-1.0), "capacity_factor"),
    (dict(moe_impl="fast"), "moe_impl"),
    (dict(bias_update_speed=-0.1), "bias_update_speed"),
    (dict(moe_d_ff=0), "moe_d_ff"),
])
def test_bad_moe_config_raises_config_error(kw, fragment):
    cfg = model_micro()
    cfg.n_routed_experts = 8
    for k, v in kw.items():
        setattr(cfg, k, v)
    with pytest.raises(ConfigError) as ei:
        Transformer(cfg)
    msg = str(ei.value)
    assert fragment in msg and "\n" not in msg


def test_auto_uses_grouped_kernel_on_cpu_when_available():
    m = make_moe(moe_cfg(moe_impl="auto"))
    x = torch.randn(4, m.cfg.d_model)
    expected = "grouped" if grouped_mm_ok(torch.device("cpu"), torch.float32) else "sorted"
    assert m.variants[0] == expected and m.variant(x) == expected  # the weights require grad
    if hasattr(torch, "_grouped_mm") and torch.__version__ >= (2, 13):
        assert expected == "grouped"  # torch 2.13 CPU runs _grouped_mm in fp32 with autograd


def test_auto_picks_the_fused_node_only_when_gradients_flow(monkeypatch):
    monkeypatch.setitem(moe_infer.KERNELS.state, "failed", True)  # no C kernel: tests/test_moe_kernel.py
    cfg = model_micro()
    m = MoE(cfg)
    x = torch.randn(6, cfg.d_model)
    if not grouped_mm_ok(x.device, x.dtype):
        pytest.skip("no grouped_mm here: auto is the sorted loop")
    assert m.variants == ("grouped", "infer")
    assert m.variant(x) == "grouped"                          # weights require grad
    ran = []
    for name in ("_sorted", "_grouped_autograd"):
        real = getattr(MoE, name)
        monkeypatch.setattr(MoE, name, lambda self, *a, real=real, name=name: ran.append(name) or real(self, *a))
    with torch.no_grad():
        assert m.variant(x) == "infer"
        m(x.view(1, 6, -1))
        m(x[:1].view(1, 1, -1))                               # one token: only top_k experts run
    with torch.inference_mode():
        assert m.variant(x) == "infer"
    assert ran == ["_grouped_autograd", "_sorted"]


def test_variants_are_chosen_once_and_again_when_the_module_changes():
    """The seam: ``variants`` is fixed at build and re-chosen when ``impl`` is set, the module is
    moved or cast, its state is loaded with ``assign`` (from the meta device) or its experts swapped."""
    cfg = moe_cfg()
    m = make_moe(cfg)
    on_cpu = m.variants
    assert on_cpu[1] == ("kernel" if not moe_infer.KERNELS.state["failed"] else "infer")
    m.impl = "sorted"
    assert m.variants == ("sorted", "sorted")
    m.impl = "auto"
    assert m.variants == on_cpu
    with pytest.raises(ValueError, match="unknown MoE dispatch"):
        m.impl = "fast"
    m.double()
    assert m.variants[1] == "infer"                           # no fp32 C kernel for float64
    m.float()
    assert m.variants == on_cpu
    with torch.device("meta"):
        meta = MoE(cfg)
    assert meta.variants[1] == "infer"
    meta.load_state_dict(m.state_dict(), assign=True)
    assert meta.variants == on_cpu
    m.experts = type(m.experts)(cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff).double()
    assert m.variants[1] == "infer"
