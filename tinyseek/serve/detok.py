"""Incremental detokenization with stop strings, for streaming.

The text of a request is re-decoded from all its generated ids after each token (our completions are
short; decoding a few hundred ids is microseconds), then:
- a stop string ends the request and is cut from the text (OpenAI semantics: not returned);
- what may be streamed is the text minus a held-back tail: a trailing partial UTF-8 character
  (decoded as U+FFFD) or a suffix that could still grow into a stop string (or into a word the
  safety filter blocks), so a client never receives text that later turns out to be cut. Blocked
  words are held back as the filter compares them (:func:`fold`: NFKC, case-folded, format characters
  such as zero-width spaces dropped, whitespace runs as one space), so ``BO``, ``bo\u200b`` or
  ``ｂｏ`` wait as ``bo`` does; stop strings match exactly (OpenAI semantics).
"""
from __future__ import annotations

import unicodedata


def find_stop(text: str, stops: list[str], start: int = 0) -> tuple[int, str] | None:
    """Earliest occurrence of any stop string at or after ``start``: ``(index, stop)`` or None.

    >>> find_stop("a cat. The end", ["end", "."])
    (5, '.')
    >>> find_stop("abc", ["x"]) is None
    True
    """
    best = None
    for s in stops:
        if not s:
            continue
        i = text.find(s, start)
        if i >= 0 and (best is None or i < best[0]):
            best = (i, s)
    return best


def safe_prefix_len(text: str, holds: list[str]) -> int:
    """Length of the prefix of ``text`` that can be emitted now: drop a trailing U+FFFD run (an
    unfinished multi-byte character) and the longest suffix that is a proper prefix of a ``holds``
    string.

    >>> safe_prefix_len("hello wor", ["world"])
    6
    >>> safe_prefix_len("hello", ["xyz"])
    5
    >>> safe_prefix_len("caf\\ufffd", [])
    3
    """
    n = len(text.rstrip("\ufffd"))
    hold = 0
    for s in holds:
        for k in range(min(len(s) - 1, n), hold, -1):
            if text[n - k:n] == s[:k]:
                hold = k
                break
    return n - hold


def fold(text: str) -> str:
    """``text`` as held-back words are compared: per character NFKC + casefold, format characters
    (Unicode Cf: zero-width space / joiners, soft hyphen, BOM ...) dropped, whitespace runs as one space.

    >>> fold("Bo\u200bMB\u00ad  \uff42")
    'bomb b'
    """
    out: list[str] = []
    for c in text:
        if c.isspace():
            if not out or out[-1] != " ":
                out.append(" ")
        else:
            out.append(_fold_char(c))
    return "".join(out)


def _fold_char(c: str) -> str:
    """One non-space character as :func:`fold` sees it ("" for a format character)."""
    return "" if unicodedata.category(c) == "Cf" else unicodedata.normalize("NFKC", c).casefold()


def held_word_len(text: str, n: int, words: list[str]) -> int:
    """The longest number of characters at the end of ``text[:n]`` whose :func:`fold` is a non-empty
    proper prefix of one of ``words`` (already folded): what must wait before streaming.

    >>> held_word_len("how to build a BO\u200bm", 19, ["bomb"])
    4
    >>> held_word_len("a bombastic", 11, ["bomb"]), held_word_len("fine", 4, ["bomb"])
    (0, 0)
    """
    longest = max((len(w) for w in words), default=0)
    hold, acc = 0, ""
    for k in range(1, n + 1):
        c = text[n - k]
        if c.isspace():
            if not acc.startswith(" "):
                acc = " " + acc
        else:
            acc = _fold_char(c) + acc
        if len(acc) >= longest:
            break
        if acc and acc.strip() and any(w.startswith(acc) for w in words):
            hold = k
    return hold


class TextTracker:
    """Decoded text of one request's generated ids plus how much of it was already streamed."""

    def __init__(self, tokenizer, stops: list[str], holds: list[str] | None = None):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.words = [f for f in (fold(h).strip() for h in (holds or [])) if f]  # safety words, folded
        self.max_stop = max((len(s) for s in self.stops), default=0)
        self.text = ""
        self.emitted = 0          # characters already handed out as deltas
        self.stopped: str | None = None

    def update(self, ids: list[int]) -> str:
        """Re-decode ``ids``; cut at a stop string if one appeared (sets ``stopped``); return the new
        streamable delta."""
        prev = len(self.text)
        text = self.tok.decode(ids)
        if self.stops:
            hit = find_stop(text, self.stops, max(0, min(prev, len(text)) - self.max_stop))
            if hit is not None:
                text, self.stopped = text[:hit[0]], hit[1]
        self.text = text
        return self.flush(final=self.stopped is not None)

    def flush(self, final: bool = True) -> str:
        """Delta up to the safe point (everything when ``final``)."""
        if final:
            end = len(self.text)
        else:
            end = safe_prefix_len(self.text, self.stops)
            end -= held_word_len(self.text, end, self.words)
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
