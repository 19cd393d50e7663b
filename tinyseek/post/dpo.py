"""``tinyseek dpo``: Direct Preference Optimisation on pairs built from graded samples.

Pairs come from ``--pairs file.jsonl`` (``{"prompt", "chosen", "rejected"}`` lines) or are built
on the fly: sample ``k`` completions per problem from the starting policy, score each with the
reward registry (weights from config), and pair the highest-reward sample (chosen) with the
lowest (rejected) when their rewards differ. The frozen reference is the starting checkpoint (with
``--lora-rank R``: the same model with its adapters switched off, no second copy; only the adapters
train and are saved, see :mod:`tinyseek.model.lora`).
Loss: :func:`tinyseek.post.losses.dpo_loss` on summed response log-probs (the eos included).

Simplifications: one offline round of pairs (no iterative re-sampling); pairs whose rewards tie
are dropped; no length normalisation of log-probs (as in the DPO paper).
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro
from tinyseek.errors import UserError
from tinyseek.model.lora import merged
from tinyseek.post import common as C
from tinyseek.post.losses import dpo_loss
from tinyseek.post.rejection import grade_samples, write_jsonl
from tinyseek.post.rewards import RewardContext, check_weights, total_reward
from tinyseek.post.seqs import pack, sequence_logprob, token_logprobs


@dataclass
class Config:
    init: str = ""                 # starting checkpoint (policy and frozen reference); "" = fresh model (tests)
    model: ModelConfig = field(default_factory=model_micro)  # architecture when init is empty
    tokenizer: str = ""            # tokenizer dir; "" = beside init, else the byte tokenizer
    pairs: str = ""                # JSONL of {"prompt","chosen","rejected"}; "" = build from graded samples
    tasks: str = "arithmetic"      # tasks for built pairs
    difficulty: int = 1            # task difficulty (0 = the task's own mix)
    n_problems: int = 128          # problems sampled to build pairs
    k: int = 8                     # samples per problem
    temperature: float = 1.0       # sampling temperature for pair building
    max_new_tokens: int = 48       # generation budget
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})  # grading weights
    beta: float = 0.1              # DPO temperature
    epochs: int = 2                # passes over the pairs
    batch_size: int = 8            # pairs per step
    lr: float = 5e-5               # AdamW learning rate
    grad_clip: float = 1.0         # grad-norm clip (0 = off)
    seed: int = 2                  # problem / sampling seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "dpo"              # run dir name
    lora_rank: int = 0             # LoRA adapter rank (> 0: base frozen, adapters trained and saved); 0 = off
    lora_alpha: float = 16.0       # LoRA scale numerator: a projection adds (lora_alpha / lora_rank) * B A x
    lora_targets: str = "all-linear"  # nn.Linear names to adapt (q_proj,o_proj,gate_proj,...); all-linear: all but lm_head
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)

    def validate(self) -> "Config":
        C.check_numbers(self, nonneg=("grad_clip", "difficulty"), positive=("temperature",))
        for k in ("n_problems", "k", "epochs", "batch_size", "max_new_tokens"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.k < 2 and not self.pairs:
            raise ConfigError("k must be >= 2 to build chosen/rejected pairs")
        if self.beta <= 0 or self.lr <= 0:
            raise ConfigError("beta and lr must be > 0")
        if self.pairs and not Path(self.pairs).exists():
            raise ConfigError(f"pairs file {self.pairs} does not exist")
        try:
            check_weights(self.rewards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        C.check_lora(self, self.init, "--init")
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {"micro": Config, "cpu-tiny": lambda: Config(n_problems=256, epochs=2)}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def build_pairs(model, tok, cfg: Config) -> list[dict]:
    """Sample, grade with the reward registry, pair best vs worst per problem when rewards differ."""
    probs = C.make_problems(cfg.tasks, cfg.n_problems, seed=cfg.seed, difficulty=cfg.difficulty or None)
    graded = grade_samples(model, tok, probs, k=cfg.k, temperature=cfg.temperature, top_p=1.0,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    ctx = RewardContext()
    pairs = []
    for p, group in zip(probs, graded):
        scored = sorted(((total_reward(s["text"], p, cfg.rewards, ctx), s) for s in group), key=lambda t: t[0])
        (r_lo, lo), (r_hi, hi) = scored[0], scored[-1]
        if r_hi > r_lo:
            pairs.append({"prompt": p.prompt, "chosen": hi["text"], "rejected": lo["text"],
                          "chosen_reward": r_hi, "rejected_reward": r_lo})
    return pairs


def load_pairs(path: str) -> list[dict]:
    out = []
    for i, line in enumerate(Path(path).read_text().splitlines()):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            out.append({"prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"]})
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UserError(f"{path}:{i + 1}: expected a JSON object with prompt, chosen, rejected") from None
    return out


def pair_logps(model, tok, batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed response log-probs (eos included) of chosen and rejected for each pair."""
    prompts = [C.prompt_ids(tok, b["prompt"]) for b in batch]
    resp = [tok.encode(b[key]) + [tok.eos_id] for key in ("chosen", "rejected") for b in batch]
    ids, mask = pack(prompts + prompts, resp, tok.pad_id, device)
    lp = sequence_logprob(token_logprobs(model, ids), mask)
    n = len(batch)
    return lp[:n], lp[n:]


def main(cfg: Config) -> dict:
    cfg.validate()
    device, run_dir, tok, model = C.start_policy_run(cfg, "dpo")
    with merged(model):  # LoRA: plain projections for sampling (fast decode paths)
        pairs = load_pairs(cfg.pairs) if cfg.pairs else build_pairs(model, tok, cfg)
    if not cfg.pairs:
        write_jsonl(run_dir / "pairs.jsonl", pairs)
    max_len = model.cfg.max_seq_len
    pairs = [p for p in pairs if len(C.prompt_ids(tok, p["prompt"])) + max(len(tok.encode(p["chosen"])),
                                                                         len(tok.encode(p["rejected"]))) + 1 <= max_len]
    if not pairs:
        raise UserError("no preference pairs: every group's samples had equal rewards (or were too long)")
    ref = C.reference_model(model)
    params = C.trainable(model)  # all parameters, or only the LoRA adapters
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.99))
    log = MetricsLogger(run_dir / "metrics.jsonl")
    rng = random.Random(cfg.seed)
    model.train()
    step, t0, hist = 0, time.time(), []
    for epoch in range(cfg.epochs):
        order = list(range(len(pairs)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            # ---- one DPO step ------------------------------------------------------------------
            batch = [pairs[j] for j in order[i:i + cfg.batch_size]]
            with torch.no_grad():
                rc, rr = pair_logps(ref, tok, batch, device)
            pc, pr = pair_logps(model, tok, batch, device)
            loss, margin = dpo_loss(pc, pr, rc, rr, cfg.beta)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            m = {"loss": float(loss.detach()), "margin": float(margin.mean()),
                 "pref_acc": float((margin > 0).float().mean()), "epoch": epoch}
            hist.append(m)
            log.log(step, **m)
        print0(f"dpo epoch {epoch}: loss {hist[-1]['loss']:.4f} margin {hist[-1]['margin']:.3f}")
    ckpt = C.save(run_dir, step, model, opt, {"stage": "dpo", "step": step, "n_pairs": len(pairs)})
    res = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "n_pairs": len(pairs), "steps": step,
           "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"], "elapsed_s": round(time.time() - t0, 2)}
    atomic_write_json(run_dir / "result.json", res)
    return res
