"""Incremental detokenization with stop strings, for streaming.

The text of a request is re-decoded from all its generated ids after each token (our completions are
short; decoding a few hundred ids is microseconds), then:
- a stop string ends the request and is cut from the text (OpenAI semantics: not returned);
- what may be streamed is the text minus a held-back tail: a trailing partial UTF-8 character
  (decoded as U+FFFD) or a suffix that could still grow into a stop string (or into a word the
  safety filter blocks), so a client never receives text that later turns out to be cut.
"""
from __future__ import annotations


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


class TextTracker:
    """Decoded text of one request's generated ids plus how much of it was already streamed."""

    def __init__(self, tokenizer, stops: list[str], holds: list[str] | None = None):
        self.tok = tokenizer
        self.stops = [s for s in stops if s]
        self.holds = self.stops + [h for h in (holds or []) if h]
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
        end = len(self.text) if final else safe_prefix_len(self.text, self.holds)
        if end <= self.emitted:
            return ""
        delta = self.text[self.emitted:end]
        self.emitted = end
        return delta
