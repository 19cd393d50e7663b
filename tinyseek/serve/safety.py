"""Safety filter for served prompts and outputs: a keyword blocklist plus an optional classifier hook.

- Blocklist: case-insensitive whole-word (or whole-phrase) matches; entries come from the config
  and/or a file (one per line, ``#`` comments).
- Text is checked after :func:`normalize`: NFKC (full-width and other compatibility forms become
  their plain letters) and removal of invisible format characters (zero-width space / joiners, word
  joiner, BOM, soft hyphen, bidi marks: Unicode category Cf), so ``bo\u200bmb`` matches ``bomb``.
- Classifier hook: any callable ``text -> float | bool`` (a score in [0, 1], or True = unsafe),
  given as ``"package.module:function"`` in the server config; text scoring at or above
  ``threshold`` is refused. It is called on the prompt and on the final output (and on the text
  streamed so far, at most every ``classifier_every`` characters).

This is a policy hook, not a trained moderation model: what is blocked is what the operator lists.
"""
from __future__ import annotations

import importlib
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tinyseek.errors import UserError

DEFAULT_REFUSAL = "I can't help with that request."


def normalize(text: str) -> str:
    """``text`` as the filter sees it: NFKC, without format characters (category Cf: U+200B..U+200D,
    U+2060, U+FEFF, U+00AD soft hyphen, bidi controls ...).

    >>> normalize("bo\u200bm\u00adb \uff42\uff4f\uff4d\uff42 \ufeffok\u2060")
    'bomb bomb ok'
    """
    text = unicodedata.normalize("NFKC", text)
    if text.isascii():
        return text
    return "".join(c for c in text if unicodedata.category(c) != "Cf")


def compile_blocklist(words: list[str]) -> re.Pattern | None:
    """One regex matching any entry as a whole word / phrase, ignoring case and runs of spaces.

    >>> p = compile_blocklist(["bomb", "credit card number"])
    >>> bool(p.search("how to build a BOMB?")), bool(p.search("bombastic")), bool(p.search("credit  card number"))
    (True, False, True)
    >>> compile_blocklist([]) is None
    True
    """
    words = [w.strip() for w in words if w and w.strip()]
    if not words:
        return None
    alts = [r"\s+".join(re.escape(part) for part in w.split()) for w in sorted(words, key=len, reverse=True)]
    return re.compile(r"(?<!\w)(?:" + "|".join(alts) + r")(?!\w)", re.IGNORECASE)


def read_blocklist(path: str | Path) -> list[str]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"blocklist file {p} does not exist")
    return [ln.strip() for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.startswith("#")]


def load_hook(spec: str) -> Callable[[str], float | bool]:
    """Import ``"package.module:function"``."""
    mod, _, fn = spec.partition(":")
    if not mod or not fn:
        raise UserError(f"classifier must look like 'package.module:function', got {spec!r}")
    try:
        f = getattr(importlib.import_module(mod), fn)
    except (ImportError, AttributeError) as e:
        raise UserError(f"cannot load classifier {spec!r}: {e}") from None
    if not callable(f):
        raise UserError(f"classifier {spec!r} is not callable")
    return f


@dataclass
class Verdict:
    blocked: bool
    reason: str = ""  # "keyword: <word>" or "classifier: <score>"


class SafetyFilter:
    def __init__(self, blocklist: list[str] | None = None, classifier: Callable[[str], float | bool] | None = None,
                 threshold: float = 0.5, refusal: str = DEFAULT_REFUSAL):
        self.words = list(blocklist or [])
        self.pattern = compile_blocklist([normalize(w) for w in self.words])
        self.classifier = classifier
        self.threshold = threshold
        self.refusal = refusal

    @property
    def active(self) -> bool:
        return self.pattern is not None or self.classifier is not None

    def check(self, text: str, use_classifier: bool = True) -> Verdict:
        """Is ``text`` allowed? Keywords first, then the classifier, both on :func:`normalize` (text)."""
        text = normalize(text)
        if self.pattern is not None:
            m = self.pattern.search(text)
            if m:
                return Verdict(True, f"keyword: {m.group(0).lower()}")
        if use_classifier and self.classifier is not None:
            score = self.classifier(text)
            score = float(score) if not isinstance(score, bool) else (1.0 if score else 0.0)
            if score >= self.threshold:
                return Verdict(True, f"classifier: {score:.3f}")
        return Verdict(False)

    @classmethod
    def from_config(cls, blocklist: list[str], blocklist_file: str = "", classifier: str = "",
                    threshold: float = 0.5, refusal: str = DEFAULT_REFUSAL) -> "SafetyFilter":
        words = list(blocklist) + (read_blocklist(blocklist_file) if blocklist_file else [])
        return cls(words, load_hook(classifier) if classifier else None, threshold, refusal)
