"""Curriculum: which task difficulty (number of digits / steps) to train on at each RL step.

Schedules (pure functions of the step, chosen from a dict):

- ``fixed``: always ``start``.
- ``linear``: ``start`` -> ``end`` in equal stages over the run.
- ``mixed``: each problem draws a level uniformly from ``start .. level(step)`` of the linear
  schedule, so easy problems keep appearing (avoids forgetting them).
"""
from __future__ import annotations

import random
from typing import Callable


def fixed_level(step: int, total: int, start: int, end: int) -> int:
    """Always ``start``.

    >>> fixed_level(50, 100, 1, 3)
    1
    """
    return start


def linear_level(step: int, total: int, start: int, end: int) -> int:
    """Equal stages from ``start`` to ``end``.

    >>> [linear_level(s, 90, 1, 3) for s in (0, 29, 30, 60, 89)]
    [1, 1, 2, 3, 3]
    """
    n_levels = end - start + 1
    return min(end, start + step * n_levels // max(1, total))


SCHEDULES: dict[str, Callable[[int, int, int, int], int]] = {
    "fixed": fixed_level, "linear": linear_level, "mixed": linear_level,
}


def levels_for_step(schedule: str, step: int, total: int, start: int, end: int, n: int,
                    rng: random.Random) -> list[int]:
    """Difficulty level of each of the ``n`` problems at ``step``.

    >>> levels_for_step("linear", 0, 10, 1, 2, 3, random.Random(0))
    [1, 1, 1]
    >>> sorted(set(levels_for_step("mixed", 9, 10, 1, 3, 50, random.Random(0))))
    [1, 2, 3]
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown curriculum {schedule!r}; choose from {', '.join(SCHEDULES)}")
    top = SCHEDULES[schedule](step, total, start, end)
    if schedule == "mixed":
        return [rng.randint(start, top) for _ in range(n)]
    return [top] * n
