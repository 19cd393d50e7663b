"""``tinyseek ppo``: PPO with a value head and GAE (InstructGPT-style RLHF), rewards from a learned
reward model (``tinyseek rm``), from the rules (:mod:`tinyseek.post.rewards`) or both.

Each step: draw ``prompts_per_step`` problems (the same problems GRPO draws for the same seed and
step at a fixed difficulty), sample ``samples_per_prompt`` completions each with the rollout engine
(:func:`tinyseek.post.rollout.sample`), score each completion (``--reward rule|rm|both``; ``both``
adds ``rm_weight`` * the RM score to the rule reward), compute old log-probs, values and reference
log-probs in one no-grad pass, build per-token rewards (the score on the last token, ``-kl_coef``
* (logp - ref_logp) on every token), GAE advantages (``gamma``, ``lam``; whitened over the batch)
and returns, then take ``ppo_epochs`` gradient steps on ``policy loss + vf_coef * value loss``
(clipped surrogate, clipped value loss; :mod:`tinyseek.post.rlhf_losses`, TRL's definitions).

Value head, not a separate critic: a ``Linear(d_model, 1)`` on the policy's final-norm hidden
states (:func:`tinyseek.post.reward_model.hidden_at`), so one forward gives both log-probs and
values: half the compute and memory of a second transformer, which is what decides on 2 CPU cores.
The price is that value-loss gradients move the shared trunk (``vf_coef`` keeps them small); the
head has its own learning rate (``value_lr``) because it starts from scratch. With ``--lora-rank R``
only the adapters and the value head train; the reference is the base with adapters off.

Departures and simplifications, honestly:
- The KL penalty is TRL's / InstructGPT's (k1 in the per-token reward, fixed ``kl_coef``, no
  adaptive controller), not GRPO's k3 in the loss; the metrics report both estimates.
- One rollout batch per step, ``ppo_epochs`` full-batch updates on it (no minibatches); old
  log-probs and values are recomputed with a full forward rather than kept from sampling.
- The value head is not initialised from the reward model (InstructGPT does); it is saved beside the
  policy as ``ckpt/step_N/value_head/head.safetensors``; the policy checkpoint is the usual one.
- MoE routing is left as the starting checkpoint had it (no balance loss, no bias updates).
- ``--ema D`` averages the policy's weights as GRPO's does (:mod:`tinyseek.post.ema`; not in InstructGPT):
  evaluations score the average and the run returns it; the value head is not averaged.

Writes ``runs/<name>/{config.json, metrics.jsonl, tokenizer/, ckpt/, plots/ppo.png, result.json}``.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro, model_preset
from tinyseek.model.lora import merged
from tinyseek.post import common as C
from tinyseek.post.ema import WeightEMA, averaged
from tinyseek.post.heldout import Evaluator, greedy_scores, heldout_problems
from tinyseek.post.losses import gather_logprobs, kl_k3, token_mean_agg
from tinyseek.post.plots import plot_ppo
from tinyseek.post.reward_model import hidden_at, load_reward_model, score_texts
from tinyseek.post.rewards import RewardContext, check_weights, format_score, is_correct, total_reward
from tinyseek.post.rlhf_losses import gae, masked_whiten, ppo_policy_loss, token_rewards, value_loss
from tinyseek.post.rollout import sample
from tinyseek.post.seqs import pack, token_logprobs
from tinyseek.train.checkpoint import save_weights

REWARD_SOURCES = ("rule", "rm", "both")


@dataclass
class Config:
    init: str = ""                 # starting checkpoint (usually the SFT run); "" = fresh model (tests)
    model: ModelConfig = field(default_factory=model_micro)  # architecture when init is empty
    tokenizer: str = ""            # tokenizer dir; "" = the one beside init, else the byte tokenizer
    tasks: str = "arithmetic"      # comma-separated task generators
    difficulty: int = 1            # task difficulty (fixed; 0 = the task's own mix)
    steps: int = 30                # PPO steps (one rollout batch each)
    prompts_per_step: int = 8      # distinct problems per step
    samples_per_prompt: int = 8    # completions per problem (8 x 8 = GRPO's default batch)
    max_new_tokens: int = 48       # response budget (tokens)
    temperature: float = 1.0       # rollout sampling temperature
    top_p: float = 1.0             # rollout nucleus sampling
    reward: str = "rule"           # rule / rm / both: where the sequence score comes from
    rm: str = ""                   # reward model checkpoint (tinyseek rm) for --reward rm / both
    rm_weight: float = 1.0         # multiplier of the reward model's score
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 0.1})  # rule reward name -> weight
    gamma: float = 1.0             # GAE discount
    lam: float = 0.95              # GAE lambda
    kl_coef: float = 0.05          # per-token KL penalty (k1, in the reward) to the reference policy
    eps: float = 0.2               # policy ratio clip
    value_clip: float = 0.2        # value clip around the rollout's values
    vf_coef: float = 0.1           # value-loss weight in the total loss
    ppo_epochs: int = 2            # gradient updates per rollout batch
    whiten: bool = True            # whiten advantages over the batch's response tokens
    ema: float = 0.0               # > 0: average the policy's weights with this decay; evals score it, the run returns it
    lr: float = 1e-4               # AdamW learning rate of the policy (constant after warmup)
    value_lr: float = 1e-3         # AdamW learning rate of the value head (new, so larger)
    warmup_steps: int = 10         # linear learning-rate warmup
    grad_clip: float = 1.0         # global grad-norm clip (0 = off)
    eval_every: int = 10           # steps between held-out greedy pass@1 evals (0 = only start and end)
    eval_problems: int = 64        # held-out problems per eval
    eval_seed: int = 0             # held-out set (tasks' eval split)
    save_every: int = 0            # steps between checkpoints (0 = only at the end)
    seed: int = 0                  # rollout / problem seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "ppo"              # run dir name
    plots: bool = True             # write plots/ppo.png at the end
    lora_rank: int = 0             # LoRA adapter rank (> 0: base frozen, adapters + value head trained); 0 = off
    lora_alpha: float = 16.0       # LoRA scale numerator: a projection adds (lora_alpha / lora_rank) * B A x
    lora_targets: str = "all-linear"  # nn.Linear names to adapt; all-linear: all but lm_head
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)

    def validate(self) -> "Config":
        C.check_numbers(self, nonneg=("warmup_steps", "grad_clip", "eval_every", "save_every", "difficulty",
                                      "kl_coef", "vf_coef", "value_clip"),
                        positive=("lr", "value_lr", "eps", "temperature", "steps", "prompts_per_step",
                                  "samples_per_prompt", "max_new_tokens", "ppo_epochs", "eval_problems"))
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 <= self.ema < 1:
            raise ConfigError(f"ema must be in [0, 1), got {self.ema}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError(f"gamma and lam must be in [0, 1], got {self.gamma}, {self.lam}")
        if self.reward not in REWARD_SOURCES:
            raise ConfigError(f"reward must be one of {', '.join(REWARD_SOURCES)}, got {self.reward!r}")
        if self.reward != "rule" and not self.rm:
            raise ConfigError(f"--reward {self.reward} needs --rm PATH (a checkpoint of tinyseek rm)")
        if self.rm and not Path(self.rm).exists():
            raise ConfigError(f"reward model {self.rm} does not exist")
        if self.init and not Path(self.init).exists():
            raise ConfigError(f"checkpoint {self.init} does not exist")
        try:
            check_weights(self.rewards)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        C.task_names(self.tasks)
        C.check_lora(self, self.init, "--init")
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {
        "micro": lambda: Config(),
        "cpu-tiny": lambda: Config(model=model_preset("cpu-tiny"), steps=60),
    }
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def step_problems(cfg: Config, step: int) -> list:
    """This step's problems: GRPO's seeds for a fixed difficulty (grpo.step_problems), so PPO and GRPO
    runs with the same seed see the same problems."""
    return C.make_problems(cfg.tasks, cfg.prompts_per_step, seed=cfg.seed * 1_000_003 + step * 17 + cfg.difficulty,
                           difficulty=cfg.difficulty or None)


def logp_and_values(model, value_head: nn.Module, ids_BT: torch.Tensor, mask_BT: torch.Tensor):
    """Per-token log-probs of ``ids[1:]`` and values ``V(ids[:t+1])`` (B, T-1), computed on the
    response positions only (0 elsewhere), from one forward pass."""
    sel = mask_BT.bool()
    out, h = hidden_at(model, ids_BT[:, :-1], logits_mask=sel)
    lp_N = gather_logprobs(out.logits[None], ids_BT[:, 1:][sel][None])[0]
    v_N = value_head(h.to(value_head.weight.dtype)).squeeze(-1).float()
    zeros = torch.zeros(sel.shape, dtype=torch.float32, device=ids_BT.device)
    return zeros.masked_scatter(sel, lp_N), zeros.masked_scatter(sel, v_N)


def ppo_update(model, value_head, ref_model, opt, ids_BT, mask_BT, score_B, *, kl_coef: float, gamma: float,
               lam: float, eps: float, value_clip: float, vf_coef: float, epochs: int, grad_clip: float,
               whiten: bool = True) -> dict:
    """One PPO update on a rollout batch (``ids`` = prompt + response rows, ``mask`` their response
    positions, ``score`` the sequence scores); returns stats averaged over the ``epochs`` steps plus
    the rollout's KL and return statistics."""
    m = mask_BT
    with torch.no_grad():
        was = model.training
        model.eval()
        old_lp, old_v = logp_and_values(model, value_head, ids_BT, m)
        model.train(was)
        ref_lp = token_logprobs(ref_model, ids_BT, mask_BT=m) if ref_model is not None else None
        rewards = token_rewards(score_B, old_lp, ref_lp, m, kl_coef)
        adv, ret = gae(rewards, old_v, m, gamma, lam)
        if whiten:
            adv = masked_whiten(adv, m)
    T = m.shape[1]
    st: dict[str, float] = {}
    if ref_lp is not None:
        st["kl"] = float(token_mean_agg(kl_k3(old_lp, ref_lp), m, T))       # GRPO's estimate, comparable
        st["kl_k1"] = float(token_mean_agg(old_lp - ref_lp, m, T))          # what the reward penalises
    st["return_mean"] = float(token_mean_agg(ret, m, T))
    var_ret = float(token_mean_agg((ret - st["return_mean"]) ** 2, m, T))
    resid = float(token_mean_agg((ret - old_v) ** 2, m, T))
    st["explained_var"] = 1.0 - resid / var_ret if var_ret > 0 else 0.0
    params = [p for g in opt.param_groups for p in g["params"]]
    for _ in range(epochs):
        lp, v = logp_and_values(model, value_head, ids_BT, m)
        pl, clip_frac = ppo_policy_loss(lp, old_lp, adv, m, eps)
        vl, vclip = value_loss(v, old_v, ret, m, value_clip)
        loss = pl + vf_coef * vl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(params, grad_clip) if grad_clip > 0 else torch.tensor(0.0)
        opt.step()
        for k, x in (("policy_loss", float(pl.detach())), ("value_loss", float(vl.detach())),
                     ("clip_frac", clip_frac), ("value_clip_frac", vclip), ("grad_norm", float(gn))):
            st[k] = st.get(k, 0.0) + x / epochs
    return st


def main(cfg: Config, evaluate: Evaluator = greedy_scores) -> dict:
    """Run PPO as ``cfg`` says; returns the result also written to ``result.json``. ``evaluate`` as
    in :func:`tinyseek.post.grpo.main` (held-out greedy pass@1 at step 0, every ``eval_every``, end)."""
    cfg.validate()
    device, run_dir, tok, model = C.start_policy_run(cfg, "ppo")
    rm = rm_tok = None
    if cfg.reward != "rule":
        rm = load_reward_model(cfg.rm, device)
        rm_tok = C.load_tokenizer_for(cfg.rm)
    ref = C.reference_model(model) if cfg.kl_coef > 0 else None
    value_head = nn.Linear(model.cfg.d_model, 1).to(device)
    nn.init.normal_(value_head.weight, std=1.0 / (model.cfg.d_model + 1) ** 0.5)
    nn.init.zeros_(value_head.bias)
    params = C.trainable(model)
    ema = WeightEMA(params, cfg.ema) if cfg.ema > 0 else None  # the policy's weights; the value head is not averaged
    opt = torch.optim.AdamW([{"params": params, "lr": cfg.lr},
                             {"params": list(value_head.parameters()), "lr": cfg.value_lr}], betas=(0.9, 0.99))
    base_lrs = [g["lr"] for g in opt.param_groups]
    ctx = RewardContext()
    log = MetricsLogger(run_dir / "metrics.jsonl")
    heldout = heldout_problems(cfg.tasks, cfg.eval_problems, cfg.eval_seed, cfg.difficulty or None)
    K = cfg.samples_per_prompt

    def run_eval(step):
        with averaged(ema), merged(model):  # with --ema the average: the model the run returns
            r = evaluate(model, tok, heldout, max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
        log.log(step, eval_pass1=r["pass@1"], eval_format=r["format_rate"], eval_length=r["mean_length"],
                eval_weights="ema" if ema is not None else "raw")
        print0(f"ppo eval step {step}: pass@1 {r['pass@1']:.3f} format {r['format_rate']:.2f}")
        return r

    def save(step):
        d = C.save(run_dir, step, model, opt, {"stage": "ppo", "step": step, "reward": cfg.reward})
        (d / "value_head").mkdir(exist_ok=True)
        save_weights({k: v.detach() for k, v in value_head.state_dict().items()}, d / "value_head" / "head.safetensors")
        return d

    first_eval = run_eval(0)
    model.train()
    history = []
    t_start = time.time()
    for step in range(1, cfg.steps + 1):
        # ---- one PPO step --------------------------------------------------------------------
        t0 = time.time()
        for g, lr in zip(opt.param_groups, base_lrs):
            g["lr"] = lr * min(1.0, step / max(1, cfg.warmup_steps))
        probs = step_problems(cfg, step)
        prompts = [C.prompt_ids(tok, p.prompt) for p in probs for _ in range(K)]
        with merged(model):
            samples = sample(model, prompts, eos_id=tok.eos_id, stop_ids=tok.stop_ids, max_tokens=cfg.max_new_tokens,
                             temperature=cfg.temperature, top_p=cfg.top_p, seed=cfg.seed * 1_000_003 + step * 997)
        t1 = time.time()
        texts = [C.decode(tok, s.tokens) for s in samples]
        pr = [probs[i // K] for i in range(len(samples))]
        rule = torch.tensor([total_reward(t, p, cfg.rewards, ctx) for t, p in zip(texts, pr)])
        rm_score = (score_texts(rm, rm_tok, [p.prompt for p in pr], texts).cpu() * cfg.rm_weight
                    if rm is not None else torch.zeros(len(texts)))
        score = {"rule": rule, "rm": rm_score, "both": rule + rm_score}[cfg.reward]
        t2 = time.time()
        ids, mask = pack(prompts, [s.with_end() for s in samples], tok.pad_id, device)
        st = ppo_update(model, value_head, ref, opt, ids, mask, score.to(device), kl_coef=cfg.kl_coef,
                        gamma=cfg.gamma, lam=cfg.lam, eps=cfg.eps, value_clip=cfg.value_clip, vf_coef=cfg.vf_coef,
                        epochs=cfg.ppo_epochs, grad_clip=cfg.grad_clip, whiten=cfg.whiten)
        if ema is not None:
            ema.update()
        t3 = time.time()
        # ---- metrics -----------------------------------------------------------------------------
        acc = [float(is_correct(t, p.answer, p.meta)) for t, p in zip(texts, pr)]
        m = {"reward_mean": float(score.mean()), "reward_std": float(score.std()), "rule_reward": float(rule.mean()),
             **({"rm_score": float(rm_score.mean())} if rm is not None else {}),
             "accuracy": sum(acc) / len(acc), "format_rate": sum(format_score(t) for t in texts) / len(texts),
             **C.rollout_metrics(samples, (t0, t1, t2, t3)), **st}
        log.log(step, **m)
        history.append(m)
        print0(f"ppo step {step}/{cfg.steps} reward {m['reward_mean']:.3f} acc {m['accuracy']:.3f} "
               f"value_loss {m['value_loss']:.4f} kl {m.get('kl', 0):.4f} gen {m['t_generate']:.1f}s "
               f"train {m['t_train']:.1f}s")
        # ---- every eval_every / save_every steps ---------------------------------------------------
        if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
            run_eval(step)
            model.train()
        if cfg.save_every and step % cfg.save_every == 0 and step != cfg.steps:
            save(step)
    if ema is not None:  # the averaged weights become the result
        ema.copy_to()
    last_eval = run_eval(cfg.steps)
    ckpt = save(cfg.steps)
    if cfg.plots:
        plot_ppo(run_dir / "metrics.jsonl", run_dir / "plots" / "ppo.png")
    k = max(1, len(history) // 5)

    def avg(key, rows):
        return sum(h[key] for h in rows) / len(rows)

    res = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "steps": cfg.steps, "reward": cfg.reward,
           "reward_first": avg("reward_mean", history[:k]), "reward_last": avg("reward_mean", history[-k:]),
           "accuracy_first": avg("accuracy", history[:k]), "accuracy_last": avg("accuracy", history[-k:]),
           "value_loss_first": avg("value_loss", history[:k]), "value_loss_last": avg("value_loss", history[-k:]),
           "eval_pass1_start": first_eval["pass@1"], "eval_pass1_end": last_eval["pass@1"],
           "elapsed_s": round(time.time() - t_start, 2)}
    atomic_write_json(run_dir / "result.json", res)
    return res
