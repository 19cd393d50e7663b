"""Per-row token sampling for the engine: greedy, temperature, top-k, top-p, one uniform per row.

Each row carries its own sampling parameters and its own uniform random number ``u`` (drawn by the
engine from a per-request generator), and a row's token depends only on that row's logits and
``u``. So a seeded request samples the same tokens whatever else is in the batch, and we need no
Python loop over rows: temperature / top-k / top-p are applied to the whole batch at once and the
token is picked by inverse-CDF lookup of ``u``. Plain temperature sampling works on the
probabilities in id order (no sort); top-k sorts only the ``k`` largest; top-p sorts the vocabulary.

Ties: greedy takes the lowest token id among equal maxima (``argmax``).
"""
from __future__ import annotations

import torch


def filtered_probs(sorted_NV: torch.Tensor, temperature_N: torch.Tensor, top_k_N: torch.Tensor,
                   top_p_N: torch.Tensor) -> torch.Tensor:
    """Probabilities over logits already sorted in descending order, after temperature, top-k
    (0 = off) and top-p (keep the smallest prefix whose mass reaches ``top_p``; the top token is
    always kept). Rows sum to one.

    >>> s = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    >>> one = torch.tensor([1.0])
    >>> r = lambda p: [round(v, 3) for v in p[0].tolist()]
    >>> r(filtered_probs(s, one, torch.tensor([0]), one))
    [0.5, 0.3, 0.2]
    >>> r(filtered_probs(s, one, torch.tensor([2]), one))
    [0.625, 0.375, 0.0]
    >>> r(filtered_probs(s, one, torch.tensor([0]), torch.tensor([0.6])))
    [0.625, 0.375, 0.0]
    >>> r(filtered_probs(s, one, torch.tensor([0]), torch.tensor([0.5])))  # mass 0.5 reached by token 0
    [1.0, 0.0, 0.0]
    """
    N, V = sorted_NV.shape
    x = sorted_NV.float() / temperature_N.clamp_min(1e-6)[:, None]
    rank = torch.arange(V, device=x.device)
    k = torch.where(top_k_N > 0, top_k_N, V).clamp(max=V)
    x = x.masked_fill(rank[None, :] >= k[:, None], float("-inf"))
    p = x.softmax(-1)
    before = p.cumsum(-1) - p                      # mass strictly above each entry
    thresh = torch.where(top_p_N < 1.0, top_p_N - 1e-6, 2.0)  # top_p >= 1: off
    p = p.masked_fill(before >= thresh[:, None], 0.0)  # top-p; entry 0 has before == 0
    p[:, 0] = torch.where(p[:, 0] > 0, p[:, 0], 1.0)  # keep the top token in any case
    return p / p.sum(-1, keepdim=True)


def sample_tokens(logits_NV: torch.Tensor, temperature: list[float], top_k: list[int], top_p: list[float],
                  u: list[float]) -> torch.Tensor:
    """Next token per row. ``temperature[i] <= 0`` (or ``top_k[i] == 1``) is greedy and ignores
    ``u[i]``; other rows sample by inverse CDF with the uniform ``u[i]`` in [0, 1).

    >>> logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    >>> sample_tokens(logits, [0.0, 1.0, 1.0], [0, 0, 0], [1.0, 1.0, 1.0], [0.0, 0.5, 0.99]).tolist()
    [1, 1, 2]
    >>> sample_tokens(logits[:1], [1.0], [0], [0.5], [0.99]).tolist()  # top-p keeps only token 1
    [1]
    """
    N = logits_NV.shape[0]
    rows = [i for i in range(N) if temperature[i] > 0 and top_k[i] != 1]
    if not rows:
        return logits_NV.argmax(-1)
    dev = logits_NV.device
    every = len(rows) == N  # all rows sample: no gather / scatter of rows
    idx = None if every else torch.tensor(rows, device=dev)
    temp_u = torch.tensor([[temperature[i] for i in rows], [u[i] for i in rows]], device=dev)
    temp = temp_u[0]
    x = (logits_NV if every else logits_NV[idx]).float()
    ks = [top_k[i] for i in rows]
    if all(k == 0 for k in ks) and all(top_p[i] >= 1.0 for i in rows):
        # plain temperature sampling needs no sorting: inverse CDF over the probabilities in id order
        p, order = (x / temp[:, None]).softmax(-1), None
    else:
        if all(k > 0 for k in ks):  # only the max_k largest can survive: sort those, not the vocabulary
            srt, order = torch.topk(x, min(max(ks), x.shape[-1]), dim=-1)
        else:
            srt, order = torch.sort(x, dim=-1, descending=True, stable=True)
        p = filtered_probs(srt, temp, torch.tensor(ks, device=dev), torch.tensor([top_p[i] for i in rows], device=dev))
    cdf = p.cumsum(-1)
    target = temp_u[1].to(cdf.dtype) * cdf[:, -1]
    j = torch.searchsorted(cdf, target[:, None], right=True).clamp(max=p.shape[-1] - 1)
    # never land on a zero-probability entry (possible only through rounding at the very end); the
    # check is cheap, the fix (last nonzero entry of each row) is done only when some row needs it
    if bool((p.gather(1, j) == 0).any()):
        last = p.shape[-1] - 1 - (p > 0).flip(-1).int().argmax(-1, keepdim=True)
        j = torch.minimum(j, last)
    tok = (order.gather(1, j) if order is not None else j).squeeze(1)
    if every:
        return tok
    out = logits_NV.argmax(-1)
    out[idx] = tok
    return out


def apply_penalties(logits_NV: torch.Tensor, params: list, generated: list[list[int]]) -> torch.Tensor:
    """Logits after OpenAI's presence / frequency penalties and ``logit_bias`` (``params[i]`` has
    ``presence_penalty``, ``frequency_penalty``, ``logit_bias``; ``generated[i]`` are row i's tokens so
    far): ``logit[j] - frequency * count[j] - presence * (count[j] > 0) + bias[j]``. Rows without any
    of them are untouched; without any row needing it, ``logits_NV`` itself is returned (no copy).

    >>> class P: presence_penalty, frequency_penalty, logit_bias = 1.0, 0.5, {0: 2.0}
    >>> apply_penalties(torch.zeros(1, 3), [P()], [[1, 1]]).tolist()
    [[2.0, -2.0, 0.0]]
    """
    rows = [i for i, p in enumerate(params) if p.presence_penalty or p.frequency_penalty or p.logit_bias]
    if not rows:
        return logits_NV
    out = logits_NV.float().clone()
    V = out.shape[-1]
    for i in rows:
        p = params[i]
        if (p.presence_penalty or p.frequency_penalty) and generated[i]:
            counts = torch.bincount(torch.tensor(generated[i], device=out.device), minlength=V)[:V].to(out.dtype)
            out[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(out.dtype)
        if p.logit_bias:
            ids = torch.tensor([t for t in p.logit_bias if t < V], device=out.device, dtype=torch.long)
            out[i, ids] += torch.tensor([b for t, b in p.logit_bias.items() if t < V], device=out.device)
    return out


def token_logprobs(logits_NV: torch.Tensor, chosen: list[int], k: int) -> list[tuple[int, float, list]]:
    """Per row: ``(chosen id, its logprob, [(id, logprob)] of the k most likely ids)``, where a logprob
    is the log-softmax of the row's logits at temperature 1 (the model's own distribution).

    >>> r = token_logprobs(torch.log(torch.tensor([[0.5, 0.3, 0.2]])), [2], 2)[0]
    >>> r[0], round(r[1], 4), [(i, round(v, 4)) for i, v in r[2]]
    (2, -1.6094, [(0, -0.6931), (1, -1.204)])
    """
    lp = torch.log_softmax(logits_NV.float(), dim=-1)
    idx = torch.tensor(chosen, device=lp.device, dtype=torch.long)
    got = lp.gather(1, idx[:, None])[:, 0].tolist()
    if k > 0:
        top_v, top_i = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [list(zip(i, v)) for i, v in zip(top_i.tolist(), top_v.tolist())]
    else:
        tops = [[] for _ in chosen]
    return [(t, g, top) for t, g, top in zip(chosen, got, tops)]
