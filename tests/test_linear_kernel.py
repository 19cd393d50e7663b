"""The fp32 C kernel for few-row linear layers (tinyseek/kernels/linear.py) == F.linear, and its
seam, tinyseek.model.layers.Linear (the variant chosen when the module is built or moved)."""
from __future__ import annotations


import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.config import ModelConfig, model_cpu_tiny, model_micro
from tinyseek.kernels import linear as linear_kernel
from tinyseek.kernels import loader
from tinyseek.kernels.linear import MAX_ROWS, linear
from tinyseek.model.layers import Linear
from tinyseek.post.dp import register_opacus
from tinyseek.model.transformer import Transformer
from kernel_fixtures import ragged_decode, switched

pytestmark = pytest.mark.skipif(linear_kernel.KERNELS.lib() is None, reason="no C compiler for the kernels")


def kernels(on: bool):
    """Kernels on (counting calls, ``rows(counter)``: each call's row count) or off, restored afterwards."""
    return switched(linear_kernel.KERNELS, "ts_linear_f32", on)


def rows(counter) -> list[int]:
    return [a[6] for a in counter.args]


def close(a, b, tol=1e-5):
    return a.shape == b.shape and float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


def data(M, K, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(M, K, generator=g), torch.randn(N, K, generator=g) * K ** -0.5, torch.randn(N, generator=g)


SHAPES = [(128, 384), (384, 128), (33, 19), (7, 1), (130, 37), (16, 16), (17, 65)]  # (K, N): K, N tails


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("M", [1, 3, 4, 16, MAX_ROWS])
def test_matches_f_linear(K, N, M):
    x, w, b = data(M, K, N, seed=K * N + M)
    with torch.no_grad():
        assert close(linear(x, w), F.linear(x, w))
        assert close(linear(x, w, b), F.linear(x, w, b))


@pytest.mark.parametrize("K,N", [(128, 384), (33, 19), (130, 37)])
def test_rows_do_not_depend_on_the_other_rows(K, N):
    """Row i of an M-row call is bitwise the 1-row call on row i (and the same in any batch)."""
    x, w, b = data(MAX_ROWS, K, N, seed=1)
    with torch.no_grad():
        alone = torch.cat([linear(x[i:i + 1], w, b) for i in range(MAX_ROWS)])
        for M in (2, 3, 4, 5, 7, 16, 33, MAX_ROWS):
            assert torch.equal(linear(x[:M], w, b), alone[:M]), M
        perm = torch.randperm(MAX_ROWS, generator=torch.Generator().manual_seed(2))[:21]
        assert torch.equal(linear(x[perm], w, b), alone[perm])
        # (B, T, K) decode input: the same rows
        assert torch.equal(linear(x[:12].view(4, 3, K), w, b), alone[:12].view(4, 3, N))


def test_non_contiguous_and_other_layouts():
    x, w, b = data(24, 40, 30, seed=3)
    wide = torch.randn(24, 100)
    cases = {
        "column slice (row stride > K)": wide[:, 5:45],
        "transposed": torch.randn(40, 24).t(),
        "3-d, uneven row spacing": torch.randn(4, 12, 40)[:, ::2],
        "3-d, T=1 slice": torch.randn(6, 5, 40)[:, 2:3],
        "3-d, B=1 strided": torch.randn(1, 10, 80)[:, :, :40],
        "4-d": x.view(2, 3, 4, 40),
        "expanded": x[:1].expand(5, 40),
    }
    with torch.no_grad():
        for name, xi in cases.items():
            y = linear(xi, w, b)
            assert y is not None and y.is_contiguous() and close(y, F.linear(xi, w, b)), name
        # a weight whose rows are not contiguous: not the kernel's layout
        assert linear(x, torch.randn(40, 30).t(), b) is None


def test_falls_back_where_it_does_not_apply():
    x, w, b = data(4, 32, 24, seed=4)
    with kernels(True) as counter:
        wg = w.clone().requires_grad_()
        assert linear(x, wg) is None                                      # training: grad needed
        assert linear(x.clone().requires_grad_(), w) is None
        assert linear(x, w, b.clone().requires_grad_()) is None
        with torch.no_grad():
            assert linear(x, wg) is not None                              # no grad: the kernel
        assert linear(x, w) is not None                                   # nothing requires grad
        with torch.no_grad():
            assert linear(x.double(), w.double()) is None                 # fp64
            assert linear(x.bfloat16(), w.bfloat16()) is None             # bf16
            assert linear(x, w.bfloat16()) is None
            assert linear(x, w, b.double()) is None
            assert linear(torch.randn(MAX_ROWS + 1, 32), w) is None        # too many rows: MKL
            assert linear(torch.randn(3, MAX_ROWS, 32), w) is None
            assert linear(torch.randn(0, 32), w) is None
            assert linear(torch.randn(4, 31), w) is None                  # bad shapes: F.linear reports them
            with torch.autocast("cpu", dtype=torch.bfloat16):
                assert linear(x, w) is None
        assert rows(counter) == [4, 4]
    with kernels(False) as counter, torch.no_grad():
        assert linear(x, w) is None
    with kernels(True) as counter, torch.no_grad():
        linear_kernel.KERNELS.state.update(lib=None, failed=True)        # as without a compiler
        assert linear(x, w) is None


def test_linear_module_is_an_nn_linear():
    torch.manual_seed(0)
    ref = nn.Linear(20, 12)
    m = Linear(20, 12)
    m.load_state_dict(ref.state_dict())
    assert isinstance(m, nn.Linear) and repr(m) == repr(ref)
    assert list(m.state_dict()) == list(ref.state_dict()) and not list(m.buffers())
    x = torch.randn(3, 5, 20)
    with kernels(True) as counter:
        y = m(x)                                                          # grad enabled: F.linear
        assert y.requires_grad and rows(counter) == []
        assert torch.equal(y, ref(x))
        with torch.no_grad():
            assert close(m(x), ref(x)) and rows(counter) == [15]
            assert m(torch.randn(MAX_ROWS + 1, 20)).shape == (MAX_ROWS + 1, 12)  # too many rows: F.linear
            assert rows(counter) == [15]
            assert m.double()(x.double()).dtype == torch.float64 and rows(counter) == [15]


def test_linear_variant_is_chosen_when_built_or_moved():
    """``use_kernel`` follows the weights: set at build, on ``.to`` / ``.double`` / ``to_empty``, on a
    replaced parameter; the forward of the F.linear variant never calls the kernel."""
    m = Linear(20, 12)
    assert m.use_kernel
    m.double()
    assert not m.use_kernel
    m.float()
    assert m.use_kernel
    assert not Linear(20, 12, dtype=torch.bfloat16).use_kernel
    meta = Linear(20, 12, device="meta")
    assert not meta.use_kernel and meta.to_empty(device="cpu").use_kernel
    m.weight = nn.Parameter(torch.randn(20, 12).t())                      # rows not contiguous
    assert not m.use_kernel
    m.weight = nn.Parameter(torch.randn(12, 20))
    assert m.use_kernel
    m.bias = nn.Parameter(torch.randn(12, dtype=torch.float64))
    assert not m.use_kernel
    m.bias = None
    assert m.use_kernel
    m.use_kernel = False
    x = torch.randn(3, 20)
    with kernels(True) as counter, torch.no_grad():
        assert torch.equal(m(x), F.linear(x, m.weight)) and rows(counter) == []
    tied = Transformer(ModelConfig(**{**model_micro().__dict__, "tie_embeddings": True}).validate())
    assert tied.lm_head.weight is tied.embed.weight and tied.lm_head.use_kernel


def test_builds_and_threads_agree():
    """The extension, the ctypes build and the portable (no AVX-512) builds all match F.linear with
    rows independent of the batch; two threads (a call above the threshold) give the same bits."""
    x, w, b = data(MAX_ROWS, 130, 2000, seed=5)  # 64 * 2000 * 130 = 16.6M multiply-adds: threaded
    ref = F.linear(x, w, b)
    outs = {}
    with torch.no_grad():
        for kind, portable in [("pyext", False), ("ctypes", False), ("ctypes", True), ("pyext", True)]:
            try:
                lib = linear_kernel.KERNELS.load(kind, portable=portable)
            except RuntimeError:  # no Python.h: the ctypes builds are compared
                continue
            y = outs[kind, portable] = linear(x, w, b, lib=lib)
            assert close(y, ref), (kind, portable)
            assert torch.equal(linear(x[5:8], w, b, lib=lib), y[5:8]), (kind, portable)
            assert torch.equal(linear(x[7:8], w, b, lib=lib), y[7:8]), (kind, portable)
        assert ("ctypes", True) in outs and ("ctypes", False) in outs
        assert torch.equal(outs["ctypes", False], linear(x, w, b))
        threads = torch.get_num_threads()
        try:
            torch.set_num_threads(2)
            assert torch.equal(linear(x, w, b), outs["ctypes", False])
        finally:
            torch.set_num_threads(threads)


def test_kernels_env_switch(monkeypatch):
    monkeypatch.setenv("TINYSEEK_LINEAR_KERNELS", "0")
    k = loader.Kernels("_tinyseek_linear", linear_kernel.KERNELS.src, linear_kernel.KERNELS.signatures,
                       "TINYSEEK_LINEAR_KERNELS", "test")
    assert k.ready() is None


def test_opacus_gets_the_linear_rules():
    opacus = pytest.importorskip("opacus")
    from opacus.grad_sample import GradSampleModule

    register_opacus()
    assert GradSampleModule.GRAD_SAMPLERS[Linear] is GradSampleModule.GRAD_SAMPLERS[nn.Linear]
    assert opacus is not None


def _model(cfg: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg.init_std = 0.1
    return Transformer(cfg.validate()).eval()


MODELS = {
    "micro": lambda: model_micro(),
    "cpu-tiny": lambda: ModelConfig(**{**model_cpu_tiny().__dict__, "vocab_size": 256, "n_layers": 2}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_decode_with_kernel_matches_full_forward(name):
    """KV-cache decode (kernel on, rows at different positions) == each row's full forward; the
    kernel ran for the decode steps, and the kernel-on logits equal the kernel-off ones."""
    model = _model(MODELS[name]())
    n_new = 6
    outs, refs, counter, n_prefill = ragged_decode(model, lambda: kernels(True), lambda: kernels(False), n_new)
    decode_rows = rows(counter)[n_prefill:]
    # every linear of a decode step (attention in/out, router, shared/dense FFN, lm_head): 3 rows
    assert len(decode_rows) >= n_new * (2 * model.cfg.n_layers + 1) and set(decode_rows) == {3}
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)


def test_training_step_is_untouched():
    """A training step (grad enabled) never calls the kernel: loss and grads equal kernels-off."""
    cfg = ModelConfig(**{**model_cpu_tiny().__dict__, "vocab_size": 128, "n_layers": 2})
    idx = torch.randint(0, 128, (2, 10), generator=torch.Generator().manual_seed(4))
    res = {}
    for on in (True, False):
        model = _model(ModelConfig(**cfg.__dict__)).train()
        with kernels(on) as counter:
            out = model(idx[:, :-1], targets_BT=idx[:, 1:])
            out.loss.backward()
        assert rows(counter) == []
        res[on] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert torch.equal(res[True][0], res[False][0])
    assert res[True][1].keys() == res[False][1].keys()
    assert all(torch.equal(res[True][1][n], res[False][1][n]) for n in res[False][1])


def test_odd_inputs_and_default_dtype():
    x, w, b = data(5, 12, 7, seed=6)
    with torch.no_grad():
        assert close(linear(x[0], w, b), F.linear(x[0], w, b))              # 1-d input
        assert linear(torch.tensor(1.0), w) is None                         # 0-d: F.linear's error
        with pytest.raises(RuntimeError):
            F.linear(torch.tensor(1.0), w)
        saved = torch.get_default_dtype()
        try:
            torch.set_default_dtype(torch.float64)
            y = linear(x, w, b)
        finally:
            torch.set_default_dtype(saved)
        assert y.dtype == torch.float32 and close(y, F.linear(x, w, b))


def test_torch_compile_traces_f_linear():
    """Under torch.compile (dynamo) the module traces to F.linear in one graph (no graph break)."""
    m = Linear(16, 8).eval()
    x = torch.randn(3, 16)
    compiled = torch.compile(m, backend="eager", fullgraph=True)
    with torch.no_grad(), kernels(True) as counter:
        y = compiled(x)
        assert rows(counter) == [] and close(y, F.linear(x, m.weight, m.bias))
