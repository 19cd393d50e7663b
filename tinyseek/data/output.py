"""The data stage's last step, shared by the one-process reference and the parallel engine: TF-IDF
mixture weights, quotas and sampling order, the token shards (train and held-out), ``manifest.json``
and ``report.json``.

Input is per domain a :class:`DomainTokens`: the training documents' token counts in corpus order,
a way to fetch one document's tokens, and their texts (for the TF-IDF sample). Whatever produced them
(one process or many tasks), the same documents in the same order give byte-identical shards.
"""
from __future__ import annotations

import dataclasses
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from tinyseek.data.accounting import Accounting, format_report
from tinyseek.data.ingest import SUFFIXES
from tinyseek.data.mixture import mixture_weights, parse_weights, quotas, sample_order, tfidf_scores
from tinyseek.data.settings import Config
from tinyseek.data.shards import write_shards
from tinyseek.data.sources import Source
from tinyseek.errors import UserError
from tinyseek.integrity import sha256_file

TFIDF_DOCS = 400  # documents per domain in the TF-IDF sample (every k-th training document)


@dataclass
class DomainTokens:
    lens: list[int]                         # tokens of each training document, in corpus order
    doc: Callable[[int], np.ndarray]        # i -> the i-th training document's tokens
    texts: Callable[[], Iterator[str]]      # the training documents' texts, in the same order


def write_dataset(cfg: Config, tmp: Path, out_dir: Path, tok, tok_dir: Path, train: dict[str, DomainTokens],
                  val_docs: list[np.ndarray], counts: dict[str, int], val_count: Counter, ppl: dict,
                  acct: Accounting, sources: list[Source], skipped: list[str], n_skipped: int,
                  t_start: float, c_start: float, extra_report: dict | None = None) -> dict:
    """Mixture, shards, manifest and report into ``tmp`` (the output folder before its rename).
    Returns ``{"report", "idx_train", "idx_val", "weights"}``."""
    t0 = time.perf_counter()
    train_domains = [d for d in train if train[d].lens]
    if not train_domains:
        raise UserError("no training documents left after the held-out split; lower val_fraction")
    sizes = {d: int(sum(train[d].lens) + len(train[d].lens)) for d in train_domains}  # incl. eos
    static = parse_weights(cfg.weights)
    unknown = set(static) - set(train_domains)
    if unknown:
        raise UserError(f"weights name unknown domain(s) {sorted(unknown)}; domains: {', '.join(train_domains)}")
    if not static:
        total = sum(sizes.values())
        static = {d: sizes[d] / total for d in train_domains}
    else:
        static = {d: static.get(d, 0.0) for d in train_domains}
    sample = {}
    for d in train_domains:  # every k-th training doc, at most TFIDF_DOCS a domain (streamed)
        step = max(1, len(train[d].lens) // TFIDF_DOCS)
        sample[d] = [t for i, t in enumerate(train[d].texts()) if i % step == 0][:TFIDF_DOCS]
    scores = tfidf_scores(sample) if cfg.tfidf_power else {d: 1.0 for d in train_domains}
    weights = mixture_weights(static, scores, cfg.tfidf_power)
    target = cfg.target_tokens or sum(sizes.values())
    quota = quotas(weights, sizes, target, cfg.max_epochs)
    order = sample_order({d: [n + 1 for n in train[d].lens] for d in train_domains}, quota, cfg.seed)
    emitted: Counter = Counter()

    def train_docs() -> Iterator[np.ndarray]:
        for d, i in order:
            arr = train[d].doc(i)
            emitted[d] += int(arr.size) + 1
            yield arr
    tok_path = (out_dir / "tokenizer").resolve()
    extra = {"tokenizer": str(tok_path), "manifest": str((out_dir / "manifest.json").resolve())}
    idx_train = write_shards(train_docs(), tmp / "shards", tok.vocab_size, tok.eos_id,
                             shard_tokens=cfg.shard_tokens, extra={**extra, "split": "train"})
    idx_val = None
    if val_docs:
        idx_val = write_shards(val_docs, tmp / "shards" / "val", tok.vocab_size, tok.eos_id,
                               shard_tokens=cfg.shard_tokens, extra={**extra, "split": "val"})
    acct.time("mixture", t0, len(order), 0)

    rep = acct.report()
    rep["skipped_files"] = {"count": n_skipped, "files": skipped, "supported_suffixes": list(SUFFIXES)}
    rep.update(extra_report or {})
    rep["total_seconds"] = round(time.perf_counter() - t_start, 3)
    rep["cpu_seconds"] = round(time.process_time() - c_start, 3)  # this process, all threads; < wall on a busy machine
    dom_info = {}
    for d in counts:
        n_train = len(train[d].lens) if d in train else 0
        dom_info[d] = {"kept_docs": counts[d], "train_docs": n_train, "val_docs": val_count[d],
                       "train_tokens": sizes.get(d, 0), "static_weight": static.get(d, 0.0),
                       "tfidf_score": scores.get(d), "weight": weights.get(d, 0.0),
                       "quota_tokens": quota.get(d, 0), "sampled_tokens": emitted[d],
                       "sampled_share": emitted[d] / max(1, sum(emitted.values())),
                       "epochs": emitted[d] / sizes[d] if sizes.get(d) else 0.0,
                       "perplexity": ppl.get(d)}
    manifest = {
        "config": dataclasses.asdict(cfg),
        "sources": [{"name": s.name, "domain": s.domain, "origin": s.origin,
                     **s.meta,
                     "input_docs": acct.input[s.name], "kept_docs": acct.kept[s.name]} for s in sources],
        "domains": dom_info,
        "mixture_formula": "w_d = p_d * s_d**beta / sum_e p_e * s_e**beta (see tinyseek/data/mixture.py)",
        "tokenizer": {"path": str(tok_path), "kind": tok.kind, "vocab_size": tok.vocab_size,
                      "eos_id": tok.eos_id, "pad_id": tok.pad_id,
                      "sha256": sha256_file(tok_dir / "tokenizer.json") if (tok_dir / "tokenizer.json").exists() else None},
        "shards": {"train": {k: idx_train[k] for k in ("dtype", "n_tokens", "n_docs", "shards")},
                   "val": {k: idx_val[k] for k in ("dtype", "n_tokens", "n_docs", "shards")} if idx_val else None},
    }
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    (tmp / "report.json").write_text(json.dumps(rep, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
    return {"report": rep, "idx_train": idx_train, "idx_val": idx_val, "weights": weights}


def summary(cfg: Config, out: dict, vocab_size: int, out_dir: Path) -> dict:
    """``main``'s return value."""
    rep, idx_train, idx_val = out["report"], out["idx_train"], out["idx_val"]
    return {"out_dir": str(out_dir), "train_tokens": idx_train["n_tokens"], "train_docs": idx_train["n_docs"],
            "val_tokens": idx_val["n_tokens"] if idx_val else 0, "input_docs": rep["input_docs"],
            "kept_docs": rep["kept_docs"], "reconciled": rep["reconciled"], "weights": out["weights"],
            "vocab_size": vocab_size, "seconds": rep["total_seconds"]}


def print_summary(rep: dict, idx_train: dict, idx_val: dict | None, vocab_size: int, out_dir: Path,
                  weights: dict) -> None:
    """The accounting and throughput tables, then one line on what was written."""
    print(format_report(rep))
    val = f", {idx_val['n_tokens']:,} val tokens" if idx_val else ""
    print(f"\ndata: {idx_train['n_tokens']:,} train tokens in {idx_train['n_docs']:,} docs{val}"
          f" | vocab {vocab_size} | {rep['total_seconds']:.1f}s -> {out_dir}")
    print("weights: " + ", ".join(f"{d}={w:.3f}" for d, w in weights.items()))
