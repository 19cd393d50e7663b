"""Attention: KV-cache incremental decode == full forward (MLA, GQA, low-rank q, sliding window,
ragged rows), and the sliding window really limits what a query sees."""
from __future__ import annotations

import pytest
import torch

from tinyseek.config import ModelConfig
from tinyseek.model.attention import GQA, MLA
from tinyseek.model.layers import Rotary
from tinyseek.model.transformer import Transformer

ATOL = 2e-5


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=3, n_heads=4, max_seq_len=48, attn="mla",
                kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, n_kv_heads=2,
                d_ff=64, n_dense_layers=1, n_routed_experts=4, n_shared_experts=1, moe_d_ff=16, top_k=2)
    base.update(kw)
    return ModelConfig(**base).validate()


VARIANTS = {
    "mla": dict(attn="mla"),
    "mla-qlora": dict(attn="mla", q_lora_rank=24),
    "mla-window": dict(attn="mla", sliding_window=5),
    "gqa": dict(attn="gqa", n_kv_heads=2),
    "gqa-mha-window": dict(attn="gqa", n_kv_heads=4, sliding_window=4),
    "gqa-mqa-window": dict(attn="gqa", n_kv_heads=1, sliding_window=6),
}


def make_model(variant: str, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = tiny_cfg(**VARIANTS[variant])
    cfg.init_std = 0.1  # larger weights: attention patterns far from uniform, so errors would show
    model = Transformer(cfg).eval()
    return model


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_incremental_decode_matches_full_forward(variant):
    model = make_model(variant)
    g = torch.Generator().manual_seed(1)
    B, T = 3, 20
    idx = torch.randint(0, model.cfg.vocab_size, (B, T), generator=g)
    with torch.no_grad():
        full = model(idx).logits
        cache = model.new_cache(B)
        pieces, t = [], 0
        for step in [7, 1, 1, 3, 1, 2, 5]:  # a prefill, single-token steps and multi-token chunks
            pieces.append(model(idx[:, t:t + step], cache=cache).logits)
            t += step
        assert t == T and cache.lengths.tolist() == [T] * B
    inc = torch.cat(pieces, dim=1)
    torch.testing.assert_close(inc, full, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("variant", ["mla", "gqa", "mla-window", "gqa-mha-window"])
def test_ragged_rows_via_cache_lengths(variant):
    """Right-padded prefill of rows with different prompt lengths, then per-row decoding: each row
    must produce exactly the logits of running that sequence alone."""
    model = make_model(variant)
    g = torch.Generator().manual_seed(2)
    V = model.cfg.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (16, 9, 12)]
    prompt_lens = [10, 4, 7]
    n_new = 5
    P = max(prompt_lens)
    with torch.no_grad():
        refs = [model(s[None, :pl + n_new]).logits[0] for s, pl in zip(seqs, prompt_lens)]
        pad = torch.zeros(len(seqs), P, dtype=torch.long)
        for b, (s, pl) in enumerate(zip(seqs, prompt_lens)):
            pad[b, :pl] = s[:pl]
            pad[b, pl:] = 3  # junk that must be ignored once the row's length is set back
        cache = model.new_cache(len(seqs))
        pre = model(pad, cache=cache).logits
        cache.lengths[:] = torch.tensor(prompt_lens)
        outs = [[pre[b, :pl]] for b, pl in enumerate(prompt_lens)]
        for i in range(n_new):
            tok = torch.stack([s[pl + i] for s, pl in zip(seqs, prompt_lens)])[:, None]
            step = model(tok, cache=cache).logits
            for b in range(len(seqs)):
                outs[b].append(step[b])
        assert cache.lengths.tolist() == [pl + n_new for pl in prompt_lens]
    for b, ref in enumerate(refs):
        got = torch.cat([o.reshape(-1, V) for o in outs[b]])
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=1e-4, msg=f"row {b}")


def test_cache_reset_rows_reuses_slot():
    model = make_model("mla")
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(0, model.cfg.vocab_size, (1, 8), generator=g) for _ in range(2))
    with torch.no_grad():
        cache = model.new_cache(2)
        model(torch.cat([a, a]), cache=cache)
        cache.reset([1])
        assert cache.lengths.tolist() == [8, 0]
        # row 1 restarts from position 0 with a new sequence; row 0 just keeps going (junk step)
        x = torch.cat([a[:, :1], b[:, :1]])
        out = model(x, cache=cache).logits
        ref = model(b[:, :1]).logits
    torch.testing.assert_close(out[1], ref[0], atol=ATOL, rtol=1e-4)


def _attn_module(kind: str, window: int):
    cfg = tiny_cfg(attn=kind, sliding_window=window, n_kv_heads=2)
    torch.manual_seed(4)
    mod = MLA(cfg) if kind == "mla" else GQA(cfg)
    with torch.no_grad():
        for p in mod.parameters():
            if p.dim() > 1:
                p.normal_(0, 0.3)
    rope_dim = cfg.qk_rope_head_dim if kind == "mla" else cfg.gqa_head_dim
    return mod, Rotary(rope_dim, cfg.max_seq_len), cfg


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_sliding_window_restricts_attention(kind):
    W, T = 4, 12
    x = torch.randn(1, T, 32, generator=torch.Generator().manual_seed(5))
    x2 = x.clone()
    x2[0, 2] += 3.0  # change token 2: visible only to queries 2..2+W-1 = 2..5
    pos = torch.arange(T)[None]
    for window in (W, 0):
        mod, rot, _ = _attn_module(kind, window)
        cos, sin = rot(pos)
        with torch.no_grad():
            y, y2 = mod(x, cos, sin, pos), mod(x2, cos, sin, pos)
        changed = ((y - y2).abs().amax(-1) > 1e-6)[0].tolist()
        if window:
            assert changed == [False, False] + [True] * W + [False] * (T - 2 - W), changed
        else:  # full causal: every later query sees the change (so the test above can fail)
            assert changed == [False, False] + [True] * (T - 2), changed


def test_sliding_window_model_receptive_field():
    """Stacked layers widen the receptive field to n_layers*(W-1)+1: a token further back than that
    cannot influence the logits."""
    model = make_model("mla-window")  # W=5, 3 layers -> reach 12 tokens back
    W, L = model.cfg.sliding_window, model.cfg.n_layers
    reach = L * (W - 1)
    idx = torch.randint(0, model.cfg.vocab_size, (1, 30), generator=torch.Generator().manual_seed(6))
    idx2 = idx.clone()
    idx2[0, 0] = (idx[0, 0] + 1) % model.cfg.vocab_size
    with torch.no_grad():
        d = (model(idx).logits - model(idx2).logits).abs().amax(-1)[0]
    assert (d[reach + 1:] == 0).all()
    assert (d[:reach + 1] > 0).all()


def _set_mla_impl(model: Transformer, impl: str) -> None:
    for b in model.blocks:
        b.attn.impl = impl


def _decode_logits(model: Transformer, idx: torch.Tensor, steps: list[int]) -> torch.Tensor:
    with torch.no_grad():
        cache, pieces, t = model.new_cache(idx.shape[0]), [], 0
        for step in steps:
            pieces.append(model(idx[:, t:t + step], cache=cache).logits)
            t += step
    return torch.cat(pieces, dim=1)


@pytest.mark.parametrize("variant", ["mla", "mla-qlora", "mla-window"])
def test_absorbed_mla_matches_naive(variant):
    """The absorbed MLA decode (attention over the cached latent, kv_b_proj folded into the query
    and the output) gives the logits of the naive form that re-expands keys and values; "absorbed"
    is also forced onto the prefill (T == key length) and onto multi-token chunks."""
    model = make_model(variant)
    idx = torch.randint(0, model.cfg.vocab_size, (3, 20), generator=torch.Generator().manual_seed(7))
    steps = [6, 1, 1, 4, 1, 1, 2, 4]
    out = {}
    for impl in ("naive", "absorbed", "auto"):
        _set_mla_impl(model, impl)
        out[impl] = _decode_logits(model, idx, steps)  # no grad: the folded-weight form
        if impl == "absorbed":  # with grad enabled the weights are not folded (differentiable form)
            with torch.enable_grad():
                out["unfolded"] = _decode_logits(model, idx, steps)
    _set_mla_impl(model, "auto")
    assert model.blocks[0].attn._folded is not None  # the folded form really ran
    for impl in ("absorbed", "unfolded", "auto"):
        torch.testing.assert_close(out[impl], out["naive"], atol=ATOL, rtol=1e-4, msg=impl)
    # the two forms are different computations (so the comparison above could fail)
    assert not torch.equal(out["absorbed"], out["naive"])


def test_folded_weights_follow_weight_updates():
    """The folded decode weights are rebuilt when a source weight changes in place (an optimizer
    step between GRPO rollouts) or is replaced (a load onto another device makes new storage)."""
    model = make_model("mla-qlora")
    idx = torch.randint(0, model.cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(9))
    steps = [4, 1, 1, 1, 1, 1, 1]
    before = _decode_logits(model, idx, steps)
    with torch.no_grad():
        for b in model.blocks:
            for lin in (b.attn.q_b_proj, b.attn.kv_b_proj, b.attn.o_proj, b.attn.q_a_proj):
                lin.weight.mul_(1.3)
    after = _decode_logits(model, idx, steps)
    _set_mla_impl(model, "naive")
    naive = _decode_logits(model, idx, steps)
    torch.testing.assert_close(after, naive, atol=ATOL, rtol=1e-4)
    assert not torch.allclose(before, after, atol=1e-3)
    _set_mla_impl(model, "auto")
    model.load_state_dict({k: v.clone() for k, v in model.state_dict().items()})  # same values, new versions
    torch.testing.assert_close(_decode_logits(model, idx, steps), naive, atol=ATOL, rtol=1e-4)


def test_absorbed_mla_auto_choice():
    from tinyseek.model.attention import _use_absorbed

    lin = torch.nn.Linear(4, 4)
    assert not _use_absorbed("auto", 7, 7, lin)       # prefill into a fresh cache: expand once
    assert _use_absorbed("auto", 1, 8, lin)           # decode step
    assert _use_absorbed("auto", 3, 10, lin)          # chunk continuing a cached sequence
    assert not _use_absorbed("naive", 1, 8, lin) and _use_absorbed("absorbed", 7, 7, lin)
    # a kv_b_proj whose weight we cannot read (some wrapper module) stays on the naive form
    assert not _use_absorbed("auto", 1, 8, torch.nn.Sequential(lin))


def test_absorbed_mla_with_quantized_kv_b_proj():
    """A quantized kv_b_proj (int8 QuantLinear) is absorbed through its dequantised weight."""
    from tinyseek.quant.modules import QuantLinear

    model = make_model("mla")
    for b in model.blocks:
        b.attn.kv_b_proj = QuantLinear.from_float(b.attn.kv_b_proj.weight.detach(), 8)
    idx = torch.randint(0, model.cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))
    steps = [5, 1, 1, 1, 2, 1, 1]
    _set_mla_impl(model, "naive")
    naive = _decode_logits(model, idx, steps)
    _set_mla_impl(model, "auto")
    torch.testing.assert_close(_decode_logits(model, idx, steps), naive, atol=ATOL, rtol=1e-4)


def test_mla_cache_holds_only_the_latent():
    model = make_model("mla")
    c = model.cfg
    cache = model.new_cache(2, 10)
    assert [list(layer) for layer in cache.layers] == [["latent"]] * c.n_layers
    assert cache.nbytes() == c.n_layers * 2 * 10 * (c.kv_lora_rank + c.qk_rope_head_dim) * 4


def test_logits_at_gives_the_requested_positions_only():
    model = make_model("mla")
    idx = torch.randint(0, model.cfg.vocab_size, (3, 9), generator=torch.Generator().manual_seed(2))
    at = torch.tensor([8, 0, 4])
    with torch.no_grad():
        full = model(idx).logits
        some = model(idx, cache=model.new_cache(3), logits_at=at).logits
    assert some.shape == (3, 1, model.cfg.vocab_size)
    torch.testing.assert_close(some[:, 0], full[torch.arange(3), at], atol=ATOL, rtol=1e-4)
    with pytest.raises(ValueError, match="exclusive"):
        model(idx, idx, logits_at=at)
