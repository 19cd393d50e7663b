"""``tinyseek rejection``: rejection sampling (the R1 stage-3 loop) -> an SFT dataset.

Sample ``k`` completions per problem from a checkpoint, grade each with the verifier
(:func:`tinyseek.post.rewards.is_correct`) and the format rule, keep the verified-correct,
well-formatted ones (at most ``keep_per_problem`` distinct texts per problem), and write them as
JSONL lines ``{"prompt", "response", "answer", "task"}`` (written to a temp file, then renamed).
``tinyseek sft --data that.jsonl`` trains on it; ``tinyseek distill`` and ``tinyseek dpo`` reuse
:func:`grade_samples`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from tinyseek.common import atomic_write_text, print0
from tinyseek.config import ConfigError
from tinyseek.post import common as C
from tinyseek.post.rewards import format_score, is_correct
from tinyseek.post.rollout import sample


@dataclass
class Config:
    ckpt: str = ""                 # checkpoint to sample from
    tokenizer: str = ""            # tokenizer dir; "" = the one beside the checkpoint
    tasks: str = "arithmetic"      # comma-separated tasks
    difficulty: int = 1            # task difficulty (0 = the task's own mix)
    n_problems: int = 200          # problems to sample
    k: int = 8                     # samples per problem
    keep_per_problem: int = 1      # distinct correct responses kept per problem
    temperature: float = 1.0       # sampling temperature
    top_p: float = 1.0             # nucleus sampling
    max_new_tokens: int = 64       # generation budget
    seed: int = 1                  # problem seed (training range; keep it away from eval seeds)
    device: str = "auto"           # auto / cpu / cuda
    out: str = ""                  # output JSONL; "" = <ckpt run dir>/rejection.jsonl

    def validate(self) -> "Config":
        if not self.ckpt:
            raise ConfigError("rejection needs --ckpt PATH")
        C.check_numbers(self, nonneg=("difficulty",), positive=("max_new_tokens",))
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.n_problems <= 0 or self.k <= 0 or self.keep_per_problem <= 0:
            raise ConfigError("n_problems, k and keep_per_problem must be > 0")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 (sampling), got {self.temperature}")
        C.task_names(self.tasks)
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "large": lambda: Config(n_problems=2000, k=16)}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def grade_samples(model, tok, problems, *, k: int, temperature: float, top_p: float, max_new_tokens: int,
                  seed: int) -> list[list[dict]]:
    """For each problem, ``k`` samples as dicts ``{text, tokens, finished, correct, format}``."""
    prompts = [C.prompt_ids(tok, p.prompt) for p in problems]
    samples = sample(model, [p for p in prompts for _ in range(k)], eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=max_new_tokens,
                     temperature=temperature, top_p=top_p, seed=seed)
    out = []
    for i, p in enumerate(problems):
        group = []
        for s in samples[i * k:(i + 1) * k]:
            text = C.decode(tok, s.tokens)
            group.append({"text": text, "tokens": s.tokens, "finished": s.finished,
                          "correct": is_correct(text, p.answer, p.meta), "format": format_score(text)})
        out.append(group)
    return out


def select_verified(problems, graded: list[list[dict]], keep_per_problem: int) -> list[dict]:
    """Keep finished, well-formatted, correct samples; distinct texts, at most ``keep_per_problem`` each.

    >>> from types import SimpleNamespace as P
    >>> g = [[{"text": "a", "correct": True, "format": 1.0, "finished": True}] * 2
    ...      + [{"text": "b", "correct": False, "format": 1.0, "finished": True}]]
    >>> [r["response"] for r in select_verified([P(prompt="q", answer="1", meta={})], g, 2)]
    ['a']
    """
    rows = []
    for p, group in zip(problems, graded):
        seen: set[str] = set()
        for s in group:
            if s["correct"] and s["format"] == 1.0 and s["finished"] and s["text"] not in seen:
                seen.add(s["text"])
                rows.append({"prompt": p.prompt, "response": s["text"].strip(), "answer": p.answer,
                             "task": p.meta.get("task", "")})
                if len(seen) >= keep_per_problem:
                    break
    return rows


def write_jsonl(path: str | Path, rows: list[dict]) -> None:
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


def main(cfg: Config) -> dict:
    cfg.validate()
    _, tok, model = C.load_sampling_model(cfg.ckpt, cfg.tokenizer, cfg.seed, cfg.device)
    problems = C.make_problems(cfg.tasks, cfg.n_problems, seed=cfg.seed, difficulty=cfg.difficulty or None)
    graded = grade_samples(model, tok, problems, k=cfg.k, temperature=cfg.temperature, top_p=cfg.top_p,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rows = select_verified(problems, graded, cfg.keep_per_problem)
    out = Path(cfg.out) if cfg.out else (C.find_run_dir(cfg.ckpt) or Path(cfg.ckpt)) / "rejection.jsonl"
    write_jsonl(out, rows)
    n_correct = sum(s["correct"] for g in graded for s in g)
    res = {"out": str(out), "n_problems": len(problems), "samples": len(problems) * cfg.k,
           "sample_accuracy": n_correct / (len(problems) * cfg.k), "kept": len(rows),
           "problems_solved": sum(any(s["correct"] for s in g) for g in graded) / len(problems)}
    print0(json.dumps(res))
    return res
