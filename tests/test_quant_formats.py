"""The quantization format table (tinyseek/quant/formats.py): every entry passes the same checks, and
a new format is one table entry (a toy format quantizes, saves and loads a model unchanged)."""
from __future__ import annotations

import copy

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.kernels import quant as kq
from tinyseek.model import Transformer
from tinyseek.quant.formats import FORMATS, QuantFormat, quant_format
from tinyseek.quant.modules import QuantEmbedding, QuantExperts, QuantLinear
from tinyseek.quant.quantize import QuantSpec, load_quantized, quant_config, quantize_model, save_quantized

CASES = [(f, g) for f in FORMATS.values() for g in (f.group_sizes or (0,))]
IDS = [f"{f.name}-g{g}" for f, g in CASES]


@pytest.mark.parametrize("fmt,g", CASES, ids=IDS)
def test_quantize_stores_codes_in_range_and_dequantizes_within_half_a_step(fmt, g):
    torch.manual_seed(0)
    for n, k in ((6, 160), (5, 33)):                      # a partial last group; an odd width
        w = torch.randn(n, k)
        q, s = fmt.quantize(w, g)
        eq, es = fmt.empty(n, k, g)
        assert q.dtype == eq.dtype == fmt.code_dtype and q.shape == eq.shape == (n, fmt.stored_cols(k))
        assert s.dtype == es.dtype == torch.float16 and s.shape == es.shape
        w_hat = fmt.dequantize(q, s, k, g)
        assert w_hat.shape == (n, k)
        step = s.float().repeat_interleave(fmt.group(g) or k, dim=1)[:, :k]
        assert torch.all((w_hat - w).abs() <= step / 2 + 1e-6)     # round-to-nearest, nothing clipped
        assert torch.all((w_hat / step).round().abs() <= fmt.qmax)
        fq = fmt.fake_quantize(w.clone().requires_grad_(), g)  # QAT sees exactly the stored weight
        assert torch.equal(fq.detach(), fmt.dequantize(q, s, k, g))


@pytest.mark.parametrize("fmt,g", CASES, ids=IDS)
def test_kernel_and_pytorch_dequantize_agree(fmt, g):
    if fmt.kernel is None:
        pytest.skip("no C kernel for this format")
    saved = kq._state["enabled"]
    if not kq.enable():
        pytest.skip("no C compiler for the fused kernels")
    try:
        q, s = fmt.quantize(torch.randn(7, 96), g)
        fused = fmt.dequantize(q, s, 96, g)
        kq.enable(False)
        assert torch.equal(fused, fmt.dequantize(q, s, 96, g))
    finally:
        kq.enable(saved)


def test_modules_take_a_format_its_name_or_its_bits():
    w = torch.randn(8, 64)
    for fmt in FORMATS.values():
        g = fmt.group_sizes[0] if fmt.grouped else 0
        names = (fmt, fmt.name) + (() if fmt.act_bits else (fmt.bits,))  # a bit width names a weight-only format
        a, b, *c = (QuantLinear.from_float(w, x, g) for x in names)
        assert all(x.fmt is fmt for x in (a, b, *c)) and a.bits == fmt.bits and a.group_size == fmt.group(g)
        assert all(torch.equal(a.qweight, x.qweight) for x in (b, *c))
        assert copy.deepcopy(a).fmt is fmt
    assert QuantLinear.from_float(w, "int8", 128).group_size == 0   # per-row formats ignore a group size
    with pytest.raises(ValueError, match="unknown quantization format 3"):
        quant_format(3)
    with pytest.raises(ValueError, match="unknown quantization format 'nf4'"):
        QuantEmbedding(4, 8, "nf4")


def test_spec_and_config_validation_follow_the_table():
    from tinyseek.config import ConfigError

    assert QuantSpec("int4", 64).validate().format is FORMATS["int4"]
    with pytest.raises(ConfigError, match="method must be 'int8' or 'int4'"):
        QuantSpec("int3").validate()
    with pytest.raises(ConfigError, match="group_size must be one of 32, 64, 128 for int4"):
        QuantSpec("int4", 48).validate()


def _micro() -> Transformer:
    torch.manual_seed(0)
    cfg = model_micro()
    cfg.n_layers, cfg.first_dense = 2, 1
    return Transformer(cfg).eval()


def test_a_new_format_is_one_table_entry(tmp_path, monkeypatch):
    """A per-row int6 format without a C kernel, added to FORMATS only: quantize_model, the modules'
    PyTorch paths (decode and prefill), save and load_quantized all work with it unchanged."""
    int6 = QuantFormat("int6", 6, 31, (), packed=False, kernel=None)
    monkeypatch.setitem(FORMATS, "int6", int6)
    m = _micro()
    q = copy.deepcopy(m)
    spec = QuantSpec("int6")
    rep = quantize_model(q, spec)
    assert all(x.fmt is int6 for x in q.modules() if isinstance(x, (QuantLinear, QuantExperts, QuantEmbedding)))
    d = save_quantized(q, tmp_path / "q", quant_config(q, spec, rep["modules"]))
    q2, meta = load_quantized(d)
    assert meta["quant"]["method"] == "int6" and meta["quant"]["bits"] == 6
    idx = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref, out = m(idx).logits, q2(idx).logits
        assert torch.equal(out, q(idx).logits)
        assert (out - ref).norm() / ref.norm() < 0.05           # 6 bits: close to the float model
        cache = q2.new_cache(2)                                  # decode, token by token
        steps = torch.cat([q2(idx[:, i:i + 1], cache=cache).logits for i in range(12)], 1)
    assert torch.allclose(steps, out, atol=1e-4)
