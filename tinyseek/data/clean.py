"""Text cleanup (NFKC, control characters, whitespace) and language-agnostic quality heuristics.

Heuristics follow Gopher (Rae et al. 2021, App. A) with two deviations: "words" are whitespace
tokens *plus every CJK character on its own* (Chinese has no spaces, so counting space-separated
words would call a whole article one word), and the mean-word-length rule only looks at non-CJK
words and is skipped for text that is mostly CJK. Code and generated maths are symbol-heavy by
nature: the pipeline checks them against a relaxed :class:`HeuristicConfig`.
"""
from __future__ import annotations

import re
import unicodedata
from collections import Counter
from dataclasses import dataclass

# C0/C1 controls except \t \n (\r handled first), zero-width/bidi marks, BOM, line/paragraph separators
_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_TRAIL_WS = re.compile(r"[ \t]+$", re.M)
_BLANK_RUN = re.compile(r"\n{3,}")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_WORD_RE = re.compile(rf"[{_CJK}]|[^\s{_CJK}]+")
_CJK_RE = re.compile(rf"[{_CJK}]")
_SPACE_RE = re.compile(r"\s")
_SYMBOL_RE = re.compile(r"[^\w\s]|_")


def clean_text(s: str) -> str:
    """NFKC; CRLF -> LF; drop control/zero-width characters; strip trailing spaces; at most one
    blank line in a row; no leading/trailing blank lines (indentation is kept: code stays valid).

    >>> clean_text("ＡＢＣ１２３\\r\\nline  \\x00\\u200b\\n\\n\\n\\nnext\\tok ")
    'ABC123\\nline\\n\\nnext\\tok'
    """
    s = unicodedata.normalize("NFKC", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    s = _CTRL.sub("", s)
    s = _TRAIL_WS.sub("", s)
    s = _BLANK_RUN.sub("\n\n", s)
    return s.strip("\n")


def words(s: str) -> list[str]:
    """Whitespace tokens, with each CJK character a word of its own.

    >>> words("Hello, world 你好世界")
    ['Hello,', 'world', '你', '好', '世', '界']
    """
    return _WORD_RE.findall(s)


def cjk_fraction(s: str) -> float:
    """Share of non-space characters that are CJK.

    >>> cjk_fraction("ab 你好")
    0.5
    """
    n = sum(1 for c in s if not c.isspace())
    return len(_CJK_RE.findall(s)) / n if n else 0.0


def symbol_ratio(s: str) -> float:
    """Share of non-space characters that are neither letters nor digits.

    >>> symbol_ratio("ab,. 12")
    0.3333333333333333
    """
    n = len(s) - len(_SPACE_RE.findall(s))
    return len(_SYMBOL_RE.findall(s)) / n if n else 0.0


def dup_line_fraction(s: str) -> float:
    """Share of non-empty lines that repeat an earlier line of the same document.

    >>> dup_line_fraction("a\\nb\\na\\n\\na")
    0.5
    """
    seen, dup, n = set(), 0, 0
    for line in s.split("\n"):
        line = line.strip()
        if not line:
            continue
        n += 1
        if line in seen:
            dup += 1
        seen.add(line)
    return dup / n if n else 0.0


def top_ngram_fraction(ws: list[str], n: int = 3) -> float:
    """Share of word characters covered by the most frequent word n-gram (Gopher's rule).

    >>> round(top_ngram_fraction("a b c a b c a b c x".split(), 3), 2)
    0.9
    """
    if len(ws) < n + 1:
        return 0.0
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in ws)
    return min(1.0, count * sum(len(w) for w in gram) / total) if total else 0.0


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
    ws = words(s)
    if len(ws) < cfg.min_words:
        return "too_few_words"
    if symbol_ratio(s) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if dup_line_fraction(s) > cfg.max_dup_line_frac:
        return "repeated_lines"
    if top_ngram_fraction(ws, 3) > cfg.max_top_3gram_frac:
        return "repeated_ngrams"
    if cjk_fraction(s) < 0.5:
        latin = [w for w in ws if not _CJK_RE.match(w)]
        if len(latin) >= 5:
            mean = sum(len(w) for w in latin) / len(latin)
            if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
                return "mean_word_length"
    return None
