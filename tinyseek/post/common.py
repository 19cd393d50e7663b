"""Glue shared by the post-training stages: policy/tokenizer loading, problems, prompts, checkpoints.

Conventions:
- ``init`` names a checkpoint (a step dir, a ``ckpt`` root or a run dir; see
  ``tinyseek.train.checkpoint.load_model``); empty means a fresh model from the stage's ``model``
  config (used by tests and by from-scratch experiments).
- The tokenizer comes from ``tokenizer`` if set (a path, or ``bytes``), else the checkpoint's own,
  found as serve and eval find it (:func:`tinyseek.serve.loading.find_tokenizer`; none is the same
  one-line error); a fresh model (no ``init``) uses the byte-level tokenizer. Every stage copies it
  into its own run dir so a run dir is self-contained.
- LoRA (``lora_rank > 0`` in a stage's config, :mod:`tinyseek.model.lora`): the policy loaded
  from ``init`` is the frozen base, adapters wrap the target projections, the optimizer gets only
  the adapters (``trainable``), and :func:`save` writes adapter checkpoints (``adapter.safetensors``
  + the base's absolute path in ``meta.json``), which ``load_model`` merges back into a plain model.
- A worked solution is rendered as ``<think>{solution}</think><answer>{answer}</answer>``.
- Training problems come from the tasks' ``train`` split, held-out ones from the ``eval`` split (a
  hash of the prompt text decides, see :mod:`tinyseek.tasks`), and eval seeds start at
  ``EVAL_SEED_BASE``, a range training never draws from.
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import torch

from tinyseek.common import atomic_write_json, get_device, move_aside, print0, seed_everything
from tinyseek.config import ConfigError, ModelConfig, check_finite, to_dict
from tinyseek.errors import UserError
from tinyseek.model.lora import BaseView, apply_lora, check_options, has_lora, lora_state_dict
from tinyseek.model.lora import trainable_parameters as trainable  # all of a plain model, a LoRA model's adapters
from tinyseek.model.transformer import Transformer
from tinyseek.quant.load import load_model
from tinyseek.serve.loading import load_tokenizer_for as serve_tokenizer_for
from tinyseek.tasks import format_solution, get_task
from tinyseek.tokenizer import byte_tokenizer, load_tokenizer
from tinyseek.train.checkpoint import read_meta, resolve_checkpoint, save_checkpoint

EVAL_SEED_BASE = 10_000_019  # eval problem seeds live at and above this; training seeds stay far below


def find_run_dir(path: str | Path) -> Path | None:
    """The run dir that holds a checkpoint path (step dir -> ckpt root -> run dir)."""
    p = Path(path).resolve()
    for cand in (p, p.parent, p.parent.parent):
        if (cand / "tokenizer").exists() or (cand / "config.json").exists():
            return cand
    return None


def load_tokenizer_for(init: str, tokenizer: str = ""):
    """``tokenizer`` (a path or ``bytes``) when set; else the tokenizer of checkpoint ``init`` (as
    serve and eval find it: an error, not a silent byte fallback, when it has none); else (a fresh
    model) the byte tokenizer."""
    if not init:
        if tokenizer and tokenizer != "bytes" and not Path(tokenizer).exists():
            raise UserError(f"tokenizer path {tokenizer} does not exist")
        return load_tokenizer(tokenizer) if tokenizer else byte_tokenizer()
    try:
        meta = read_meta(resolve_checkpoint(init))
    except (UserError, OSError, ValueError):
        meta = None  # loading the policy reports a bad checkpoint in its own words
    return serve_tokenizer_for(init, tokenizer, meta)


def save_tokenizer(tok, run_dir: Path) -> None:
    dst = Path(run_dir) / "tokenizer"
    if dst.exists():
        shutil.rmtree(dst)
    tok.save(dst)


def load_policy(init: str, model_cfg: ModelConfig, vocab_size: int, device: torch.device, lora: Any = None):
    """(model, meta): from ``init`` if given, else a fresh ``Transformer(model_cfg)`` sized to the vocab.
    ``lora``: a stage config whose ``lora_*`` fields put adapters on the loaded model (:func:`attach_lora`)."""
    if init:
        if not Path(init).exists():
            raise UserError(f"checkpoint {init} does not exist")
        model, meta = load_model(init, device=str(device))
        grew = model.cfg.vocab_size < vocab_size
        if grew:
            resize_vocab(model, vocab_size)
        if lora is not None:
            attach_lora(lora, model, init, vocab_grew=grew)
        return model.to(device), meta
    if lora is not None:
        attach_lora(lora, None, init)
    cfg = ModelConfig(**{**model_cfg.__dict__})
    cfg.vocab_size = max(cfg.vocab_size, vocab_size)
    return Transformer(cfg).to(device), {}


@torch.no_grad()
def resize_vocab(model, vocab_size: int) -> None:
    """Grow the embedding and LM head to ``vocab_size`` rows (new rows ~ N(0, init_std)).

    Needed when a byte-level pretrain (bytes + eos = 257 ids) is fine-tuned with the chat tokenizer,
    whose special tokens (``<|user|>``, ``<think>``, ...) come after: their embeddings start random
    and are learned in SFT, as when special tokens are added to any pretrained model.
    """
    old = model.cfg.vocab_size
    if vocab_size <= old:
        return
    std = model.cfg.init_std
    emb = model.embed.weight
    new_emb = torch.nn.Parameter(torch.cat([emb, emb.new_empty(vocab_size - old, emb.shape[1]).normal_(0, std)]))
    model.embed.weight = new_emb
    model.embed.num_embeddings = vocab_size
    if model.cfg.tie_embeddings:
        model.lm_head.weight = new_emb
    else:
        w = model.lm_head.weight
        model.lm_head.weight = torch.nn.Parameter(torch.cat([w, w.new_empty(vocab_size - old, w.shape[1]).normal_(0, std)]))
    model.lm_head.out_features = vocab_size
    model.cfg.vocab_size = vocab_size


def save(run_dir: Path, step: int, model, optimizer, meta: dict) -> Path:
    """``run_dir/ckpt/step_*``: the full model, or for a LoRA model its adapters only (see above)."""
    meta = {**meta, "model_config": to_dict(model.cfg)}
    if has_lora(model):
        info = model.lora_info
        meta.update(lora={k: info[k] for k in ("rank", "alpha", "targets", "dropout")}, base=info["base"])
        return save_checkpoint(Path(run_dir) / "ckpt", step, None, optimizer, meta,
                               model_state=lora_state_dict(model), weights_file="adapter.safetensors")
    return save_checkpoint(Path(run_dir) / "ckpt", step, model, optimizer, meta)


def base_checkpoint(init: str) -> str:
    """The absolute path of the step dir (or quantized dir) that ``init`` names: what an adapter
    checkpoint records as its base."""
    p = Path(init)
    return str((p if (p / "quant_config.json").is_file() else resolve_checkpoint(p)).resolve())


def attach_lora(cfg: Any, model, init: str, vocab_grew: bool = False) -> list[str]:
    """With ``cfg.lora_rank > 0``: freeze ``model`` (loaded from checkpoint ``init``) and wrap
    ``cfg.lora_targets`` in adapters (:func:`tinyseek.model.lora.apply_lora`); returns the wrapped
    module paths ([] when LoRA is off). ``vocab_grew``: the embedding was grown for the tokenizer
    (new rows an adapter checkpoint would not keep: refused)."""
    rank = getattr(cfg, "lora_rank", 0)
    if rank <= 0:
        return []
    if not init:
        raise UserError("LoRA needs a base checkpoint to adapt (--init, or --student-init for distill)")
    if vocab_grew:
        raise UserError(f"the tokenizer has more tokens than the base checkpoint {init}'s vocabulary: LoRA "
                        "cannot learn new token embeddings; fine-tune without LoRA first")
    return apply_lora(model, rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout, base=base_checkpoint(init))


def reference_model(model):
    """The frozen reference: for a LoRA model the model itself with its adapters off
    (:class:`tinyseek.model.lora.BaseView`, no second copy), else a frozen copy in eval mode."""
    if has_lora(model):
        return BaseView(model)
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def check_lora(cfg: Any, init: str, init_flag: str = "--init") -> None:
    """The stage configs' ``lora_*`` fields: :class:`ConfigError` for bad values, or LoRA without a base."""
    check_options(cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets, cfg.lora_dropout)
    if cfg.lora_rank > 0 and not init:
        raise ConfigError(f"lora_rank > 0 needs a base checkpoint to adapt ({init_flag} PATH)")


def check_numbers(cfg: Any, nonneg: tuple[str, ...] = (), positive: tuple[str, ...] = ()) -> None:
    """A stage config's numeric fields: every float finite (:func:`tinyseek.config.check_finite`,
    ``--lr inf`` included), the ``nonneg`` ones >= 0 and the ``positive`` ones > 0; else a one-line
    :class:`ConfigError` naming the field."""
    check_finite(cfg)
    for k in nonneg:
        if not getattr(cfg, k) >= 0:
            raise ConfigError(f"{k} must be >= 0, got {getattr(cfg, k)}")
    for k in positive:
        if not getattr(cfg, k) > 0:
            raise ConfigError(f"{k} must be > 0, got {getattr(cfg, k)}")


def fresh_metrics(run_dir: Path, init: str = "") -> None:
    """A stage starting over in ``run_dir``: move an earlier ``metrics.jsonl`` aside (never deleted, never
    appended to: one curve per file), and an earlier ``ckpt/`` too (to ``ckpt.<UTC time>``), so a
    later stage never picks a stale step of a longer earlier run as the latest. ``ckpt/`` stays when
    ``init`` (the checkpoint this run starts from) lies inside it: LoRA adapters record their base's path."""
    run_dir = Path(run_dir)
    moved = move_aside(run_dir / "metrics.jsonl")
    if moved is not None:
        print0(f"note: the earlier metrics.jsonl of {run_dir} was moved to {moved.name}")
    root = run_dir / "ckpt"
    inside = bool(init) and Path(init).exists() and Path(init).resolve().is_relative_to(run_dir.resolve())
    if root.is_dir() and any(root.iterdir()) and not inside:
        moved = move_aside(root)
        print0(f"note: the earlier checkpoints of {run_dir} were moved to {moved.name}")


def task_names(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if not names:
        raise ConfigError("tasks must name at least one task (e.g. arithmetic,countdown)")
    return names


def make_problems(tasks: str, n: int, seed: int, difficulty: int | None = None, split: str = "train") -> list[Any]:
    """``n`` problems spread round-robin over the comma-separated ``tasks``.

    ``split`` is the tasks' train/eval partition of problem texts (``"eval"`` for held-out sets):
    no prompt is ever in both, even for tiny problem spaces.
    """
    names = task_names(tasks)
    per_task = []
    for i, name in enumerate(names):
        k = n // len(names) + (1 if i < n % len(names) else 0)
        per_task.append(get_task(name).generate(k, seed=seed * 7919 + i, difficulty=difficulty, split=split) if k else [])
    # interleave so any prefix of the list mixes the tasks
    return [lst[j] for j in range(max(len(x) for x in per_task)) for lst in per_task if j < len(lst)]


def prompt_ids(tok, prompt: str) -> list[int]:
    return tok.encode_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)  # prompt text stays text


def worked_response(problem) -> str:
    """The target completion for SFT: ``<think>solution</think><answer>answer</answer>``."""
    return format_solution(problem)


def decode(tok, ids: list[int]) -> str:
    return tok.decode(ids, skip_special=False)


def start_policy_run(cfg: Any, stage: str):
    """The shared start of the sft / grpo / dpo stages: seed every RNG, pick the device, load the
    tokenizer and the policy from ``cfg.init`` (fresh ``cfg.model`` when empty), create the run dir
    with ``config.json`` and a copy of the tokenizer; adapters on the policy when ``cfg.lora_rank > 0``.
    Returns ``(device, run_dir, tok, model)``."""
    seed_everything(cfg.seed)
    device = get_device(cfg.device)
    run_dir = Path(cfg.out_dir) / cfg.name
    tok = load_tokenizer_for(cfg.init, cfg.tokenizer)
    model, _ = load_policy(cfg.init, cfg.model, tok.vocab_size, device, lora=cfg)
    run_dir.mkdir(parents=True, exist_ok=True)
    fresh_metrics(run_dir, cfg.init)
    atomic_write_json(run_dir / "config.json", {"stage": stage, **to_dict(cfg)})
    save_tokenizer(tok, run_dir)
    return device, run_dir, tok, model


def load_sampling_model(ckpt: str, tokenizer: str, seed: int, device_name: str, what: str = "checkpoint"):
    """The shared start of the stages that sample from a finished checkpoint (eval, rejection,
    distill's teacher): refuse a missing path in one line, seed every RNG, pick the device, load the
    tokenizer and the model (eval mode). Returns ``(device, tok, model)``."""
    if not Path(ckpt).exists():
        raise UserError(f"{what} {ckpt} does not exist")
    seed_everything(seed)
    device = get_device(device_name)
    tok = load_tokenizer_for(ckpt, tokenizer)
    model, _ = load_model(ckpt, device=str(device))
    return device, tok, model  # load_model returns it in eval mode


def rollout_metrics(samples: list, times: tuple[float, float, float, float]) -> dict[str, float]:
    """The per-step rollout and timing metrics GRPO and PPO log: mean ``response_length`` (tokens),
    ``truncated_rate`` (share of samples that never finished) and, from the step's ``(t0, t1, t2, t3)``
    (start, generated, scored, trained), ``t_generate`` / ``t_score`` / ``t_train`` / ``step_time``."""
    t0, t1, t2, t3 = times
    return {"response_length": sum(len(s.tokens) for s in samples) / len(samples),
            "truncated_rate": sum(not s.finished for s in samples) / len(samples),
            "t_generate": round(t1 - t0, 3), "t_score": round(t2 - t1, 3), "t_train": round(t3 - t2, 3),
            "step_time": round(t3 - t0, 3)}

