"""Policy-optimisation maths as pure functions: advantages, clipped policy losses, k3 KL, DPO.

Shapes: ``N`` prompts (groups), ``G`` samples per prompt, ``B = N*G`` sequences, ``T`` response
tokens (right-padded; ``mask_BT`` is 1 on real response tokens).

Variants are rows of the ``VARIANTS`` dict, not an if-chain:

=========  ==================  ===============================================  ===============
variant    advantage           loss aggregation                                 extras
=========  ==================  ===============================================  ===============
grpo       (r - mean) / std    mean over a sequence's tokens, then over seqs    (DeepSeekMath)
dr_grpo    r - mean            sum over all tokens / (B * max_tokens constant)  length-unbiased
dapo       (r - mean) / std    sum over all tokens / number of tokens           clip-higher,
                                                                                dynamic sampling
=========  ==================  ===============================================  ===============

The KL penalty uses the k3 estimator ``exp(ref - logp) - (ref - logp) - 1`` (unbiased, >= 0) per
token, added to the per-token loss with coefficient ``beta`` and aggregated the same way.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F


# ------------------------------------------------------------------------------------------------
# advantages
# ------------------------------------------------------------------------------------------------
def grpo_advantages(rewards_NG: torch.Tensor, eps: float = 1e-4) -> torch.Tensor:
    """Group-normalised advantages ``(r - mean_g) / (std_g + eps)`` (std with Bessel's correction).

    A group whose rewards are all equal gets zero advantage (also when ``eps`` is 0).

    >>> grpo_advantages(torch.tensor([[1., 0., 0., 1.]]), eps=0.0)
    tensor([[ 0.8660, -0.8660, -0.8660,  0.8660]])
    >>> grpo_advantages(torch.tensor([[2., 2.]]))   # all equal -> zero advantage
    tensor([[0., 0.]])
    """
    mean = rewards_NG.mean(dim=1, keepdim=True)
    std = rewards_NG.std(dim=1, keepdim=True) if rewards_NG.shape[1] > 1 else torch.zeros_like(mean)
    centred = rewards_NG - mean
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def dr_grpo_advantages(rewards_NG: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    """Dr. GRPO: mean-centred only (no division by the group std, which biases toward easy/hard groups).

    >>> dr_grpo_advantages(torch.tensor([[1., 0., 0., 1.], [3., 1., 1., 1.]]))
    tensor([[ 0.5000, -0.5000, -0.5000,  0.5000],
            [ 1.5000, -0.5000, -0.5000, -0.5000]])
    """
    return rewards_NG - rewards_NG.mean(dim=1, keepdim=True)


ADVANTAGES: dict[str, Callable[..., torch.Tensor]] = {"grpo": grpo_advantages, "dr_grpo": dr_grpo_advantages}


def dynamic_sampling_keep(rewards_NG: torch.Tensor) -> torch.Tensor:
    """DAPO dynamic sampling: keep only groups whose rewards are not all equal (they carry signal).

    >>> dynamic_sampling_keep(torch.tensor([[1., 1.], [0., 1.], [0., 0.]]))
    tensor([False,  True, False])
    """
    return (rewards_NG.max(dim=1).values - rewards_NG.min(dim=1).values) > 0


# ------------------------------------------------------------------------------------------------
# per-token pieces
# ------------------------------------------------------------------------------------------------
def kl_k3(logp_BT: torch.Tensor, ref_logp_BT: torch.Tensor) -> torch.Tensor:
    """Per-token k3 estimate of KL(pi || ref): ``exp(d) - d - 1`` with ``d = ref - logp`` (>= 0).

    >>> kl_k3(torch.tensor([0.0, -1.0]), torch.tensor([0.0, 0.0]))
    tensor([0.0000, 0.7183])
    """
    d = ref_logp_BT - logp_BT
    return torch.exp(d) - d - 1.0


def clipped_surrogate(logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor,
                      eps_low: float, eps_high: float) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO-style per-token loss ``-min(ratio * A, clip(ratio, 1-eps_low, 1+eps_high) * A)``.

    Returns (loss_BT, clipped_BT) where ``clipped`` marks tokens whose gradient the clip removed.

    >>> lp = torch.log(torch.tensor([[1.5, 0.5, 1.0]]))      # ratios 1.5, 0.5, 1.0 vs old logp 0
    >>> loss, clipped = clipped_surrogate(lp, torch.zeros(1, 3), torch.tensor([1.0]), 0.2, 0.2)
    >>> loss, clipped
    (tensor([[-1.2000, -0.5000, -1.0000]]), tensor([[ True, False, False]]))
    >>> clipped_surrogate(lp, torch.zeros(1, 3), torch.tensor([-1.0]), 0.2, 0.2)[0]
    tensor([[1.5000, 0.8000, 1.0000]])
    """
    ratio = torch.exp(logp_BT - old_logp_BT)
    A = adv_B[:, None]
    unclipped = ratio * A
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * A
    loss = -torch.minimum(unclipped, clipped)
    was_clipped = clipped < unclipped
    return loss, was_clipped


# ------------------------------------------------------------------------------------------------
# aggregation over tokens (where the variants differ)
# ------------------------------------------------------------------------------------------------
def seq_mean_agg(x_BT: torch.Tensor, mask_BT: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """GRPO: mean over each sequence's tokens, then mean over sequences.

    >>> seq_mean_agg(torch.tensor([[1., 1., 1.], [4., 0., 0.]]), torch.tensor([[1, 1, 1], [1, 0, 0]]), 3)
    tensor(2.5000)
    """
    m = mask_BT.to(x_BT.dtype)
    per_seq = (x_BT * m).sum(1) / m.sum(1).clamp(min=1)
    return per_seq.mean()


def token_mean_agg(x_BT: torch.Tensor, mask_BT: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """DAPO: mean over all real tokens of the batch (long sequences weigh more).

    >>> token_mean_agg(torch.tensor([[1., 1., 1.], [4., 0., 0.]]), torch.tensor([[1, 1, 1], [1, 0, 0]]), 3)
    tensor(1.7500)
    """
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / m.sum().clamp(min=1)


def const_norm_agg(x_BT: torch.Tensor, mask_BT: torch.Tensor, max_tokens: int) -> torch.Tensor:
    """Dr. GRPO: sum over all real tokens divided by a constant ``B * max_tokens`` (no length bias).

    >>> const_norm_agg(torch.tensor([[1., 1., 1.], [4., 0., 0.]]), torch.tensor([[1, 1, 1], [1, 0, 0]]), 4)
    tensor(0.8750)
    """
    m = mask_BT.to(x_BT.dtype)
    return (x_BT * m).sum() / (x_BT.shape[0] * max_tokens)


@dataclass(frozen=True)
class Variant:
    advantage: str            # key of ADVANTAGES
    aggregate: Callable       # token -> scalar aggregation
    clip_higher: bool         # use eps_high (else eps_high = eps_low)
    dynamic_sampling: bool    # drop all-equal-reward groups before the update


VARIANTS: dict[str, Variant] = {
    "grpo": Variant("grpo", seq_mean_agg, clip_higher=False, dynamic_sampling=False),
    "dr_grpo": Variant("dr_grpo", const_norm_agg, clip_higher=False, dynamic_sampling=False),
    "dapo": Variant("grpo", token_mean_agg, clip_higher=True, dynamic_sampling=True),
}


def policy_loss(variant: str, logp_BT: torch.Tensor, old_logp_BT: torch.Tensor, adv_B: torch.Tensor,
                mask_BT: torch.Tensor, *, ref_logp_BT: torch.Tensor | None = None, beta: float = 0.0,
                eps_low: float = 0.2, eps_high: float = 0.28, max_tokens: int | None = None
                ) -> tuple[torch.Tensor, dict[str, float]]:
    """The clipped surrogate (+ ``beta`` * k3 KL) aggregated the variant's way; returns (loss, stats).

    On the first update ``logp == old_logp`` so the ratio is 1 and the gradient is the plain
    policy gradient ``-A * grad logp`` (averaged the variant's way).

    >>> lp = torch.tensor([[-1.0, -1.0], [-2.0, 0.0]]); m = torch.tensor([[1, 1], [1, 0]])
    >>> loss, st = policy_loss("grpo", lp, lp, torch.tensor([1.0, -1.0]), m)
    >>> float(loss)   # mean(-1, +1)
    0.0
    >>> float(policy_loss("dapo", lp, lp, torch.tensor([1.0, -1.0]), m)[0])   # (-1 -1 +1) / 3
    -0.3333333432674408
    >>> float(policy_loss("dr_grpo", lp, lp, torch.tensor([1.0, -1.0]), m, max_tokens=4)[0])  # -1/8
    -0.125
    """
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}; choose from {', '.join(VARIANTS)}")
    v = VARIANTS[variant]
    hi = eps_high if v.clip_higher else eps_low
    per_tok, clipped = clipped_surrogate(logp_BT, old_logp_BT, adv_B, eps_low, hi)
    stats: dict[str, float] = {}
    T = max_tokens or logp_BT.shape[1]
    if ref_logp_BT is not None:
        kl = kl_k3(logp_BT, ref_logp_BT)
        if beta > 0:
            per_tok = per_tok + beta * kl
        stats["kl"] = float(token_mean_agg(kl.detach(), mask_BT, T))
    loss = v.aggregate(per_tok, mask_BT, T)
    stats["clip_frac"] = float(token_mean_agg(clipped.float(), mask_BT, T))
    return loss, stats


# ------------------------------------------------------------------------------------------------
# DPO
# ------------------------------------------------------------------------------------------------
def dpo_loss(pol_chosen: torch.Tensor, pol_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float = 0.1) -> tuple[torch.Tensor, torch.Tensor]:
    """DPO: ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` on summed sequence log-probs.

    Returns (mean loss, per-pair implicit reward margins).

    >>> loss, margin = dpo_loss(torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]), torch.tensor([0.0]))
    >>> round(float(loss), 4), float(margin)   # log 2 at the start
    (0.6931, 0.0)
    >>> round(float(dpo_loss(torch.tensor([-1.]), torch.tensor([-5.]), torch.tensor([-3.]), torch.tensor([-3.]), 0.5)[0]), 4)
    0.1269
    """
    margin = beta * ((pol_chosen - ref_chosen) - (pol_rejected - ref_rejected))
    return -F.logsigmoid(margin).mean(), margin.detach()


# ------------------------------------------------------------------------------------------------
# log-probs of response tokens
# ------------------------------------------------------------------------------------------------
def gather_logprobs(logits_BTV: torch.Tensor, tokens_BT: torch.Tensor) -> torch.Tensor:
    """``log softmax(logits)[token]`` per position, in fp32.

    >>> gather_logprobs(torch.zeros(1, 2, 4), torch.tensor([[0, 3]]))
    tensor([[-1.3863, -1.3863]])
    """
    lp = torch.log_softmax(logits_BTV.float(), dim=-1)
    return lp.gather(-1, tokens_BT.unsqueeze(-1)).squeeze(-1)
