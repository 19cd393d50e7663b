"""Held-out problems and greedy scoring: what GRPO's periodic eval measures, and the greedy half of
``tinyseek eval`` (:func:`tinyseek.eval.evaluate` adds pass@k on top).

Held-out means the tasks' ``eval`` split (a hash of the prompt text puts 1 in 4 problem texts there;
training draws only from ``train``) with seeds from ``EVAL_SEED_BASE + seed``, so no prompt of a
held-out set is ever trained on.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from tinyseek.post.common import EVAL_SEED_BASE, decode, make_problems, prompt_ids
from tinyseek.post.rewards import format_score, is_correct
from tinyseek.post.rollout import sample

# evaluate(model, tok, problems, *, max_new_tokens, seed) -> at least {"pass@1", "format_rate", "mean_length"}
Evaluator = Callable[..., dict[str, Any]]


def heldout_problems(tasks: str, n: int, seed: int, difficulty: int | None) -> list:
    """``n`` problems of ``tasks`` (comma list) from the eval split, seeds ``EVAL_SEED_BASE + seed``;
    the same list for the same arguments."""
    return make_problems(tasks, n, seed=EVAL_SEED_BASE + seed, difficulty=difficulty, split="eval")


@torch.no_grad()
def greedy_scores(model, tok, problems, *, max_new_tokens: int = 64, seed: int = 0) -> dict:
    """Greedy (temperature 0) answers to ``problems``, scored: ``pass@1`` (share correct by
    :func:`tinyseek.post.rewards.is_correct`), ``format_rate`` (mean format score), ``mean_length``
    (tokens) and ``truncated_rate`` (share that hit ``max_new_tokens`` without eos or a stop id).
    Deterministic for a given model and problem list."""
    prompts = [prompt_ids(tok, p.prompt) for p in problems]
    greedy = sample(model, prompts, eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=max_new_tokens,
                    temperature=0.0, seed=seed)
    texts = [decode(tok, s.tokens) for s in greedy]
    ok = [is_correct(t, p.answer, p.meta) for t, p in zip(texts, problems)]
    return {
        "n_problems": len(problems),
        "pass@1": sum(ok) / len(problems),
        "format_rate": sum(format_score(t) for t in texts) / len(problems),
        "mean_length": sum(len(s.tokens) for s in greedy) / len(problems),
        "truncated_rate": sum(not s.finished for s in greedy) / len(problems),
    }
