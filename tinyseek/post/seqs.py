"""Prompt + response sequences: right-padded batches, response masks, per-token log-probs.

Shared by SFT (loss on response tokens only), GRPO/DPO (log-probs of the sampled response tokens
under the policy, the old policy and the frozen reference) and distillation.

Position convention: for a row ``ids = prompt + response`` the model reads ``ids[:-1]`` and
predicts ``ids[1:]``; ``mask_BT[b, t] = 1`` iff ``ids[b, t+1]`` is a response token.
Right padding keeps causal attention exact for the real tokens (padding only follows them).
"""
from __future__ import annotations

import torch

from tinyseek.post.losses import gather_logprobs


def pack(prompts: list[list[int]], responses: list[list[int]], pad_id: int,
         device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Concatenate each prompt and response, right-pad; return (ids_BT, response mask of ids[1:]).

    >>> ids, m = pack([[1, 2], [3]], [[4], [5, 6]], pad_id=0)
    >>> ids.tolist(), m.tolist()
    ([[1, 2, 4], [3, 5, 6]], [[0, 1], [1, 1]])
    """
    if len(prompts) != len(responses):
        raise ValueError("prompts and responses differ in length")
    rows = [list(p) + list(r) for p, r in zip(prompts, responses)]
    T = max(len(r) for r in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T - 1), dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ids[b, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        mask[b, len(p) - 1:len(p) + len(r) - 1] = 1
    return ids.to(device), mask.to(device)


def sft_targets(ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Targets for ``model(ids[:, :-1], targets)``: the next token on response positions, else -100.

    >>> ids, m = pack([[1, 2]], [[4, 5]], pad_id=0)
    >>> sft_targets(ids, m).tolist()
    [[-100, 4, 5]]
    """
    tgt = ids_BT[:, 1:].clone()
    tgt[mask_BT == 0] = -100
    return tgt


def token_logprobs(model, ids_BT: torch.Tensor, with_aux: bool = False, mask_BT: torch.Tensor | None = None):
    """``log p(ids[t+1] | ids[:t+1])`` for every position, shape (B, T-1), fp32.

    With ``mask_BT`` (B, T-1) only the masked positions are computed (the LM head runs on those rows
    only); the others are 0. With ``with_aux`` also returns the model output (for the MoE balance
    loss and expert counts).
    """
    if mask_BT is None:
        out = model(ids_BT[:, :-1])
        lp = gather_logprobs(out.logits, ids_BT[:, 1:])
        return (lp, out) if with_aux else lp
    sel = mask_BT.bool()
    out = model(ids_BT[:, :-1], logits_mask=sel)
    lp_N = gather_logprobs(out.logits[None], ids_BT[:, 1:][sel][None])[0]
    lp = torch.zeros(sel.shape, dtype=lp_N.dtype, device=lp_N.device).masked_scatter(sel, lp_N)
    return (lp, out) if with_aux else lp


def sequence_logprob(logp_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
    """Sum of the response tokens' log-probs per row.

    >>> sequence_logprob(torch.tensor([[-1., -2., -3.]]), torch.tensor([[0, 1, 1]]))
    tensor([-5.])
    """
    return (logp_BT * mask_BT.to(logp_BT.dtype)).sum(-1)
