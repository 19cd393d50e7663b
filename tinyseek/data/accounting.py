"""Accounting for the data stage: every input document kept or dropped with its reason, per source,
and per-stage throughput; partial accounts (one per parallel task) merge into one."""
from __future__ import annotations

import time
from collections import Counter, defaultdict

from tinyseek.data.sources import Source
from tinyseek.errors import UserError

REASONS = ("malformed", "too_short", "too_long", "too_few_words", "symbol_ratio", "repeated_lines",
           "repeated_ngrams", "mean_word_length", "exact_duplicate", "near_duplicate", "contaminated",
           "low_entropy", "perplexity")
STAGES = ("ingest", "clean", "heuristics", "exact_dedup", "near_dedup", "decontam", "entropy", "perplexity",
          "tokenizer", "tokenize", "mixture")
MAX_MALFORMED_LISTED = 1000  # report lists this many malformed records (all are counted)
EXAMPLES_PER_REASON = 5      # dropped documents' locations listed per drop reason
KEYS_SEEN_LISTED = 100       # distinct keys kept of records without the text field (for the error)


class Accounting:
    """Per-source counts (input = kept + sum of dropped) and per-stage throughput."""

    def __init__(self, text_field: str = "text") -> None:
        self.text_field = text_field
        self.input: Counter = Counter()
        self.kept: Counter = Counter()
        self.dropped: dict[str, Counter] = defaultdict(Counter)
        self.malformed: list[dict] = []
        self.n_malformed = 0
        self.stage = {s: {"docs": 0, "bytes": 0, "seconds": 0.0} for s in STAGES}
        self.setup_seconds: dict[str, float] = {}  # one-off work outside the per-document stages
        self.examples: dict[str, list[str]] = {}   # reason -> first few dropped docs' locations
        self.n_texts = 0                           # records that had text (before any filter)
        self.n_missing_field = 0                   # JSON records without the text field ...
        self.keys_seen: Counter = Counter()        # ... and the keys they had (first 100 distinct)

    def drop(self, source: str, reason: str, loc: str = "") -> None:
        self.dropped[source][reason] += 1
        ex = self.examples.setdefault(reason, [])
        if loc and len(ex) < EXAMPLES_PER_REASON:
            ex.append(loc)

    def time(self, stage: str, t0: float, docs: int = 1, nbytes: int = 0) -> float:
        t1 = time.perf_counter()
        st = self.stage[stage]
        st["seconds"] += t1 - t0
        st["docs"] += docs
        st["bytes"] += nbytes
        return t1

    def to_dict(self) -> dict:
        """This (partial) account as JSON: what :meth:`merge` takes."""
        return {"input": dict(self.input), "kept": dict(self.kept),
                "dropped": {s: dict(c) for s, c in self.dropped.items()}, "malformed": self.malformed,
                "n_malformed": self.n_malformed, "stage": self.stage, "examples": self.examples,
                "n_texts": self.n_texts, "n_missing_field": self.n_missing_field, "keys_seen": dict(self.keys_seen)}

    def merge(self, d: dict) -> None:
        """Add a partial account (:meth:`to_dict`, one parallel task's): counts add up, the lists keep
        their caps (``MAX_MALFORMED_LISTED`` records, ``EXAMPLES_PER_REASON``, ``KEYS_SEEN_LISTED``)."""
        self.input.update(d["input"])
        self.kept.update(d["kept"])
        for s, c in d["dropped"].items():
            self.dropped[s].update(c)
        self.malformed.extend(d["malformed"][:max(0, MAX_MALFORMED_LISTED - len(self.malformed))])
        self.n_malformed += d["n_malformed"]
        for s, st in d["stage"].items():
            for k in ("docs", "bytes", "seconds"):
                self.stage[s][k] += st[k]
        for r, ex in d["examples"].items():
            mine = self.examples.setdefault(r, [])
            mine.extend(ex[:max(0, EXAMPLES_PER_REASON - len(mine))])
        self.n_texts += d["n_texts"]
        self.n_missing_field += d["n_missing_field"]
        for k, v in d["keys_seen"].items():
            if k in self.keys_seen or len(self.keys_seen) < KEYS_SEEN_LISTED:
                self.keys_seen[k] += v

    def report(self) -> dict:
        sources = {}
        for s in sorted(self.input):
            d = {r: self.dropped[s][r] for r in REASONS if self.dropped[s][r]}
            sources[s] = {"input": self.input[s], "kept": self.kept[s], "dropped": d,
                          "reconciled": self.input[s] == self.kept[s] + sum(d.values())}
        tot_drop = Counter()
        for s in sources.values():
            tot_drop.update(s["dropped"])
        n_in, n_kept = sum(self.input.values()), sum(self.kept.values())
        stages = {}
        for s, st in self.stage.items():
            sec = st["seconds"]
            stages[s] = {**st, "seconds": round(sec, 4),
                         "docs_per_s": round(st["docs"] / sec, 1) if sec > 0 else None,
                         "mb_per_s": round(st["bytes"] / 1e6 / sec, 2) if sec > 0 and st["bytes"] else None}
        return {"input_docs": n_in, "kept_docs": n_kept,
                "dropped": {r: tot_drop[r] for r in REASONS if tot_drop[r]},
                "reconciled": n_in == n_kept + sum(tot_drop.values()) and all(s["reconciled"] for s in sources.values()),
                "sources": sources, "malformed_count": self.n_malformed, "malformed": self.malformed,
                "drop_examples": {r: self.examples[r] for r in REASONS if self.examples.get(r)},
                "stages": stages, "setup_seconds": dict(self.setup_seconds)}


def format_report(rep: dict) -> str:
    """The accounting table and the stage throughput table, as printed by ``tinyseek data``."""
    reasons = [r for r in REASONS if rep["dropped"].get(r)]
    short = {r: r.replace("_duplicate", "_dup").replace("repeated_", "rep_") for r in reasons}
    head = f"{'source':<14}{'input':>8}{'kept':>8}" + "".join(f"{short[r]:>{max(len(short[r]) + 1, 7)}}" for r in reasons)
    lines = [head, "-" * len(head)]
    rows = list(rep["sources"].items()) + [("TOTAL", {"input": rep["input_docs"], "kept": rep["kept_docs"],
                                                      "dropped": rep["dropped"]})]
    for name, s in rows:
        lines.append(f"{name[:13]:<14}{s['input']:>8}{s['kept']:>8}"
                     + "".join(f"{s['dropped'].get(r, 0):>{max(len(short[r]) + 1, 7)}}" for r in reasons))
    lines.append(f"input = kept + dropped: {'yes' if rep['reconciled'] else 'NO'}"
                 + (f"; {rep['malformed_count']} malformed record(s), first at {rep['malformed'][0]['loc']}"
                    if rep["malformed_count"] else ""))
    sk = rep.get("skipped_files") or {}
    if sk.get("count"):
        lines.append(skipped_line(sk["count"], sk["files"]))
    lines += ["", f"{'stage':<12}{'docs':>9}{'MB':>9}{'seconds':>9}{'docs/s':>11}{'MB/s':>9}"]
    for s, st in rep["stages"].items():
        lines.append(f"{s:<12}{st['docs']:>9}{st['bytes'] / 1e6:>9.2f}{st['seconds']:>9.2f}"
                     f"{st['docs_per_s'] or 0:>11.0f}{st['mb_per_s'] or 0:>9.2f}")
    return "\n".join(lines)


def skipped_line(count: int, names: list[str], show: int = 5) -> str:
    """One line naming the first ``show`` files skipped for their suffix.

    >>> skipped_line(3, ["a.csv", "b.xml", "c.bin"], show=2)
    'skipped 3 file(s) with an unsupported suffix: a.csv, b.xml, ...'
    """
    more = ", ..." if count > min(show, len(names)) else ""
    return f"skipped {count} file(s) with an unsupported suffix: {', '.join(names[:show])}{more}"


def nothing_kept_error(acct: Accounting, sources: list[Source], sk: str = "") -> UserError:
    """Why no document survived, in one line: no records, no text field, all malformed, or the filters.
    ``sk``: the "; skipped ..." note on files left out, appended to each message."""
    n_in = sum(acct.input.values())
    n_files = sum(s.meta["files"] for s in sources if "files" in s.meta and not s.meta.get("default"))
    if n_in == 0:
        where = ", ".join(s.origin for s in sources)
        return UserError(f"read {n_files} file(s) from {where} but found no records (empty files?){sk}")
    if acct.n_texts == 0 and acct.n_missing_field:
        keys = ", ".join(k for k, _ in acct.keys_seen.most_common(10)) or "none"
        return UserError(f"{n_in} record(s) read but none has the text field {acct.text_field!r} "
                         f"({acct.n_missing_field} lack it; keys seen: {keys}); set --text-field to the field "
                         f"holding the text{sk}")
    if acct.n_texts == 0:
        first = acct.malformed[0] if acct.malformed else {"loc": "?", "error": "?"}
        return UserError(f"all {n_in} record(s) are malformed (first at {first['loc']}: {first['error']}){sk}")
    dropped = Counter()
    for c in acct.dropped.values():
        dropped.update(c)
    why = ", ".join(f"{r} {n}" for r, n in dropped.most_common())
    return UserError(f"every document was dropped ({n_in} input: {why}); nothing to write "
                     f"(see the filters' thresholds){sk}")
