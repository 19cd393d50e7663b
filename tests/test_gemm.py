"""The GEMM backend seam (tinyseek/kernels/gemm.py): oneDNN's linear with autograd equals F.linear in
value and gradients; the choice is forced by TINYSEEK_GEMM, measured once and kept in a private cache
file otherwise; the model's Linear takes it for training and many rows."""
from __future__ import annotations

import json
import os
import stat

import pytest
import torch
import torch.nn.functional as F

from tinyseek.kernels import gemm
from tinyseek.model.layers import Linear

needs_onednn = pytest.mark.skipif(not gemm.onednn_available(), reason="this PyTorch has no oneDNN linear")


@pytest.fixture
def fresh_choice(monkeypatch, tmp_path):
    """No decision in this process yet, the cache in tmp_path."""
    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setenv("TINYSEEK_KERNEL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("TINYSEEK_GEMM", raising=False)
    return tmp_path / "cache" / "gemm.json"


@needs_onednn
@pytest.mark.parametrize("shape, bias", [((4, 33, 70), True), ((257, 64), False), ((1, 3), True)])
def test_onednn_linear_equals_f_linear_in_value_and_gradients(shape, bias):
    g = torch.Generator().manual_seed(sum(shape))
    K, N = shape[-1], 50
    x = torch.randn(*shape, generator=g, requires_grad=True)
    w = torch.randn(N, K, generator=g, requires_grad=True)
    b = torch.randn(N, generator=g, requires_grad=True) if bias else None
    gy = torch.randn(*shape[:-1], N, generator=g)
    leaves = [t for t in (x, w, b) if t is not None]
    y = gemm.linear(x, w, b)
    got = torch.autograd.grad(y, leaves, gy)
    y_ref = F.linear(x, w, b)
    want = torch.autograd.grad(y_ref, leaves, gy)
    assert y.shape == y_ref.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-4)
    for a, r in zip(got, want):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-4)


def test_fits_takes_only_plain_cpu_fp32():
    x, w = torch.randn(2, 3), torch.randn(4, 3)
    assert gemm.fits(x, w, None) and gemm.fits(x, w, torch.randn(4))
    assert not gemm.fits(x.double(), w.double(), None)
    assert not gemm.fits(x, w.half(), None)
    assert not gemm.fits(x, torch.randn(2, 4, 3), None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not gemm.fits(x, w, None)


@pytest.mark.parametrize("forced", ["mkl", "onednn"])
def test_the_environment_forces_a_backend_without_measuring(fresh_choice, monkeypatch, forced):
    monkeypatch.setenv("TINYSEEK_GEMM", forced)
    monkeypatch.setattr(gemm, "measure", lambda: pytest.fail("measured although forced"))
    want = forced if gemm.onednn_available() else "mkl"
    assert gemm.backend() == want
    assert not fresh_choice.exists()


def test_a_bad_environment_value_is_refused(fresh_choice, monkeypatch):
    monkeypatch.setenv("TINYSEEK_GEMM", "blis")
    with pytest.raises(ValueError, match="TINYSEEK_GEMM must be one of auto, mkl, onednn"):
        gemm.backend()


@needs_onednn
@pytest.mark.parametrize("mkl_s, onednn_s, want", [(1.0, 0.8, "onednn"), (1.0, 0.97, "mkl"), (1.0, 1.3, "mkl")])
def test_auto_measures_once_keeps_the_verdict_privately_and_needs_the_margin(fresh_choice, monkeypatch,
                                                                              mkl_s, onednn_s, want):
    calls = []
    monkeypatch.setattr(gemm, "measure", lambda: calls.append(1) or {"mkl": mkl_s, "onednn": onednn_s})
    assert gemm.backend() == want
    assert gemm.backend() == want and len(calls) == 1          # decided once in a process
    st = os.stat(fresh_choice)
    assert stat.S_IMODE(st.st_mode) & 0o077 == 0               # the cache file is the user's alone
    entry = json.loads(fresh_choice.read_text())[gemm._key()]
    assert entry["backend"] == want
    monkeypatch.setattr(gemm, "_chosen", {})                   # a new process: the file answers
    assert gemm.backend() == want and len(calls) == 1
    fresh_choice.write_text("{not json")                       # a broken cache file: measured again
    monkeypatch.setattr(gemm, "_chosen", {})
    assert gemm.backend() == want and len(calls) == 2


@needs_onednn
def test_model_linear_trains_through_the_chosen_backend(fresh_choice, monkeypatch):
    """With oneDNN chosen, a training call of the model's Linear goes through it (and its gradients
    equal nn.Linear's); with MKL chosen it is F.linear."""
    used = []
    real = gemm.linear
    monkeypatch.setattr(gemm, "linear", lambda *a: used.append(1) or real(*a))
    lin = Linear(16, 8)
    ref = torch.nn.Linear(16, 8)
    ref.load_state_dict(lin.state_dict())
    x = torch.randn(3, 5, 16)
    for forced, n_used in (("onednn", 1), ("mkl", 0)):
        monkeypatch.setattr(gemm, "_chosen", {})
        monkeypatch.setenv("TINYSEEK_GEMM", forced)
        used.clear()
        lin.zero_grad()
        ref.zero_grad()
        lin(x).square().sum().backward()
        ref(x).square().sum().backward()
        assert len(used) == n_used
        torch.testing.assert_close(lin.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(lin.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-4)
