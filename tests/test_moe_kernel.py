"""The fp32 C kernel for the routed experts (tinyseek/kernels/moe_infer.py) == the PyTorch dispatch paths."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tinyseek.config import ModelConfig, model_cpu_tiny, model_micro
from tinyseek.kernels import moe_infer as moe_kernel
from tinyseek.kernels.moe_grouped import grouped_mm_ok
from tinyseek.model.moe import MoE
from tinyseek.model.transformer import Transformer
from test_moe import make_moe


@pytest.fixture
def kernels():
    if moe_kernel.KERNELS.ready() is None:
        pytest.skip("the C kernels did not build here (no compiler)")
    return moe_kernel.KERNELS


def moe_cfg(d: int, f: int, e: int, k: int, score: str, **kw) -> ModelConfig:
    base = dict(vocab_size=64, d_model=d, n_layers=2, n_heads=1, max_seq_len=32, d_ff=64, n_dense_layers=1,
                n_routed_experts=e, n_shared_experts=1, moe_d_ff=f, top_k=k, score_func=score)
    base.update(kw)
    return ModelConfig(**base)  # not validated: odd widths are fine for a lone MoE layer


def reference(x, idx, w, w_gate_up, w_down):
    """The definition, one (token, slot) at a time."""
    y = torch.zeros_like(x)
    for n in range(x.shape[0]):
        for k in range(idx.shape[1]):
            g, u = (x[n] @ w_gate_up[idx[n, k]]).chunk(2)
            y[n] += w[n, k] * ((F.silu(g) * u) @ w_down[idx[n, k]])
    return y


def close(a, b, tol=1e-5):
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


SHAPES = {"cpu-tiny": (128, 96, 8, 2), "odd-tails": (33, 19, 6, 3), "top1-unused": (40, 24, 16, 1)}


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("n", [1, 3, 16, 200])
@pytest.mark.parametrize("shape", list(SHAPES))
def test_kernel_dispatch_matches_reference_loop(kernels, shape, n, score):
    d, f, e, k = SHAPES[shape]
    m = make_moe(moe_cfg(d, f, e, k, score, routed_scaling=2.0 if score == "sigmoid" else 1.0)).eval()
    x = torch.randn(1, n, d, generator=torch.Generator().manual_seed(n))
    calls = []
    real = moe_kernel.routed_experts
    with torch.no_grad(), pytest.MonkeyPatch.context() as mp:
        mp.setattr(moe_kernel, "routed_experts", lambda *a, **kw: calls.append(1) or real(*a, **kw))
        m.impl = "kernel"
        y = m(x)[0]
        m.impl = "loop"
        ref = m(x)[0]
    assert calls, "the kernel dispatch did not reach the C kernel"
    assert close(y, ref)
    idx = m.router(x.view(n, d))[0]
    if n == 1:  # top_k of e experts: the others are unused and must not matter
        assert idx.unique().numel() == k < e


def test_kernel_handles_repeated_experts_and_zero_weights(kernels):
    g = torch.Generator().manual_seed(0)
    E, D, Fh = 5, 21, 17
    wgu, wd = torch.randn(E, D, 2 * Fh, generator=g) * 0.3, torch.randn(E, Fh, D, generator=g) * 0.3
    x = torch.randn(7, D, generator=g)
    idx = torch.tensor([[0, 0, 4], [3, 3, 3], [1, 2, 4], [4, 4, 0], [2, 1, 2], [0, 1, 2], [3, 4, 4]])
    w = torch.rand(7, 3, generator=g)
    w[2, 1] = 0.0
    with torch.no_grad():
        y = moe_kernel.routed_experts(x, idx, w, wgu, wd)
        assert close(y, reference(x, idx, w, wgu, wd))
        # int32 ids and a non-contiguous x give the same result
        xt = torch.cat([x, x], 1)[:, :D]
        assert not xt.is_contiguous()
        assert torch.equal(moe_kernel.routed_experts(xt, idx.int(), w, wgu, wd), y)


def test_auto_picks_kernel_only_without_gradients(kernels):
    cfg = moe_cfg(32, 24, 8, 2, "sigmoid", aux_loss="switch")
    m = make_moe(cfg)
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(3))
    m.impl = "auto"
    train_pick = "grouped" if grouped_mm_ok(x.device, x.dtype) else "sorted"
    assert m.variants == (train_pick, "kernel")
    assert m.variant(x.view(-1, 32)) == train_pick             # parameters require grad
    with torch.no_grad():
        assert m.variant(x.view(-1, 32)) == "kernel"
        assert m.variant(x.view(-1, 32)[:1]) == "kernel"
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert m.variant(x.view(-1, 32)) != "kernel"      # autocast: not an fp32 computation
        # a float64 input: the kernel variant runs its PyTorch path (the C kernel takes fp32 only)
        assert moe_kernel.routed_experts(x.view(-1, 32).double(), torch.zeros(10, 2, dtype=torch.long),
                                         torch.ones(10, 2), m.experts.w_gate_up, m.experts.w_down) is None
    with torch.inference_mode():
        assert m.variant(x.view(-1, 32)) == "kernel"

    def train_step(impl):
        m.impl = impl
        m.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y, stats = m.train()(xi)
        (y.square().sum() + stats["aux_loss"]).backward()
        return y.detach(), xi.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None}

    y_auto, dx_auto, g_auto = train_step("auto")
    y_ref, dx_ref, g_ref = train_step(train_pick)
    assert torch.equal(y_auto, y_ref) and torch.equal(dx_auto, dx_ref)
    assert g_auto.keys() == g_ref.keys() and all(torch.equal(g_auto[n], g_ref[n]) for n in g_ref)
    # the kernel dispatch set explicitly with gradients flowing falls back to a differentiable path
    y_k, dx_k, g_k = train_step("kernel")
    assert close(y_k, y_ref) and close(dx_k, dx_ref)
    assert all(close(g_k[n], g_ref[n], 1e-4) for n in g_ref)


def test_auto_leaves_quantized_experts_alone(kernels):
    from tinyseek.quant.modules import QuantExperts

    m = make_moe(moe_cfg(32, 24, 4, 2, "softmax")).eval()
    ex = m.experts
    m.experts = QuantExperts.from_float(ex.w_gate_up.detach(), ex.w_down.detach(), 8)
    m.impl = "auto"
    x = torch.randn(3, 32)
    assert m.variants[1] != "kernel"                       # chosen again when the experts were swapped
    with torch.no_grad():
        m.impl = "kernel"  # set explicitly: the dispatch falls back to the PyTorch path for such experts
        y = m(x.view(1, 3, 32))[0]
        m.impl = "loop"
        assert close(y, m(x.view(1, 3, 32))[0])


def test_fallback_when_disabled_or_capacity_drops(kernels, monkeypatch):
    m = make_moe(moe_cfg(32, 24, 8, 2, "softmax")).eval()
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        m.impl = "kernel"
        on = m(x)[0]
        monkeypatch.setitem(kernels.state, "enabled", False)
        assert moe_kernel.routed_experts(x[0], torch.zeros(9, 2, dtype=torch.long), torch.ones(9, 2),
                                         m.experts.w_gate_up, m.experts.w_down) is None
        m.impl = "auto"
        assert m.variant(x[0]) == "kernel"  # chosen at build; per call it falls back while the kernels are off
        calls = []
        real = MoE._grouped_autograd if grouped_mm_ok(x.device, x.dtype) else MoE._sorted
        monkeypatch.setattr(MoE, real.__name__, lambda self, *a: calls.append(1) or real(self, *a))
        off = m(x)[0]
        assert calls == [1]
        monkeypatch.undo()
        monkeypatch.setitem(kernels.state, "enabled", False)
        m.impl = "kernel"
        assert torch.equal(m(x)[0], off)
        m.impl = "loop"
        assert close(on, off) and close(off, m(x)[0])
        monkeypatch.setitem(kernels.state, "enabled", True)

        # capacity drops (keep_A given): the dispatch never calls the kernel
        mc = make_moe(moe_cfg(32, 24, 8, 2, "softmax", capacity_factor=0.5)).eval()
        mc.impl = "loop"
        ref = mc(x)[0]
        monkeypatch.setattr(moe_kernel, "routed_experts", lambda *a, **kw: pytest.fail("kernel used with drops"))
        mc.impl = "auto"
        assert close(mc(x)[0], ref)


def test_ctypes_portable_and_threaded_builds_agree(kernels):
    g = torch.Generator().manual_seed(2)
    E, D, Fh, N, K = 6, 47, 31, 300, 2  # N * K * 3 * D * F = 2.6M multiply-adds: above PAR_WORK
    wgu, wd = torch.randn(E, D, 2 * Fh, generator=g) * 0.2, torch.randn(E, Fh, D, generator=g) * 0.2
    x = torch.randn(N, D, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    w = torch.rand(N, K, generator=g)
    ref = reference(x, idx, w, wgu, wd)
    outs = {"default": moe_kernel.routed_experts(x, idx, w, wgu, wd),
            "ctypes": moe_kernel.routed_experts(x, idx, w, wgu, wd, lib=kernels.load("ctypes")),
            "portable": moe_kernel.routed_experts(x, idx, w, wgu, wd, lib=kernels.load("ctypes", portable=True))}
    threads = torch.get_num_threads()
    try:  # N * K * 3 * D * F is above the kernel's threshold: two threads share the expert blocks
        torch.set_num_threads(2)
        outs["2 threads"] = moe_kernel.routed_experts(x, idx, w, wgu, wd)
    finally:
        torch.set_num_threads(threads)
    for name, y in outs.items():
        assert close(y, ref), name
    assert torch.equal(outs["2 threads"], outs["default"])  # each assignment has its own row: same sums


def test_bad_expert_index_raises(kernels):
    wgu, wd = torch.randn(4, 8, 12), torch.randn(4, 6, 8)
    x, w = torch.randn(2, 8), torch.ones(2, 2)
    for bad in (4, -1):
        with pytest.raises(IndexError, match="4 experts"):
            moe_kernel.routed_experts(x, torch.tensor([[0, 1], [2, bad]]), w, wgu, wd)
    with pytest.raises(ValueError, match="do not fit"):
        moe_kernel.routed_experts(torch.randn(2, 9), torch.tensor([[0, 1], [2, 3]]), w, wgu, wd)


@pytest.mark.parametrize("preset", ["micro", "cpu-tiny"])
def test_kv_cache_decode_with_kernel_equals_full_forward(kernels, preset, monkeypatch):
    torch.manual_seed(0)
    cfg = model_micro() if preset == "micro" else model_cpu_tiny()
    cfg.n_layers = min(cfg.n_layers, 3)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # some spread so the routing and logits are not all ~0
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    idx = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    calls = []  # the rows of each call the C kernel ran (not those where it was off)
    real = moe_kernel.routed_experts

    def counted(*a, **kw):
        y = real(*a, **kw)
        if y is not None:
            calls.append(a[0].shape[0])
        return y
    monkeypatch.setattr(moe_kernel, "routed_experts", counted)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(2)
        steps = torch.cat([model(idx[:, :4], cache=cache).logits]
                          + [model(idx[:, t:t + 1], cache=cache).logits for t in range(4, 12)], 1)
        monkeypatch.setitem(kernels.state, "enabled", False)
        torch_path = model(idx).logits
    n_moe = sum(isinstance(b.ffn, MoE) for b in model.blocks)
    assert calls.count(2) == 8 * n_moe and calls.count(24) == n_moe  # decode steps and the full forward
    assert close(steps, full, 1e-4)
    assert close(full, torch_path, 1e-5)
