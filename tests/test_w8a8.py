"""W8A8 (issue 19): int8 weights x per-token dynamic asymmetric uint8 activations, int32 accumulation.

Oracles: the PyTorch reference of the same integer maths (``ops.w8a8_reference``, float64 exact
integer product) for the C kernel (native VNNI build and the portable / ctypes build) and for the
``torch._int_mm`` path, bit for bit; the float product for the stated error bound; the fake-quant
(QAT) forward for the converted model; the uncached forward for the serving engine.

Stated bound (tested): with ``x_hat = s_x (c - zp)`` (no clipping: each token's range is its own
min-max) ``|x - x_hat| <= s_x / 2`` per element, and the W8A8 output equals ``x_hat @ W_hat^T`` up
to fp32 rounding, so ``|y - x @ W_hat^T| <= s_x / 2 * sum_k |W_hat[n, k]|`` and against the float
weights ``|y - x @ W^T| <= s_x / 2 * sum_k |W_hat[n, k]| + s_w / 2 * sum_k |x[m, k]|`` (+ 1e-5
relative fp32 slack). On Gaussian data that is ~0.7% of max |y| (printed by the test).
"""
from __future__ import annotations

import copy

import pytest
import torch

from serve_fixtures import make_model, make_tokenizer
from tinyseek.config import ConfigError, model_micro
from tinyseek.kernels import quant as kq
from tinyseek.model import Transformer
from tinyseek.quant import ops
from tinyseek.quant.formats import FORMATS, quant_format
from tinyseek.quant.modules import QuantExperts, QuantLinear
from tinyseek.quant.qat import QATLinear, convert_qat, prepare_qat, qat_finetune
from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized

W8A8 = FORMATS["w8a8"]
SHAPES = [(1, 384, 128), (3, 100, 97), (8, 64, 1000), (17, 33, 64), (40, 7, 5)]


def _weights(n: int, k: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g)
    q, s = W8A8.quantize(w, 0)
    return w, q, s


def _inputs(m: int, k: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * 3
    x[0, : k // 2] = 0.0                                        # zeros must stay exact
    if m > 2:
        x[1] = 0.0                                              # an all-zero token
        x[2] = torch.randint(-40, 40, (k,), generator=g) * 0.0625  # on a grid: many exact ties at .5
    return x


@pytest.fixture
def kernels_on():
    saved = kq._state["enabled"]
    if not kq.enable():
        pytest.skip("no C compiler for the quant kernels")
    yield kq.KERNELS.ready()
    kq.enable(saved)


def test_activation_quantizer_properties():
    x = _inputs(5, 77)
    q, s, zp = ops.quantize_act(x)
    assert q.dtype == torch.uint8 and s.dtype == torch.float32 and zp.dtype == torch.int32
    assert torch.all((zp >= 0) & (zp <= 255))
    x_hat = (q.float() - zp[:, None].float()) * s[:, None]
    assert torch.all((x_hat - x).abs() <= s[:, None] / 2 * (1 + 1e-5))   # round to nearest, nothing clipped
    assert torch.all(x_hat[x == 0] == 0)                                   # zero is exact
    assert torch.all(x_hat[1] == 0)                                        # all-zero token
    assert torch.equal(ops.fake_quantize_act(x), x_hat)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_c_activation_quantizer_matches_pytorch_bit_for_bit(kernels_on, m, n, k):
    x = _inputs(m, k)
    for a, b in zip(kq.quant_act(x), ops.quantize_act(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_kernel_and_int_mm_equal_the_reference_bit_for_bit(kernels_on, m, n, k):
    x = _inputs(m, k)
    _, q, s = _weights(n, k)
    ref = ops.w8a8_reference(x, q, s.view(-1))
    assert torch.equal(kq.w8a8_mm(x, q, s), ref)                              # C (VNNI where the CPU has it)
    assert torch.equal(ops.w8a8_linear(x, q, s.view(-1)), ref)                # torch._int_mm + row-sum correction
    assert torch.equal(kq.w8a8_mm(x.view(m, 1, k), q, s), ref.view(m, 1, n))  # any leading shape


@pytest.mark.parametrize("portable", [False, True])
def test_ctypes_and_portable_builds_equal_the_reference(tmp_path, portable):
    try:
        lib = kq.load("ctypes", portable=portable)
    except RuntimeError:
        pytest.skip("no C compiler")
    for m, n, k in SHAPES[:4]:
        x = _inputs(m, k)
        _, q, s = _weights(n, k)
        y = torch.empty(m, n)
        lib.ts_w8a8(x.data_ptr(), q.data_ptr(), s.data_ptr(), y.data_ptr(), m, n, k, 1)
        assert torch.equal(y, ops.w8a8_reference(x, q, s.view(-1))), (portable, m, n, k)


def test_output_within_the_stated_bound_of_the_float_product():
    errs = []
    for m, n, k in SHAPES:
        x = _inputs(m, k)
        w, q, s = _weights(n, k)
        y = W8A8.linear(x, q, s)
        w_hat = W8A8.dequantize(q, s, k, 0)
        _, sx, _ = ops.quantize_act(x)
        act = sx[:, None] / 2 * w_hat.abs().sum(1)[None, :]
        wgt = s.float().view(1, -1) / 2 * x.abs().sum(1)[:, None]
        exact = x.double() @ w.double().t()
        slack = 1e-5 * exact.abs().max() + 1e-6
        assert torch.all((y.double() - x.double() @ w_hat.double().t()).abs() <= act + slack)
        assert torch.all((y.double() - exact).abs() <= act + wgt + slack)
        errs.append(float((y.double() - exact).abs().max() / exact.abs().max()))
    print(f"W8A8 max |y - x W^T| / max |x W^T| per shape: {[round(e, 4) for e in errs]}")
    assert max(errs) < 0.02


def test_format_table_and_spec():
    assert quant_format("w8a8") is W8A8 and quant_format(8) is FORMATS["int8"]   # bits name weight-only formats
    assert W8A8.act_bits == 8 and W8A8.kernel == kq.KERNEL_W8A8 and W8A8.scales_rows
    QuantSpec("w8a8").validate()
    with pytest.raises(ConfigError, match="quantizes activations per token"):
        QuantSpec("w8a8", search="awq", calibration="kl").validate()


def test_modules_kernel_on_and_off_agree_bit_for_bit(kernels_on):
    torch.manual_seed(0)
    w = torch.randn(48, 64)
    lin = QuantLinear.from_float(w, "w8a8", bias_N=torch.randn(48))
    ex = QuantExperts.from_float(torch.randn(3, 64, 2 * 32), torch.randn(3, 32, 64), "w8a8")
    x = torch.randn(5, 64)
    with torch.no_grad():
        on = (lin(x), ex.expert_forward(1, x))
        kq.enable(False)
        off = (lin(x), ex.expert_forward(1, x))
    assert all(torch.equal(a, b) for a, b in zip(on, off))
    assert torch.equal(on[0], ops.w8a8_reference(x, lin.qweight, lin.scale.view(-1)) + lin.bias)


def test_fused_decode_calls_match_the_module_path(kernels_on):
    """ts_ffn / ts_moe with the W8A8 kernel format: the same integer products as the modules, the
    SiLU in C (float rounding; an activation code at a rounding tie may flip)."""
    from tinyseek.model.layers import SwiGLU
    from tinyseek.quant.modules import QuantSwiGLU

    torch.manual_seed(0)
    ex = QuantExperts.from_float(torch.randn(4, 64, 2 * 32) / 8, torch.randn(4, 32, 64) / 6, "w8a8")
    x = torch.randn(3, 64)
    idx = torch.tensor([[0, 2], [3, 1], [2, 2]])
    w = torch.rand(3, 2)
    b = ex._buffers
    fused = kq.moe(x, idx, w, b["q_gate_up"], b["s_gate_up"], b["q_down"], b["s_down"], ex.kernel, 0)
    ref = torch.stack([sum(w[n, k] * ex.expert_forward(int(idx[n, k]), x[n:n + 1])[0] for k in range(2))
                       for n in range(3)])
    assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-3)
    sw = SwiGLU(64, 32)
    for name in ("gate_proj", "up_proj", "down_proj"):
        setattr(sw, name, QuantLinear.from_float(getattr(sw, name).weight, "w8a8"))
    qs = QuantSwiGLU(sw)
    with torch.no_grad():
        plain = SwiGLU.forward(qs, x)
        assert torch.allclose(qs(x), plain, atol=1e-4, rtol=1e-3)


def _micro() -> Transformer:
    torch.manual_seed(0)
    cfg = model_micro()
    cfg.n_layers, cfg.first_dense = 2, 1
    return Transformer(cfg).eval()


def test_model_quantizes_saves_loads_and_stays_close(tmp_path, kernels_on):
    from tinyseek.quant.load import load_model

    m = _micro()
    q = copy.deepcopy(m)
    spec = QuantSpec("w8a8")
    rep = quantize_model(q, spec)
    assert all(x.fmt is W8A8 for x in q.modules() if isinstance(x, (QuantLinear, QuantExperts)))
    d = save_quantized(q, tmp_path / "w8a8", quant_config(q, spec, rep["modules"]))
    q2, meta = load_model(d)
    assert meta["quant"]["method"] == "w8a8" and meta["quant"]["bits"] == 8
    idx = torch.randint(0, m.cfg.vocab_size, (2, 12))
    with torch.no_grad():
        ref, out = m(idx).logits, q2(idx).logits
        assert torch.equal(out, q(idx).logits)
        kq.enable(False)
        off = q2(idx).logits                                 # PyTorch path (torch._int_mm), whole model
        kq.enable(True)
        assert torch.allclose(off, out, atol=1e-5, rtol=1e-5)  # prefill: the same products, no fused call
        cache = q2.new_cache(2)                              # decode: fused FFN / MoE calls (C SiLU)
        steps = torch.cat([q2(idx[:, i:i + 1], cache=cache).logits for i in range(12)], 1)
    assert (steps - out).norm() / out.norm() < 0.01          # + MLA's folded projections: float activations
    assert (out - ref).norm() / ref.norm() < 0.03


def test_qat_fake_quantizes_activations_and_converts_to_the_same_forward():
    m = _micro()
    prepare_qat(m, "w8a8")
    lin = next(x for x in m.modules() if isinstance(x, QATLinear))
    x = torch.randn(4, lin.in_features, requires_grad=True)
    lin(x).sum().backward()                                  # STE: the gradient of x is W_fq^T 1
    w_fq = lin.fmt.fake_quantize(lin.weight, 0).detach()
    assert torch.allclose(x.grad, w_fq.sum(0).expand(4, -1), atol=1e-5)
    with torch.no_grad():
        assert torch.allclose(lin(x), ops.fake_quantize_act(x) @ w_fq.t(), atol=1e-6)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, m.cfg.vocab_size, (2, 16), generator=g),) * 2 for _ in range(2)]
    losses = qat_finetune(m, iter(batches * 2).__next__, 3, lr=1e-3)
    assert len(losses) == 3 and all(v == v for v in losses)
    idx = torch.randint(0, m.cfg.vocab_size, (2, 12), generator=g)
    with torch.no_grad():
        fq = m(idx).logits
        convert_qat(m)
        out = m(idx).logits
    assert all(x.fmt is W8A8 for x in m.modules() if isinstance(x, (QuantLinear, QuantExperts)))
    assert torch.allclose(out, fq, atol=1e-4, rtol=1e-4)     # same codes, same activation codes: float order only


def test_engine_serves_a_w8a8_checkpoint(tmp_path):
    """Loaded through the checkpoint registry as `tinyseek serve` / `chat` load it; with GQA every
    product is W8A8 in decode too, so greedy engine decoding equals the uncached forward's."""
    from tinyseek.serve.engine import SamplingParams, engine_from_checkpoint

    tok = make_tokenizer()
    m = make_model(tok, attn="gqa", n_kv_heads=2)
    spec = QuantSpec("w8a8")
    rep = quantize_model(m, spec)
    d = save_quantized(m, tmp_path / "q", quant_config(m, spec, rep["modules"]))
    eng = engine_from_checkpoint(str(d), tok, device="cpu", max_batch=2)
    ids = tok.encode("the quick brown fox")
    out = eng.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0]
    seq = list(ids)
    with torch.no_grad():
        for _ in range(8):
            seq.append(int(eng.model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert out.token_ids == seq[len(ids):]


def test_stage_quantizes_w8a8(tmp_path):
    from tinyseek.data.shards import write_shards
    from tinyseek.quant import stage
    from tinyseek.train.checkpoint import save_checkpoint

    m = _micro()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 255, (600,), generator=g).tolist() for _ in range(4)]
    write_shards(docs[:3], tmp_path / "run" / "data" / "train", 256, 255)
    write_shards(docs[3:], tmp_path / "run" / "data" / "val", 256, 255)
    save_checkpoint(tmp_path / "run" / "ckpt", 5, m, None, {})
    cfg = stage.preset("w8a8-qat")
    cfg.ckpt, cfg.qat_steps, cfg.calib_batches, cfg.calib_batch_size, cfg.calib_seq_len = str(tmp_path / "run"), 2, 2, 2, 32
    cfg.eval_batches = 1
    met = stage.main(cfg)
    assert met["out"].endswith("w8a8-qat") and met["qat_steps"] == 2
    assert met["ppl_quant"] < met["ppl_float"] * 1.5
