"""The fused latent attention kernel (tinyseek.kernels.attn) against the PyTorch reference,
MLA._latent_attention: per-row positions, sliding windows, cache views, multi-token chunks, the
threaded path, every build; whole-model KV-cache decode with the kernel; fallbacks; the seam (MLA's
variant chosen when it is built or moved)."""
from __future__ import annotations


import pytest
import torch

from tinyseek.config import ModelConfig, model_cpu_tiny, model_micro
from tinyseek.kernels import attn as attn_kernel
from tinyseek.kernels import loader
from tinyseek.model.attention import MLA
from tinyseek.model.transformer import Transformer
from kernel_fixtures import ragged_decode, switched

ATOL, RTOL = 2e-5, 1e-4

pytestmark = pytest.mark.skipif(attn_kernel.KERNELS.lib() is None, reason="no C compiler for the kernels")


def kernels(on: bool):
    """Kernels on (counting calls) or off, restored afterwards."""
    return switched(attn_kernel.KERNELS, "ts_latent_attn", on)


def mla(C=64, R=16, H=4, window=0) -> MLA:
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=H, max_seq_len=256, attn="mla",
                      kv_lora_rank=C, qk_nope_head_dim=16, qk_rope_head_dim=R, v_head_dim=16, sliding_window=window,
                      n_dense_layers=1, d_ff=64).validate()
    return MLA(cfg).eval()


def inputs(B, T, H, C, R, extra_rows=2, seed=0, transposed_q=False):
    """Random queries, rope parts, new latents, a cache of B + extra_rows rows (garbage everywhere,
    so masking errors show) and per-row different positions."""
    g = torch.Generator().manual_seed(seed)
    N = B * T
    if transposed_q:  # the unfolded absorbed form passes q as a (H, N, C) transpose
        q = torch.randn(H, N, C, generator=g).transpose(0, 1)
    else:  # the folded form passes a column slice of one GEMM output, reshaped
        q = torch.randn(B, T, H * C + 7, generator=g)[..., 3:3 + H * C].reshape(N, H, C)
    pe = torch.randn(B, T, H + 1, R, generator=g)
    ckv = torch.randn(B, T, C, generator=g)
    cache = torch.randn(B + extra_rows, 200, C + R, generator=g)
    lengths = torch.randint(0, 120, (B,), generator=g)
    lengths[0] = 0 if B > 1 else lengths[0]  # a row starting fresh next to rows deep in their sequence
    pos = lengths[:, None] + torch.arange(T)
    return q, pe, ckv, cache, pos, int(lengths.max()) + T


def run_both(m: MLA, q, pe, ckv, cache, pos, key_len, B):
    """(kernel output, torch output) of _latent_attention on a first-B-rows view of ``cache``; also
    checks that both wrote the same cache."""
    outs, caches = [], []
    for on in (True, False):
        big = cache.clone()
        with torch.no_grad(), kernels(on) as counter:
            outs.append(m._latent_attention(q, pe, ckv, pos, big[:B], key_len, m._kernel_lib(q)))
        assert counter.calls == (1 if on else 0)
        caches.append(big)
    torch.testing.assert_close(caches[0], caches[1], atol=0, rtol=0)
    return outs


@pytest.mark.parametrize("B", [1, 3, 16])
@pytest.mark.parametrize("T", [1, 4])
@pytest.mark.parametrize("window", [0, 7])
def test_kernel_matches_torch_path(B, T, window):
    m = mla(window=window)
    q, pe, ckv, cache, pos, key_len = inputs(B, T, 4, 64, 16, seed=B * 10 + T)
    got, ref = run_both(m, q, pe, ckv, cache, pos, key_len, B)
    assert got.shape == ref.shape == (B * T, 4, 64) and got.is_contiguous()
    assert torch.isfinite(ref).all()
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("C,R,H", [(32, 8, 4), (16, 8, 3), (72, 24, 5)])
def test_kernel_odd_widths_and_transposed_query(C, R, H):
    """Widths that are not multiples of 16 (masked tails), an odd head count, a (H, N, C) query."""
    m = mla(C=C, R=R, H=H, window=9)
    q, pe, ckv, cache, pos, key_len = inputs(3, 2, H, C, R, seed=C, transposed_q=True)
    got, ref = run_both(m, q, pe, ckv, cache, pos, key_len, 3)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


def test_kernel_threaded_path_matches():
    """A call above the threading threshold (N * H * L * X >= 1M) with two threads."""
    m = mla()
    q, pe, ckv, cache, pos, key_len = inputs(64, 1, 4, 64, 16, seed=5)
    assert 64 * 4 * key_len * 80 >= 1 << 20
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        got, ref = run_both(m, q, pe, ckv, cache, pos, key_len, 64)
    finally:
        torch.set_num_threads(saved)
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("C,R,H", [(40, 8, 4), (64, 16, 5)])
def test_builds_agree(C, R, H):
    """The extension, the ctypes build and the portable (no AVX-512) builds give the same result."""
    q, pe, ckv, cache, pos, key_len = inputs(5, 3, H, C, R, seed=3)
    cache[:5].scatter_(1, pos.unsqueeze(-1).expand(-1, -1, C + R), torch.cat([ckv, pe[:, :, H]], dim=-1))
    ref = mla(C=C, R=R, H=H, window=6)
    outs = {}
    for kind, portable in [("pyext", False), ("ctypes", False), ("ctypes", True), ("pyext", True)]:
        try:
            lib = attn_kernel.KERNELS.load(kind, portable=portable)
        except RuntimeError:  # no Python.h: the extension builds are not available here
            assert kind == "pyext"
            continue
        with torch.no_grad():
            outs[kind, portable] = attn_kernel.latent_attention(q, pe, cache[:5], pos, key_len, 6, ref.scale, lib=lib)
    assert ("ctypes", True) in outs and ("ctypes", False) in outs
    first = outs["ctypes", False]
    for k, v in outs.items():
        torch.testing.assert_close(v, first, atol=ATOL, rtol=RTOL, msg=str(k))
    with torch.no_grad(), kernels(False):
        torch_out = ref._latent_attention(q, pe, ckv, pos, cache[:5].clone(), key_len)
    torch.testing.assert_close(first, torch_out, atol=ATOL, rtol=RTOL)


def test_query_seeing_no_key_gives_zeros():
    """Not reachable in valid use (a token sees itself); documented: zeros, where the PyTorch path
    gives NaN (softmax of an all -inf row)."""
    q, pe, ckv, cache, pos, key_len = inputs(2, 1, 4, 64, 16, seed=4)
    pos = torch.tensor([[-1], [3]])
    with torch.no_grad():
        out = attn_kernel.latent_attention(q, pe, cache[:2], pos, 4, 0, 0.1)
    assert torch.equal(out[0], torch.zeros(4, 64)) and torch.isfinite(out).all() and out[1].abs().sum() > 0


def test_kernel_does_not_apply():
    """Disabled, not built, grad-enabled with inputs requiring grad, or not fp32: None (PyTorch path)."""
    q, pe, ckv, cache, pos, key_len = inputs(2, 1, 4, 64, 16, seed=6)
    args = (pe, cache[:2], pos, key_len, 0, 0.1)
    with kernels(True):
        assert attn_kernel.latent_attention(q, *args) is not None
    with kernels(False):
        assert attn_kernel.latent_attention(q, *args) is None
    with kernels(True):
        attn_kernel.KERNELS.state.update(lib=None, failed=True)  # as without a compiler
        assert attn_kernel.latent_attention(q, *args) is None
    with kernels(True) as counter:
        qg = q.detach().requires_grad_()
        assert attn_kernel.latent_attention(qg, *args) is None          # training: grad enabled
        with torch.no_grad():
            assert attn_kernel.latent_attention(qg, *args) is not None  # no grad: kernel
        assert attn_kernel.latent_attention(q.double(), pe.double(), cache[:2].double(), *args[2:]) is None
        assert attn_kernel.latent_attention(q, pe, cache[:2].bfloat16(), *args[2:]) is None
        assert counter.calls == 1


def test_kernels_env_switch(monkeypatch):
    monkeypatch.setenv("TINYSEEK_ATTN_KERNELS", "0")
    k = loader.Kernels("_tinyseek_attn", attn_kernel.KERNELS.src, attn_kernel.KERNELS.signatures,
                       "TINYSEEK_ATTN_KERNELS", "test")
    assert k.ready() is None


def _model(cfg: ModelConfig, seed=0) -> Transformer:
    torch.manual_seed(seed)
    cfg.init_std = 0.1  # attention far from uniform, so errors would show
    return Transformer(cfg.validate()).eval()


MODELS = {
    "micro": lambda: model_micro(),
    "micro-window": lambda: ModelConfig(**{**model_micro().__dict__, "sliding_window": 5}),
    "micro-qlora": lambda: ModelConfig(**{**model_micro().__dict__, "q_lora_rank": 24}),
    "cpu-tiny": lambda: ModelConfig(**{**model_cpu_tiny().__dict__, "vocab_size": 256, "n_layers": 2}),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_model_decode_with_kernel_matches_full_forward(name):
    """Prefill, then token-by-token decode (absorbed MLA, kernel on) with rows at different
    positions: the logits of the full forward of each row."""
    model = _model(MODELS[name]())
    n_new = 6
    outs, refs, counter, _ = ragged_decode(model, lambda: kernels(True), n_new=n_new)
    # the (short) prefill and every decode step of every layer: the kernel
    assert counter.calls == (n_new + 1) * model.cfg.n_layers
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_model_kernel_equals_torch_path_and_training_is_untouched():
    """Chunked decode: kernel on == kernel off; a forward with grad enabled keeps the PyTorch path
    (and its autograd graph)."""
    model = _model(model_micro())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    res = {}
    for on in (True, False):
        with torch.no_grad(), kernels(on) as counter:
            cache, pieces, t = model.new_cache(2), [], 0
            for step in (5, 1, 3, 1, 2):
                pieces.append(model(idx[:, t:t + step], cache=cache).logits)
                t += step
        res[on] = torch.cat(pieces, dim=1)
        assert counter.calls == (5 * model.cfg.n_layers if on else 0)  # the 5-token prefill too
    torch.testing.assert_close(res[True], res[False], atol=ATOL, rtol=RTOL)
    from tinyseek.model.attention import SHORT_PREFILL
    long_idx = torch.randint(0, model.cfg.vocab_size, (1, SHORT_PREFILL + 1))
    with torch.no_grad(), kernels(True) as counter:
        model(long_idx, cache=model.new_cache(1))   # a longer prefill expands the keys (naive form)
        assert counter.calls == 0
    with kernels(True) as counter:
        for b in model.blocks:
            b.attn.impl = "absorbed"
        cache = model.new_cache(2)
        out = model(idx[:, :4], cache=cache).logits
        out = model(idx[:, 4:5], cache=cache).logits
        assert out.requires_grad and counter.calls == 0


def test_mla_variant_is_chosen_when_built_or_moved():
    """MLA's ``use_kernel`` is set at build and on every conversion (``_apply``); a float64 model
    decodes on the reference without calling the kernel, and back in fp32 the kernel runs again."""
    model = _model(model_micro())
    idx = torch.randint(0, model.cfg.vocab_size, (2, 6), generator=torch.Generator().manual_seed(5))
    assert all(b.attn.use_kernel for b in model.blocks)
    for dtype, calls in ((torch.float64, 0), (torch.float32, 2 * model.cfg.n_layers)):
        model.to(dtype)
        assert all(b.attn.use_kernel == (dtype is torch.float32) for b in model.blocks)
        with torch.no_grad(), kernels(True) as counter:
            cache = model.new_cache(2)
            model(idx[:, :5], cache=cache)
            model(idx[:, 5:], cache=cache)
        assert counter.calls == calls
    with torch.device("meta"):                     # built on meta, filled by assignment (as model_from_hf)
        loaded = Transformer(model.cfg)
    assert not any(b.attn.use_kernel for b in loaded.blocks)
    loaded.load_state_dict(model.state_dict(), assign=True)
    assert all(b.attn.use_kernel for b in loaded.blocks) and loaded.lm_head.use_kernel
    with torch.no_grad(), kernels(True) as counter:
        m = model.blocks[0].attn
        m.use_kernel = False                       # the reference variant: never the kernel
        assert m._kernel_lib(idx.float()) is None and not m.can_ragged(idx[:0].float())
