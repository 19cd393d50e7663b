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
    # where the naive per-token estimate logp - ref (k1) is negative, k3 is the positive closed form
    assert (lp - ref)[1] < 0 and float(kl[1]) == pytest.approx(math.exp(1.0) - 1.0 - 1.0)
    # KL(pi || ref) is not symmetric: swapping the arguments gives the other closed form
    assert L.kl_k3(ref, lp).tolist() == pytest.approx([0.0, math.exp(-1), math.e - 2])


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
    assert "clip_frac" in st and math.isfinite(st["loss"])
    if mu == 1:  # the only step sees the policy == the reference
        assert st["kl"] == pytest.approx(0.0, abs=1e-7)
    else:        # the mean over two steps; the second sees a moved policy: KL > 0
        assert st["kl"] > 1e-6


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


def test_rewards_and_advantages_stay_with_their_own_prompt_group(tmp_path, monkeypatch):
    """One GRPO step of ``main`` with the sampler and the update replaced: every sample is graded
    against its own prompt's answer, and the advantage that reaches the update for a (prompt,
    response) row is the one computed within that prompt's group (catches transposed groupings)."""
    from tinyseek.post import grpo
    from tinyseek.post.rollout import Sample

    N, G = 3, 4
    seen: dict = {}
    real_step_problems = grpo.step_problems

    def step_problems(cfg, step, rng):
        seen["probs"] = real_step_problems(cfg, step, rng)
        return seen["probs"]

    def correct(n: int, k: int) -> bool:  # a different pattern in each group
        return [[True, False, False, False], [False, True, True, False], [True, True, True, False]][n][k]

    def fake_sample(model, prompts, **kw):
        ids = [grpo.C.prompt_ids(seen["tok"], p.prompt) for p in seen["probs"]]
        assert len({tuple(i) for i in ids}) == N
        count = [0] * N
        out = []
        for p in prompts:  # which problem a prompt is comes from its ids, not from its position
            n = ids.index(p)
            out.append(Sample(tokens=[1000 + n, 2000 + count[n]], finished=True, end_id=None))
            count[n] += 1
        assert count == [G] * N
        return out

    def fake_decode(tok, toks):
        seen["tok"] = tok
        n, k = toks[0] - 1000, toks[1] - 2000
        ans = seen["probs"][n].answer if correct(n, k) else seen["probs"][n].answer + "17"
        return f"<think>x</think><answer>{ans}</answer>"

    def fake_update(model, ref, opt, prompts, responses, adv_B, **kw):
        seen["update"] = (prompts, responses, adv_B)
        return {}

    real_prompt_ids = grpo.C.prompt_ids

    def prompt_ids(tok, prompt):
        seen["tok"] = tok
        return real_prompt_ids(tok, prompt)

    monkeypatch.setattr(grpo, "step_problems", step_problems)
    monkeypatch.setattr(grpo, "sample", fake_sample)
    monkeypatch.setattr(grpo, "grpo_update", fake_update)
    monkeypatch.setattr(grpo.C, "decode", fake_decode)
    monkeypatch.setattr(grpo.C, "prompt_ids", prompt_ids)
    cfg = grpo.Config(out_dir=str(tmp_path), name="g", steps=1, prompts_per_step=N, group_size=G, max_new_tokens=4,
                      eval_every=0, eval_problems=1, variant="grpo", rewards={"accuracy": 1.0}, plots=False)
    grpo.main(cfg, evaluate=lambda *a, **k: {"pass@1": 0.0, "format_rate": 0.0, "mean_length": 0.0})
    prompts, responses, adv = seen["update"]
    ids = [real_prompt_ids(seen["tok"], p.prompt) for p in seen["probs"]]
    want = L.grpo_advantages(torch.tensor([[float(correct(n, k)) for k in range(G)] for n in range(N)]))
    assert len(prompts) == len(responses) == adv.numel() == N * G
    for prompt, resp, a in zip(prompts, responses, adv.tolist()):
        n, k = resp[0] - 1000, resp[1] - 2000
        assert prompt == ids[n]                                     # the response stays with its prompt
        assert a == pytest.approx(float(want[n, k]), abs=1e-6), (n, k)  # and gets its own group's advantage


def test_main_scores_the_heldout_set_with_the_evaluator_it_is_given(tmp_path):
    """GRPO's periodic eval is whatever ``evaluate`` the caller passes (the pipeline passes eval's own;
    ``tinyseek grpo`` gets the greedy scoring): called at step 0, every ``eval_every`` steps and at the
    end, on the same held-out problems, with its numbers logged as ``eval_*``."""
    from tinyseek.common import read_metrics
    from tinyseek.post import grpo
    from tinyseek.post.heldout import heldout_problems

    calls = []

    def evaluate(model, tok, problems, *, max_new_tokens, seed):
        calls.append(([p.prompt for p in problems], max_new_tokens, seed))
        return {"pass@1": len(calls) / 10, "format_rate": 0.5, "mean_length": 3.0}

    cfg = grpo.Config(out_dir=str(tmp_path), name="g", steps=2, prompts_per_step=2, group_size=2, max_new_tokens=4,
                      eval_every=1, eval_problems=3, eval_seed=1, seed=5, plots=False)
    res = grpo.main(cfg, evaluate=evaluate)
    want = [p.prompt for p in heldout_problems(cfg.tasks, 3, 1, cfg.max_difficulty)]
    assert calls == [(want, 4, 5)] * 3
    evals = [r for r in read_metrics(tmp_path / "g" / "metrics.jsonl") if "eval_pass1" in r]
    assert [(r["step"], r["eval_pass1"]) for r in evals] == [(0, 0.1), (1, 0.2), (2, 0.3)]
    assert (res["eval_pass1_start"], res["eval_pass1_end"]) == (0.1, 0.3)


def test_eval_stage_greedy_numbers_are_grpos_default_evaluator():
    """``tinyseek eval``'s greedy pass@1 / format / length and GRPO's default periodic eval are one
    measurement (the pipeline's GRPO curve and its eval table agree), and post/ never imports eval."""
    import subprocess
    import sys

    from tinyseek.eval import evaluate
    from tinyseek.post import grpo
    from tinyseek.post.heldout import greedy_scores, heldout_problems
    from tinyseek.tokenizer import byte_tokenizer

    torch.manual_seed(0)
    tok = byte_tokenizer()
    mcfg = model_micro()
    mcfg.vocab_size = tok.vocab_size
    model = Transformer(mcfg).eval()
    probs = heldout_problems("arithmetic", 4, 0, 1)
    full = evaluate(model, tok, probs, k=2, n_samples=2, max_new_tokens=6)
    assert {k: full[k] for k in greedy_scores(model, tok, probs, max_new_tokens=6)} == \
        greedy_scores(model, tok, probs, max_new_tokens=6)
    assert "pass@2" in full
    assert grpo.main.__defaults__ == (greedy_scores,)
    code = "import sys, tinyseek.post.grpo; print('tinyseek.eval' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_heldout_sets_hold_distinct_eval_split_prompts():
    """A held-out set never counts a prompt twice (drawing with replacement put 100 problems on 62
    prompts at level 1); when the split is smaller than asked, it is the whole split, and the same
    arguments give the same list."""
    from tinyseek.post.heldout import heldout_problems
    from tinyseek.tasks.common import bucket

    hundred = heldout_problems("arithmetic,chain_sum", 100, 0, 1)
    assert len(hundred) == 100 and len({p.prompt for p in hundred}) == 100
    assert {p.meta["task"] for p in hundred[:2]} == {"arithmetic", "chain_sum"}   # tasks interleaved
    everything = heldout_problems("arithmetic,chain_sum", 1000, 0, 1)
    assert 100 < len(everything) < 1000 and len({p.prompt for p in everything}) == len(everything)
    assert all(bucket(p.prompt) == "eval" for p in everything)
    assert [p.prompt for p in heldout_problems("arithmetic,chain_sum", 100, 0, 1)] == [p.prompt for p in hundred]
    assert heldout_problems("arithmetic", 0, 0, 1) == []
