"""Reward model: the Bradley-Terry loss by hand, pairs from JSONL (bad input = one line, exit 2), the
RM learning to rank a synthetic pair set above chance, its checkpoint round trip."""
import json
import math

import pytest
import torch

from tinyseek.cli import main as cli_main
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post import reward_model as R
from tinyseek.post.rlhf_losses import bradley_terry_loss


def test_bradley_terry_loss_hand_computed():
    loss, acc = bradley_terry_loss(torch.tensor([1.0, 0.0, -2.0]), torch.tensor([0.0, 0.5, -2.0]))
    # margins 1, -0.5, 0: -log sigmoid(m) = log(1 + e^-m)
    want = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5)) + math.log(2.0)) / 3
    assert float(loss) == pytest.approx(want)
    assert acc.tolist() == [1.0, 0.0, 0.0]  # a tie is not a win
    r = torch.tensor([0.3], requires_grad=True)
    bradley_terry_loss(r, torch.tensor([0.0]))[0].backward()
    assert float(r.grad) == pytest.approx(-1 / (1 + math.exp(0.3)))  # d/dr -log sigmoid(r) = -sigmoid(-r)


def write_pairs(path, n, seed=3):
    """Correct worked solutions (chosen) against the same reasoning with a wrong answer (rejected)."""
    rows = [{"prompt": p.prompt, "chosen": C.worked_response(p),
             "rejected": f"<think>{p.solution}</think><answer>{int(p.answer) + 7}</answer>"}
            for p in C.make_problems("arithmetic", n, seed, 1)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_rm_learns_to_rank_held_out_pairs(tmp_path):
    write_pairs(tmp_path / "pairs.jsonl", 64)
    res = R.main(R.Config(pairs=str(tmp_path / "pairs.jsonl"), out_dir=str(tmp_path), name="rm", epochs=4,
                          batch_size=8, lr=1e-3, heldout_fraction=0.25, seed=0))
    assert res["n_heldout_pairs"] + res["n_train_pairs"] == 64 and res["n_heldout_pairs"] >= 10
    assert res["loss_last"] < res["loss_first"]
    assert res["heldout_acc"] >= 0.75          # chance is 0.5; never-seen prompts
    # the checkpoint: a plain float checkpoint of the backbone plus the head, scores reproduced
    rm = R.load_reward_model(res["run_dir"])
    pairs = R.load_pairs(str(tmp_path / "pairs.jsonl"))
    _, held = R.split_pairs(pairs, 0.25, 1.0, 0)
    tok = C.load_tokenizer_for(res["run_dir"])
    assert R.pair_accuracy(rm, tok, held) == pytest.approx(res["heldout_acc"])
    from tinyseek.quant.load import load_model
    lm, meta = load_model(res["checkpoint"])
    assert meta["stage"] == "rm" and lm.cfg.d_model == rm.backbone.cfg.d_model


def test_label_fraction_trains_on_a_prefix_with_the_same_heldout():
    pairs = [{"prompt": f"q{i // 2}", "chosen": "a", "rejected": "b", "i": i} for i in range(100)]
    full, ho_full = R.split_pairs(pairs, 0.2, 1.0, 5)
    fifth, ho_fifth = R.split_pairs(pairs, 0.2, 0.2, 5)
    assert ho_full == ho_fifth and len(ho_full) == 20
    assert fifth == full[:len(fifth)] and len(fifth) == 16
    assert not {p["prompt"] for p in full} & {p["prompt"] for p in ho_full}


@pytest.mark.parametrize("text, what", [
    ('{"prompt": "a", "chosen": "b"}\n', ":1: expected an object"),
    ('\n{"prompt": "a", "chosen": "b", "rejected": 3}\n', ":2: expected an object"),
    ('{"prompt": "a", "chosen": "b", "rejected": "c"}\nnot json\n', ":2: not JSON"),
    ('["a", "b", "c"]\n', ":1: expected an object"),
    ("\n\n", "no pairs"),
])
def test_malformed_pairs_are_one_line_errors(tmp_path, capsys, text, what):
    p = tmp_path / "bad.jsonl"
    p.write_text(text)
    with pytest.raises(UserError, match=what.replace("(", r"\(")):
        R.load_pairs(str(p))
    assert cli_main(["rm", "--pairs", str(p), "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyseek: error:") and what in err[0]


def test_missing_inputs_exit_2(tmp_path, capsys):
    assert cli_main(["rm", "--init", str(tmp_path / "none"), "--out-dir", str(tmp_path)]) == 2
    assert cli_main(["rm", "--pairs", str(tmp_path / "none.jsonl"), "--out-dir", str(tmp_path)]) == 2
    with pytest.raises(UserError, match="does not exist"):
        R.load_reward_model(tmp_path / "none")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(l.startswith("tinyseek: error:") and "does not exist" in l for l in err)
