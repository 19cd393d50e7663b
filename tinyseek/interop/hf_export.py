"""Export a tinyseek :class:`~tinyseek.model.Transformer` as a Hugging Face checkpoint of an *existing*
transformers architecture (config.json + model.safetensors [+ tokenizer.json, tokenizer_config.json]),
so ``AutoModelForCausalLM.from_pretrained(dir)`` loads it with no custom code and gives our logits.

Only exact mappings are written. A model imported from Hugging Face (``cfg.hf_arch``, see
:mod:`tinyseek.interop.hf_import`) goes back to its own architecture where that expresses it; otherwise
the first architecture below that can express the model wins (the first five are what tinyseek's own
models always got); when none can, :func:`export_hf` raises a one-line :class:`UserError` naming the
settings that block each.

======================  ==============================================================  =================
attention / FFN         router and other settings                                        HF architecture
======================  ==============================================================  =================
MLA, dense or MoE       sigmoid scores (any expert_bias, groups, norm, scaling), any     DeepseekV3
                        RoPE scaling (YaRN mscale as ours), interleaved RoPE if imported
MLA, MoE                softmax, expert_bias all zero, top-k not renormalised (or k=1)   DeepseekV2
GQA, dense              q/k/v/o biases (zeros where absent), any RoPE scaling            Llama
GQA, MoE                sigmoid scores (any expert_bias, groups, norm, scaling)          Glm4Moe
GQA, MoE                softmax, renormalised top-k (k>1), no groups, scaling 1          Ernie4_5_Moe
GQA, dense              sliding window, no biases                                        Mistral
GQA, dense              q/k/v biases (zeros where absent), sliding window                Qwen2
GQA, dense              q/k norm, biases, sliding window                                 Qwen3
GQA, MoE                softmax (norm_topk_prob), no groups/scaling/bias, shared expert  Qwen2Moe
                        of any width with its sigmoid gate, q/k/v biases, dense prefix
GQA, MoE                as Qwen2Moe with q/k norm and no shared expert                   Qwen3Moe
GQA, MoE                softmax, renormalised top-k (k>1), all layers MoE, no shared     Mixtral
======================  ==============================================================  =================

Not expressible anywhere (UserError): MLA + softmax scores with a non-zero ``expert_bias`` or with
renormalised top-k > 1 (no HF MLA model loadable by AutoModelForCausalLM routes that way: train with
``--model.score-func sigmoid``); GQA + softmax with groups or ``routed_scaling`` != 1; a sliding
window on MLA; ``capacity_factor`` > 0 (HF never drops tokens); MLA latent norms with an eps other
than 1e-6 (HF's q/kv latent norms hard-code it); sigmoid routing with one expert per group (HF scores
a group by its top-2 experts). Presets: ``gpu-small`` exports to DeepseekV3; ``micro`` / ``cpu-tiny``
(softmax, renormalised top-2) do not.

Weight layout notes. Our stacked experts ``w_gate_up (E, D, 2F)`` (gate first) and ``w_down (E, F, D)``
are written one module per expert, as transformers' ``save_pretrained`` writes them
(``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral ``block_sparse_moe.experts.{e}.w1``
/ ``w3`` / ``w2``), which other tools read too; transformers 5.x fuses them on load into
``experts.gate_up_proj (E, 2F, D)`` and ``experts.down_proj (E, D, F)``. A shared expert without a
gate goes to Qwen2-MoE (which always gates) as a zero gate weight (sigmoid = 1/2) and a doubled down
projection: exact in floating point. Our RoPE is the rotate-half layout: Llama/Glm4Moe/Qwen/Mistral
use it natively, DeepseekV3 takes it as is (``rope_interleave=False``) unless the model was imported
from an interleaved checkpoint; DeepseekV2 and Ernie 4.5 rotate interleaved pairs, so the rows of the
RoPE part of the query/key projections are permuted (:func:`rope_perm`), which leaves q.k unchanged.
The aux-loss-free ``expert_bias`` maps to ``e_score_correction_bias`` (only if the model uses it:
``bias_update_speed > 0``; otherwise zeros are written, as our router then ignores the bias); with
load-aware routing on, its penalty from the saved ``expert_load`` is folded in (a constant offset once
training stops: the same choices).
Without shared experts, DeepseekV3/V2/Glm4Moe (which always build one) get a zero-width shared MLP.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, pre_tokenizers

from tinyseek.common import atomic_dir, atomic_write_json
from tinyseek.errors import UserError
from tinyseek.interop.gguf_io import bytes_to_unicode
from tinyseek.model.moe import load_penalty

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


def _selection_bias(sd: dict, cfg, i: int) -> torch.Tensor:
    """MoE layer ``i``'s offset to the scores for the choice only (``Router.selection_offset``): the
    aux-free bias where used, minus the load-aware penalty where on; zeros where neither."""
    p = f"blocks.{i}.ffn.router."
    b = sd[p + "expert_bias"].float()
    b = b if cfg.bias_update_speed > 0 else torch.zeros_like(b)
    if cfg.router_load_aware > 0:
        b = b - load_penalty(sd[p + "expert_load"].float(), cfg.router_load_aware)
    return b


def _bias_nonzero(sd: dict, cfg) -> bool:
    return any(bool(_selection_bias(sd, cfg, i).abs().max() > 0) for i in _moe_layers(cfg))


def _common_blockers(cfg) -> list[str]:
    out = []
    if _moe_layers(cfg) and cfg.capacity_factor > 0:
        out.append(f"capacity_factor={cfg.capacity_factor} (HF MoE never drops tokens)")
    return out


def _slides(cfg) -> bool:
    return 0 < cfg.sliding_window < cfg.max_seq_len


_ALL_ROPE = ("default", "linear", "llama3", "yarn")


def _feature_blockers(cfg, name: str, *, biases: str = "none", qk_norm: str = "never", sliding: bool = False,
                      rope: tuple[str, ...] = ("default",), shared: str = "plain") -> list[str]:
    """Settings of the GQA/MLA options and shared expert that ``name`` cannot express.

    ``biases``: "none" (no attention biases), "qkv" (q/k/v biased, zeros written where we have none; no
    output bias), "all" (one flag for q/k/v/o; zeros for the ones we lack). ``qk_norm``: "never" /
    "always". ``shared``: "plain" (S experts of moe_d_ff, no gate), "gated" (any width; the sigmoid gate
    is written as zeros with the down projection doubled where we have none), "none"."""
    out = []
    if biases == "none" and (cfg.qkv_bias or cfg.o_bias):
        out.append(f"qkv_bias/o_bias ({name} has no attention biases)")
    if biases == "qkv" and cfg.o_bias:
        out.append(f"o_bias ({name} has no output-projection bias)")
    if qk_norm == "never" and cfg.qk_norm:
        out.append(f"qk_norm ({name} has no q/k norm)")
    if qk_norm == "always" and not cfg.qk_norm:
        out.append(f"qk_norm=False ({name} always normalises q and k)")
    if not sliding and _slides(cfg):
        out.append(f"sliding_window={cfg.sliding_window} ({name} attends to the full context)")
    if cfg.rope_type not in rope:
        out.append(f"rope_type={cfg.rope_type!r} ({name} here: {'/'.join(rope)})")
    if _moe_layers(cfg) and cfg.n_shared_experts > 0:
        if shared == "none":
            out.append(f"n_shared_experts={cfg.n_shared_experts} ({name} has no shared expert)")
        elif shared == "plain" and cfg.shared_expert_gate:
            out.append(f"shared_expert_gate ({name} has no gate on the shared expert)")
        elif shared == "plain" and cfg.shared_width % cfg.moe_d_ff:
            out.append(f"shared_d_ff={cfg.shared_d_ff} not a multiple of moe_d_ff={cfg.moe_d_ff}")
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


def _softmax_router_blockers(cfg, sd, name: str, *, renorm: str = "flag", selection_bias: bool = False) -> list[str]:
    """A softmax top-k router: ``renorm`` "flag" (norm_topk_prob) or "always"; ``selection_bias``: the
    architecture adds a bias to the scores for the choice only (Ernie 4.5), as our ``expert_bias``."""
    out = []
    if cfg.score_func != "softmax":
        out.append(f"score_func={cfg.score_func!r} (needs 'softmax')")
    if renorm == "always" and not (cfg.norm_topk_prob and cfg.top_k > 1):
        out.append(f"top-k weights not renormalised ({name} always renormalises)")
    if cfg.n_groups > 1:
        out.append(f"n_groups={cfg.n_groups} ({name} has no group-limited routing)")
    if cfg.routed_scaling != 1.0:
        out.append(f"routed_scaling={cfg.routed_scaling} ({name} has no scaling)")
    if not selection_bias and _bias_nonzero(sd, cfg):
        out.append(f"non-zero expert_bias ({name} has no selection bias)")
    return out


def _mla_blockers(cfg) -> list[str]:
    if cfg.attn != "mla":
        return ["attn='gqa' (needs 'mla')"]
    if cfg.mla_latent_eps != HF_MLA_LATENT_NORM_EPS:
        return [f"MLA latent norm eps {cfg.mla_latent_eps} (norm_eps / latent_norm_eps; HF MLA latent norms use 1e-6)"]
    return []


def _blockers_deepseek_v3(cfg, sd) -> list[str]:
    out = _mla_blockers(cfg)
    return out + _feature_blockers(cfg, "DeepseekV3", rope=_ALL_ROPE) + _sigmoid_router_blockers(cfg)


def _blockers_deepseek_v2(cfg, sd) -> list[str]:
    out = _mla_blockers(cfg) + _feature_blockers(cfg, "DeepseekV2")
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


def _gqa_dense_blockers(cfg, name: str, **features) -> list[str]:
    if cfg.attn != "gqa":
        return ["attn='mla' (needs 'gqa')"]
    out = _feature_blockers(cfg, name, **features)
    if _moe_layers(cfg):
        out.append(f"MoE layers ({name} is dense)")
    return out


def _gqa_moe_blockers(cfg, name: str, **features) -> list[str]:
    if cfg.attn != "gqa":
        return ["attn='mla' (needs 'gqa')"]
    if not _moe_layers(cfg):
        return ["no MoE layers (dense GQA goes to Llama)"]
    return _feature_blockers(cfg, name, **features)


def _blockers_llama(cfg, sd) -> list[str]:
    return _gqa_dense_blockers(cfg, "Llama", biases="all", rope=_ALL_ROPE)


def _blockers_mistral(cfg, sd) -> list[str]:
    return _gqa_dense_blockers(cfg, "Mistral", sliding=True, rope=_ALL_ROPE)


def _blockers_qwen2(cfg, sd) -> list[str]:
    return _gqa_dense_blockers(cfg, "Qwen2", biases="qkv", sliding=True, rope=_ALL_ROPE)


def _blockers_qwen3(cfg, sd) -> list[str]:
    return _gqa_dense_blockers(cfg, "Qwen3", biases="all", qk_norm="always", sliding=True, rope=_ALL_ROPE)


def _blockers_glm4_moe(cfg, sd) -> list[str]:
    return _gqa_moe_blockers(cfg, "Glm4Moe") + _sigmoid_router_blockers(cfg)


def _blockers_ernie(cfg, sd) -> list[str]:
    out = _gqa_moe_blockers(cfg, "Ernie 4.5")
    if not _moe_layers(cfg) or cfg.attn != "gqa":
        return out
    return out + _softmax_router_blockers(cfg, sd, "Ernie 4.5", renorm="always", selection_bias=True)


def _blockers_qwen2_moe(cfg, sd) -> list[str]:
    out = _gqa_moe_blockers(cfg, "Qwen2Moe", biases="qkv", sliding=True, rope=_ALL_ROPE, shared="gated")
    if not _moe_layers(cfg) or cfg.attn != "gqa":
        return out
    return out + _softmax_router_blockers(cfg, sd, "Qwen2Moe")


def _blockers_qwen3_moe(cfg, sd) -> list[str]:
    out = _gqa_moe_blockers(cfg, "Qwen3Moe", biases="all", qk_norm="always", sliding=True, rope=_ALL_ROPE,
                            shared="none")
    if not _moe_layers(cfg) or cfg.attn != "gqa":
        return out
    return out + _softmax_router_blockers(cfg, sd, "Qwen3Moe")


def _blockers_mixtral(cfg, sd) -> list[str]:
    out = _gqa_moe_blockers(cfg, "Mixtral", sliding=True, rope=_ALL_ROPE, shared="none")
    if not _moe_layers(cfg) or cfg.attn != "gqa":
        return out
    if cfg.n_dense_layers > 0:
        out.append(f"n_dense_layers={cfg.n_dense_layers} (every Mixtral layer is MoE)")
    return out + _softmax_router_blockers(cfg, sd, "Mixtral", renorm="always")


# ---------------------------------------------------------------------------------------------
# config + weight builders
# ---------------------------------------------------------------------------------------------
def rope_parameters(cfg) -> dict:
    """HF ``rope_parameters`` for our RoPE settings.

    >>> from tinyseek.config import ModelConfig
    >>> rope_parameters(ModelConfig(rope_type="linear", rope_factor=2.0))
    {'rope_type': 'linear', 'rope_theta': 10000.0, 'factor': 2.0}
    """
    rp: dict = {"rope_type": cfg.rope_type, "rope_theta": cfg.rope_theta}
    if cfg.rope_type == "linear":
        rp["factor"] = cfg.rope_factor
    elif cfg.rope_type == "llama3":
        rp.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                  high_freq_factor=cfg.rope_high_freq_factor, original_max_position_embeddings=cfg.rope_original_max_len)
    elif cfg.rope_type == "yarn":
        rp.update(factor=cfg.rope_factor, original_max_position_embeddings=cfg.rope_original_max_len,
                  beta_fast=cfg.yarn_beta_fast, beta_slow=cfg.yarn_beta_slow)
        for key, v in (("mscale", cfg.yarn_mscale), ("mscale_all_dim", cfg.yarn_mscale_all_dim),
                       ("attention_factor", cfg.yarn_attn_factor)):
            if v:
                rp[key] = v
        if not cfg.yarn_truncate:
            rp["truncate"] = False
    if cfg.rope_type != "yarn" and cfg.attn == "mla" and cfg.rope_type != "default" and cfg.yarn_mscale_all_dim:
        rp["mscale_all_dim"] = cfg.yarn_mscale_all_dim  # MLA's softmax mscale applies to any scaled RoPE
    return rp


def _base_config(cfg, arch: str, model_type: str, tok_ids: dict, dtype: torch.dtype) -> dict:
    return {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "rope_parameters": rope_parameters(cfg),
        "tie_word_embeddings": bool(cfg.tie_embeddings), "hidden_act": "silu", "attention_bias": False,
        "attention_dropout": 0.0, "initializer_range": cfg.init_std, "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."), **tok_ids,
    }


def _moe_config(cfg) -> dict:
    return {"moe_intermediate_size": cfg.moe_d_ff, "num_experts_per_tok": cfg.top_k,
            "norm_topk_prob": bool(cfg.norm_topk_prob), "routed_scaling_factor": float(cfg.routed_scaling),
            "n_group": cfg.n_groups, "topk_group": cfg.topk_groups}


def _n_shared(cfg) -> int:
    """Shared experts of width moe_d_ff that make up our fused shared expert (DeepSeek / Glm / Ernie)."""
    return cfg.shared_width // cfg.moe_d_ff if cfg.n_shared_experts > 0 else 0


def _mla_config(cfg) -> dict:
    n_moe = len(_moe_layers(cfg))
    return {"num_key_value_heads": cfg.n_heads, "intermediate_size": cfg.d_ff,
            "q_lora_rank": cfg.q_lora_rank or None, "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim, "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
            "first_k_dense_replace": cfg.n_dense_layers if n_moe else cfg.n_layers,
            "n_routed_experts": max(cfg.n_routed_experts, 1), "n_shared_experts": _n_shared(cfg),
            **_moe_config(cfg)}


def _map_common(sd: dict, cfg, out: dict, attn_names: list[str], biases: str = "none") -> None:
    """Embedding, norms, attention projections (renamed; GQA biases per ``biases`` as in
    :func:`_feature_blockers`, zeros where we have none; q/k norms), dense FFNs, head."""
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
            want_bias = (biases == "all" and n in _GQA_NAMES) or (biases == "qkv" and n in _GQA_NAMES[:3])
            if want_bias:
                w = sd[p + f"attn.{n}.weight"]
                out[q + f"self_attn.{n}.bias"] = sd.get(p + f"attn.{n}.bias", torch.zeros(w.shape[0], dtype=w.dtype))
        if i not in moe:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"mlp.{n}.weight"] = sd[p + f"ffn.{n}.weight"]


def unfuse_experts(w_gate_up_EDF2: torch.Tensor, w_down_EFD: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
    """Our stacked expert weights -> per expert ``(gate (F, D), up (F, D), down (D, F))``: the
    ``mlp.experts.{e}.*_proj.weight`` tensors transformers writes with ``save_pretrained`` (and reads
    back into its fused ``gate_up_proj`` / ``down_proj``).

    >>> [tuple(t.shape) for t in unfuse_experts(torch.zeros(3, 4, 10), torch.zeros(3, 5, 4))[0]]
    [(5, 4), (5, 4), (4, 5)]
    """
    F = w_down_EFD.shape[1]
    return [(w_gate_up_EDF2[e, :, :F].t(), w_gate_up_EDF2[e, :, F:].t(), w_down_EFD[e].t())
            for e in range(w_gate_up_EDF2.shape[0])]


def _map_experts(sd: dict, cfg, out: dict, bias_key: str | None, shared_name: str = "shared_experts",
                 bias_shape: tuple[int, ...] | None = None, always_shared: bool = True,
                 mlp: str = "mlp", names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
                 shared_gate: str | None = None) -> None:
    """Router, routed experts (one module each, ``{mlp}.experts.{e}.{names}.weight``), selection bias,
    shared expert (``shared_gate``: the HF name of a sigmoid gate the architecture always has)."""
    for i in _moe_layers(cfg):
        p, q = f"blocks.{i}.ffn.", f"model.layers.{i}.{mlp}."
        out[q + "gate.weight"] = sd[p + "router.weight"]
        if bias_key is not None:
            b = _selection_bias(sd, cfg, i)
            out[q + bias_key] = b.reshape(bias_shape or b.shape)
        for e, ws in enumerate(unfuse_experts(sd[p + "experts.w_gate_up"], sd[p + "experts.w_down"])):
            for n, w in zip(names, ws):
                out[q + f"experts.{e}.{n}.weight"] = w
        D, dt = cfg.d_model, sd[p + "router.weight"].dtype
        if cfg.n_shared_experts > 0:
            for n in ("gate_proj", "up_proj", "down_proj"):
                out[q + f"{shared_name}.{n}.weight"] = sd[p + f"shared.{n}.weight"]
            if shared_gate is not None:
                if p + "shared_gate.weight" in sd:
                    out[q + shared_gate] = sd[p + "shared_gate.weight"]
                else:  # sigmoid(0) = 1/2 exactly: a zero gate and a doubled down projection (exact in floats)
                    out[q + shared_gate] = torch.zeros(1, D, dtype=dt)
                    out[q + f"{shared_name}.down_proj.weight"] = sd[p + "shared.down_proj.weight"] * 2
        elif always_shared:  # the HF block always builds its shared MLP: give it zero width (output 0)
            out[q + f"{shared_name}.gate_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[q + f"{shared_name}.up_proj.weight"] = torch.zeros(0, D, dtype=dt)
            out[q + f"{shared_name}.down_proj.weight"] = torch.zeros(D, 0, dtype=dt)
            if shared_gate is not None:
                out[q + shared_gate] = torch.zeros(1, D, dtype=dt)


_MLA_NAMES = ["q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm",
              "kv_b_proj", "o_proj"]
_GQA_NAMES = ["q_proj", "k_proj", "v_proj", "o_proj"]
_QK_NORM_NAMES = ["q_norm", "k_norm"]


def _permute_mla_rope(cfg, w: dict) -> None:
    """Rotate-half RoPE rows of the MLA query and kv_a projections -> interleaved pairs (in place)."""
    qk, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
    for i in range(cfg.n_layers):
        a = f"model.layers.{i}.self_attn."
        qname = a + ("q_b_proj.weight" if cfg.q_lora_rank > 0 else "q_proj.weight")
        w[qname] = permute_rope_rows(w[qname], qk, cfg.qk_nope_head_dim, r)
        kv = a + "kv_a_proj_with_mqa.weight"
        w[kv] = permute_rope_rows(w[kv], cfg.kv_lora_rank + r, cfg.kv_lora_rank, r)


def _build_deepseek_v3(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "DeepseekV3ForCausalLM", "deepseek_v3", tok_ids, dtype), **_mla_config(cfg),
          "rope_interleave": bool(cfg.hf_rope_interleave), "num_nextn_predict_layers": 0}
    w: dict = {}
    _map_common(sd, cfg, w, _MLA_NAMES)
    _map_experts(sd, cfg, w, "gate.e_score_correction_bias")
    if cfg.hf_rope_interleave:  # written back in the interleaved layout it was imported from
        _permute_mla_rope(cfg, w)
    return hf, w


def _build_deepseek_v2(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "DeepseekV2ForCausalLM", "deepseek_v2", tok_ids, dtype), **_mla_config(cfg),
          "topk_method": "group_limited_greedy" if cfg.n_groups > 1 else "greedy", "mlp_bias": False}
    if cfg.n_groups == 1:
        hf["n_group"] = hf["topk_group"] = None
    w: dict = {}
    _map_common(sd, cfg, w, _MLA_NAMES)
    _map_experts(sd, cfg, w, None)
    _permute_mla_rope(cfg, w)  # DeepseekV2 rotates interleaved pairs
    return hf, w


def _gqa_config(cfg) -> dict:
    return {"num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.gqa_head_dim, "intermediate_size": cfg.d_ff}


def _qwen_sliding(cfg, none=None) -> dict:
    """Qwen2/Qwen3(-MoE) sliding-window keys: one window on every layer, or none."""
    slides = cfg.sliding_window > 0
    return {"use_sliding_window": slides, "sliding_window": cfg.sliding_window if slides else none,
            "max_window_layers": 0 if slides else cfg.n_layers,
            "layer_types": ["sliding_attention" if slides else "full_attention"] * cfg.n_layers}


def _build_llama(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "LlamaForCausalLM", "llama", tok_ids, dtype), **_gqa_config(cfg), "mlp_bias": False,
          "attention_bias": bool(cfg.qkv_bias or cfg.o_bias)}
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES, biases="all" if hf["attention_bias"] else "none")
    return hf, w


def _build_mistral(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "MistralForCausalLM", "mistral", tok_ids, dtype), **_gqa_config(cfg),
          "sliding_window": cfg.sliding_window or None}
    del hf["attention_bias"]
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    return hf, w


def _build_qwen2(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Qwen2ForCausalLM", "qwen2", tok_ids, dtype), **_gqa_config(cfg), **_qwen_sliding(cfg)}
    del hf["attention_bias"], hf["head_dim"]  # Qwen2 always has q/k/v biases; head_dim is hidden / heads
    if cfg.gqa_head_dim != cfg.d_model // cfg.n_heads:
        hf["head_dim"] = cfg.gqa_head_dim  # read by Qwen2Attention (getattr) when present
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES, biases="qkv")
    return hf, w


def _build_qwen3(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Qwen3ForCausalLM", "qwen3", tok_ids, dtype), **_gqa_config(cfg), **_qwen_sliding(cfg),
          "attention_bias": bool(cfg.qkv_bias or cfg.o_bias)}
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES + _QK_NORM_NAMES, biases="all" if hf["attention_bias"] else "none")
    return hf, w


def _softmax_moe_config(cfg) -> dict:
    return {"moe_intermediate_size": cfg.moe_d_ff, "num_experts_per_tok": cfg.top_k,
            "norm_topk_prob": bool(cfg.norm_topk_prob and cfg.top_k > 1),  # we keep the probability at k=1
            "router_aux_loss_coef": cfg.aux_loss_alpha, "output_router_logits": False,
            "decoder_sparse_step": 1, "mlp_only_layers": list(range(cfg.n_dense_layers))}


def _build_qwen2_moe(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Qwen2MoeForCausalLM", "qwen2_moe", tok_ids, dtype), **_gqa_config(cfg),
          **_qwen_sliding(cfg, none=0), **_softmax_moe_config(cfg), "num_experts": cfg.n_routed_experts,
          "shared_expert_intermediate_size": cfg.shared_width, "qkv_bias": bool(cfg.qkv_bias)}
    del hf["attention_bias"], hf["head_dim"]
    if cfg.gqa_head_dim != cfg.d_model // cfg.n_heads:
        hf["head_dim"] = cfg.gqa_head_dim
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES, biases="qkv" if cfg.qkv_bias else "none")
    _map_experts(sd, cfg, w, None, shared_name="shared_expert", shared_gate="shared_expert_gate.weight")
    return hf, w


def _build_qwen3_moe(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Qwen3MoeForCausalLM", "qwen3_moe", tok_ids, dtype), **_gqa_config(cfg),
          **_qwen_sliding(cfg), **_softmax_moe_config(cfg), "num_experts": cfg.n_routed_experts,
          "attention_bias": bool(cfg.qkv_bias or cfg.o_bias)}
    del hf["max_window_layers"], hf["layer_types"]  # Qwen3-MoE: one window for all layers
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES + _QK_NORM_NAMES, biases="all" if hf["attention_bias"] else "none")
    _map_experts(sd, cfg, w, None, always_shared=False)
    return hf, w


def _build_mixtral(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "MixtralForCausalLM", "mixtral", tok_ids, dtype), **_gqa_config(cfg),
          "intermediate_size": cfg.moe_d_ff, "num_local_experts": cfg.n_routed_experts,
          "num_experts_per_tok": cfg.top_k, "router_aux_loss_coef": cfg.aux_loss_alpha, "router_jitter_noise": 0.0,
          "output_router_logits": False, "sliding_window": cfg.sliding_window or None}
    del hf["attention_bias"]
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    _map_experts(sd, cfg, w, None, always_shared=False, mlp="block_sparse_moe", names=("w1", "w3", "w2"))
    return hf, w


def _build_glm4_moe(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Glm4MoeForCausalLM", "glm4_moe", tok_ids, dtype), **_gqa_config(cfg),
          **_moe_config(cfg), "n_routed_experts": cfg.n_routed_experts, "n_shared_experts": _n_shared(cfg),
          "first_k_dense_replace": cfg.n_dense_layers, "use_qk_norm": False, "num_nextn_predict_layers": 0}
    hf["rope_parameters"]["partial_rotary_factor"] = 1.0
    w: dict = {}
    _map_common(sd, cfg, w, _GQA_NAMES)
    _map_experts(sd, cfg, w, "gate.e_score_correction_bias")
    return hf, w


def _build_ernie(cfg, sd, tok_ids, dtype):
    hf = {**_base_config(cfg, "Ernie4_5_MoeForCausalLM", "ernie4_5_moe", tok_ids, dtype), **_gqa_config(cfg),
          "use_bias": False, "moe_intermediate_size": cfg.moe_d_ff, "moe_k": cfg.top_k,
          "moe_num_experts": cfg.n_routed_experts, "moe_num_shared_experts": _n_shared(cfg),
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
# (name, blockers, builder), tried in order (after the model's own hf_arch, when it expresses it); the
# first five keep the selection tinyseek's own models always had, the rest take the imported features
ARCHITECTURES: list[tuple[str, Callable[[object, dict], list[str]], Builder]] = [
    ("DeepseekV3", _blockers_deepseek_v3, _build_deepseek_v3),
    ("DeepseekV2", _blockers_deepseek_v2, _build_deepseek_v2),
    ("Llama", _blockers_llama, _build_llama),
    ("Glm4Moe", _blockers_glm4_moe, _build_glm4_moe),
    ("Ernie4_5_Moe", _blockers_ernie, _build_ernie),
    ("Mistral", _blockers_mistral, _build_mistral),
    ("Qwen2", _blockers_qwen2, _build_qwen2),
    ("Qwen3", _blockers_qwen3, _build_qwen3),
    ("Qwen2Moe", _blockers_qwen2_moe, _build_qwen2_moe),
    ("Qwen3Moe", _blockers_qwen3_moe, _build_qwen3_moe),
    ("Mixtral", _blockers_mixtral, _build_mixtral),
]


def choose_architecture(cfg, sd: dict) -> tuple[str, Builder]:
    """``cfg.hf_arch`` (the architecture a model was imported from) where it expresses ``cfg`` (+ the
    weights' expert_bias) exactly, else the first architecture of :data:`ARCHITECTURES` that does,
    else UserError."""
    common = _common_blockers(cfg)
    if common:
        raise UserError("cannot export to a Hugging Face architecture exactly: " + "; ".join(common))
    own = cfg.hf_arch.removesuffix("ForCausalLM")
    for name, blockers, build in ARCHITECTURES:
        if name == own and not blockers(cfg, sd):
            return name, build
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
    alphabet = bytes_to_unicode()
    tok = HFTokenizer(models.BPE(vocab={alphabet[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    for t, _ in sorted(special.items(), key=lambda kv: kv[1]):
        tok.add_special_tokens([AddedToken(t, special=True, normalized=False)])
    got = {t: tok.token_to_id(t) for t in special}
    if got != special:  # ids are assigned in order after the 256 bytes: must equal ours
        raise UserError(f"byte tokenizer special ids {special} are not contiguous after the 256 bytes")
    return tok.to_str()


# R1 tags: added tokens (so the same text encodes to the same ids) but not special, so that a standard
# ``decode(ids, skip_special_tokens=True)`` keeps them ("<think>3 + 4 = 7</think>...", not "3 + 4 = 7...")
TEXT_TAGS = ("<think>", "</think>", "<answer>", "</answer>")


def tags_not_special(tokenizer_json: str) -> str:
    """``tokenizer_json`` with the :data:`TEXT_TAGS` added tokens marked ``special: false`` (ids,
    matching and so encoding unchanged)."""
    obj = json.loads(tokenizer_json)
    for t in obj.get("added_tokens") or []:
        if t.get("content") in TEXT_TAGS:
            t["special"] = False
    return json.dumps(obj, ensure_ascii=False)


def _hf_tokenizer_json(tokenizer) -> str:
    """The HF ``tokenizers`` JSON for a tinyseek Tokenizer (BPE wraps ``tokenizers.Tokenizer`` as ``_hf``),
    the R1 tags as non-special added tokens (:func:`tags_not_special`)."""
    inner = getattr(tokenizer, "_hf", None)
    if inner is not None:
        return tags_not_special(inner.to_str())
    if getattr(tokenizer, "kind", None) == "bytes":
        return tags_not_special(byte_tokenizer_json(dict(tokenizer._special)))
    raise UserError(f"tokenizer {type(tokenizer).__name__} has no Hugging Face tokenizers form to export")


def _write_tokenizer(tokenizer, out: Path, max_len: int) -> None:
    """An imported model's tokenizer files as they came (its own chat template, special tokens and
    generation_config eos ids); ours as a PreTrainedTokenizerFast with the Jinja twin of our template."""
    hf_files = getattr(tokenizer, "hf_files", None)
    if hf_files is not None:
        for name, text in hf_files().items():
            (out / name).write_text(text, encoding="utf-8")
        return
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
def hf_state(model, tokenizer=None) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json dict, tensors by HF name)`` of ``model`` as the architecture :func:`export_hf`
    picks, in memory (contiguous copies; what ``export_hf`` writes). UserError when no exact mapping
    exists, for a quantized model, or a tokenizer larger than the model's vocabulary."""
    cfg = model.cfg
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    name, build = choose_architecture(cfg, sd)
    dtype = sd["embed.weight"].dtype
    tok_ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        if getattr(tokenizer, "vocab_size", cfg.vocab_size) > cfg.vocab_size:
            raise UserError(f"tokenizer vocab ({tokenizer.vocab_size}) exceeds the model's "
                            f"vocab_size ({cfg.vocab_size})")
        tok_ids.update(eos_token_id=tokenizer.eos_id, pad_token_id=tokenizer.pad_id,
                       bos_token_id=getattr(tokenizer, "bos_id", None))
    try:
        hf_cfg, weights = build(cfg, sd, tok_ids, dtype)
    except KeyError as e:
        raise UserError(f"model weights lack {e.args[0]!r} (a quantized model cannot be exported; "
                        "export the float one)") from None
    not_float = sorted(k for k, v in weights.items() if not v.is_floating_point())
    if not_float:
        raise UserError(f"weight {not_float[0]} is not floating point (export the float model, not a quantized one)")
    return hf_cfg, {k: v.contiguous().clone() for k, v in weights.items()}


def export_hf(model, out_dir: str | Path, tokenizer=None) -> dict:
    """Write ``out_dir`` (atomically) as a transformers checkpoint (:func:`hf_state` + the tokenizer);
    returns a summary dict (architecture, files, parameter count). Raises UserError when no exact
    mapping exists."""
    hf_cfg, tensors = hf_state(model, tokenizer)
    out_dir = Path(out_dir)
    with atomic_dir(out_dir) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        atomic_write_json(tmp / "config.json", hf_cfg)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, tmp, model.cfg.max_seq_len)
        files = sorted(p.name for p in tmp.iterdir())
    return {"architecture": hf_cfg["architectures"][0], "out": str(out_dir), "files": files,
            "params": sum(t.numel() for t in tensors.values())}
