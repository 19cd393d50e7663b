"""Quality filters: character entropy and perplexity under a small reference n-gram model.

- Entropy: Shannon entropy of the document's character distribution, ``H = -sum p(c) log2 p(c)``
  (bits per character). English prose sits near 4.2 bits, Chinese near 9; keyboard mashing,
  repeated-character junk and long runs of one token score far lower.
- Perplexity: a character n-gram model (order ``n``, default 3) with hashed counts (``2**bits``
  buckets per order) and fixed-weight interpolation (Jelinek-Mercer) down to a uniform floor::

      P(c | h) = l_n P_n(c | h_{n-1}) + ... + l_1 P_1(c) + l_0 / V,   P_k = count_k(h c) / count_{k-1}(h)

  with ``l = (0.05, 0.15, 0.3, 0.5)`` for ``(uniform, 1, 2, 3)`` (orders above 3 split the top weight)
  and ``V = 65536``. Deviation from CCNet (a KenLM 5-gram trained on Wikipedia): we have no separate
  reference corpus offline, so the pipeline trains one model per domain on (a sample of) that domain's
  documents and keeps the ``keep_fraction`` least perplexing documents of each domain: it drops the
  domain's outliers (garbled text, tables, other languages), not "un-Wikipedia-like" text.
"""
from __future__ import annotations

import math

import numpy as np

_MIX = np.uint64(0x9E3779B97F4A7C15)
_MUL = np.uint64(1_000_003)
_V = 65536


def char_entropy(text: str) -> float:
    """Bits per character of the character distribution.

    >>> char_entropy("aaaa"), char_entropy("abab"), round(char_entropy("abcd"), 3)
    (0.0, 1.0, 2.0)
    """
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in _char_counts_in_first_seen_order(text)) + 0.0


def _char_counts_in_first_seen_order(text: str) -> list[int]:
    """``list(Counter(text).values())`` (counted with numpy): the same integers in the same order,
    so :func:`char_entropy` sums the same floats in the same order (bit-identical)."""
    if text.isascii():
        counts = np.bincount(np.frombuffer(text.encode("ascii"), dtype=np.uint8), minlength=128)
        present = np.flatnonzero(counts).tolist()
        present.sort(key=lambda c: text.find(chr(c)))
        return counts[present].tolist()
    cp = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    _, first, counts = np.unique(cp, return_index=True, return_counts=True)
    return counts[np.argsort(first)].tolist()


def _codepoints(text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)


def _weights(order: int) -> list[float]:
    base = {1: [0.05, 0.95], 2: [0.05, 0.35, 0.6], 3: [0.05, 0.15, 0.3, 0.5]}
    if order in base:
        return base[order]
    top = 0.5 / (order - 2)
    return [0.05, 0.15, 0.3] + [top] * (order - 2)


class NgramLM:
    """Hashed, interpolated character n-gram model. ``fit`` once, then ``perplexity`` per document.

    >>> lm = NgramLM(order=3).fit(["the cat sat on the mat. " * 20])
    >>> lm.perplexity("the cat sat on the mat.") < lm.perplexity("zqxj vkw pfh gbd yq")
    True
    """

    def __init__(self, order: int = 3, bits: int = 20):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order, self.bits = order, bits
        self.lambdas = _weights(order)
        self.tables = [np.zeros(1 << bits, dtype=np.int64) for _ in range(order)]  # tables[k-1]: k-grams
        self.total = 0

    def _keys(self, cp: np.ndarray) -> list[np.ndarray]:
        """keys[k-1][i] = bucket of the k-gram ending at position i (positions padded with BOS=0)."""
        pad = np.concatenate([np.zeros(self.order - 1, dtype=np.uint64), cp])
        h = pad.copy()
        out = []
        shift = np.uint64(64 - self.bits)
        for k in range(1, self.order + 1):
            if k > 1:
                h = np.concatenate([np.zeros(1, dtype=np.uint64), h[:-1]]) * _MUL + pad
            out.append(((h * _MIX) >> shift)[self.order - 1:].astype(np.int64))
        return out

    @staticmethod
    def _ctx_keys(keys: list[np.ndarray]) -> list[np.ndarray]:
        """ctx[k-2][i] = bucket of the (k-1)-gram before position i, for k >= 2. Before position 0 the
        context is all BOS padding (hash 0 -> bucket 0; never counted, so it contributes nothing)."""
        return [np.concatenate([np.zeros(1, dtype=np.int64), keys[k - 2][:-1]]) for k in range(2, len(keys) + 1)]

    def fit(self, texts, batch_chars: int = 1 << 20) -> "NgramLM":
        """Count n-grams of ``texts`` (batched: one ``bincount`` per order per ~1M characters)."""
        pending: list[list[np.ndarray]] = []
        size = 0

        def flush() -> None:
            nonlocal pending, size
            if pending:
                for k in range(self.order):
                    key = np.concatenate([p[k] for p in pending])
                    self.tables[k] += np.bincount(key, minlength=1 << self.bits)
            pending, size = [], 0

        with np.errstate(over="ignore"):
            for t in texts:
                if not t:
                    continue
                pending.append(self._keys(_codepoints(t)))
                size += len(t)
                self.total += len(t)
                if size >= batch_chars:
                    flush()
            flush()
        return self

    def log_prob(self, text: str) -> np.ndarray:
        """Natural-log probability of every character of ``text``."""
        if not text:
            return np.zeros(0)
        cp = _codepoints(text)
        with np.errstate(over="ignore"):
            keys = self._keys(cp)
            ctx = self._ctx_keys(keys)
        p = np.full(len(cp), self.lambdas[0] / _V)
        uni = self.tables[0][keys[0]]
        p += self.lambdas[1] * uni / max(self.total, 1)
        for k in range(2, self.order + 1):
            num = self.tables[k - 1][keys[k - 1]]
            den = self.tables[k - 2][ctx[k - 2]]
            p += self.lambdas[k] * np.where(den > 0, num / np.maximum(den, 1), 0.0)
        return np.log(p)

    def perplexity(self, text: str) -> float:
        lp = self.log_prob(text)
        return float(np.exp(-lp.mean())) if lp.size else float("inf")


def fit_plan(total_chars: int, fit_chars: int) -> tuple[int, int]:
    """How to fit a domain's reference model on at most ``fit_chars`` of its ``total_chars``
    (0: all): ``(stride, bits)``, every ``stride``-th document and ``2**bits`` hash buckets an order
    (about two per fitted character, between 2**14 and 2**22).

    >>> fit_plan(10_000_000, 4_000_000), fit_plan(1000, 0), fit_plan(1000, 4_000_000)
    ((3, 22), (1, 14), (1, 14))
    """
    stride = max(1, math.ceil(total_chars / fit_chars)) if fit_chars else 1
    fitted = min(total_chars, fit_chars or total_chars)
    return stride, min(22, max(14, math.ceil(math.log2(max(2, 2 * fitted)))))


def keep_threshold(scores: list[float], keep_fraction: float) -> float:
    """The largest perplexity kept when keeping the ``keep_fraction`` lowest scores (ties kept).

    >>> keep_threshold([5.0, 1.0, 3.0, 2.0], 0.5), keep_threshold([1.0, 2.0], 1.0)
    (2.0, inf)
    """
    if keep_fraction >= 1.0 or not scores:
        return float("inf")
    k = max(1, int(math.ceil(keep_fraction * len(scores))))
    return float(sorted(scores)[k - 1])
