"""Decontamination: word n-gram overlap between training documents and the tasks' held-out problems.

A document is contaminated when it shares one word ``n``-gram (default 13, as in GPT-3 / the
DeepSeek reports' 10-13-gram filters) with a held-out problem's text, after lower-casing and dropping
punctuation. Template n-grams (shared by two held-out problems, or present in training problems of
the same task) are not counted: they are boilerplate, not a leak.
"""
from __future__ import annotations

import re
from collections import Counter

import numpy as np
import xxhash

from tinyseek.data import clean as C
from tinyseek.data.dedup import native
from tinyseek.data.sources import MATH_TASKS
from tinyseek.tasks import EVAL_SEED_BASE, get_task

_NONWORD = re.compile(r"[^\w\s]+")
_ASCII_NONWORD = bytes(c for c in range(128) if not re.match(r"[\w\s]", chr(c)))  # what _NONWORD deletes
_CJK_NONWORD = re.compile(rf"(?=[{C._CJK}])\W")  # CJK-range characters that are not \w (kana marks, ・)


def ngram_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation (CJK characters one each), for n-gram overlap.

    >>> ngram_tokens("Hello, World! 你好")
    ['hello', 'world', '你', '好']
    """
    # Same as dropping each word's non-\w characters and then the empty words: the punctuation of the
    # whole text goes at once, except that a non-\w CJK-range character (a word of its own) becomes a
    # space, so the words on either side of it stay apart.
    t = text.lower()
    if t.isascii():
        return t.encode("ascii").translate(None, _ASCII_NONWORD).decode("ascii").split()
    return C.words(_NONWORD.sub("", _CJK_NONWORD.sub(" ", t)))


def ngram_hashes(text: str, n: int) -> set[int]:
    """``{xxh64(" ".join(toks[i:i + n]).encode()) for every i}`` over :func:`ngram_tokens`: the tokens
    are joined and encoded once and every n-gram is hashed as a slice of that buffer (a C loop where
    the kernel builds).

    >>> ngram_hashes("a b, c", 2) == {xxhash.xxh64_intdigest(b"a b"), xxhash.xxh64_intdigest(b"b c")}
    True
    """
    toks = ngram_tokens(text)
    m = len(toks) - n + 1
    if n < 1 or m <= 0:
        return {xxhash.xxh64_intdigest(" ".join(toks[i:i + n]).encode()) for i in range(m)}
    buf = " ".join(toks).encode()
    lens = np.array([*map(len, toks)], dtype=np.int64)
    if len(buf) != len(toks) - 1 + int(lens.sum()):  # some token is not ASCII: byte lengths
        lens = np.array([len(t.encode()) for t in toks], dtype=np.int64)
    starts = np.zeros(len(toks), dtype=np.int64)
    np.cumsum(lens[:-1] + 1, out=starts[1:])
    start, end = starts[:m], starts[n - 1:] + lens[n - 1:]
    lib = native()
    if lib is None:
        mv = memoryview(buf)
        return {xxhash.xxh64_intdigest(mv[a:b]) for a, b in zip(start.tolist(), end.tolist())}
    out = np.empty(m, dtype=np.uint64)
    lib.ts_xxh64_windows(buf, start.ctypes.data, end.ctypes.data, m, out.ctypes.data)
    return set(out.tolist())


def eval_ngrams(n: int, per_task: int) -> set[int]:
    """n-gram hashes specific to the tasks' held-out problems (prompt, solution and answer).

    Task text is templated ("You may use + - * / and parentheses; each number at most once..."), so
    n-grams that occur in two or more held-out problems, or in any of ``2 * per_task`` *training*
    problems of the same task (train and eval problems never coincide, see :mod:`tinyseek.tasks`),
    are template text, not a leaked problem, and are left out.
    """
    out: set[int] = set()
    for task in MATH_TASKS:
        mod = get_task(task)
        seen: Counter = Counter()
        for p in mod.generate(per_task, seed=EVAL_SEED_BASE, split="eval"):
            seen.update(ngram_hashes(f"{p.prompt}\n{p.solution}\n{p.answer}", n))
        template: set[int] = {g for g, c in seen.items() if c > 1}
        for p in mod.generate(2 * per_task, seed=EVAL_SEED_BASE, split="train"):
            template |= ngram_hashes(f"{p.prompt}\n{p.solution}\n{p.answer}", n)
        out |= set(seen) - template
    return out
