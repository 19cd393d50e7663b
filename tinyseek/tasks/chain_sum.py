"""Chain sums: ``a + b - c + ...`` with a running total (our own generator, in the spirit of
reasoning-gym's ``chain_sum``).

Difficulty ``d`` = ``d + 1`` terms of up to ``1 + d // 2`` digits; the worked solution adds one term a
line (``12 + 7 = 19``, ``19 - 30 = -11``).
"""
from __future__ import annotations

import random

from tinyseek.tasks.common import Problem, generate_problems

NAME = "chain_sum"
MAX_DIFFICULTY = 6


def make(rng: random.Random, d: int) -> Problem:
    digits = 1 + d // 2
    terms = [rng.randint(1, 10 ** digits - 1) for _ in range(d + 1)]
    ops = [rng.choice("+-") for _ in range(d)]
    expr = str(terms[0]) + "".join(f" {o} {t}" for o, t in zip(ops, terms[1:]))
    total, steps = terms[0], []
    for o, t in zip(ops, terms[1:]):
        new = total + t if o == "+" else total - t
        steps.append(f"{total} {o} {t} = {new}")
        total = new
    return Problem(prompt=f"What is {expr}?", solution="\n".join(steps), answer=str(total), difficulty=d,
                   meta={"expression": expr})


def generate(n: int, seed: int, difficulty: int | None = None, split: str = "train") -> list[Problem]:
    """``n`` problems, deterministic in ``(n, seed, difficulty, split)``; see :mod:`tinyseek.tasks`.

    >>> p = generate(1, seed=3, difficulty=3)[0]
    >>> eval(p.meta["expression"]) == int(p.answer), len(p.solution.splitlines())
    (True, 3)
    """
    return generate_problems(NAME, make, n, seed, difficulty, split, MAX_DIFFICULTY)
