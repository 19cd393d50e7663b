"""PPO: GAE, per-token rewards, whitening and the clipped losses against hand-computed values; the
value loss falls over a few updates on a micro model; `tinyseek ppo` end to end (rule and rule + RM
rewards); bad input is one line with exit status 2."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyseek.cli import main as cli_main
from tinyseek.common import read_metrics
from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.post import common as C
from tinyseek.post import ppo
from tinyseek.post import reward_model as R
from tinyseek.post import rlhf_losses as L
from tinyseek.post.seqs import pack


def test_gae_hand_computed_with_prompt_offset_and_padding():
    # row 0: prompt at t=0, response t=1..3; row 1: response t=0..1, padding at t=2..3
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 0]])
    rewards = torch.tensor([[9.0, 0.0, 0.5, 1.0], [0.0, 2.0, 9.0, 9.0]])   # off-mask entries are ignored
    values = torch.tensor([[9.0, 1.0, 2.0, 3.0], [0.5, 1.0, 9.0, 9.0]])
    g, lam = 0.9, 0.5
    A, R_ = L.gae(rewards, values, mask, g, lam)
    # row 0 backwards: d3 = 1 - 3 = -2; d2 = 0.5 + .9*3 - 2 = 1.2; d1 = 0 + .9*2 - 1 = 0.8
    a3 = -2.0
    a2 = 1.2 + g * lam * a3
    a1 = 0.8 + g * lam * a2
    # row 1: d1 = 2 - 1 = 1; d0 = 0 + .9*1 - .5 = 0.4
    b1 = 1.0
    b0 = 0.4 + g * lam * b1
    assert A.tolist() == [pytest.approx([0.0, a1, a2, a3]), pytest.approx([b0, b1, 0.0, 0.0])]
    assert R_.tolist() == [pytest.approx([0.0, a1 + 1, a2 + 2, a3 + 3]), pytest.approx([b0 + 0.5, b1 + 1, 0, 0])]
    # lambda = 1, gamma = 1: the return is the reward-to-go, whatever the values
    _, R1 = L.gae(rewards, values, mask, 1.0, 1.0)
    assert R1.tolist() == [pytest.approx([0.0, 1.5, 1.5, 1.0]), pytest.approx([2.0, 2.0, 0.0, 0.0])]
    # lambda = 0: one-step TD errors
    A0, _ = L.gae(rewards, values, mask, g, 0.0)
    assert A0[0, 1:].tolist() == pytest.approx([0.8, 1.2, -2.0])


def test_token_rewards_put_the_score_on_the_last_token_and_k1_kl_everywhere():
    mask = torch.tensor([[0, 1, 1, 0], [1, 1, 1, 1]])
    lp = torch.tensor([[0.0, -1.0, -1.0, 0.0], [-1.0, -2.0, -3.0, -4.0]])
    ref = torch.tensor([[5.0, -1.5, -0.5, 5.0], [-1.0, -1.0, -1.0, -1.0]])
    r = L.token_rewards(torch.tensor([2.0, -1.0]), lp, ref, mask, kl_coef=0.1)
    assert r.tolist() == [pytest.approx([0.0, -0.05, 0.05 + 2.0, 0.0]), pytest.approx([0.0, 0.1, 0.2, 0.3 - 1.0])]
    assert L.token_rewards(torch.tensor([2.0, -1.0]), lp, None, mask, 0.1).tolist() == [[0, 0, 2, 0], [0, 0, 0, -1]]


def test_whitening_and_clipped_losses_hand_computed():
    x = torch.tensor([[1.0, 2.0, 3.0, 50.0]])
    w = L.masked_whiten(x, torch.tensor([[1, 1, 1, 0]]))
    assert w.tolist() == [pytest.approx([-1.0, 0.0, 1.0, 0.0], abs=1e-6)]   # mean 2, unbiased std 1
    # policy: ratios 1.5 (A=+1: clipped to 1.2), 0.5 (A=-2: clipped to 0.8, -0.8*-2=1.6 > 1.0), 1.0 (A=3)
    lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))
    loss, frac = L.ppo_policy_loss(lp, torch.zeros(1, 3), torch.tensor([[1.0, -2.0, 3.0]]), torch.ones(1, 3), 0.2)
    assert float(loss) == pytest.approx((-1.2 + 1.6 - 3.0) / 3) and frac == pytest.approx(2 / 3)
    # value: old 0, clip 0.5; V = 1 -> clipped 0.5; returns 2 and 0
    v, old = torch.tensor([[1.0, 1.0]]), torch.zeros(1, 2)
    vl, vfrac = L.value_loss(v, old, torch.tensor([[2.0, 0.0]]), torch.ones(1, 2), 0.5)
    # token 0: max((1-2)^2, (0.5-2)^2) = 2.25; token 1: max(1, 0.25) = 1
    assert float(vl) == pytest.approx(0.5 * (2.25 + 1.0) / 2) and vfrac == 0.5


def test_value_loss_falls_over_a_few_updates_on_a_micro_model():
    torch.manual_seed(0)
    model = Transformer(model_micro())
    ref = C.reference_model(model)
    head = torch.nn.Linear(model.cfg.d_model, 1)
    opt = torch.optim.AdamW([{"params": model.parameters(), "lr": 1e-4}, {"params": head.parameters(), "lr": 3e-3}])
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(5, 200, (6,), generator=g).tolist() for _ in range(8)]
    resps = [torch.randint(5, 200, (4 + i % 3,), generator=g).tolist() for i in range(8)]
    ids, mask = pack(prompts, resps, 0)
    score = torch.tensor([1.0, -1.0] * 4)
    model.train()
    vls = [ppo.ppo_update(model, head, ref, opt, ids, mask, score, kl_coef=0.05, gamma=1.0, lam=0.95, eps=0.2,
                          value_clip=0.2, vf_coef=0.1, epochs=2, grad_clip=1.0)["value_loss"] for _ in range(6)]
    assert vls[-1] < 0.5 * vls[0], vls


def test_ppo_rule_reward_end_to_end(tmp_path):
    res = ppo.main(ppo.Config(out_dir=str(tmp_path), name="p", steps=3, prompts_per_step=2, samples_per_prompt=4,
                              max_new_tokens=8, eval_every=2, eval_problems=4, reward="rule"))
    rows = read_metrics(tmp_path / "p" / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2, 3]
    for key in ("value_loss", "policy_loss", "kl", "kl_k1", "reward_mean", "accuracy", "clip_frac", "explained_var"):
        assert key in train[0]
    assert train[0]["kl"] == pytest.approx(0.0, abs=1e-6)      # the first rollout's policy is the reference
    assert [r["step"] for r in rows if "eval_pass1" in r] == [0, 2, 3]
    assert (tmp_path / "p" / "plots" / "ppo.png").stat().st_size > 1000
    from tinyseek.quant.load import load_model
    load_model(res["checkpoint"])
    assert (tmp_path / "p" / "ckpt" / "step_000003" / "value_head" / "head.safetensors").is_file()


def test_ppo_with_a_reward_model(tmp_path):
    probs = C.make_problems("arithmetic", 16, 3, 1)
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(
        {"prompt": p.prompt, "chosen": C.worked_response(p), "rejected": "<answer>0</answer>"}) + "\n" for p in probs))
    rm = R.main(R.Config(pairs=str(tmp_path / "pairs.jsonl"), out_dir=str(tmp_path), name="rm", epochs=1))
    res = ppo.main(ppo.Config(out_dir=str(tmp_path), name="p", steps=1, prompts_per_step=2, samples_per_prompt=2,
                              max_new_tokens=6, eval_problems=2, reward="both", rm=rm["run_dir"], rm_weight=2.0,
                              plots=False))
    row = [r for r in read_metrics(tmp_path / "p" / "metrics.jsonl") if "reward_mean" in r][0]
    assert row["reward_mean"] == pytest.approx(row["rule_reward"] + row["rm_score"], abs=1e-5)
    assert res["reward"] == "both"


def test_ppo_ema_returns_and_evaluates_the_averaged_policy(tmp_path):
    """With --ema close to 1 the average barely leaves the start, so the saved policy is the starting
    one (within the tiny drift) while the raw run's has moved; the evals say they scored the average."""
    kw = dict(out_dir=str(tmp_path), prompts_per_step=2, samples_per_prompt=4, max_new_tokens=6,
              eval_problems=2, plots=False, warmup_steps=0, seed=3)
    start = ppo.main(ppo.Config(**kw, name="start", steps=1, lr=1e-12))
    raw = ppo.main(ppo.Config(**kw, name="raw", steps=2, lr=1e-2))
    avg = ppo.main(ppo.Config(**kw, name="avg", steps=2, lr=1e-2, ema=0.999999))
    w0, wr, wa = (load_file(str(Path(r["checkpoint"]) / "model.safetensors")) for r in (start, raw, avg))
    moved = max(float((wr[k] - w0[k]).abs().max()) for k in w0)
    kept = max(float((wa[k] - w0[k]).abs().max()) for k in w0)
    assert moved > 1e-3 and kept < 1e-4
    assert {r["eval_weights"] for r in read_metrics(tmp_path / "avg" / "metrics.jsonl") if "eval_pass1" in r} == {"ema"}


@pytest.mark.parametrize("args, what", [
    (["--ema", "1"], "ema must be in [0, 1)"),
    (["--reward", "rm"], "needs --rm PATH"),
    (["--reward", "model"], "reward must be one of rule, rm, both"),
    (["--init", "NONE"], "does not exist"),
    (["--reward", "rm", "--rm", "NONE"], "does not exist"),
    (["--gamma", "1.5"], "gamma and lam must be in [0, 1]"),
])
def test_bad_input_is_one_line_exit_2(tmp_path, capsys, args, what):
    args = [a.replace("NONE", str(tmp_path / "none")) for a in args]
    assert cli_main(["ppo", *args, "--out-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("tinyseek: error:") and what in err[0]


def test_a_checkpoint_that_is_not_a_reward_model_is_refused(tmp_path, capsys):
    res = ppo.main(ppo.Config(out_dir=str(tmp_path), name="p", steps=1, prompts_per_step=1, samples_per_prompt=2,
                              max_new_tokens=4, eval_problems=1, plots=False))
    assert cli_main(["ppo", "--reward", "rm", "--rm", res["run_dir"], "--out-dir", str(tmp_path), "--name", "q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a reward model checkpoint" in err[0]
