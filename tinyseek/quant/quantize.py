"""Weight-only quantization of a ``Transformer``: W8A16 (per-channel int8) and W4A16 (group-wise
int4, packed two per byte), optional AWQ-style smoothing from a calibration set, and the
quantized checkpoint format.

What is quantized: every ``nn.Linear`` inside the blocks (attention projections, dense SwiGLU,
shared experts), the stacked routed experts (``QuantExperts``), ``lm_head`` if
``QuantSpec.lm_head`` and the token embedding if ``QuantSpec.embed`` (``QuantEmbedding``, same
method and group size; with tied embeddings the head and the embedding share one quantized table,
so both flags must agree and the head is not smoothed). What stays float (fp32, as trained): all
RMSNorms, the MoE routers (their ``weight`` and ``expert_bias``; routing decisions are fragile),
and the RoPE tables (derived, not stored). Those few are 18 KB of a 2.0 MB int8 cpu-tiny file;
fp16 storage would save 9 KB (0.45%) and perturb routing, so they stay fp32.

Checkpoint directory (written atomically)::

    model.safetensors    integer codes, fp16 scales, the float tensors; tied aliases recorded
    quant_config.json    {"format": "tinyseek-quant", "format_version": 2, "method", "bits", "group_size",
                          "scale_dtype": "float16", "calibration", "search", "lm_head", "embed",
                          "model_config", "modules": {name: kind}}
    meta.json            the source checkpoint's meta (with "model_config") plus {"quant": ...}

Format versions: 2 (current) stores every scale in fp16 and may quantize the embedding (module
kinds ``embedding`` and ``linear_tied``); 1 (older) stored int8 scales in fp32 and never quantized
the embedding. Version 1 checkpoints still load (their int8 layers then take the PyTorch-op path,
the fused kernels read fp16 scales only).

:func:`load_quantized` checks format, version, method/bits/group size, the model config and every
tensor's dtype and shape against the config, and refuses a mismatch with a one-line ``UserError``.
Importing this module registers the format with :func:`tinyseek.train.checkpoint.register_format`,
so ``load_model`` loads a quantized directory like any other checkpoint
(:mod:`tinyseek.quant.load`). ``method``, ``bits`` and ``group_size`` are read and checked through
the format table (:data:`tinyseek.quant.formats.FORMATS`); the file layout is unchanged.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from tinyseek.common import atomic_dir
from tinyseek.config import ConfigError, ModelConfig, from_dict, to_dict
from tinyseek.errors import UserError
from tinyseek.model import moe as moe_mod
from tinyseek.model.moe import Experts
from tinyseek.model.transformer import Transformer
from tinyseek.quant.calibrate import CALIBRATIONS, activation_range, collect_inputs, search_smoothing
from tinyseek.quant.formats import FORMATS, QuantFormat
from tinyseek.quant.modules import QUANT_DISPATCH, QuantEmbedding, QuantExperts, QuantLinear, QuantSwiGLU
from tinyseek.train.checkpoint import CheckpointFormat, load_weights, register_format, save_weights, write_checksums

FORMAT = "tinyseek-quant"
FORMAT_VERSION = 2
READ_VERSIONS = (1, 2)
MODULE_KINDS = {1: ("linear", "linear_smooth", "experts", "experts_smooth"),
                2: ("linear", "linear_smooth", "linear_tied", "experts", "experts_smooth", "embedding")}
SEARCHES = ("none", "awq")


@dataclass
class QuantSpec:
    method: str = "int8"          # a FORMATS name: "int8" (W8A16 per-channel), "int4" (W4A16 group-wise, packed), "w8a8" (int8 weights + per-token uint8 activations)
    group_size: int = 128         # int4 inputs per scale: 32, 64 or 128 (int8 is per-channel: ignored, stored as 0)
    calibration: str = "minmax"   # with search="awq": activation range per input channel, "minmax", "percentile" or "kl"
    percentile: float = 99.9      # percentile calibration: which percentile of |x|
    search: str = "none"          # "none": round-to-nearest min-max scales (no data); "awq": AWQ smoothing searched on the calibration set
    lm_head: bool = True          # also quantize the output head
    embed: bool = True            # also quantize the token embedding (dequantised per looked-up row)

    @property
    def format(self) -> QuantFormat:
        return FORMATS[self.method]

    @property
    def bits(self) -> int:
        return self.format.bits

    @property
    def eff_group_size(self) -> int:
        return self.format.group(self.group_size)

    def validate(self) -> "QuantSpec":
        if self.method not in FORMATS:
            raise ConfigError(f"method must be {' or '.join(map(repr, FORMATS))}, got {self.method!r}")
        fmt = self.format
        if not fmt.valid_group(fmt.group(self.group_size)):
            raise ConfigError(f"group_size must be one of {', '.join(map(str, fmt.group_sizes))} for {fmt.name}, "
                              f"got {self.group_size}")
        if self.calibration not in CALIBRATIONS:
            raise ConfigError(f"calibration must be one of {', '.join(CALIBRATIONS)}, got {self.calibration!r}")
        if not 0 < self.percentile <= 100:
            raise ConfigError(f"percentile must be in (0, 100], got {self.percentile}")
        if self.search not in SEARCHES:
            raise ConfigError(f"search must be one of {', '.join(SEARCHES)}, got {self.search!r}")
        if fmt.act_bits and self.search != "none":
            raise ConfigError(f"search {self.search!r} smooths weights for weight-only formats; {fmt.name} quantizes "
                              "activations per token at run time: use --search none")
        if self.search == "none" and self.calibration != "minmax":
            raise ConfigError(f"calibration {self.calibration!r} chooses activation ranges for the scale search: "
                              "add --search awq (round-to-nearest uses min-max weight scales only)")
        return self


# ---------------------------------------------------------------------------------------------
# which modules
# ---------------------------------------------------------------------------------------------
def quant_targets(model: nn.Module, lm_head: bool) -> tuple[list[str], list[str]]:
    """(names of Linear modules to quantize, names of MoE ``experts`` modules)."""
    linears, experts = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and (name.startswith("blocks.") or (lm_head and name == "lm_head")):
            linears.append(name)
        elif isinstance(m, Experts):
            experts.append(name)
    return linears, experts


def head_is_tied(model: nn.Module) -> bool:
    """Whether ``lm_head`` and the embedding share one weight (float, QAT or quantized model)."""
    head, emb = model.lm_head, model.embed
    if isinstance(head, QuantLinear) and isinstance(emb, QuantEmbedding):
        return head.qweight is emb.qweight
    w = getattr(head, "weight", None)
    return w is not None and w is getattr(emb, "weight", None)


def check_tied(model: nn.Module, lm_head: bool, embed: bool) -> bool:
    """Tied head and embedding are quantized together or not at all; returns whether tied."""
    tied = head_is_tied(model)
    if tied and lm_head != embed:
        raise UserError("this model ties lm_head to the embedding: quantize both or neither "
                        f"(got lm_head={lm_head}, embed={embed})")
    return tied


def tie_quantized_head(model: nn.Module) -> None:
    """Make ``lm_head`` (a QuantLinear) use the QuantEmbedding's codes and scales."""
    model.lm_head.qweight = model.embed.qweight
    model.lm_head.scale = model.embed.scale


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def prefer_per_expert_dispatch(model: nn.Module) -> None:
    """MoE layers with quantized experts and ``moe_impl="auto"`` use a per-expert dispatch: it
    dequantises only the experts that received tokens (2 of 8 when decoding one token), where the
    ``grouped`` path would dequantise the whole stack every call. ``QuantExperts`` get
    :func:`~tinyseek.quant.modules.quant_fused_dispatch` (``QUANT_DISPATCH``, registered in the MoE
    dispatch table when ``tinyseek.quant.modules`` is imported: one fused kernel call at decode,
    ``sorted`` otherwise), ``QATExperts`` get ``sorted``. Same maths either way. Decided from the
    configured ``moe_impl``, so it runs again after :func:`~tinyseek.quant.qat.convert_qat` swaps
    QAT experts (``sorted``) for quantized ones. W8A8 experts (``fmt.act_bits``) take these whatever
    ``moe_impl`` says: the stacked dispatches multiply the dequantised float stacks (no activation
    quantization)."""
    for m in model.modules():
        act = getattr(getattr(m, "experts", None), "fmt", None) is not None and m.experts.fmt.act_bits
        if isinstance(m, moe_mod.MoE) and (m.impl == "auto" or m.cfg.moe_impl == "auto" or act):
            if isinstance(m.experts, QuantExperts):
                m.impl = QUANT_DISPATCH
            elif type(m.experts).__name__ == "QATExperts":
                m.impl = "sorted"


def prepare_decode(model: nn.Module) -> None:
    """Set a quantized model up for fast decode (after quantizing or loading; idempotent): the
    per-expert MoE dispatch (:func:`prefer_per_expert_dispatch`) and :class:`QuantSwiGLU` for every
    dense FFN / shared expert made of QuantLinear (same children, so the state dict is unchanged)."""
    prefer_per_expert_dispatch(model)
    for name, m in list(model.named_modules()):
        if QuantSwiGLU.fits(m):
            _set_module(model, name, QuantSwiGLU(m))


# ---------------------------------------------------------------------------------------------
# quantize a model
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def quantize_model(model: nn.Module, spec: QuantSpec, calib_batches: Iterable[torch.Tensor] | None = None,
                   max_rows: int = 2048) -> dict:
    """Replace the target modules of ``model`` in place; returns a report
    ``{"modules": {name: kind}, "smoothed": n, "err": mean rel. output error, "err_rtn": same without smoothing}``.

    ``calib_batches`` (token ids) are needed for ``search="awq"``; without them the search is skipped.
    """
    spec.validate()
    fmt, gs = spec.format, spec.eff_group_size
    tied = check_tied(model, spec.lm_head, spec.embed)
    linears, experts = quant_targets(model, spec.lm_head)
    if tied:
        linears = [n for n in linears if n != "lm_head"]  # quantized once, as the embedding
    use_data = spec.search == "awq" and calib_batches is not None
    inputs = collect_inputs(model, calib_batches, linears, experts, max_rows) if use_data else {}
    kinds, errs, errs_rtn, smoothed = {}, [], [], 0

    def smoothing(key: str, w_NK: torch.Tensor) -> torch.Tensor | None:
        nonlocal smoothed
        x = inputs.get(key)
        if x is None or x.shape[0] < 8:
            return None
        _, s, info = search_smoothing(w_NK, x, activation_range(x, spec.calibration, spec.percentile), fmt, gs)
        errs.append(info["err"])
        errs_rtn.append(info["err_rtn"])
        smoothed += s is not None
        return s

    for name in linears:
        lin = model.get_submodule(name)
        s = smoothing(name, lin.weight)
        _set_module(model, name, QuantLinear.from_float(lin.weight, fmt, gs, smooth_K=s, bias_N=lin.bias))
        kinds[name] = "linear_smooth" if s is not None else "linear"
    for name in experts:
        ex = model.get_submodule(name)
        sm = None
        if use_data:
            sm = {"gate_up": torch.ones(ex.n_experts, ex.w_gate_up.shape[1], device=ex.w_gate_up.device),
                  "down": torch.ones(ex.n_experts, ex.hidden, device=ex.w_gate_up.device)}
            any_s = False
            for part, w in (("gate_up", ex.w_gate_up), ("down", ex.w_down)):
                for e in range(ex.n_experts):
                    s = smoothing(f"{name}/{part}/{e}", w[e].t())
                    if s is not None:
                        sm[part][e], any_s = s, True
            sm = sm if any_s else None  # no expert gained: store no scale vectors
        _set_module(model, name, QuantExperts.from_float(ex.w_gate_up, ex.w_down, fmt, gs, smooth=sm))
        kinds[name] = "experts_smooth" if sm is not None else "experts"
    if spec.embed:
        model.embed = QuantEmbedding.from_float(model.embed.weight, fmt, gs)
        kinds["embed"] = "embedding"
        if tied:
            model.lm_head = QuantLinear(model.embed.embedding_dim, model.embed.num_embeddings, fmt, gs,
                                        device=model.embed.qweight.device)
            tie_quantized_head(model)
            kinds["lm_head"] = "linear_tied"
    prepare_decode(model)
    mean = lambda v: sum(v) / len(v) if v else float("nan")  # noqa: E731
    return {"modules": kinds, "smoothed": smoothed, "err": mean(errs), "err_rtn": mean(errs_rtn)}


# ---------------------------------------------------------------------------------------------
# sizes
# ---------------------------------------------------------------------------------------------
def weight_bytes(model: nn.Module) -> dict[str, int]:
    """Bytes held by the model's tensors: ``{"total", "quantized", "float"}`` where ``quantized`` is
    everything inside QuantLinear/QuantExperts (codes + scales) and tied tensors count once."""
    seen, out = set(), {"total": 0, "quantized": 0, "float": 0}
    qnames = {n for n, m in model.named_modules() if isinstance(m, (QuantLinear, QuantExperts, QuantEmbedding))}
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        key = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
        if key in seen or name.endswith(("rotary.cos", "rotary.sin")):
            continue  # RoPE tables are derived, not weights
        seen.add(key)
        nb = t.numel() * t.element_size()
        out["total"] += nb
        out["quantized" if name.rpartition(".")[0] in qnames else "float"] += nb
    return out


# ---------------------------------------------------------------------------------------------
# save / load
# ---------------------------------------------------------------------------------------------
def quant_config(model: nn.Module, spec: QuantSpec, kinds: dict[str, str]) -> dict:
    return {"format": FORMAT, "format_version": FORMAT_VERSION, "method": spec.method, "bits": spec.bits,
            "group_size": spec.eff_group_size, "scale_dtype": "float16", "calibration": spec.calibration,
            "percentile": spec.percentile, "search": spec.search, "lm_head": spec.lm_head,
            "embed": "embed" in kinds, "model_config": to_dict(model.cfg), "modules": dict(sorted(kinds.items()))}


def save_quantized(model: nn.Module, out_dir: str | Path, qcfg: dict, meta: dict | None = None) -> Path:
    """Write the quantized checkpoint directory atomically; returns its path."""
    meta = dict(meta or {})
    meta["model_config"] = qcfg["model_config"]
    meta["quant"] = {k: v for k, v in qcfg.items() if k not in ("model_config", "modules")}
    out = Path(out_dir)
    with atomic_dir(out) as tmp:
        save_weights(model.state_dict(), tmp / "model.safetensors")
        (tmp / "quant_config.json").write_text(json.dumps(qcfg, indent=2) + "\n")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True, default=str) + "\n")
        write_checksums(tmp)  # verified by load_weights when the checkpoint is loaded
    return out


def _check_config(qcfg: dict, path: Path, expect: dict | None):
    def bad(msg: str):
        raise UserError(f"quantized checkpoint {path}: {msg}")

    if not isinstance(qcfg, dict) or qcfg.get("format") != FORMAT:
        bad(f"quant_config.json is not a {FORMAT} config")
    version = qcfg.get("format_version")
    if version not in READ_VERSIONS:
        bad(f"format version {version!r} is not supported (this tinyseek reads "
            f"{', '.join(map(str, READ_VERSIONS))}; re-run tinyseek quantize on the float checkpoint)")
    if version >= 2 and qcfg.get("scale_dtype") != "float16":
        bad(f"scale_dtype {qcfg.get('scale_dtype')!r} is not supported (format {version} stores float16 scales)")
    method = qcfg.get("method")
    fmt = FORMATS.get(method) if isinstance(method, str) else None
    if fmt is None:
        bad(f"unknown method {method!r} (expected {' or '.join(FORMATS)})")
    if qcfg.get("bits") != fmt.bits:
        bad(f"bits {qcfg.get('bits')!r} do not match method {method} ({fmt.bits} bits)")
    gs = qcfg.get("group_size")
    if not fmt.valid_group(gs):
        bad(f"group size {gs!r} is invalid for {method}")
    for k, v in (expect or {}).items():
        if qcfg.get(k) != v:
            bad(f"{k} is {qcfg.get(k)!r} but {v!r} was expected")
    try:
        mcfg = from_dict(ModelConfig, qcfg["model_config"]).validate()
    except (KeyError, TypeError, UserError) as e:
        bad(f"bad model_config ({str(e).splitlines()[0] if str(e) else type(e).__name__})")
    if not isinstance(qcfg.get("modules"), dict):
        bad("missing the 'modules' table")
    for name, kind in qcfg["modules"].items():
        if kind not in MODULE_KINDS[version]:
            bad(f"module {name!r} has kind {kind!r}, unknown to format version {version}")
    mods = qcfg["modules"]
    if version >= 2 and qcfg.get("embed") != ("embed" in mods):
        bad(f"embed is {qcfg.get('embed')!r} but the modules table {'has' if 'embed' in mods else 'lacks'} 'embed'")
    if (mods.get("lm_head") == "linear_tied") != (mcfg.tie_embeddings and "embed" in mods and "lm_head" in mods):
        bad("lm_head kind 'linear_tied' must go with tie_embeddings and a quantized embedding")
    return mcfg


def build_quantized_skeleton(mcfg, qcfg: dict) -> nn.Module:
    """A ``Transformer`` with empty quantized modules where ``qcfg["modules"]`` says (``qcfg`` checked
    by :func:`_check_config`)."""
    fmt, gs = FORMATS[qcfg["method"]], qcfg["group_size"]
    sdt = fmt.scale_dtype(qcfg.get("format_version"))  # format 1 stored int8 scales in fp32
    model = Transformer(mcfg)
    mods = dict(model.named_modules())
    for name, kind in qcfg["modules"].items():
        old = mods.get(name)
        if kind in ("linear", "linear_smooth", "linear_tied") and isinstance(old, nn.Linear):
            new = QuantLinear(old.in_features, old.out_features, fmt, gs, smooth=kind == "linear_smooth",
                              scale_dtype=sdt, bias=old.bias is not None)
        elif kind in ("experts", "experts_smooth") and old is not None and hasattr(old, "w_gate_up"):
            new = QuantExperts(old.n_experts, old.w_gate_up.shape[1], old.hidden, fmt, gs,
                               smooth=kind == "experts_smooth", scale_dtype=sdt)
        elif kind == "embedding" and isinstance(old, nn.Embedding):
            new = QuantEmbedding(old.num_embeddings, old.embedding_dim, fmt, gs)
        else:
            raise UserError(f"quant_config.json names module {name!r} ({kind}) that this model config does not have")
        _set_module(model, name, new)
    if qcfg["modules"].get("lm_head") == "linear_tied":
        tie_quantized_head(model)
    return model


def load_quantized(path: str | Path, device: str | torch.device = "cpu", expect: dict | None = None):
    """Load a quantized checkpoint directory; returns ``(model, meta)`` (model in eval mode).

    ``expect`` (optional) maps config keys (``method``, ``group_size``, ``bits`` ...) to required
    values; any difference, or a tensor that does not fit the config, raises ``UserError``.
    """
    p = Path(path)
    cfg_path, w_path = p / "quant_config.json", p / "model.safetensors"
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{p} is not a quantized checkpoint (needs quant_config.json and model.safetensors)")
    try:
        qcfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"quantized checkpoint {p}: quant_config.json is not valid JSON ({e.msg})") from None
    mcfg = _check_config(qcfg, p, expect)
    meta = json.loads((p / "meta.json").read_text()) if (p / "meta.json").is_file() else {}
    if "model_config" in meta and meta["model_config"] != qcfg["model_config"]:
        raise UserError(f"quantized checkpoint {p}: meta.json and quant_config.json disagree on the model config")
    model = build_quantized_skeleton(mcfg, qcfg)
    state = load_weights(w_path)
    want = model.state_dict()
    missing = sorted(set(want) - set(state))
    extra = sorted(set(state) - set(want))
    if missing or extra:
        what = f"missing tensor {missing[0]}" if missing else f"unexpected tensor {extra[0]}"
        raise UserError(f"quantized checkpoint {p}: {what} for its quant_config.json "
                        f"({qcfg['method']}, group {qcfg['group_size']})")
    for k, t in want.items():
        if state[k].dtype != t.dtype or state[k].shape != t.shape:
            raise UserError(f"quantized checkpoint {p}: tensor {k} is {state[k].dtype} {tuple(state[k].shape)} but "
                            f"{qcfg['method']} group {qcfg['group_size']} needs {t.dtype} {tuple(t.shape)}")
    model.load_state_dict(state, strict=True)
    prepare_decode(model)
    model.to(device).eval()
    meta.setdefault("quant", {k: v for k, v in qcfg.items() if k not in ("model_config", "modules")})
    return model, meta


def spec_dict(spec: QuantSpec) -> dict:
    return asdict(spec)


def _is_quantized(d: Path) -> bool:
    return (d / "quant_config.json").is_file()


# train/checkpoint.load_model (and tinyseek.quant.load.load_model) hand a quantized directory here
register_format(CheckpointFormat(FORMAT, _is_quantized, lambda d, device, chain: load_quantized(d, device)))
