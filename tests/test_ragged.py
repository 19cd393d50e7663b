"""Ragged forward (the serving engine's mixed step): decode tokens of busy rows and whole prompts of
new rows in one forward give the same logits, bit for bit, as separate prefill and decode forwards."""
from __future__ import annotations

import pytest
import torch

from serve_fixtures import make_model, make_tokenizer
from tinyseek.kernels import attn as attn_kernel
from tinyseek.serve.engine import _RowsView


def _check(model, hist_len: int = 9, prompt_lens=(5, 3), seed: int = 0):
    """Rows 0, 1 hold ``hist_len`` tokens and decode one more; rows 2, 3 take new prompts. Compares
    forward_ragged's logits (and the cache it fills) with the usual cached forwards."""
    g = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    hist = torch.randint(0, V, (2, hist_len), generator=g)
    dec = torch.randint(0, V, (2,), generator=g)
    prompts = [torch.randint(0, V, (n,), generator=g) for n in prompt_lens]
    with torch.no_grad():
        ref_cache = model.new_cache(4, 32)
        view = _RowsView(ref_cache, 2)
        model(hist, cache=view)
        ref_logits = [model(dec[:, None], cache=view).logits[:, -1]]
        for i, p in enumerate(prompts):  # each prompt alone in a fresh one-row cache, copied into row 2 + i
            c1 = model.new_cache(1, 32)
            ref_logits.append(model(p[None], cache=c1).logits[:, -1])
            for big, small in zip(ref_cache.layers, c1.layers):
                big["latent"][2 + i, :len(p)] = small["latent"][0, :len(p)]

        cache = model.new_cache(4, 32)
        model(hist, cache=_RowsView(cache, 2))
        assert model.can_ragged(cache)
        ids = torch.cat([dec] + prompts)
        rows = torch.cat([torch.tensor([0, 1])] + [torch.full((len(p),), 2 + i) for i, p in enumerate(prompts)])
        pos = torch.cat([torch.tensor([hist_len, hist_len])] + [torch.arange(len(p)) for p in prompts])
        ends = torch.tensor([len(p) for p in prompts]).cumsum(0) + 1
        logits = model.forward_ragged(ids, rows, pos, cache, torch.cat([torch.tensor([0, 1]), ends]))
    assert torch.equal(logits, torch.cat(ref_logits))
    for big, ref in zip(cache.layers, ref_cache.layers):
        assert torch.equal(big["latent"][:2, :hist_len + 1], ref["latent"][:2, :hist_len + 1])
        for i, p in enumerate(prompts):
            assert torch.equal(big["latent"][2 + i, :len(p)], ref["latent"][2 + i, :len(p)])


@pytest.mark.parametrize("overrides", [{}, {"q_lora_rank": 24}, {"sliding_window": 4}],
                         ids=["mla", "q-lora", "window"])
def test_ragged_forward_equals_separate_forwards(overrides):
    if attn_kernel.KERNELS.ready() is None:
        pytest.skip("the latent-attention kernel did not build (no C compiler)")
    _check(make_model(make_tokenizer(), seed=3, **overrides))


def test_ragged_forward_of_a_quantized_model():
    """Quantized projections fold their dequantised weights: the mixed step runs for them too."""
    from tinyseek.quant.quantize import QuantSpec, quantize_model

    if attn_kernel.KERNELS.ready() is None:
        pytest.skip("the latent-attention kernel did not build (no C compiler)")
    model = make_model(make_tokenizer(), seed=4)
    quantize_model(model, QuantSpec(method="int8"))
    _check(model, prompt_lens=(4,))


def test_ragged_attention_kernel_matches_the_rowwise_call():
    """latent_attention_rows (one row per token) == latent_attention on each row's own tokens."""
    if attn_kernel.KERNELS.ready() is None:
        pytest.skip("the latent-attention kernel did not build (no C compiler)")
    g = torch.Generator().manual_seed(0)
    S, L, H, C, R = 3, 12, 2, 8, 4
    lat = torch.randn(S, L, C + R, generator=g)
    rows = torch.tensor([2, 0, 0, 0, 1])
    pos = torch.tensor([7, 3, 4, 5, 0])
    q = torch.randn(5, H, C, generator=g)
    pe = torch.randn(5, H + 1, R, generator=g)
    out = attn_kernel.latent_attention_rows(q, pe, lat, rows, pos, 0, 0.3)
    for n in range(5):
        r = int(rows[n])
        one = attn_kernel.latent_attention(q[n:n + 1], pe[n][None, None], lat[r:r + 1], pos[n].view(1, 1),
                                           int(pos[n]) + 1, 0, 0.3)
        assert torch.equal(out[n], one[0])
    assert attn_kernel.latent_attention_rows(q.double(), pe, lat, rows, pos, 0, 0.3) is None  # not fp32
