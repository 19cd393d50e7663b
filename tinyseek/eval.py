"""``tinyseek eval``: pass@1 (greedy) and pass@k on held-out problems, format rate, response length.

Held-out means problems from the tasks' ``eval`` split (a hash of the prompt text puts 1 in 4
problem texts there; training stages draw only from the ``train`` split, so no prompt is shared,
even for tiny problem spaces) with seeds from ``EVAL_SEED_BASE + seed``
(:func:`tinyseek.post.heldout.heldout_problems`, the set GRPO's periodic eval uses too).

pass@k uses the unbiased estimator of Chen et al. (2021) from ``n_samples >= k`` samples per
problem at ``temperature``: ``1 - C(n - c, k) / C(n, k)`` averaged over problems, ``c`` correct.
Correctness is :func:`tinyseek.post.rewards.is_correct` (countdown answers are verified).
The tokenizer is found as ``serve`` finds it (:func:`tinyseek.serve.loading.find_tokenizer`); none
found is the same one-line error as ``serve``'s (``--tokenizer bytes`` asks for the byte tokenizer).
The JSON result goes to stdout and to ``--out`` (default ``<run dir>/eval.json``) atomically.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from tinyseek.common import atomic_write_json, get_device, seed_everything
from tinyseek.config import ConfigError
from tinyseek.post.common import decode, find_run_dir, prompt_ids
from tinyseek.post.heldout import greedy_scores, heldout_problems
from tinyseek.post.rewards import is_correct
from tinyseek.post.rollout import sample
from tinyseek.serve.loading import check_ckpt, load_tokenizer_for
from tinyseek.quant.load import load_model


@dataclass
class Config:
    ckpt: str = ""                 # checkpoint to evaluate (step dir / ckpt root / run dir)
    tokenizer: str = ""            # tokenizer dir ("bytes" = byte-level); "" = the one beside the checkpoint (as serve finds it)
    tasks: str = "arithmetic"      # comma-separated tasks
    difficulty: int = 1            # task difficulty (0 = the task's own mix)
    n_problems: int = 100          # held-out problems
    k: int = 8                     # pass@k
    n_samples: int = 8             # samples per problem for pass@k (>= k); 0 = skip pass@k
    temperature: float = 1.0       # sampling temperature for pass@k
    top_p: float = 1.0             # nucleus sampling for pass@k
    max_new_tokens: int = 64       # generation budget per answer
    seed: int = 0                  # held-out set index (problems use EVAL_SEED_BASE + seed)
    device: str = "auto"           # auto / cpu / cuda
    out: str = ""                  # JSON output path; "" = <run dir>/eval.json

    def validate(self) -> "Config":
        if not self.ckpt:
            raise ConfigError("eval needs --ckpt PATH (a checkpoint or run dir)")
        if self.n_problems <= 0 or self.k <= 0:
            raise ConfigError("n_problems and k must be > 0")
        if self.n_samples and self.n_samples < self.k:
            raise ConfigError(f"n_samples ({self.n_samples}) must be >= k ({self.k}) (or 0 to skip pass@k)")
        if self.max_new_tokens <= 0:
            raise ConfigError("max_new_tokens must be > 0")
        return self


def preset(name: str) -> Config:
    presets = {"quick": lambda: Config(n_problems=50, n_samples=4, k=4), "default": Config}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples with ``c`` correct.

    >>> pass_at_k(8, 0, 1), pass_at_k(8, 8, 8), pass_at_k(4, 1, 1), round(pass_at_k(4, 1, 2), 4)
    (0.0, 1.0, 0.25, 0.5)
    """
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


@torch.no_grad()
def evaluate(model, tok, problems, *, k: int = 8, n_samples: int = 8, temperature: float = 1.0,
             top_p: float = 1.0, max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy pass@1, format rate, mean length and truncation rate of the greedy answers
    (:func:`tinyseek.post.heldout.greedy_scores`, the numbers GRPO logs as ``eval_*``), plus sampled
    pass@k and accuracy from ``n_samples`` samples per problem when ``n_samples > 0``."""
    res = greedy_scores(model, tok, problems, max_new_tokens=max_new_tokens, seed=seed)
    if n_samples:
        prompts = [prompt_ids(tok, p.prompt) for p in problems]
        rep = [p for p in prompts for _ in range(n_samples)]
        samples = sample(model, rep, eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=max_new_tokens, temperature=temperature,
                         top_p=top_p, seed=seed + 1)
        scores = []
        correct_sampled = 0
        for i, p in enumerate(problems):
            c = sum(is_correct(decode(tok, s.tokens), p.answer, p.meta)
                    for s in samples[i * n_samples:(i + 1) * n_samples])
            correct_sampled += c
            scores.append(pass_at_k(n_samples, c, k))
        res[f"pass@{k}"] = sum(scores) / len(scores)
        res["sampled_accuracy"] = correct_sampled / (n_samples * len(problems))
        res["n_samples"] = n_samples
        res["temperature"] = temperature
    return res


def main(cfg: Config) -> dict:
    cfg.validate()
    check_ckpt(cfg.ckpt)
    seed_everything(cfg.seed)
    model, meta = load_model(cfg.ckpt, device=str(get_device(cfg.device)))  # in eval mode
    # the tokenizer `serve` would use: no tokenizer found is an error there and here, never bytes
    tok = load_tokenizer_for(cfg.ckpt, cfg.tokenizer, meta)
    probs = heldout_problems(cfg.tasks, cfg.n_problems, cfg.seed, cfg.difficulty or None)
    res = evaluate(model, tok, probs, k=cfg.k, n_samples=cfg.n_samples, temperature=cfg.temperature,
                   top_p=cfg.top_p, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    res.update({"ckpt": cfg.ckpt, "tasks": cfg.tasks, "difficulty": cfg.difficulty, "seed": cfg.seed})
    out = Path(cfg.out) if cfg.out else (find_run_dir(cfg.ckpt) or Path(cfg.ckpt)) / "eval.json"
    atomic_write_json(out, res)
    print(json.dumps(res, indent=2, sort_keys=True))
    return res
