"""LoRA adapters: exact at init, only adapters train, merge == unmerged, generation through the engine
(MLA's folded decode falls back correctly), adapter checkpoints (small, merged by load_model,
chained, exact resume), the stages' --lora-* options end to end."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tinyseek import cli
from tinyseek.common import read_metrics, set_rng_state
from tinyseek.config import ConfigError, ModelConfig, model_micro
from tinyseek.errors import UserError
from tinyseek.model import lora as L
from tinyseek.model.transformer import Transformer
from tinyseek.post import common as C
from tinyseek.post import distill, dpo, grpo, sft
from tinyseek.post import losses
from tinyseek.post.grpo import grpo_update
from tinyseek.post.rollout import sample
from tinyseek.post.seqs import pack, sequence_logprob, sft_targets, token_logprobs
from tinyseek.train import checkpoint as ckpt

MLA_NAMES = "q_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj"
GQA_NAMES = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def gqa_cfg() -> ModelConfig:
    return ModelConfig(attn="gqa", vocab_size=256, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=128,
                       d_ff=128, n_dense_layers=1, n_routed_experts=4, n_shared_experts=1, moe_d_ff=32)


def mla_q_lora_cfg() -> ModelConfig:
    cfg = model_micro()
    cfg.q_lora_rank = 24  # q_a_proj / q_b_proj instead of q_proj
    return cfg


CONFIGS = {"mla": (model_micro, MLA_NAMES), "gqa": (gqa_cfg, GQA_NAMES),
           "mla_q_lora": (mla_q_lora_cfg, "q_a_proj,q_b_proj,kv_a_proj_with_mqa,kv_b_proj,o_proj,gate_proj,up_proj,down_proj")}


def build(kind: str = "mla", seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(CONFIGS[kind][0]()).eval()


def randomize_adapters(model, std: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in L.lora_modules(model).values():
            m.lora_B.weight.copy_(torch.randn(m.lora_B.weight.shape, generator=g) * std)


def logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_fresh_adapters_give_the_base_logits_exactly(kind):
    model = build(kind)
    x = torch.randint(0, 256, (2, 17))
    base = logits(model, x)
    wrapped = L.apply_lora(model, 4, 8.0, CONFIGS[kind][1])
    names = {n.rsplit(".", 1)[-1] for n in wrapped}
    assert names == set(CONFIGS[kind][1].split(","))
    assert not any("router" in n or "lm_head" in n for n in wrapped)
    assert torch.equal(logits(model, x), base)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)


def test_targets_all_linear_lm_head_and_errors():
    model = build()
    picked = L.select_targets(model, L.ALL_LINEAR)
    assert "lm_head" not in picked and any(p.endswith("kv_b_proj") for p in picked)
    assert L.select_targets(model, "lm_head") == ["lm_head"]  # only when named
    with pytest.raises(UserError, match="k_proj.*available: down_proj, gate_proj, kv_a_proj_with_mqa"):
        L.apply_lora(model, 4, 8.0, "q_proj,k_proj")
    assert not L.has_lora(model) and all(p.requires_grad for p in model.parameters())  # nothing half-applied
    tied = model_micro()
    tied.tie_embeddings = True
    with pytest.raises(UserError, match="tied"):
        L.apply_lora(Transformer(tied), 4, 8.0, "lm_head")


@pytest.mark.parametrize("kind", ["mla", "gqa"])
def test_merged_equals_unmerged_and_restores_a_plain_model(kind):
    model = build(kind)
    x = torch.randint(0, 256, (2, 17))
    L.apply_lora(model, 4, 16.0, CONFIGS[kind][1])
    randomize_adapters(model)
    unmerged = logits(model, x)
    assert (unmerged - L.BaseView(model)(x).logits).abs().max() > 1e-3  # the adapters matter
    L.merge_lora(model)
    assert not L.has_lora(model) and not hasattr(model, "lora_info")
    assert all(p.requires_grad for p in model.parameters())
    assert set(model.state_dict()) == set(Transformer(model.cfg).state_dict())
    torch.testing.assert_close(logits(model, x), unmerged, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind,targets", [("mla", MLA_NAMES), ("mla", "kv_b_proj"), ("mla", "q_proj,o_proj"),
                                          ("mla", "gate_proj,up_proj,down_proj"), ("gqa", GQA_NAMES),
                                          ("mla_q_lora", "q_a_proj,q_b_proj")])
def test_engine_generation_with_adapters_equals_the_merged_model(kind, targets):
    """Rollouts see the adapters: greedy tokens through the KV-cache engine (MLA's absorbed / folded
    decode falls back to the module calls for wrapped projections) == those of the merged model,
    and the adapters' cached decode logits == their full forward."""
    model = build(kind)
    L.apply_lora(model, 4, 16.0, targets)
    randomize_adapters(model, std=0.2)
    prompts = [[1, 2, 3, 4, 5], [7, 8, 9], [11, 12, 13, 14]]
    with_adapters = sample(model, prompts, eos_id=0, max_tokens=12, temperature=0)
    base = build(kind)
    assert sample(base, prompts, eos_id=0, max_tokens=12, temperature=0) != with_adapters  # adapters change it
    # cached decode == one full forward (the naive / absorbed forms with wrapped modules)
    ids = torch.tensor([prompts[0] + with_adapters[0].tokens])
    full = logits(model, ids)[0, len(prompts[0]) - 1:-1]
    assert full.argmax(-1).tolist() == with_adapters[0].tokens
    # lora.merged (GRPO rollouts): temporary plain projections, the fast paths, the same tokens; wrappers back after
    adapters = {k: v.clone() for k, v in L.lora_state_dict(model).items()}
    with L.merged(model):
        assert not L.has_lora(model)  # plain projections: MLA's folded decode applies again
        assert sample(model, prompts, eos_id=0, max_tokens=12, temperature=0) == with_adapters
    assert L.has_lora(model) and all(torch.equal(v, adapters[k]) for k, v in L.lora_state_dict(model).items())
    L.merge_lora(model)
    assert sample(model, prompts, eos_id=0, max_tokens=12, temperature=0) == with_adapters


def sft_batch(seed: int = 0):
    torch.manual_seed(seed)
    prompts = [[int(t) for t in torch.randint(3, 250, (5,))] for _ in range(4)]
    resps = [[int(t) for t in torch.randint(3, 250, (6,))] for _ in range(4)]
    ids, mask = pack(prompts, resps, 0)
    return ids, sft_targets(ids, mask)


def sft_step(model, opt, ids, tgt) -> float:
    out = model(ids[:, :-1], tgt)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(C.trainable(model), 1.0)
    opt.step()
    return float(out.ce_loss.detach())


def test_lora_sft_step_lowers_the_loss_and_changes_only_adapters():
    model = build("gqa")
    base = {k: v.clone() for k, v in model.state_dict().items()}
    L.apply_lora(model, 8, 16.0, GQA_NAMES)
    params = C.trainable(model)
    assert sum(p.numel() for p in params) < 0.2 * sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(params, lr=1e-2)
    ids, tgt = sft_batch()
    model.train()
    losses_ = [sft_step(model, opt, ids, tgt) for _ in range(4)]
    assert losses_[-1] < losses_[0]
    after = model.state_dict()
    for k, v in base.items():  # base weights (wrapped ones under .base.) bitwise unchanged
        wk = k if k in after else k.replace(".weight", ".base.weight")
        assert torch.equal(after[wk], v), k
    assert all(not torch.equal(t, torch.zeros_like(t)) for k, t in L.lora_state_dict(model).items() if "lora_B" in k)


@pytest.mark.parametrize("mu", [1, 2])
def test_lora_grpo_step_raises_the_logprob_of_the_better_sample(mu):
    model = build()
    L.apply_lora(model, 4, 16.0, MLA_NAMES)
    ref = C.reference_model(model)
    assert isinstance(ref, L.BaseView)  # no second copy of the weights
    opt = torch.optim.AdamW(C.trainable(model), lr=1e-2)
    prompt = [10, 11, 12, 13]
    prompts, resps = [prompt] * 4, [[20, 21, 22, 23], [30, 31, 32, 33], [30, 31, 32, 33], [20, 21]]
    adv = losses.ADVANTAGES["grpo"](torch.tensor([[1.0, 0.0, 0.0, 0.5]])).view(-1)
    ids, m = pack(prompts, resps, 0)

    def seq_lp(net):
        with torch.no_grad():
            return sequence_logprob(token_logprobs(net, ids), m)

    before = seq_lp(model)
    model.train()
    for _ in range(2):  # B starts at zero: the first step moves B only, then A moves too
        st = grpo_update(model, ref, opt, prompts, resps, adv, pad_id=0, variant="grpo", mu=mu, beta=0.04,
                         eps_low=0.2, eps_high=0.28, max_tokens=4, grad_clip=1.0)
    model.eval()
    after = seq_lp(model)
    assert after[0] > before[0] and after[1] < before[1]
    assert torch.equal(seq_lp(ref), before)  # the reference is the untouched base
    assert st["kl"] > 0


def save_base(tmp_path, kind="mla"):
    model = build(kind)
    d = ckpt.save_checkpoint(tmp_path / "base" / "ckpt", 5, model, None, {"stage": "pretrain"})
    return model, d


def test_adapter_checkpoint_is_small_and_load_model_merges_it(tmp_path):
    base_model, base_dir = save_base(tmp_path)
    model, _ = ckpt.load_model(tmp_path / "base")
    L.apply_lora(model, 4, 16.0, MLA_NAMES, base=C.base_checkpoint(str(tmp_path / "base")))
    randomize_adapters(model)
    opt = torch.optim.AdamW(C.trainable(model), lr=1e-3)
    x = torch.randint(0, 256, (2, 15))
    unmerged = logits(model, x)
    d = C.save(tmp_path / "run", 3, model, opt, {"stage": "sft"})
    assert {p.name for p in d.iterdir()} == {"adapter.safetensors", "optim.pt", "rng.pt", "meta.json", "checksums.json"}
    meta = json.loads((d / "meta.json").read_text())
    assert meta["lora"] == {"rank": 4, "alpha": 16.0, "targets": MLA_NAMES.split(","), "dropout": 0.0}
    assert meta["base"] == str(base_dir.resolve()) and meta["model_config"]["attn"] == "mla"
    small, full = (d / "adapter.safetensors").stat().st_size, (base_dir / "model.safetensors").stat().st_size
    assert small < 0.25 * full
    assert ckpt.latest_checkpoint(tmp_path / "run" / "ckpt") == d
    loaded, lmeta = ckpt.load_model(tmp_path / "run")  # a run dir: its latest (adapter) step
    assert type(loaded) is Transformer and not L.has_lora(loaded) and lmeta["step"] == 3
    assert all(p.requires_grad for p in loaded.parameters()) and not loaded.training
    torch.testing.assert_close(logits(loaded, x), unmerged, atol=1e-5, rtol=0)
    # an adapter on top of an adapter checkpoint: load_model follows the chain
    L.merge_lora(model)
    L.apply_lora(model, 2, 4.0, "o_proj", base=C.base_checkpoint(str(tmp_path / "run")))
    randomize_adapters(model, seed=7)
    second = logits(model, x)
    d2 = C.save(tmp_path / "run2", 1, model, None, {"stage": "grpo"})
    torch.testing.assert_close(logits(ckpt.load_model(d2)[0], x), second, atol=1e-5, rtol=0)
    # a missing base is one clear line
    shutil.rmtree(base_dir)
    with pytest.raises(UserError, match="base checkpoint .* does not exist"):
        ckpt.load_model(d)


def test_lora_resume_is_exact(tmp_path):
    """Adapters + their optimizer state + RNG from an adapter checkpoint continue bit-exactly."""
    _, base_dir = save_base(tmp_path, "gqa")
    ids, tgt = sft_batch(3)

    def fresh():
        m, _ = ckpt.load_model(base_dir)
        L.apply_lora(m, 4, 16.0, GQA_NAMES, dropout=0.1, base=str(base_dir))  # dropout: the RNG must resume too
        m.train()
        return m, torch.optim.AdamW(C.trainable(m), lr=1e-2)

    torch.manual_seed(11)
    model, opt = fresh()
    for _ in range(2):
        sft_step(model, opt, ids, tgt)
    d = C.save(tmp_path / "run", 2, model, opt, {"stage": "sft"})
    for _ in range(2):
        sft_step(model, opt, ids, tgt)
    want = L.lora_state_dict(model)

    model2, opt2 = fresh()
    _, rng = ckpt.load_training_state(d, model2, opt2)
    set_rng_state(rng)
    for _ in range(2):
        sft_step(model2, opt2, ids, tgt)
    got = L.lora_state_dict(model2)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    """A tiny full-SFT run (vocabulary sized to the tokenizer): the base the LoRA stages adapt."""
    out = tmp_path_factory.mktemp("lora_base")
    return sft.main(sft.Config(out_dir=str(out), name="base", n_examples=16, epochs=1, batch_size=8))["run_dir"]


def test_sft_lora_end_to_end_through_the_cli_options(base_run, tmp_path):
    args = ["--init", base_run, "--out-dir", str(tmp_path), "--name", "lora", "--n-examples", "32", "--epochs", "3",
            "--batch-size", "8", "--lr", "1e-2", "--log-every", "1", "--lora-rank", "4", "--lora-alpha", "8",
            "--lora-targets", MLA_NAMES]
    res = cli.run_stage("sft", args)
    d = ckpt.latest_checkpoint(tmp_path / "lora" / "ckpt")
    assert str(d) == res["checkpoint"] and (d / "adapter.safetensors").is_file() and not (d / "model.safetensors").exists()
    meta = ckpt.read_meta(d)
    assert meta["lora"]["rank"] == 4 and meta["lora"]["alpha"] == 8.0 and meta["base"].startswith("/")
    assert (tmp_path / "lora" / "tokenizer").is_dir()
    rows = read_metrics(tmp_path / "lora" / "metrics.jsonl")
    assert rows[-1]["loss"] < rows[0]["loss"]
    model, _ = ckpt.load_model(tmp_path / "lora")
    base, _ = ckpt.load_model(base_run)
    assert type(model) is Transformer and any(not torch.equal(a, b) for a, b in
                                              zip(model.state_dict().values(), base.state_dict().values()))
    # quantize takes it unchanged (its float source is the merged model)
    q = cli.run_stage("quantize", ["--ckpt", str(tmp_path / "lora")])
    assert not (Path(q["out"]) / "adapter.safetensors").exists() and q["file_bytes_float"] > 0
    ckpt.load_model(q["out"])
    # a following full stage takes it as --init unchanged (the merged model trains like any other)
    res2 = sft.main(sft.Config(init=str(tmp_path / "lora"), out_dir=str(tmp_path), name="after", n_examples=8,
                               epochs=1, batch_size=8))
    assert (ckpt.latest_checkpoint(tmp_path / "after" / "ckpt") / "model.safetensors").is_file() and res2["steps"] == 1


def test_grpo_and_dpo_lora_smoke(base_run, tmp_path):
    res = grpo.main(grpo.Config(init=base_run, out_dir=str(tmp_path), name="g", steps=1, prompts_per_step=2,
                                group_size=4, max_new_tokens=8, eval_every=0, eval_problems=2, plots=False,
                                lora_rank=4, lora_targets="kv_b_proj,o_proj,gate_proj", ema=0.5))
    assert (Path(res["checkpoint"]) / "adapter.safetensors").is_file()
    ckpt.load_model(res["checkpoint"])
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"Compute {i} + 1.", "chosen": f"<answer>{i + 1}</answer>",
                                         "rejected": f"<answer>{i}</answer>"}) + "\n" for i in range(4)))
    res = dpo.main(dpo.Config(init=base_run, pairs=str(pairs), out_dir=str(tmp_path), name="d", epochs=2,
                              batch_size=4, lr=1e-2, lora_rank=4))
    assert res["loss_first"] == pytest.approx(0.6931, abs=1e-4)  # policy == reference (adapters off) at the start
    assert res["loss_last"] < res["loss_first"]
    assert (Path(res["checkpoint"]) / "adapter.safetensors").is_file()


def test_lora_config_errors_and_help(base_run, tmp_path):
    for mod, init in ((sft, "init"), (grpo, "init"), (dpo, "init"), (distill, "student_init")):
        extra = {"teacher": base_run} if mod is distill else {}
        with pytest.raises(ConfigError, match="lora_rank must be >= 0"):
            mod.Config(lora_rank=-1, **extra).validate()
        with pytest.raises(ConfigError, match="needs a base checkpoint"):
            mod.Config(lora_rank=4, **extra).validate()
        with pytest.raises(ConfigError, match="lora_alpha"):
            mod.Config(lora_rank=4, lora_alpha=0, **{init: base_run}, **extra).validate()
        mod.Config(lora_rank=4, **{init: base_run}, **extra).validate()
        text = cli.stage_help(mod.__name__.rsplit(".", 1)[-1], mod)
        for flag in ("--lora-rank 0", "--lora-alpha 16.0", "--lora-targets 'all-linear'", "--lora-dropout 0.0"):
            line = next(l for l in text.splitlines() if l.strip().startswith(flag))
            assert len(line.split(flag, 1)[1].strip()) > 20, line  # a comment follows
    with pytest.raises(ConfigError, match="update_router_bias"):
        grpo.Config(init=base_run, lora_rank=4, update_router_bias=True).validate()
    with pytest.raises(UserError, match="k_proj.*available"):  # an MLA model has no k_proj
        sft.main(sft.Config(init=base_run, out_dir=str(tmp_path), name="bad", lora_rank=4, lora_targets="k_proj"))
