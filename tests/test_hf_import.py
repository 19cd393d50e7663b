"""HF import: tiny transformers models of 8 architectures (features switched on), saved with
save_pretrained, imported with read_hf_dir + model_from_hf: logits, greedy decoding, KV-cache decode
(C kernels) and the export back to transformers all match transformers itself."""
from __future__ import annotations

import json
import math

import pytest
import torch

from serve_fixtures import greedy_cached
from tinyseek.errors import UserError
from tinyseek.interop.hf_export import export_hf
from tinyseek.interop.hf_import import SUPPORTED, config_from_hf, model_from_hf, read_hf_dir, state_from_hf
from tinyseek.kernels import attn as attn_kernel
from tinyseek.kernels import moe_infer as moe_kernel
from tinyseek.model.layers import ROPE_TYPES, mla_softmax_mscale

transformers = pytest.importorskip("transformers")

V = 96
_COMMON = dict(vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
               intermediate_size=48, max_position_embeddings=128, initializer_range=0.25, bos_token_id=None,
               eos_token_id=None, pad_token_id=None)


def _c(**kw):
    return {**_COMMON, **kw}


# name: (config class, kwargs, HF architecture)
CASES = {
    "llama": ("LlamaConfig", _c(attention_bias=True, tie_word_embeddings=True, rope_parameters={
        "rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}), "LlamaForCausalLM"),
    "mistral": ("MistralConfig", _c(sliding_window=6, head_dim=8), "MistralForCausalLM"),
    "qwen2": ("Qwen2Config", _c(use_sliding_window=True, sliding_window=7, max_window_layers=0,
                                tie_word_embeddings=True), "Qwen2ForCausalLM"),
    "qwen3": ("Qwen3Config", _c(head_dim=16, attention_bias=True, rope_parameters={
        "rope_type": "linear", "rope_theta": 5000.0, "factor": 2.0}), "Qwen3ForCausalLM"),
    "qwen2_moe": ("Qwen2MoeConfig", _c(num_hidden_layers=3, num_experts=4, num_experts_per_tok=2,
                                       moe_intermediate_size=16, shared_expert_intermediate_size=40,
                                       mlp_only_layers=[0], norm_topk_prob=False), "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("Qwen3MoeConfig", _c(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8,
                                       norm_topk_prob=True), "Qwen3MoeForCausalLM"),
    "mixtral": ("MixtralConfig", _c(num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM"),
    "deepseek_v3_yarn": ("DeepseekV3Config", _c(
        num_hidden_layers=3, num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=8, n_shared_experts=1,
        n_group=4, topk_group=2, num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=2.5,
        kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
                         "mscale": 0.8, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1}),
        "DeepseekV3ForCausalLM"),
    "deepseek_v3_qlora": ("DeepseekV3Config", _c(
        num_key_value_heads=4, moe_intermediate_size=16, n_routed_experts=4, n_shared_experts=2, n_group=1,
        topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1, routed_scaling_factor=1.5, norm_topk_prob=False,
        kv_lora_rank=16, q_lora_rank=12, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=12, rope_interleave=False,
        tie_word_embeddings=True), "DeepseekV3ForCausalLM"),
}
PROMPTS = [[5, 17, 3, 88, 41, 9, 23, 60, 2, 71, 33, 14], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18],
           [90, 7, 45, 45, 12, 3, 66, 30, 8]]
NEW = 32


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one torch thread (on 2 shared cores, 2 threads made each decode step ~20x slower)."""
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(saved)


def _hf_model(name):
    cls, kw, _ = CASES[name]
    torch.manual_seed(0)
    m = transformers.AutoModelForCausalLM.from_config(getattr(transformers, cls)(**kw), dtype=torch.float32)
    with torch.no_grad():  # HF inits biases to zero and norms to one: move them so a missed one shows
        for n, p in m.named_parameters():
            if "norm" in n:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.normal_(0.0, 0.3)
            elif n.endswith("gate.weight"):
                p.normal_(0.0, 0.5)  # decisive routing (no near-ties between implementations)
        for n, b in m.named_buffers():
            if n.endswith("e_score_correction_bias"):
                b.normal_(0.0, 0.1)
    return m.eval()


@pytest.fixture(scope="module", params=list(CASES))
def pair(request, tmp_path_factory):
    """(case name, HF model, its saved directory, our imported model)."""
    name = request.param
    hf = _hf_model(name)
    d = tmp_path_factory.mktemp(name)
    hf.save_pretrained(d)
    cfg, tensors = read_hf_dir(d)
    ours = model_from_hf(cfg, tensors)
    return name, hf, d, ours



def _check_fast_paths(model, ids, full, name):
    """Where the C kernels are built, decoding ran through them: the MoE kernel dispatch, and for MLA
    the serving engine's ragged forward (absorbed latent attention kernel), which must also match."""
    x = torch.zeros(1, model.cfg.d_model)
    with torch.no_grad():
        for moe in model.moe_layers:
            if moe_kernel.KERNELS.ready() is not None:
                assert moe.variant(x) == "kernel", name
        if model.cfg.attn == "mla" and attn_kernel.KERNELS.ready() is not None:
            cache = model.new_cache(1)
            assert model.can_ragged(cache), name
            N = ids.shape[1]
            out = model.forward_ragged(ids[0], torch.zeros(N, dtype=torch.long), torch.arange(N), cache,
                                       torch.arange(N))
            assert (out - full[0]).abs().max().item() < 1e-4, name


def test_logits_greedy_cache_and_export(pair, tmp_path):
    name, hf, d, ours = pair
    assert ours.cfg.hf_arch == CASES[name][2]
    for prompt in PROMPTS:
        idx = torch.tensor([prompt])
        with torch.no_grad():
            theirs = hf(input_ids=idx).logits
            mine = ours(idx).logits
        assert (mine - theirs).abs().max().item() < 1e-4, name
        assert theirs.std().item() > 0.3  # not near-uniform: greedy decoding below is a real test
        # greedy: 32 new tokens, our KV-cache decode (C kernels under no_grad) vs HF generate
        with torch.no_grad():
            gen = hf.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=NEW, do_sample=False,
                              pad_token_id=0, eos_token_id=None)[0].tolist()
        seq = greedy_cached(ours, prompt, NEW)
        assert seq == gen, name
        assert len(set(seq[len(prompt):])) > 3, name  # the continuation is not one repeated token
        # token-by-token decode from a prefill == the full forward over the whole sequence
        full_ids = torch.tensor([seq])
        with torch.no_grad():
            full = ours(full_ids).logits
            cache = ours.new_cache(1)
            steps = [ours(full_ids[:, :len(prompt)], cache=cache).logits]
            for t in range(len(prompt), len(seq)):
                steps.append(ours(full_ids[:, t:t + 1], cache=cache).logits)
        assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-4, name
        _check_fast_paths(ours, full_ids, full, name)
    # export back as the same architecture; transformers' logits from it equal the original's
    summary = export_hf(ours, tmp_path / "back")
    assert summary["architecture"] == CASES[name][2]
    back, info = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"), dtype=torch.float32,
                                                                   output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    idx = torch.tensor([p[:9] for p in PROMPTS])
    with torch.no_grad():
        assert (back.eval()(input_ids=idx).logits - hf(input_ids=idx).logits).abs().max().item() < 1e-4, name
    again = json.loads((tmp_path / "back" / "config.json").read_text())
    orig = json.loads((d / "config.json").read_text())
    for k in ("rope_parameters", "sliding_window", "tie_word_embeddings", "rope_interleave", "attention_bias",
              "qkv_bias", "shared_expert_intermediate_size", "norm_topk_prob"):
        if k in orig:
            assert again.get(k) == orig[k], (name, k, again.get(k), orig[k])


def test_in_memory_state_dict_imports(pair):
    """transformers' in-memory names (fused ``experts.gate_up_proj`` / ``down_proj``, Mixtral's ``mlp``)
    import as well as the saved ones; DeepSeek-V3's MTP layers are skipped as transformers does."""
    name, hf, d, ours = pair
    cfg = json.loads((d / "config.json").read_text())
    tensors = dict(hf.state_dict())
    if name.startswith("deepseek_v3"):
        assert cfg["num_nextn_predict_layers"] == 1
        tensors[f"model.layers.{cfg['num_hidden_layers']}.eh_proj.weight"] = torch.zeros(4, 4)
    m = model_from_hf(cfg, tensors)
    idx = torch.tensor([PROMPTS[2]])
    with torch.no_grad():
        assert torch.equal(m(idx).logits, ours(idx).logits), name
    if name == "llama":
        half = model_from_hf(cfg, tensors, dtype=torch.bfloat16)
        assert half.embed.weight.dtype == torch.bfloat16 and half.lm_head.weight is half.embed.weight
        with torch.no_grad():
            assert torch.isfinite(half(idx).logits.float()).all()


def test_legacy_rope_scaling_keys():
    """Older config.json files: ``rope_scaling`` (``type`` or ``rope_type``) beside a top-level ``rope_theta``."""
    new = config_from_hf(transformers.LlamaConfig(**CASES["llama"][1]).to_dict())
    legacy = {**transformers.LlamaConfig(**CASES["llama"][1]).to_dict(), "rope_theta": 10000.0}
    legacy["rope_scaling"] = {k: v for k, v in legacy.pop("rope_parameters").items() if k != "rope_theta"}
    assert config_from_hf(legacy) == new
    ds = transformers.DeepseekV3Config(**CASES["deepseek_v3_yarn"][1]).to_dict()
    rp = ds.pop("rope_parameters")
    ds.update(rope_theta=rp.pop("rope_theta"), rope_scaling={**rp, "type": rp.pop("rope_type")})
    assert config_from_hf(ds) == config_from_hf(transformers.DeepseekV3Config(**CASES["deepseek_v3_yarn"][1]).to_dict())
    with pytest.raises(UserError, match="quantized"):
        config_from_hf({**ds, "quantization_config": {"quant_method": "fp8"}})


def test_rope_tables_match_transformers():
    """Our inverse frequencies and cos/sin factor per rope type == transformers' ROPE_INIT_FUNCTIONS."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cases = [{"rope_type": "linear", "factor": 3.0},
             {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
              "original_max_position_embeddings": 64},
             {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
             {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
              "mscale_all_dim": 0.8, "beta_fast": 16, "beta_slow": 2, "truncate": False},
             {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64, "attention_factor": 0.7}]
    for rp in cases:
        hf = transformers.LlamaConfig(**_c(head_dim=16, rope_parameters={"rope_theta": 5000.0, **rp}))
        inv, scale = ROPE_INIT_FUNCTIONS[rp["rope_type"]](hf, "cpu")
        cfg = config_from_hf(hf.to_dict())
        ours, our_scale = ROPE_TYPES[cfg.rope_type](16, cfg)
        assert torch.equal(ours, inv.float()), rp
        assert our_scale == scale, rp
    from transformers.modeling_rope_utils import yarn_apply_mscale
    cfg = config_from_hf(transformers.DeepseekV3Config(**_c(rope_parameters=cases[3] | {"rope_theta": 1e4})).to_dict())
    m = mla_softmax_mscale(cfg)
    assert 16 ** -0.5 * m * m == yarn_apply_mscale(cases[3] | {"rope_theta": 1e4}, 16 ** -0.5)


def test_sharded_checkpoint_and_max_seq_len(tmp_path):
    hf = _hf_model("qwen3_moe")
    hf.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    cfg, tensors = read_hf_dir(tmp_path)
    m = model_from_hf(cfg, tensors, max_seq_len=48)
    assert m.cfg.max_seq_len == 48 and m.rotary.cos.shape[0] == 48
    idx = torch.tensor([PROMPTS[0]])
    with torch.no_grad():
        assert (m(idx).logits - hf(input_ids=idx).logits).abs().max().item() < 1e-4
    # a missing shard is named
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(UserError, match=shard.name):
        read_hf_dir(tmp_path)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama_bad")
    _hf_model("mistral").save_pretrained(d)
    return d


def _one_line(ei):
    assert "\n" not in str(ei.value)
    return str(ei.value)


def test_bad_directories(llama_dir, tmp_path):
    with pytest.raises(UserError, match="config.json"):
        read_hf_dir(tmp_path)
    with pytest.raises(UserError, match="not a directory"):
        read_hf_dir(tmp_path / "nope")
    (tmp_path / "config.json").write_text("{ not json")
    with pytest.raises(UserError, match="JSON") as ei:
        read_hf_dir(tmp_path)
    _one_line(ei)
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UserError, match="no model.safetensors"):
        read_hf_dir(tmp_path)
    data = (llama_dir / "model.safetensors").read_bytes()
    for cut in (len(data) - 100, 5, 100):
        (tmp_path / "model.safetensors").write_bytes(data[:cut])
        with pytest.raises(UserError, match="safetensors") as ei:
            read_hf_dir(tmp_path)
        _one_line(ei)


def test_bad_tensors_and_architectures(llama_dir):
    hf, tensors = read_hf_dir(llama_dir)
    cfg = config_from_hf(hf)
    bad = dict(tensors)
    bad["model.layers.1.self_attn.q_proj.weight"] = torch.zeros(16, 32)
    with pytest.raises(UserError, match=r"layer 1 q_proj weight .*has shape \(16, 32\), the config says \(32, 32\)"):
        state_from_hf(hf, cfg, bad)
    bad = {k: v for k, v in tensors.items() if k != "model.norm.weight"}
    with pytest.raises(UserError, match="lacks tensor model.norm.weight"):
        state_from_hf(hf, cfg, bad)
    bad = dict(tensors, **{"model.layers.0.self_attn.q_proj.bias": torch.zeros(32)})
    with pytest.raises(UserError, match="unexpected tensor model.layers.0.self_attn.q_proj.bias"):
        state_from_hf(hf, cfg, bad)
    for over, needle in [({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}, "GPT2LMHeadModel"),
                         ({"hidden_act": "gelu"}, "hidden_act"),
                         ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "dynamic"),
                         ({"rope_parameters": {"rope_type": "default", "rope_theta": 1e4,
                                               "partial_rotary_factor": 0.5}}, "partial_rotary_factor"),
                         ({"hidden_size": None}, "hidden_size")]:
        with pytest.raises(UserError, match=needle) as ei:
            config_from_hf({**hf, **over})
        _one_line(ei)


def test_unsupported_layouts():
    base = transformers.Qwen2MoeConfig(**_c(num_hidden_layers=4, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=16)).to_dict()
    assert config_from_hf({**base, "mlp_only_layers": [0, 1]}).n_dense_layers == 2
    with pytest.raises(UserError, match="MoE layers"):
        config_from_hf({**base, "decoder_sparse_step": 2})
    with pytest.raises(UserError, match="MoE layers"):
        config_from_hf({**base, "mlp_only_layers": [2]})
    with pytest.raises(UserError, match="top-1"):
        config_from_hf({**base, "num_experts_per_tok": 1, "norm_topk_prob": True})
    q2 = transformers.Qwen2Config(**_c(num_hidden_layers=4, use_sliding_window=True, sliding_window=8,
                                       max_window_layers=2)).to_dict()
    with pytest.raises(UserError, match="sliding window"):
        config_from_hf(q2)
    assert config_from_hf(q2, max_seq_len=8).sliding_window == 0  # the window cuts nothing within 8 tokens
    assert set(SUPPORTED) == {v[2] for v in CASES.values()}


def test_yarn_config_values():
    """DeepseekV3 YaRN settings land in the config; the softmax scale carries mscale_all_dim."""
    cls, kw, _ = CASES["deepseek_v3_yarn"]
    cfg = config_from_hf(getattr(transformers, cls)(**kw).to_dict())
    assert (cfg.rope_type, cfg.rope_factor, cfg.rope_original_max_len, cfg.yarn_mscale, cfg.yarn_mscale_all_dim) == \
        ("yarn", 4.0, 32, 0.8, 1.0)
    assert cfg.hf_rope_interleave and cfg.latent_norm_eps == 1e-6 and cfg.bias_update_speed > 0
    m = 0.1 * math.log(4.0) + 1.0
    assert math.isclose(mla_softmax_mscale(cfg), m)
