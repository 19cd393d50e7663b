"""Weight-only quantization (int8 / int4), calibration, QAT, the quantized checkpoint format."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model import Transformer
from tinyseek.model.moe import MoE
from tinyseek.quant.calibrate import activation_range, search_smoothing
from tinyseek.quant.formats import FORMATS
from tinyseek.quant.modules import QuantEmbedding, QuantExperts, QuantLinear
from tinyseek.quant.ops import pack_int4, unpack_int4
from tinyseek.quant.qat import QATEmbedding, QATExperts, QATLinear, convert_qat, iter_batches, prepare_qat, qat_finetune
from tinyseek.quant.quantize import (QuantSpec, load_quantized, quant_config, quantize_model, save_quantized,
                                     weight_bytes)

SPECS = [QuantSpec("int8", search="none"), QuantSpec("int4", 32, search="none"),
         QuantSpec("int4", 64, search="none"), QuantSpec("int4", 128, search="none")]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm())


def micro(attn: str = "mla", **kw) -> Transformer:
    torch.manual_seed(0)
    cfg = model_micro()
    cfg.attn = attn
    for k, v in kw.items():
        setattr(cfg, k, v)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # give the random model some spread so logits are not all ~0
        for p in m.parameters():
            if p.dim() > 1:
                p.mul_(3.0)
    return m


def tokens(n: int = 2, t: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 256, (n, t), generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# pure maths
# ---------------------------------------------------------------------------------------------
def test_pack_unpack_int4_roundtrip_exact():
    q = torch.randint(-8, 8, (5, 3, 34), dtype=torch.int8)
    p = pack_int4(q)
    assert p.dtype == torch.uint8 and p.shape == (5, 3, 17)
    assert torch.equal(unpack_int4(p), q)
    every_byte = torch.arange(256, dtype=torch.uint8).view(4, 64)
    assert torch.equal(pack_int4(unpack_int4(every_byte)), every_byte)
    with pytest.raises(ValueError):
        pack_int4(torch.zeros(2, 3, dtype=torch.int8))


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.method}-g{s.eff_group_size}")
def test_quant_linear_close_to_float(spec):
    torch.manual_seed(0)
    w = torch.randn(96, 160) * 0.05   # 160 inputs: group 64 and 128 end in a partial group
    w[3, 7] = 1.0                     # one outlier weight
    ql = QuantLinear.from_float(w, spec.bits, spec.eff_group_size)
    bound = {8: 0.02, 4: {32: 0.13, 64: 0.15, 128: 0.17}}
    b = bound[8] if spec.bits == 8 else bound[4][spec.group_size]
    for rows in (1, 300):             # decode path (scale the output) and prefill path (dequantise)
        x = torch.randn(rows, 160)
        assert rel(ql(x), x @ w.t()) < b
        assert torch.allclose(ql(x), x @ ql.dequant().t(), atol=1e-5, rtol=1e-4)
    # memory: int8 one byte per weight, int4 half a byte (plus scales)
    assert ql.qweight.numel() * ql.qweight.element_size() == w.numel() // (1 if spec.bits == 8 else 2)


def test_smaller_groups_are_more_accurate():
    torch.manual_seed(0)
    w = torch.randn(64, 256) * torch.rand(1, 256) * 2  # uneven column magnitudes
    errs = [rel(QuantLinear.from_float(w, 4, g).dequant(), w) for g in (32, 64, 128)]
    assert errs[0] < errs[1] < errs[2]
    assert rel(QuantLinear.from_float(w, 8).dequant(), w) < errs[0] / 4


def test_activation_range_calibrators():
    torch.manual_seed(0)
    x = torch.randn(4000, 3)
    x[0, 0] = 100.0   # one spike in channel 0
    mm = activation_range(x, "minmax")
    pc = activation_range(x, "percentile", 99.0)
    kl = activation_range(x, "kl")
    assert mm[0] == 100.0
    assert pc[0] < 4.0 and kl[0] < 50.0          # both ignore the lone spike
    assert torch.all(kl[1:] > 1.0) and torch.all(kl <= mm)
    with pytest.raises(ValueError):
        activation_range(x, "mse")


def test_awq_search_helps_with_outlier_channels_and_never_hurts():
    torch.manual_seed(0)
    w = torch.randn(64, 128) * 0.05
    x = torch.randn(512, 128)
    x[:, :4] *= 30.0                 # a few salient input channels (as in real LLM activations)
    beta, s, info = search_smoothing(w, x, activation_range(x, "minmax"), 4, 128)
    assert beta > 0 and s is not None
    assert info["err"] < 0.7 * info["err_rtn"]
    # no salient channels: the search may not pick smoothing, but is never worse than RTN
    x2 = torch.randn(512, 128)
    _, _, info2 = search_smoothing(w, x2, activation_range(x2, "kl"), 4, 64)
    assert info2["err"] <= info2["err_rtn"]


# ---------------------------------------------------------------------------------------------
# MoE experts
# ---------------------------------------------------------------------------------------------
def test_quant_experts_all_dispatch_paths_agree():
    m = micro()
    moe = next(b.ffn for b in m.blocks if isinstance(b.ffn, MoE))
    ex = moe.experts
    qe = QuantExperts.from_float(ex.w_gate_up, ex.w_down, 4, 32)
    assert qe.w_gate_up.shape == ex.w_gate_up.shape and qe.w_down.shape == ex.w_down.shape
    for e in range(ex.n_experts):   # stacked dequantisation == per-expert dequantisation
        w = FORMATS["int4"].dequantize(qe.q_gate_up[e], qe.s_gate_up[e], ex.w_gate_up.shape[1], 32)
        assert torch.equal(qe.w_gate_up[e], w.t())
    assert rel(qe.w_down, ex.w_down) < 0.15
    moe.experts = qe
    x = torch.randn(2, 10, m.cfg.d_model)
    outs = {}
    for impl in ("loop", "sorted", "grouped"):
        moe.impl = impl
        try:
            outs[impl] = moe(x)[0]
        except RuntimeError:        # grouped kernel unavailable on this device/dtype
            continue
    assert "loop" in outs and "sorted" in outs
    for y in outs.values():
        assert torch.allclose(y, outs["loop"], atol=1e-5)


# ---------------------------------------------------------------------------------------------
# whole model
# ---------------------------------------------------------------------------------------------
def _dequantised_float_copy(float_model: Transformer, qmodel: Transformer) -> Transformer:
    """The float model with every quantized weight replaced by its dequantised value."""
    ref = copy.deepcopy(float_model)
    for name, mod in qmodel.named_modules():
        if isinstance(mod, (QuantLinear, QuantEmbedding)):
            ref.get_submodule(name).weight.data.copy_(mod.dequant())
        elif isinstance(mod, QuantExperts):
            ref.get_submodule(name).w_gate_up.data.copy_(mod.w_gate_up)
            ref.get_submodule(name).w_down.data.copy_(mod.w_down)
    return ref


@pytest.mark.parametrize("attn", ["mla", "gqa"])
@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32, calibration="kl", search="awq")],
                         ids=["int8-rtn", "int4-g32-awq-kl"])
def test_quantized_model_logits_close_to_float(attn, spec):
    m = micro(attn)
    idx = tokens()
    with torch.no_grad():
        ref = m(idx).logits
    q = copy.deepcopy(m)
    report = quantize_model(q, spec, [tokens(4, 32, seed=s) for s in range(2)], max_rows=256)
    kinds = report["modules"]
    assert any(v.startswith("experts") for v in kinds.values()) and "lm_head" in kinds
    assert not any("router" in n for n in kinds)
    assert isinstance(q.embed, QuantEmbedding) and kinds["embed"] == "embedding"
    assert all(b.ffn.router.weight.dtype == torch.float32 for b in q.blocks if isinstance(b.ffn, MoE))
    assert all(b.attn_norm.weight.dtype == torch.float32 for b in q.blocks)   # routers and norms stay fp32
    with torch.no_grad():
        out = q(idx).logits
        exact = _dequantised_float_copy(m, q)(idx).logits
    assert rel(out, ref) < (0.03 if spec.bits == 8 else 0.3)  # random 3x-scaled weights: ~0.1 error per int4 matrix
    assert torch.allclose(out, exact, atol=1e-4)  # plumbing: same as the float model on dequantised weights
    # KV-cache decode of the quantized model equals its full forward
    cache = q.new_cache(2)
    with torch.no_grad():
        step = torch.cat([q(idx[:, :20], cache=cache).logits, q(idx[:, 20:21], cache=cache).logits], 1)
        assert torch.allclose(step, q(idx[:, :21]).logits, atol=1e-4)


def test_weight_part_really_4x_and_over_6x_smaller_on_disk(tmp_path):
    from tinyseek.train.checkpoint import save_weights

    m = micro(d_model=128, d_ff=256, moe_d_ff=64, kv_lora_rank=64)
    save_weights(m.state_dict(), tmp_path / "float.safetensors")
    fsize = (tmp_path / "float.safetensors").stat().st_size
    sizes = {}
    for spec in (QuantSpec("int8", search="none"), QuantSpec("int8", search="none", embed=False),
                 QuantSpec("int4", 128, search="none"), QuantSpec("int4", 32, search="none")):
        q = copy.deepcopy(m)
        rep = quantize_model(q, spec)
        d = save_quantized(q, tmp_path / f"{spec.method}{spec.group_size}{spec.embed}",
                           quant_config(q, spec, rep["modules"]))
        wb_f, wb_q = weight_bytes(m), weight_bytes(q)
        part_ratio = (wb_f["total"] - wb_q["float"]) / wb_q["quantized"]
        file = (d / "model.safetensors").stat().st_size
        assert file == pytest.approx(wb_q["total"], rel=0.05)     # the file holds what memory holds
        assert all(t.dtype == torch.float16 for k, t in q.state_dict().items()
                   if k.endswith(("scale", "s_gate_up", "s_down")))
        sizes[(spec.method, spec.group_size, spec.embed)] = (part_ratio, fsize / file)
    assert sizes[("int8", 128, True)][0] > 3.88       # fp16 per-row scales: 4K/(K+2), 3.88 at K=64, 3.94 at K=128
    assert sizes[("int8", 128, True)][1] > 3.8        # embedding quantized too: the whole file ~4x
    assert sizes[("int8", 128, False)][1] < 3.5       # a float embedding alone costs the 4x
    assert sizes[("int4", 128, True)][0] > 7.0 and sizes[("int4", 32, True)][0] > 6.5
    assert sizes[("int4", 32, True)][1] > 6.0


def test_scales_round_up_so_nothing_clips():
    from tinyseek.quant.ops import group_scales, quantize

    w = torch.tensor([[0.0007, -0.00031, 0.0002], [1.3, 0.5, -0.7]])  # row 0: subnormal fp16 scale
    s = group_scales(w, 127, 0)
    assert torch.equal(s, s.half().float()) and torch.all(s * 127 >= w.abs().amax(1, keepdim=True))
    q = quantize(w, 127, 0, s)
    assert int(q.abs().max()) <= 127
    assert torch.all((q.float() * s - w).abs() <= s / 2 + 1e-12)   # plain rounding error, no clipping


def test_quantized_embedding_looks_up_dequantised_rows():
    torch.manual_seed(0)
    w = torch.randn(50, 24)
    for bits, g in ((8, 0), (4, 32)):
        emb = QuantEmbedding.from_float(w, bits, g)
        idx = torch.tensor([[3, 0, 49], [7, 7, 1]])
        out = emb(idx)
        assert out.shape == (2, 3, 24) and out.dtype == torch.float32
        assert torch.equal(out, emb.dequant()[idx])
        assert rel(out, w[idx]) < (0.01 if bits == 8 else 0.15)
        with pytest.raises(IndexError):
            emb(torch.tensor([50]))


def test_tied_embedding_is_quantized_once(tmp_path):
    m = micro(tie_embeddings=True)
    q = copy.deepcopy(m)
    spec = QuantSpec("int8")
    rep = quantize_model(q, spec)
    assert rep["modules"]["embed"] == "embedding" and rep["modules"]["lm_head"] == "linear_tied"
    assert q.lm_head.qweight is q.embed.qweight and q.lm_head.scale is q.embed.scale
    d = save_quantized(q, tmp_path / "q", quant_config(q, spec, rep["modules"]))
    q2, _ = load_quantized(d)
    assert q2.lm_head.qweight is q2.embed.qweight
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(q2(idx).logits, q(idx).logits)
        assert rel(q(idx).logits, m(idx).logits) < 0.03
    untied = micro()
    rep_u = quantize_model(untied, spec)
    d_u = save_quantized(untied, tmp_path / "u", quant_config(untied, spec, rep_u["modules"]))
    table = m.cfg.vocab_size * m.cfg.d_model
    assert (d_u / "model.safetensors").stat().st_size - (d / "model.safetensors").stat().st_size > 0.9 * table
    with pytest.raises(UserError, match="ties lm_head to the embedding"):
        quantize_model(micro(tie_embeddings=True), QuantSpec("int8", embed=False))


def _as_format_v1(q, d):
    """Rewrite a v2 int8 checkpoint without a quantized embedding as format 1 (fp32 int8 scales)."""
    from tinyseek.train.checkpoint import save_weights

    state = {k: (t.float() if t.dtype == torch.float16 else t) for k, t in q.state_dict().items()}
    save_weights(state, d / "model.safetensors")
    c = json.loads((d / "quant_config.json").read_text())
    c["format_version"] = 1
    for k in ("scale_dtype", "embed"):
        c.pop(k)
    (d / "quant_config.json").write_text(json.dumps(c))
    (d / "checksums.json").unlink()  # format 1 predates checksums


def test_format_v1_checkpoint_still_loads(tmp_path):
    m = micro()
    spec = QuantSpec("int8", embed=False)
    rep = quantize_model(m, spec)
    d = save_quantized(m, tmp_path / "q", quant_config(m, spec, rep["modules"]))
    _as_format_v1(m, d)
    q1, _ = load_quantized(d)
    assert q1.lm_head.scale.dtype == torch.float32 and isinstance(q1.embed, torch.nn.Embedding)
    idx = tokens()
    with torch.no_grad():
        assert torch.allclose(q1(idx).logits, m(idx).logits, atol=1e-4)
    c = json.loads((d / "quant_config.json").read_text())
    c["modules"]["embed"] = "embedding"      # v1 never quantized the embedding
    (d / "quant_config.json").write_text(json.dumps(c))
    with pytest.raises(UserError, match="unknown to format version 1"):
        load_quantized(d)


# ---------------------------------------------------------------------------------------------
# QAT
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("method,gs,tie", [("int4", 32, False), ("int8", 0, False), ("int8", 0, True)])
def test_qat_converted_model_matches_fake_quant_forward(method, gs, tie):
    m = micro(tie_embeddings=tie)
    prepare_qat(m, method, gs)
    assert any(isinstance(x, QATLinear) for x in m.modules()) and any(isinstance(x, QATExperts) for x in m.modules())
    assert isinstance(m.embed, QATEmbedding) and (m.lm_head.weight is m.embed.weight) == tie
    data = [(tokens(4, 32, seed=s), tokens(4, 32, seed=s + 10)) for s in range(2)]
    before = m.lm_head.weight.detach().clone()
    losses = qat_finetune(m, iter_batches(data), steps=3, lr=1e-3)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert not torch.equal(before, m.lm_head.weight)     # STE: gradients reach the float weights
    idx = tokens()
    with torch.no_grad():
        fake = m(idx).logits
    kinds = convert_qat(m)
    assert not any(isinstance(x, (QATLinear, QATExperts, QATEmbedding)) for x in m.modules())
    assert kinds["lm_head"] == ("linear_tied" if tie else "linear") and kinds["embed"] == "embedding"
    assert (m.lm_head.qweight is m.embed.qweight) == tie
    from tinyseek.quant.quantize import QUANT_DISPATCH    # QAT's "sorted" dispatch gives way to the fused one
    assert all(b.ffn.impl == QUANT_DISPATCH for b in m.blocks if isinstance(b.ffn, MoE))
    with torch.no_grad():
        real = m(idx).logits
    assert torch.allclose(real, fake, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# checkpoint format
# ---------------------------------------------------------------------------------------------
def _save(tmp_path, spec=QuantSpec("int4", 64, search="awq"), tie=False):
    m = micro(tie_embeddings=tie)
    rep = quantize_model(m, spec, [tokens(4, 32)], max_rows=128)
    d = save_quantized(m, tmp_path / "q", quant_config(m, spec, rep["modules"]), {"step": 7})
    return m, d


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_roundtrip_identical_logits(tmp_path, tie):
    m, d = _save(tmp_path, tie=tie)
    q2, meta = load_quantized(d)
    idx = tokens()
    with torch.no_grad():
        assert torch.equal(q2(idx).logits, m(idx).logits)
    assert meta["step"] == 7 and meta["quant"]["method"] == "int4" and meta["quant"]["group_size"] == 64
    from tinyseek.quant.load import load_model
    q3, _ = load_model(d)      # the generic loader delegates to load_quantized
    with torch.no_grad():
        assert torch.equal(q3(idx).logits, m(idx).logits)
    assert not list(tmp_path.glob(".tmp-*"))


def _edit(d, **changes):
    p = d / "quant_config.json"
    c = json.loads(p.read_text())
    for k, v in changes.items():
        if k == "d_model":
            c["model_config"]["d_model"] = v
        else:
            c[k] = v
    p.write_text(json.dumps(c))


@pytest.mark.parametrize("change,needle", [
    ({"format_version": 3}, "format version"),
    ({"scale_dtype": "float32"}, "scale_dtype"),
    ({"embed": False}, "embed is False"),
    ({"bits": 8}, "bits"),
    ({"method": "int3"}, "unknown method"),
    ({"group_size": 128}, "tensor"),            # consistent-looking config, wrong tensor shapes
    ({"group_size": 48}, "group size"),
    ({"d_model": 96}, "disagree on the model config"),
    ({"d_model": 96, "drop_meta": True}, "tensor embed.qweight"),
    ({"format": "gguf"}, "not a tinyseek-quant"),
])
def test_load_refuses_mismatch(tmp_path, change, needle):
    _, d = _save(tmp_path)
    if change.pop("drop_meta", False):
        meta = json.loads((d / "meta.json").read_text())
        meta.pop("model_config")
        (d / "meta.json").write_text(json.dumps(meta))
    _edit(d, **change)
    with pytest.raises(UserError) as ei:
        load_quantized(d)
    msg = str(ei.value)
    assert needle in msg and "\n" not in msg


def test_load_refuses_unexpected_method(tmp_path):
    _, d = _save(tmp_path)
    with pytest.raises(UserError, match="method is 'int4' but 'int8' was expected"):
        load_quantized(d, expect={"method": "int8"})
    load_quantized(d, expect={"method": "int4", "group_size": 64})


# ---------------------------------------------------------------------------------------------
# the stage
# ---------------------------------------------------------------------------------------------
def _run_dir(tmp_path):
    from tinyseek.data.shards import write_shards
    from tinyseek.train.checkpoint import save_checkpoint

    m = micro()
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(0, 255, (600,), generator=g).tolist() for _ in range(6)]
    write_shards(docs[:5], tmp_path / "run" / "data" / "train", 256, 255)
    write_shards(docs[5:], tmp_path / "run" / "data" / "val", 256, 255)
    return m, save_checkpoint(tmp_path / "run" / "ckpt", 5, m, None, {"note": "x"})


def test_stage_main_writes_loadable_smaller_checkpoint(tmp_path):
    from tinyseek.quant import stage
    from tinyseek.quant.load import load_model

    m, step = _run_dir(tmp_path)
    cfg = stage.Config(ckpt=str(tmp_path / "run"), method="int4", group_size=32, calibration="percentile", search="awq",
                       calib_batches=2, calib_batch_size=2, calib_seq_len=32, max_rows=128, eval_batches=1)
    met = stage.main(cfg)
    out = tmp_path / "run" / "quant" / "int4-g32"
    assert met["out"] == str(out) and (out / "quant_config.json").is_file()
    assert met["file_ratio"] > 2.5 and met["quantized_part_ratio"] > 6.5
    assert met["ppl_quant"] < met["ppl_float"] * 1.5
    q, meta = load_model(out)
    assert meta["note"] == "x" and meta["quant"]["calibration"] == "percentile" and meta["quant"]["embed"]
    assert isinstance(q.embed, QuantEmbedding)
    assert isinstance(q.lm_head, QuantLinear)
    with pytest.raises(UserError, match="already quantized"):
        stage.main(stage.Config(ckpt=str(out)))
    # QAT route through the stage
    met = stage.main(stage.Config(ckpt=str(step), out=str(tmp_path / "qat"), method="int8", qat_steps=2,
                                  calib_batches=2, calib_batch_size=2, calib_seq_len=32))
    assert met["qat_steps"] == 2 and load_quantized(tmp_path / "qat")[1]["quant"]["search"] == "none"


def test_spec_validation():
    from tinyseek.config import ConfigError

    with pytest.raises(ConfigError, match="add --search awq"):
        QuantSpec("int4", 32, calibration="kl").validate()
    with pytest.raises(ConfigError, match="group_size must be one of 32, 64, 128"):
        QuantSpec("int4", 48).validate()
    QuantSpec("int8", 48).validate()   # int8 is per-channel: the group size is ignored


def test_cli_bad_option_is_one_line_error():
    r = subprocess.run([sys.executable, "-m", "tinyseek", "quantize", "--ckpt", "x", "--method", "int3"],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip() == "tinyseek: error: method must be 'int8' or 'int4' or 'w8a8', got 'int3'"
    r = subprocess.run([sys.executable, "-m", "tinyseek", "quantize", "--ckpt", "/nonexistent/ckpt"],
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("tinyseek: error: no checkpoint found")


# ---------------------------------------------------------------------------------------------
# fused CPU kernels (on by default; built with the C compiler in well under a second)
# ---------------------------------------------------------------------------------------------
@pytest.fixture
def kernels_on():
    from tinyseek.kernels import quant as kernels

    saved = kernels._state["enabled"]
    if not kernels.enable():
        pytest.skip("no C compiler for the fused kernels")
    yield kernels
    kernels.enable(saved)


def test_fused_kernels_match_pytorch_path(kernels_on):
    kernels = kernels_on
    torch.manual_seed(0)

    def both(fn):
        kernels.enable(True)
        a = fn()
        kernels.enable(False)
        b = fn()
        kernels.enable(True)
        return a, b

    for k, n in ((128, 384), (96, 128), (7, 5), (33, 19)):   # odd / partial-group / tail widths
        w = torch.randn(n, k)
        for bits, g in ((8, 0), (4, 32), (4, 64), (4, 128)):
            for smooth in (None, torch.rand(k) + 0.5):
                ql = QuantLinear.from_float(w, bits, g, smooth_K=smooth)
                for rows in (1, 3, 8, 17, kernels.CHUNK_ROWS + 1):  # 17: three kernel calls; more: the PyTorch path
                    x = torch.randn(rows, k)
                    fused, ref = both(lambda: ql(x))
                    assert torch.allclose(fused, ref, atol=1e-4, rtol=1e-4)
                    ran = kernels.quant_mm(x, ql.qweight, ql.scale, ql.kernel, ql.group_size, ql.smooth)
                    assert (ran is not None) == (rows <= kernels.CHUNK_ROWS)
                fused, ref = both(ql.dequant)
                assert torch.allclose(fused, ref, atol=1e-6)
            emb = QuantEmbedding.from_float(w, bits, g)
            idx = torch.randint(0, n, (2, 3))
            fused, ref = both(lambda: emb(idx))
            assert torch.equal(fused, ref)
            with pytest.raises(IndexError):
                emb(torch.tensor([n]))
            for sm in (None, {"gate_up": torch.rand(3, k) + 0.5, "down": torch.rand(3, 24) + 0.5}):
                ex = QuantExperts.from_float(torch.randn(3, k, 2 * 24), torch.randn(3, 24, k), bits, g, smooth=sm)
                x = torch.randn(2, k)
                for e in range(3):
                    fused, ref = both(lambda: ex.expert_forward(e, x))
                    assert rel(fused, ref) < 1e-5   # outputs ~1e2 here: float summation order only
    m = micro()
    q = copy.deepcopy(m)
    quantize_model(q, QuantSpec("int4", 32))
    idx = tokens(1, 16)
    with torch.no_grad():    # token-by-token decode on the kernels == full forward on the PyTorch path
        cache = q.new_cache(1)
        fused = torch.cat([q(idx[:, i:i + 1], cache=cache).logits for i in range(16)], 1)
        kernels.enable(False)
        ref = q(idx).logits
    assert torch.allclose(fused, ref, atol=1e-4)


@pytest.mark.parametrize("portable", [False, True], ids=["ctypes", "ctypes-portable"])
def test_ctypes_and_portable_builds_match_too(kernels_on, monkeypatch, portable):
    """Without Python.h the kernels load through ctypes instead of as an extension; without
    AVX-512 they run portable loops: same results."""
    kernels = kernels_on
    monkeypatch.setitem(kernels._state, "lib", kernels.load("ctypes", portable=portable))
    torch.manual_seed(0)
    w = torch.randn(40, 33)
    for bits, g in ((8, 0), (4, 32)):
        ql, emb = QuantLinear.from_float(w, bits, g), QuantEmbedding.from_float(w, bits, g)
        ex = QuantExperts.from_float(torch.randn(2, 33, 2 * 16), torch.randn(2, 16, 33), bits, g,
                                     smooth={"gate_up": torch.rand(2, 33) + 0.5, "down": torch.rand(2, 16) + 0.5})
        x, idx = torch.randn(3, 33), torch.tensor([[0, 39, 5]])
        e_NK, w_NK = torch.tensor([[0, 1], [1, 1], [1, 0]]), torch.rand(3, 2)
        b = ex._buffers
        moe_all = lambda: kernels.moe(x, e_NK, w_NK, b["q_gate_up"], b["s_gate_up"], b["q_down"],  # noqa: E731
                                      b["s_down"], ex.kernel, g, b["smooth_gate_up"], b["smooth_down"])
        gate, up, down = (QuantLinear.from_float(torch.randn(*s), bits, g) for s in ((16, 33), (16, 33), (33, 16)))
        gb, ub, db = gate._buffers, up._buffers, down._buffers
        ffn = lambda: kernels.ffn(x, gb["qweight"], gb["scale"], None, ub["qweight"], ub["scale"], None,  # noqa: E731
                                  db["qweight"], db["scale"], None, gate.kernel, gate.group_size)
        fused = (ql(x), emb(idx), ex.expert_forward(1, x), ql.dequant(), moe_all(), ffn())
        kernels.enable(False)
        ref = (ql(x), emb(idx), ex.expert_forward(1, x), ql.dequant(),
               sum(w_NK[:, k, None] * torch.stack([ex.expert_forward(int(e), x[i:i + 1])[0]
                                                   for i, e in enumerate(e_NK[:, k])]) for k in range(2)),
               down(torch.nn.functional.silu(gate(x)) * up(x)))
        kernels.enable(True)
        for a, b in zip(fused, ref):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)


def test_kernels_fall_back_cleanly_without_a_compiler(tmp_path, monkeypatch, capsys):
    from tinyseek.kernels import quant as kernels

    monkeypatch.setattr(kernels.KERNELS, "state", {"enabled": True, "lib": None, "failed": False})
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    monkeypatch.setenv("TINYSEEK_KERNEL_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    ql = QuantLinear.from_float(torch.randn(16, 32), 8)
    x = torch.randn(1, 32)
    y = ql(x)                                   # first use tries to build, fails, falls back
    assert not kernels.available()
    assert "using the PyTorch path" in capsys.readouterr().out
    assert torch.allclose(y, x @ ql.dequant().t(), atol=1e-5)
    assert not list((tmp_path / "cache").glob("*.so"))


@pytest.mark.parametrize("bits,g", [(8, 0), (4, 32)])
def test_fused_moe_dispatch_and_swiglu_match_reference(kernels_on, bits, g):
    """Decode fast paths of a quantized model: all routed experts of a MoE layer in one kernel call
    (``quant_fused`` dispatch) and a whole quantized SwiGLU in one call (``QuantSwiGLU``) give the
    reference results (``loop`` dispatch / three QuantLinear calls on the PyTorch path)."""
    from tinyseek.quant.modules import QuantSwiGLU
    from tinyseek.quant.quantize import QUANT_DISPATCH, prepare_decode

    kernels = kernels_on
    m = micro()
    moe = next(b.ffn for b in m.blocks if isinstance(b.ffn, MoE))
    ex = moe.experts
    D, E = m.cfg.d_model, ex.n_experts
    sm = {"gate_up": torch.rand(E, D) + 0.5, "down": torch.rand(E, ex.hidden) + 0.5}
    for smooth in (None, sm):
        moe.experts = QuantExperts.from_float(ex.w_gate_up, ex.w_down, bits, g, smooth=smooth)
        moe.impl = "auto"
        prepare_decode(moe)
        assert moe.impl == QUANT_DISPATCH
        for n in (1, 3, 8, 20):                       # 20 tokens: above MAX_ROWS, the sorted fallback
            x = torch.randn(1, n, D)
            with torch.no_grad():
                fused = moe(x)[0]
                moe.impl = "loop"
                kernels.enable(False)
                ref = moe(x)[0]
                kernels.enable(True)
                moe.impl = QUANT_DISPATCH
            assert torch.allclose(fused, ref, atol=1e-5, rtol=1e-4), n
    b = moe.experts._buffers
    with pytest.raises(IndexError):
        kernels.moe(torch.randn(1, D), torch.tensor([[0, E]]), torch.ones(1, 2), b["q_gate_up"], b["s_gate_up"],
                    b["q_down"], b["s_down"], bits, g)
    sw = m.blocks[0].ffn                              # the dense FFN (a SwiGLU)
    for lin in ("gate_proj", "up_proj", "down_proj"):  # each with its own AWQ smoothing
        w = getattr(sw, lin).weight
        setattr(sw, lin, QuantLinear.from_float(w, bits, g, smooth_K=torch.rand(w.shape[1]) + 0.5))
    keys = set(m.state_dict())
    prepare_decode(m)
    assert type(m.blocks[0].ffn) is QuantSwiGLU and set(m.state_dict()) == keys
    for shape in ((1, 1, D), (2, 3, D), (1, 12, D)):
        x = torch.randn(shape)
        with torch.no_grad():
            fused = m.blocks[0].ffn(x)
            kernels.enable(False)
            ref = m.blocks[0].ffn(x)
            kernels.enable(True)
        assert fused.shape == x.shape and torch.allclose(fused, ref, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("spec", [QuantSpec("int8"), QuantSpec("int4", 32)], ids=["int8", "int4-g32"])
def test_quantized_mla_decode_folds_dequantised_weights(tmp_path, spec):
    """Decode steps of a quantized MLA model use the folded absorbed form (built from the
    dequantised weights), agree with the naive form, and refold after new weights are loaded;
    a saved and reloaded checkpoint gets the same decode fast paths."""
    from tinyseek.quant.modules import QuantSwiGLU
    from tinyseek.quant.quantize import QUANT_DISPATCH

    q = micro()
    rep = quantize_model(q, spec)
    idx = tokens(2, 14)

    def decode(model, impl):
        for b in model.blocks:
            b.attn.impl = impl
        with torch.no_grad():
            cache = model.new_cache(2)
            out = [model(idx[:, :6], cache=cache).logits]
            out += [model(idx[:, t:t + 1], cache=cache).logits for t in range(6, 14)]
        return torch.cat(out, 1)

    auto = decode(q, "auto")
    assert all(b.attn._folded is not None for b in q.blocks)
    naive = decode(q, "naive")
    assert torch.allclose(auto, naive, atol=1e-4, rtol=1e-4)
    other = micro()
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(0.5)
    quantize_model(other, spec)
    q.load_state_dict(other.state_dict())             # new codes: the folded weights must follow
    torch.testing.assert_close(decode(q, "auto"), decode(other, "naive"), atol=1e-4, rtol=1e-4)
    d = save_quantized(q, tmp_path / "q", quant_config(q, spec, rep["modules"]))
    loaded, _ = load_quantized(d)
    assert isinstance(loaded.blocks[0].ffn, QuantSwiGLU)
    assert any(getattr(b.ffn, "impl", None) == QUANT_DISPATCH for b in loaded.blocks)
    assert torch.equal(decode(loaded, "auto"), decode(q, "auto"))


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_biased_linear_keeps_its_float_bias_through_quantize_qat_save_load(tmp_path, method):
    """Imported models have biased projections (Qwen2 q/k/v): the bias stays float and is added
    after the quantized product, in quantize_model, a save/load round trip and QAT's convert."""
    torch.manual_seed(0)
    cfg = model_micro()
    cfg.attn, cfg.n_kv_heads, cfg.qkv_bias = "gqa", 2, True  # as an imported Qwen2 model has
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for b in model.blocks:
            for n in ("q_proj", "k_proj", "v_proj"):
                getattr(b.attn, n).bias.normal_(0, 0.5)
    lin = model.blocks[0].attn.q_proj
    x = torch.randn(5, lin.in_features)
    spec = QuantSpec(method=method, group_size=32)
    ql = QuantLinear.from_float(lin.weight, spec.bits, spec.eff_group_size, bias_N=lin.bias)
    no_bias = QuantLinear.from_float(lin.weight, spec.bits, spec.eff_group_size)
    with torch.no_grad():
        assert torch.allclose(ql(x) - no_bias(x), lin.bias.expand(5, -1), atol=1e-5)
    idx = torch.randint(0, cfg.vocab_size, (2, 9))
    with torch.no_grad():
        ref = model(idx).logits
    q = copy.deepcopy(model)
    report = quantize_model(q, spec)
    assert q.blocks[1].attn.k_proj.bias is not None
    with torch.no_grad():
        got = q(idx).logits
    save_quantized(q, tmp_path / "q", quant_config(q, spec, report["modules"]))
    loaded, _ = load_quantized(tmp_path / "q")
    with torch.no_grad():
        assert torch.equal(loaded(idx).logits, got)
    err = (got - ref).abs().max()
    assert err < (0.05 if method == "int8" else 0.2) * ref.abs().max()
    for b in q.blocks:  # the same quantized model without its biases is far off: they were used
        for n in ("q_proj", "k_proj", "v_proj"):
            getattr(b.attn, n).bias.zero_()
    with torch.no_grad():
        assert (q(idx).logits - ref).abs().max() > 2 * err
    fq = prepare_qat(copy.deepcopy(model), method, 32)
    assert fq.blocks[0].attn.v_proj.bias is not None
    convert_qat(fq)
    assert torch.equal(fq.blocks[0].attn.v_proj.bias, model.blocks[0].attn.v_proj.bias)


@pytest.mark.parametrize("bits, g", [(8, 0), (4, 32), (4, 0)])
def test_quant_products_of_many_rows_equal_each_row_alone_bitwise(kernels_on, bits, g):
    """The kernels widen each step of the codes once for a tile of 4 input rows (the last M % 4 rows
    go one at a time) and calls of up to CHUNK_ROWS rows are split into MAX_ROWS blocks: every row
    still gets the bits it gets alone (the engine's greedy tokens do not depend on the batch)."""
    torch.manual_seed(bits + g)
    ql = QuantLinear.from_float(torch.randn(40, 96), bits, g)
    for rows in (2, 4, 5, 8, 9, 13, kernels_on.CHUNK_ROWS):
        x = torch.randn(rows, 96)
        together = kernels_on.quant_mm(x, ql.qweight, ql.scale, ql.kernel, ql.group_size)
        alone = torch.cat([kernels_on.quant_mm(x[i:i + 1], ql.qweight, ql.scale, ql.kernel, ql.group_size)
                           for i in range(rows)])
        assert torch.equal(together, alone)
        torch.testing.assert_close(together, x @ ql.dequant().t(), rtol=1e-4, atol=1e-4)
