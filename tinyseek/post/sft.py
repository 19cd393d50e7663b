"""``tinyseek sft``: supervised fine-tuning with the chat template, loss on response tokens only.

The default data is the R1 "cold start": a few hundred worked solutions from the synthetic task
generators rendered as ``<think>steps</think><answer>answer</answer>`` after
``<|user|>{prompt}<|assistant|>``, ending with ``<|eos|>``. ``--data file.jsonl`` (lines of
``{"prompt": ..., "response": ...}``, e.g. from ``tinyseek rejection``) replaces the generated set.
Prompt tokens get target -100, so only the response (and its eos) is learned.

Starts from ``--init`` (a pretrained checkpoint) or a fresh ``--model`` preset; writes
``runs/<name>/{config.json, metrics.jsonl, tokenizer/, ckpt/step_*/}``. With ``--dp true`` the
update is DP-SGD through Opacus (see :mod:`tinyseek.post.dp`); epsilon is reported. With
``--lora-rank R`` only LoRA adapters on the ``--init`` model train (:mod:`tinyseek.model.lora`) and
the checkpoint holds the adapters; the MoE routers' aux-loss-free biases then stay as the base has them.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro, model_preset
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post.dp import make_private
from tinyseek.post.seqs import pack, sft_targets, token_logprobs


@dataclass
class Config:
    init: str = ""                 # checkpoint to start from (step dir / ckpt root / run dir); "" = fresh model
    model: ModelConfig = field(default_factory=model_micro)  # architecture when init is empty
    tokenizer: str = ""            # tokenizer dir; "" = the one beside init, else the byte tokenizer
    tasks: str = "arithmetic"      # comma-separated task generators for the cold-start set
    difficulty: int = 1            # task difficulty of the generated set (0 = the task's own mix)
    n_examples: int = 400          # generated worked solutions (ignored when data is set)
    data: str = ""                 # JSONL of {"prompt","response"} to train on instead of generated problems
    epochs: int = 3                # passes over the data
    batch_size: int = 16           # sequences per optimizer step
    lr: float = 1e-3               # peak AdamW learning rate (cosine decay to 10%, linear warmup)
    warmup_steps: int = 10         # linear warmup steps
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # global grad-norm clip (0 = off)
    seed: int = 0                  # data and init seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "sft"              # run dir name
    log_every: int = 10            # steps between metric lines
    dp: bool = False               # DP-SGD via Opacus (needs a dense model: model.n_routed_experts 0)
    dp_noise_multiplier: float = 1.0  # DP-SGD Gaussian noise std / clip norm
    dp_max_grad_norm: float = 1.0  # DP-SGD per-sample gradient clip
    dp_delta: float = 1e-5         # delta of the (epsilon, delta) guarantee
    lora_rank: int = 0             # LoRA adapter rank (> 0: base frozen, adapters trained and saved); 0 = off
    lora_alpha: float = 16.0       # LoRA scale numerator: a projection adds (lora_alpha / lora_rank) * B A x
    lora_targets: str = "all-linear"  # nn.Linear names to adapt (q_proj,o_proj,gate_proj,...); all-linear: all but lm_head
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)

    def validate(self) -> "Config":
        C.check_numbers(self, nonneg=("warmup_steps", "weight_decay", "grad_clip", "difficulty"), positive=("log_every",))
        for k in ("n_examples", "epochs", "batch_size"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.lr <= 0:
            raise ConfigError(f"lr must be > 0, got {self.lr}")
        if self.data and not Path(self.data).exists():
            raise ConfigError(f"data file {self.data} does not exist")
        if self.dp and not (self.dp_noise_multiplier >= 0 and self.dp_max_grad_norm > 0 and 0 < self.dp_delta < 1):
            raise ConfigError("dp needs dp_noise_multiplier >= 0, dp_max_grad_norm > 0 and 0 < dp_delta < 1")
        C.task_names(self.tasks)
        C.check_lora(self, self.init, "--init")
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {
        "micro": lambda: Config(),
        "cpu-tiny": lambda: Config(model=model_preset("cpu-tiny"), n_examples=600, epochs=3, lr=1e-3),
        "gpu-small": lambda: Config(model=model_preset("gpu-small"), n_examples=5000, epochs=2, batch_size=64,
                                    lr=3e-4, tasks="arithmetic,countdown,gsm", difficulty=0),
        # cold start of a real pretrained model (tinyseek run --preset smollm2): 25 LoRA steps teach
        # SmolLM2-135M the <think>/<answer> format (format rate 0 -> 1.0)
        "smollm2": lambda: Config(tasks="arithmetic", difficulty=2, n_examples=400, epochs=1, batch_size=16, lr=1e-3,
                                  lora_rank=16, lora_alpha=32.0),
        "smollm2-gpu": lambda: Config(tasks="arithmetic", difficulty=0, n_examples=4000, epochs=2, batch_size=32,
                                      lr=5e-4, lora_rank=32, lora_alpha=64.0),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def load_examples(cfg: Config) -> list[tuple[str, str]]:
    """(prompt, response) pairs: the JSONL file if given, else worked solutions from the tasks."""
    if cfg.data:
        pairs = []
        for i, line in enumerate(Path(cfg.data).read_text().splitlines()):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                pairs.append((d["prompt"], d["response"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UserError(f"{cfg.data}:{i + 1}: expected a JSON object with 'prompt' and 'response'") from None
        if not pairs:
            raise UserError(f"{cfg.data} holds no examples")
        return pairs
    probs = C.make_problems(cfg.tasks, cfg.n_examples, seed=cfg.seed, difficulty=cfg.difficulty or None)
    return [(p.prompt, C.worked_response(p)) for p in probs]


def encode_examples(tok, pairs: list[tuple[str, str]], max_len: int) -> list[tuple[list[int], list[int]]]:
    """Tokenise (prompt ids, response ids + eos); drop pairs longer than ``max_len``."""
    out = []
    for prompt, resp in pairs:
        p, r = C.prompt_ids(tok, prompt), tok.encode(resp) + [tok.eos_id]
        if len(p) + len(r) <= max_len:
            out.append((p, r))
    if not out:
        raise UserError(f"every example is longer than the model's max_seq_len {max_len}")
    return out


def lr_at(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warmup then cosine decay to 10% of peak.

    >>> lr_at(0, 100, 1.0, 10), lr_at(10, 100, 1.0, 10), round(lr_at(100, 100, 1.0, 10), 3)
    (0.1, 1.0, 0.1)
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def _index_batches(n: int, batch_size: int, rng: random.Random, dp_engine=None):
    """Shuffled index batches for one epoch (Opacus' Poisson batches under DP-SGD)."""
    if dp_engine is not None:
        yield from dp_engine.batches()
        return
    order = list(range(n))
    rng.shuffle(order)
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


def main(cfg: Config) -> dict:
    cfg.validate()
    device, run_dir, tok, model = C.start_policy_run(cfg, "sft")
    data = encode_examples(tok, load_examples(cfg), model.cfg.max_seq_len)
    steps_per_epoch = math.ceil(len(data) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    params = C.trainable(model)  # all parameters, or only the LoRA adapters
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    dp_engine = None
    model.train()  # before Opacus, which validates training mode (load_model returns eval mode)
    if cfg.dp:
        model, opt, dp_engine = make_private(model, opt, cfg, n_examples=len(data))
    log = MetricsLogger(run_dir / "metrics.jsonl")
    rng = random.Random(cfg.seed)
    model.train()
    step, t0, last = 0, time.time(), {}
    pad = tok.pad_id
    for epoch in range(cfg.epochs):
        for idx in _index_batches(len(data), cfg.batch_size, rng, dp_engine):
            if not idx:
                continue  # Poisson sampling may draw an empty batch
            # ---- one SFT step ----------------------------------------------------------------
            batch = [data[j] for j in idx]
            ids, mask = pack([b[0] for b in batch], [b[1] for b in batch], pad, device)
            for g in opt.param_groups:
                g["lr"] = lr_at(step, total, cfg.lr, cfg.warmup_steps)
            if dp_engine is None:  # the LM head on response positions only (same loss, less memory)
                lp, out = token_logprobs(model, ids, with_aux=True, mask_BT=mask)
                out.ce_loss = -lp.sum() / mask.sum().clamp(min=1)
                out.loss = out.ce_loss + out.aux_loss
            else:  # Opacus' per-sample gradients need the batch axis through every layer
                out = model(ids[:, :-1], sft_targets(ids, mask))
            loss = out.loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if out.expert_counts is not None and not cfg.lora_rank:  # LoRA: the base (router biases too) is frozen
                model.update_expert_bias(out.expert_counts.detach())
            gnorm = (torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                     if cfg.grad_clip > 0 and dp_engine is None else torch.tensor(0.0))  # DP clips per sample
            opt.step()
            step += 1
            # ---- every log_every steps -----------------------------------------------------------
            if step % cfg.log_every == 0 or step == total:
                last = {"loss": float(out.ce_loss.detach()), "grad_norm": float(gnorm), "lr": opt.param_groups[0]["lr"],
                        "epoch": epoch, "elapsed_s": round(time.time() - t0, 2)}
                if dp_engine is not None:
                    last["dp_epsilon"] = dp_engine.epsilon(cfg.dp_delta)
                log.log(step, **last)
                last["step"] = step
                print0(f"sft step {step}/{total} loss {last['loss']:.4f} lr {last['lr']:.2e}")
    if step == 0:
        raise UserError("no SFT step was taken (empty data?)")
    if last.get("step") != step:  # make sure the final step is logged (Poisson batches vary the count)
        last = {"loss": float(out.ce_loss.detach()), "lr": opt.param_groups[0]["lr"], "epoch": epoch,
                "elapsed_s": round(time.time() - t0, 2)}
        if dp_engine is not None:
            last["dp_epsilon"] = dp_engine.epsilon(cfg.dp_delta)
        log.log(step, **last)
    base = model._module if hasattr(model, "_module") else model
    ckpt = C.save(run_dir, step, base, opt if dp_engine is None else None,
                  {"stage": "sft", "step": step, "n_examples": len(data)})
    res = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "steps": step, "n_examples": len(data),
           "final_loss": last.get("loss"), "elapsed_s": round(time.time() - t0, 2)}
    if dp_engine is not None:
        res["dp_epsilon"] = dp_engine.epsilon(cfg.dp_delta)
        res["dp_delta"] = cfg.dp_delta
    atomic_write_json(run_dir / "result.json", res)
    return res
