"""GSM8K-style word problems from reasoning-gym's ``gsm_symbolic`` templates, generated offline.

We call the template generators directly with our own per-problem RNG (so problems follow our seeding
and split rules, :mod:`tinyseek.tasks.common`) and keep only what we need:

- answer = the final number (``answer_value``), formatted without a trailing ``.0``; reasoning-gym's
  scorer (partial credit for wrong answers) is not used: rewards compare numbers exactly.
- worked solution = the template's ``answer_cot`` without its ``#### N`` line. Instances whose
  solution contains an equation that :func:`~tinyseek.tasks.common.check_equations` can parse and
  finds false (some templates floor ``17*0.5=8``) are re-drawn, so every checkable step is true.
- difficulty = number of solution lines with an ``=`` minus one, clipped to 1..MAX_DIFFICULTY.
  A requested difficulty picks among templates of that level (levels measured once per process
  on three sample instances per template).
"""
from __future__ import annotations

import functools
import random
from typing import Callable

from tinyseek.tasks.common import Problem, check_equations, fmt_num, generate_problems

NAME = "gsm"
MAX_DIFFICULTY = 4


@functools.lru_cache(maxsize=1)
def _generators() -> dict[int, Callable]:
    from reasoning_gym.arithmetic.gsm_symbolic import generators_00_49, generators_50_99
    from reasoning_gym.arithmetic.gsm_symbolic.gsm_symbolic import tasks_ok
    gens = {}
    for mod in (generators_00_49, generators_50_99):
        for name in dir(mod):
            if name.startswith("generate_") and int(name[len("generate_"):]) in tasks_ok:
                gens[int(name[len("generate_"):])] = getattr(mod, name)
    return dict(sorted(gens.items()))


def _cot(example: dict) -> str:
    lines = [ln.rstrip() for ln in example["metadata"]["answer_cot"].strip().splitlines()]
    return "\n".join(ln for ln in lines if not ln.lstrip().startswith("####")).strip()


def _level(cot: str) -> int:
    return max(1, min(MAX_DIFFICULTY, sum("=" in ln for ln in cot.splitlines()) - 1))


@functools.lru_cache(maxsize=1)
def _levels() -> dict[int, list[int]]:
    """difficulty -> template ids (a template's level is the max over three sample instances)."""
    out: dict[int, list[int]] = {d: [] for d in range(1, MAX_DIFFICULTY + 1)}
    for k, gen in _generators().items():
        lv = max(_level(_cot(gen(random.Random(s), 1.0))) for s in range(3))
        out[lv].append(k)
    return out


def make(rng: random.Random, d: int) -> Problem:
    gens, levels = _generators(), _levels()
    pool = levels[d] or min(levels.values(), key=len)
    for _ in range(64):
        k = rng.choice(pool)
        ex = gens[k](random.Random(rng.getrandbits(64)), 1.0)
        cot = _cot(ex)
        good, total = check_equations(cot)
        if good == total and cot:
            break
    value = ex["metadata"]["answer_value"]
    prompt = ex["question"].strip() + " Give the result as your final answer. Do not include units."
    return Problem(prompt=prompt, solution=cot, answer=fmt_num(value), difficulty=_level(cot),
                   meta={"template": k})


def generate(n: int, seed: int, difficulty: int | None = None, split: str = "train") -> list[Problem]:
    """``n`` problems, deterministic in ``(n, seed, difficulty, split)``; see :mod:`tinyseek.tasks`.

    >>> p = generate(1, seed=0)[0]
    >>> p.answer == p.solution.split()[-1].rstrip(".") or p.answer in p.solution
    True
    """
    return generate_problems(NAME, make, n, seed, difficulty, split, MAX_DIFFICULTY)
