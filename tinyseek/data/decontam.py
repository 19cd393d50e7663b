"""Decontamination: word n-gram overlap between training documents and the tasks' held-out problems.

A document is contaminated when it shares one word ``n``-gram (default 13, as in GPT-3 / the
DeepSeek reports' 10-13-gram filters) with a held-out problem's text, after lower-casing and dropping
punctuation. Template n-grams (shared by two held-out problems, or present in training problems of
the same task) are not counted: they are boilerplate, not a leak.
"""
from __future__ import annotations

import re
from collections import Counter

import xxhash

from tinyseek.data import clean as C
from tinyseek.data.sources import MATH_TASKS
from tinyseek.tasks import EVAL_SEED_BASE, get_task

_PUNCT = re.compile(r"[^\w]+")


def ngram_tokens(text: str) -> list[str]:
    """Lower-cased words without punctuation (CJK characters one each), for n-gram overlap.

    >>> ngram_tokens("Hello, World! 你好")
    ['hello', 'world', '你', '好']
    """
    out = []
    for w in C.words(text.lower()):
        w = _PUNCT.sub("", w)
        if w:
            out.append(w)
    return out


def ngram_hashes(text: str, n: int) -> set[int]:
    toks = ngram_tokens(text)
    return {xxhash.xxh64_intdigest(" ".join(toks[i:i + n]).encode()) for i in range(len(toks) - n + 1)}


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
