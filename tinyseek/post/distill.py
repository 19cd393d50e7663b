"""``tinyseek distill``: train a smaller student on a teacher's verified outputs (R1 distillation).

Sequence-level distillation: the teacher samples ``k`` completions per problem; the verified-correct,
well-formatted ones (:func:`tinyseek.post.rejection.select_verified`) become the student's SFT data
(loss on response tokens only). Optional logit distillation (``kd_weight > 0``) adds
``kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T))`` on the same response tokens
(Hinton et al.), which needs the same tokenizer for teacher and student (it is: the student is built
with the teacher's tokenizer).

The student is a fresh ``--model`` preset (or ``--student-init`` checkpoint; with ``--lora-rank R``
only LoRA adapters on that checkpoint train and are saved, see :mod:`tinyseek.model.lora`).
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tinyseek.common import MetricsLogger, atomic_write_json, print0
from tinyseek.config import ConfigError, ModelConfig, model_micro, to_dict
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post.rejection import grade_samples, select_verified, write_jsonl
from tinyseek.post.seqs import pack, sft_targets


@dataclass
class Config:
    teacher: str = ""              # teacher checkpoint (e.g. the GRPO run)
    student_init: str = ""         # student checkpoint; "" = fresh student from `model`
    model: ModelConfig = field(default_factory=model_micro)  # student architecture when student_init is empty
    tasks: str = "arithmetic"      # tasks to distil on
    difficulty: int = 1            # task difficulty (0 = the task's own mix)
    n_problems: int = 300          # problems the teacher answers
    k: int = 4                     # teacher samples per problem
    keep_per_problem: int = 2      # verified responses kept per problem
    temperature: float = 0.7       # teacher sampling temperature
    max_new_tokens: int = 48       # teacher generation budget
    kd_weight: float = 0.0         # logit-KD loss weight (0 = sequence-level only)
    kd_temperature: float = 2.0    # softmax temperature for logit KD
    epochs: int = 3                # passes over the distilled set
    batch_size: int = 16           # sequences per step
    lr: float = 1e-3               # AdamW learning rate
    grad_clip: float = 1.0         # grad-norm clip (0 = off)
    seed: int = 3                  # problem / sampling seed
    device: str = "auto"           # auto / cpu / cuda
    out_dir: str = "runs"          # parent of the run dir
    name: str = "distill"          # run dir name
    lora_rank: int = 0             # LoRA adapter rank (> 0: base frozen, adapters trained and saved); 0 = off
    lora_alpha: float = 16.0       # LoRA scale numerator: a projection adds (lora_alpha / lora_rank) * B A x
    lora_targets: str = "all-linear"  # nn.Linear names to adapt (q_proj,o_proj,gate_proj,...); all-linear: all but lm_head
    lora_dropout: float = 0.0      # dropout on the adapters' input (training only)

    def validate(self) -> "Config":
        if not self.teacher:
            raise ConfigError("distill needs --teacher PATH (a checkpoint or run dir)")
        C.check_numbers(self, nonneg=("grad_clip", "difficulty"))
        for k in ("n_problems", "k", "keep_per_problem", "epochs", "batch_size", "max_new_tokens"):
            if getattr(self, k) <= 0:
                raise ConfigError(f"{k} must be > 0, got {getattr(self, k)}")
        if self.kd_weight < 0 or self.kd_temperature <= 0 or self.temperature <= 0 or self.lr <= 0:
            raise ConfigError("kd_weight must be >= 0; kd_temperature, temperature and lr must be > 0")
        C.check_lora(self, self.student_init, "--student-init")
        self.model.validate()
        return self


def preset(name: str) -> Config:
    presets = {"micro": Config, "kd": lambda: Config(kd_weight=1.0)}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor, T: float) -> torch.Tensor:
    """``T^2 * KL(p_teacher^T || p_student^T)`` averaged over masked positions.

    >>> z = torch.randn(1, 3, 5)
    >>> float(kd_loss(z, z, torch.ones(1, 3), 2.0))
    0.0
    """
    s = F.log_softmax(student_logits.float() / T, -1)
    t = F.log_softmax(teacher_logits.float() / T, -1)
    kl = (t.exp() * (t - s)).sum(-1)
    m = mask.to(kl.dtype)
    return T * T * (kl * m).sum() / m.sum().clamp(min=1)


def main(cfg: Config) -> dict:
    cfg.validate()
    device, tok, teacher = C.load_sampling_model(cfg.teacher, "", cfg.seed, cfg.device, what="teacher checkpoint")
    run_dir = Path(cfg.out_dir) / cfg.name
    student, _ = C.load_policy(cfg.student_init, cfg.model, tok.vocab_size, device, lora=cfg)
    if cfg.kd_weight > 0 and student.cfg.vocab_size != teacher.cfg.vocab_size:
        raise UserError(f"logit KD needs equal vocab sizes (student {student.cfg.vocab_size}, "
                        f"teacher {teacher.cfg.vocab_size}); set --model.vocab-size {teacher.cfg.vocab_size}")
    run_dir.mkdir(parents=True, exist_ok=True)
    C.fresh_metrics(run_dir, cfg.student_init)
    atomic_write_json(run_dir / "config.json", {"stage": "distill", **to_dict(cfg)})
    C.save_tokenizer(tok, run_dir)
    # ---- teacher data: sample, verify, keep ---------------------------------------------------
    probs = C.make_problems(cfg.tasks, cfg.n_problems, seed=cfg.seed, difficulty=cfg.difficulty or None)
    graded = grade_samples(teacher, tok, probs, k=cfg.k, temperature=cfg.temperature, top_p=1.0,
                           max_new_tokens=cfg.max_new_tokens, seed=cfg.seed)
    rows = select_verified(probs, graded, cfg.keep_per_problem)
    write_jsonl(run_dir / "distill_data.jsonl", rows)
    if not rows:
        raise UserError("the teacher produced no verified-correct answer; nothing to distil")
    data = [(C.prompt_ids(tok, r["prompt"]), tok.encode(r["response"]) + [tok.eos_id]) for r in rows]
    data = [d for d in data if len(d[0]) + len(d[1]) <= student.cfg.max_seq_len]
    # ---- student training ----------------------------------------------------------------------
    params = C.trainable(student)  # all parameters, or only the LoRA adapters
    opt = torch.optim.AdamW(params, lr=cfg.lr, betas=(0.9, 0.95))
    log = MetricsLogger(run_dir / "metrics.jsonl")
    rng = random.Random(cfg.seed)
    student.train()
    step, t0, last = 0, time.time(), {}
    total = cfg.epochs * math.ceil(len(data) / cfg.batch_size)
    for epoch in range(cfg.epochs):
        order = list(range(len(data)))
        rng.shuffle(order)
        for i in range(0, len(order), cfg.batch_size):
            batch = [data[j] for j in order[i:i + cfg.batch_size]]
            ids, mask = pack([b[0] for b in batch], [b[1] for b in batch], tok.pad_id, device)
            out = student(ids[:, :-1], sft_targets(ids, mask))
            loss = out.loss
            kd = torch.zeros(())
            if cfg.kd_weight > 0:
                with torch.no_grad():
                    t_logits = teacher(ids[:, :-1]).logits
                kd = kd_loss(out.logits, t_logits, mask, cfg.kd_temperature)
                loss = loss + cfg.kd_weight * kd
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if out.expert_counts is not None and not cfg.lora_rank:  # LoRA: the base (router biases too) is frozen
                student.update_expert_bias(out.expert_counts.detach())
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            last = {"ce_loss": float(out.ce_loss.detach()), "kd_loss": float(kd.detach()), "epoch": epoch}
            log.log(step, **last)
        print0(f"distill epoch {epoch}: ce {last['ce_loss']:.4f} kd {last['kd_loss']:.4f} ({step}/{total} steps)")
    ckpt = C.save(run_dir, step, student, opt, {"stage": "distill", "step": step, "n_examples": len(data)})
    res = {"run_dir": str(run_dir), "checkpoint": str(ckpt), "n_examples": len(data), "steps": step,
           "teacher_sample_accuracy": sum(s["correct"] for g in graded for s in g) / (len(probs) * cfg.k),
           "student_params": student.num_params(), "teacher_params": teacher.num_params(),
           "trainable_params": sum(p.numel() for p in params),
           "final_ce_loss": last["ce_loss"], "elapsed_s": round(time.time() - t0, 2)}
    atomic_write_json(run_dir / "result.json", res)
    return res
