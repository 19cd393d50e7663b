"""Smoke + behaviour tests of DPO, rejection sampling and distillation on a tiny overfit teacher."""
import json

import pytest
import torch

from tinyseek.common import read_metrics
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post import distill, dpo, rejection, sft
from tinyseek.post.rewards import is_correct

N, SEED = 8, 3  # the teacher memorises these problems: make_problems("arithmetic", N, SEED, 1)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = sft.main(sft.Config(out_dir=str(out), name="t", n_examples=N, seed=SEED, epochs=60, batch_size=N,
                              lr=3e-3, warmup_steps=5, log_every=20))
    return res["run_dir"]


def test_rejection_keeps_only_verified(teacher, tmp_path):
    out = tmp_path / "rej.jsonl"
    res = rejection.main(rejection.Config(ckpt=teacher, n_problems=N, seed=SEED, k=4, keep_per_problem=2,
                                          temperature=1.0, out=str(out)))
    rows = [json.loads(l) for l in out.read_text().splitlines()]
    assert res["kept"] == len(rows) > 0
    assert all(is_correct(r["response"], r["answer"]) for r in rows)
    probs = {p.prompt: p for p in C.make_problems("arithmetic", N, SEED, 1)}
    assert all(r["prompt"] in probs for r in rows)
    counts = {}
    for r in rows:
        counts[r["prompt"]] = counts.get(r["prompt"], 0) + 1
    assert max(counts.values()) <= 2
    assert not list(tmp_path.glob(".*tmp"))  # no temp file left behind


def test_select_verified_drops_wrong_unfinished_and_duplicates():
    from types import SimpleNamespace as P
    good = "<think>1 + 1 = 2</think><answer>2</answer>"
    g = [[{"text": good, "correct": True, "format": 1.0, "finished": True},
          {"text": good, "correct": True, "format": 1.0, "finished": True},
          {"text": "<answer>2</answer>", "correct": True, "format": 0.0, "finished": True},
          {"text": good + "x", "correct": True, "format": 1.0, "finished": False},
          {"text": "<think>1 + 1 = 3</think><answer>3</answer>", "correct": False, "format": 1.0, "finished": True}]]
    rows = rejection.select_verified([P(prompt="q", answer="2", meta={})], g, keep_per_problem=5)
    assert [r["response"] for r in rows] == [good]


def test_dpo_raises_chosen_over_rejected(teacher, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    probs = C.make_problems("arithmetic", N, SEED, 1)
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": C.worked_response(p),
                                         "rejected": f"<think>{p.solution}</think><answer>{int(p.answer) + 1}</answer>"})
                             + "\n" for p in probs))
    res = dpo.main(dpo.Config(init=teacher, pairs=str(pairs), out_dir=str(tmp_path), name="d", epochs=6,
                              batch_size=4, lr=1e-3, beta=0.5))
    rows = read_metrics(tmp_path / "d" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-3)   # policy == reference at the start
    assert res["loss_last"] < 0.5 and rows[-1]["margin"] > 0 and rows[-1]["pref_acc"] == 1.0


def test_dpo_builds_pairs_from_graded_samples(teacher, tmp_path):
    res = dpo.main(dpo.Config(init=teacher, n_problems=N, seed=SEED, k=8, temperature=1.0, out_dir=str(tmp_path),
                              name="d2", epochs=1))
    pairs = [json.loads(l) for l in (tmp_path / "d2" / "pairs.jsonl").read_text().splitlines()]
    assert res["n_pairs"] == len(pairs) > 0
    assert all(p["chosen_reward"] > p["rejected_reward"] for p in pairs)


def test_distill_student_learns_teacher_outputs(teacher, tmp_path):
    res = distill.main(distill.Config(teacher=teacher, n_problems=N, seed=SEED, k=2, temperature=0.5, epochs=2,
                                      kd_weight=1.0, out_dir=str(tmp_path), name="st"))
    rows = read_metrics(tmp_path / "st" / "metrics.jsonl")
    assert res["n_examples"] > 0 and all(r["kd_loss"] > 0 for r in rows)
    data = [json.loads(l) for l in (tmp_path / "st" / "distill_data.jsonl").read_text().splitlines()]
    assert all(is_correct(d["response"], d["answer"]) for d in data)
    assert distill.kd_loss(torch.zeros(1, 2, 5), torch.zeros(1, 2, 5), torch.ones(1, 2), 2.0) == 0
    with pytest.raises(UserError):
        distill.Config(teacher="").validate()


def test_distill_and_dpo_with_lora_save_adapters_only(teacher, tmp_path):
    """LoRA on the student (its --student-init) and on the DPO policy: adapters only in the checkpoint,
    load_model merges them; the DPO reference is the base (adapters off): loss starts at log 2."""
    from tinyseek.model.lora import has_lora
    from tinyseek.train.checkpoint import load_model
    res = distill.main(distill.Config(teacher=teacher, student_init=teacher, n_problems=N, seed=SEED, k=2,
                                      temperature=0.5, epochs=1, kd_weight=1.0, out_dir=str(tmp_path), name="st",
                                      lora_rank=4, lora_targets="kv_b_proj,o_proj,gate_proj,up_proj,down_proj"))
    assert 0 < res["trainable_params"] < 0.2 * res["student_params"]
    d = load_model(res["checkpoint"])
    assert not has_lora(d[0]) and d[1]["lora"]["rank"] == 4
    assert {p.name for p in (tmp_path / "st" / "ckpt").iterdir()} == {res["checkpoint"].rsplit("/", 1)[-1]}
    pairs = tmp_path / "pairs.jsonl"
    probs = C.make_problems("arithmetic", N, SEED, 1)
    pairs.write_text("".join(json.dumps({"prompt": p.prompt, "chosen": C.worked_response(p),
                                         "rejected": f"<answer>{int(p.answer) + 1}</answer>"}) + "\n" for p in probs))
    res = dpo.main(dpo.Config(init=teacher, pairs=str(pairs), out_dir=str(tmp_path), name="d", epochs=2,
                              batch_size=4, lr=2e-3, beta=0.5, lora_rank=8))
    rows = read_metrics(tmp_path / "d" / "metrics.jsonl")
    assert rows[0]["loss"] == pytest.approx(0.6931, abs=1e-4) and res["loss_last"] < rows[0]["loss"]
    load_model(res["checkpoint"])
