"""Import a Hugging Face checkpoint (``config.json`` + safetensors) into tinyseek's
:class:`~tinyseek.model.Transformer`, exactly: the imported model's logits equal transformers' own.

Reads the files with ``json`` and ``safetensors`` only (transformers is not needed). Eight
architectures, every setting of theirs that tinyseek can express; anything else is a one-line
:class:`UserError` naming the architecture and the setting:

=======================  ==========================================================================
HF architecture          what maps where
=======================  ==========================================================================
LlamaForCausalLM         GQA; ``attention_bias`` -> ``qkv_bias`` + ``o_bias``; RoPE scaling
                         (``rope_parameters`` / legacy ``rope_scaling``: default, linear, llama3, yarn)
MistralForCausalLM       GQA + ``sliding_window``
Qwen2ForCausalLM         GQA, q/k/v bias; a sliding window on all layers (``layer_types``) or none
Qwen3ForCausalLM         GQA, per-head q/k RMSNorm (``qk_norm``), ``attention_bias``
Qwen2MoeForCausalLM      softmax router (``norm_topk_prob``), shared expert of its own width
                         (``shared_d_ff``) with a sigmoid gate (``shared_expert_gate``); dense layers
                         (``mlp_only_layers`` / ``decoder_sparse_step``) only as a prefix
Qwen3MoeForCausalLM      q/k norm, softmax router, no shared expert; the same layer layouts
MixtralForCausalLM       softmax router, top-k renormalised (softmax over the top-k logits)
DeepseekV3ForCausalLM    MLA (``q_lora_rank`` set or not, latent norms eps 1e-6), sigmoid router with
                         ``e_score_correction_bias`` (-> ``expert_bias``, used: ``bias_update_speed`` >
                         0), group-limited routing, ``routed_scaling_factor``, ``first_k_dense_replace``,
                         YaRN (cos/sin factor and the softmax ``mscale_all_dim``); ``rope_interleave``
                         checkpoints get their RoPE rows permuted to our rotate-half layout
=======================  ==========================================================================

Weights may come as transformers saves them (routed experts one module each:
``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``, Mixtral's ``block_sparse_moe.experts.{e}.w1``
/ ``w3`` / ``w2``) or as transformers 5.x holds them in memory (fused ``mlp.experts.gate_up_proj
(E, 2F, D)`` and ``down_proj (E, D, F)``). DeepSeek-V3's multi-token-prediction layers (``model.layers.{n}``
for n >= ``num_hidden_layers``) are skipped, as transformers does.

Not expressible (UserError): another architecture, ``hidden_act`` other than silu, ``mlp_bias``,
``partial_rotary_factor`` != 1, dynamic / longrope RoPE, per-layer RoPE, a sliding window on some layers
only, MoE layers that are not the last ones, DeepseekV3 ``attention_bias``, top-1 routing with a
renormalised weight (tinyseek keeps the router probability for k = 1).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import SafetensorError, safe_open

from tinyseek.config import ModelConfig
from tinyseek.errors import UserError
from tinyseek.interop.hf_export import permute_rope_rows
from tinyseek.model.layers import Rotary, rope_frequencies
from tinyseek.model.transformer import Transformer

SUPPORTED: tuple[str, ...] = (
    "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM",
    "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM", "DeepseekV3ForCausalLM",
)
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                "qwen3": "Qwen3ForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM",
                "mixtral": "MixtralForCausalLM", "deepseek_v3": "DeepseekV3ForCausalLM"}
# transformers' config-class defaults for the keys read below, where they differ from the common ones
_DEFAULTS: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048},
    "MistralForCausalLM": {"max_position_embeddings": 131072, "sliding_window": 4096},
    "Qwen2ForCausalLM": {"max_position_embeddings": 32768, "sliding_window": 4096},
    "Qwen3ForCausalLM": {"max_position_embeddings": 32768, "sliding_window": 4096},
    "Qwen2MoeForCausalLM": {"max_position_embeddings": 32768, "sliding_window": 4096, "qkv_bias": True,
                            "num_experts": 60, "num_experts_per_tok": 4, "shared_expert_intermediate_size": 5632},
    "Qwen3MoeForCausalLM": {"max_position_embeddings": 32768, "sliding_window": 4096, "num_experts": 128,
                            "num_experts_per_tok": 8},
    "MixtralForCausalLM": {"max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                           "num_local_experts": 8, "num_experts_per_tok": 2},
    "DeepseekV3ForCausalLM": {"max_position_embeddings": 4096, "n_routed_experts": 256, "n_shared_experts": 1,
                              "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "routed_scaling_factor": 2.5,
                              "first_k_dense_replace": 3, "norm_topk_prob": True, "rope_interleave": True,
                              "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_rope_head_dim": 64,
                              "qk_nope_head_dim": 128, "v_head_dim": 128, "moe_intermediate_size": 2048},
}
_COMMON_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False, "hidden_act": "silu",
                    "initializer_range": 0.02, "attention_bias": False, "router_aux_loss_coef": 0.001,
                    "norm_topk_prob": False, "decoder_sparse_step": 1, "max_window_layers": 28}
HF_MLA_LATENT_NORM_EPS = 1e-6  # transformers builds DeepseekV3's q_a / kv_a layernorms with the default eps


# ---------------------------------------------------------------------------------------------
# files
# ---------------------------------------------------------------------------------------------
def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: not valid JSON ({e})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read ({e})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of one file; safetensors' own header and size checks catch a truncated or corrupt file."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a valid safetensors file ({msg}; truncated or corrupt?)") from None


def read_hf_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json as a dict, every tensor by name)`` of a Hugging Face model directory: one
    ``model.safetensors`` or the shards named by ``model.safetensors.index.json``. UserError (one line)
    for a missing directory / config.json / weights / shard, bad JSON, or a truncated or corrupt file."""
    d = Path(path)
    if not d.is_dir():
        raise UserError(f"{d}: not a directory (expected a Hugging Face model directory with config.json)")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise UserError(f"{d}: no config.json (not a Hugging Face model directory)")
    hf = _read_json(cfg_path)
    if not isinstance(hf, dict):
        raise UserError(f"{cfg_path}: expected a JSON object, got {type(hf).__name__}")
    single, index = d / "model.safetensors", d / "model.safetensors.index.json"
    weight_map: dict[str, str] | None = None
    if single.is_file():
        files = ["model.safetensors"]
    elif index.is_file():
        idx = _read_json(index)
        weight_map = idx.get("weight_map") if isinstance(idx, dict) else None
        if not isinstance(weight_map, dict) or not weight_map:
            raise UserError(f"{index}: no weight_map")
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (d / f).is_file()]
        if missing:
            raise UserError(f"{d}: shard {missing[0]} named in model.safetensors.index.json is missing"
                            + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    else:
        other = sorted(p.name for p in d.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".gguf"))
        hint = f" (found {', '.join(other[:3])}: only safetensors weights are read)" if other else ""
        raise UserError(f"{d}: no model.safetensors or model.safetensors.index.json{hint}")
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        part = _load_safetensors(d / f)
        dup = sorted(set(part) & set(tensors))
        if dup:
            raise UserError(f"{d / f}: tensor {dup[0]} is also in another shard")
        tensors.update(part)
    if weight_map is not None:
        absent = sorted(k for k in weight_map if k not in tensors)
        if absent:
            raise UserError(f"{d}: tensor {absent[0]} listed in model.safetensors.index.json is not in "
                            f"{weight_map[absent[0]]}")
    return hf, tensors


# ---------------------------------------------------------------------------------------------
# config
# ---------------------------------------------------------------------------------------------
def architecture(hf: dict) -> str:
    """The supported HF architecture class of a config dict (from ``architectures``, else ``model_type``)."""
    archs = hf.get("architectures") or []
    arch = archs[0] if isinstance(archs, list) and archs else _MODEL_TYPES.get(str(hf.get("model_type")), "")
    if arch not in SUPPORTED:
        named = arch or f"model_type {hf.get('model_type')!r}"
        raise UserError(f"unsupported Hugging Face architecture {named}; supported: {', '.join(SUPPORTED)}")
    return arch


class _Cfg:
    """config.json values with transformers' class defaults for absent (or null) keys."""

    def __init__(self, hf: dict, arch: str):
        self.hf, self.arch = hf, arch

    def __call__(self, key: str, default: Any = None) -> Any:
        v = self.hf.get(key)
        if v is None:
            v = _DEFAULTS[self.arch].get(key, _COMMON_DEFAULTS.get(key, default))
        return v

    def num(self, key: str, kind: type = int) -> Any:
        """A required number (config.json value or the class default): UserError naming the key if absent."""
        v = self(key)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or (kind is int and v != int(v)):
            raise UserError(f"{self.arch}: config.json needs a number for {key}, got {v!r}")
        return kind(v)

    def fail(self, what: str) -> UserError:
        return UserError(f"{self.arch}: {what} is not supported by tinyseek's import")


def _rope(c: _Cfg, max_pos: int) -> dict:
    """ModelConfig RoPE fields from ``rope_parameters`` (or the legacy ``rope_scaling`` + ``rope_theta``)."""
    rp = c.hf.get("rope_parameters") or c.hf.get("rope_scaling") or {}
    if not isinstance(rp, dict):
        raise c.fail(f"rope_parameters {rp!r}")
    if rp and all(isinstance(v, dict) for v in rp.values()):
        raise c.fail("per-layer-type rope_parameters")
    theta = rp.get("rope_theta") or c("rope_theta")
    prf = rp.get("partial_rotary_factor", c.hf.get("partial_rotary_factor")) or 1.0
    if prf != 1.0:
        raise c.fail(f"partial_rotary_factor={prf}")
    kind = rp.get("rope_type") or rp.get("type") or "default"
    out: dict[str, Any] = {"rope_theta": float(theta), "rope_type": kind}
    orig = int(rp.get("original_max_position_embeddings") or c.hf.get("original_max_position_embeddings") or max_pos)
    if kind == "default":
        out["rope_type"] = "default"
    elif kind == "linear":
        out["rope_factor"] = float(rp["factor"])
    elif kind == "llama3":
        out.update(rope_factor=float(rp["factor"]), rope_low_freq_factor=float(rp["low_freq_factor"]),
                   rope_high_freq_factor=float(rp["high_freq_factor"]), rope_original_max_len=orig)
    elif kind == "yarn":
        factor = rp.get("factor") or max_pos / orig  # transformers: the context ratio when unset
        out.update(rope_factor=float(factor), rope_original_max_len=orig,
                   yarn_beta_fast=float(rp.get("beta_fast") or 32), yarn_beta_slow=float(rp.get("beta_slow") or 1),
                   yarn_mscale=float(rp.get("mscale") or 0.0), yarn_mscale_all_dim=float(rp.get("mscale_all_dim") or 0.0),
                   yarn_attn_factor=float(rp.get("attention_factor") or 0.0),
                   yarn_truncate=bool(rp.get("truncate", True)))
    else:
        raise c.fail(f"rope_type {kind!r} (supported: default, linear, llama3, yarn)")
    return out


def _window(c: _Cfg, n_layers: int, max_seq_len: int) -> int:
    """One sliding window for every layer (0 = none), or UserError when only some layers slide."""
    arch = c.arch
    if arch in ("MistralForCausalLM", "MixtralForCausalLM"):
        return int(c.hf.get("sliding_window") or 0)  # null: full attention
    if not c.hf.get("use_sliding_window", False):
        return 0
    w = int(c("sliding_window") or 0)
    if w <= 0:
        return 0
    if arch == "Qwen3MoeForCausalLM":
        return w
    types = c.hf.get("layer_types")
    if not types:  # transformers' default layouts
        mwl = c.num("max_window_layers")
        if arch == "Qwen2MoeForCausalLM":
            types = ["sliding_attention" if (i + 1) % 2 and i < mwl else "full_attention" for i in range(n_layers)]
        else:
            types = ["sliding_attention" if i >= mwl else "full_attention" for i in range(n_layers)]
    sliding = [i for i, t in enumerate(types[:n_layers]) if t == "sliding_attention"]
    if not sliding:
        return 0
    if len(sliding) == n_layers:
        return w
    if w >= max_seq_len:  # the window never cuts anything within our context: full attention everywhere
        return 0
    raise c.fail(f"a sliding window ({w}) on layers {sliding} only (tinyseek applies one window to all layers)")


def _moe_prefix(c: _Cfg, n_layers: int, n_experts: int) -> int:
    """Number of leading dense layers for Qwen-MoE layouts (``mlp_only_layers``, ``decoder_sparse_step``)."""
    step = c.num("decoder_sparse_step")
    only = set(c("mlp_only_layers", []) or [])
    moe = [i for i in range(n_layers) if i not in only and n_experts > 0 and step > 0 and (i + 1) % step == 0]
    if not moe:
        return n_layers
    k = moe[0]
    if moe != list(range(k, n_layers)):
        raise c.fail(f"MoE layers {moe} (decoder_sparse_step={step}, mlp_only_layers={sorted(only)}): "
                     "tinyseek's dense layers must come first and the MoE layers after them")
    return k


def config_from_hf(hf: dict, max_seq_len: int = 0) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (as a dict). ``max_seq_len`` > 0 caps
    ``max_position_embeddings`` (it sizes our RoPE table and KV cache). UserError naming the
    architecture and setting where tinyseek cannot express it exactly."""
    if not isinstance(hf, dict):
        raise UserError(f"a Hugging Face config must be a JSON object, got {type(hf).__name__}")
    arch = architecture(hf)
    c = _Cfg(hf, arch)
    try:
        return _config(c, arch, max_seq_len)
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as e:  # a missing or malformed key
        if isinstance(e, UserError):
            raise
        raise UserError(f"{arch}: config.json lacks or mangles {e.args[0] if e.args else type(e).__name__!s}") from None


def _config(c: _Cfg, arch: str, max_seq_len: int) -> ModelConfig:
    hf = c.hf
    if c("hidden_act") != "silu":
        raise c.fail(f"hidden_act={c('hidden_act')!r} (SwiGLU needs 'silu')")
    if hf.get("mlp_bias"):
        raise c.fail("mlp_bias=true")
    quant = hf.get("quantization_config")
    if quant:
        method = quant.get("quant_method", "?") if isinstance(quant, dict) else quant
        raise c.fail(f"a quantized checkpoint (quantization_config {method!r}; import a float one)")
    D, L, H = c.num("hidden_size"), c.num("num_hidden_layers"), c.num("num_attention_heads")
    max_pos = c.num("max_position_embeddings")
    seq = min(max_pos, max_seq_len) if max_seq_len > 0 else max_pos
    kw: dict[str, Any] = dict(
        vocab_size=c.num("vocab_size"), d_model=D, n_layers=L, n_heads=H, max_seq_len=seq,
        norm_eps=c.num("rms_norm_eps", float), tie_embeddings=bool(c("tie_word_embeddings")),
        init_std=c.num("initializer_range", float), d_ff=c.num("intermediate_size"), hf_arch=arch,
        **_rope(c, max_pos))
    if arch == "DeepseekV3ForCausalLM":
        if c("attention_bias"):
            raise c.fail("attention_bias=true on MLA")
        E = int(c("n_routed_experts") or 0)
        q_lora = hf["q_lora_rank"] if "q_lora_rank" in hf else c("q_lora_rank")  # null: a plain q_proj
        kw.update(attn="mla", q_lora_rank=int(q_lora or 0),
                  kv_lora_rank=c.num("kv_lora_rank"), qk_nope_head_dim=c.num("qk_nope_head_dim"),
                  qk_rope_head_dim=c.num("qk_rope_head_dim"), v_head_dim=c.num("v_head_dim"),
                  latent_norm_eps=HF_MLA_LATENT_NORM_EPS, hf_rope_interleave=bool(c("rope_interleave")),
                  n_routed_experts=E, n_dense_layers=min(c.num("first_k_dense_replace"), L) if E else L,
                  n_shared_experts=int(c("n_shared_experts") or 0), moe_d_ff=c.num("moe_intermediate_size"),
                  top_k=c.num("num_experts_per_tok"), score_func="sigmoid", n_groups=int(c("n_group") or 1),
                  topk_groups=int(c("topk_group") or 1), routed_scaling=c.num("routed_scaling_factor", float),
                  norm_topk_prob=bool(c("norm_topk_prob")), bias_update_speed=0.001,  # the bias is used
                  aux_loss="switch", aux_loss_alpha=0.0001)
        if E and kw["n_routed_experts"] // kw["n_groups"] < 2:
            raise c.fail(f"n_group={kw['n_groups']} with one expert per group")
    else:
        hd = int(hf.get("head_dim") or D // H)
        bias = bool(c("attention_bias"))
        kw.update(attn="gqa", n_kv_heads=int(hf.get("num_key_value_heads") or H), head_dim=hd,
                  qkv_bias=bias, o_bias=bias, sliding_window=_window(c, L, seq),
                  qk_norm=arch in ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM"),
                  n_routed_experts=0, n_dense_layers=L, n_shared_experts=0)
        if arch == "Qwen2ForCausalLM":
            kw.update(qkv_bias=True, o_bias=False)
        elif arch == "Qwen2MoeForCausalLM":
            kw.update(qkv_bias=bool(c("qkv_bias")), o_bias=False)
        elif arch == "MistralForCausalLM" or arch == "MixtralForCausalLM":
            kw.update(qkv_bias=False, o_bias=False)
        if arch in ("Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM", "MixtralForCausalLM"):
            key = next((k for k in ("num_experts", "num_local_experts") if hf.get(k) is not None),
                       "num_local_experts" if arch == "MixtralForCausalLM" else "num_experts")
            E = c.num(key)
            k = c.num("num_experts_per_tok")
            if arch == "MixtralForCausalLM":
                dense, width, norm = 0, c.num("intermediate_size"), True
            else:
                dense, width, norm = _moe_prefix(c, L, E), c.num("moe_intermediate_size"), bool(c("norm_topk_prob"))
            if dense < L:
                if k == 1 and norm:
                    raise c.fail("top-1 routing with a renormalised weight (num_experts_per_tok=1 with "
                                 "norm_topk_prob; tinyseek keeps the router probability at k=1)")
                kw.update(n_routed_experts=E, n_dense_layers=dense, moe_d_ff=width, top_k=k, score_func="softmax",
                          norm_topk_prob=norm, n_groups=1, topk_groups=1, routed_scaling=1.0, bias_update_speed=0.0,
                          aux_loss="switch", aux_loss_alpha=float(c("router_aux_loss_coef")))
                if arch == "Qwen2MoeForCausalLM":
                    sw = int(c("shared_expert_intermediate_size") or 0)
                    kw.update(n_shared_experts=1 if sw > 0 else 0, shared_d_ff=sw, shared_expert_gate=sw > 0)
    return ModelConfig(**kw).validate()


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------
def _describe(key: str) -> str:
    """A short human name of an HF tensor key.

    >>> _describe("model.layers.3.self_attn.q_proj.weight"), _describe("model.embed_tokens.weight")
    ('layer 3 q_proj weight', 'embed_tokens weight')
    >>> _describe("model.layers.1.mlp.experts.5.gate_proj.weight")
    'layer 1 expert 5 gate_proj weight'
    """
    m = re.match(r"model\.layers\.(\d+)\.(?:self_attn\.|mlp\.)?(.*)$", key)
    head, rest = (f"layer {m.group(1)} ", m.group(2)) if m else ("", key.removeprefix("model."))
    rest = re.sub(r"^experts\.(\d+)\.", r"expert \1 ", rest)
    name, _, param = rest.rpartition(".")
    return f"{head}{name} {param}" if name else f"{head}{param}"


def _canonical(arch: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Key names as transformers holds them in memory for this architecture (Mixtral's hub names ->
    ``mlp.experts.{e}.gate_proj`` etc.); values untouched."""
    if arch != "MixtralForCausalLM":
        return dict(tensors)
    names = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
    out = {}
    for k, v in tensors.items():
        k = k.replace(".block_sparse_moe.", ".mlp.")
        k = re.sub(r"\.experts\.(\d+)\.(w[123])\.", lambda m: f".experts.{m.group(1)}.{names[m.group(2)]}.", k)
        out[k] = v
    return out


class _Source:
    """Takes tensors out of the checkpoint with shape checks; remembers what was used."""

    def __init__(self, arch: str, tensors: dict[str, torch.Tensor]):
        self.arch, self.t, self.used = arch, tensors, set()

    def has(self, key: str) -> bool:
        return key in self.t

    def take(self, key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key not in self.t:
            raise UserError(f"{self.arch} checkpoint lacks tensor {key} ({_describe(key)})")
        v = self.t[key]
        if tuple(v.shape) != tuple(shape):
            raise UserError(f"{_describe(key)} ({key}) has shape {tuple(v.shape)}, the config says {tuple(shape)}")
        self.used.add(key)
        return v


def _expected_state(cfg: ModelConfig) -> dict[str, torch.Size]:
    """Parameter and buffer shapes of ``Transformer(cfg)`` (built on the meta device: no memory)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    return {k: v.shape for k, v in m.state_dict().items()}


def state_from_hf(hf: dict, cfg: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """tinyseek ``state_dict`` for ``cfg`` (from :func:`config_from_hf`) from the checkpoint's tensors.
    UserError for a missing tensor, an unexpected one, or a shape that does not match the config."""
    arch = architecture(hf)
    src = _Source(arch, _canonical(arch, tensors))
    shapes = _expected_state(cfg)
    sd: dict[str, torch.Tensor] = {}

    def direct(ours: str, theirs: str) -> torch.Tensor:
        sd[ours] = src.take(theirs, shapes[ours])
        return sd[ours]

    direct("embed.weight", "model.embed_tokens.weight")
    direct("norm.weight", "model.norm.weight")
    if cfg.tie_embeddings:
        sd["lm_head.weight"] = sd["embed.weight"]
        if src.has("lm_head.weight"):  # some checkpoints store the tied head too
            src.take("lm_head.weight", shapes["lm_head.weight"])
    else:
        direct("lm_head.weight", "lm_head.weight")
    for i in range(cfg.n_layers):
        p, q = f"blocks.{i}.", f"model.layers.{i}."
        direct(p + "attn_norm.weight", q + "input_layernorm.weight")
        direct(p + "ffn_norm.weight", q + "post_attention_layernorm.weight")
        for k in [k for k in shapes if k.startswith(p + "attn.")]:
            direct(k, q + "self_attn." + k[len(p + "attn."):])
        if cfg.attn == "mla" and cfg.hf_rope_interleave:  # interleaved RoPE pairs -> rotate-half rows
            qk, r = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim, cfg.qk_rope_head_dim
            qn = p + ("attn.q_b_proj.weight" if cfg.q_lora_rank > 0 else "attn.q_proj.weight")
            sd[qn] = permute_rope_rows(sd[qn], qk, cfg.qk_nope_head_dim, r, inverse=True)
            kv = p + "attn.kv_a_proj_with_mqa.weight"
            sd[kv] = permute_rope_rows(sd[kv], cfg.kv_lora_rank + r, cfg.kv_lora_rank, r, inverse=True)
        f = p + "ffn."
        if f + "router.weight" not in shapes:  # dense FFN
            for n in ("gate_proj", "up_proj", "down_proj"):
                direct(f + f"{n}.weight", q + f"mlp.{n}.weight")
            continue
        direct(f + "router.weight", q + "mlp.gate.weight")
        if arch == "DeepseekV3ForCausalLM":
            sd[f + "router.expert_bias"] = src.take(q + "mlp.gate.e_score_correction_bias",
                                                    shapes[f + "router.expert_bias"]).float()
        else:
            sd[f + "router.expert_bias"] = torch.zeros(shapes[f + "router.expert_bias"])
        sd[f + "experts.w_gate_up"], sd[f + "experts.w_down"] = _experts(src, q + "mlp.experts.", cfg)
        sh = "mlp.shared_experts." if arch == "DeepseekV3ForCausalLM" else "mlp.shared_expert."
        for k in [k for k in shapes if k.startswith(f + "shared.")]:
            direct(k, q + sh + k[len(f + "shared."):])
        if f + "shared_gate.weight" in shapes:
            direct(f + "shared_gate.weight", q + "mlp.shared_expert_gate.weight")
    missing = sorted(set(shapes) - set(sd))
    if missing:  # a mapping gap of ours, not the checkpoint's
        raise UserError(f"{arch}: no source for {missing[0]} (import mapping incomplete)")
    extra = sorted(k for k in src.t if k not in src.used and not _ignored(k, hf, cfg))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise UserError(f"unexpected tensor {extra[0]} in the {arch} checkpoint{more}: config.json does not describe it")
    return sd


def _ignored(key: str, hf: dict, cfg: ModelConfig) -> bool:
    """Tensors transformers itself skips: RoPE tables saved by old versions, DeepSeek-V3's MTP layers."""
    if key.endswith("rotary_emb.inv_freq"):
        return True
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return bool(m and cfg.hf_arch == "DeepseekV3ForCausalLM" and int(m.group(1)) >= cfg.n_layers
                and (hf.get("num_nextn_predict_layers") or hf.get("num_mtp_layers") or 0) > 0)


def _experts(src: _Source, prefix: str, cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Our stacked ``w_gate_up (E, D, 2F)`` (gate first), ``w_down (E, F, D)`` from the fused
    ``gate_up_proj (E, 2F, D)`` / ``down_proj (E, D, F)`` or from one module per expert."""
    E, D, F = cfg.n_routed_experts, cfg.d_model, cfg.moe_d_ff
    if src.has(prefix + "gate_up_proj"):
        gu = src.take(prefix + "gate_up_proj", (E, 2 * F, D))
        dn = src.take(prefix + "down_proj", (E, D, F))
        return gu.transpose(1, 2).contiguous(), dn.transpose(1, 2).contiguous()
    gates = [src.take(f"{prefix}{e}.gate_proj.weight", (F, D)) for e in range(E)]
    ups = [src.take(f"{prefix}{e}.up_proj.weight", (F, D)) for e in range(E)]
    downs = [src.take(f"{prefix}{e}.down_proj.weight", (D, F)) for e in range(E)]
    w_gate_up = torch.stack([torch.cat([g, u], dim=0) for g, u in zip(gates, ups)]).transpose(1, 2).contiguous()
    return w_gate_up, torch.stack(downs).transpose(1, 2).contiguous()


def model_from_hf(hf: dict, tensors: Mapping[str, torch.Tensor], max_seq_len: int = 0,
                  dtype: torch.dtype = torch.float32) -> Transformer:
    """A :class:`Transformer` in eval mode holding the checkpoint's weights (cast to ``dtype``; the
    routers' ``expert_bias`` stays fp32 as in HF). Built on the meta device and filled in place, so
    the weights are held once."""
    cfg = config_from_hf(hf, max_seq_len)
    sd = state_from_hf(hf, cfg, tensors)
    with torch.device("meta"):
        model = Transformer(cfg)
    sd = {k: (v.float() if k.endswith("expert_bias") else v.to(dtype)).contiguous() for k, v in sd.items()}
    model.load_state_dict(sd, strict=True, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.embed.weight
    dim = model.rotary.cos.shape[-1]  # the RoPE table is not in the state dict: build it for real
    inv_freq, scale = rope_frequencies(cfg, dim)
    model.rotary = Rotary(dim, cfg.max_seq_len, inv_freq=inv_freq, scale=scale)
    leftover = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.is_meta]
    if leftover:
        raise RuntimeError(f"model_from_hf left {leftover[0]} on the meta device")
    return model.eval()

