"""Rule-based rewards: pure, doctested functions of a completion's text, plus a registry.

A completion is what the model wrote after the chat template's assistant marker, ideally
``<think>worked steps</think><answer>final answer</answer>``. Each reward below is a concrete rule:

- ``accuracy``: 1 if the ``<answer>`` is correct. Numbers are compared exactly after normalisation
  (``1,000`` == ``1000`` == ``1000.0``; ``1/2`` == ``0.5``; ``1,2`` and ``4 2`` are not numbers; a
  decimal against a non-integer matches to 6 places, so ``0.3333333333`` == ``1/3``). Countdown problems (``meta`` holds
  ``numbers`` and ``target``) are verified instead: the answer must be an arithmetic expression
  that uses only the given numbers (each at most as often as given) and evaluates to the target.
- ``format``: 1 if the text is exactly one think block followed by one answer block, in that order.
- ``length``: a penalty in [-1, 0]: 0 up to ``budget`` characters, then linearly down to -1 at 2x.
- ``multi``: the weighted multi-criteria reward (weights from config, default 0.4/0.3/0.2/0.1):
    * consistency (0.4): fraction of equations ``a op b (op c ...) = d`` in the think block that are
      arithmetically true (0 if the think block has no equation to check);
    * accuracy (0.3): as above;
    * clarity (0.2): mean of three checks: the think block is non-empty; none of its non-empty lines
      (or ``;``/``.``-separated steps) repeats; the last number in the think block equals the answer;
    * efficiency (0.1): 1 up to ``budget`` characters, linearly down to 0 at 2x the budget.

The registry ``REWARDS`` maps a name to ``fn(completion, problem, ctx) -> float`` where ``problem``
has ``.answer`` (str) and ``.meta`` (dict) and ``ctx`` is a :class:`RewardContext`.
:func:`total_reward` sums the rewards named in a ``{name: weight}`` dict (from the GRPO config).
"""
from __future__ import annotations

import ast
import math
import operator
import re
from collections import Counter
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Callable

THINK_RE = re.compile(r"<think>(.*?)</think>", re.S)
ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.S)
FORMAT_RE = re.compile(r"^\s*<think>((?:(?!<think>|</think>|<answer>|</answer>).)*)</think>\s*"
                       r"<answer>((?:(?!<think>|</think>|<answer>|</answer>).)*)</answer>\s*$", re.S)
_NUM = r"-?\d+(?:\.\d+)?"
EQUATION_RE = re.compile(rf"(\(?\s*{_NUM}(?:\s*[-+*/x×]\s*\(?\s*{_NUM}\s*\)?)+\s*\)?)\s*=\s*({_NUM})")


# ------------------------------------------------------------------------------------------------
# parsing
# ------------------------------------------------------------------------------------------------
def extract_answer(text: str) -> str | None:
    """Content of the last ``<answer>`` block, stripped; None if there is none.

    >>> extract_answer("<think>2+2=4</think><answer> 4 </answer>")
    '4'
    >>> extract_answer("no tags") is None
    True
    """
    m = ANSWER_RE.findall(text)
    return m[-1].strip() if m else None


def extract_think(text: str) -> str:
    """Content of the first ``<think>`` block ('' if none).

    >>> extract_think("<think>a\\nb</think><answer>1</answer>")
    'a\\nb'
    """
    m = THINK_RE.search(text)
    return m.group(1) if m else ""


# one number: digits with optional thousands groups ("1,234,567" or "1 234 567", one separator kind,
# every group after the first exactly three digits), an optional decimal part; "3." and ".5" too
_PLAIN = re.compile(r"[+-]?(?:(?:\d{1,3}(?P<sep>[, ])\d{3}(?:(?P=sep)\d{3})*|\d+)(?:\.\d*)?|\.\d+)")
ROUND_DECIMALS = 6  # decimals compared when an answer is written as a decimal (math-verify's float_rounding)


def _plain(t: str) -> Fraction | None:
    m = _PLAIN.fullmatch(t)
    if m is None:
        return None
    return Fraction(t.replace(",", "").replace(" ", "").rstrip(".") or "0")


def parse_number(s: str | None) -> Fraction | None:
    """A number written in an answer, exactly; None if ``s`` is not one number.

    Accepted: a sign, thousands separators in valid groups only (``1,234,567``; ``1,2`` and ``4 2``
    are not numbers), a decimal part, a leading ``$``, a trailing ``%`` or ``.``, and fractions
    ``a/b/c`` read left to right (``1/2/3`` = 1/6, as in math-verify). Division by zero is None.

    >>> parse_number("1,000"), parse_number(" $12.50 "), parse_number("-3/6"), parse_number("x")
    (Fraction(1000, 1), Fraction(25, 2), Fraction(-1, 2), None)
    >>> parse_number("1/2/3"), parse_number("1,2"), parse_number("4 2"), parse_number("1,234,567")
    (Fraction(1, 6), None, None, Fraction(1234567, 1))
    """
    if s is None:
        return None
    t = s.strip()
    if t.startswith("$") or t.startswith("-$"):
        t = t.replace("$", "", 1)
    t = t.removesuffix("%").rstrip()
    if t.endswith(".") and not t.endswith(".."):
        t = t[:-1]
    parts = [x.strip() for x in t.split("/")]
    vals = [_plain(x) for x in parts]
    if not parts or any(v is None for v in vals):
        return None
    out = vals[0]
    for v in vals[1:]:
        if v == 0:
            return None
        out /= v
    return out


def _kind(s: str) -> str:
    """How an answer is written: "int" (digits and separators only), "decimal" (has a point), or
    "fraction"."""
    t = s.strip().rstrip("%").rstrip(".")
    return "fraction" if "/" in t else "decimal" if "." in t else "int"


def answers_match(pred: str | None, gold: str) -> bool:
    """Numeric comparison when both parse as numbers (:func:`parse_number`), else case- and
    space-insensitive string equality.

    Numbers are compared exactly as rationals, with one tolerance (math-verify's rule, checked
    against it in the tests): when one side is written as a decimal and neither is written as a plain
    integer, both are rounded to ``ROUND_DECIMALS`` (6) places (half to even) and compared. So a
    10-decimal gold ``0.3333333333`` and ``1/3`` match either way round, ``0.33`` does not match
    ``1/3``, and ``1.0000001`` does not match ``1``.

    >>> answers_match("1000.0", "1,000"), answers_match("0.5", "1/2"), answers_match("7", "8")
    (True, True, False)
    >>> answers_match("1/3", "0.3333333333"), answers_match("0.33", "1/3"), answers_match("1,2", "12")
    (True, False, False)
    >>> answers_match("Paris ", "paris"), answers_match(None, "1")
    (True, False)
    """
    if pred is None:
        return False
    a, b = parse_number(pred), parse_number(gold)
    if a is not None and b is not None:
        if a == b:
            return True
        kinds = {_kind(pred), _kind(gold)}
        return ("decimal" in kinds and "int" not in kinds
                and round(a, ROUND_DECIMALS) == round(b, ROUND_DECIMALS))
    return " ".join(pred.lower().split()) == " ".join(gold.lower().split())


# ------------------------------------------------------------------------------------------------
# safe arithmetic evaluation (for countdown and equation checks)
# ------------------------------------------------------------------------------------------------
_OPS: dict[type, Callable] = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul,
                              ast.Div: operator.truediv}


def safe_eval(expr: str) -> tuple[Fraction, list[Fraction]] | None:
    """Evaluate ``+ - * /`` and parentheses over numbers exactly; return (value, numbers used).

    None for anything else (names, calls, powers, division by zero, syntax errors).

    >>> safe_eval("(3 + 5) * 2")
    (Fraction(16, 1), [Fraction(3, 1), Fraction(5, 1), Fraction(2, 1)])
    >>> safe_eval("2 ** 10") is None, safe_eval("1/0") is None, safe_eval("__import__('os')") is None
    (True, True, True)
    """
    expr = expr.replace("×", "*").replace("x", "*").replace("÷", "/")
    if len(expr) > 200:
        return None
    try:
        tree = ast.parse(expr.strip(), mode="eval")
    except SyntaxError:
        return None
    used: list[Fraction] = []

    def ev(node: ast.AST) -> Fraction:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
            v = Fraction(str(node.value))
            used.append(v)
            return v
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
            return -ev(node.operand)
        raise ValueError("unsupported")

    try:
        return ev(tree), used
    except (ValueError, ZeroDivisionError, TypeError):
        return None


# ------------------------------------------------------------------------------------------------
# the individual rules
# ------------------------------------------------------------------------------------------------
def countdown_correct(answer: str | None, numbers: list[int], target: int) -> bool:
    """The expression uses only ``numbers`` (each at most as often as given) and equals ``target``.

    >>> countdown_correct("(25 - 5) * 3", [3, 5, 25, 7], 60)
    True
    >>> countdown_correct("25 * 5", [3, 5, 25], 60), countdown_correct("20 * 3", [3, 5, 25], 60)
    (False, False)
    >>> countdown_correct("5 * 5 + 35", [5, 35, 2], 60)   # 5 used twice
    False
    """
    if not answer:
        return False
    expr = answer.split("=")[0]  # tolerate "expr = target"
    r = safe_eval(expr)
    if r is None:
        return False
    value, used = r
    avail = Counter(Fraction(n) for n in numbers)
    if any(c > avail[v] for v, c in Counter(used).items()):
        return False
    return value == Fraction(target)


def is_correct(completion: str, answer: str, meta: dict | None = None) -> bool:
    """Task-aware correctness of a completion's ``<answer>`` (countdown verified, else compared).

    >>> is_correct("<think>3+4=7</think><answer>7</answer>", "7")
    True
    >>> is_correct("<answer>4*5</answer>", "5*4", {"numbers": [4, 5], "target": 20})
    True
    """
    pred = extract_answer(completion)
    meta = meta or {}
    if "numbers" in meta and "target" in meta:
        return countdown_correct(pred, list(meta["numbers"]), int(meta["target"]))
    return answers_match(pred, answer)


def format_score(completion: str) -> float:
    """1.0 for exactly ``<think>…</think><answer>…</answer>`` (whitespace around allowed), else 0.

    >>> format_score("<think>1+1=2</think><answer>2</answer>")
    1.0
    >>> format_score("<answer>2</answer><think>x</think>"), format_score("<think>x</think>2")
    (0.0, 0.0)
    >>> format_score("<think>a</think><answer>1</answer><answer>2</answer>")
    0.0
    """
    return 1.0 if FORMAT_RE.match(completion) else 0.0


def length_penalty(completion: str, budget: int) -> float:
    """0 up to ``budget`` characters, then linearly down to -1 at ``2 * budget`` (clamped).

    >>> length_penalty("x" * 50, 100), length_penalty("x" * 150, 100), length_penalty("x" * 999, 100)
    (0.0, -0.5, -1.0)
    """
    n = len(completion)
    if n <= budget:
        return 0.0
    return -min(1.0, (n - budget) / budget)


def efficiency_score(completion: str, budget: int) -> float:
    """1 up to ``budget`` characters, linearly to 0 at twice the budget.

    >>> efficiency_score("x" * 10, 20), efficiency_score("x" * 30, 20)
    (1.0, 0.5)
    """
    return 1.0 + length_penalty(completion, budget)


def equations(text: str) -> list[tuple[str, str]]:
    """All ``lhs = rhs`` arithmetic equations in ``text`` as (lhs, rhs) strings.

    >>> equations("12 + 7 = 19, then 19 * 2 = 38. so x = 4")
    [('12 + 7', '19'), ('19 * 2', '38')]
    """
    return [(m.group(1).strip(), m.group(2)) for m in EQUATION_RE.finditer(text)]


def consistency_score(completion: str) -> float:
    """Fraction of equations in the think block that are arithmetically true (0 if none).

    >>> consistency_score("<think>2 + 3 = 5\\n5 * 4 = 21</think><answer>21</answer>")
    0.5
    >>> consistency_score("<think>I guess</think><answer>3</answer>")
    0.0
    """
    eqs = equations(extract_think(completion))
    if not eqs:
        return 0.0
    ok = 0
    for lhs, rhs in eqs:
        r = safe_eval(lhs)
        ok += r is not None and r[0] == Fraction(rhs)
    return ok / len(eqs)


def clarity_score(completion: str, answer: str | None = None) -> float:
    """Mean of: think non-empty; no repeated step; last number in the think block == the answer.

    Steps are the non-empty lines of the think block, further split on ``;`` and ``. ``. The answer
    compared with is ``answer`` if given, else the completion's own ``<answer>``.

    >>> clarity_score("<think>2 + 3 = 5</think><answer>5</answer>")
    1.0
    >>> clarity_score("<think>2 + 3 = 5\\n2 + 3 = 5</think><answer>6</answer>")   # repeat, ends wrong
    0.3333333333333333
    >>> clarity_score("<answer>5</answer>")
    0.0
    """
    think = extract_think(completion).strip()
    if not think:
        return 0.0
    steps = [s.strip() for s in re.split(r"[\n;]|\.\s", think) if s.strip()]
    no_repeat = len(steps) == len(set(steps))
    nums = re.findall(_NUM, think)
    target = answer if answer is not None else extract_answer(completion)
    ends = bool(nums) and target is not None and answers_match(nums[-1], target)
    return (1.0 + no_repeat + ends) / 3.0


DEFAULT_MULTI_WEIGHTS = {"consistency": 0.4, "accuracy": 0.3, "clarity": 0.2, "efficiency": 0.1}


def multi_criteria(completion: str, answer: str, meta: dict | None = None, budget: int = 200,
                   weights: dict[str, float] | None = None) -> float:
    """Weighted sum of consistency, accuracy, clarity and efficiency (see the module docstring).

    >>> round(multi_criteria("<think>2 + 3 = 5</think><answer>5</answer>", "5"), 6)
    1.0
    >>> round(multi_criteria("<think>2 + 3 = 6</think><answer>6</answer>", "5"), 6)  # clarity 0.2 + efficiency 0.1
    0.3
    """
    w = DEFAULT_MULTI_WEIGHTS if weights is None else weights
    unknown = set(w) - set(DEFAULT_MULTI_WEIGHTS)
    if unknown:
        raise ValueError(f"unknown multi-criteria weight(s) {sorted(unknown)}")
    parts = {
        "consistency": consistency_score(completion),
        "accuracy": float(is_correct(completion, answer, meta)),
        "clarity": clarity_score(completion),
        "efficiency": efficiency_score(completion, budget),
    }
    return sum(w.get(k, 0.0) * v for k, v in parts.items())


# ------------------------------------------------------------------------------------------------
# registry
# ------------------------------------------------------------------------------------------------
@dataclass
class RewardContext:
    length_budget: int = 200                  # characters before length/efficiency penalties start
    multi_weights: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_MULTI_WEIGHTS))


RewardFn = Callable[[str, Any, RewardContext], float]

REWARDS: dict[str, RewardFn] = {
    "accuracy": lambda c, p, ctx: float(is_correct(c, p.answer, p.meta)),
    "format": lambda c, p, ctx: format_score(c),
    "length": lambda c, p, ctx: length_penalty(c, ctx.length_budget),
    "consistency": lambda c, p, ctx: consistency_score(c),
    "clarity": lambda c, p, ctx: clarity_score(c),
    "efficiency": lambda c, p, ctx: efficiency_score(c, ctx.length_budget),
    "multi": lambda c, p, ctx: multi_criteria(c, p.answer, p.meta, ctx.length_budget, ctx.multi_weights),
}


def check_weights(weights: dict[str, float]) -> None:
    """Raise ValueError naming an unknown reward."""
    bad = [k for k in weights if k not in REWARDS]
    if bad:
        raise ValueError(f"unknown reward(s) {bad}; choose from {', '.join(REWARDS)}")


def reward_breakdown(completion: str, problem: Any, weights: dict[str, float],
                     ctx: RewardContext | None = None) -> dict[str, float]:
    """Each named reward's raw value plus ``total`` = sum of weight * value.

    >>> from types import SimpleNamespace as P
    >>> reward_breakdown("<think>1 + 1 = 2</think><answer>2</answer>", P(answer="2", meta={}),
    ...                  {"accuracy": 1.0, "format": 0.5})
    {'accuracy': 1.0, 'format': 1.0, 'total': 1.5}
    """
    check_weights(weights)
    ctx = ctx or RewardContext()
    out = {name: float(REWARDS[name](completion, problem, ctx)) for name in weights}
    out["total"] = sum(weights[n] * out[n] for n in weights)
    if not math.isfinite(out["total"]):
        raise ValueError("non-finite reward")
    return out


def total_reward(completion: str, problem: Any, weights: dict[str, float],
                 ctx: RewardContext | None = None) -> float:
    """Sum of ``weight * reward`` over the rewards named in ``weights``."""
    return reward_breakdown(completion, problem, weights, ctx)["total"]
