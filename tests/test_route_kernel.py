"""The router's C kernels (tinyseek/kernels/route.py) == torch.topk / stable torch.sort."""
from __future__ import annotations

import pytest
import torch

from tinyseek.kernels import route as rk


@pytest.fixture
def lib():
    lib = rk._lib()
    if lib is None:
        pytest.skip("the C kernels did not build here (no compiler)")
    return lib


@pytest.mark.parametrize("N,E,k", [(1, 8, 2), (37, 64, 6), (300, 16, 1), (5, 7, 7), (64, 128, 8)])
def test_topk_equals_torch(lib, N, E, k):
    s = torch.randn(N, E, generator=torch.Generator().manual_seed(N + E + k))  # distinct values
    assert torch.equal(rk.topk_indices(s, k), s.topk(k, dim=-1).indices)
    sm = s.softmax(-1)[:, : E]  # a non-contiguous view works too
    assert torch.equal(rk.topk_indices(sm.t().contiguous().t(), k), sm.topk(k, dim=-1).indices)


def test_topk_ties_and_minus_infinity(lib):
    s = torch.tensor([[0.5, 0.5, 0.1, 0.5], [float("-inf"), 1.0, float("-inf"), 2.0]])
    assert rk.topk_indices(s, 3).tolist() == [[0, 1, 3], [3, 1, 0]]  # ties: lower id first


def test_topk_falls_back_to_torch_where_the_kernel_does_not_apply(lib, monkeypatch):
    calls = []
    real = torch.Tensor.topk
    monkeypatch.setattr(torch.Tensor, "topk", lambda self, *a, **kw: calls.append(1) or real(self, *a, **kw))
    s = torch.randn(4, 80)
    rk.topk_indices(s, 3)
    assert calls == []  # the kernel ran
    for t, k in [(s.double(), 3), (s, 65), (s.clone().requires_grad_(), 3)]:
        assert torch.equal(rk.topk_indices(t, k), real(t.detach(), k, dim=-1).indices)
    assert len(calls) == 3


@pytest.mark.parametrize("A,B", [(0, 4), (1, 3), (12288, 65), (1000, 7)])
def test_sort_by_expert_equals_stable_torch_sort(lib, A, B):
    e = torch.randint(0, B - 1, (A,), generator=torch.Generator().manual_seed(A))  # the last bin stays empty
    e_S, order, counts = rk.sort_by_expert(e, B)
    ref_S, ref_order = torch.sort(e, stable=True)
    assert torch.equal(e_S, ref_S) and torch.equal(order, ref_order)
    assert torch.equal(counts, torch.bincount(e, minlength=B))
    assert counts[-1] == 0


def test_sort_rejects_ids_outside_the_bins(lib):
    with pytest.raises(IndexError, match=r"outside \[0, 3\)"):
        rk.sort_by_expert(torch.tensor([0, 3, 1]), 3)


def test_kernels_off_give_the_same_results(lib):
    s = torch.randn(50, 32, generator=torch.Generator().manual_seed(1))
    e = torch.randint(0, 9, (400,), generator=torch.Generator().manual_seed(2))
    on = rk.topk_indices(s, 4), rk.sort_by_expert(e, 10)
    rk.KERNELS.state["enabled"] = False
    try:
        off = rk.topk_indices(s, 4), rk.sort_by_expert(e, 10)
    finally:
        rk.KERNELS.state["enabled"] = True
    assert torch.equal(on[0], off[0])
    assert all(torch.equal(a, b) for a, b in zip(on[1], off[1]))


def test_ctypes_build_equals_extension(lib):
    lib_c = rk.KERNELS.load("ctypes")
    s = torch.randn(20, 16, generator=torch.Generator().manual_seed(3))
    a, b = torch.empty(20, 5, dtype=torch.int64), torch.empty(20, 5, dtype=torch.int64)
    assert lib.ts_topk_f32(s.data_ptr(), 20, 16, 5, a.data_ptr()) == 0
    assert lib_c.ts_topk_f32(s.data_ptr(), 20, 16, 5, b.data_ptr()) == 0
    assert torch.equal(a, b) and torch.equal(a, s.topk(5, dim=-1).indices)
    assert lib_c.ts_topk_f32(s.data_ptr(), 20, 16, 17, b.data_ptr()) == -1  # k > E refused


@pytest.mark.parametrize("E", [7, 16, 64, 100])
def test_portable_build_equals_avx512_build(lib, E):
    """The portable loops (no AVX-512) pick the same experts; a NaN row still gets distinct valid ids."""
    lib_p = rk.KERNELS.load("ctypes", portable=True)
    s = torch.randn(30, E, generator=torch.Generator().manual_seed(E))
    s[3, :] = 0.25  # all tied
    s[4, : E // 2] = float("-inf")
    s[5, 1] = float("nan")
    k = min(6, E)
    a, b = torch.empty(30, k, dtype=torch.int64), torch.empty(30, k, dtype=torch.int64)
    assert lib.ts_topk_f32(s.data_ptr(), 30, E, k, a.data_ptr()) == 0
    assert lib_p.ts_topk_f32(s.data_ptr(), 30, E, k, b.data_ptr()) == 0
    rows = [r for r in range(30) if r != 5]
    assert torch.equal(a[rows], b[rows])
    assert a[3].tolist() == list(range(k))
    for t in (a, b):
        assert t.min() >= 0 and t.max() < E
        assert all(len(set(r.tolist())) == k for r in t)
