"""Domain mixture: static and TF-IDF-based dynamic weights, token quotas, and the sampling order.

Weights (written to the manifest with their inputs)::

    w_d = p_d * s_d ** beta / sum_e p_e * s_e ** beta

- ``p_d``: the static weight of domain ``d`` (config ``weights``; "" = ``d``'s share of kept tokens,
  i.e. the natural mixture).
- ``s_d``: the domain's mean TF-IDF per token: for each document, the average over its tokens of
  ``idf(t) = ln(N / df(t))`` (``N`` documents in all domains, ``df`` documents containing ``t``;
  tokens are lower-cased words, CJK characters one each), then averaged over the domain's documents.
  A domain whose text is made of words common everywhere (boilerplate, templates) scores low; one
  carrying distinctive vocabulary scores high. This is our reading of the seeds' "TF-IDF-based dynamic
  weighting": the signal is TF-IDF, the exact formula is ours.
- ``beta``: config ``tfidf_power`` (0 = static weights only).

Quotas: ``target_tokens`` (default: all kept training tokens) is split by ``w``; no domain is repeated
more than ``max_epochs`` times: a capped domain's excess quota is redistributed to the others in
proportion to their weights (water-filling), so realised shares can differ from ``w`` when data runs
out (the manifest records both).

Order: documents are interleaved by always emitting from the domain furthest behind its quota
(smallest emitted/quota), each domain walking through a seeded permutation of its documents, a new
permutation every epoch. Deterministic for a given seed.
"""
from __future__ import annotations

import math
import random
from collections import Counter

from tinyseek.data.clean import words
from tinyseek.errors import UserError


def parse_weights(spec: str) -> dict[str, float]:
    """``"english=0.5,code=0.2"`` -> dict.

    >>> parse_weights("english=0.5, code=2")
    {'english': 0.5, 'code': 2.0}
    """
    out: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        if "=" not in part:
            raise UserError(f"weights entry {part!r} must look like domain=number")
        k, v = part.split("=", 1)
        try:
            w = float(v)
        except ValueError:
            raise UserError(f"weights entry {part!r}: {v!r} is not a number") from None
        if w < 0 or not math.isfinite(w):
            raise UserError(f"weights entry {part!r} must be a finite number >= 0")
        out[k.strip()] = w
    return out


def tfidf_scores(docs_by_domain: dict[str, list[str]]) -> dict[str, float]:
    """Mean per-token IDF of each domain's documents (see module docstring).

    >>> s = tfidf_scores({"a": ["the cat", "the dog"], "b": ["the the", "the the"]})
    >>> s["a"] > s["b"] == 0.0
    True
    """
    token_sets: dict[str, list[Counter]] = {}
    df: Counter = Counter()
    n = 0
    for d, docs in docs_by_domain.items():
        token_sets[d] = []
        for t in docs:
            c = Counter(w.lower() for w in words(t))
            token_sets[d].append(c)
            df.update(c.keys())
            n += 1
    out = {}
    for d, cs in token_sets.items():
        vals = []
        for c in cs:
            total = sum(c.values())
            if total:
                vals.append(sum(cnt * math.log(n / df[t]) for t, cnt in c.items()) / total)
        out[d] = sum(vals) / len(vals) if vals else 0.0
    return out


def mixture_weights(static: dict[str, float], scores: dict[str, float], beta: float) -> dict[str, float]:
    """Normalised ``p_d * s_d**beta``.

    >>> mixture_weights({"a": 1, "b": 1}, {"a": 2.0, "b": 1.0}, 1.0)
    {'a': 0.6666666666666666, 'b': 0.3333333333333333}
    """
    raw = {d: static[d] * (scores.get(d, 0.0) ** beta if beta else 1.0) for d in static}
    z = sum(raw.values())
    if z <= 0:
        raise UserError("all domain weights are zero; check --weights")
    return {d: v / z for d, v in raw.items()}


def quotas(weights: dict[str, float], sizes: dict[str, int], target: int, max_epochs: float) -> dict[str, int]:
    """Token quota per domain: ``target * w`` capped at ``max_epochs * size``, excess redistributed.

    >>> quotas({"a": 0.5, "b": 0.5}, {"a": 100, "b": 1000}, 1000, 2.0)
    {'a': 200, 'b': 800}
    """
    caps = {d: int(max_epochs * sizes.get(d, 0)) for d in weights}
    out = {d: 0 for d in weights}
    free = {d for d in weights if weights[d] > 0 and caps[d] > 0}
    left = target
    while free and left > 0:
        z = sum(weights[d] for d in free)
        share = {d: left * weights[d] / z for d in free}
        capped = {d for d in free if out[d] + share[d] >= caps[d]}
        if not capped:
            for d in free:
                out[d] += int(share[d])
            break
        for d in capped:
            left -= caps[d] - out[d]
            out[d] = caps[d]
        free -= capped
    return out


def sample_order(doc_tokens: dict[str, list[int]], quota: dict[str, int], seed: int) -> list[tuple[str, int]]:
    """``(domain, doc_index)`` in emission order until every domain reaches its quota.

    >>> order = sample_order({"a": [10, 10], "b": [5]}, {"a": 20, "b": 10}, seed=0)
    >>> sorted(order)
    [('a', 0), ('a', 1), ('b', 0), ('b', 0)]
    """
    rng = random.Random(seed)
    emitted = {d: 0 for d in quota}
    perm: dict[str, list[int]] = {}
    pos = {d: 0 for d in quota}
    active = sorted(d for d in quota if quota[d] > 0 and doc_tokens.get(d))
    out = []
    while active:
        d = min(active, key=lambda x: (emitted[x] / quota[x], x))
        if pos[d] == 0:
            perm[d] = list(range(len(doc_tokens[d])))
            rng.shuffle(perm[d])
        i = perm[d][pos[d]]
        pos[d] = (pos[d] + 1) % len(perm[d])
        out.append((d, i))
        emitted[d] += doc_tokens[d][i]
        if emitted[d] >= quota[d]:
            active.remove(d)
    return out
