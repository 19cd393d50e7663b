"""Synthetic tasks: determinism, true worked steps, correct answers, difficulty, disjoint train/eval."""
from __future__ import annotations

from fractions import Fraction

import pytest

from tinyseek.errors import UserError
from tinyseek.post import rewards
from tinyseek.tasks import TASKS, check_countdown, format_solution, get_task
from tinyseek.tasks.common import bucket, check_equations, eval_exact, fmt_num

N = {"arithmetic": 40, "chain_sum": 40, "countdown": 15, "gsm": 25}


def answer_is_right(name, p) -> bool:
    if name == "countdown":
        return check_countdown(p.answer, p.meta["numbers"], p.meta["target"])
    if name in ("arithmetic", "chain_sum"):
        return eval_exact(p.meta["expression"])[0] == int(p.answer)
    return float(p.answer) == float(p.solution.replace(",", "").split("=")[-1].split()[0].strip("$€£.")) \
        or p.answer in p.solution.replace(",", "")


@pytest.mark.parametrize("name", list(TASKS))
def test_problems_are_correct_and_deterministic(name):
    task = get_task(name)
    ps = task.generate(N[name], seed=3)
    assert len(ps) == N[name]
    assert [p.prompt for p in ps] == [p.prompt for p in task.generate(N[name], seed=3)]
    assert [p.prompt for p in ps[:5]] == [p.prompt for p in task.generate(5, seed=3)]   # prefix-stable
    assert [p.prompt for p in ps] != [p.prompt for p in task.generate(N[name], seed=4)]
    for p in ps:
        assert p.prompt and p.solution and p.answer
        good, total = check_equations(p.solution)
        assert good == total, p.solution            # every checkable step is true
        if name != "gsm":
            assert total >= 1                       # our own generators always show equations
        assert answer_is_right(name, p), p
        assert format_solution(p) == f"<think>{p.solution}</think><answer>{p.answer}</answer>"
        assert p.meta["task"] == name and p.meta["split"] == "train"


@pytest.mark.parametrize("name", list(TASKS))
def test_difficulty_levels(name):
    task = get_task(name)
    for d in (1, task.MAX_DIFFICULTY):
        ps = task.generate(6, seed=1, difficulty=d)
        assert all(p.difficulty == d for p in ps)
    if name in ("arithmetic", "chain_sum"):  # difficulty = number of operations
        assert all(len(p.solution.splitlines()) == 3 for p in task.generate(5, seed=0, difficulty=3))
    if name == "countdown":                   # difficulty = numbers - 2
        assert all(len(p.meta["numbers"]) == 4 for p in task.generate(5, seed=0, difficulty=2))
    assert task.generate(2, seed=0, difficulty=99)[0].difficulty == task.MAX_DIFFICULTY  # clamped


@pytest.mark.parametrize("name", list(TASKS))
def test_train_and_eval_never_share_a_problem(name):
    task = get_task(name)
    k = 10 if name == "countdown" else 60
    train = task.generate(k, seed=0, difficulty=1, split="train")
    ev = task.generate(k, seed=0, difficulty=1, split="eval")
    assert all(bucket(p.prompt) == "train" for p in train)
    assert all(bucket(p.prompt) == "eval" for p in ev)
    assert not {p.prompt for p in train} & {p.prompt for p in ev}


def test_countdown_checker():
    assert check_countdown("(25 + 3) * 4", [3, 4, 25, 7], 112)
    assert check_countdown("8 / (3 - 8 / 3)", [8, 3, 8, 3], 24)      # exact fractions
    assert not check_countdown("25 * 4 + 12", [3, 4, 25], 112)        # 12 not given
    assert not check_countdown("3 + 3", [3, 4], 6)                    # 3 used twice
    assert not check_countdown("(25 + 3) * 4", [3, 4, 25], 113)       # wrong value
    assert not check_countdown("__import__('os')", [1], 1)            # not arithmetic
    assert not check_countdown("", [1], 1) and not check_countdown("5 / 0", [5, 0], 1)
    from tinyseek.tasks.countdown import solve
    expr, steps = solve([3, 4, 25, 7], 112)
    assert check_countdown(expr, [3, 4, 25, 7], 112) and len(steps) == 2


def test_rewards_accept_our_answers():
    for name in TASKS:
        for p in get_task(name).generate(4, seed=9, difficulty=1):
            assert rewards.is_correct(format_solution(p), p.answer, p.meta), (name, p)


@pytest.mark.parametrize("num,den", [(1, 3), (2, 3), (-7, 9), (22, 7), (1, 8), (5, 2), (1000001, 3)])
def test_non_integer_golds_accept_the_exact_answer(num, den):
    """A gold stored by ``fmt_num`` (10 decimals at most) and the exact fraction match both ways."""
    gold = fmt_num(Fraction(num, den))
    for pred in (f"{num}/{den}", gold):
        assert rewards.answers_match(pred, gold) and rewards.answers_match(gold, pred), (pred, gold)
    assert not rewards.answers_match(f"{num + 1}/{den}", gold)


def test_bad_arguments():
    with pytest.raises(UserError, match="unknown task"):
        get_task("chess")
    with pytest.raises(UserError, match="split"):
        get_task("arithmetic").generate(2, seed=0, split="test")
    with pytest.raises(UserError, match=">= 0"):
        get_task("arithmetic").generate(-1, seed=0)
