"""HF export: every supported setting loads in transformers as an existing architecture with our logits."""
from __future__ import annotations

import json

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model import Transformer
from tinyseek.interop.hf_export import export_hf

transformers = pytest.importorskip("transformers")


def _model(seed=0, perturb_bias=True, **over):
    cfg = model_micro()
    cfg.score_func = "softmax"  # the cases below name sigmoid explicitly where they want it
    for k, v in over.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:  # norm weights: away from one so a missed/mis-routed norm shows
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            if name.endswith("router.weight"):  # decisive routing: no near-ties between implementations
                p.normal_(0.0, 0.5)
        for mo in m.moe_layers:
            if perturb_bias:
                mo.router.expert_bias.copy_(0.1 * torch.randn_like(mo.router.expert_bias))
    return m


def _hf_logits(out_dir, idx):
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32,
                                                                 output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    with torch.no_grad():
        return hf, hf(input_ids=idx).logits


CASES = {
    # name: (overrides, perturb expert_bias, expected HF class)
    "mla_sigmoid_groups_qlora": (dict(score_func="sigmoid", n_routed_experts=8, n_groups=4, topk_groups=2,
                                      routed_scaling=2.5, q_lora_rank=16), True, "DeepseekV3ForCausalLM"),
    "mla_sigmoid_noshared_tied": (dict(score_func="sigmoid", n_shared_experts=0, tie_embeddings=True,
                                       norm_topk_prob=False, n_layers=3), True, "DeepseekV3ForCausalLM"),
    "mla_dense": (dict(n_routed_experts=0), False, "DeepseekV3ForCausalLM"),
    "mla_softmax_nonorm_groups": (dict(norm_topk_prob=False, n_routed_experts=8, n_groups=4, topk_groups=2,
                                       routed_scaling=1.5, q_lora_rank=16), False, "DeepseekV2ForCausalLM"),
    "mla_softmax_top1": (dict(top_k=1, bias_update_speed=0.0), True, "DeepseekV2ForCausalLM"),
    "gqa_dense": (dict(attn="gqa", n_kv_heads=2, n_routed_experts=0), False, "LlamaForCausalLM"),
    "gqa_sigmoid_groups": (dict(attn="gqa", n_kv_heads=2, score_func="sigmoid", n_routed_experts=8, n_groups=2,
                                topk_groups=1, routed_scaling=2.0, head_dim=8), True, "Glm4MoeForCausalLM"),
    "gqa_softmax_bias": (dict(attn="gqa", n_kv_heads=1, n_layers=3, n_shared_experts=2), True,
                         "Ernie4_5_MoeForCausalLM"),
    # settings of the imported architectures, on tinyseek's own models (no hf_arch): the first that fits
    "gqa_bias_llama3": (dict(attn="gqa", n_kv_heads=2, n_routed_experts=0, qkv_bias=True, rope_type="llama3",
                             rope_factor=8.0, rope_original_max_len=32), False, "LlamaForCausalLM"),
    "gqa_sliding": (dict(attn="gqa", n_kv_heads=2, n_routed_experts=0, sliding_window=8, rope_type="yarn",
                         rope_factor=4.0, rope_original_max_len=32), False, "MistralForCausalLM"),
    "gqa_qknorm_sliding": (dict(attn="gqa", n_kv_heads=2, n_routed_experts=0, qk_norm=True, qkv_bias=True,
                                o_bias=True, sliding_window=8), False, "Qwen3ForCausalLM"),
    "gqa_softmax_shared_nogate": (dict(attn="gqa", n_kv_heads=2, norm_topk_prob=False, bias_update_speed=0.0,
                                       qkv_bias=True), False, "Qwen2MoeForCausalLM"),
    "gqa_softmax_shared_gate": (dict(attn="gqa", n_kv_heads=2, bias_update_speed=0.0, shared_expert_gate=True,
                                     shared_d_ff=40, n_dense_layers=0, n_layers=3), False, "Qwen2MoeForCausalLM"),
    "gqa_softmax_qknorm": (dict(attn="gqa", n_kv_heads=2, bias_update_speed=0.0, qk_norm=True, n_shared_experts=0),
                           False, "Qwen3MoeForCausalLM"),
    "mla_yarn_shared_width": (dict(score_func="sigmoid", rope_type="yarn", rope_factor=4.0, rope_original_max_len=32,
                                   yarn_mscale=0.8, yarn_mscale_all_dim=1.0, shared_d_ff=64, norm_eps=1e-5,
                                   latent_norm_eps=1e-6), True, "DeepseekV3ForCausalLM"),
}


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")  # zero-width shared MLP
@pytest.mark.parametrize("case", list(CASES))
def test_export_logits_match(case, tmp_path):
    over, perturb, arch = CASES[case]
    m = _model(perturb_bias=perturb, **over)
    summary = export_hf(m, tmp_path / "hf")
    assert summary["architecture"] == arch
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == [arch]
    idx = torch.randint(0, m.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = m(idx).logits
    hf, theirs = _hf_logits(tmp_path / "hf", idx)
    assert type(hf).__name__ == arch
    assert (ours - theirs).abs().max().item() < 1e-4, case


def test_export_uses_expert_bias(tmp_path):
    """A changed expert_bias changes the routing in the exported model too (it is really mapped)."""
    m = _model(score_func="sigmoid", perturb_bias=False)
    idx = torch.randint(0, m.cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = m(idx).logits
        for mo in m.moe_layers:
            mo.router.expert_bias.copy_(torch.tensor([1.0, 0.0, 0.0, -1.0]))
        after = m(idx).logits
    assert (before - after).abs().max() > 1e-3
    export_hf(m, tmp_path / "hf")
    _, theirs = _hf_logits(tmp_path / "hf", idx)
    assert (after - theirs).abs().max() < 1e-4


@pytest.mark.parametrize("over,needle", [
    (dict(), "score-func sigmoid"),  # micro: MLA + softmax + renormalised top-2 + non-zero bias
    (dict(score_func="sigmoid", sliding_window=16), "sliding_window"),
    (dict(score_func="sigmoid", capacity_factor=1.0), "capacity_factor"),
    (dict(score_func="sigmoid", norm_eps=1e-5), "norm_eps"),
    (dict(attn="gqa", n_kv_heads=2, routed_scaling=2.0), "routed_scaling"),
])
def test_unsupported_settings_raise_user_error(over, needle, tmp_path):
    m = _model(**over)
    with pytest.raises(UserError, match=needle) as ei:
        export_hf(m, tmp_path / "hf")
    assert "\n" not in str(ei.value)
    assert not (tmp_path / "hf").exists()
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_export_replaces_existing_dir_atomically(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    export_hf(_model(score_func="sigmoid"), out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


TEXTS = ["The quick brown fox jumps over the lazy dog. 12 + 34 = 46", "naïve café 中文 tokens\n\tcode = x",
         "<|user|>what is 3*7?<|assistant|><think>3*7=21</think><answer>21</answer><|eos|>"] * 20
PROBES = ["Hello world 2024!", "中文 and naïve", "<|user|>1+1?<|assistant|><think>1+1=2</think>", "  spaces\n"]


@pytest.mark.parametrize("kind", ["bpe", "bytes"])
def test_export_tokenizer_loads_in_transformers(kind, tmp_path):
    from tinyseek.tokenizer import byte_tokenizer, train_tokenizer
    tok = train_tokenizer(TEXTS, 300) if kind == "bpe" else byte_tokenizer()
    m = _model(score_func="sigmoid", vocab_size=320)
    summary = export_hf(m, tmp_path / "hf", tokenizer=tok)
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(summary["files"])
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert isinstance(transformers.PreTrainedTokenizerFast.from_pretrained(str(tmp_path / "hf")),
                      transformers.PreTrainedTokenizerFast)
    for text in PROBES:
        ids = tok.encode(text)
        assert hf_tok(text, add_special_tokens=False)["input_ids"] == ids
        assert hf_tok.decode(ids) == tok.decode(ids)
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    # the R1 tags are added tokens but not special: a standard decode keeps them, role markers go
    ids = tok.encode("<|user|>3+4?<|assistant|><think>3 + 4 = 7</think><answer>7</answer><|eos|>")
    assert hf_tok.decode(ids, skip_special_tokens=True) == "3+4?<think>3 + 4 = 7</think><answer>7</answer>"
    assert hf_tok.convert_tokens_to_ids("<think>") == tok.token_to_id("<think>")
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["eos_token_id"] == tok.eos_id
    for msgs in ([{"role": "user", "content": "2+2?"}],
                 [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                  {"role": "assistant", "content": "hello"}]):
        for gen in (True, False):
            assert hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
                tok.apply_chat_template(msgs, add_generation_prompt=gen)


def test_tokenizer_larger_than_model_vocab_is_an_error(tmp_path):
    from tinyseek.tokenizer import byte_tokenizer
    with pytest.raises(UserError, match="vocab"):
        export_hf(_model(score_func="sigmoid"), tmp_path / "hf", tokenizer=byte_tokenizer())


def test_export_stage_from_run_dir(tmp_path, capsys):
    """`tinyseek export --ckpt RUN --out DIR --format hf` loads the latest checkpoint + the run's tokenizer."""
    from tinyseek.cli import main as cli_main
    from tinyseek.tokenizer import train_tokenizer
    from tinyseek.train.checkpoint import save_checkpoint
    run = tmp_path / "run"
    tok = train_tokenizer(TEXTS, 300, run / "tokenizer")
    m = _model(score_func="sigmoid", vocab_size=320)
    save_checkpoint(run / "ckpt", 5, _model(seed=1, score_func="sigmoid", vocab_size=320), None, {})
    save_checkpoint(run / "ckpt", 10, m, None, {})
    out = tmp_path / "hf"
    assert cli_main(["export", "--ckpt", str(run), "--out", str(out), "--format", "hf"]) == 0
    assert "DeepseekV3" in capsys.readouterr().out
    idx = torch.tensor([tok.encode("<|user|>12+30?<|assistant|>")])
    with torch.no_grad():
        ours = m(idx).logits
    _, theirs = _hf_logits(out, idx)
    assert (ours - theirs).abs().max() < 1e-4  # step 10, not step 5
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    assert hf_tok("<|user|>12+30?", add_special_tokens=False)["input_ids"] == tok.encode("<|user|>12+30?")


@pytest.mark.parametrize("argv,needle", [
    ([], "--ckpt"),
    (["--ckpt", "CKPT", "--format", "onnx"], "format"),
    (["--ckpt", "MISSING"], "does not exist"),
    (["--ckpt", "CKPT"], "score-func sigmoid"),  # micro preset: softmax router with a non-zero bias
])
def test_export_stage_errors(argv, needle, tmp_path, capsys):
    from tinyseek.cli import main as cli_main
    from tinyseek.train.checkpoint import save_checkpoint
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, _model(), None, {})
    argv = [str(ckpt) if a == "CKPT" else str(tmp_path / "nope") if a == "MISSING" else a for a in argv]
    assert cli_main(["export", *argv, "--out", str(tmp_path / "hf")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyseek: error:") and needle in err and "\n" not in err
    assert not (tmp_path / "hf").exists()


def test_hf_generate_matches_our_greedy_decode(tmp_path):
    """The exported model also decodes with transformers' KV cache exactly like our cached decode."""
    m = _model(score_func="sigmoid", q_lora_rank=16)
    export_hf(m, tmp_path / "hf")
    hf, _ = _hf_logits(tmp_path / "hf", torch.zeros(1, 1, dtype=torch.long))
    prompt = torch.randint(0, m.cfg.vocab_size, (1, 6), generator=torch.Generator().manual_seed(3))
    cache, ids = m.new_cache(1), prompt
    with torch.no_grad():
        logits = m(prompt, cache=cache).logits
        for _ in range(10):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits = m(nxt, cache=cache).logits
        theirs = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=10, do_sample=False,
                             pad_token_id=0)
    assert theirs.tolist() == ids.tolist()
