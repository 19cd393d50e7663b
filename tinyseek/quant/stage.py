"""``tinyseek quantize``: checkpoint -> int8 / int4 weight-only or W8A8 checkpoint (optionally QAT first).

Steps: load the checkpoint (``tinyseek.train.checkpoint.load_model``); read calibration batches
from a token shard folder (``calib_data``; empty = ``<run>/data/train`` beside the checkpoint if it
exists, else no calibration data); optionally ``qat_steps`` of fake-quant fine-tuning on those
batches; quantize (round-to-nearest by default; ``search=awq`` runs the AWQ-style scale search with
the chosen calibrator: on the cpu-tiny benchmark it lowered the calibration-set error ~10% but
did not move held-out perplexity, so it is not the default); write ``out`` atomically (``model.safetensors`` + ``quant_config.json`` +
``meta.json``, plus any extra files of the source step such as a tokenizer); report sizes and,
with ``eval_batches``, held-out perplexity before/after.
"""
from __future__ import annotations

import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyseek.common import print0, seed_everything
from tinyseek.config import ConfigError
from tinyseek.data.loader import ShardLoader
from tinyseek.data.shards import read_index
from tinyseek.errors import UserError
from tinyseek.quant.qat import convert_qat, iter_batches, prepare_qat, qat_finetune
from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized, weight_bytes
from tinyseek.train.checkpoint import load_model, resolve_checkpoint


@dataclass
class Config:
    ckpt: str = ""                 # checkpoint to quantize: a step dir, a ckpt root or a run dir (latest step)
    out: str = ""                  # output dir; "" -> <run>/quant/<method>[-g<group>]
    method: str = "int8"           # "int8" (W8A16 per-channel), "int4" (W4A16 group-wise, packed) or "w8a8" (int8 weights, per-token uint8 activations)
    group_size: int = 128          # int4 group: 32, 64 or 128
    calibration: str = "minmax"    # with search=awq: activation range per input channel, "minmax", "percentile", "kl"
    percentile: float = 99.9       # for calibration=percentile
    search: str = "none"           # "none" (round-to-nearest, the measured default) or "awq" (scale search on calib data)
    lm_head: bool = True           # quantize the output head too
    embed: bool = True             # quantize the token embedding too (rows dequantised on lookup)
    calib_data: str = ""           # token shard folder; "" -> <run>/data/train beside the checkpoint, if any
    calib_batches: int = 8         # calibration batches
    calib_batch_size: int = 8      # sequences per calibration batch
    calib_seq_len: int = 128       # tokens per calibration sequence (capped at model.max_seq_len)
    max_rows: int = 2048           # input rows kept per matrix for the search
    qat_steps: int = 0             # > 0: fake-quant fine-tune this many steps on the calibration data first
    qat_lr: float = 1e-4           # QAT learning rate
    eval_batches: int = 0          # > 0: held-out perplexity of float and quantized model on this many batches
    device: str = "cpu"            # where to quantize ("cpu" or "cuda")
    seed: int = 0                  # row sampling / QAT data order

    def spec(self) -> QuantSpec:
        return QuantSpec(self.method, self.group_size, self.calibration, self.percentile, self.search, self.lm_head,
                         self.embed)

    def validate(self) -> "Config":
        if not self.ckpt:
            raise ConfigError("--ckpt is required (a checkpoint step dir, ckpt root or run dir)")
        self.spec().validate()
        for k in ("calib_batches", "calib_batch_size", "calib_seq_len", "max_rows"):
            if getattr(self, k) < 1:
                raise ConfigError(f"{k} must be >= 1, got {getattr(self, k)}")
        for k in ("qat_steps", "eval_batches"):
            if getattr(self, k) < 0:
                raise ConfigError(f"{k} must be >= 0, got {getattr(self, k)}")
        if self.qat_lr <= 0:
            raise ConfigError(f"qat_lr must be > 0, got {self.qat_lr}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ConfigError(f"device must be cpu or cuda, got {self.device!r}")
        return self


def preset(name: str) -> Config:
    """``int8`` (W8A16), ``int4`` (W4A16 group 128), ``int4-g32`` (group 32), ``int4-qat``, ``int4-awq``,
    ``w8a8`` (int8 weights, dynamic per-token uint8 activations), ``w8a8-qat``."""
    presets = {
        "int8": Config(method="int8"),
        "int4": Config(method="int4", group_size=128),
        "int4-g32": Config(method="int4", group_size=32),
        "int4-qat": Config(method="int4", group_size=32, qat_steps=100),
        "int4-awq": Config(method="int4", group_size=128, search="awq", calibration="kl"),
        "w8a8": Config(method="w8a8"),
        "w8a8-qat": Config(method="w8a8", qat_steps=100),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]


def _step_dir(ckpt: str) -> Path:
    p = Path(ckpt)
    return p if (p / "quant_config.json").is_file() else resolve_checkpoint(p)


def find_calib_data(cfg: Config, step: Path) -> Path | None:
    if cfg.calib_data:
        read_index(cfg.calib_data)  # clear error if it is not a shard folder
        return Path(cfg.calib_data)
    for cand in (step.parent.parent / "data" / "train", step.parent / "data" / "train"):
        if (cand / "index.json").is_file():
            return cand
    return None


def held_out_path(train: Path) -> Path | None:
    for cand in (train.parent / "val", train / "val"):
        if (cand / "index.json").is_file():
            return cand
    return None


@torch.no_grad()
def perplexity(model, batches) -> float:
    model.eval()
    tot = [float(model(x, y).ce_loss) for x, y in batches]
    return math.exp(sum(tot) / len(tot))


def load_batches(path: Path, n: int, B: int, T: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader = ShardLoader(path, B, T, 0, 1, device)
    return [loader.next_batch() for _ in range(n)]


def main(cfg: Config) -> dict:
    cfg.validate()
    seed_everything(cfg.seed)
    t0 = time.time()
    step = _step_dir(cfg.ckpt)
    if (step / "quant_config.json").is_file():
        raise UserError(f"{step} is already quantized; quantize the float checkpoint instead")
    model, meta = load_model(step, device=cfg.device)
    mc = model.cfg
    data = find_calib_data(cfg, step)
    T = min(cfg.calib_seq_len, mc.max_seq_len)
    calib = load_batches(data, cfg.calib_batches, cfg.calib_batch_size, T, cfg.device) if data else None
    if calib is None:
        print0("quantize: no calibration data found (set --calib-data): round-to-nearest, no QAT")
    for x, _ in calib or []:
        if int(x.max()) >= mc.vocab_size:
            raise UserError(f"calibration data {data} has token id {int(x.max())} >= model vocab {mc.vocab_size}")
    val = None
    if cfg.eval_batches and data is not None:
        vp = held_out_path(data) or data
        val = load_batches(vp, cfg.eval_batches, cfg.calib_batch_size, T, cfg.device)
    ppl_float = perplexity(model, val) if val else None
    before = weight_bytes(model)

    spec = cfg.spec()
    qat_losses = []
    if cfg.qat_steps > 0 and calib is not None:
        prepare_qat(model, spec.method, spec.group_size, spec.lm_head, spec.embed)
        qat_losses = qat_finetune(model, iter_batches(calib), cfg.qat_steps, cfg.qat_lr)
        kinds = convert_qat(model)
        report = {"smoothed": 0, "err": float("nan"), "err_rtn": float("nan")}
        spec.search = "none"  # QAT weights are converted with plain min-max scales
    else:
        report = quantize_model(model, spec, [x for x, _ in calib] if calib else None, cfg.max_rows)
        kinds = report["modules"]
    after = weight_bytes(model)
    ppl_quant = perplexity(model, val) if val else None

    out = Path(cfg.out) if cfg.out else step.parent.parent / "quant" / (
        spec.method + (f"-g{spec.group_size}" if spec.format.grouped else "") + ("-qat" if qat_losses else ""))
    qcfg = quant_config(model, spec, kinds)
    qcfg["source"] = str(step)
    qcfg["qat_steps"] = len(qat_losses)
    save_quantized(model, out, qcfg, meta)
    for f in step.iterdir():  # carry tokenizer and other side files along
        if f.is_file() and not (out / f.name).exists() \
                and f.name not in ("model.safetensors", "adapter.safetensors", "optim.pt", "rng.pt", "meta.json"):
            shutil.copy2(f, out / f.name)
    src = step / "model.safetensors"  # a LoRA adapter checkpoint has none: the merged float weights' bytes
    src_size = src.stat().st_size if src.is_file() else before["total"]
    out_size = (out / "model.safetensors").stat().st_size
    metrics = {
        "out": str(out), "method": spec.method, "group_size": spec.eff_group_size,
        "calibration": spec.calibration if calib is not None and spec.search == "awq" else "none",
        "file_bytes_float": src_size, "file_bytes_quant": out_size, "file_ratio": src_size / out_size,
        "weight_bytes_float": before["total"], "weight_bytes_quant": after["total"],
        "quantized_part_ratio": (before["total"] - after["float"]) / max(1, after["quantized"]),
        "smoothed_matrices": report["smoothed"], "calib_rel_err": report["err"], "calib_rel_err_rtn": report["err_rtn"],
        "qat_steps": len(qat_losses), "qat_loss_first": qat_losses[0] if qat_losses else None,
        "qat_loss_last": qat_losses[-1] if qat_losses else None,
        "ppl_float": ppl_float, "ppl_quant": ppl_quant, "seconds": round(time.time() - t0, 2),
    }
    print0(f"quantize: {spec.method} -> {out}  file {src_size / 1e6:.2f} MB -> {out_size / 1e6:.2f} MB "
           f"({metrics['file_ratio']:.2f}x, quantized part {metrics['quantized_part_ratio']:.2f}x)"
           + (f"  ppl {ppl_float:.3f} -> {ppl_quant:.3f}" if val else ""))
    return metrics
