"""Sampling for GRPO rollouts, rejection sampling and eval: one function over the serving engine.

``sample(model, prompts, ...)`` runs batched generation with the KV cache through
``tinyseek.serve.engine.Engine`` (the same engine that serves requests), so what RL trains on is
what is served. ``use_engine=False`` runs a small batched KV-cache sampler here instead; both
follow the same contract: continuations
stop at ``eos_id`` or one of ``stop_ids`` (an imported chat model's end-of-turn tokens, e.g. Llama 3's
``<|eot_id|>``; not included in ``tokens``, recorded in ``end_id``) or after ``max_tokens``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from tinyseek.serve.engine import Engine, SamplingParams


@dataclass
class Sample:
    tokens: list[int]        # generated token ids, without the final eos
    finished: bool           # True if the model emitted eos (False = cut at max_tokens)
    end_id: int | None = None  # the stop token it emitted (eos or one of stop_ids), None if cut

    def with_end(self) -> list[int]:
        """``tokens`` plus the stop token when there was one (what training should see)."""
        return self.tokens + ([self.end_id] if self.finished and self.end_id is not None else [])


@torch.no_grad()
def sample(model, prompts: list[list[int]], *, eos_id: int, max_tokens: int, temperature: float = 1.0,
           top_p: float = 1.0, top_k: int = 0, seed: int = 0, max_batch: int = 64,
           use_engine: bool = True, stop_ids=()) -> list[Sample]:
    """Sample one continuation per prompt (repeat a prompt G times for a group). ``temperature=0``
    is greedy."""
    was_training = model.training
    model.eval()
    stops = {int(eos_id), *(int(t) for t in stop_ids)}
    try:
        if use_engine:
            max_len = min(model.cfg.max_seq_len, max(len(p) for p in prompts) + max_tokens + 1)
            engine = Engine(model, None, max_batch=min(max_batch, len(prompts)), max_len=max_len, eos_id=eos_id)
            params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                                     stop=[], seed=seed + i, stop_token_ids=sorted(stops - {int(eos_id)}))
                      for i in range(len(prompts))]
            outs = engine.generate([list(p) for p in prompts], params)
            res = []
            for o in outs:
                toks = list(o.token_ids)
                end = toks[-1] if toks and toks[-1] in stops else None
                if end is not None:
                    toks = toks[:-1]
                res.append(Sample(toks, end is not None or o.finish_reason in ("stop", "eos"), end))
            return res
        res = []
        for i in range(0, len(prompts), max_batch):
            res += _fallback_sample(model, prompts[i:i + max_batch], stops, max_tokens, temperature,
                                    top_p, top_k, seed + i)
        return res
    finally:
        model.train(was_training)


def filter_logits(logits_BV: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then nucleus (top-p) filtering; removed entries become -inf.

    >>> filter_logits(torch.tensor([[3.0, 2.0, 1.0, 0.0]]), 1.0, 2, 1.0)
    tensor([[3., 2., -inf, -inf]])
    >>> filter_logits(torch.log(torch.tensor([[0.6, 0.3, 0.1]])), 1.0, 0, 0.7).isinf().tolist()
    [[False, False, True]]
    """
    x = logits_BV.float() / max(temperature, 1e-6)
    if top_k > 0 and top_k < x.shape[-1]:
        kth = torch.topk(x, top_k, dim=-1).values[:, -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        srt, idx = torch.sort(x, dim=-1, descending=True)
        cum = torch.softmax(srt, -1).cumsum(-1)
        drop = cum - torch.softmax(srt, -1) >= top_p  # keep the smallest prefix reaching top_p
        srt = srt.masked_fill(drop, float("-inf"))
        x = torch.full_like(x, float("-inf")).scatter(-1, idx, srt)
    return x


def _fallback_sample(model, prompts, stops: set[int], max_tokens, temperature, top_p, top_k, seed) -> list[Sample]:
    dev = next(model.parameters()).device
    B = len(prompts)
    lens = torch.tensor([len(p) for p in prompts], device=dev)
    T = int(lens.max())
    max_len = min(model.cfg.max_seq_len, T + max_tokens)
    ids = torch.zeros(B, T, dtype=torch.long, device=dev)
    for b, p in enumerate(prompts):
        ids[b, :len(p)] = torch.tensor(p, device=dev)
    cache = model.new_cache(B, max_len)
    logits = model(ids, cache=cache).logits
    cache.lengths.copy_(lens)
    last = logits[torch.arange(B, device=dev), lens - 1]
    gen = torch.Generator(device=dev).manual_seed(seed)
    out = [[] for _ in range(B)]
    done = torch.zeros(B, dtype=torch.bool, device=dev)
    ends: list[int | None] = [None] * B
    for _ in range(max_tokens):
        if int(cache.lengths.max()) >= max_len:
            break
        if temperature <= 0:
            nxt = last.argmax(-1)
        else:
            probs = torch.softmax(filter_logits(last, temperature, top_k, top_p), -1)
            nxt = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
        for b in range(B):
            if not done[b]:
                if int(nxt[b]) in stops:
                    ends[b] = int(nxt[b])
                    done[b] = True
                else:
                    out[b].append(int(nxt[b]))
        if bool(done.all()):
            break
        last = model(nxt[:, None], cache=cache).logits[:, -1]
    return [Sample(o, e is not None, e) for o, e in zip(out, ends)]
