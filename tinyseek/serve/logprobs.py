"""OpenAI's two logprobs shapes, built from the engine's per-token records.

A record is ``(token id, logprob, [(id, logprob), ...])`` (:data:`tinyseek.serve.engine.TokenLogprob`)
where every logprob is the log-softmax of the model's raw logits at temperature 1: the model's own
distribution, before temperature, top-k / top-p, penalties and ``logit_bias`` (which only change how
the token is picked). That is what OpenAI returns and what lm-eval's loglikelihood tasks need.

- chat (``/v1/chat/completions``): ``{"content": [{token, logprob, bytes, top_logprobs: [{token,
  logprob, bytes}]}]}``;
- legacy (``/v1/completions``): ``{tokens, token_logprobs, top_logprobs: [{token: logprob}],
  text_offset}``; with ``echo`` the prompt's tokens come first, the first one with ``None`` logprob
  and top logprobs.

A token's string is ``tokenizer.decode([id])``; its bytes are exact for the byte tokenizer's byte ids
and ``decode([id])`` as UTF-8 otherwise (a token holding part of a multi-byte character shows as
U+FFFD there).
"""
from __future__ import annotations


def token_str(tok, i: int) -> str:
    return tok.decode([i])


def token_bytes(tok, i: int) -> list[int]:
    """The token's bytes (exact for byte ids of the byte tokenizer; else its text as UTF-8)."""
    if getattr(tok, "kind", None) == "bytes" and i < 256:
        return [i]
    return list(tok.decode([i]).encode("utf-8"))


def chat_logprobs(tok, records: list) -> dict:
    """OpenAI chat shape of ``records`` (one entry per generated token).

    >>> from tinyseek.tokenizer import byte_tokenizer
    >>> chat_logprobs(byte_tokenizer(), [(104, -0.5, [(104, -0.5), (105, -1.0)])])["content"][0]["top_logprobs"][1]
    {'token': 'i', 'logprob': -1.0, 'bytes': [105]}
    """
    def entry(i, lp):
        return {"token": token_str(tok, i), "logprob": lp, "bytes": token_bytes(tok, i)}
    return {"content": [{**entry(i, lp), "top_logprobs": [entry(j, v) for j, v in top]} for i, lp, top in records],
            "refusal": None}


def legacy_logprobs(tok, records: list, start_offset: int = 0) -> dict:
    """OpenAI completions (legacy) shape; ``records`` may hold ``None`` (the echoed prompt's first
    token: give ``(id, None, None)``). ``text_offset[j]`` is where token j's text starts in the
    returned text (``start_offset`` for the first).

    >>> from tinyseek.tokenizer import byte_tokenizer
    >>> legacy_logprobs(byte_tokenizer(), [(104, None, None), (105, -0.25, [(105, -0.25)])])
    {'tokens': ['h', 'i'], 'token_logprobs': [None, -0.25], 'top_logprobs': [None, {'i': -0.25}], 'text_offset': [0, 1]}
    """
    tokens, lps, tops, offsets = [], [], [], []
    ids, pos = [], start_offset
    for i, lp, top in records:
        offsets.append(pos)
        ids.append(i)
        tokens.append(token_str(tok, i))
        lps.append(lp)
        tops.append(None if top is None else {token_str(tok, j): v for j, v in top})
        pos = start_offset + len(tok.decode(ids))
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": tops, "text_offset": offsets}


def prompt_records(prompt: list[int], prompt_logprobs: list | None) -> list:
    """The echoed prompt's records: the first token without a logprob, the others as computed."""
    recs = [(prompt[0], None, None)]
    return recs + list((prompt_logprobs or [None])[1:])
