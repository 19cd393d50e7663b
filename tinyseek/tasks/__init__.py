"""Synthetic reasoning tasks: seeded generators of (prompt, worked solution, answer) problems.

``get_task(name)`` returns a module with ``generate(n, seed, difficulty=None, split="train") ->
list[Problem]``. Tasks: ``arithmetic`` (multi-step + - * with parentheses), ``countdown`` (reach a
target from given numbers), ``chain_sum`` (running sums), ``gsm`` (reasoning-gym ``gsm_symbolic``
GSM8K templates, offline). Each worked solution is a list of steps whose equations are true
(``3 + 4 = 7``); :func:`format_solution` renders the SFT target ``<think>…</think><answer>…</answer>``.

Determinism and held-out split (see :mod:`tinyseek.tasks.common`):

- ``generate(n, seed, ...)`` is a pure function of its arguments: problem ``i`` comes from its own RNG
  seeded by ``(task, split, seed, i)``, so the first ``k`` problems of ``generate(n)`` equal
  ``generate(k)``.
- Train and eval never share a problem, whatever seeds callers use: every problem has a *split bucket*
  from a hash of its prompt text (1 in :data:`EVAL_BUCKETS` prompts are eval); ``split="train"`` draws
  only train-bucket problems and ``split="eval"`` only eval-bucket ones (rejection sampling).
- Seeds: callers use seeds below :data:`EVAL_SEED_BASE` for training and ``EVAL_SEED_BASE + k`` for
  held-out sets (as :mod:`tinyseek.post.common` does), so even ``split="any"`` streams differ.
"""
from __future__ import annotations

import importlib
from types import ModuleType

from tinyseek.errors import UserError
from tinyseek.tasks.common import EVAL_BUCKETS, EVAL_SEED_BASE, Problem, format_solution  # noqa: F401
from tinyseek.tasks.countdown import check_countdown  # noqa: F401 (re-exported)

# task name -> module (each has generate(n, seed, difficulty=None, split="train") and MAX_DIFFICULTY)
TASKS: dict[str, str] = {
    "arithmetic": "tinyseek.tasks.arithmetic",
    "countdown": "tinyseek.tasks.countdown",
    "chain_sum": "tinyseek.tasks.chain_sum",
    "gsm": "tinyseek.tasks.gsm",
}


def get_task(name: str) -> ModuleType:
    """The task module named ``name`` (``UserError`` for unknown names)."""
    if name not in TASKS:
        raise UserError(f"unknown task {name!r}; choose one of {', '.join(TASKS)}")
    return importlib.import_module(TASKS[name])

