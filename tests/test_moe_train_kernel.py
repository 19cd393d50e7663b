"""The fp32 CPU training kernel of the routed experts (tinyseek/kernels/moe_train.py) == the
PyTorch path of the fused node == the per-expert autograd reference."""
from __future__ import annotations

import pytest
import torch

from tinyseek.kernels import moe_shared
from tinyseek.kernels import moe_train as mtk
from tinyseek.kernels.moe_grouped import routed_experts
from test_moe import make_moe, moe_cfg, run
from test_moe_fused import _inputs, _reference, check_only_requested_grads


@pytest.fixture
def kern():
    k = mtk.ready()
    if k is None:
        pytest.skip("the training kernel is not available here (no compiler or no sgemm_ in this torch)")
    return k


@pytest.fixture
def counted(monkeypatch):
    """Counts the kernel's forward and backward calls."""
    calls = {"fwd": 0, "bwd": 0}
    fwd, bwd = mtk.forward, mtk.backward

    def f(*a, **kw):
        calls["fwd"] += 1
        return fwd(*a, **kw)

    def b(*a, **kw):
        calls["bwd"] += 1
        return bwd(*a, **kw)

    monkeypatch.setattr(mtk, "forward", f)
    monkeypatch.setattr(mtk, "backward", b)
    return calls


def _node_grads(args, gy, on: bool):
    mtk.KERNELS.state["enabled"] = on
    try:
        y = routed_experts(*args)
        return [y.detach()] + list(torch.autograd.grad(y, args[:4], gy))
    finally:
        mtk.KERNELS.state["enabled"] = True


@pytest.mark.parametrize("drop", [False, True])
def test_kernel_node_equals_torch_path_and_reference(kern, counted, drop):
    """Output and the gradients of x, both expert weights and the routing weights; an expert with
    no rows (3) and, with ``drop``, a token that lost every assignment."""
    args, counts = _inputs(N=40, k=2, E=4, D=24, Fh=20, drop=drop, seed=5, dtype=torch.float32)
    assert counts[3] == 0
    gy = torch.randn(40, 24, generator=torch.Generator().manual_seed(1))
    with_kernel = _node_grads(args, gy, True)
    assert counted == {"fwd": 1, "bwd": 1}
    torch_path = _node_grads(args, gy, False)
    assert counted == {"fwd": 1, "bwd": 1}  # switched off: not called
    y_ref = _reference(*args)
    ref = [y_ref.detach()] + list(torch.autograd.grad(y_ref, args[:4], gy))
    for name, a, b, r in zip(("y", "x", "w_gate_up", "w_down", "w_R"), with_kernel, torch_path, ref):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
        torch.testing.assert_close(a, r, atol=2e-5, rtol=1e-4, msg=name)
    assert torch.count_nonzero(with_kernel[2][3]) == 0 and torch.count_nonzero(with_kernel[3][3]) == 0
    if drop:
        assert with_kernel[0][0].abs().sum() == 0


def test_kernel_computes_only_requested_grads(kern, counted):
    check_only_requested_grads(_inputs(N=30, k=3, E=5, D=16, Fh=12, seed=6, dtype=torch.float32)[0],
                               atol=2e-5, rtol=1e-4)
    assert counted == {"fwd": 1, "bwd": 1}


def test_kernel_on_threads_equals_one_thread(kern, counted):
    """Above ``PAR_MIN_MACS`` on two threads, the experts are shared out over worker threads: the
    same bits as one thread (each expert's GEMMs on one thread either way)."""
    args, counts = _inputs(N=1024, k=2, E=6, D=128, Fh=96, seed=7, dtype=torch.float32)
    assert int(counts.sum()) * 128 * 192 >= mtk.PAR_MIN_MACS
    gy = torch.randn(1024, 128, generator=torch.Generator().manual_seed(2))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _node_grads(args, gy, True)
        torch.set_num_threads(2)
        assert len(mtk.kernel_runs(args[7], int(counts.sum()) * 128 * 192)) == 2
        two = _node_grads(args, gy, True)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert counted == {"fwd": 2, "bwd": 2}
    for a, b in zip(one, two):
        assert torch.equal(a, b)


def test_ctypes_build_equals_extension(kern):
    """The plain-C build (no Python.h) computes the same numbers as the extension."""
    lib_c = mtk.KERNELS.load("ctypes")
    args, _ = _inputs(N=50, k=2, E=4, D=32, Fh=16, seed=8, dtype=torch.float32)
    x, w_gu, w_d, w_R, tok_R, _, _, offs = [a.detach() if torch.is_tensor(a) else a for a in args]
    runs = [(0, 4)]
    outs = [mtk.forward(k, x, w_gu, w_d, w_R, tok_R, offs, runs) for k in (kern, (lib_c, kern[1]))]
    for a, b in zip(*outs):
        assert torch.equal(a, b)
    dout = torch.randn_like(x)
    grads = [mtk.backward(k, dout, w_gu, w_d, w_R, tok_R, offs, *outs[0][1:], runs, True, True, True, True)
             for k in (kern, (lib_c, kern[1]))]
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_moe_training_uses_the_kernel_and_matches_the_loop(kern, counted):
    """``auto`` in training on CPU fp32 takes the fused node, which runs the kernel; every gradient
    equals the reference loop's."""
    cfg = moe_cfg(capacity_factor=1.0)
    m = make_moe(cfg).train()
    x = torch.randn(3, 11, cfg.d_model, generator=torch.Generator().manual_seed(9))
    y_ref, dx_ref, g_ref, _ = run(m, "loop", x)
    y, dx, g, _ = run(m, "auto", x)
    assert counted == {"fwd": 1, "bwd": 1}
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(dx, dx_ref, atol=1e-5, rtol=1e-5)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=1e-5, rtol=1e-5, msg=name)


def test_under_bf16_autocast_the_routed_experts_stay_fp32_in_the_kernel(kern, counted):
    """CPU bf16 autocast: the routed experts run in the fp32 kernel (the bf16 PyTorch grouped path made
    a training step slower than fp32), so the MoE block's output is the fp32 block's up to the bf16
    shared expert and router."""
    cfg = moe_cfg(capacity_factor=1.0)
    m = make_moe(cfg).train()
    x = torch.randn(3, 11, cfg.d_model, generator=torch.Generator().manual_seed(9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _, _, _ = run(m, "auto", x)
    assert counted == {"fwd": 1, "bwd": 1}
    y_ref, _, _, _ = run(m, "loop", x)
    torch.testing.assert_close(y.float(), y_ref, atol=5e-2, rtol=5e-2)


def test_without_sgemm_the_torch_path_runs(monkeypatch, tmp_path, counted):
    assert mtk.find_sgemm(str(tmp_path)) == 0  # no libtorch_cpu there
    monkeypatch.setitem(mtk._SGEMM, "addr", 0)
    assert mtk.ready() is None
    args, _ = _inputs(N=20, k=2, E=4, D=8, Fh=8, seed=10, dtype=torch.float32)
    y = routed_experts(*args)
    y.sum().backward()
    assert counted == {"fwd": 0, "bwd": 0}
    torch.testing.assert_close(y, _reference(*args), atol=1e-5, rtol=1e-5)


def test_not_used_for_float64(kern, counted):
    args, _ = _inputs(seed=11)  # float64 (gradcheck's dtype): the PyTorch path
    routed_experts(*args).sum().backward()
    assert counted == {"fwd": 0, "bwd": 0}
    assert mtk.usable(*[a.float() for a in args[:4]]) is not None  # the same tensors in fp32 would use it


@pytest.mark.slow
def test_torch_compile_of_the_block_traces_the_torch_ops():
    """Under ``torch.compile`` tracing neither the training kernel nor the route kernels run (no
    data pointers to fake tensors): the compiled block trains and matches eager."""
    cfg = moe_cfg()
    m = make_moe(cfg).train()
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(12))
    y_ref, dx_ref, g_ref, _ = run(m, "auto", x)
    compiled = torch.compile(m)
    m.zero_grad(set_to_none=True)
    xi = x.clone().requires_grad_(True)
    y, stats = compiled(xi)
    w = torch.linspace(-1.0, 1.0, y.numel()).view_as(y)  # the loss of test_moe.run
    ((y * w).sum() + stats["aux_loss"]).backward()
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(xi.grad, dx_ref, atol=1e-5, rtol=1e-5)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _shared_moe(e=16, k=2, f=64, shared=2, d=64):
    cfg = moe_cfg(d_model=d, n_routed_experts=e, top_k=k, moe_d_ff=f, n_shared_experts=shared,
                  kv_lora_rank=16, n_heads=2)
    return make_moe(cfg).train(), cfg


def _folded_calls(monkeypatch):
    calls = []
    real = moe_shared.ExpertsWithShared.apply
    monkeypatch.setattr(moe_shared.ExpertsWithShared, "apply", lambda *a: calls.append(1) or real(*a))
    return calls


def test_shared_expert_folded_on_two_threads_equals_apart(kern, two_threads, monkeypatch):
    """On 2 threads the shared expert joins the routed experts' node (its GEMMs on the first worker):
    the output and every gradient as with the shared expert apart (and as the reference loop), the
    same bits when run twice."""
    m, cfg = _shared_moe()
    calls = _folded_calls(monkeypatch)
    x = torch.randn(4, 256, cfg.d_model, generator=torch.Generator().manual_seed(13))
    folded = run(m, "auto", x)
    assert calls == [1]
    again = run(m, "auto", x)
    assert torch.equal(folded[0], again[0]) and all(torch.equal(folded[2][n], again[2][n]) for n in folded[2])
    with monkeypatch.context() as mp:
        mp.setattr(type(m), "_grouped_with_shared", lambda *a: None)
        apart = run(m, "auto", x)
    ref = run(m, "loop", x)
    assert calls == [1, 1]
    for other in (apart, ref):
        torch.testing.assert_close(folded[0], other[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(folded[1], other[1], atol=1e-5, rtol=1e-5)
        for name in other[2]:
            torch.testing.assert_close(folded[2][name], other[2][name], atol=1e-5, rtol=1e-4, msg=name)
    assert {n for n in folded[2] if n.startswith("shared.")} == {"shared.gate_proj.weight", "shared.up_proj.weight",
                                                                 "shared.down_proj.weight"}


def test_shared_expert_stays_apart_where_folding_does_not_apply(kern, two_threads, monkeypatch):
    m, cfg = _shared_moe()
    calls = _folded_calls(monkeypatch)
    x = torch.randn(4, 256, cfg.d_model, generator=torch.Generator().manual_seed(14))
    torch.set_num_threads(1)
    run(m, "auto", x)  # one thread: nothing to overlap
    torch.set_num_threads(2)
    h = m.shared.up_proj.register_forward_hook(lambda mod, i, o: None)  # e.g. a per-sample gradient tool
    run(m, "auto", x)
    h.remove()
    run(m, "auto", x[:, :4])  # too small to share out
    with torch.no_grad():
        m(x)  # inference
    assert calls == []
    run(m, "auto", x)
    assert calls == [1]


def test_expert_runs_balance_the_shared_expert_head():
    spans = [(i * 10, (i + 1) * 10) for i in range(8)]  # 8 experts x 10 rows
    assert mtk.expert_runs(spans, 2) == [(0, 4), (4, 8)]
    assert mtk.expert_runs(spans, 2, head=40) == [(0, 2), (2, 8)]  # 40 + 20 | 60
    assert mtk.expert_runs(spans, 2, head=200) == [(0, 0), (0, 8)]  # the head alone outweighs all
    assert mtk.expert_runs(spans, 3, head=30) == [(0, 1), (1, 4), (4, 8)]  # 40 | 30 | 40 of 110
