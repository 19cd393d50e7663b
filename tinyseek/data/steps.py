"""The data stage as datatrove pipeline steps: eight stages, each run by an executor as many tasks.

=========  =======  =====================================================================================
stage      tasks    what one task does (reads / writes under the work folder ``<run>/data.work``)
=========  =======  =====================================================================================
filter     T        its share of the corpus (:mod:`~tinyseek.data.reading`): ingest, clean, heuristics;
                    for each survivor the exact-dedup hash, the MinHash signature and LSH band hashes,
                    the decontamination and entropy verdicts -> ``filter/<r>.*``
buckets    K        LSH bands ``r, r + K, ...``: the groups of documents sharing a band (exact duplicates
                    left out, as the one-process index never sees them) -> ``buckets/<r>.npz``
cluster    1        exact duplicates (first occurrence kept) and near duplicates: in corpus order a
                    document is a near duplicate when an earlier *kept* document of one of its groups
                    agrees on >= threshold of the signature -> ``cluster/drops.npz``
fit        1        per domain, the perplexity reference model on every k-th kept document -> ``fit/``
score      T        the drop reason of each survivor (exact, near, contaminated, low entropy: the
                    one-process order) and the perplexity of the rest -> ``score/<r>.*``
vocab      1        per-domain perplexity thresholds, the held-out split, the BPE -> ``vocab/``
tokenize   T        batch encoding in the tokenizers library's threads -> ``tokenize/<r>.*``
mix        1        the TF-IDF mixture and the shards over all tasks' tokens (corpus order, so the same
                    bytes as one process), manifest and report -> the output folder, renamed into place
=========  =======  =====================================================================================

Every task writes its files under temporary names and renames them when complete (``fsutil.atomic_file``), so a task killed
half-way leaves nothing a rerun could mistake for output; datatrove marks it complete only after that.
The results do not depend on T, K or the number of workers (tests/test_data_engine.py).
Where it departs from datatrove's own MinHash stages: our signatures (character 5-shingles, datasketch's
``affine32`` permutations) and our rule (first-kept-wins in corpus order, as the one-process path)
instead of word shingles and union-find clusters, so both paths keep the same documents.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Iterator

import numpy as np
from datatrove.pipeline.base import PipelineStep

from tinyseek import tokenizer as tk
from tinyseek.fsutil import atomic_dir, atomic_file
from tinyseek.config import from_dict
from tinyseek.data import dedup as D
from tinyseek.data.accounting import Accounting, nothing_kept_error, skipped_line
from tinyseek.data.decontam import ngram_hashes
from tinyseek.data.output import DomainTokens, write_dataset
from tinyseek.data.quality import NgramLM, char_entropy, fit_plan, keep_threshold
from tinyseek.data.reading import content_bucket, first_filters, make_sources, round_robin, task_docs, val_threshold
from tinyseek.data.settings import Config, cpu_count
from tinyseek.data.sources import Source
from tinyseek.errors import UserError

TOK_DTYPE = np.uint32
ENCODE_BATCH = 1024              # documents per encode_batch call


# ------------------------------------------------------------------------------------------------
# small helpers: files written whole or not at all, partial accounts
# ------------------------------------------------------------------------------------------------
def save_npz(path: Path, **arrays) -> None:
    with atomic_file(path, "wb", fsync=False) as f:
        np.savez(f, **arrays)


def save_npy(path: Path, arr: np.ndarray) -> None:
    with atomic_file(path, "wb", fsync=False) as f:
        np.save(f, arr)


def save_json(path: Path, obj) -> None:
    with atomic_file(path, fsync=False) as f:
        f.write(json.dumps(obj, sort_keys=True, ensure_ascii=False))


@contextlib.contextmanager
def env_set(name: str, value: str | None):
    """``os.environ[name] = value`` for the block (None: left as it is), then as it was."""
    old = os.environ.get(name)
    if value is not None:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def _no_reader() -> Iterator:
    raise RuntimeError("only the filter stage reads the corpus")


def save_sources(path: Path, sources: list[Source]) -> None:
    """What every stage after the filter needs of the sources (read back by ``DataStep.sources``)."""
    save_json(path, [{"name": s.name, "domain": s.domain, "origin": s.origin, "meta": s.meta,
                      "files": [str(f) for f in s.files]} for s in sources])


def domains_of(sources) -> list[str]:
    """The domains in the one-process path's order (sorted)."""
    return sorted({s.domain for s in sources})


class DocFile:
    """Random access to the texts a filter task kept (one JSON line each, by byte offset)."""

    def __init__(self, path: Path):
        self.f = open(path, "rb")

    def get(self, off: int) -> dict:
        self.f.seek(off)
        return json.loads(self.f.readline())

    def scan(self, offs: np.ndarray) -> Iterator[dict]:
        """The records at ``offs`` (increasing), read sequentially."""
        self.f.seek(0)
        pos = 0
        for off in offs.tolist():
            if off != pos:
                self.f.seek(off)
            line = self.f.readline()
            pos = off + len(line)
            yield json.loads(line)

    def close(self) -> None:
        self.f.close()


# ------------------------------------------------------------------------------------------------
# the base step
# ------------------------------------------------------------------------------------------------
class DataStep(PipelineStep):
    """One stage. Holds only the settings (as a dict) and the work folder, so it pickles small for
    process pools, Ray and Slurm alike; the stage's inputs come from the work folder."""
    type = "tinyseek"
    stage = ""

    def __init__(self, cfg: dict, work: str, n_filter: int, n_buckets: int):
        super().__init__()
        self.name = self.stage
        self.cfg_dict, self.work_str, self.n_filter, self.n_buckets = cfg, work, n_filter, n_buckets

    @property
    def work(self) -> Path:
        return Path(self.work_str)

    def cfg(self) -> Config:
        return from_dict(Config, self.cfg_dict)

    def out(self, stage: str | None = None) -> Path:
        d = self.work / (stage or self.stage)
        d.mkdir(parents=True, exist_ok=True)
        return d

    def run(self, data=None, rank: int = 0, world_size: int = 1):
        c0 = time.process_time()
        try:
            self.do(rank, world_size)
            (self.work / "cpu").mkdir(exist_ok=True)
            save_json(self.work / "cpu" / f"{self.stage}-{rank:05d}.json", {"cpu_seconds": time.process_time() - c0})
        except UserError as e:  # the driver shows it as the one-line error it is
            (self.work / "errors").mkdir(exist_ok=True)
            save_json(self.work / "errors" / f"{self.stage}-{rank:05d}.json", {"error": str(e)})
            raise
        return iter(())

    def do(self, rank: int, world: int) -> None:
        raise NotImplementedError

    # shared readers of earlier stages' outputs
    def sources(self) -> list[Source]:
        """The sources as the driver listed them (names, domains, files, meta; no readers): listing
        the default corpus again costs 0.3-0.6 s a call."""
        return [Source(d["name"], d["domain"], _no_reader, d["origin"], d["meta"], [Path(f) for f in d["files"]])
                for d in json.loads((self.work / "sources.json").read_text())]

    def metas(self) -> list[dict]:
        return [dict(np.load(self.work / "filter" / f"{t:05d}.meta.npz")) for t in range(self.n_filter)]

    def sig_arrays(self, name: str) -> list[np.ndarray]:
        return [np.load(self.work / "filter" / f"{t:05d}.{name}.npy", mmap_mode="r") for t in range(self.n_filter)]


def corpus_order(metas: list[dict]) -> np.ndarray:
    """The permutation that puts all filter tasks' survivors (concatenated in task order) in corpus order."""
    return np.argsort(np.concatenate([m["key"] for m in metas]), kind="stable")


def _per_task(values: np.ndarray, metas: list[dict]) -> list[np.ndarray]:
    """``values`` (one per survivor, tasks concatenated) split back into one array per filter task."""
    return np.split(values, np.cumsum([len(m["key"]) for m in metas])[:-1])


def exact_duplicates(metas: list[dict], order: np.ndarray) -> list[np.ndarray]:
    """Per filter task, which survivors repeat the exact hash of a document earlier in corpus order
    (``order``: :func:`corpus_order`)."""
    hashes = np.concatenate([m["exact"] for m in metas])
    _, first = np.unique(hashes[order], axis=0, return_index=True)
    dup = np.ones(len(order), dtype=bool)
    dup[order[first]] = False
    return _per_task(dup, metas)


def corpus_positions(metas: list[dict], order: np.ndarray) -> list[np.ndarray]:
    """Per filter task, each survivor's position among all survivors in corpus order."""
    pos = np.empty(len(order), dtype=np.int64)
    pos[order] = np.arange(len(order))
    return _per_task(pos, metas)


# ------------------------------------------------------------------------------------------------
# 1. filter: ingest .. entropy verdicts, signatures
# ------------------------------------------------------------------------------------------------
class FilterStep(DataStep):
    stage = "filter"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        sources = make_sources(cfg)
        acct = Accounting(cfg.text_field)
        relaxed = {d.strip() for d in cfg.relaxed_domains.split(",") if d.strip()}
        gpath = self.work / "grams.npy"
        grams = set(np.load(gpath).tolist()) if gpath.exists() else set()
        b, r = D.lsh_params(cfg.near_dup_threshold, cfg.num_perm)
        out = self.out()
        docs_path = out / f"{rank:05d}.docs.jsonl"
        cols = {k: [] for k in ("key", "src", "nchars", "nbytes", "off", "bucket", "contam", "lowent", "sigrow")}
        exact, sigs = [], []
        off = 0
        with atomic_file(docs_path, "wb", fsync=False) as f:
            for key, si, doc, nbytes in task_docs(cfg, sources, rank, world, acct):
                src = sources[si]
                got = first_filters(doc, src.name, nbytes, cfg.relaxed if src.domain in relaxed else cfg.heuristics, acct)
                if got is None:
                    continue
                text, nb = got
                t0 = time.perf_counter()
                exact.append(np.frombuffer(D.content_hash(text, cfg.hash).ljust(16, b"\0"), dtype=np.uint64))
                t0 = acct.time("exact_dedup", t0, 1, nb)
                row = -1
                if cfg.near_dup and len(text) >= cfg.near_dup_min_chars:
                    row = len(sigs)
                    sigs.append(D.minhash_signature(text, cfg.num_perm, cfg.shingle))
                    t0 = acct.time("near_dedup", t0, 1, nb)
                check = cfg.decontaminate_generated or not src.meta.get("generated_train_split", False)
                contam = bool(grams) and check and not grams.isdisjoint(ngram_hashes(text, cfg.decontam_n))
                t0 = acct.time("decontam", t0, 1, nb)
                low = char_entropy(text) < cfg.min_char_entropy
                acct.time("entropy", t0, 1, nb)
                line = (json.dumps({"t": text, "l": doc.loc}, ensure_ascii=False) + "\n").encode("utf-8")
                f.write(line)
                for k, v in (("key", key), ("src", si), ("nchars", len(text)), ("nbytes", nb), ("off", off),
                             ("bucket", content_bucket(text)), ("contam", contam), ("lowent", low), ("sigrow", row)):
                    cols[k].append(v)
                off += len(line)
        sig = np.stack(sigs).astype(np.uint32) if sigs else np.zeros((0, cfg.num_perm), np.uint32)
        save_npy(out / f"{rank:05d}.sigs.npy", sig)
        save_npy(out / f"{rank:05d}.bands.npy", D.band_hashes(sig, b, r) if len(sig) else np.zeros((0, b), np.uint64))
        types = {"key": np.uint64, "src": np.int16, "nchars": np.int64, "nbytes": np.int64, "off": np.int64,
                 "bucket": np.uint64, "contam": bool, "lowent": bool, "sigrow": np.int64}
        meta = {k: np.asarray(cols[k], dtype=types[k]) for k in cols}
        meta["exact"] = np.stack(exact) if exact else np.zeros((0, 2), np.uint64)
        save_json(out / f"{rank:05d}.acct.json", acct.to_dict())
        save_npz(out / f"{rank:05d}.meta.npz", **meta)  # last: its presence means the task's files are whole
        self.stat_update("survivors", value=len(meta["key"]))


# ------------------------------------------------------------------------------------------------
# 2. buckets: documents sharing an LSH band
# ------------------------------------------------------------------------------------------------
class BucketStep(DataStep):
    stage = "buckets"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        b, _ = D.lsh_params(cfg.near_dup_threshold, cfg.num_perm)
        metas = self.metas()
        order = corpus_order(metas)
        dups, pos = exact_duplicates(metas, order), corpus_positions(metas, order)
        bands = self.sig_arrays("bands")
        members, sizes = [], []
        sel = [(m["sigrow"] >= 0) & ~d for m, d in zip(metas, dups)]
        ids = np.concatenate([p[s] for p, s in zip(pos, sel)])
        for j in range(rank, b, world):
            bh = np.concatenate([np.asarray(bd[m["sigrow"][s], j]) for bd, m, s in zip(bands, metas, sel)])
            if len(bh) < 2:
                continue
            order = np.lexsort((ids, bh))
            h, i = bh[order], ids[order]
            starts = np.flatnonzero(np.r_[True, h[1:] != h[:-1]])
            lens = np.diff(np.r_[starts, len(h)])
            for st, n in zip(starts[lens > 1].tolist(), lens[lens > 1].tolist()):
                members.append(i[st:st + n])
                sizes.append(n)
        save_npz(self.out() / f"{rank:05d}.npz",
                 members=np.concatenate(members) if members else np.zeros(0, np.int64),
                 sizes=np.asarray(sizes, dtype=np.int64))
        self.stat_update("groups", value=len(sizes))


# ------------------------------------------------------------------------------------------------
# 3. cluster: exact and near duplicates, first kept wins
# ------------------------------------------------------------------------------------------------
class ClusterStep(DataStep):
    stage = "cluster"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        metas = self.metas()
        order = corpus_order(metas)
        dups = exact_duplicates(metas, order)
        sigs = self.sig_arrays("sigs")
        # by corpus position: the key, the filter task and the signature row of each survivor
        keys = np.concatenate([m["key"] for m in metas])[order]
        task = np.concatenate([np.full(len(m["key"]), t, dtype=np.int64) for t, m in enumerate(metas)])[order]
        row = np.concatenate([m["sigrow"] for m in metas])[order]

        def sig(d: int) -> np.ndarray:
            return np.asarray(sigs[task[d]][row[d]])
        groups: list[np.ndarray] = []
        for r in range(self.n_buckets):
            z = np.load(self.work / "buckets" / f"{r:05d}.npz")
            groups.extend(np.split(z["members"], np.cumsum(z["sizes"])[:-1]) if len(z["sizes"]) else [])
        of_doc: dict[int, list[int]] = {}
        for g, mem in enumerate(groups):
            for d in mem.tolist():
                of_doc.setdefault(d, []).append(g)
        kept_in: list[list[int]] = [[] for _ in groups]
        near = []
        for d in sorted(of_doc):
            s = sig(d)
            cands = sorted({c for g in of_doc[d] for c in kept_in[g]})
            if any(float(np.mean(sig(c) == s)) >= cfg.near_dup_threshold for c in cands):
                near.append(d)
                continue
            for g in of_doc[d]:
                kept_in[g].append(d)
        exact_keys = np.concatenate([m["key"][d] for m, d in zip(metas, dups)])
        save_npz(self.out() / "drops.npz", exact=np.sort(exact_keys),
                 near=np.sort(keys[np.asarray(near, dtype=np.int64)]))
        self.stat_update("near_duplicates", value=len(near))


def merged_account(work: Path, text_field: str, *more: Accounting) -> Accounting:
    """All tasks' partial accounts so far (filter, score, vocab, tokenize), plus ``more``."""
    acct = Accounting(text_field)
    for pattern in ("filter/*.acct.json", "score/*.acct.json", "vocab/acct.json", "tokenize/*.acct.json"):
        for p in sorted(work.glob(pattern)):
            acct.merge(json.loads(p.read_text()))
    for a in more:
        acct.merge(a.to_dict())
    return acct


def skipped_files(sources) -> tuple[list[str], int]:
    """Names (the first few) and count of the input files left out for their suffix."""
    user = [s for s in sources if not s.meta.get("default")]
    return [n for s in user for n in s.meta.get("skipped_names", [])], sum(s.meta.get("skipped_files", 0) for s in user)


def nothing_kept(work: Path, acct: Accounting, sources) -> UserError:
    names, n = skipped_files(sources)
    return nothing_kept_error(merged_account(work, acct.text_field, acct), sources,
                              f"; {skipped_line(n, names)}" if n else "")


def pre_ppl_reasons(meta: dict, drops) -> np.ndarray:
    """Per survivor of one filter task: 0 kept, else 1 exact, 2 near, 3 contaminated, 4 low entropy
    (the first that applies, in the one-process order)."""
    reason = np.zeros(len(meta["key"]), dtype=np.int8)
    for code, mask in ((4, meta["lowent"]), (3, meta["contam"]), (2, np.isin(meta["key"], drops["near"])),
                       (1, np.isin(meta["key"], drops["exact"]))):
        reason[mask] = code
    return reason


REASON_CODES = {1: "exact_duplicate", 2: "near_duplicate", 3: "contaminated", 4: "low_entropy"}


# ------------------------------------------------------------------------------------------------
# 4. fit: the perplexity reference model per domain
# ------------------------------------------------------------------------------------------------
class FitStep(DataStep):
    stage = "fit"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        sources = self.sources()
        metas = self.metas()
        drops = dict(np.load(self.work / "cluster" / "drops.npz"))
        by_dom: dict[str, list[tuple[int, int, int, int]]] = {}  # domain -> (key, task, offset, chars)
        for t, m in enumerate(metas):
            keep = pre_ppl_reasons(m, drops) == 0
            for k, o, c, s in zip(m["key"][keep].tolist(), m["off"][keep].tolist(), m["nchars"][keep].tolist(),
                                  m["src"][keep].tolist()):
                by_dom.setdefault(sources[s].domain, []).append((k, t, o, c))
        info = {}
        files = {}
        try:
            for dom in domains_of(sources):
                drows = sorted(by_dom.get(dom, []))  # corpus order
                if not drows:
                    continue
                t0 = time.perf_counter()
                stride, bits = fit_plan(sum(r[3] for r in drows), cfg.ppl_fit_chars)

                def texts() -> Iterator[str]:
                    for i, (_, t, o, _) in enumerate(drows):
                        if i % stride == 0:
                            if t not in files:
                                files[t] = DocFile(self.work / "filter" / f"{t:05d}.docs.jsonl")
                            yield files[t].get(o)["t"]
                lm = NgramLM(cfg.ppl_order, bits).fit(texts())
                # counts as int32 when they fit (half the bytes to write and to map; the same floats out)
                dt = np.int32 if lm.total < (1 << 31) else np.int64
                save_npy(self.out() / f"{dom}.npy", np.stack([t.astype(dt) for t in lm.tables]))
                info[dom] = {"order": cfg.ppl_order, "bits": bits, "total": lm.total, "docs": len(drows),
                             "seconds": time.perf_counter() - t0}
        finally:
            for f in files.values():
                f.close()
        save_json(self.out() / "fit.json", info)


def load_lm(path: Path, order: int, bits: int, total: int) -> NgramLM:
    lm = NgramLM(order, bits)
    tables = np.load(path, mmap_mode="r")
    lm.tables = [tables[k] for k in range(order)]
    lm.total = total
    return lm


# ------------------------------------------------------------------------------------------------
# 5. score: drop reasons, perplexities
# ------------------------------------------------------------------------------------------------
class ScoreStep(DataStep):
    stage = "score"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        sources = self.sources()
        acct = Accounting(cfg.text_field)
        meta = dict(np.load(self.work / "filter" / f"{rank:05d}.meta.npz"))
        drops = dict(np.load(self.work / "cluster" / "drops.npz"))
        fit = json.loads((self.work / "fit" / "fit.json").read_text())
        lms = {d: load_lm(self.work / "fit" / f"{d}.npy", i["order"], i["bits"], i["total"]) for d, i in fit.items()}
        reason = pre_ppl_reasons(meta, drops)
        ppl = np.full(len(reason), np.nan)
        df = DocFile(self.work / "filter" / f"{rank:05d}.docs.jsonl")
        try:
            for i, rec in zip(range(len(reason)), df.scan(meta["off"])):
                src = sources[int(meta["src"][i])]
                if reason[i]:
                    acct.drop(src.name, REASON_CODES[int(reason[i])], rec["l"])
                    continue
                t0 = time.perf_counter()
                ppl[i] = lms[src.domain].perplexity(rec["t"])
                acct.time("perplexity", t0, 1, int(meta["nbytes"][i]))
        finally:
            df.close()
        save_json(self.out() / f"{rank:05d}.acct.json", acct.to_dict())
        save_npz(self.out() / f"{rank:05d}.npz", reason=reason, ppl=ppl)


# ------------------------------------------------------------------------------------------------
# 6. vocab: thresholds, held-out split, tokenizer
# ------------------------------------------------------------------------------------------------
class VocabStep(DataStep):
    stage = "vocab"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        sources = self.sources()
        acct = Accounting(cfg.text_field)
        metas = self.metas()
        scores = [dict(np.load(self.work / "score" / f"{t:05d}.npz")) for t in range(self.n_filter)]
        doms = [s.domain for s in sources]
        t0 = time.perf_counter()
        per_dom: dict[str, list[float]] = {}
        for m, sc in zip(metas, scores):
            for s, p in zip(m["src"][sc["reason"] == 0].tolist(), sc["ppl"][sc["reason"] == 0].tolist()):
                per_dom.setdefault(doms[s], []).append(p)
        thr = {d: keep_threshold(v, cfg.ppl_keep_fraction) for d, v in per_dom.items()}
        files = [DocFile(self.work / "filter" / f"{t:05d}.docs.jsonl") for t in range(self.n_filter)]
        keep = []
        try:
            kept_dom: Counter = Counter()
            for t, (m, sc) in enumerate(zip(metas, scores)):
                k = np.zeros(len(m["key"]), dtype=bool)
                for i in np.flatnonzero(sc["reason"] == 0).tolist():
                    src = sources[int(m["src"][i])]
                    if sc["ppl"][i] > thr[src.domain]:
                        acct.drop(src.name, "perplexity", files[t].get(int(m["off"][i]))["l"])
                        continue
                    acct.kept[src.name] += 1
                    kept_dom[src.domain] += 1
                    k[i] = True
                keep.append(k)
            acct.stage["perplexity"]["seconds"] += time.perf_counter() - t0
            ppl_stats = {d: {"docs": len(v), "kept": kept_dom[d],
                             "threshold": None if math.isinf(thr[d]) else round(thr[d], 3),
                             "median_ppl": round(float(np.median(v)), 3) if v else None}
                         for d, v in sorted(per_dom.items())}
            counts = {d: kept_dom[d] for d in sorted(kept_dom) if kept_dom[d]}
            if not counts:
                raise nothing_kept(self.work, acct, sources)
            # the held-out split: lowest content hashes until they hold the wanted share of characters
            val_thr = val_threshold(((b, n) for m, k in zip(metas, keep)
                                     for b, n in zip(m["bucket"][k].tolist(), m["nchars"][k].tolist())),
                                    cfg.val_fraction, cfg.val_min_chars)
            for t, (m, k) in enumerate(zip(metas, keep)):
                save_npy(self.out() / f"{t:05d}.keep.npy", k)
            # the tokenizer: one task, so the tokenizers library may use every core this process has
            t0 = time.perf_counter()
            tok_dir = self.out() / "tokenizer"
            shutil.rmtree(tok_dir, ignore_errors=True)
            n_chars = 0
            if cfg.tokenizer:
                tk.load_tokenizer(cfg.tokenizer).save(tok_dir)
            else:
                rows = sorted((key, t, off, s) for t, (m, k) in enumerate(zip(metas, keep))
                              for key, off, s, b in zip(m["key"][k].tolist(), m["off"][k].tolist(),
                                                        m["src"][k].tolist(), m["bucket"][k].tolist())
                              if b >= val_thr)
                by_dom: dict[str, list[tuple[int, int]]] = {d: [] for d in counts}
                for _, t, off, s in rows:
                    by_dom[doms[s]].append((t, off))

                def texts(d: str) -> Iterator[str]:
                    nonlocal n_chars
                    for t, off in by_dom[d]:
                        text = files[t].get(off)["t"]
                        n_chars += len(text.encode("utf-8"))
                        yield text
                with env_set("RAYON_NUM_THREADS", str(cpu_count())):
                    tk.train_tokenizer(round_robin([texts(d) for d in counts], cfg.tokenizer_chars), cfg.vocab_size,
                                       tok_dir)
            acct.time("tokenizer", t0, 0, 0 if cfg.tokenizer else n_chars)
        finally:
            for f in files:
                f.close()
        save_json(self.out() / "acct.json", acct.to_dict())
        save_json(self.out() / "plan.json", {"ppl": ppl_stats, "counts": counts, "val_thr": str(val_thr)})


# ------------------------------------------------------------------------------------------------
# 7. tokenize
# ------------------------------------------------------------------------------------------------
class TokenizeStep(DataStep):
    stage = "tokenize"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        sources = self.sources()
        acct = Accounting(cfg.text_field)
        plan = json.loads((self.work / "vocab" / "plan.json").read_text())
        val_thr = int(plan["val_thr"])
        meta = dict(np.load(self.work / "filter" / f"{rank:05d}.meta.npz"))
        keep = np.load(self.work / "vocab" / f"{rank:05d}.keep.npy")
        tok = tk.load_tokenizer(self.work / "vocab" / "tokenizer")
        idx = np.flatnonzero(keep)
        lens = np.zeros(len(idx), dtype=np.int64)
        t0 = time.perf_counter()
        n_bytes = 0
        df = DocFile(self.work / "filter" / f"{rank:05d}.docs.jsonl")
        try:
            with atomic_file(self.out() / f"{rank:05d}.bin", "wb", fsync=False) as fb:
                batch: list[str] = []
                done = 0

                def flush() -> None:
                    nonlocal done
                    for ids in tok.encode_batch(batch, parse_special=False):
                        arr = np.asarray(ids, dtype=TOK_DTYPE)
                        arr.tofile(fb)
                        lens[done] = arr.size
                        done += 1
                    batch.clear()
                for rec in df.scan(meta["off"][idx]):
                    batch.append(rec["t"])
                    n_bytes += len(rec["t"].encode("utf-8"))
                    if len(batch) >= ENCODE_BATCH:
                        flush()
                flush()
        finally:
            df.close()
        acct.time("tokenize", t0, len(idx), n_bytes)
        dom_index = {d: i for i, d in enumerate(domains_of(sources))}
        dom = np.array([dom_index[sources[s].domain] for s in meta["src"][idx].tolist()], dtype=np.int16)
        save_json(self.out() / f"{rank:05d}.acct.json", acct.to_dict())
        val = np.array([b < val_thr for b in meta["bucket"][idx].tolist()], dtype=bool)
        save_npz(self.out() / f"{rank:05d}.npz", key=meta["key"][idx], lens=lens, dom=dom, val=val, off=meta["off"][idx])


# ------------------------------------------------------------------------------------------------
# 8. mix: mixture, shards, manifest, report
# ------------------------------------------------------------------------------------------------
class MixStep(DataStep):
    stage = "mix"

    def do(self, rank: int, world: int) -> None:
        cfg = self.cfg()
        walls = self.work / "walls.json"
        engine = json.loads(walls.read_text()) if walls.exists() else {}
        tasks_cpu = sum(json.loads(p.read_text())["cpu_seconds"] for p in sorted(self.work.glob("cpu/*.json"))
                        if not p.name.startswith("mix-"))
        # the report's cpu_seconds: every task's CPU time (its threads included) plus this one's
        t_start, c_start = time.perf_counter() - engine.get("elapsed_s", 0.0), time.process_time() - tasks_cpu
        sources = self.sources()
        acct = merged_account(self.work, cfg.text_field)
        acct.setup_seconds.update(engine.get("setup_seconds", {}))
        plan = json.loads((self.work / "vocab" / "plan.json").read_text())
        doms = domains_of(sources)
        toks = [dict(np.load(self.work / "tokenize" / f"{t:05d}.npz")) for t in range(self.n_filter)]
        mms = [np.memmap(self.work / "tokenize" / f"{t:05d}.bin", dtype=TOK_DTYPE, mode="r")
               if z["lens"].sum() else np.zeros(0, TOK_DTYPE) for t, z in enumerate(toks)]
        starts = [np.concatenate([[0], np.cumsum(z["lens"])]).astype(np.int64) for z in toks]
        files = [DocFile(self.work / "filter" / f"{t:05d}.docs.jsonl") for t in range(self.n_filter)]
        col = {k: np.concatenate([z[k] for z in toks]) for k in ("key", "dom", "val", "lens", "off")}
        task = np.concatenate([np.full(len(z["key"]), t, dtype=np.int64) for t, z in enumerate(toks)])
        idx = np.concatenate([np.arange(len(z["key"]), dtype=np.int64) for z in toks])
        order = np.argsort(col["key"], kind="stable")  # corpus order
        train: dict[str, DomainTokens] = {}
        val_docs: list[np.ndarray] = []
        val_count: Counter = Counter()
        counts = plan["counts"]

        def tokens(g: int) -> np.ndarray:
            t, i = int(task[g]), int(idx[g])
            return np.asarray(mms[t][starts[t][i]:starts[t][i + 1]])
        try:
            for d in counts:
                mine = order[col["dom"][order] == doms.index(d)]
                held = mine[col["val"][mine]]
                val_docs.extend(tokens(int(g)) for g in held)
                val_count[d] = len(held)
                tr = mine[~col["val"][mine]]

                def texts(tr=tr) -> Iterator[str]:
                    for g in tr.tolist():
                        yield files[int(task[g])].get(int(col["off"][g]))["t"]
                train[d] = DomainTokens(col["lens"][tr].tolist(), lambda j, tr=tr: tokens(int(tr[j])), texts)
            out_dir = cfg.out_dir
            extra = {"engine": engine} if engine else {}
            with atomic_dir(out_dir) as tmp:
                shutil.copytree(self.work / "vocab" / "tokenizer", tmp / "tokenizer")
                tok = tk.load_tokenizer(tmp / "tokenizer")
                skipped, n_skipped = skipped_files(sources)
                out = write_dataset(cfg, tmp, out_dir, tok, tmp / "tokenizer", train, val_docs, counts, val_count,
                                    plan["ppl"], acct, sources, skipped, n_skipped, t_start, c_start, extra)
        finally:
            for f in files:
                f.close()
        save_json(self.out() / "result.json", {"report": out["report"], "idx_train": out["idx_train"],
                                              "idx_val": out["idx_val"], "weights": out["weights"],
                                              "vocab_size": tok.vocab_size})


STEPS = (FilterStep, BucketStep, ClusterStep, FitStep, ScoreStep, VocabStep, TokenizeStep, MixStep)
