"""Countdown: reach a target from given numbers with ``+ - * /`` (our own seeded generator).

Difficulty ``d`` = ``d + 2`` numbers (3..MAX_DIFFICULTY + 2): small numbers 1..10 plus, from
difficulty 2, one "large" number from {25, 50, 75, 100}. The target is made by combining a random
subset of the numbers with random operations (so it is reachable), is an integer in 10..999 and is not
one of the numbers. The worked solution is then *found by search* (:func:`solve`: iterative deepening
over pairwise combinations, exact fractions, fewest operations first), so the shown solution is a
shortest one, not necessarily the one the target was built from. The answer is an expression; any
expression that :func:`check_countdown` accepts is correct (each number used at most once, not all
numbers need be used).
"""
from __future__ import annotations

import random
from collections import Counter
from fractions import Fraction

from tinyseek.tasks.common import Problem, eval_exact, generate_problems

NAME = "countdown"
MAX_DIFFICULTY = 4
LARGE = (25, 50, 75, 100)


def check_countdown(expr: str, numbers: list[int], target: int) -> bool:
    """True if ``expr`` uses only ``numbers`` (each at most as often as given) and equals ``target``.

    >>> check_countdown("(25 + 3) * 4", [3, 4, 25, 7], 112), check_countdown("25 * 4 + 12", [3, 4, 25], 112)
    (True, False)
    >>> check_countdown("3 + 3", [3, 4], 6), check_countdown("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24)
    (False, True)
    """
    if not isinstance(expr, str) or not expr.strip():
        return False
    try:
        value, used = eval_exact(expr.split("=")[0])
    except (ValueError, RecursionError):
        return False
    avail = Counter(Fraction(n) for n in numbers)
    if any(c > avail[v] for v, c in Counter(used).items()):
        return False
    return value == Fraction(target)


_SYMS = ("+", "-", "*", "/")


def _wrap(e: str) -> str:
    """Parenthesise a compound right operand of ``/`` (``a / (b * c)``)."""
    return e if " " not in e or _strip_outer(e) != e else f"({e})"


def _combine(a: tuple[Fraction, str], b: tuple[Fraction, str]):
    """All (value, expr, step) from combining two items (non-negative results; exact division);
    the larger operand is written first."""
    if a[0] < b[0]:
        a, b = b, a
    (va, ea), (vb, eb) = a, b
    out = [(va + vb, f"({ea} + {eb})", (va, "+", vb)), (va * vb, f"{ea} * {eb}", (va, "*", vb))]
    if va >= vb:
        out.append((va - vb, f"({ea} - {eb})", (va, "-", vb)))
    else:
        out.append((vb - va, f"({eb} - {ea})", (vb, "-", va)))
    if vb != 0 and va / vb == int(va / vb):
        out.append((va / vb, f"{ea} / {_wrap(eb)}", (va, "/", vb)))
    if va != 0 and vb / va == int(vb / va):
        out.append((vb / va, f"{eb} / {_wrap(ea)}", (vb, "/", va)))
    return out


def solve(numbers: list[int], target: int, max_ops: int | None = None) -> tuple[str, list[str]] | None:
    """A shortest expression reaching ``target`` and its steps, or None. Deterministic.

    >>> solve([3, 4, 25, 7], 112)[0]
    '(25 + 3) * 4'
    """
    items = [(Fraction(n), str(n)) for n in sorted(numbers, reverse=True)]
    t = Fraction(target)
    for it in items:
        if it[0] == t:
            return it[1], []
    max_ops = len(items) - 1 if max_ops is None else max_ops

    def dfs(state: list, steps: list, depth: int, seen: set):
        key = (depth, tuple(sorted(v for v, _ in state)))
        if key in seen:
            return None
        seen.add(key)
        for i in range(len(state)):
            for j in range(i + 1, len(state)):
                rest = state[:i] + state[i + 1:j] + state[j + 1:]
                for v, e, (x, op, y) in _combine(state[i], state[j]):
                    step = f"{x} {op} {y} = {v}"
                    if v == t:
                        return e, steps + [step]
                    if depth > 1:
                        r = dfs(rest + [(v, e)], steps + [step], depth - 1, seen)
                        if r:
                            return r
        return None

    for ops in range(1, max_ops + 1):
        r = dfs(items, [], ops, set())
        if r:
            expr, steps = r
            return _strip_outer(expr), [s for s in steps]
    return None


def _strip_outer(e: str) -> str:
    if e.startswith("(") and e.endswith(")"):
        depth = 0
        for i, ch in enumerate(e):
            depth += ch == "("
            depth -= ch == ")"
            if depth == 0 and i < len(e) - 1:
                return e
        return e[1:-1]
    return e


def make(rng: random.Random, d: int) -> Problem:
    k = d + 2
    while True:
        nums = [rng.randint(1, 10) for _ in range(k)]
        if d >= 2:
            nums[0] = rng.choice(LARGE)
        # build a target from a random subset (>= 2 numbers) combined in random order
        pool = [Fraction(x) for x in rng.sample(nums, rng.randint(2, k))]
        while len(pool) > 1:
            a = pool.pop(rng.randrange(len(pool)))
            b = pool.pop(rng.randrange(len(pool)))
            choices = [v for v, _, _ in _combine((a, ""), (b, ""))]
            pool.append(rng.choice(choices))
        target = pool[0]
        if target.denominator == 1 and 10 <= target <= 999 and int(target) not in nums:
            break
    target = int(target)
    rng.shuffle(nums)
    nums_s = ", ".join(map(str, nums))
    prompt = (f"Using the numbers {nums_s}, make {target}. You may use + - * / and parentheses; "
              f"each number at most once. Answer with the expression.")
    return Problem(prompt=prompt, solution="", answer="", difficulty=d, meta={"numbers": nums, "target": target})


def finish(p: Problem) -> Problem:
    """Fill in the worked solution and answer by search."""
    expr, steps = solve(p.meta["numbers"], p.meta["target"])
    p.solution, p.answer = "\n".join(steps), expr
    return p


def generate(n: int, seed: int, difficulty: int | None = None, split: str = "train") -> list[Problem]:
    """``n`` problems, deterministic in ``(n, seed, difficulty, split)``; see :mod:`tinyseek.tasks`.

    >>> p = generate(1, seed=0, difficulty=2)[0]
    >>> check_countdown(p.answer, p.meta["numbers"], p.meta["target"]), len(p.meta["numbers"])
    (True, 4)
    """
    return generate_problems(NAME, make, n, seed, difficulty, split, MAX_DIFFICULTY, finish)
