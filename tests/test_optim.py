"""AdamW parameter groups and LR schedules (the schedules also have doctests)."""
from __future__ import annotations

import math

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.model.transformer import Transformer
from tinyseek.train.optim import SCHEDULES, build_optimizer, lr_at, param_groups


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_no_decay_on_norms_embeddings(tie):
    cfg = model_micro()
    cfg.tie_embeddings = tie
    model = Transformer(cfg)
    groups = {g["name"]: g for g in param_groups(model, 0.1)}
    names = {id(p): n for n, p in model.named_parameters()}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    keep = {names[id(p)] for p in groups["no_decay"]["params"]}
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    assert "embed.weight" in keep and not any("norm" in n for n in decay)
    assert any(n.endswith("experts.w_gate_up") for n in decay) and any(n.endswith("router.weight") for n in decay)
    assert ("lm_head.weight" in decay) == (not tie)
    # every trainable tensor exactly once (tied head counted once)
    n_unique = len({id(p) for p in model.parameters()})
    assert len(decay) + len(keep) == n_unique
    # the router's aux-free bias is a buffer: never given to the optimizer
    assert not any("expert_bias" in n for n in decay | keep)


def test_weight_decay_only_touches_matrices():
    torch.manual_seed(0)
    model = Transformer(model_micro())
    opt = build_optimizer(model, lr=0.1, weight_decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    opt.step()  # zero grads: only decoupled weight decay moves parameters
    for n, p in model.named_parameters():
        moved = not torch.equal(p, before[n])
        assert moved == (p.dim() >= 2 and n != "embed.weight"), n


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_schedule_shape(name):
    total, warm, lr, lo = 100, 10, 1.0, 0.1
    xs = [lr_at(name, s, total, warm, lr, lo, 2.0) for s in range(total + 5)]
    assert xs[warm - 1] == lr and all(a < b for a, b in zip(xs[:warm], xs[1:warm]))  # linear warmup
    post = xs[warm:]
    assert all(a >= b - 1e-12 for a, b in zip(post, post[1:]))  # non-increasing after warmup
    if name == "constant":
        assert set(post) == {lr}
    else:
        assert math.isclose(xs[total], lo) and xs[-1] == xs[total]
