"""Data stage throughput on a corpus of at least 200 MB assembled offline: MB/s per stage and end to end,
the datatrove engine with 1 worker (pinned to one core) against 2 workers (two cores), against the
one-process path of this tree, and against the pipeline as it was before the engine (git 10c7452,
checked out beside the benchmark's cache) on the same corpus. Also checks that every run drops the
same duplicates and keeps the same documents.

The corpus: ``.rst`` / ``.txt`` / ``.md`` files (domain ``english``, up to 40%) then ``.py`` files (domain
``code``, the rest) under this Python's site-packages, its standard library and /usr/share/doc, in sorted order, cut at
line boundaries into documents of at most 4,000 characters, written as 64 JSONL files per domain
(so two tasks split them file by file). Built once into ``~/.cache/tinyseek/data_throughput`` (private).

    .venv/bin/python benchmarks/data_throughput.py [--mb 200] [--skip-old] [--skip-serial]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import tinyseek  # noqa: F401  (thread settings before anything else loads)

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "tinyseek" / "data_throughput"
OLD_REV = "10c7452"
FILES_PER_DOMAIN = 64
DOC_CHARS = 4000


def text_files() -> list[tuple[str, Path]]:
    roots = [Path(sysconfig.get_paths()["purelib"]), Path(sysconfig.get_paths()["stdlib"]), Path("/usr/share/doc")]
    out = []
    for r in roots:
        for p in sorted(r.rglob("*")):
            if p.suffix in (".py", ".rst", ".txt", ".md") and p.is_file() and not p.is_symlink():
                out.append(("code" if p.suffix == ".py" else "english", p))
    return out


def pieces(text: str) -> list[str]:
    out, buf, n = [], [], 0
    for line in text.splitlines(keepends=True):
        if n + len(line) > DOC_CHARS and buf:
            out.append("".join(buf))
            buf, n = [], 0
        buf.append(line)
        n += len(line)
    if buf:
        out.append("".join(buf))
    return out


def build_corpus(mb: float) -> Path:
    """``mb`` MB of documents (UTF-8), cached; returns the folder with ``code/`` and ``english/``."""
    d = CACHE / f"corpus_{int(mb)}mb"
    if (d / "done.json").exists():
        return d
    CACHE.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(CACHE, 0o700)
    docs = {"code": [], "english": []}
    size = {"code": 0, "english": 0}
    files = text_files()
    # prose first (there is less of it: up to 40% of the corpus), then code up to the total
    for dom, budget in (("english", 0.4 * mb * 1e6), ("code", None)):
        if budget is None:
            budget = mb * 1e6 - size["english"]
        for fdom, p in files:
            if fdom != dom or size[dom] >= budget:
                continue
            try:
                text = p.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            for piece in pieces(text):
                docs[dom].append(piece)
                size[dom] += len(piece.encode("utf-8"))
    total = sum(size.values())
    if total < mb * 1e6:
        print(f"note: only {total / 1e6:.0f} MB of text found on this machine")
    tmp = d.with_name(d.name + f".tmp{os.getpid()}")
    for dom, ds in docs.items():
        (tmp / dom).mkdir(parents=True)
        per = -(-len(ds) // FILES_PER_DOMAIN)
        for i in range(FILES_PER_DOMAIN):
            with open(tmp / dom / f"part_{i:03d}.jsonl", "w", encoding="utf-8") as f:
                for t in ds[i * per:(i + 1) * per]:
                    f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    (tmp / "done.json").write_text(json.dumps({"bytes": total, "docs": {k: len(v) for k, v in docs.items()}}))
    os.replace(tmp, d)
    return d


def old_tree() -> Path:
    """This repository at ``OLD_REV`` (the pipeline before the engine), checked out once."""
    d = CACHE / f"tree-{OLD_REV}"
    if not (d / "tinyseek").exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "-f", "--detach", str(d), OLD_REV], check=True,
                       capture_output=True)
    return d


def run(name: str, corpus: Path, out: Path, extra: list[str], cwd: Path = ROOT, cores: str = "") -> dict:
    cmd = [sys.executable, "-m", "tinyseek", "data", "--inputs",
           f"code={corpus / 'code'},english={corpus / 'english'}", "--run-dir", str(out), "--quiet", "true", *extra]
    if cores:
        cmd = ["taskset", "-c", cores, *cmd]
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    t0 = time.perf_counter()
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode:
        raise SystemExit(f"{name} failed:\n{p.stderr[-3000:]}")
    rep = json.loads((out / "data" / "report.json").read_text())
    rep["wall"] = wall
    return rep


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mb", type=float, default=200)
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-serial", action="store_true")
    args = ap.parse_args()
    corpus = build_corpus(args.mb)
    info = json.loads((corpus / "done.json").read_text())
    mb = info["bytes"] / 1e6
    print(f"corpus: {mb:.0f} MB, {sum(info['docs'].values()):,} docs {info['docs']}, {corpus}")
    runs = {}
    work = CACHE / "runs"
    runs["engine_2w"] = run("engine, 2 workers", corpus, work / "e2", ["--workers", "2"], cores="0,1")
    runs["engine_1w"] = run("engine, 1 worker", corpus, work / "e1", ["--workers", "1"], cores="0")
    if not args.skip_serial:
        runs["serial_now"] = run("one process (this tree)", corpus, work / "s", ["--executor", "serial"], cores="0")
    if not args.skip_old:
        runs[f"before_{OLD_REV}"] = run(f"one process ({OLD_REV})", corpus, work / "old", [], cwd=old_tree(), cores="0")
    stages = list(runs["engine_1w"]["stages"])
    print(f"\n{'stage MB/s per core':<20}" + "".join(f"{k:>16}" for k in runs))
    for s in stages:
        print(f"{s:<20}" + "".join(f"{(r['stages'][s]['mb_per_s'] or 0):>16.2f}" for r in runs.values()))
    print(f"{'end to end MB/s':<20}" + "".join(f"{mb / r['wall']:>16.2f}" for r in runs.values()))
    print(f"{'wall s':<20}" + "".join(f"{r['wall']:>16.1f}" for r in runs.values()))
    e1, e2 = runs["engine_1w"], runs["engine_2w"]
    print(f"\nengine 2 workers / 1 worker: {e1['wall'] / e2['wall']:.2f}x  (target >= 1.7x)")
    print(f"engine end to end per core: 1 worker {mb / e1['wall']:.2f} MB/s, 2 workers {mb / e2['wall'] / 2:.2f} MB/s"
          " (target >= 2 MB/s per core)")
    for k, r in runs.items():
        if k.startswith("before") or k == "serial_now":
            print(f"engine 1 worker / {k}: {r['wall'] / e1['wall']:.2f}x,  engine 2 workers / {k}: "
                  f"{r['wall'] / e2['wall']:.2f}x")
    print("stage walls (engine, 2 workers):", e2["engine"]["stage_seconds"])
    same = {k: (r["kept_docs"], r["dropped"].get("exact_duplicate", 0), r["dropped"].get("near_duplicate", 0))
            for k, r in runs.items()}
    print("kept, exact duplicates, near duplicates:", same)
    print("same documents kept and duplicates found in every run:", len(set(same.values())) == 1)


if __name__ == "__main__":
    main()
