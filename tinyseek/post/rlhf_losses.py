"""RLHF maths as pure functions: the Bradley-Terry reward-model loss and PPO's pieces (per-token
rewards with a KL penalty, GAE, masked whitening, clipped policy and value losses).

Shapes as in :mod:`tinyseek.post.losses`: ``B`` sequences, ``T`` positions, ``mask_BT`` 1 on the
response tokens (one contiguous run per row, anywhere in the row: the ``pack`` layout, where the
prompt comes first). Every function is checked against hand-computed values (its doctests and
tests/test_ppo.py, tests/test_reward_model.py).

The formulas are TRL's ``PPOTrainer`` (trl 0.9+) definitions, written out here because TRL is not a
dependency:

- per-token reward ``r_t = -kl_coef * (logp_t - ref_logp_t)`` (the k1 estimate, in the reward, not
  in the loss as GRPO does), plus the sequence score on the last response token;
- GAE: ``delta_t = r_t + gamma * V_{t+1} - V_t`` (``V`` after the last response token is 0),
  ``A_t = delta_t + gamma * lambda * A_{t+1}``, returns ``R_t = A_t + V_t``; advantages whitened
  over the batch's response tokens (mean 0, unbiased variance 1);
- policy loss ``max(-A ratio, -A clip(ratio, 1 - eps, 1 + eps))``, token mean;
- value loss ``0.5 * max((V - R)^2, (clip(V, V_old - eps_v, V_old + eps_v) - R)^2)``, token mean.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from tinyseek.post.losses import clipped_surrogate, token_mean_agg


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``-log sigmoid(r_chosen - r_rejected)``, mean over pairs; returns (loss, per-pair accuracy).

    >>> loss, acc = bradley_terry_loss(torch.tensor([0.0, 2.0]), torch.tensor([0.0, 1.0]))
    >>> round(float(loss), 4), acc.tolist()   # (log 2 + log(1 + e^-1)) / 2
    (0.5032, [0.0, 1.0])
    """
    margin = r_chosen - r_rejected
    return -F.logsigmoid(margin).mean(), (margin > 0).float().detach()


def token_rewards(score_B: torch.Tensor, logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor | None,
                  mask_BT: torch.Tensor, kl_coef: float) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * (logp - ref_logp)`` on response tokens, plus ``score_B`` on each
    row's last response token; 0 elsewhere. No reference (``None``): the score alone.

    >>> m = torch.tensor([[0, 1, 1]])
    >>> token_rewards(torch.tensor([1.0]), torch.tensor([[0., -1., -2.]]), torch.tensor([[0., -2., -1.]]), m, 0.5)
    tensor([[ 0.0000, -0.5000,  1.5000]])
    """
    r = torch.zeros_like(logp_BT)
    if ref_logp_BT is not None:
        r = torch.where(mask_BT.bool(), -kl_coef * (logp_BT - ref_logp_BT), r)
    last = last_index(mask_BT)
    r[torch.arange(r.shape[0], device=r.device), last] += score_B.to(r.dtype)
    return r


def last_index(mask_BT: torch.Tensor) -> torch.Tensor:
    """Index of each row's last 1 (rows need at least one).

    >>> last_index(torch.tensor([[0, 1, 1, 0], [1, 0, 0, 0]])).tolist()
    [2, 0]
    """
    T = mask_BT.shape[1]
    pos = torch.arange(T, device=mask_BT.device).expand_as(mask_BT)
    return torch.where(mask_BT.bool(), pos, torch.full_like(pos, -1)).max(dim=1).values


def gae(rewards_BT: torch.Tensor, values_BT: torch.Tensor, mask_BT: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimates and returns, (A_BT, R_BT), 0 off the response tokens.

    The value after a row's last response token is 0 (the episode ends there).

    >>> A, R = gae(torch.tensor([[0., 0., 1.]]), torch.tensor([[0.5, 0.5, 0.5]]), torch.ones(1, 3), 1.0, 1.0)
    >>> A.tolist(), R.tolist()   # lambda = 1: return-to-go minus V
    ([[0.5, 0.5, 0.5]], [[1.0, 1.0, 1.0]])
    """
    m = mask_BT.to(values_BT.dtype)
    r, v = rewards_BT * m, values_BT * m
    T = r.shape[1]
    adv = torch.zeros_like(r)
    last = torch.zeros_like(r[:, 0])
    for t in reversed(range(T)):
        nxt = v[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = r[:, t] + gamma * nxt - v[:, t]
        last = (delta + gamma * lam * last) * m[:, t]  # 0 outside the response: nothing carries past it
        adv[:, t] = last
    return adv, (adv + v) * m


def masked_whiten(x_BT: torch.Tensor, mask_BT: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``(x - mean) / sqrt(var + eps)`` over the masked entries (unbiased variance, as TRL's
    ``masked_whiten``); 0 elsewhere. One masked entry: centred only (its variance is undefined).

    >>> masked_whiten(torch.tensor([[1., 3., 100.]]), torch.tensor([[1, 1, 0]]))
    tensor([[-0.7071,  0.7071,  0.0000]])
    """
    m = mask_BT.to(x_BT.dtype)
    n = m.sum()
    mean = (x_BT * m).sum() / n.clamp(min=1)
    centred = (x_BT - mean) * m
    if n < 2:
        return centred
    var = (centred ** 2).sum() / (n - 1)
    return centred * torch.rsqrt(var + eps)


def ppo_policy_loss(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_BT: torch.Tensor, mask_BT: torch.Tensor,
                    eps: float = 0.2) -> tuple[torch.Tensor, float]:
    """PPO's clipped surrogate with per-token advantages, token mean; returns (loss, clip fraction).
    :func:`tinyseek.post.losses.clipped_surrogate` per token (each token its own "sequence").

    >>> lp = torch.log(torch.tensor([[1.5, 0.5]])); z = torch.zeros(1, 2)
    >>> loss, frac = ppo_policy_loss(lp, z, torch.tensor([[1.0, 1.0]]), torch.ones(1, 2))
    >>> round(float(loss), 4), frac   # (-1.2 - 0.5) / 2; the 1.5 ratio was clipped
    (-0.85, 0.5)
    """
    B, T = logp_BT.shape
    per_tok, clipped = clipped_surrogate(logp_BT.reshape(-1, 1), old_logp_BT.reshape(-1, 1), adv_BT.reshape(-1),
                                         eps, eps)
    per_tok, clipped = per_tok.view(B, T), clipped.view(B, T)
    return token_mean_agg(per_tok, mask_BT, T), float(token_mean_agg(clipped.float(), mask_BT, T))


def value_loss(values_BT: torch.Tensor, old_values_BT: torch.Tensor, returns_BT: torch.Tensor, mask_BT: torch.Tensor,
               clip: float = 0.2) -> tuple[torch.Tensor, float]:
    """``0.5 * max((V - R)^2, (clip(V, V_old +- clip) - R)^2)``, token mean; returns (loss, clip fraction).

    >>> v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    >>> loss, frac = value_loss(v, old, ret, torch.ones(1, 2), 0.5)
    >>> float(loss), frac   # row: max(1, 2.25) = 2.25 and 1; 0.5 * (2.25 + 1) / 2
    (0.8125, 0.5)
    """
    T = values_BT.shape[1]
    clipped_v = torch.maximum(torch.minimum(values_BT, old_values_BT + clip), old_values_BT - clip)
    l1, l2 = (values_BT - returns_BT) ** 2, (clipped_v - returns_BT) ** 2
    return 0.5 * token_mean_agg(torch.maximum(l1, l2), mask_BT, T), float(token_mean_agg((l2 > l1).float(), mask_BT, T))
