"""GRPO maths (hand-computed) and a one-step update that must favour the higher-reward sample."""
import math

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.post import losses as L
from tinyseek.post.grpo import grpo_update
from tinyseek.post.seqs import pack, sequence_logprob, token_logprobs


def test_group_advantages_hand_computed():
    r = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.5, 0.5, 0.5, 0.5]])
    a = L.grpo_advantages(r, eps=0.0)
    std = math.sqrt((0.75 ** 2 + 3 * 0.25 ** 2) / 3)  # Bessel-corrected std of [1,0,0,0]
    assert a[0].tolist() == pytest.approx([0.75 / std, -0.25 / std, -0.25 / std, -0.25 / std])
    assert a[1].abs().max() == 0  # all-equal group: no signal (eps keeps it finite)
    d = L.dr_grpo_advantages(r)
    assert d[0].tolist() == pytest.approx([0.75, -0.25, -0.25, -0.25])
    assert set(L.ADVANTAGES) == {"grpo", "dr_grpo"}


def test_dynamic_sampling_drops_uniform_groups():
    r = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    assert L.dynamic_sampling_keep(r).tolist() == [False, False, True]


def test_k3_kl_values():
    lp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    kl = L.kl_k3(lp, ref)
    # d = ref - lp = [0, 1, -1]; exp(d) - d - 1
    assert kl.tolist() == pytest.approx([0.0, math.e - 2, math.exp(-1)])
    assert (kl >= 0).all()


def test_clipped_surrogate_hand_computed():
    old = torch.zeros(1, 4)
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.1, 1.5]]))
    # A > 0: clip at 1 + eps_high (0.28 for clip-higher)
    loss, clipped = L.clipped_surrogate(lp, old, torch.tensor([2.0]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([-1.0, -1.8, -2.2, -2 * 1.28])
    assert clipped[0].tolist() == [False, False, False, True]
    # A < 0: clip at 1 - eps_low (the pessimistic bound keeps the unclipped 1.5)
    loss, clipped = L.clipped_surrogate(lp, old, torch.tensor([-1.0]), 0.2, 0.28)
    assert loss[0].tolist() == pytest.approx([0.8, 0.9, 1.1, 1.5])
    assert clipped[0].tolist() == [True, False, False, False]


def test_policy_loss_aggregations_differ_as_specified():
    lp = torch.zeros(2, 4)
    mask = torch.tensor([[1, 1, 1, 1], [1, 0, 0, 0]])
    adv = torch.tensor([1.0, -1.0])
    # per-token loss is -A: row0 = -1 (4 tokens), row1 = +1 (1 token)
    g, _ = L.policy_loss("grpo", lp, lp, adv, mask)
    assert float(g) == pytest.approx((-1 + 1) / 2)
    d, _ = L.policy_loss("dapo", lp, lp, adv, mask)
    assert float(d) == pytest.approx((-4 + 1) / 5)
    r, _ = L.policy_loss("dr_grpo", lp, lp, adv, mask, max_tokens=10)
    assert float(r) == pytest.approx((-4 + 1) / (2 * 10))
    with pytest.raises(ValueError):
        L.policy_loss("ppo", lp, lp, adv, mask)


def test_policy_loss_kl_term_and_clip_higher_only_for_dapo():
    lp = torch.log(torch.tensor([[1.25]]))
    old = torch.zeros(1, 1)
    m = torch.ones(1, 1, dtype=torch.long)
    a = torch.tensor([1.0])
    assert float(L.policy_loss("grpo", lp, old, a, m, eps_low=0.2, eps_high=0.28)[0]) == pytest.approx(-1.2)
    assert float(L.policy_loss("dapo", lp, old, a, m, eps_low=0.2, eps_high=0.28)[0]) == pytest.approx(-1.25)
    ref = torch.zeros(1, 1)
    loss, st = L.policy_loss("grpo", lp, old, a, m, ref_logp_BT=ref, beta=0.5)
    kl = float(L.kl_k3(lp, ref))
    assert st["kl"] == pytest.approx(kl)
    assert float(loss) == pytest.approx(-1.2 + 0.5 * kl)


def test_dpo_loss_hand_computed():
    loss, margin = L.dpo_loss(torch.tensor([-2.0, -1.0]), torch.tensor([-3.0, -1.0]),
                              torch.tensor([-2.5, -1.0]), torch.tensor([-2.5, -2.0]), beta=1.0)
    # margins: (0.5 - (-0.5)) = 1.0 ; (0 - 1) = -1.0
    assert margin.tolist() == pytest.approx([1.0, -1.0])
    want = (-math.log(1 / (1 + math.exp(-1))) - math.log(1 / (1 + math.exp(1)))) / 2
    assert float(loss) == pytest.approx(want)


def test_pack_masks_only_response_tokens():
    ids, mask = pack([[1, 2, 3], [4]], [[5, 6], [7, 8, 9]], pad_id=0)
    assert ids.tolist() == [[1, 2, 3, 5, 6], [4, 7, 8, 9, 0]]
    assert mask.tolist() == [[0, 0, 1, 1], [1, 1, 1, 0]]


@pytest.mark.parametrize("mu", [1, 2])  # mu = 1 takes the no-extra-forward path (old logp = detached logp)
@pytest.mark.parametrize("variant", ["grpo", "dr_grpo", "dapo"])
def test_one_grpo_step_raises_logprob_of_better_sample(variant, mu):
    torch.manual_seed(0)
    model = Transformer(model_micro())
    ref = Transformer(model_micro())
    ref.load_state_dict(model.state_dict())
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    prompt = [10, 11, 12, 13]
    good, bad = [20, 21, 22, 23], [30, 31, 32, 33]
    prompts, resps = [prompt, prompt, prompt, prompt], [good, bad, bad, good[:2]]
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    adv = L.ADVANTAGES[L.VARIANTS[variant].advantage](rewards).view(-1)

    def seq_lp():
        with torch.no_grad():
            model.eval()
            ids, m = pack(prompts, resps, 0)
            return sequence_logprob(token_logprobs(model, ids), m)

    before = seq_lp()
    model.train()
    st = grpo_update(model, ref, opt, prompts, resps, adv, pad_id=0, variant=variant, mu=mu, beta=0.04,
                     eps_low=0.2, eps_high=0.28, max_tokens=4, grad_clip=1.0)
    after = seq_lp()
    assert after[0] > before[0]          # highest reward: more likely
    assert after[1] < before[1]          # lowest reward: less likely
    assert st["kl"] >= 0 and "clip_frac" in st and math.isfinite(st["loss"])


def test_grpo_main_smoke_writes_metrics_plot_and_checkpoint(tmp_path):
    from tinyseek.common import read_metrics
    from tinyseek.post import grpo
    from tinyseek.train.checkpoint import load_model
    cfg = grpo.Config(out_dir=str(tmp_path), name="g", steps=2, prompts_per_step=2, group_size=4, max_new_tokens=8,
                      eval_every=1, eval_problems=4, variant="dapo", curriculum="linear", max_difficulty=2,
                      rewards={"accuracy": 1.0, "format": 0.2, "multi": 0.5})
    res = grpo.main(cfg)
    rows = read_metrics(tmp_path / "g" / "metrics.jsonl")
    train = [r for r in rows if "reward_mean" in r]
    assert [r["step"] for r in train] == [1, 2]
    for key in ("reward_mean", "accuracy", "format_rate", "response_length", "t_generate", "t_score", "t_train",
                "groups_kept", "difficulty"):
        assert key in train[0]
    assert [r["difficulty"] for r in train] == [1.0, 2.0]      # linear curriculum 1 -> 2
    assert [r["step"] for r in rows if "eval_pass1" in r] == [0, 1, 2]
    assert (tmp_path / "g" / "plots" / "grpo.png").stat().st_size > 1000
    load_model(res["checkpoint"])


def test_grpo_config_errors():
    from tinyseek.errors import UserError
    from tinyseek.post import grpo
    for bad in ({"variant": "ppo"}, {"group_size": 1}, {"rewards": {"style": 1.0}}, {"curriculum": "zigzag"},
                {"multi_weights": {"beauty": 1.0}}, {"temperature": 0.0}, {"ema": 1.0}):
        with pytest.raises(UserError):
            grpo.Config(**bad).validate()


def test_shuffle_rewards_null_control_changes_the_update_not_the_rewards(tmp_path):
    from tinyseek.post import grpo
    from tinyseek.train.checkpoint import load_model
    out = {}
    for shuffle in (False, True):
        cfg = grpo.Config(out_dir=str(tmp_path), name=f"g{int(shuffle)}", steps=1, prompts_per_step=4, group_size=4,
                          max_new_tokens=8, eval_every=0, eval_problems=2, warmup_steps=1, lr=1e-2, beta=0.0,
                          rewards={"accuracy": 1.0, "format": 0.2, "length": 0.5}, length_budget=6, plots=False,
                          shuffle_rewards=shuffle)  # length_budget 6: the length penalty varies within groups
        res = grpo.main(cfg)
        out[shuffle] = (res["reward_first"], load_model(res["checkpoint"])[0].state_dict())
    assert out[False][0] == pytest.approx(out[True][0]) and out[True][0] != 0  # same samples, same rewards
    assert any(not torch.equal(out[False][1][k], out[True][1][k]) for k in out[False][1])  # different update


def test_token_logprobs_on_response_positions_only_equal_the_full_forward():
    torch.manual_seed(0)
    model = Transformer(model_micro()).eval()
    ids, mask = pack([[1, 2, 3], [4, 5]], [[6, 7], [8, 9, 10, 11]], pad_id=0)
    with torch.no_grad():
        full = token_logprobs(model, ids)
        part = token_logprobs(model, ids, mask_BT=mask)
    m = mask.bool()
    assert torch.allclose(part[m], full[m], atol=1e-5) and bool((part[~m] == 0).all())


@pytest.mark.parametrize("variant,mu", [("grpo", 1), ("dr_grpo", 2), ("dapo", 1)])
def test_micro_batched_update_equals_the_whole_batch(variant, mu):
    """Gradient accumulation over chunks (each cut to its own length) gives the whole-batch step."""
    torch.manual_seed(0)
    base = Transformer(model_micro())
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(1, 200, (int(n),), generator=g).tolist() for n in torch.randint(2, 9, (7,), generator=g)]
    resps = [torch.randint(1, 200, (int(n),), generator=g).tolist() for n in torch.randint(1, 12, (7,), generator=g)]
    adv = torch.randn(7, generator=g)
    ref = Transformer(model_micro())
    ref.load_state_dict(base.state_dict())
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.01 * torch.randn_like(p))
    after = []
    for mb in (0, 3):
        model = Transformer(model_micro())
        model.load_state_dict(base.state_dict())
        model.train()
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        st = grpo_update(model, ref.eval(), opt, prompts, resps, adv, pad_id=0, variant=variant, mu=mu, beta=0.1,
                         eps_low=0.2, eps_high=0.28, max_tokens=12, grad_clip=0.0, micro_batch=mb)
        after.append((model.state_dict(), st))
    (a, sa), (b, sb) = after
    for k in a:
        assert torch.allclose(a[k], b[k], atol=2e-5), k
    assert sa["loss"] == pytest.approx(sb["loss"], abs=1e-5) and sa["kl"] == pytest.approx(sb["kl"], abs=1e-6)
    assert any(not torch.equal(a[k], base.state_dict()[k]) for k in a)  # the step moved something
