"""Multi-step integer arithmetic (our own seeded generator).

Difficulty ``d`` (1..MAX_DIFFICULTY) = ``d`` operations over operands of up to ``1 + (d - 1) // 2``
digits (multipliers stay <= 12 so numbers stay readable). The expression is a random tree of
``+ - *``, printed with the minimal parentheses; the worked solution evaluates it innermost-first,
one true equation a line (``3 + 4 = 7``), negative right operands in parentheses (``2 - (-5) = 7``).
"""
from __future__ import annotations

import random

from tinyseek.tasks.common import Problem, generate_problems

NAME = "arithmetic"
MAX_DIFFICULTY = 6
_PREC = {"+": 1, "-": 1, "*": 2}


def _leaf(rng: random.Random, digits: int) -> list:
    return [rng.randint(0 if digits == 1 else 1, 10 ** digits - 1)]


def _render(node: list) -> str:
    if len(node) == 1:
        return str(node[0])
    op, left, right = node
    ls, rs = _render(left), _render(right)
    if len(left) == 3 and _PREC[left[0]] < _PREC[op]:
        ls = f"({ls})"
    if len(right) == 3 and (_PREC[right[0]] < _PREC[op] or (_PREC[right[0]] == _PREC[op] and op == "-")):
        rs = f"({rs})"
    return f"{ls} {op} {rs}"


def _solve(node: list, steps: list[str]) -> int:
    if len(node) == 1:
        return node[0]
    op, left, right = node
    a, b = _solve(left, steps), _solve(right, steps)
    v = a + b if op == "+" else a - b if op == "-" else a * b
    steps.append(f"{a} {op} {f'({b})' if b < 0 else b} = {v}")
    return v


def make(rng: random.Random, d: int) -> Problem:
    digits = 1 + (d - 1) // 2
    root = _leaf(rng, digits)
    for _ in range(d):
        # pick a random leaf by walking down, replace it with (op, leaf, new) or (op, new, leaf)
        node = root
        while len(node) == 3:
            node = node[rng.randint(1, 2)]
        op = rng.choice("+-*")
        new = [rng.randint(2, 12)] if op == "*" else _leaf(rng, digits)
        old = list(node)
        pair = (old, new) if rng.random() < 0.5 else (new, old)
        node[:] = [op, *pair]
    expr = _render(root)
    steps: list[str] = []
    value = _solve(root, steps)
    return Problem(prompt=f"Compute {expr}.", solution="\n".join(steps), answer=str(value), difficulty=d,
                   meta={"expression": expr})


def generate(n: int, seed: int, difficulty: int | None = None, split: str = "train") -> list[Problem]:
    """``n`` problems, deterministic in ``(n, seed, difficulty, split)``; see :mod:`tinyseek.tasks`.

    >>> p = generate(1, seed=0, difficulty=2)[0]
    >>> eval(p.meta["expression"]) == int(p.answer), p.difficulty, p.solution.count("\\n") + 1
    (True, 2, 2)
    """
    return generate_problems(NAME, make, n, seed, difficulty, split, MAX_DIFFICULTY)
