"""Reading the corpus, whole (the one-process path) or one task's share of it (the parallel engine).

Every document gets a key that sorts in corpus order: ``(source, file, position)`` packed into 64 bits,
so "the first occurrence", "the i-th document of a domain" and the shards' order mean the same thing
however many tasks read the corpus. How a source is split between ``world`` tasks:

- **by file** when it lists its files, has at least ``world`` of them and no cap applies: task ``r``
  reads files ``r, r + world, ...`` and nothing else (the unit datatrove's readers use);
- **by block** otherwise (one big file, or a capped default source): every task walks the source's
  stream, applying the caps exactly as one process would, and keeps blocks of ``BLOCK`` documents
  ``r, r + world, ...``. Reading is cheap next to cleaning, so walking the stream twice costs little
  at two tasks; a corpus for many tasks should come as many files.
"""
from __future__ import annotations

import time
from typing import Iterable, Iterator

import xxhash

from tinyseek.data import clean as C
from tinyseek.data.accounting import KEYS_SEEN_LISTED, MAX_MALFORMED_LISTED, Accounting
from tinyseek.data.ingest import Doc
from tinyseek.data.settings import Config
from tinyseek.data.sources import Source, default_sources, user_sources

BLOCK = 64                      # documents a block when a source's stream is split between tasks
_SRC_BITS, _FILE_BITS, _POS_BITS = 8, 24, 32


def make_sources(cfg: Config) -> list[Source]:
    """The configured sources: ``--inputs`` if given, else the default corpus."""
    if cfg.inputs.strip():
        return user_sources(cfg.inputs, cfg.text_field, cfg.doc_chars)
    return default_sources(cfg.math_docs, cfg.use_samples, cfg.doc_chars, seed=cfg.seed)


def doc_key(src: int, file: int, pos: int) -> int:
    """Sortable key of a document: source index, file index (0 for a source read as one stream),
    position in that file or stream.

    >>> doc_key(0, 0, 5) < doc_key(0, 1, 0) < doc_key(1, 0, 0), doc_key(2, 3, 4) >> 56
    (True, 2)
    """
    if not (0 <= src < 1 << _SRC_BITS and 0 <= file < 1 << _FILE_BITS and 0 <= pos < 1 << _POS_BITS):
        raise ValueError(f"document key out of range: source {src}, file {file}, position {pos}")
    return (src << (_FILE_BITS + _POS_BITS)) | (file << _POS_BITS) | pos


def content_bucket(text: str) -> int:
    """64-bit hash of a cleaned document: the held-out split takes the lowest ones."""
    return xxhash.xxh64_intdigest(text.encode("utf-8"))


def caps(src: Source, cfg: Config) -> tuple[int, int]:
    """``(max_docs, max_chars)`` for this source: the caps apply to the default corpus only."""
    return (cfg.max_docs_per_source, cfg.max_chars_per_source) if src.meta.get("default") else (0, 0)


def capped(src: Source, cfg: Config, acct: Accounting | None = None) -> Iterator[tuple[Doc, int]]:
    """The source's documents up to the caps, with their UTF-8 size; times the ingest stage."""
    it = src.read()
    n = chars = 0
    max_docs, max_chars = caps(src, cfg)
    try:
        while True:
            if (max_docs and n >= max_docs) or (max_chars and chars >= max_chars):
                return
            t0 = time.perf_counter()
            doc = next(it, None)
            if doc is None:
                return
            nbytes = len(doc.text.encode("utf-8")) if doc.text is not None else 0
            if acct is not None:
                acct.time("ingest", t0, 1, nbytes)
            n += 1
            chars += len(doc.text or "")
            yield doc, nbytes
    finally:
        close = getattr(it, "close", None)
        if close:
            close()


def by_file(src: Source, cfg: Config, world: int) -> bool:
    """Whether ``src`` is split between ``world`` tasks file by file (else block by block)."""
    return src.read_file is not None and len(src.files) >= world and caps(src, cfg) == (0, 0)


def task_docs(cfg: Config, sources: list[Source], rank: int, world: int,
              acct: Accounting) -> Iterator[tuple[int, int, Doc, int]]:
    """Task ``rank`` of ``world``'s documents as ``(key, source index, doc, utf-8 bytes)``, in key order.
    Over all ranks, every document of :func:`capped` comes exactly once. Times the ingest stage
    (this task's documents only)."""
    for si, src in enumerate(sources):
        if by_file(src, cfg, world):
            for fi in range(rank, len(src.files), world):
                it = src.read_file(src.files[fi])
                pos = 0
                while True:
                    t0 = time.perf_counter()
                    doc = next(it, None)
                    if doc is None:
                        break
                    nbytes = len(doc.text.encode("utf-8")) if doc.text is not None else 0
                    acct.time("ingest", t0, 1, nbytes)
                    yield doc_key(si, fi, pos), si, doc, nbytes
                    pos += 1
            continue
        t0 = time.perf_counter()
        for pos, (doc, nbytes) in enumerate(capped(src, cfg)):
            if (pos // BLOCK) % world == rank:
                acct.time("ingest", t0, 1, nbytes)
                yield doc_key(si, 0, pos), si, doc, nbytes
            t0 = time.perf_counter()


def first_filters(doc: Doc, source: str, nbytes: int, hcfg: C.HeuristicConfig,
                  acct: Accounting) -> tuple[str, int] | None:
    """Count ``doc`` in; a malformed record or a document failing the heuristics is accounted as
    dropped (None). Else its cleaned text and UTF-8 size. Times the clean and heuristics stages."""
    acct.input[source] += 1
    if doc.text is None:
        if doc.keys or doc.error.startswith("missing field"):
            acct.n_missing_field += 1
            if len(acct.keys_seen) < KEYS_SEEN_LISTED:
                acct.keys_seen.update(doc.keys)
        acct.drop(source, "malformed", doc.loc)
        acct.n_malformed += 1
        if len(acct.malformed) < MAX_MALFORMED_LISTED:
            acct.malformed.append({"source": source, "loc": doc.loc, "error": doc.error})
        return None
    acct.n_texts += 1
    t0 = time.perf_counter()
    text = C.clean_text(doc.text)
    t0 = acct.time("clean", t0, 1, nbytes)
    nb = len(text.encode("utf-8"))
    reason = C.heuristic_reason(text, hcfg)
    acct.time("heuristics", t0, 1, nb)
    if reason is not None:
        acct.drop(source, reason, doc.loc)
        return None
    return text, nb


def val_threshold(docs: Iterable[tuple[int, int]], val_fraction: float, val_min_chars: int) -> int:
    """The held-out split from ``(content bucket, characters)`` of every kept document: documents whose
    bucket is below the returned value are held out, the lowest buckets until they hold
    ``max(val_fraction, val_min_chars)`` of the characters (at most 20%). 0: none held out.

    >>> val_threshold([(5, 10), (1, 10), (9, 80)], 0.1, 0), val_threshold([(5, 10)], 0.0, 0)
    (2, 0)
    """
    if val_fraction <= 0:
        return 0
    hs = sorted(docs)
    total = sum(n for _, n in hs)
    want = min(max(val_fraction * total, val_min_chars), 0.2 * total)
    acc = 0
    for h, n in hs:
        acc += n
        if acc >= want:
            return h + 1
    return 1 << 64


def round_robin(streams: list[Iterator[str]], budget: int) -> Iterator[str]:
    """Texts taken one from each stream in turn (a finished stream drops out) until ``budget``
    characters are taken (the text that crosses it included): the BPE's training texts, domains mixed.

    >>> list(round_robin([iter(["aa", "bb", "cc"]), iter(["x"])], 5))
    ['aa', 'x', 'bb']
    """
    its = list(streams)
    while its and budget > 0:
        for it in list(its):
            t = next(it, None)
            if t is None:
                its.remove(it)
                continue
            budget -= len(t)
            yield t
