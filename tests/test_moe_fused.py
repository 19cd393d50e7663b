"""The fused routed-expert node (``moe_impl="grouped"``): hand-written backward == autograd maths."""
from __future__ import annotations

import importlib.util
import threading
from pathlib import Path

import pytest
import torch

from tinyseek.kernels import moe_train
from tinyseek.kernels.moe_grouped import combine_plan, grouped_mm, routed_experts
from tinyseek.model.moe import MoE
from test_moe import make_moe, moe_cfg, run

# the comparison-only "compiled" variant lives in benchmarks/ (not a package; registers itself on import)
_SPEC = importlib.util.spec_from_file_location("moe_compiled", Path(__file__).resolve().parents[1] / "benchmarks"
                                               / "moe_compiled.py")
moe_compiled = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(moe_compiled)


def _inputs(N=7, k=2, E=4, D=6, Fh=5, drop=False, seed=0, dtype=torch.float64):
    """A routing with one empty expert (3) and, with ``drop``, some dropped assignments including
    every assignment of token 0; returns the node's arguments."""
    g = torch.Generator().manual_seed(seed)
    idx_NK = torch.stack([torch.randperm(E - 1, generator=g)[:k] for _ in range(N)])  # expert 3 never used
    keep_A = None
    if drop:
        keep_A = torch.rand(N * k, generator=g) > 0.3
        keep_A[:k] = False
    e_A = idx_NK.reshape(-1)
    if keep_A is not None:
        e_A = e_A.masked_fill(~keep_A, E)
    e_S, order_S = torch.sort(e_A, stable=True)
    counts_E = torch.bincount(e_A, minlength=E + 1)[:E]
    order_S = order_S[:int(counts_E.sum())]
    rows, starts = combine_plan(order_S, N * k, k, keep_A)
    x = torch.randn(N, D, generator=g, dtype=dtype, requires_grad=True)
    w_gu = (0.5 * torch.randn(E, D, 2 * Fh, generator=g, dtype=dtype)).requires_grad_()
    w_d = (0.5 * torch.randn(E, Fh, D, generator=g, dtype=dtype)).requires_grad_()
    w_R = torch.rand(order_S.numel(), generator=g, dtype=dtype, requires_grad=True)
    tok_R = order_S // k
    offs = torch.cumsum(counts_E, 0, dtype=torch.int32)
    return (x, w_gu, w_d, w_R, tok_R, rows, starts, offs), counts_E


def assert_matches_loop(m, impl: str, x, atol: float, rtol: float) -> None:
    """Outputs, input grads and every parameter grad of ``impl`` equal the reference loop's."""
    y_ref, dx_ref, g_ref, _ = run(m, "loop", x)
    y, dx, g, _ = run(m, impl, x)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(dx, dx_ref, atol=atol, rtol=rtol)
    for name in g_ref:
        torch.testing.assert_close(g[name], g_ref[name], atol=atol, rtol=rtol, msg=name)


def _reference(x, w_gu, w_d, w_R, tok_R, rows, starts, offs):
    """The same maths with plain autograd ops, expert by expert."""
    Fh = w_d.shape[1]
    out = torch.zeros_like(x)
    ends = offs.tolist()
    for e, (s, t) in enumerate(zip([0] + ends[:-1], ends)):
        h = x[tok_R[s:t]] @ w_gu[e]
        act = torch.nn.functional.silu(h[:, :Fh]) * h[:, Fh:] * w_R[s:t, None]
        out = out.index_add(0, tok_R[s:t], act @ w_d[e])
    return out


@pytest.mark.parametrize("drop", [False, True])
def test_fused_node_gradcheck_float64(drop):
    args, counts = _inputs(drop=drop)
    assert counts[3] == 0  # an empty expert: zero-size groups in every GEMM
    assert torch.autograd.gradcheck(routed_experts, args, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("drop", [False, True])
def test_fused_node_matches_autograd_reference(drop):
    args, _ = _inputs(drop=drop, seed=1)
    y = routed_experts(*args)
    y_ref = _reference(*args)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    if drop:
        assert y[0].abs().sum() == 0  # token 0 lost all its assignments: no routed output
    gy = torch.randn_like(y)
    grads = torch.autograd.grad(y, args[:4], gy)
    grads_ref = torch.autograd.grad(y_ref, args[:4], gy)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "w_R"), grads, grads_ref):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10, msg=name)


def check_only_requested_grads(args, **tol) -> None:
    """With x and W_down frozen, the node's W_gate_up and routing-weight grads equal the reference's."""
    x, w_gu, w_d, w_R = args[:4]
    x.requires_grad_(False)
    w_d.requires_grad_(False)
    y = routed_experts(*args)
    gy = torch.randn_like(y)
    g_gu, g_w = torch.autograd.grad(y, (w_gu, w_R), gy)
    r_gu, r_w = torch.autograd.grad(_reference(*args), (w_gu, w_R), gy)
    torch.testing.assert_close(g_gu, r_gu, **tol)
    torch.testing.assert_close(g_w, r_w, **tol)


def test_fused_node_only_computes_requested_grads():
    check_only_requested_grads(_inputs(seed=2)[0])


@pytest.mark.parametrize("n", [8, 5])  # 5 floats = 20-byte rows: the kernel refuses, the loop runs
def test_grouped_mm_kernel_equals_loop_fallback(n):
    """float32 takes torch._grouped_mm where it runs, float64 the per-group loop: same numbers."""
    g = torch.Generator().manual_seed(3)
    offs = torch.tensor([4, 4, 12], dtype=torch.int32)  # an empty middle group
    a, b3 = torch.randn(12, 8, generator=g), torch.randn(3, 8, n, generator=g)
    b2 = torch.randn(12, n, generator=g)
    torch.testing.assert_close(grouped_mm(a, b3, offs), grouped_mm(a.double(), b3.double(), offs).float())
    torch.testing.assert_close(grouped_mm(a.t(), b2, offs), grouped_mm(a.double().t(), b2.double(), offs).float())
    assert grouped_mm(a.t(), b2, offs)[1].abs().sum() == 0  # no rows: zero weight gradient


def test_grouped_handles_widths_the_kernel_refuses():
    """d_model 6 and expert width 5 (not multiples of 16 bytes) still run and match the loop."""
    cfg = moe_cfg(d_model=6, moe_d_ff=5, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2, v_head_dim=2)
    m = make_moe(cfg).train()
    x = torch.randn(2, 7, cfg.d_model, generator=torch.Generator().manual_seed(5))
    assert_matches_loop(m, "grouped", x, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("capacity", [0.0, 1.0])
def test_moe_grouped_float64_matches_loop(capacity):
    """The whole layer in float64 (GEMMs through the loop fallback) against the reference loop."""
    cfg = moe_cfg(capacity_factor=capacity, top_k=3)
    m = make_moe(cfg).double().train()
    x = torch.randn(2, 9, cfg.d_model, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    assert_matches_loop(m, "grouped", x, atol=1e-12, rtol=1e-10)


def test_grouped_forward_without_grad_and_in_eval():
    m = make_moe(moe_cfg()).eval()
    assert isinstance(m, MoE)
    x = torch.randn(2, 5, m.cfg.d_model)
    m.impl = "loop"
    with torch.no_grad():
        y_ref, _ = m(x)
    m.impl = "grouped"
    with torch.inference_mode():
        y, _ = m(x)
    torch.testing.assert_close(y, y_ref, atol=1e-5, rtol=1e-5)


def test_compile_friendly_swiglu_backward_matches_autograd():
    """The maths the ``compiled`` variant (``benchmarks/moe_compiled.py``) fuses (run eagerly here: no
    compile in the fast suite)."""
    g = torch.Generator().manual_seed(6)
    h = torch.randn(9, 8, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(9, generator=g, dtype=torch.float64, requires_grad=True)
    act, act0 = moe_compiled.swiglu_weighted(h, w)
    torch.testing.assert_close(act0, torch.nn.functional.silu(h[:, :4]) * h[:, 4:])
    gy = torch.randn(9, 4, generator=g, dtype=torch.float64)
    dh_ref, dw_ref = torch.autograd.grad(act, (h, w), gy)
    dh, dw = moe_compiled.swiglu_weighted_backward(gy, h.detach(), w.detach(), act0.detach())
    torch.testing.assert_close(dh, dh_ref)
    torch.testing.assert_close(dw, dw_ref)


def test_compiled_falls_back_to_eager_with_a_warning(monkeypatch):
    def broken(*args):
        raise RuntimeError("no C++ compiler")
    monkeypatch.setattr(moe_compiled, "_COMPILED", {"fwd": broken, "bwd": broken})
    args, _ = _inputs(seed=7)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        y = moe_compiled.CompiledRoutedExperts.apply(*args)
    torch.testing.assert_close(y, _reference(*args))
    y.sum().backward()  # the backward falls back too, silently (already warned)
    assert moe_compiled._COMPILED == {"fwd": None, "bwd": None}


@pytest.mark.slow
def test_compiled_variant_matches_loop():
    """``moe.impl = "compiled"`` (benchmarks/moe_compiled.py): torch.compile'd elementwise (compiles
    ~30 s on the first call)."""
    cfg = moe_cfg(capacity_factor=1.0)
    m = make_moe(cfg).train()
    x = torch.randn(3, 11, cfg.d_model, generator=torch.Generator().manual_seed(8))
    assert_matches_loop(m, "compiled", x, atol=1e-5, rtol=1e-5)


def test_grouped_mm_on_threads_equals_one_thread():
    """With more than one torch thread the experts' GEMMs are shared out over worker threads (one
    expert on one thread): the same numbers as on one thread, for both layouts, empty groups
    included, and the caller's thread count (and that of threads started later) is left alone."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(1536, 128, generator=g)
    b3 = torch.randn(6, 128, 96, generator=g)
    dy = torch.randn(1536, 96, generator=g)
    offs = torch.tensor([100, 100, 700, 900, 1500, 1536], dtype=torch.int32)  # group 1 empty
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = (grouped_mm(a, b3, offs), grouped_mm(a.t(), dy, offs))
        torch.set_num_threads(2)
        assert a.shape[0] * a.shape[1] * b3.shape[-1] >= moe_train.PAR_MIN_MACS  # the threaded path runs
        two = (grouped_mm(a, b3, offs), grouped_mm(a.t(), dy, offs))
        assert torch.get_num_threads() == 2
        seen = []
        t = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        t.start()
        t.join()
        assert seen == [2]
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one[0], two[0]) and torch.equal(one[1], two[1])
    assert torch.count_nonzero(two[1][1]) == 0  # the empty group's weight gradient
    ref = torch.cat([a[s:e] @ b3[i] for i, (s, e) in enumerate(zip([0] + offs.tolist()[:-1], offs.tolist()))])
    torch.testing.assert_close(two[0], ref)


def test_pool_workers_stay_one_thread_after_their_first_torch_op():
    """PyTorch sets a thread's count lazily on its first parallel op, to the last count stored by
    anyone: the workers must have been initialised before the caller stored its count again."""
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        pool = moe_train.pool(2)
        counts = {pool.submit(lambda: (torch.ones(64, 64) @ torch.ones(64, 64), torch.get_num_threads())[1]).result()
                  for _ in range(6)}
        assert counts == {1}
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
