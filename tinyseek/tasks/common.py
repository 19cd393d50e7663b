"""Shared task machinery: the ``Problem`` record, per-problem seeding, the train/eval split, and an
exact checker for the equations in worked solutions.

Split rule: a problem's bucket is ``blake2b(prompt) mod EVAL_BUCKETS``; bucket 0 is *eval*, the
rest *train*. ``generate(..., split="train")`` re-draws (a new RNG stream, up to
``MAX_ATTEMPTS`` times) until the prompt is in a train bucket, ``split="eval"`` until it is in the
eval bucket, ``split="any"`` takes the first draw. So no prompt is ever both a training and a
held-out problem, even for tiny problem spaces (one-digit addition) and whatever seeds callers use.
"""
from __future__ import annotations

import ast
import hashlib
import random
import re
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Callable

from tinyseek.errors import UserError

EVAL_SEED_BASE = 10_000_019  # held-out sets use seeds >= this (same constant as tinyseek.post.common)
EVAL_BUCKETS = 4             # 1 in EVAL_BUCKETS prompts belongs to the eval split
MAX_ATTEMPTS = 256           # re-draws per problem to land in the requested split
SPLITS = ("train", "eval", "any")


@dataclass
class Problem:
    prompt: str                # the question shown to the model (user turn)
    solution: str              # worked steps, one per line; every equation in it is true
    answer: str                # the final answer (a number; an expression for countdown)
    difficulty: int            # 1 = easiest; task-specific meaning (number of operations, terms, numbers)
    meta: dict = field(default_factory=dict)  # task, seed, index, split, and task data (countdown numbers/target)


def format_solution(p: Problem) -> str:
    """SFT cold-start target: ``<think>steps</think><answer>answer</answer>``.

    >>> format_solution(Problem("1+2?", "1 + 2 = 3", "3", 1))
    '<think>1 + 2 = 3</think><answer>3</answer>'
    """
    return f"<think>{p.solution}</think><answer>{p.answer}</answer>"


def seed_int(*parts) -> int:
    """A 64-bit seed from any printable parts (stable across runs and Python versions).

    >>> seed_int("arithmetic", "train", 0, 1) == seed_int("arithmetic", "train", 0, 1)
    True
    """
    return int.from_bytes(hashlib.blake2b(repr(parts).encode(), digest_size=8).digest(), "little")


def bucket(prompt: str) -> str:
    """``"eval"`` or ``"train"`` for a prompt text (see module docstring)."""
    h = int.from_bytes(hashlib.blake2b(prompt.encode(), digest_size=8).digest(), "little")
    return "eval" if h % EVAL_BUCKETS == 0 else "train"


def check_args(n: int, seed: int, difficulty: int | None, split: str) -> None:
    if not isinstance(n, int) or n < 0:
        raise UserError(f"number of problems must be an int >= 0, got {n!r}")
    if not isinstance(seed, int):
        raise UserError(f"seed must be an int, got {seed!r}")
    if difficulty is not None and (not isinstance(difficulty, int) or difficulty < 0):
        raise UserError(f"difficulty must be an int >= 1 (or None/0 for the task's mix), got {difficulty!r}")
    if split not in SPLITS:
        raise UserError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")


def generate_problems(task: str, make: Callable[[random.Random, int], Problem], n: int, seed: int,
                      difficulty: int | None, split: str, max_difficulty: int,
                      finish: Callable[[Problem], Problem] | None = None) -> list[Problem]:
    """``n`` problems from ``make(rng, difficulty)``, each from its own RNG, in the requested split.

    ``finish(problem)``, if given, completes a problem once it is accepted (countdown's search for a
    solution runs only for problems in the requested split).

    ``difficulty`` None/0 draws a level uniformly from ``1..max_difficulty``; levels above the
    task's maximum are clamped to it (curricula share levels across tasks).
    """
    check_args(n, seed, difficulty, split)
    out = []
    for i in range(n):
        for attempt in range(MAX_ATTEMPTS):
            rng = random.Random(seed_int(task, split, seed, i, attempt))
            d = min(difficulty, max_difficulty) if difficulty else rng.randint(1, max_difficulty)
            p = make(rng, d)
            if split == "any" or bucket(p.prompt) == split:
                break
        else:  # pragma: no cover - needs a problem space with no prompt in the split
            raise UserError(f"{task}: no {split} problem found at difficulty {difficulty} "
                            f"after {MAX_ATTEMPTS} draws (problem space too small)")
        if finish is not None:
            p = finish(p)
        p.meta.update(task=task, seed=seed, index=i, split=split)
        out.append(p)
    return out


# ------------------------------------------------------------------------------------------------
# exact arithmetic over + - * / and parentheses
# ------------------------------------------------------------------------------------------------
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b}


def eval_exact(expr: str) -> tuple[Fraction, list[Fraction]]:
    """Value of an arithmetic expression (``+ - * /``, parentheses, unary minus) as a Fraction, and
    the literal numbers it uses. Raises ``ValueError`` for anything else or division by zero.

    >>> eval_exact("(3 + 4) * 5 - 10 / 4")
    (Fraction(65, 2), [Fraction(3, 1), Fraction(4, 1), Fraction(5, 1), Fraction(10, 1), Fraction(4, 1)])
    """
    expr = expr.replace("×", "*").replace("÷", "/").replace("−", "-")
    if len(expr) > 500:
        raise ValueError("expression too long")
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError as e:
        raise ValueError(f"not an expression: {expr!r}") from e
    nums: list[Fraction] = []

    def ev(node) -> Fraction:
        if isinstance(node, ast.Constant) and type(node.value) in (int, float):
            v = Fraction(str(node.value))
            nums.append(v)
            return v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Div) and b == 0:
                raise ValueError("division by zero")
            return _OPS[type(node.op)](a, b)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        raise ValueError(f"unsupported syntax in {expr!r}")

    return ev(tree.body), nums


_NUM = r"-?\d+(?:\.\d+)?"
EQUATION_RE = re.compile(rf"(\(*\s*{_NUM}\s*\)*(?:\s*[-+*/×x]\s*\(*\s*{_NUM}\s*\)*)+)\s*=\s*({_NUM})")


def check_equations(text: str) -> tuple[int, int]:
    """(true, total) over the equations ``a op b ... = c`` found in ``text``. A right-hand side
    with decimals counts as true when the exact left side rounds to it.

    >>> check_equations("3 + 4 = 7\\n7 * 5 = 35\\nso 2 - 5 = -3 but 1 + 1 = 3")
    (3, 4)
    """
    good = total = 0
    for lhs, rhs in EQUATION_RE.findall(text.replace(",", "")):
        lhs = lhs.strip()
        while lhs.count("(") > lhs.count(")") and lhs.startswith("("):
            lhs = lhs[1:]
        while lhs.count(")") > lhs.count("(") and lhs.endswith(")"):
            lhs = lhs[:-1]
        total += 1
        try:
            v, _ = eval_exact(lhs)
        except ValueError:
            continue
        r = Fraction(rhs)
        decimals = len(rhs.split(".")[1]) if "." in rhs else 0
        if v == r or (decimals and round(v, decimals) == r):
            good += 1
    return good, total


def fmt_num(v: Fraction | int | float) -> str:
    """Integers without a decimal point, other values as a short decimal.

    >>> fmt_num(Fraction(6, 2)), fmt_num(2.50), fmt_num(Fraction(1, 3))
    ('3', '2.5', '0.3333333333')
    """
    v = Fraction(str(v)) if isinstance(v, float) else Fraction(v)
    if v.denominator == 1:
        return str(v.numerator)
    return f"{float(v):.10f}".rstrip("0").rstrip(".")
