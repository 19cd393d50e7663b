"""The recipe's stages as a run folder records them: names, order, what each reads, and markers.

``tinyseek run`` (:mod:`tinyseek.pipeline`) writes these markers and :mod:`tinyseek.report` reads
them; both import this module and neither imports the other for it.

A stage that succeeded leaves ``runs/<name>/stages/<stage>.json``: its metrics plus a ``_marker``
entry (``{"id", "settings", "after": {stage: id}}``) that the pipeline uses to tell an up-to-date
stage from a stale one. A marker that is missing or not JSON means the stage is not done.
"""
from __future__ import annotations

import json
from pathlib import Path

STAGE_ORDER = ("import", "data", "pretrain", "sft", "grpo", "quantize", "eval", "export", "serve", "report")
# the stages a preset runs, in order (the others are not part of that recipe)
PRETRAIN_STAGES = ("data", "pretrain", "sft", "grpo", "quantize", "eval", "export", "serve", "report")
IMPORT_STAGES = ("import", "sft", "grpo", "quantize", "eval", "export", "serve", "report")
IMPORT_PRESETS = ("smollm2", "smollm2-gpu")  # presets that start from a real pretrained model
# what each stage reads besides its own settings: redoing one of these makes the stage stale
DEPENDS: dict[str, tuple[str, ...]] = {
    "import": (), "data": (), "pretrain": ("data",), "sft": ("pretrain", "import"), "grpo": ("sft",),
    "quantize": ("grpo", "data"),  # data: the calibration / held-out perplexity shards
    "eval": ("import", "sft", "grpo", "quantize"), "export": ("grpo",), "serve": ("quantize", "grpo"),
    "report": STAGE_ORDER[:-1],
}


def stages_for(preset_name: str) -> tuple[str, ...]:
    """The stages preset ``preset_name`` runs, in order.

    >>> stages_for("smollm2")[:2], stages_for("micro")[:2]
    (('import', 'sft'), ('data', 'pretrain'))
    """
    return IMPORT_STAGES if preset_name in IMPORT_PRESETS else PRETRAIN_STAGES


def dependents(stage: str, order: tuple[str, ...]) -> list[str]:
    """Every stage of ``order`` that reads ``stage``'s output, directly or through others.

    >>> dependents("quantize", PRETRAIN_STAGES)
    ['eval', 'serve', 'report']
    """
    out: list[str] = []
    for s in order:
        if any(d == stage or d in out for d in DEPENDS[s] if d in order):
            out.append(s)
    return out


def marker(run: Path, stage: str) -> Path:
    """Where ``stage``'s marker lives in run folder ``run``."""
    return run / "stages" / f"{stage}.json"


def is_done(run: Path, stage: str) -> bool:
    """True when ``stage``'s marker exists and is JSON (a marker is written atomically, last)."""
    m = marker(run, stage)
    if not m.exists():
        return False
    try:
        json.loads(m.read_text())
        return True
    except json.JSONDecodeError:
        return False


def _read_marker(run: Path, stage: str) -> dict:
    """The marker's JSON object, read and parsed once ({} when ``stage`` is not done)."""
    try:
        d = json.loads(marker(run, stage).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return d if isinstance(d, dict) else {}


def stage_result(run: Path, stage: str) -> dict:
    """The metrics a stage recorded ({} if it is not done), without the marker's bookkeeping."""
    d = _read_marker(run, stage)
    d.pop("_marker", None)
    return d


def marker_inputs(run: Path, stage: str) -> dict:
    """``{"id", "settings", "after": {stage: id}}`` recorded by a stage's marker; {} for a marker
    written before markers recorded their inputs."""
    m = _read_marker(run, stage).get("_marker")
    return m if isinstance(m, dict) else {}
