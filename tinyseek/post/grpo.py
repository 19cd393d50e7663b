"""``tinyseek grpo``: Group Relative Policy Optimisation with rule rewards (DeepSeekMath / R1).

Each step: draw ``prompts_per_step`` problems (curriculum picks the difficulty), sample
``group_size`` completions per prompt from the current policy with the KV-cache engine
(temperature / top-p), score them with the reward registry (weights from config), turn rewards
into group-relative advantages, and take ``mu`` gradient steps on the clipped policy-ratio loss
plus ``beta`` * k3 KL to a frozen copy of the starting policy. Variants (grpo, dr_grpo, dapo) are
rows of :data:`tinyseek.post.losses.VARIANTS`.

What this simplifies, honestly:
- On-policy with one rollout batch per step: the "old" policy is the current parameters before
  this step's updates, so with ``mu = 1`` the ratio is exactly 1 and clipping never triggers;
  clipping matters only for ``mu > 1``.
- The reference model is the starting checkpoint, never refreshed (R1 refreshes it periodically).
  With ``--lora-rank R`` only LoRA adapters train (:mod:`tinyseek.model.lora`): the reference is
  the same model with its adapters switched off (no second copy), rollouts and evals run the current
  adapters merged into temporary plain projections (``lora.merged``: MLA's folded decode applies) and
  checkpoints hold the adapters only.
- Old/reference log-probs are recomputed with a full forward pass rather than kept from sampling
  (simpler; the same numbers up to float noise); with ``mu = 1`` the old log-probs are the
  detached current ones (no extra forward: the ratio is 1 either way). They are untempered: with
  ``temperature != 1`` the samples come from the tempered policy and the loss treats them as if
  from the plain one.
- A linear lr warmup (``warmup_steps``): Adam's first steps are sign-like and, with the small,
  noisy policy gradient, moved our tiny models far from the SFT policy without it.
- Rewards are rule-based only (no learned reward model); no value function (that is GRPO's point).
- ``--ema D`` (off by default) averages the weights over the run (Polyak/EMA, decay D per step) and
  returns the average: greedy pass@1 of our micro models flips by +-0.1..0.3 between checkpoints
  25 steps apart (near-tied answers change argmax), and the average damps that parameter noise.
  The mid-run held-out evaluations then score the averaged weights too (``eval_weights`` says which),
  so the logged curve is the returned model's (it scored the raw step's weights before).
- Rollout temperature matters for greedy pass@1: at 1.0 most samples of a group are far-off answers
  and the update mostly pushes those down, leaving the argmax (what greedy decoding returns) where it
  was; at 0.3 a group mostly compares the top answer with the runner-up. Held-out greedy pass@1 of
  our micro models rose +0.12 / +0.28 (2 seeds) at 0.3 against +0.06 / +0.02 at 1.0
  (tests/test_post_e2e.py); the pretrained cpu-tiny model did best at 0.6 (0.40 -> 0.52; 0.46 at 0.3).
- ``--shuffle-rewards`` is a null control for measuring noise: rewards are permuted within each
  group, so updates are as large as in a real run but carry no signal.
- No sequence packing; padding tokens are computed and masked. Single process (no DDP here).
- MoE: routing is left as SFT left it by default: no balance loss (``--aux-weight``) and frozen
  aux-loss-free router biases (``--update-router-bias true`` updates them as in pretraining): bias
  steps change routing whatever the reward says, which showed up as KL drift in our small runs.

Writes ``runs/<name>/{config.json, metrics.jsonl, tokenizer/, ckpt/, plots/, result.json}``.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import torch

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro, model_preset
from tinyseek.model.lora import merged
from tinyseek.post import common as C
from tinyseek.post.curriculum import SCHEDULES, levels_for_step
from tinyseek.post.ema import WeightEMA, averaged
from tinyseek.post.heldout import Evaluator, greedy_scores, heldout_problems
from tinyseek.post.losses import ADVANTAGES, VARIANTS, dynamic_sampling_keep, policy_loss, token_mean_agg
from tinyseek.post.plots import plot_grpo
from tinyseek.post.rewards import (DEFAULT_MULTI_WEIGHTS, RewardContext, check_weights, format_score, is_correct,
                                   reward_breakdown)
from tinyseek.post.rollout import sample
from tinyseek.post.seqs import pack, token_logprobs


@dataclass
class Config:
    init: str = ""                 # starting checkpoint (usually the SFT run); "" = fresh model (tests)
    model: ModelConfig = field(default_factory=model_micro)  # architecture when init is empty
    tokenizer: str = ""            # tokenizer dir; "" = the one beside init, else the byte tokenizer
    tasks: str = "arithmetic"      # comma-separated task generators
    curriculum: str = "fixed"      # difficulty schedule: fixed / linear / mixed (see post/curriculum.py)
    difficulty: int = 1            # starting difficulty level
    max_difficulty: int = 1        # final level of the linear / mixed schedules
    steps: int = 30                # RL steps (one rollout batch each)
    prompts_per_step: int = 8      # N distinct problems per step
    group_size: int = 8            # G samples per problem
    max_new_tokens: int = 48       # response budget (tokens)
    temperature: float = 1.0       # rollout sampling temperature
    top_p: float = 1.0             # rollout nucleus sampling
    variant: str = "grpo"          # grpo / dr_grpo / dapo
    mu: int = 1                    # gradient updates per rollout batch
    beta: float = 0.04             # KL(policy || reference) coefficient (k3 estimator); 0 = no reference
    eps_low: float = 0.2           # ratio clip below 1 - eps_low
    eps_high: float = 0.28         # ratio clip above 1 + eps_high (dapo clip-higher; others use eps_low)
    lr: float = 1e-4               # AdamW learning rate (constant after warmup)
    warmup_steps: int = 10         # linear learning-rate warmup (Adam's first steps are sign-like: keep them small)
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # global grad-norm clip (0 = off)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})  # reward name -> weight
    multi_weights: dict = field(default_factory=lambda: dict(DEFAULT_MULTI_WEIGHTS))  # weights inside "multi"
    length_budget: int = 200       # characters before the length / efficiency penalties start
    eval_every: int = 10           # steps between held-out greedy pass@1 evals (0 = only start and end)
    eval_problems: int = 64        # held-out problems per eval
    eval_seed: int = 0             # held-out set (tasks' eval split, seeds EVAL_SEED_BASE + eval_seed)
    save_every: int = 0            # steps between checkpoints (0 = only at the end)
    seed: int = 0                  # rollout / problem seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "grpo"             # run dir name
    plots: bool = True             # write plots/grpo.png at the end
    aux_weight: float = 0.0        # multiplier of the MoE balance loss during RL (0: routing stays as trained;
                                   # Adam rescales its gradient to full steps when the policy gradient is small)
    update_router_bias: bool = False  # MoE aux-loss-free bias updates during RL (off: they move routing
                                      # regardless of reward and showed up as KL drift in our runs)
    ema: float = 0.0               # > 0: keep an exponential moving average of the weights with this decay
                                   # per step; the final eval and checkpoint use the averaged weights
    shuffle_rewards: bool = False  # control run: permute rewards within each group, so updates are as large
                                   # but carry no signal; held-out changes then measure training noise
    lora_rank: int = 0             # LoRA adapter rank (> 0: base frozen, adapters trained and saved); 0 = off
    lora_alpha: float = 16.0       # LoRA scale numerator: a projection adds (lora_alpha / lora_rank) * B A x
    lora_targets: str = "all-linear"  # nn.Linear names to adapt (q_proj,o_proj,gate_proj,...); all-linear: all but lm_head
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)
    micro_batch: int = 0           # rows per forward/backward in the update (gradients accumulated; same
                                   # result, less activation memory); 0 = the whole rollout batch at once

    def validate(self) -> "Config":
        C.check_numbers(self, nonneg=("warmup_steps", "weight_decay", "grad_clip", "aux_weight", "eval_every",
                                      "save_every", "length_budget", "difficulty"))
        for what, d in (("rewards", self.rewards), ("multi_weights", self.multi_weights)):
            for k, v in (d.items() if isinstance(d, dict) else ()):
                if isinstance(v, (int, float)) and not math.isfinite(v):
                    raise ConfigError(f"{what}[{k!r}] must be a finite number, got {v}")
        if self.variant not in VARIANTS:
            raise ConfigError(f"variant must be one of {', '.join(VARIANTS)}, got {self.variant!r}")
        if self.curriculum not in SCHEDULES:
            raise ConfigError(f"curriculum must be one of {', '.join(SCHEDULES)}, got {self.curriculum!r}")
        if self.micro_batch < 0:
            raise ConfigError(f"micro_batch must be >= 0 (0 = whole batch), got {self.micro_batch}")
        for k in ("steps", "prompts_per_step", "max_new_tokens", "mu", "eval_problems"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.group_size < 2:
            raise ConfigError(f"group_size must be >= 2 (advantages are relative to the group), got {self.group_size}")
        if self.temperature <= 0:
            raise ConfigError(f"temperature must be > 0 for rollouts, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.beta < 0 or self.eps_low <= 0 or self.eps_high <= 0 or self.lr <= 0:
            raise ConfigError("beta must be >= 0 and eps_low, eps_high, lr > 0")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if self.lora_rank > 0 and self.update_router_bias:
            raise ConfigError("update_router_bias changes the base model's router biases: not with LoRA (lora_rank > 0)")
        if self.max_difficulty < self.difficulty:
            self.max_difficulty = self.difficulty
        try:
            check_weights(self.rewards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        bad = set(self.multi_weights) - set(DEFAULT_MULTI_WEIGHTS)
        if bad:
            raise ConfigError(f"unknown multi_weights {sorted(bad)}; choose from {', '.join(DEFAULT_MULTI_WEIGHTS)}")
        C.task_names(self.tasks)
        C.check_lora(self, self.init, "--init")
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {
        "micro": lambda: Config(),
        "cpu-tiny": lambda: Config(model=model_preset("cpu-tiny"), steps=60, prompts_per_step=8, group_size=8),
        "gpu-small": lambda: Config(model=model_preset("gpu-small"), steps=300, prompts_per_step=32, group_size=16,
                                    max_new_tokens=256, tasks="arithmetic,countdown,gsm", curriculum="mixed",
                                    difficulty=1, max_difficulty=3, lr=1e-5),
        # a real pretrained model (tinyseek run --preset smollm2): LoRA on every linear layer of
        # SmolLM2-135M after the LoRA SFT cold start; two-operation arithmetic, where the SFT model
        # is right about half the time (measured: README, real-model results)
        "smollm2": lambda: Config(tasks="arithmetic", difficulty=2, steps=20, prompts_per_step=8, group_size=8,
                                  max_new_tokens=48, temperature=0.7, lr=2e-4, warmup_steps=3, lora_rank=16,
                                  lora_alpha=32.0, eval_every=10, eval_problems=64, micro_batch=16),
        "smollm2-gpu": lambda: Config(tasks="arithmetic", difficulty=2, max_difficulty=3, curriculum="linear",
                                      steps=300, prompts_per_step=32, group_size=16, max_new_tokens=96,
                                      temperature=0.7, lr=1e-4, warmup_steps=10, lora_rank=32, lora_alpha=64.0,
                                      eval_every=25, eval_problems=200, micro_batch=64),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def step_problems(cfg: Config, step: int, rng: random.Random) -> list:
    """This step's problems: disjoint training seeds, difficulty from the curriculum."""
    levels = levels_for_step(cfg.curriculum, step - 1, cfg.steps, cfg.difficulty, cfg.max_difficulty,
                             cfg.prompts_per_step, rng)
    out = []
    for lvl in sorted(set(levels)):
        n = levels.count(lvl)
        out += C.make_problems(cfg.tasks, n, seed=cfg.seed * 1_000_003 + step * 17 + lvl, difficulty=lvl or None)
    return out


def grpo_update(model, ref_model, opt, prompts: list[list[int]], responses: list[list[int]],
                adv_B: torch.Tensor, *, pad_id: int, variant: str, mu: int, beta: float, eps_low: float,
                eps_high: float, max_tokens: int, grad_clip: float, update_router_bias: bool = False,
                aux_weight: float = 0.0, micro_batch: int = 0) -> dict:
    """``mu`` optimizer steps of the GRPO loss on one rollout batch; returns averaged stats.

    ``responses`` include the eos token when the sample finished, so stopping is learned too.
    ``micro_batch`` > 0 runs the forward/backward over chunks of that many rows (each cut to its own
    longest row) and accumulates the gradients: the same loss and gradient as the whole batch at once
    (each chunk's loss is weighted by its share of the variant's aggregate: rows for grpo / dr_grpo,
    response tokens for dapo), with a fraction of the activation memory. Log-probs (and so the LM
    head) are computed on response positions only.
    """
    dev = next(model.parameters()).device
    ids, mask = pack(prompts, responses, pad_id, dev)
    adv_B = adv_B.to(dev)
    B = ids.shape[0]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    step = micro_batch if micro_batch > 0 else B
    chunks = []
    for i in range(0, B, step):
        rows = slice(i, min(i + step, B))
        T = max(lengths[rows])
        chunks.append((rows, ids[rows, :T], mask[rows, :T - 1]))
    n_tok = mask.sum().clamp(min=1)
    by_tokens = VARIANTS[variant].aggregate is token_mean_agg

    def share(rows, m) -> float:
        """Chunk's weight in the whole-batch aggregate (and in the token-mean stats)."""
        tok_w = float(m.sum() / n_tok)
        return (tok_w if by_tokens else (rows.stop - rows.start) / B), tok_w

    with torch.no_grad():
        old_lp = None  # with mu == 1 the old policy is the current one: old_lp = lp.detach(), no extra forward
        if mu > 1:
            was = model.training
            model.eval()
            old_lp = [token_logprobs(model, x, mask_BT=m) for _, x, m in chunks]
            model.train(was)
        ref_lp = [token_logprobs(ref_model, x, mask_BT=m) for _, x, m in chunks] if ref_model is not None else None
    stats: dict[str, float] = {}
    for _ in range(mu):
        opt.zero_grad(set_to_none=True)
        st: dict[str, float] = {"loss": 0.0}
        counts = None
        for j, (rows, x, m) in enumerate(chunks):
            lp, out = token_logprobs(model, x, with_aux=True, mask_BT=m)
            old = lp.detach() if old_lp is None else old_lp[j]
            loss, cst = policy_loss(variant, lp, old, adv_B[rows], m, ref_logp_BT=None if ref_lp is None else ref_lp[j],
                                    beta=beta, eps_low=eps_low, eps_high=eps_high, max_tokens=max_tokens)
            w, tok_w = share(rows, m)
            total = loss + aux_weight * out.aux_loss if aux_weight > 0 else loss
            (total * w).backward()
            st["loss"] += float(loss.detach()) * w
            for k, v in cst.items():  # kl, clip_frac: token means
                st[k] = st.get(k, 0.0) + v * tok_w
            if out.expert_counts is not None:
                counts = out.expert_counts.detach() if counts is None else counts + out.expert_counts.detach()
        if update_router_bias and counts is not None:
            model.update_expert_bias(counts)
        gn = (torch.nn.utils.clip_grad_norm_(C.trainable(model), grad_clip) if grad_clip > 0
              else torch.tensor(0.0))
        opt.step()
        st["grad_norm"] = float(gn)
        for k, v in st.items():
            stats[k] = stats.get(k, 0.0) + v / mu
    return stats


def main(cfg: Config, evaluate: Evaluator = greedy_scores) -> dict:
    """Run GRPO as ``cfg`` says; returns the result also written to ``result.json``.

    ``evaluate(model, tok, problems, max_new_tokens=, seed=)`` scores the held-out problems at step
    0, every ``eval_every`` steps and at the end (logged as ``eval_pass1``, ``eval_format``,
    ``eval_length``); it must return ``pass@1``, ``format_rate`` and ``mean_length``. The default
    is the greedy scoring that ``tinyseek eval`` reports as pass@1; the pipeline passes eval's own."""
    cfg.validate()
    device, run_dir, tok, model = C.start_policy_run(cfg, "grpo")
    ref = C.reference_model(model) if cfg.beta > 0 else None  # LoRA: the base, adapters off (no copy)
    params = C.trainable(model)  # all parameters, or only the LoRA adapters
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    V = VARIANTS[cfg.variant]
    ctx = RewardContext(length_budget=cfg.length_budget, multi_weights=dict(cfg.multi_weights))
    log = MetricsLogger(run_dir / "metrics.jsonl")
    heldout = heldout_problems(cfg.tasks, cfg.eval_problems, cfg.eval_seed, cfg.max_difficulty or None)
    rng = random.Random(cfg.seed)
    G = cfg.group_size
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)

    ema = WeightEMA(params, cfg.ema) if cfg.ema > 0 else None

    def run_eval(step):
        # with --ema the averaged weights are scored: the model the stage returns, not the raw step's
        with averaged(ema), merged(model):  # LoRA: plain projections with the adapters added in
            r = evaluate(model, tok, heldout, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        log.log(step, eval_pass1=r["pass@1"], eval_format=r["format_rate"], eval_length=r["mean_length"],
                eval_weights="ema" if ema is not None else "raw")
        print0(f"grpo eval step {step}: pass@1 {r['pass@1']:.3f} format {r['format_rate']:.2f}")
        return r

    first_eval = run_eval(0)
    model.train()
    history = []
    t_start = time.time()
    for step in range(1, cfg.steps + 1):
        # ---- one GRPO step -------------------------------------------------------------------
        t0 = time.time()
        for g in opt.param_groups:
            g["lr"] = cfg.lr * min(1.0, step / max(1, cfg.warmup_steps))
        probs = step_problems(cfg, step, rng)
        prompts = [C.prompt_ids(tok, p.prompt) for p in probs]
        group_prompts = [p for p in prompts for _ in range(G)]
        with merged(model):  # LoRA: the current adapters, merged into temporary plain projections
            samples = sample(model, group_prompts, eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step * 997)
        t1 = time.time()
        texts = [C.decode(tok, s.tokens) for s in samples]
        parts = [reward_breakdown(t, probs[i // G], cfg.rewards, ctx) for i, t in enumerate(texts)]
        acc = [float(is_correct(t, probs[i // G].answer, probs[i // G].meta)) for i, t in enumerate(texts)]
        rewards_NG = torch.tensor([p["total"] for p in parts]).view(len(probs), G)
        if cfg.shuffle_rewards:  # null control: same reward values, detached from the samples
            rewards_NG = torch.stack([r[torch.randperm(G, generator=shuffle_gen)] for r in rewards_NG])
        adv_NG = ADVANTAGES[V.advantage](rewards_NG)
        keep_N = dynamic_sampling_keep(rewards_NG) if V.dynamic_sampling else torch.ones(len(probs), dtype=torch.bool)
        t2 = time.time()
        st: dict[str, float] = {}
        if bool(keep_N.any()):
            idx = [i for i in range(len(samples)) if keep_N[i // G]]
            resp = [samples[i].with_end() for i in idx]
            st = grpo_update(model, ref, opt, [group_prompts[i] for i in idx], resp, adv_NG.view(-1)[idx],
                             pad_id=tok.pad_id, variant=cfg.variant, mu=cfg.mu, beta=cfg.beta,
                             eps_low=cfg.eps_low, eps_high=cfg.eps_high, max_tokens=cfg.max_new_tokens + 1,
                             grad_clip=cfg.grad_clip, update_router_bias=cfg.update_router_bias,
                             aux_weight=cfg.aux_weight, micro_batch=cfg.micro_batch)
        if ema is not None:
            ema.update()
        t3 = time.time()
        # ---- metrics -----------------------------------------------------------------------------
        fmt = [format_score(t) for t in texts]
        m = {
            "reward_mean": float(rewards_NG.mean()), "reward_std": float(rewards_NG.std()),
            "accuracy": sum(acc) / len(acc), "format_rate": sum(fmt) / len(fmt),
            "groups_kept": int(keep_N.sum()), "difficulty": sum(p.difficulty for p in probs) / len(probs),
            **C.rollout_metrics(samples, (t0, t1, t2, t3)), **st,
        }
        log.log(step, **m)
        history.append(m)
        print0(f"grpo step {step}/{cfg.steps} reward {m['reward_mean']:.3f} acc {m['accuracy']:.3f} "
               f"len {m['response_length']:.1f} kl {m.get('kl', 0):.4f} "
               f"gen {m['t_generate']:.1f}s train {m['t_train']:.1f}s")
        # ---- every eval_every / save_every steps ---------------------------------------------------
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            C.save(run_dir, step, model, opt, {"stage": "grpo", "step": step})
    if ema is not None:  # the averaged weights become the result
        ema.copy_to()
    last_eval = run_eval(cfg.steps)
    ckpt = C.save(run_dir, cfg.steps, model, opt, {"stage": "grpo", "step": cfg.steps})
    if cfg.plots:
        plot_grpo(run_dir / "metrics.jsonl", run_dir / "plots" / "grpo.png")
    k = max(1, len(history) // 5)
    res = {
        "run_dir": str(run_dir), "checkpoint": str(ckpt), "steps": cfg.steps,
        "reward_first": sum(h["reward_mean"] for h in history[:k]) / k,
        "reward_last": sum(h["reward_mean"] for h in history[-k:]) / k,
        "accuracy_first": sum(h["accuracy"] for h in history[:k]) / k,
        "accuracy_last": sum(h["accuracy"] for h in history[-k:]) / k,
        "eval_pass1_start": first_eval["pass@1"], "eval_pass1_end": last_eval["pass@1"],
        "elapsed_s": round(time.time() - t_start, 2),
    }
    atomic_write_json(run_dir / "result.json", res)
    return res
