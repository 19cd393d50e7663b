"""Typed dataclass configs, presets as Python functions, and ``--kebab-case`` overrides.

One ``@dataclass`` per stage. Every field has a comment. Derived values are computed in one place
(``ModelConfig.derived`` style properties), and ``validate()`` raises :class:`ConfigError` with a
one-line message that the CLI prints before exiting with status 2.

Overrides: ``--n-layers 4`` sets ``cfg.n_layers`` if the stage config has it, else
``cfg.model.n_layers``; ``--model.n-layers 4`` is explicit. Booleans accept true/false/1/0/yes/no.
"""
from __future__ import annotations

import dataclasses
import json
import math
import typing
from dataclasses import dataclass
from typing import Any, Callable


from tinyseek.errors import UserError


class ConfigError(UserError, ValueError):
    """A bad configuration value. The message is one line naming the field and the problem."""


def check_finite(cfg: Any, prefix: str = "") -> None:
    """:class:`ConfigError` for the first ``float`` field of dataclass ``cfg`` (nested dataclasses
    included) that is NaN or infinite: no numeric setting means anything there, and range checks
    alone miss them (inf passes every lower bound, NaN every check written as ``not x < lo``).

    >>> @dataclass
    ... class C:
    ...     lr: float = 1.0
    >>> try:
    ...     check_finite(C(lr=float("inf")))
    ... except ConfigError as e:
    ...     print(e)
    lr must be a finite number, got inf
    """
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v) and not isinstance(v, type):
            check_finite(v, f"{prefix}{f.name}.")
        elif isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{prefix}{f.name} must be a finite number, got {v}")


# ---------------------------------------------------------------------------------------------
# model
# ---------------------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    vocab_size: int = 512          # tokenizer vocabulary (padded up to a multiple of 64 internally: no)
    d_model: int = 128             # residual stream width
    n_layers: int = 4              # transformer blocks
    n_heads: int = 4               # query heads
    max_seq_len: int = 256         # longest sequence (RoPE table and KV cache length)
    norm_eps: float = 1e-6         # RMSNorm epsilon
    rope_theta: float = 10000.0    # RoPE base
    tie_embeddings: bool = False   # share input embedding and output head
    init_std: float = 0.02         # normal init std for linear/embedding weights
    # --- attention ---
    attn: str = "mla"              # "mla" (DeepSeek-V3 low-rank KV) or "gqa"
    n_kv_heads: int = 2            # GQA: key/value heads (n_heads must be a multiple)
    head_dim: int = 0              # GQA: per-head width; 0 -> d_model // n_heads
    q_lora_rank: int = 0           # MLA: query low-rank width; 0 = plain query projection
    kv_lora_rank: int = 64         # MLA: compressed KV latent width (what the cache stores)
    qk_nope_head_dim: int = 32     # MLA: per-head query/key width without RoPE
    qk_rope_head_dim: int = 16     # MLA: per-head decoupled RoPE width (key part shared by heads)
    v_head_dim: int = 32           # MLA: per-head value width
    sliding_window: int = 0        # attend to at most this many previous tokens; 0 = full causal
    qkv_bias: bool = False         # GQA: bias on the q/k/v projections (Qwen2, Llama attention_bias)
    o_bias: bool = False           # GQA: bias on the output projection (Llama / Qwen3 attention_bias)
    qk_norm: bool = False          # GQA: RMSNorm (norm_eps) over each head's query and key before RoPE (Qwen3)
    latent_norm_eps: float = 0.0   # MLA: eps of the q/kv latent RMSNorms; 0 = norm_eps (HF DeepseekV3: 1e-6)
    # --- RoPE scaling (HF rope_parameters; the inverse frequencies come from layers.ROPE_TYPES) ---
    rope_type: str = "default"     # "default", "linear" (positions / factor), "llama3" (Llama 3.1 bands), "yarn"
    rope_factor: float = 1.0       # linear / llama3 / yarn: context extension factor
    rope_low_freq_factor: float = 1.0   # llama3: wavelengths above original_len / this are divided by factor
    rope_high_freq_factor: float = 4.0  # llama3: wavelengths below original_len / this are kept
    rope_original_max_len: int = 0      # llama3 / yarn: the pretraining context (HF original_max_position_embeddings)
    yarn_beta_fast: float = 32.0   # yarn: rotations bounding the extrapolated (unchanged) dims
    yarn_beta_slow: float = 1.0    # yarn: rotations bounding the interpolated (divided by factor) dims
    yarn_mscale: float = 0.0       # yarn: HF mscale (0 = unset); cos/sin scale 0.1*mscale*ln(factor)+1 over the next
    yarn_mscale_all_dim: float = 0.0  # yarn: HF mscale_all_dim (0 = unset); MLA also scales its softmax by its square
    yarn_attn_factor: float = 0.0  # yarn: explicit cos/sin scale (HF attention_factor); 0 = from factor and mscales
    yarn_truncate: bool = True     # yarn: round the correction range to whole dims (HF truncate)
    # --- feed-forward ---
    d_ff: int = 384                # dense SwiGLU hidden width (dense layers)
    n_dense_layers: int = 1        # first-k blocks use a dense FFN (DeepSeek-V3 first_k_dense_replace)
    n_routed_experts: int = 8      # fine-grained routed experts per MoE layer; 0 = all layers dense
    n_shared_experts: int = 1      # always-on shared experts (fused into one SwiGLU of S x width)
    shared_d_ff: int = 0           # hidden width of the fused shared expert; 0 = n_shared_experts * moe_d_ff
    shared_expert_gate: bool = False  # scale the shared expert's output by sigmoid(x . w), w a (1, D) weight (Qwen2-MoE)
    moe_d_ff: int = 96             # hidden width of one routed / shared expert
    top_k: int = 2                 # experts per token
    score_func: str = "sigmoid"    # router score: "sigmoid" (V3, exports to HF DeepseekV3) or "softmax" (V2)
    n_groups: int = 1              # group-limited routing: expert groups (1 = off)
    topk_groups: int = 1           # groups a token may route to
    routed_scaling: float = 1.0    # multiply routed expert output (V3 routed_scaling_factor)
    norm_topk_prob: bool = True    # renormalise the k selected weights to sum to one
    aux_loss: str = "switch"       # balance loss: "none", "switch" (N*sum f_i P_i), "variance" (sum (p_i-1/N)^2)
    aux_loss_alpha: float = 0.01   # balance loss coefficient
    bias_update_speed: float = 0.001  # aux-loss-free balancing speed gamma; 0 disables the bias
    router_entropy_coef: float = 0.0  # routing-entropy term: loss -= c * mean per-token entropy of the normalized affinities / ln N; c > 0 spreads them (no expert's affinity collapses), c < 0 sharpens them; 0 = off
    router_load_aware: float = 0.0    # load-aware routing strength lambda: selection scores minus lambda * (N * load_i - 1), load = EMA of each expert's share (buffer expert_load); 0 = off
    router_load_momentum: float = 0.9  # load-aware routing: the load counter's EMA momentum per training step, in [0, 1)
    capacity_factor: float = 0.0   # expert capacity = ceil(cf * tokens * k / N); 0 = dropless
    hf_arch: str = ""              # Hugging Face architecture imported from (e.g. "Qwen2ForCausalLM"); HF export writes it back
    hf_rope_interleave: bool = False  # the imported checkpoint rotated interleaved pairs (DeepseekV3 rope_interleave): export permutes back
    moe_impl: str = "auto"         # "grouped" (torch._grouped_mm, fused backward), "padded" (bmm), "sorted" (sorted loop), "loop" (reference), "kernel" (one C call, CPU fp32 inference), "auto" (grouped; without gradients on CPU fp32 the C kernel, else grouped's plain-autograd form, sorted for one token; sorted without grouped_mm)

    @property
    def gqa_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def shared_width(self) -> int:
        """Hidden width of the (fused) shared expert; 0 = none."""
        if self.n_shared_experts <= 0:
            return 0
        return self.shared_d_ff or self.n_shared_experts * self.moe_d_ff

    @property
    def mla_latent_eps(self) -> float:
        return self.latent_norm_eps or self.norm_eps

    @property
    def is_moe(self) -> bool:
        return self.n_routed_experts > 0 and self.n_layers > self.n_dense_layers

    def validate(self) -> "ModelConfig":
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ConfigError(msg)

        check_finite(self, "model.")
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "max_seq_len", "d_ff"):
            need(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        for name in ("norm_eps", "rope_theta", "init_std", "routed_scaling"):  # 0 or less: NaN / inf from step one
            need(getattr(self, name) > 0, f"model.{name} must be > 0, got {getattr(self, name)}")
        need(self.attn in ("mla", "gqa"), f"model.attn must be 'mla' or 'gqa', got {self.attn!r}")
        if self.attn == "gqa":
            need(self.n_kv_heads > 0 and self.n_heads % self.n_kv_heads == 0,
                 f"model.n_heads ({self.n_heads}) must be a multiple of model.n_kv_heads ({self.n_kv_heads})")
        else:
            need(self.kv_lora_rank > 0, f"model.kv_lora_rank must be > 0 for MLA, got {self.kv_lora_rank}")
            need(self.qk_rope_head_dim > 0 and self.qk_rope_head_dim % 2 == 0,
                 f"model.qk_rope_head_dim must be a positive even number, got {self.qk_rope_head_dim}")
            need(self.qk_nope_head_dim >= 0 and self.v_head_dim > 0, "model.qk_nope_head_dim/v_head_dim must be positive")
        if self.attn == "gqa":
            need(self.gqa_head_dim % 2 == 0, f"model.head_dim must be even for RoPE, got {self.gqa_head_dim}")
        need(self.sliding_window >= 0, f"model.sliding_window must be >= 0, got {self.sliding_window}")
        need(self.latent_norm_eps >= 0, f"model.latent_norm_eps must be >= 0 (0 = norm_eps), got {self.latent_norm_eps}")
        if self.attn == "mla":
            for name in ("qkv_bias", "o_bias", "qk_norm"):
                need(not getattr(self, name), f"model.{name} is a GQA setting (attn='mla')")
        need(self.rope_type in ("default", "linear", "llama3", "yarn"),
             f"model.rope_type must be default/linear/llama3/yarn, got {self.rope_type!r}")
        if self.rope_type != "default":
            need(self.rope_factor > 0, f"model.rope_factor must be > 0, got {self.rope_factor}")
        if self.rope_type in ("llama3", "yarn"):
            need(self.rope_original_max_len > 0,
                 f"model.rope_original_max_len must be > 0 for rope_type={self.rope_type!r}")
        if self.rope_type == "llama3":
            need(self.rope_high_freq_factor > self.rope_low_freq_factor > 0,
                 "model.rope_high_freq_factor must exceed model.rope_low_freq_factor > 0")
        for name in ("yarn_mscale", "yarn_mscale_all_dim", "yarn_attn_factor"):
            need(getattr(self, name) >= 0, f"model.{name} must be >= 0 (0 = unset), got {getattr(self, name)}")
        need(0 <= self.n_dense_layers <= self.n_layers,
             f"model.n_dense_layers must be in [0, n_layers={self.n_layers}], got {self.n_dense_layers}")
        need(self.n_routed_experts >= 0, f"model.n_routed_experts must be >= 0, got {self.n_routed_experts}")
        if self.n_routed_experts > 0:
            need(1 <= self.top_k <= self.n_routed_experts,
                 f"model.top_k ({self.top_k}) must be between 1 and model.n_routed_experts ({self.n_routed_experts})")
            need(self.moe_d_ff > 0, f"model.moe_d_ff must be > 0, got {self.moe_d_ff}")
            need(self.n_shared_experts >= 0, f"model.n_shared_experts must be >= 0, got {self.n_shared_experts}")
            need(self.shared_d_ff >= 0, f"model.shared_d_ff must be >= 0 (0 = n_shared_experts * moe_d_ff), got {self.shared_d_ff}")
            need(not self.shared_expert_gate or self.n_shared_experts > 0,
                 "model.shared_expert_gate needs a shared expert (model.n_shared_experts > 0)")
            need(self.score_func in ("softmax", "sigmoid"), f"model.score_func must be 'softmax' or 'sigmoid', got {self.score_func!r}")
            need(self.n_groups >= 1 and self.n_routed_experts % self.n_groups == 0,
                 f"model.n_routed_experts ({self.n_routed_experts}) must be divisible by model.n_groups ({self.n_groups})")
            need(1 <= self.topk_groups <= self.n_groups,
                 f"model.topk_groups ({self.topk_groups}) must be between 1 and model.n_groups ({self.n_groups})")
            need(self.top_k <= self.topk_groups * (self.n_routed_experts // self.n_groups),
                 f"model.top_k ({self.top_k}) exceeds the experts in {self.topk_groups} selected group(s)")
            need(self.aux_loss in ("none", "switch", "variance"),
                 f"model.aux_loss must be 'none', 'switch' or 'variance', got {self.aux_loss!r}")
            need(self.aux_loss_alpha >= 0, f"model.aux_loss_alpha must be >= 0, got {self.aux_loss_alpha}")
            need(self.bias_update_speed >= 0, f"model.bias_update_speed must be >= 0, got {self.bias_update_speed}")
            need(self.router_load_aware >= 0, f"model.router_load_aware must be >= 0 (0 = off), got {self.router_load_aware}")
            need(0 <= self.router_load_momentum < 1,
                 f"model.router_load_momentum must be in [0, 1), got {self.router_load_momentum}")
            need(self.capacity_factor >= 0, f"model.capacity_factor must be >= 0 (0 = dropless), got {self.capacity_factor}")
            need(self.moe_impl in ("auto", "grouped", "padded", "sorted", "loop", "kernel"),
                 f"model.moe_impl must be auto/grouped/padded/sorted/loop/kernel, got {self.moe_impl!r}")
        return self


# ---------------------------------------------------------------------------------------------
# generic helpers: to/from dict, overrides
# ---------------------------------------------------------------------------------------------
def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(cls: type, d: dict) -> Any:
    """Build dataclass ``cls`` from a (possibly nested) dict; unknown keys are a ConfigError."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in d.items():
        if k not in names:
            raise ConfigError(f"unknown config key {cls.__name__}.{k}")
        t = hints[k]
        if dataclasses.is_dataclass(t) and isinstance(v, dict):
            v = from_dict(t, v)
        kwargs[k] = v
    return cls(**kwargs)


def _convert(value: str, typ: Any, key: str) -> Any:
    origin = typing.get_origin(typ)
    if typ is bool:
        low = value.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"--{key} expects a boolean (true/false), got {value!r}")
    if typ in (int, float):
        try:
            return typ(value)
        except ValueError:
            raise ConfigError(f"--{key} expects {typ.__name__}, got {value!r}") from None
    if typ is str:
        return value
    if origin in (list, tuple) or typ in (list, tuple):
        args = typing.get_args(typ)
        inner = args[0] if args else str
        items = [s for s in value.split(",") if s != ""]
        return [_convert(s, inner, key) for s in items]
    if origin is typing.Union or str(origin) == "types.UnionType":
        args = [a for a in typing.get_args(typ) if a is not type(None)]
        if value.lower() in ("none", "null", ""):
            return None
        return _convert(value, args[0], key)
    if origin is dict or typ is dict:
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise ConfigError(f"--{key} expects a JSON object, got {value!r}") from None
    return value


def set_value(cfg: Any, dotted: str, raw: str) -> None:
    """Set ``cfg.<dotted>`` from the string ``raw`` (converted by the field's type).

    A bare name is looked up on ``cfg`` first, then on nested dataclass fields (e.g. ``model``).
    """
    key = dotted.replace("-", "_")
    parts = key.split(".")
    target = cfg
    if len(parts) == 1:
        if not _has_field(cfg, key):
            for f in dataclasses.fields(cfg):
                sub = getattr(cfg, f.name)
                if dataclasses.is_dataclass(sub) and _has_field(sub, key):
                    target = sub
                    break
            else:
                raise ConfigError(f"unknown option --{dotted} for {type(cfg).__name__}")
    else:
        for p in parts[:-1]:
            if not _has_field(target, p):
                raise ConfigError(f"unknown option --{dotted} for {type(cfg).__name__}")
            target = getattr(target, p)
        if not _has_field(target, parts[-1]):
            raise ConfigError(f"unknown option --{dotted} for {type(cfg).__name__}")
    name = parts[-1]
    typ = typing.get_type_hints(type(target))[name]
    setattr(target, name, _convert(raw, typ, dotted))


def _has_field(obj: Any, name: str) -> bool:
    return dataclasses.is_dataclass(obj) and any(f.name == name for f in dataclasses.fields(obj))


def apply_overrides(cfg: Any, argv: list[str]) -> Any:
    """Apply ``--key value`` / ``--key=value`` pairs to ``cfg`` in place and return it."""
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r} (options look like --name value)")
        if "=" in arg:
            k, v = arg[2:].split("=", 1)
            i += 1
        else:
            k = arg[2:]
            if i + 1 >= len(argv) or (argv[i + 1].startswith("--") and not _looks_negative(argv[i + 1])):
                v = "true"  # a bare flag means true
                i += 1
            else:
                v = argv[i + 1]
                i += 2
        set_value(cfg, k, v)
    return cfg


def _looks_negative(s: str) -> bool:
    try:
        float(s)
        return True
    except ValueError:
        return False


# ---------------------------------------------------------------------------------------------
# presets: Python functions, not YAML inheritance
# ---------------------------------------------------------------------------------------------
def model_cpu_tiny() -> ModelConfig:
    """~1.6M params MoE (8 experts top-2 + 1 shared, MLA): trains visibly in 2-3 min on 2 cores."""
    return ModelConfig(vocab_size=2048, d_model=128, n_layers=4, n_heads=4, max_seq_len=256,
                       attn="mla", kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                       d_ff=384, n_dense_layers=1, n_routed_experts=8, n_shared_experts=1, moe_d_ff=96,
                       top_k=2, score_func="sigmoid")


def model_micro() -> ModelConfig:
    """Smallest sensible model, for unit tests and the CI end-to-end run."""
    return ModelConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4, max_seq_len=128,
                       attn="mla", kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       d_ff=128, n_dense_layers=1, n_routed_experts=4, n_shared_experts=1, moe_d_ff=32, top_k=2, score_func="sigmoid")


def model_gpu_small() -> ModelConfig:
    """~100M total params (~30M active) DeepSeek-V3-style MoE for one H100 (sigmoid router, groups)."""
    return ModelConfig(vocab_size=16384, d_model=512, n_layers=10, n_heads=8, max_seq_len=1024,
                       attn="mla", q_lora_rank=256, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
                       v_head_dim=64, d_ff=2048, n_dense_layers=1, n_routed_experts=32, n_shared_experts=1,
                       moe_d_ff=256, top_k=4, score_func="sigmoid", n_groups=4, topk_groups=2,
                       routed_scaling=2.5, aux_loss="switch", aux_loss_alpha=0.0001, bias_update_speed=0.001)


MODEL_PRESETS: dict[str, Callable[[], ModelConfig]] = {
    "micro": model_micro,
    "cpu-tiny": model_cpu_tiny,
    "gpu-small": model_gpu_small,
}


def model_preset(name: str) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(MODEL_PRESETS)}")
    return MODEL_PRESETS[name]()
