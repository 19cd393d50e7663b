"""Data pipeline throughput on the default corpus, measured side by side in ONE run:

1. the full ``tinyseek data`` pipeline (``cpu-tiny`` caps unless ``--full``): docs/s and MB/s per stage
   and in total, from the run's ``report.json``;
2. deduplication, ours (xxhash64 exact + ``datasketch`` MinHash LSH with MinHash-estimate check)
   against a straightforward pure-Python baseline (a set of MD5 digests for exact duplicates, then
   exact Jaccard of character 5-shingle sets against every kept document) on the same documents,
   with the duplicates each one finds;
3. tokenizer encode MB/s (batched, and one document at a time) with the run's BPE.

    .venv/bin/python benchmarks/dedup_baseline.py                 # cpu-tiny caps (~1 min)
    .venv/bin/python benchmarks/dedup_baseline.py --full          # whole default corpus
    .venv/bin/python benchmarks/dedup_baseline.py --baseline-docs 400 --json out.json

The baseline is quadratic, so it runs on ``--baseline-docs`` documents spread over those that reach
dedup, with planted exact and near copies (ours runs on the same ones, and once more on all of them). The machine may be shared: timings are
medians of ``--repeats`` interleaved repetitions.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from tinyseek.data import pipeline as P
from tinyseek.data.clean import clean_text, heuristic_reason, relaxed_heuristics, HeuristicConfig
from tinyseek.data.dedup import ExactDedup, NearDedup, jaccard
from tinyseek.data.sources import default_sources
from tinyseek.tokenizer import load_tokenizer


def dedup_inputs(cfg: P.Config) -> list[str]:
    """Cleaned documents that pass the heuristics, as the dedup stages see them (same caps)."""
    out = []
    relaxed = set(cfg.relaxed_domains.split(","))
    for src in default_sources(cfg.math_docs, cfg.use_samples, cfg.doc_chars, seed=cfg.seed):
        n = chars = 0
        for doc in src.read():
            if cfg.max_docs_per_source and n >= cfg.max_docs_per_source:
                break
            if cfg.max_chars_per_source and chars >= cfg.max_chars_per_source:
                break
            n += 1
            if doc.text is None:
                continue
            chars += len(doc.text)
            t = clean_text(doc.text)
            if heuristic_reason(t, relaxed_heuristics() if src.domain in relaxed else HeuristicConfig()) is None:
                out.append(t)
    return out


def plant_duplicates(docs: list[str], n: int) -> tuple[list[str], set[int]]:
    """``n`` documents spread over the corpus (every k-th), plus an exact copy of every 20th and a
    near copy (two words changed) of every 20th + 10th; returns the list and the planted indices."""
    step = max(1, len(docs) // n)
    base = docs[::step][:n]
    out, planted = [], set()
    for i, t in enumerate(base):
        out.append(t)
        if i % 20 == 0:
            planted.add(len(out))
            out.append(t)
        elif i % 20 == 10 and len(t.split()) > 50:
            w = t.split(" ")
            w[len(w) // 3], w[2 * len(w) // 3] = "PLANTED", "EDIT"
            planted.add(len(out))
            out.append(" ".join(w))
    return out, planted


def ours(docs: list[str], threshold: float, k: int) -> set[int]:
    ex, nd, dups = ExactDedup("xxhash"), NearDedup(threshold, 128, k), set()
    for i, t in enumerate(docs):
        if ex.is_duplicate(t) or nd.check(str(i), t) is not None:
            dups.add(i)
    return dups


def baseline(docs: list[str], threshold: float, k: int) -> set[int]:
    """Pure Python: MD5 set, then exact Jaccard against every kept document's shingle set."""
    seen, kept, dups = set(), [], set()
    for i, t in enumerate(docs):
        h = hashlib.md5(t.encode()).digest()
        if h in seen:
            dups.add(i)
            continue
        seen.add(h)
        norm = " ".join(t.lower().split())
        sh = {norm[j:j + k] for j in range(max(1, len(norm) - k + 1))}
        if any(jaccard(sh, other) >= threshold for other in kept):
            dups.add(i)
            continue
        kept.append(sh)
    return dups


CPU: dict[int, float] = {}  # id(result) -> CPU seconds of the timed call (all threads of this process)


def timed(fn, *args) -> tuple[float, object]:
    """(wall seconds, result); the call's CPU seconds go to ``CPU[id(result)]`` (the machine may be
    shared: MB per CPU-second is the figure that does not depend on the neighbours)."""
    c0, t0 = time.process_time(), time.perf_counter()
    r = fn(*args)
    CPU[id(r)] = time.process_time() - c0
    return time.perf_counter() - t0, r


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--full", action="store_true", help="no per-source caps (whole default corpus)")
    ap.add_argument("--baseline-docs", type=int, default=300, help="documents for the quadratic baseline")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved repetitions of the dedup comparison")
    ap.add_argument("--json", default="", help="also write the results here")
    args = ap.parse_args()

    cfg = P.preset("full" if args.full else "cpu-tiny")
    cfg.quiet = True
    with tempfile.TemporaryDirectory() as tmp:
        cfg.run_dir = tmp
        t0 = time.perf_counter()
        res = P.main(cfg)
        wall = time.perf_counter() - t0
        out = Path(res["out_dir"])
        rep = json.loads((out / "report.json").read_text())
        tok = load_tokenizer(out / "tokenizer")

    # ---- 1. pipeline ---------------------------------------------------------------------------
    mb_in = rep["stages"]["ingest"]["bytes"] / 1e6
    print(f"pipeline ({'full' if args.full else 'cpu-tiny'}): {rep['input_docs']} docs, {mb_in:.2f} MB in, "
          f"{rep['kept_docs']} kept, {res['train_tokens']:,} train tokens, wall {wall:.1f}s")
    print(f"{'stage':<12}{'docs':>8}{'MB':>8}{'seconds':>9}{'docs/s':>10}{'MB/s':>8}")
    for name in P.STAGES:
        st = rep["stages"][name]
        print(f"{name:<12}{st['docs']:>8}{st['bytes'] / 1e6:>8.2f}{st['seconds']:>9.2f}"
              f"{st['docs_per_s'] or 0:>10.0f}{st['mb_per_s'] or 0:>8.2f}")
    print(f"{'TOTAL':<12}{rep['input_docs']:>8}{mb_in:>8.2f}{wall:>9.2f}{rep['input_docs'] / wall:>10.0f}"
          f"{mb_in / wall:>8.2f}   (wall clock incl. setup {rep.get('setup_seconds', {})})")
    print(f"whole run: {rep['cpu_seconds']:.1f} CPU-s for {wall:.1f}s wall -> {mb_in / rep['cpu_seconds']:.2f} MB per CPU-s")

    # ---- 2. dedup: ours vs pure-Python baseline -----------------------------------------------------
    docs = dedup_inputs(cfg)
    sub, planted = plant_duplicates(docs, args.baseline_docs)
    mb_sub = sum(len(t.encode()) for t in sub) / 1e6
    t_ours, t_base, c_ours, c_base = [], [], [], []
    for _ in range(args.repeats):
        dt, d_ours = timed(ours, sub, cfg.near_dup_threshold, cfg.shingle)
        t_ours.append(dt)
        c_ours.append(CPU[id(d_ours)])
        dt, d_base = timed(baseline, sub, cfg.near_dup_threshold, cfg.shingle)
        t_base.append(dt)
        c_base.append(CPU[id(d_base)])
    to, tb = statistics.median(t_ours), statistics.median(t_base)
    print(f"\ndedup on {len(sub)} docs ({mb_sub:.2f} MB), median of {args.repeats}:")
    print(f"  ours (xxhash + MinHash LSH):   {to:7.2f}s  {len(sub) / to:8.0f} docs/s  {mb_sub / to:6.2f} MB/s  "
          f"{len(d_ours)} duplicates")
    print(f"  baseline (MD5 + all-pairs):    {tb:7.2f}s  {len(sub) / tb:8.0f} docs/s  {mb_sub / tb:6.2f} MB/s  "
          f"{len(d_base)} duplicates")
    agree = len(d_ours & d_base)
    print(f"  speed-up {tb / to:.1f}x wall, {statistics.median(c_base) / statistics.median(c_ours):.1f}x CPU time; found by both {agree}, only ours {len(d_ours - d_base)}, "
          f"only baseline {len(d_base - d_ours)}; planted {len(planted)}: ours found {len(planted & d_ours)}, "
          f"baseline {len(planted & d_base)}")
    mb_all = sum(len(t.encode()) for t in docs) / 1e6
    t_all, d_all = timed(ours, docs, cfg.near_dup_threshold, cfg.shingle)
    print(f"  ours on all {len(docs)} docs ({mb_all:.2f} MB): {t_all:.2f}s, {len(docs) / t_all:.0f} docs/s, "
          f"{mb_all / t_all:.2f} MB/s, {len(d_all)} duplicates (baseline would need ~{tb * (len(docs) / max(1, len(sub))) ** 2:.0f}s)")

    # ---- 3. tokenizer ---------------------------------------------------------------------------
    texts = docs[:2000]
    mb_tok = sum(len(t.encode()) for t in texts) / 1e6
    tb_batch, ids = timed(tok.encode_batch, texts)
    cpu_batch = CPU[id(ids)]
    tb_one, one = timed(lambda: [tok.encode(t) for t in texts])
    cpu_one = CPU[id(one)]
    n_tok = sum(len(x) for x in ids)
    print(f"\ntokenizer encode (BPE vocab {tok.vocab_size}) on {len(texts)} docs ({mb_tok:.2f} MB, "
          f"{mb_tok * 1e6 / n_tok:.2f} bytes/token): batched {mb_tok / tb_batch:.2f} MB/s "
          f"({mb_tok / cpu_batch:.2f} MB per CPU-s), one at a time {mb_tok / tb_one:.2f} MB/s "
          f"({mb_tok / cpu_one:.2f} MB per CPU-s)")

    result = {"pipeline": {"wall_s": wall, "input_docs": rep["input_docs"], "mb_in": mb_in,
                           "stages": rep["stages"]},
              "dedup": {"docs": len(sub), "mb": mb_sub, "ours_s": to, "baseline_s": tb, "speedup": tb / to,
                        "ours_cpu_s": statistics.median(c_ours), "baseline_cpu_s": statistics.median(c_base),
                        "dups_ours": len(d_ours), "dups_baseline": len(d_base), "dups_both": agree},
              "tokenizer": {"mb": mb_tok, "batch_mb_s": mb_tok / tb_batch, "single_mb_s": mb_tok / tb_one,
                            "batch_mb_per_cpu_s": mb_tok / cpu_batch, "single_mb_per_cpu_s": mb_tok / cpu_one,
                            "bytes_per_token": mb_tok * 1e6 / n_tok}}
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
