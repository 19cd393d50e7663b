"""``tinyseek rm``: a Bradley-Terry reward model (InstructGPT's RM; the R1 report's preference reward).

The model is the policy's architecture (loaded from ``--init``, usually the SFT checkpoint) with a
scalar head on the final-norm hidden state of the last token of ``prompt + response + eos``. Loss:
:func:`tinyseek.post.rlhf_losses.bradley_terry_loss`, ``-log sigmoid(r_chosen - r_rejected)``.

Pairs come from ``--pairs file.jsonl`` (``{"prompt", "chosen", "rejected"}`` lines of non-empty
strings; anything else is a one-line error naming the line) or are built from graded samples of the
verifiable tasks: ``k`` samples per problem from the starting policy (the rollout engine), graded by
the verifier (:func:`tinyseek.post.rewards.is_correct`), each problem giving up to
``pairs_per_problem`` (correct, incorrect) pairs. ``heldout_fraction`` of the prompts (a seeded
shuffle of distinct prompts: no prompt on both sides) is held out for pair accuracy; of the rest,
``label_fraction`` of the pairs is trained on (the recipe's "one fifth of the labelled data":
``benchmarks/reward_model.py`` compares 1.0, 0.5 and 0.2 on one held-out set).

Checkpoint: ``ckpt/step_N/`` is an ordinary float checkpoint of the backbone (``model.safetensors``,
LM head included, so every loader reads it as a language model) plus ``reward_head/head.safetensors``
(with its own ``checksums.json``); ``meta.json`` has ``"stage": "rm"``. :func:`load_reward_model`
reads both; no checkpoint-format registration is needed since the generic loader never has to build
a reward model.

Departures: the RM is fully fine-tuned (no LoRA option); no margin term (Llama 2) and no reward
centring; MoE routing is left as the starting checkpoint had it (no balance loss, no bias updates);
one offline round of pairs.
"""
from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post.rejection import grade_samples, write_jsonl
from tinyseek.post.rlhf_losses import bradley_terry_loss
from tinyseek.quant.load import load_model
from tinyseek.train.checkpoint import (load_weights, read_meta, resolve_checkpoint, save_checkpoint, save_weights,
                                      write_checksums)

HEAD_DIR, HEAD_FILE = "reward_head", "head.safetensors"


@dataclass
class Config:
    init: str = ""                 # starting checkpoint (the SFT run); "" = fresh model (tests)
    model: ModelConfig = field(default_factory=model_micro)  # architecture when init is empty
    tokenizer: str = ""            # tokenizer dir; "" = beside init, else the byte tokenizer
    pairs: str = ""                # JSONL of {"prompt","chosen","rejected"}; "" = build from graded samples
    tasks: str = "arithmetic"      # tasks for built pairs
    difficulty: int = 1            # task difficulty (0 = the task's own mix)
    n_problems: int = 256          # problems sampled to build pairs
    k: int = 8                     # samples per problem
    pairs_per_problem: int = 2     # at most this many (correct, incorrect) pairs per problem
    temperature: float = 1.0       # sampling temperature for pair building
    max_new_tokens: int = 48       # generation budget
    heldout_fraction: float = 0.2  # share of the prompts whose pairs are held out for accuracy
    label_fraction: float = 1.0    # share of the remaining pairs trained on (1.0, 0.5, 0.2: the one-fifth claim)
    epochs: int = 3                # passes over the training pairs
    batch_size: int = 16           # pairs per step
    lr: float = 1e-4               # AdamW learning rate (constant)
    weight_decay: float = 0.0      # AdamW weight decay
    grad_clip: float = 1.0         # grad-norm clip (0 = off)
    seed: int = 3                  # problem / sampling / split seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "rm"               # run dir name
    lora_rank: int = 0             # fixed at 0: the RM is fully fine-tuned (C.start_policy_run reads it)

    def validate(self) -> "Config":
        C.check_numbers(self, nonneg=("grad_clip", "difficulty", "weight_decay"),
                        positive=("temperature", "lr", "n_problems", "k", "epochs", "batch_size", "max_new_tokens",
                                  "pairs_per_problem"))
        if self.k < 2 and not self.pairs:
            raise ConfigError("k must be >= 2 to build (correct, incorrect) pairs")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}")
        if not 0 < self.label_fraction <= 1:
            raise ConfigError(f"label_fraction must be in (0, 1], got {self.label_fraction}")
        if self.lora_rank != 0:
            raise ConfigError("the reward model is fully fine-tuned: lora_rank must be 0")
        if self.pairs and not Path(self.pairs).is_file():
            raise ConfigError(f"pairs file {self.pairs} does not exist")
        if self.init and not Path(self.init).exists():
            raise ConfigError(f"checkpoint {self.init} does not exist")
        C.task_names(self.tasks)
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {"micro": Config, "cpu-tiny": lambda: Config(n_problems=512, epochs=3)}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


# ------------------------------------------------------------------------------------------------
# the model
# ------------------------------------------------------------------------------------------------
def hidden_at(model, ids_BT: torch.Tensor, **kw):
    """``(model output, final-norm hidden states)`` for one forward of ``model(ids_BT, **kw)``: the
    hidden states are what the LM head reads, at the same rows (``logits_at``: (B, 1, D);
    ``logits_mask``: (N, D)). Taken with a forward hook on ``model.norm``, so the transformer needs
    no extra output."""
    box = {}
    handle = model.norm.register_forward_hook(lambda _m, _i, out: box.__setitem__("h", out))
    try:
        out = model(ids_BT, **kw)
    finally:
        handle.remove()
    return out, box["h"]


class RewardModel(nn.Module):
    """A transformer plus ``head``: ``Linear(d_model, 1)`` on the last token's final-norm hidden state."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(backbone.cfg.d_model, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (backbone.cfg.d_model + 1) ** 0.5)  # as TRL's value heads
        nn.init.zeros_(self.head.bias)

    def forward(self, ids_BT: torch.Tensor, last_B: torch.Tensor) -> torch.Tensor:
        """Scores (B,) of rows whose last real token sits at ``last_B``."""
        _, h = hidden_at(self.backbone, ids_BT, logits_at=last_B)
        return self.head(h[:, 0].to(self.head.weight.dtype)).squeeze(-1)


def encode_rows(tok, prompts: list[str], responses: list[str], device) -> tuple[torch.Tensor, torch.Tensor]:
    """``chat(prompt) + response + eos`` per row, right-padded; (ids_BT, index of each row's last token)."""
    rows = [C.prompt_ids(tok, p) + tok.encode(r) + [tok.eos_id] for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), tok.pad_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, :len(r)] = torch.tensor(r, dtype=torch.long)
    return ids.to(device), torch.tensor([len(r) - 1 for r in rows], device=device)


def score_texts(rm: RewardModel, tok, prompts: list[str], responses: list[str], batch_size: int = 64) -> torch.Tensor:
    """Reward-model scores (B,) of (prompt, response) texts, no gradient, in batches."""
    dev = next(rm.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(prompts), batch_size):
            ids, last = encode_rows(tok, prompts[i:i + batch_size], responses[i:i + batch_size], dev)
            out.append(rm(ids, last).float())
    return torch.cat(out) if out else torch.zeros(0)


def save_reward_model(run_dir: Path, step: int, rm: RewardModel, meta: dict) -> Path:
    """``run_dir/ckpt/step_N``: the backbone as a float checkpoint plus ``reward_head/head.safetensors``."""
    tmp = Path(run_dir) / f".{HEAD_DIR}.tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    save_weights({k: v.detach() for k, v in rm.head.state_dict().items()}, tmp / HEAD_FILE)
    write_checksums(tmp)
    return save_checkpoint(Path(run_dir) / "ckpt", step, rm.backbone, None, {**meta, "stage": "rm"},
                             dirs={HEAD_DIR: tmp})


def load_reward_model(path: str | Path, device="cpu") -> RewardModel:
    """A reward model saved by ``tinyseek rm`` (a step dir, ckpt root or run dir), in eval mode;
    a path that is not one is a one-line :class:`UserError`."""
    if not Path(path).exists():
        raise UserError(f"reward model {path} does not exist")
    step = resolve_checkpoint(path)
    head = step / HEAD_DIR / HEAD_FILE
    if read_meta(step).get("stage") != "rm" or not head.is_file():
        raise UserError(f"{path} is not a reward model checkpoint (no {HEAD_DIR}/{HEAD_FILE}; train one with tinyseek rm)")
    backbone, _ = load_model(step, device=str(device))
    rm = RewardModel(backbone)
    try:
        rm.head.load_state_dict(load_weights(head, device=str(device)))
    except RuntimeError:
        raise UserError(f"{head} does not fit the backbone's width ({backbone.cfg.d_model})") from None
    return rm.to(device).eval()


# ------------------------------------------------------------------------------------------------
# pairs
# ------------------------------------------------------------------------------------------------
def load_pairs(path: str) -> list[dict]:
    """``{"prompt", "chosen", "rejected"}`` lines (non-empty strings; blank lines skipped); anything
    else, or no pair at all, is a one-line :class:`UserError` naming the line."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text (expected JSONL)") from None
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{i + 1}: not JSON ({e.msg})") from None
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) and d[k] for k in ("prompt", "chosen", "rejected")):
            raise UserError(f"{path}:{i + 1}: expected an object with non-empty strings prompt, chosen, rejected")
        out.append({"prompt": d["prompt"], "chosen": d["chosen"], "rejected": d["rejected"]})
    if not out:
        raise UserError(f"{path}: no pairs (expected JSONL lines of {{\"prompt\", \"chosen\", \"rejected\"}})")
    return out


def build_pairs(model, tok, cfg: Config) -> list[dict]:
    """Graded samples -> up to ``pairs_per_problem`` (correct, incorrect) pairs per problem, distinct texts."""
    probs = C.make_problems(cfg.tasks, cfg.n_problems, seed=cfg.seed, difficulty=cfg.difficulty or None)
    graded = grade_samples(model, tok, probs, k=cfg.k, temperature=cfg.temperature, top_p=1.0,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    pairs = []
    for p, group in zip(probs, graded):
        good = list(dict.fromkeys(s["text"] for s in group if s["correct"] and s["finished"]))
        bad = list(dict.fromkeys(s["text"] for s in group if not s["correct"]))
        for c, r in list(zip(good, bad))[:cfg.pairs_per_problem]:
            pairs.append({"prompt": p.prompt, "chosen": c, "rejected": r})
    return pairs


def split_pairs(pairs: list[dict], heldout_fraction: float, label_fraction: float, seed: int
                ) -> tuple[list[dict], list[dict]]:
    """(train, held-out): distinct prompts shuffled with ``seed``, the last ``heldout_fraction`` of
    them held out; the first ``label_fraction`` of the (shuffled) training pairs kept. The held-out
    set depends on ``seed`` and ``heldout_fraction`` only, and a smaller ``label_fraction`` trains on
    a prefix of a larger one's pairs.

    >>> ps = [{"prompt": str(i // 2), "chosen": "a", "rejected": "b"} for i in range(20)]
    >>> tr, ho = split_pairs(ps, 0.2, 0.5, 0)
    >>> len(tr), len(ho), {p["prompt"] for p in tr} & {p["prompt"] for p in ho}
    (8, 4, set())
    """
    prompts = sorted({p["prompt"] for p in pairs})
    rng = random.Random(seed)
    rng.shuffle(prompts)
    n_ho = int(round(len(prompts) * heldout_fraction))
    held = set(prompts[len(prompts) - n_ho:]) if n_ho else set()
    train = [p for p in pairs if p["prompt"] not in held]
    random.Random(seed + 1).shuffle(train)
    keep = max(1, int(round(len(train) * label_fraction))) if train else 0
    return train[:keep], [p for p in pairs if p["prompt"] in held]


def pair_scores(rm: RewardModel, tok, batch: list[dict], device) -> tuple[torch.Tensor, torch.Tensor]:
    """(r_chosen, r_rejected) of a batch of pairs, with gradient."""
    prompts = [b["prompt"] for b in batch]
    ids, last = encode_rows(tok, prompts + prompts, [b["chosen"] for b in batch] + [b["rejected"] for b in batch], device)
    r = rm(ids, last)
    return r[:len(batch)], r[len(batch):]


def pair_accuracy(rm: RewardModel, tok, pairs: list[dict], batch_size: int = 64) -> float | None:
    """Share of pairs whose chosen response scores higher than the rejected one (None: no pairs)."""
    if not pairs:
        return None
    was = rm.training
    rm.eval()
    rc = score_texts(rm, tok, [p["prompt"] for p in pairs], [p["chosen"] for p in pairs], batch_size)
    rr = score_texts(rm, tok, [p["prompt"] for p in pairs], [p["rejected"] for p in pairs], batch_size)
    rm.train(was)
    return float((rc > rr).float().mean())


def main(cfg: Config) -> dict:
    cfg.validate()
    device, run_dir, tok, model = C.start_policy_run(cfg, "rm")
    pairs = load_pairs(cfg.pairs) if cfg.pairs else build_pairs(model, tok, cfg)
    if not cfg.pairs:
        write_jsonl(run_dir / "pairs.jsonl", pairs)
    max_len = model.cfg.max_seq_len
    pairs = [p for p in pairs if len(C.prompt_ids(tok, p["prompt"])) + 1 + max(
        len(tok.encode(p["chosen"])), len(tok.encode(p["rejected"]))) <= max_len]
    train, heldout = split_pairs(pairs, cfg.heldout_fraction, cfg.label_fraction, cfg.seed)
    if not train:
        raise UserError("no preference pairs to train on: no problem had both a correct and an incorrect sample "
                        "(or every pair was longer than the model's context); try more problems or a higher temperature")
    rm = RewardModel(model).to(device)
    opt = torch.optim.AdamW(rm.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.99))
    log = MetricsLogger(run_dir / "metrics.jsonl")
    rng = random.Random(cfg.seed)
    acc0 = pair_accuracy(rm, tok, heldout)
    log.log(0, heldout_acc=acc0)
    rm.train()
    step, t0, hist = 0, time.time(), []
    for epoch in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            # ---- one reward-model step -------------------------------------------------------------
            batch = [train[j] for j in order[i:i + cfg.batch_size]]
            rc, rr = pair_scores(rm, tok, batch, device)
            loss, acc = bradley_terry_loss(rc, rr)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(rm.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            m = {"loss": float(loss.detach()), "train_acc": float(acc.mean()),
                 "margin": float((rc - rr).detach().mean()), "epoch": epoch}
            hist.append(m)
            log.log(step, **m)
        acc_ho = pair_accuracy(rm, tok, heldout)
        log.log(step, heldout_acc=acc_ho)
        print0(f"rm epoch {epoch}: loss {hist[-1]['loss']:.4f} held-out pair accuracy {acc_ho}")
    ckpt = save_reward_model(run_dir, step, rm, {"step": step, "n_train_pairs": len(train),
                                                 "n_heldout_pairs": len(heldout)})
    res = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "n_pairs": len(pairs), "n_train_pairs": len(train),
           "n_heldout_pairs": len(heldout), "steps": step, "loss_first": hist[0]["loss"], "loss_last": hist[-1]["loss"],
           "heldout_acc_start": acc0, "heldout_acc": acc_ho, "elapsed_s": round(time.time() - t0, 2)}
    atomic_write_json(run_dir / "result.json", res)
    return res
