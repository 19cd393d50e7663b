"""Text cleanup (NFKC, control characters, whitespace) and language-agnostic quality heuristics.

Heuristics follow Gopher (Rae et al. 2021, App. A) with two deviations: "words" are whitespace
tokens *plus every CJK character on its own* (Chinese has no spaces, so counting space-separated
words would call a whole article one word), and the mean-word-length rule only looks at non-CJK
words and is skipped for text that is mostly CJK. Code and generated maths are symbol-heavy by
nature: the pipeline checks them against a relaxed :class:`HeuristicConfig`.
"""
from __future__ import annotations

import functools
import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

import numpy as np

# C0/C1 controls except \t \n (\r handled first), zero-width/bidi marks, BOM, line/paragraph separators
_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAIL_WS = re.compile(r"[ \t]+$", re.M)
_BLANK_RUN = re.compile(r"\n{3,}")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
_ASCII_CTRL = bytes([*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F])  # _CTRL's ASCII part
_SPACE, _WORD, _CJK_BIT, _UNDERSCORE = 1, 2, 4, 8   # character class bits (:func:`_class_table`)


@functools.lru_cache(maxsize=1)
def _class_table() -> np.ndarray:
    """Class bits of every BMP code point: ``\\s`` (= ``str.isspace``), ``\\w`` (= ``isalnum`` or
    ``_``), CJK (:data:`_CJK`), underscore; read by the regexes themselves, so they agree by construction."""
    chars = "".join(map(chr, range(0x10000)))
    tab = np.zeros(0x10000, dtype=np.uint8)
    for bit, rx in ((_SPACE, r"\s"), (_WORD, r"\w"), (_CJK_BIT, f"[{_CJK}]")):
        tab[[m.start() for m in re.finditer(rx, chars)]] |= bit
    tab[ord("_")] |= _UNDERSCORE
    tab.flags.writeable = False
    return tab


def _char_counts(s: str) -> tuple[int, int, int]:
    """``(non-space characters, symbols, CJK characters)`` of ``s``, as ``\\s``, ``[^\\w\\s]|_`` and
    :data:`_CJK` count them (one table lookup per code point; astral ones, never space or CJK, are
    checked with ``isalnum``)."""
    cp = np.frombuffer(s.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    tab = _class_table()
    astral = cp >= 0x10000
    if astral.any():
        cls = tab[np.where(astral, 0, cp)]  # placeholder U+0000: no class bits
        vals, inv = np.unique(cp[astral], return_inverse=True)
        cls[astral] = np.array([_WORD if chr(v).isalnum() else 0 for v in vals.tolist()], dtype=np.uint8)[inv]
    else:
        cls = tab[cp]
    hist = np.bincount(cls, minlength=16)
    space = int(hist[_SPACE::2].sum())                                    # bit 1 set
    word = int(sum(hist[i] for i in range(16) if i & _WORD))
    cjk = int(sum(hist[i] for i in range(16) if i & _CJK_BIT))
    under = int(sum(hist[i] for i in range(16) if i & _UNDERSCORE))
    nonspace = len(cp) - space
    return nonspace, nonspace - word + under, cjk


def clean_text(s: str) -> str:
    """NFKC; CRLF -> LF; drop control/zero-width characters; strip trailing spaces; at most one
    blank line in a row; no leading/trailing blank lines (indentation is kept: code stays valid).

    >>> clean_text("ＡＢＣ１２３\\r\\nline  \\x00\\u200b\\n\\n\\n\\nnext\\tok ")
    'ABC123\\nline\\n\\nnext\\tok'
    """
    if s.isascii():  # ASCII is NFKC already and has no U+2028/9; its control characters delete as bytes
        if "\r" in s:
            s = s.replace("\r\n", "\n").replace("\r", "\n")
        b = s.encode("ascii")
        clean = b.translate(None, _ASCII_CTRL)
        if len(clean) != len(b):
            s = clean.decode("ascii")
    else:
        s = unicodedata.normalize("NFKC", s)
        s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
        s = _CTRL.sub("", s)
    if " \n" in s or "\t\n" in s or s.endswith((" ", "\t")):
        s = _TRAIL_WS.sub("", s)
    if "\n\n\n" in s:
        s = _BLANK_RUN.sub("\n\n", s)
    return s.strip("\n")


def words(s: str) -> list[str]:
    """Whitespace tokens, with each CJK character a word of its own.

    >>> words("Hello, world 你好世界")
    ['Hello,', 'world', '你', '好', '世', '界']
    """
    return _WORD_RE.findall(s) if _CJK_RE.search(s) else s.split()  # no CJK: the runs of non-space


def cjk_fraction(s: str) -> float:
    """Share of non-space characters that are CJK.

    >>> cjk_fraction("ab 你好")
    0.5
    """
    n, _, cjk = _char_counts(s)
    return cjk / n if n else 0.0


def symbol_ratio(s: str) -> float:
    """Share of non-space characters that are neither letters nor digits.

    >>> symbol_ratio("ab,. 12")
    0.3333333333333333
    """
    n, sym, _ = _char_counts(s)
    return sym / n if n else 0.0


def dup_line_fraction(s: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same document.

    >>> dup_line_fraction("a\\nb\\na\\n\\na")
    0.5
    """
    lines = [line for line in map(str.strip, s.split("\n")) if line]
    n = len(lines)
    return (n - len(set(lines))) / n if n else 0.0  # every line beyond a distinct line's first repeats it


def top_ngram_fraction(ws: list[str], n: int = 3) -> float:
    """Share of word characters covered by the most frequent word n-gram (Gopher's rule).

    >>> round(top_ngram_fraction("a b c a b c a b c x".split(), 3), 2)
    0.9
    """
    return _top_ngram_fraction(ws, n, sum(map(len, ws)))


def _top_ngram_fraction(ws: list[str], n: int, total: int) -> float:
    """:func:`top_ngram_fraction` given ``total = sum(map(len, ws))``. Ties: the n-gram seen first
    (``Counter.most_common(1)`` and ``max`` both keep it)."""
    if len(ws) < n + 1:
        return 0.0
    grams = Counter(zip(*(ws[i:] for i in range(n))))
    counts = list(grams.values())
    count = max(counts)
    if count < 2:
        return 0.0
    gram = list(grams)[counts.index(count)]
    return min(1.0, count * sum(map(len, gram)) / total) if total else 0.0


@dataclass
class HeuristicConfig:
    min_chars: int = 50                  # drop shorter documents (after cleaning)
    max_chars: int = 1_000_000           # drop longer documents
    min_words: int = 10                  # words (CJK chars count one each)
    max_symbol_ratio: float = 0.3        # non-alphanumeric share of non-space characters
    max_dup_line_frac: float = 0.35      # share of non-empty lines repeating an earlier line
    max_top_3gram_frac: float = 0.2      # word-character share covered by the most frequent 3-gram
    min_mean_word_len: float = 2.0       # mean non-CJK word length bounds (skipped if mostly CJK)
    max_mean_word_len: float = 12.0      # upper bound of the same


def relaxed_heuristics() -> HeuristicConfig:
    """Thresholds for code and generated maths (symbol-heavy, short tokens, repeated patterns)."""
    return HeuristicConfig(min_chars=20, min_words=3, max_symbol_ratio=0.6, max_dup_line_frac=0.6,
                           max_top_3gram_frac=0.5, min_mean_word_len=1.0, max_mean_word_len=30.0)


def heuristic_reason(s: str, cfg: HeuristicConfig) -> str | None:
    """Why ``s`` fails the heuristics (a reason name), or None if it passes.

    >>> heuristic_reason("too short", HeuristicConfig())
    'too_short'
    >>> heuristic_reason("$#@! " * 40, HeuristicConfig())
    'symbol_ratio'
    >>> heuristic_reason("今天天气很好，我们去公园散步，看见很多人在跳舞唱歌。" * 3, HeuristicConfig()) is None
    True
    """
    if len(s) < cfg.min_chars:
        return "too_short"
    if len(s) > cfg.max_chars:
        return "too_long"
    # Every non-space character is in exactly one word, each CJK character a one-character word, so
    # the word characters number ``nonspace``, and the non-CJK words ``len(ws) - cjk`` with
    # ``nonspace - cjk`` characters: the same integers as the definitions count, so the same floats.
    nonspace, sym, cjk = _char_counts(s)
    ws = _WORD_RE.findall(s) if cjk else s.split()
    if len(ws) < cfg.min_words:
        return "too_few_words"
    if (sym / nonspace if nonspace else 0.0) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if dup_line_fraction(s) > cfg.max_dup_line_frac:
        return "repeated_lines"
    if _top_ngram_fraction(ws, 3, nonspace) > cfg.max_top_3gram_frac:
        return "repeated_ngrams"
    if (cjk / nonspace if nonspace else 0.0) < 0.5:
        n_latin = len(ws) - cjk
        if n_latin >= 5:
            mean = (nonspace - cjk) / n_latin
            if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
                return "mean_word_length"
    return None
