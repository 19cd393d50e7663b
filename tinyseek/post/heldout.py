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


# draws per requested problem before a held-out set settles for fewer distinct prompts
POOL_FACTOR = 8


def heldout_problems(tasks: str, n: int, seed: int, difficulty: int | None) -> list:
    """Up to ``n`` problems of ``tasks`` (comma list) from the eval split with pairwise distinct prompts,
    seeds ``EVAL_SEED_BASE + seed``; the same list for the same arguments.

    Problems are drawn (``POOL_FACTOR * n`` at most, tasks interleaved) and a prompt seen before is
    skipped: at low difficulty the eval split is small (level 1 arithmetic + chain_sum: ~108 prompts), and
    drawing with replacement made 100 problems hold only 62 distinct prompts, so a few prompts counted
    two or three times and the standard error was that of ~46 problems. When the split holds fewer than
    ``n`` distinct prompts, the list is shorter (every distinct prompt found); callers report its length."""
    if n <= 0:
        return []
    pool = make_problems(tasks, POOL_FACTOR * n, seed=EVAL_SEED_BASE + seed, difficulty=difficulty, split="eval")
    seen: set[str] = set()
    out = []
    for p in pool:
        if p.prompt not in seen:
            seen.add(p.prompt)
            out.append(p)
            if len(out) == n:
                break
    return out


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
