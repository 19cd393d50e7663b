"""The data stage on datatrove's executors: the same documents and shards as the one-process reference
whatever the worker and task counts; duplicates found across tasks; a killed run resumes without redoing
finished tasks and without losing or repeating documents; one run a folder at a time."""
from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tinyseek.config import ConfigError
from tinyseek.data import engine as E
from tinyseek.data import pipeline as P
from tinyseek.data import steps as S
from tinyseek.data.shards import read_index
from tinyseek.errors import UserError

WORDS = [f"{a}{b}{c}" for a in ("br", "st", "pl", "gr", "cl", "tr", "sk", "fl") for b in "aeiou" for c in ("n", "st", "ck", "m", "rd")]


def prose(rng: random.Random, n_words: int = 90) -> str:
    """Random English-like prose: passes the heuristics, ~4 bits/char."""
    sents = []
    while sum(len(s.split()) for s in sents) < n_words:
        k = rng.randint(6, 14)
        sents.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + ".")
    return " ".join(sents)


def shard_bytes(out: Path) -> dict[str, bytes]:
    files = {}
    for sub in ("shards", "shards/val"):
        if (out / sub / "index.json").exists():
            for s in read_index(out / sub)["shards"]:
                files[f"{sub}/{s['file']}"] = (out / sub / s["file"]).read_bytes()
    files["tokenizer.json"] = (out / "tokenizer" / "tokenizer.json").read_bytes()
    return files


def sample_cfg(run_dir: Path, **kw) -> P.Config:
    cfg = P.preset("sample")
    cfg.run_dir, cfg.quiet, cfg.math_docs, cfg.decontam_problems = str(run_dir), True, 40, 8
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def report(out: Path) -> dict:
    return json.loads((Path(out) / "report.json").read_text())


def test_any_worker_or_task_count_gives_the_reference_shards(tmp_path):
    ref = P.main(sample_cfg(tmp_path / "serial", executor="serial"))
    ref_rep = report(ref["out_dir"])
    for name, kw in (("w1", {"workers": 1}), ("w2t3", {"workers": 2, "tasks": 3})):
        res = P.main(sample_cfg(tmp_path / name, **kw))
        rep = report(res["out_dir"])
        assert shard_bytes(Path(res["out_dir"])) == shard_bytes(Path(ref["out_dir"])), name
        assert (rep["kept_docs"], rep["dropped"], rep["sources"]) == (ref_rep["kept_docs"], ref_rep["dropped"],
                                                                      ref_rep["sources"]), name
        assert rep["reconciled"] and rep["engine"]["tasks"] == kw.get("tasks", kw["workers"])
        assert res["train_tokens"] == ref["train_tokens"] and res["val_tokens"] == ref["val_tokens"]
        for stage in ("clean", "heuristics", "near_dedup", "tokenize"):
            assert rep["stages"][stage]["docs"] > 0, stage
        assert not E.work_dir(P.Config(run_dir=str(tmp_path / name))).exists()  # removed on success


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """Four files (so two tasks split them file by file); an exact and a near duplicate each planted in
    another task's file than its original."""
    root = tmp_path_factory.mktemp("planted")
    rng = random.Random(0)
    docs = [[prose(rng) for _ in range(12)] for _ in range(4)]
    orig_exact, orig_near = docs[0][3], docs[2][5]
    docs[3][7] = orig_exact                                       # file 3 (task 1) repeats file 0 (task 0)
    words = orig_near.split()
    words[10] = "zzyzx"
    docs[1][4] = " ".join(words)                                  # file 1 (task 1) nearly repeats file 2 (task 0)
    for i, ds in enumerate(docs):
        (root / f"part{i}.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in ds))
    return root


def planted_cfg(root: Path, run_dir: Path, **kw) -> P.Config:
    return P.Config(run_dir=str(run_dir), inputs=f"english={root}", decontaminate=False, ppl_keep_fraction=1.0,
                    val_fraction=0.0, vocab_size=300, quiet=True, **kw)


@pytest.mark.parametrize("workers,tasks", [(1, 1), (2, 2), (2, 4)])
def test_planted_duplicates_found_across_tasks(planted, tmp_path, workers, tasks):
    res = P.main(planted_cfg(planted, tmp_path, workers=workers, tasks=tasks))
    rep = report(res["out_dir"])
    assert rep["dropped"] == {"exact_duplicate": 1, "near_duplicate": 1}
    assert rep["input_docs"] == 48 and rep["kept_docs"] == 46 and rep["reconciled"]
    # the later copies go, the first occurrences stay (corpus order: part1 line 5 comes after part0 but the
    # near duplicate's original is in part2, so the copy in part1 is the *first* one and part2's goes)
    assert rep["drop_examples"]["exact_duplicate"] == [f"{planted / 'part3.jsonl'}:8"]
    assert rep["drop_examples"]["near_duplicate"] == [f"{planted / 'part2.jsonl'}:6"]


def test_planted_run_tokens_do_not_depend_on_workers(planted, tmp_path):
    a = P.main(planted_cfg(planted, tmp_path / "a", workers=1))
    b = P.main(planted_cfg(planted, tmp_path / "b", workers=2, tasks=4))
    assert a["train_tokens"] == b["train_tokens"] > 0
    assert shard_bytes(Path(a["out_dir"])) == shard_bytes(Path(b["out_dir"]))


KILL_SCRIPT = """
import os, signal, sys
from tinyseek.data import pipeline as P, steps as S
real = S.ScoreStep.do
def do(self, rank, world):
    if rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)   # the whole run dies here, mid-stage
    return real(self, rank, world)
S.ScoreStep.do = do
cfg = P.preset("sample")
cfg.run_dir, cfg.quiet, cfg.math_docs, cfg.decontam_problems, cfg.workers, cfg.tasks = sys.argv[1], True, 40, 8, 1, 2
P.main(cfg)
"""


def test_killed_run_resumes_without_redoing_finished_tasks(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(run_dir)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    cfg = sample_cfg(run_dir, workers=1, tasks=2)
    work = E.work_dir(cfg)
    done = sorted(p.name for p in (work / "logs" / "score" / "completions").iterdir())
    assert done == ["00000"] and not cfg.out_dir.exists()
    ran = []
    for cls in S.STEPS:
        monkeypatch.setattr(cls, "do", lambda self, rank, world, real=cls.do: (ran.append((self.stage, rank)),
                                                                                real(self, rank, world))[1])
    res = P.main(cfg)  # workers=1: every task in this process, so `ran` sees them all
    assert ran == [("score", 1), ("vocab", 0), ("tokenize", 0), ("tokenize", 1), ("mix", 0)]
    ref = P.main(sample_cfg(tmp_path / "ref", executor="serial"))
    assert shard_bytes(Path(res["out_dir"])) == shard_bytes(Path(ref["out_dir"]))
    rep, ref_rep = report(res["out_dir"]), report(ref["out_dir"])
    assert rep["reconciled"] and rep["input_docs"] == ref_rep["input_docs"] and rep["dropped"] == ref_rep["dropped"]
    assert rep["sources"] == ref_rep["sources"]
    assert rep["engine"]["resumed"] and rep["engine"]["tasks_reused"] == {"filter": 2, "buckets": 2, "cluster": 1,
                                                                          "fit": 1, "score": 1}
    assert not work.exists()


def test_changed_settings_start_over(tmp_path, capsys):
    run_dir = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-c", KILL_SCRIPT, str(run_dir)], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL
    cfg = sample_cfg(run_dir, workers=1, tasks=2, min_char_entropy=2.5)
    cfg.quiet = False
    res = P.main(cfg)
    assert "starting over: the settings or inputs changed" in capsys.readouterr().out
    assert report(res["out_dir"])["reconciled"] and not report(res["out_dir"])["engine"]["resumed"]


def test_one_data_stage_a_run_folder_at_a_time(tmp_path):
    cfg = sample_cfg(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    fd = os.open(tmp_path / ".data.lock", os.O_CREAT | os.O_RDWR, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        with pytest.raises(UserError, match="another data stage is running"):
            P.main(cfg)
    finally:
        os.close(fd)


def test_a_user_error_in_a_task_is_one_line_and_leaves_no_work_folder(tmp_path):
    f = tmp_path / "short.jsonl"
    f.write_text("".join(json.dumps({"text": f"tiny {i}"}) + "\n" for i in range(4)))
    cfg = P.Config(run_dir=str(tmp_path / "run"), inputs=str(f), decontaminate=False, quiet=True, workers=2)
    with pytest.raises(UserError, match=r"^every document was dropped \(4 input: too_short 4\)"):
        P.main(cfg)
    assert not E.work_dir(cfg).exists() and not cfg.out_dir.exists()


def test_engine_settings_are_checked():
    for kw, msg in (({"executor": "spark"}, "executor must be one of"), ({"workers": -1}, "workers and tasks"),
                    ({"executor": "slurm"}, "needs --slurm-partition")):
        with pytest.raises(ConfigError, match=msg):
            P.Config(**kw).validate()


def test_results_do_not_depend_on_engine_only_settings():
    a, b = P.Config(workers=1), P.Config(workers=8, executor="ray", quiet=True)
    assert E.fingerprint(a, [], 2, 2) == E.fingerprint(b, [], 2, 2)
    assert E.fingerprint(a, [], 2, 2) != E.fingerprint(P.Config(min_char_entropy=1.0), [], 2, 2)


@pytest.mark.slow
def test_ray_executor_gives_the_reference_shards(tmp_path):
    pytest.importorskip("ray")
    ref = P.main(sample_cfg(tmp_path / "serial", executor="serial"))
    res = P.main(sample_cfg(tmp_path / "ray", executor="ray", workers=2))
    assert shard_bytes(Path(res["out_dir"])) == shard_bytes(Path(ref["out_dir"]))
    assert report(res["out_dir"])["reconciled"]


@pytest.mark.parametrize("executor", ["local", "serial"])
def test_special_token_strings_in_documents_stay_text(tmp_path, executor):
    """A corpus document that spells a special token ("<|eos|>", "<|assistant|>") gets no special id:
    every document ends with exactly one end-of-document token, the one the shard writer adds."""
    rng = random.Random(1)
    docs = [prose(rng) for _ in range(30)]
    docs[3] = docs[3][:200] + " <|eos|> " + docs[3][200:]
    docs[7] = docs[7][:100] + " <|assistant|> <|eos|>" + docs[7][100:]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    cfg = P.Config(run_dir=str(tmp_path / "run"), inputs=str(tmp_path / "in.jsonl"), decontaminate=False,
                   ppl_keep_fraction=1.0, val_fraction=0.0, vocab_size=300, quiet=True, executor=executor)
    res = P.main(cfg)
    out = Path(res["out_dir"])
    idx = read_index(out / "shards")
    import numpy as np
    from tinyseek.tokenizer import load_tokenizer
    tok = load_tokenizer(out / "tokenizer")
    toks = np.concatenate([np.fromfile(out / "shards" / s["file"], dtype=idx["dtype"]) for s in idx["shards"]])
    assert int((toks == tok.eos_id).sum()) == idx["n_docs"] == 30
    assert not set(np.unique(toks).tolist()) & (tok.special_ids - {tok.eos_id})
    assert "<|eos|>" in tok.decode(toks.tolist())


def test_slurm_chain_is_built_without_submitting(tmp_path):
    """No cluster here: the job arrays are built (one per stage, each depending on the one before,
    this Python environment activated) but nothing is submitted."""
    pytest.importorskip("datatrove.executor.slurm")
    cfg = P.Config(run_dir=str(tmp_path), executor="slurm", slurm_partition="cpu", tasks=4).validate()
    prev = None
    for cls in S.STEPS:
        n = {"filter": 4, "score": 4, "tokenize": 4, "buckets": 4}.get(cls.stage, 1)
        ex = E._executor(cfg, cls(dataclasses.asdict(cfg), str(tmp_path), 4, 4),
                         n, 2, tmp_path / "logs" / cls.stage, depends=prev)
        assert ex.world_size == n and ex.partition == "cpu" and ex.depends is prev
        assert ex.job_name == f"tinyseek-data-{cls.stage}" and ex.venv_path.endswith("bin/activate")
        prev = ex
