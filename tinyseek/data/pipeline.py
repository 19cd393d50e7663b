"""``tinyseek data``: raw documents -> cleaned, deduplicated, filtered, mixed token shards.

Stages, in order (each one timed and counted; ``report.json`` has docs/s and MB/s per stage)::

    ingest      stream documents from the sources (caps: max_docs / max_chars per source)
    clean       NFKC, control characters, whitespace                          (clean.py)
    heuristics  length, symbol ratio, repeated lines / 3-grams, word length   (clean.py)
    exact_dedup content hash (xxhash64 or MD5)                                (dedup.py)
    near_dedup  MinHash LSH over character 5-shingles                         (dedup.py)
    decontam    word 13-gram overlap with the tasks' held-out problems        (decontam.py)
                (generated maths is exempt by default: it is drawn from the train split, which never
                shares a problem with the eval split; see tinyseek/tasks)
    entropy     character entropy below a floor                               (quality.py)
    perplexity  per-domain character n-gram model, keep the least perplexing  (quality.py)
    tokenizer   byte-level BPE trained on the kept training documents         (tokenizer.py)
    tokenize    encode kept documents; held-out docs chosen by content hash
    mixture     TF-IDF domain weights, quotas, sampling order, shard writing  (mixture.py, shards.py)

Outputs ``runs/<name>/data/`` (written to a temp dir, then renamed: complete or absent)::

    shards/index.json, shard_*.bin   training tokens in mixture order (``tinyseek pretrain --data``)
    shards/val/                      held-out documents, each once (found by pretrain as ``<data>/val``)
    tokenizer/                       tokenizer.json + tokenizer_config.json
    manifest.json                    sources, domain weights and their inputs, token counts, shard hashes
    report.json                      accounting: input docs = kept + dropped per reason, per source;
                                     malformed records with path:line; stage throughput

Two ways to run the same stages, with the same result (documents kept, shards byte for byte):

- ``--executor local`` (default), ``ray`` or ``slurm``: the stages as datatrove pipeline steps run by
  its executors as many parallel tasks, resumable after a kill (:mod:`tinyseek.data.engine`,
  :mod:`tinyseek.data.steps`; the work folder ``<run>/data.work``);
- ``--executor serial``: this module's one-process path, the readable reference the engine is tested
  against (tests/test_data_engine.py).

Memory stays bounded by the number of documents (hash sets, MinHash signatures, per-document token
counts), not their bytes: the one-process path spills kept documents and tokens to temporary files
per domain, in a ``.spill-data-<pid>-*`` folder beside the output. The folder is removed when the stage ends, normally
or by an exception; one left by a killed stage (its ``lock`` file no longer locked: the kernel drops
the lock when its process dies) is removed when the next data stage for that run starts.

When nothing can be written the error says why: no input files (the supported suffixes listed),
files without records, records without the text field (its keys listed), or every document dropped
by the filters (the drop reasons counted). Files of a folder skipped for their suffix are counted and
named in ``report.json`` (``skipped_files``) and in the printed report.
Deterministic: same inputs and config -> byte-identical shards.
"""
from __future__ import annotations

import fcntl
import json
import math
import os
import shutil
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np

from tinyseek import tokenizer as tk
from tinyseek.fsutil import atomic_dir
from tinyseek.data import engine
from tinyseek.data.accounting import (MAX_MALFORMED_LISTED, REASONS, STAGES, Accounting, format_report,  # noqa: F401
                                       nothing_kept_error, skipped_line)
from tinyseek.data.decontam import eval_ngrams, ngram_hashes
from tinyseek.data.dedup import ExactDedup, NearDedup
from tinyseek.data.ingest import SUFFIXES
from tinyseek.data.output import DomainTokens, print_summary, summary, write_dataset
from tinyseek.data.quality import NgramLM, char_entropy, fit_plan, keep_threshold
from tinyseek.data.reading import capped, content_bucket, first_filters, make_sources, round_robin, val_threshold
from tinyseek.data.settings import Config, preset  # noqa: F401  (the stage contract: pipeline.Config, pipeline.preset)
from tinyseek.data.sources import Source
from tinyseek.errors import UserError

LEGACY_SPILL_AGE = 24 * 3600  # a spill folder without a lock file (older tinyseek) is stale after this many s


def new_spill(parent: Path, name: str) -> tuple[Path, int]:
    """A fresh ``.spill-<name>-<pid>-*`` folder in ``parent`` and an open descriptor holding an
    exclusive ``flock`` on its ``lock`` file; the kernel releases the lock when the process dies,
    however it dies, which is how :func:`remove_stale_spills` tells a dead owner from a live one."""
    d = Path(tempfile.mkdtemp(dir=parent, prefix=f".spill-{name}-{os.getpid()}-"))
    fd = os.open(d / "lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return d, fd


def remove_stale_spills(parent: Path, name: str) -> list[Path]:
    """Remove the ``.spill-<name>-*`` folders in ``parent`` whose owning process is gone (their lock
    can be taken), and lock-less ones (older tinyseek) untouched for ``LEGACY_SPILL_AGE``; returns them.
    A folder whose owner is alive (a concurrent data stage) is left alone."""
    removed = []
    for d in sorted(parent.glob(f".spill-{name}-*")):
        if not d.is_dir():
            continue
        try:
            fd = os.open(d / "lock", os.O_RDWR)
        except FileNotFoundError:  # lock-less: older tinyseek, or an owner between mkdtemp and open
            if time.time() - d.stat().st_mtime >= LEGACY_SPILL_AGE:
                shutil.rmtree(d, ignore_errors=True)
                removed.append(d)
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # its owner is running
        else:
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
        finally:
            os.close(fd)
    return removed


# ------------------------------------------------------------------------------------------------
# the run
# ------------------------------------------------------------------------------------------------
def _filter_stream(cfg: Config, sources: list[Source], acct: Accounting, spill: Path) -> dict[str, int]:
    """Stages ingest..entropy; kept docs go to ``spill/<domain>.jsonl``. Returns docs per domain."""
    relaxed = {d.strip() for d in cfg.relaxed_domains.split(",") if d.strip()}
    exact = ExactDedup(cfg.hash)
    near = NearDedup(cfg.near_dup_threshold, cfg.num_perm, cfg.shingle) if cfg.near_dup else None
    grams: set[int] = set()
    if cfg.decontaminate and cfg.decontam_problems:
        t0 = time.perf_counter()
        grams = eval_ngrams(cfg.decontam_n, cfg.decontam_problems)
        acct.setup_seconds["decontam_ngrams"] = round(time.perf_counter() - t0, 3)
    files: dict[str, object] = {}
    counts: Counter = Counter()
    key = 0
    try:
        for src in sources:
            hcfg = cfg.relaxed if src.domain in relaxed else cfg.heuristics
            check_contam = cfg.decontaminate_generated or not src.meta.get("generated_train_split", False)
            for doc, nbytes in capped(src, cfg, acct):
                got = first_filters(doc, src.name, nbytes, hcfg, acct)
                if got is None:
                    continue
                text, nb = got
                # each later stage sees only the documents every earlier stage kept
                t0 = time.perf_counter()
                reason = "exact_duplicate" if exact.is_duplicate(text) else None
                t0 = acct.time("exact_dedup", t0, 1, nb)
                if reason is None and near is not None and len(text) >= cfg.near_dup_min_chars:
                    key += 1
                    reason = "near_duplicate" if near.check(str(key), text) is not None else None
                    t0 = acct.time("near_dedup", t0, 1, nb)
                if reason is None and grams and check_contam:
                    reason = "contaminated" if not grams.isdisjoint(ngram_hashes(text, cfg.decontam_n)) else None
                    t0 = acct.time("decontam", t0, 1, nb)
                if reason is None:
                    reason = "low_entropy" if char_entropy(text) < cfg.min_char_entropy else None
                    acct.time("entropy", t0, 1, nb)
                if reason is not None:
                    acct.drop(src.name, reason, doc.loc)
                    continue
                if src.domain not in files:
                    files[src.domain] = open(spill / f"{src.domain}.jsonl", "w", encoding="utf-8")
                files[src.domain].write(json.dumps({"t": text, "s": src.name, "l": doc.loc}, ensure_ascii=False) + "\n")
                counts[src.domain] += 1
    finally:
        for f in files.values():
            f.close()
    return dict(sorted(counts.items()))


def _read_spill(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


def _perplexity(cfg: Config, counts: dict[str, int], acct: Accounting, spill: Path) -> dict:
    """Per domain: fit the reference model, score, keep the least perplexing fraction.
    Rewrites ``spill/<domain>.jsonl`` to the kept docs; returns per-domain stats."""
    stats = {}
    for dom, n in counts.items():
        t0 = time.perf_counter()
        path = spill / f"{dom}.jsonl"
        total_chars = sum(len(r["t"]) for r in _read_spill(path))
        stride, bits = fit_plan(total_chars, cfg.ppl_fit_chars)
        lm = NgramLM(cfg.ppl_order, bits).fit(r["t"] for i, r in enumerate(_read_spill(path)) if i % stride == 0)
        scores = [lm.perplexity(r["t"]) for r in _read_spill(path)]
        thr = keep_threshold(scores, cfg.ppl_keep_fraction)
        kept_path = spill / f"{dom}.kept.jsonl"
        nbytes = kept = 0
        with open(kept_path, "w", encoding="utf-8") as out:
            for r, s in zip(_read_spill(path), scores):
                nbytes += len(r["t"].encode("utf-8"))
                if s > thr:
                    acct.drop(r["s"], "perplexity", r["l"])
                    continue
                acct.kept[r["s"]] += 1
                kept += 1
                out.write(json.dumps(r, ensure_ascii=False) + "\n")
        kept_path.replace(path)
        acct.time("perplexity", t0, n, nbytes)
        stats[dom] = {"docs": n, "kept": kept, "threshold": None if math.isinf(thr) else round(thr, 3),
                      "median_ppl": round(float(np.median(scores)), 3) if scores else None}
    return stats


def _val_threshold(cfg: Config, counts: dict[str, int], spill: Path) -> int:
    return val_threshold(((content_bucket(r["t"]), len(r["t"])) for d in counts for r in _read_spill(spill / f"{d}.jsonl")),
                         cfg.val_fraction, cfg.val_min_chars)


def _train_texts(cfg: Config, counts: dict[str, int], spill: Path, val_thr: int) -> Iterator[str]:
    """Training documents for the BPE: round-robin over domains, up to ``tokenizer_chars``."""
    return round_robin([(r["t"] for r in _read_spill(spill / f"{d}.jsonl") if content_bucket(r["t"]) >= val_thr)
                        for d in counts], cfg.tokenizer_chars)


def main(cfg: Config) -> dict:
    cfg.validate()
    t_start, c_start = time.perf_counter(), time.process_time()
    sources = make_sources(cfg)
    if not sources:
        raise UserError("no input sources")
    user = [s for s in sources if not s.meta.get("default")]
    skipped = [n for s in user for n in s.meta.get("skipped_names", [])]
    n_skipped = sum(s.meta.get("skipped_files", 0) for s in user)
    sk = f"; {skipped_line(n_skipped, skipped)}" if n_skipped else ""
    if user and sum(s.meta.get("files", 0) for s in user) == 0:
        raise UserError(f"no input files found in {cfg.inputs} (supported suffixes: {' '.join(SUFFIXES)}){sk}")
    out_dir = cfg.out_dir
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    for d in remove_stale_spills(out_dir.parent, out_dir.name):
        if not cfg.quiet:
            print(f"removed {d}: spill folder of a data stage that did not finish")
    if cfg.executor != "serial":
        out = engine.run(cfg, sources)
        if "submitted" in out:
            if not cfg.quiet:
                print(f"submitted to Slurm: the stages run as job arrays; work folder {out['work_dir']}, "
                      f"output {out['out_dir']}")
            return out
        if not cfg.quiet:
            print_summary(out["report"], out["idx_train"], out["idx_val"], out["vocab_size"], cfg.out_dir, out["weights"])
        return summary(cfg, out, out["vocab_size"], cfg.out_dir)
    acct = Accounting(cfg.text_field)
    spill, spill_lock = new_spill(out_dir.parent, out_dir.name)
    try:
        with atomic_dir(out_dir) as tmp:
            counts = _filter_stream(cfg, sources, acct, spill)
            if not counts:
                raise nothing_kept_error(acct, sources, sk)
            ppl = _perplexity(cfg, counts, acct, spill)
            counts = {d: s["kept"] for d, s in ppl.items() if s["kept"]}
            if not counts:
                raise nothing_kept_error(acct, sources, sk)
            val_thr = _val_threshold(cfg, counts, spill)

            # ---- tokenizer ---------------------------------------------------------------------
            t0 = time.perf_counter()
            tok_dir = tmp / "tokenizer"
            if cfg.tokenizer:
                tok = tk.load_tokenizer(cfg.tokenizer)
                tok.save(tok_dir)
            else:
                n_chars = 0

                def counted(it):
                    nonlocal n_chars
                    for t in it:
                        n_chars += len(t.encode("utf-8"))
                        yield t
                tok = tk.train_tokenizer(counted(_train_texts(cfg, counts, spill, val_thr)), cfg.vocab_size, tok_dir)
            acct.time("tokenizer", t0, 0, 0 if cfg.tokenizer else n_chars)

            # ---- tokenize: train tokens spilled per domain, val docs in memory -------------------
            t0 = time.perf_counter()
            doc_tokens: dict[str, list[int]] = {}
            val_docs: list[np.ndarray] = []
            val_count: Counter = Counter()
            tok_dt = np.uint32
            n_docs = n_bytes = 0
            for dom in counts:
                lens = []
                with open(spill / f"{dom}.bin", "wb") as fb:
                    batch: list[str] = []

                    def flush() -> None:
                        for text, ids in zip(batch, tok.encode_batch(batch, parse_special=False)):
                            arr = np.asarray(ids, dtype=tok_dt)
                            if content_bucket(text) < val_thr:
                                val_docs.append(arr)
                                val_count[dom] += 1
                            else:
                                arr.tofile(fb)
                                lens.append(arr.size)
                        batch.clear()
                    for r in _read_spill(spill / f"{dom}.jsonl"):
                        batch.append(r["t"])
                        n_docs += 1
                        n_bytes += len(r["t"].encode("utf-8"))
                        if len(batch) >= 256:
                            flush()
                    flush()
                doc_tokens[dom] = lens
            acct.time("tokenize", t0, n_docs, n_bytes)

            # ---- mixture, shards, manifest, report ----------------------------------------------------
            offsets = {d: np.concatenate([[0], np.cumsum(doc_tokens[d])]).astype(np.int64) for d in doc_tokens}
            mm = {d: np.memmap(spill / f"{d}.bin", dtype=tok_dt, mode="r") for d in doc_tokens if sum(doc_tokens[d])}

            def fetch(d: str):
                return lambda i: np.asarray(mm[d][offsets[d][i]:offsets[d][i + 1]]) if d in mm else np.zeros(0, tok_dt)

            def texts(d: str):
                return lambda: (r["t"] for r in _read_spill(spill / f"{d}.jsonl") if content_bucket(r["t"]) >= val_thr)
            train = {d: DomainTokens(doc_tokens[d], fetch(d), texts(d)) for d in doc_tokens}
            out = write_dataset(cfg, tmp, out_dir, tok, tok_dir, train, val_docs, counts, val_count, ppl, acct,
                                sources, skipped, n_skipped, t_start, c_start)
            del mm
    finally:
        shutil.rmtree(spill, ignore_errors=True)
        os.close(spill_lock)
    if not cfg.quiet:
        print_summary(out["report"], out["idx_train"], out["idx_val"], tok.vocab_size, out_dir, out["weights"])
    return summary(cfg, out, tok.vocab_size, out_dir)
