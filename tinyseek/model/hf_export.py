"""Export a tinyseek :class:`~tinyseek.model.Transformer` as a Hugging Face checkpoint of an *existing*
transformers architecture (config.json + model.safetensors [+ tokenizer.json, tokenizer_config.json]),
so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it with no custom code and gives our logits.

Only exact mappings are written. The first architecture below that can express the model wins; when
none can, :func:`export_hf` raises a one-line :class:`UserError` naming the settings that block each.

======================  ==============================================================  =================
attention / FFN         router settings                                                  HF architecture
======================  ==============================================================  =================
MLA, dense or MoE       sigmoid scores (any expert_bias, groups, norm, scaling)          DeepseekV3
MLA, MoE                softmax, expert_bias all zero, top-k not renormalised (or k=1)   DeepseekV2
GQA, dense              -                                                                Llama
GQA, MoE                sigmoid scores (any expert_bias, groups, norm, scaling)          Glm4Moe
GQA, MoE                softmax, renormalised top-k (k>1), no groups, scaling 1          Ernie4_5_Moe
======================  ==============================================================  =================

Not expressible anywhere (UserError): MLA + softmax scores with a non-zero ``expert_bias`` or with
renormalised top-k > 1 (no HF MLA model loadable by AutoModelForCausalLM routes that way: train with
``--model.score-func sigmoid``); GQA + softmax without renormalised top-k > 1, or with groups or
``routed_scaling`` != 1; ``sliding_window`` shorter than ``max_seq_len``; ``capacity_factor`` > 0 (HF
never drops tokens); MLA with ``norm_eps`` != 1e-6 (HF's q/kv latent norms hard-code 1e-6); sigmoid
routing with one expert per group (HF scores a group by its top-2 experts). Presets: ``gpu-small``
exports to DeepseekV3; ``micro`` / ``cpu-tiny`` (softmax, renormalised top-2) do not.

Weight layout notes. Our stacked experts ``w_gate_up (E, D, 2F)`` (gate first) and ``w_down (E, F, D)``
become transformers 5.x fused ``experts.gate_up_proj (E, 2F, D)`` and ``experts.down_proj (E, D, F)``
(transposes). Our RoPE is the rotate-half layout: DeepseekV3 takes it as is (``rope_interleave=False``),
Llama/Glm4Moe use it natively; DeepseekV2 and Ernie 4.5 rotate interleaved pairs, so the rows of the
RoPE part of the query/key projections are permuted (:func:`rope_perm`), which leaves q.k unchanged.
The aux-loss-free ``expert_bias`` maps to ``e_score_correction_bias`` (only if the model uses it:
``bias_update_speed > 0``; otherwise zeros are written, as our router then ignores the bias).
Without shared experts, DeepseekV3/V2/Glm4Moe (which always build one) get a zero-width shared MLP.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from tinyseek.common import atomic_dir, atomic_write_json
from tinyseek.errors import UserError

HF_MLA_LATENT_NORM_EPS = 1e-6  # transformers builds q_a_layernorm / kv_a_layernorm with the default eps


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------
def rope_perm(dim: int) -> list[int]:
    """Row order that turns rotate-half RoPE dims (i pairs with i+dim/2) into interleaved pairs (2i, 2i+1).

    >>> rope_perm(6)
    [0, 3, 1, 4, 2, 5]
    """
    half = dim // 2
    return [j for i in range(half) for j in (i, i + half)]


def permute_rope_rows(w_OI: torch.Tensor, group: int, start: int, dim: int, inverse: bool = False) -> torch.Tensor:
    """Permute, inside every block of ``group`` output rows, rows ``start .. start+dim`` by :func:`rope_perm`
    (rotate-half -> interleaved pairs), or by its inverse (``inverse``: interleaved -> rotate-half, import).

    >>> permute_rope_rows(torch.arange(8.0)[:, None], group=4, start=0, dim=4).flatten().tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    >>> w = torch.arange(6.0)[:, None]
    >>> permute_rope_rows(permute_rope_rows(w, 6, 0, 6), 6, 0, 6, inverse=True).flatten().tolist()
    [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
    """
    O, I = w_OI.shape
    w = w_OI.reshape(O // group, group, I).clone()
    perm = torch.tensor(rope_perm(dim))
    idx = (torch.argsort(perm) if inverse else perm) + start
    w[:, start:start + dim] = w[:, idx]
    return w.reshape(O, I)


def split_experts(w_gate_up_EDF2: torch.Tensor, w_down_EFD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Our stacked expert weights -> transformers 5.x fused ``gate_up_proj (E, 2F, D)``, ``down_proj (E, D, F)``.

    >>> g, d = split_experts(torch.zeros(3, 4, 10), torch.zeros(3, 5, 4))
    >>> tuple(g.shape), tuple(d.shape)
    ((3, 10, 4), (3, 4, 5))
    """
    return w_gate_up_EDF2.transpose(1, 2).contiguous(), w_down_EFD.transpose(1, 2).contiguous()


# ---------------------------------------------------------------------------------------------
# what each architecture can express
# ---------------------------------------------------------------------------------------------
def _moe_layers(cfg) -> list[int]:
    return [i for i in range(cfg.n_layers) if cfg.n_routed_experts > 0 and i >= cfg.n_dense_layers]


def _bias_nonzero(sd: dict, cfg) -> bool:
    if cfg.bias_update_speed <= 0:
        return False
    return any(bool(sd[f"blocks.{i}.ffn.router.expert_bias"].abs().max() > 0) for i in _moe_layers(cfg))


def _common_blockers(cfg) -> list[str]:
    out = []
    if 0 < cfg.sliding_window < cfg.max_seq_len:
        out.append(f"sliding_window={cfg.sliding_window} (HF models here attend to the full context)")
    if _moe_layers(cfg) and cfg.capacity_factor > 0:
        out.append(f"capacity_factor={cfg.capacity_factor} (HF MoE never drops tokens)")
    return out


def _sigmoid_router_blockers(cfg) -> list[str]:
    out = []
    if not _moe_layers(cfg):
        return out
    if cfg.score_func != "sigmoid":
        out.append(f"score_func={cfg.score_func!r} (needs 'sigmoid')")
    elif cfg.n_routed_experts // cfg.n_groups < 2:
        out.append(f"n_groups={cfg.n_groups} leaves one expert per group (HF scores a group by its top-2)")
    return out


def _blockers_deepseek_v3(cfg, sd) -> list[str]:
    out = []
    if cfg.attn != "mla":
        out.append("attn='gqa' (needs 'mla')")
    elif cfg.norm_eps != HF_MLA_LATENT_NORM_EPS:
        out.append(f"norm_eps={cfg.norm_eps} (HF MLA latent norms use 1e-6)")
    return out + _sigmoid_router_blockers(cfg)


def _blockers_deepseek_v2(cfg, sd) -> list[str]:
    out = []
    if cfg.attn != "mla":
        out.append("attn='gqa' (needs 'mla')")
    elif cfg.norm_eps != HF_MLA_LATENT_NORM_EPS:
        out.append(f"norm_eps={cfg.norm_eps} (HF MLA latent norms use 1e-6)")
    if cfg.d_model % cfg.n_heads:
        out.append(f"d_model={cfg.d_model} not a multiple of n_heads={cfg.n_heads}")
    if not _moe_layers(cfg):
        out.append("no MoE layers (dense MLA goes to DeepseekV3)")
        return out
    if cfg.score_func != "softmax":
        out.append(f"score_func={cfg.score_func!r} (needs 'softmax')")
    if cfg.norm_topk_prob and cfg.top_k > 1:
        out.append("norm_topk_prob=True with top_k>1 (HF DeepseekV2 never renormalises)")
    if _bias_nonzero(sd, cfg):
        out.append("non-zero expert_bias (HF DeepseekV2 has no selection bias)")
    return out


def _blockers_llama(cfg, sd) -> list[str]:
    out = []
    if cfg.attn != "gqa":
        out.append("attn='mla' (needs 'gqa')")
    if _moe_layers(cfg):
        out.append("MoE layers (Llama is dense)")
    return out


def _blockers_glm4_moe(cfg, sd) -> list[str]:
    out = []
    if cfg.attn != "gqa":
        out.append("attn='mla' (needs 'gqa')")
    if not _moe_layers(cfg):
        out.append("no MoE layers (dense GQA goes to Llama)")
    return out + _sigmoid_router_blockers(cfg)


def _blockers_ernie(cfg, sd) -> list[str]:
    out = []
    if cfg.attn != "gqa":
        out.append("attn='mla' (needs 'gqa')")
    moe = _moe_layers(cfg)
    if not moe:
        out.append("no MoE layers (dense GQA goes to Llama)")
        return out
    if cfg.score_func != "softmax":
        out.append(f"score_func={cfg.score_func!r} (needs 'softmax')")
    if not (cfg.norm_topk_prob and cfg.top_k > 1):
        out.append("top-k weights not renormalised (Ernie 4.5 always renormalises)")
    if cfg.n_groups > 1:
        out.append(f"n_groups={cfg.n_groups} (Ernie 4.5 has no group-limited routing)")
    if cfg.routed_scaling != 1.0:
        out.append(f"routed_scaling={cfg.routed_scaling} (Ernie 4.5 has no scaling)")
    return out


# ---------------------------------------------------------------------------------------------
# config + weight builders
# ---------------------------------------------------------------------------------------------
def _base_config(cfg, arch: str, model_type: str, tok_ids: dict, dtype: torch.dtype) -> dict:
    return {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "tie_word_embeddings": bool(cfg.tie_embeddings), "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."), **tok_ids,
    }


def _moe_config(cfg) -> dict:
    return {"moe_intermediate_size": cfg.moe_d_ff, "num_experts_per_tok": cfg.top_k,
            "norm_topk_prob": bool(cfg.norm_topk_prob), "routed_scaling_factor": float(cfg.routed_scaling),
            "n_group": cfg.n_groups, "topk_group": cfg.topk_groups}


def _mla_config(cfg) -> dict:
    n_moe = len(_moe_layers(cfg))
    return {"num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "first_k_dense_replace": cfg.n_dense_layers if n_moe else cfg.n_layers,
            "n_routed_experts": max(cfg.n_routed_experts, 1), "n_shared_experts": cfg.n_shared_experts,
            **_moe_config(cfg)}


def _map_common(sd: dict, cfg, out: dict, attn_names: list[str]) -> None:
    """Embedding, norms, attention projections (renamed only), dense FFNs, head."""
    out["model.embed_tokens.weight"] = sd["embed.weight"]
    out["model.norm.weight"] = sd["norm.weight"]
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = sd["lm_head.weight"]
    moe = set(_moe_layers(cfg))
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        out[q + "input_layernorm.weight"] = sd[p + "attn_norm.weight"]
        out[q + "post_attention_layernorm.weight"] = sd[p + "ffn_norm.weight"]
        for n in attn_names:
            if p + f"attn.{n}.weight" in sd:
                out[q + f"self_attn.{n}.weight"] = sd[p + f"attn.{n}.weight"]
        if i not in moe:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"mlp.{n}.weight"] = sd[p + f"ffn.{n}.weight"]


def _map_experts(sd: dict, cfg, out: dict, bias_key: str | None, shared_name: str = "shared_experts",
                 bias_shape: tuple[int, ...] | None = None, always_shared: bool = True) -> None:
    use_bias = cfg.bias_update_speed > 0
    for i in _moe_layers(cfg):
        p, q = f"blocks.{i}.ffn.", f"model.layers.{i}.mlp."
        out[q + "gate.weight"] = sd[p + "router.weight"]
        if bias_key is not None:
            b = sd[p + "router.expert_bias"].float()
            b = b if use_bias else torch.zeros_like(b)
            out[q + bias_key] = b.reshape(bias_shape or b.shape)
        out[q + "experts.gate_up_proj"], out[q + "experts.down_proj"] = split_experts(
            sd[p + "experts.w_gate_up"], sd[p + "experts.w_down"])
        if cfg.n_shared_experts > 0:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"{shared_name}.{n}.weight"] = sd[p + f"shared.{n}.weight"]
        elif always_shared:  # the HF block always builds its shared MLP: give it zero width (output 0)
            D, dt = cfg.d_model, sd[p + "router.weight"].dtype
            out[q + f"{shared_name}.gate_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[q + f"{shared_name}.up_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[q + f"{shared_name}.down_proj.weight"] = torch.zeros(D, 0, dtype=dt)


_MLA_NAMES = ["q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
              "kv_b_proj", "o_proj"]
_GQA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _build_deepseek_v3(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "DeepseekV3ForCausalLM", "deepseek_v3", tok_ids, dtype), **_mla_config(cfg),
          "rope_interleave": False, "num_nextn_predict_layers": 0}
    w: dict = {}
    _map_common(sd, cfg, w, _MLA_NAMES)
    _map_experts(sd, cfg, w, "gate.e_score_correction_bias")
    return hf, w


def _build_deepseek_v2(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "DeepseekV2ForCausalLM", "deepseek_v2", tok_ids, dtype), **_mla_config(cfg),
          "topk_method": "group_limited_greedy" if cfg.n_groups > 1 else "greedy", "mlp_bias": False}
    if cfg.n_groups == 1:
        hf["n_group"] = hf["topk_group"] = None
    w: dict = {}
    _map_common(sd, cfg, w, _MLA_NAMES)
    _map_experts(sd, cfg, w, None)
    qk, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):  # DeepseekV2 rotates interleaved pairs: permute the RoPE rows
        a = f"model.layers.{i}.self_attn."
        qname = a + ("q_b_proj.weight" if cfg.q_lora_rank > 0 else "q_proj.weight")
        w[qname] = permute_rope_rows(w[qname], qk, cfg.qk_nope_head_dim, r)
        kv = a + "kv_a_proj_with_mqa.weight"
        w[kv] = permute_rope_rows(w[kv], cfg.kv_lora_rank + r, cfg.kv_lora_rank, r)
    return hf, w


def _gqa_config(cfg) -> dict:
    return {"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.gqa_head_dim, "intermediate_size": cfg.d_ff}


def _build_llama(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "LlamaForCausalLM", "llama", tok_ids, dtype), **_gqa_config(cfg), "mlp_bias": False}
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    return hf, w


def _build_glm4_moe(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Glm4MoeForCausalLM", "glm4_moe", tok_ids, dtype), **_gqa_config(cfg),
          **_moe_config(cfg), "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": cfg.n_shared_experts,
          "first_k_dense_replace": cfg.n_dense_layers, "use_qk_norm": False, "num_nextn_predict_layers": 0}
    hf["rope_parameters"]["partial_rotary_factor"] = 1.0
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    _map_experts(sd, cfg, w, "gate.e_score_correction_bias")
    return hf, w


def _build_ernie(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe", tok_ids, dtype), **_gqa_config(cfg),
          "use_bias": False, "moe_intermediate_size": cfg.moe_d_ff, "moe_k": cfg.top_k,
          "moe_num_experts": cfg.n_routed_experts, "moe_num_shared_experts": cfg.n_shared_experts,
          "moe_layer_start_index": cfg.n_dense_layers, "moe_layer_end_index": cfg.n_layers - 1,
          "moe_layer_interval": 1, "moe_norm_min": 1e-20}
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    _map_experts(sd, cfg, w, "gate.moe_statics.e_score_correction_bias", bias_shape=(1, cfg.n_routed_experts),
                 always_shared=False)
    hd = cfg.gqa_head_dim
    for i in range(cfg.n_layers):  # Ernie 4.5 rotates interleaved pairs: permute every head's rows
        for n in ("q_proj", "k_proj"):
            k = f"model.layers.{i}.self_attn.{n}.weight"
            w[k] = permute_rope_rows(w[k], hd, 0, hd)
    return hf, w


Builder = Callable[[object, dict, dict, torch.dtype], tuple[dict, dict]]
# (name, blockers, builder), tried in order
ARCHITECTURES: list[tuple[str, Callable[[object, dict], list[str]], Builder]] = [
    ("DeepseekV3", _blockers_deepseek_v3, _build_deepseek_v3),
    ("DeepseekV2", _blockers_deepseek_v2, _build_deepseek_v2),
    ("Llama", _blockers_llama, _build_llama),
    ("Glm4Moe", _blockers_glm4_moe, _build_glm4_moe),
    ("Ernie4_5_Moe", _blockers_ernie, _build_ernie),
]


def choose_architecture(cfg, sd: dict) -> tuple[str, Builder]:
    """The first architecture that expresses ``cfg`` (+ the weights' expert_bias) exactly, else UserError."""
    common = _common_blockers(cfg)
    if common:
        raise UserError("cannot export to a Hugging Face architecture exactly: " + "; ".join(common))
    reasons = []
    for name, blockers, build in ARCHITECTURES:
        why = blockers(cfg, sd)
        if not why:
            return name, build
        if not any("goes to" in w or "needs 'gqa'" in w or "needs 'mla'" in w or "is dense" in w for w in why):
            reasons.append(f"{name}: {', '.join(why)}")
    detail = "; ".join(reasons) or "no candidate"
    hint = ""
    if cfg.attn == "mla" and cfg.score_func == "softmax":
        hint = " (MLA models export exactly with --model.score-func sigmoid: DeepseekV3)"
    raise UserError(f"no Hugging Face architecture expresses this model exactly: {detail}{hint}")


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
# Jinja twin of tinyseek.tokenizer.apply_chat_template (tested equal).
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
                 "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
                 "{% if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'assistant') %}"
                 "<|assistant|>{% endif %}")


def byte_tokenizer_json(special: dict[str, int]) -> str:
    """An HF ``tokenizers`` JSON that encodes like tinyseek's byte tokenizer: ids 0..255 are the UTF-8
    bytes (byte-level BPE with an empty merge list), special tokens at their ids."""
    from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

    alphabet = _bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for t, _ in sorted(special.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    got = {t: tok.token_to_id(t) for t in special}
    if got != special:  # ids are assigned in order after the 256 bytes: must equal ours
        raise UserError(f"byte tokenizer special ids {special} are not contiguous after the 256 bytes")
    return tok.to_str()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table used by the ByteLevel pre-tokenizer.

    >>> t = _bytes_to_unicode(); t[ord("a")], t[ord(" ")], len(set(t.values()))
    ('a', 'Ġ', 256)
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _hf_tokenizer_json(tokenizer) -> str:
    """The HF ``tokenizers`` JSON for a tinyseek Tokenizer (BPE wraps ``tokenizers.Tokenizer`` as ``_hf``)."""
    inner = getattr(tokenizer, "_hf", None)
    if inner is not None:
        return inner.to_str()
    if getattr(tokenizer, "kind", None) == "bytes":
        return byte_tokenizer_json(dict(tokenizer._special))
    raise UserError(f"tokenizer {type(tokenizer).__name__} has no Hugging Face tokenizers form to export")


def _write_tokenizer(tokenizer, out: Path, max_len: int) -> None:
    (out / "tokenizer.json").write_text(_hf_tokenizer_json(tokenizer))
    tok_cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": tokenizer.id_to_token(tokenizer.eos_id), "pad_token": tokenizer.id_to_token(tokenizer.pad_id),
        "clean_up_tokenization_spaces": False, "chat_template": CHAT_TEMPLATE, "model_max_length": max_len,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------------
def export_hf(model, out_dir: str | Path, tokenizer=None) -> dict:
    """Write ``out_dir`` (atomically) as a transformers checkpoint; returns a summary dict
    (architecture, files, parameter count). Raises UserError when no exact mapping exists."""
    from safetensors.torch import save_file

    cfg = model.cfg
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    name, build = choose_architecture(cfg, sd)
    dtype = sd["embed.weight"].dtype
    tok_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        if getattr(tokenizer, "vocab_size", cfg.vocab_size) > cfg.vocab_size:
            raise UserError(f"tokenizer vocab ({tokenizer.vocab_size}) exceeds the model's "
                            f"vocab_size ({cfg.vocab_size})")
        tok_ids.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id)
    try:
        hf_cfg, weights = build(cfg, sd, tok_ids, dtype)
    except KeyError as e:
        raise UserError(f"model weights lack {e.args[0]!r} (a quantized model cannot be exported; "
                        "export the float one)") from None
    not_float = sorted(k for k, v in weights.items() if not v.is_floating_point())
    if not_float:
        raise UserError(f"weight {not_float[0]} is not floating point (export the float model, not a quantized one)")
    tensors = {k: v.contiguous().clone() for k, v in weights.items()}
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_cfg)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, cfg.max_seq_len)
        files = sorted(p.name for p in tmp.iterdir())
    return {"architecture": hf_cfg["architectures"][0], "out": str(out_dir), "files": files,
            "params": sum(t.numel() for t in tensors.values())}
