"""Hand-computed cases for every reward rule and the registry."""
from types import SimpleNamespace

import pytest

from tinyseek.post import rewards as R

GOOD = "<think>12 + 7 = 19\n19 * 2 = 38</think><answer>38</answer>"


def prob(answer, **meta):
    return SimpleNamespace(answer=answer, meta=meta)


@pytest.mark.parametrize("pred,gold,ok", [
    ("38", "38", True), ("38.0", "38", True), ("1,234", "1234", True), ("-5", "-5.00", True),
    ("3/4", "0.75", True), ("37", "38", False), ("", "38", False), ("abc", "38", False),
])
def test_accuracy_numeric_normalisation(pred, gold, ok):
    assert R.REWARDS["accuracy"](f"<think>x</think><answer>{pred}</answer>", prob(gold), R.RewardContext()) == float(ok)


def test_accuracy_uses_last_answer_and_needs_tags():
    assert R.is_correct("<answer>1</answer><answer>38</answer>", "38")
    assert not R.is_correct("the answer is 38", "38")


def test_countdown_validity():
    meta = {"numbers": [2, 3, 7], "target": 23}
    assert R.is_correct("<answer>3 * 7 + 2</answer>", "7*3+2", meta)
    assert R.is_correct("<answer>(7 * 3) + 2 = 23</answer>", "", meta)
    assert not R.is_correct("<answer>23</answer>", "", meta)            # number not given
    assert not R.is_correct("<answer>7 * 3 + 2 + 2</answer>", "", meta)  # 2 used twice
    assert not R.is_correct("<answer>7 * 3 + 3</answer>", "", meta)      # wrong value, 3 twice
    assert not R.is_correct("<answer>__import__('os')</answer>", "", meta)


def test_format_rule():
    assert R.format_score(GOOD) == 1.0
    assert R.format_score("  <think>a</think>\n<answer>1</answer>\n") == 1.0
    assert R.format_score("<think>a</think>") == 0.0
    assert R.format_score("<answer>1</answer><think>a</think>") == 0.0
    assert R.format_score("<think>a<think>b</think><answer>1</answer>") == 0.0
    assert R.format_score("prefix <think>a</think><answer>1</answer>") == 0.0


def test_length_and_efficiency():
    assert R.length_penalty("x" * 100, 100) == 0.0
    assert R.length_penalty("x" * 125, 100) == -0.25
    assert R.length_penalty("x" * 1000, 100) == -1.0
    assert R.efficiency_score("x" * 125, 100) == 0.75


def test_consistency_counts_true_equations():
    assert R.consistency_score(GOOD) == 1.0
    assert R.consistency_score("<think>12 + 7 = 19\n19 * 2 = 40</think><answer>40</answer>") == 0.5
    assert R.consistency_score("<think>(2 + 3) * 4 = 20</think><answer>20</answer>") == 1.0
    assert R.consistency_score("<think>no maths here</think><answer>1</answer>") == 0.0
    # equations outside the think block do not count
    assert R.consistency_score("<think>hmm</think><answer>1 + 1 = 2</answer>") == 0.0


def test_clarity_rule():
    assert R.clarity_score(GOOD) == 1.0
    # repeated step, ends with the answer -> 2/3
    assert R.clarity_score("<think>1 + 1 = 2\n1 + 1 = 2</think><answer>2</answer>") == pytest.approx(2 / 3)
    # does not end with the answer -> 2/3
    assert R.clarity_score("<think>1 + 1 = 2</think><answer>3</answer>") == pytest.approx(2 / 3)
    assert R.clarity_score("<think> </think><answer>3</answer>") == 0.0


def test_multi_criteria_weights_and_values():
    # all four criteria perfect -> 1
    assert R.multi_criteria(GOOD, "38") == pytest.approx(1.0)
    # wrong last equation (consistency .5), wrong answer, clarity 1 (ends with its own answer), short
    bad = "<think>12 + 7 = 19\n19 * 2 = 40</think><answer>40</answer>"
    assert R.multi_criteria(bad, "38") == pytest.approx(0.4 * 0.5 + 0.3 * 0 + 0.2 * 1 + 0.1 * 1)
    # custom weights: accuracy only
    assert R.multi_criteria(bad, "38", weights={"accuracy": 1.0}) == 0.0
    assert R.multi_criteria(GOOD, "38", weights={"accuracy": 1.0}) == 1.0
    with pytest.raises(ValueError):
        R.multi_criteria(GOOD, "38", weights={"style": 1.0})


def test_registry_total_and_unknown():
    ctx = R.RewardContext(length_budget=10)
    out = R.reward_breakdown(GOOD, prob("38"), {"accuracy": 1.0, "format": 0.5, "length": 1.0}, ctx)
    assert out["accuracy"] == 1.0 and out["format"] == 1.0
    assert out["length"] == -1.0  # 55 chars >> 2 * 10
    assert out["total"] == pytest.approx(1.0 + 0.5 - 1.0)
    with pytest.raises(ValueError, match="unknown reward"):
        R.total_reward(GOOD, prob("38"), {"nope": 1.0})
    assert set(R.REWARDS) >= {"accuracy", "format", "length", "multi", "consistency", "clarity", "efficiency"}


# (pred, gold, match): the cases plus the tolerance rule's edges. math-verify (a test peer)
# gives the same verdict on every row; our rule in words: exact rationals, and when one side is a
# decimal and neither a plain integer, both rounded to 6 places.
ANSWER_TABLE = [
    ("1/2/3", "1/6", True), ("1/2/3", "1.5", False),             # left to right, not 1/(2/3)
    ("1,2", "12", False), ("4 2", "42", False), ("12,34", "1234", False), ("1,2345", "12345", False),
    ("1,234,567", "1234567", True), ("1,234", "1234", True), ("1 000", "1000", True),
    ("1/3", "0.3333333333", True), ("0.3333333333", "1/3", True), ("2/3", "0.6666666667", True),
    ("0.333333", "1/3", True), ("0.3333334", "1/3", True), ("0.3333336", "1/3", False),
    ("0.33", "1/3", False), ("1/3", "0.333", False), ("0.667", "2/3", False), ("0.666666", "2/3", False),
    ("0.5000001", "0.5", True), ("0.5000001", "1/2", True), ("1.0000001", "1", False),
    ("12.0000004", "12", False), ("0.5", "1/2", True), ("1000.0", "1,000", True), ("$12.50", "12.5", True),
    ("50%", "50", True), ("-3/6", "-0.5", True), ("3.", "3", True), ("7", "8", False), ("2.5", "5/2", True),
]


@pytest.mark.parametrize("pred,gold,ok", ANSWER_TABLE)
def test_answers_match_table(pred, gold, ok):
    assert R.answers_match(pred, gold) is ok
    assert R.is_correct(f"<think>x</think><answer>{pred}</answer>", gold) is ok


def test_answers_match_agrees_with_math_verify():
    """The peer oracle: on every row of ANSWER_TABLE math-verify's verdict is ours (and the table's)."""
    mv = pytest.importorskip("math_verify")
    disagree = [(p, g, ok) for p, g, ok in ANSWER_TABLE
                if not bool(mv.verify(mv.parse(g), mv.parse(p))) == R.answers_match(p, g) == ok]
    assert not disagree


def test_parse_number_is_exact_and_strict():
    from fractions import Fraction
    assert R.parse_number("1/2/3") == Fraction(1, 6)
    assert R.parse_number("1 / 4") == Fraction(1, 4)
    assert R.parse_number("0.1") == Fraction(1, 10)                  # exact, not the float 0.1
    for bad in ("1,2", "4 2", "1,23", "1,,234", "1, 234", "1/0", "1/2/0", "", "/", "1/", "--1", "1.2.3"):
        assert R.parse_number(bad) is None, bad


def test_format_rejects_text_after_the_answer():
    assert R.format_score("<think>a</think><answer>1</answer>") == 1.0
    assert R.format_score("<think>a</think><answer>1</answer> and then more") == 0.0
    assert R.format_score("<think>a</think><answer>1</answer>\n2") == 0.0
