"""Shared fixtures for the serving tests: a tiny random model and a tokenizer.

The tokenizer is ``tinyseek.tokenizer.byte_tokenizer()`` when that module is available, else a
local byte-level stand-in with the same API (specials first, then the 256 bytes).
"""
from __future__ import annotations

import torch

SPECIALS = ["<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>", "<think>", "</think>",
            "<answer>", "</answer>"]


class FakeByteTokenizer:
    def __init__(self):
        self.specials = {s: i for i, s in enumerate(SPECIALS)}
        self.n_special = len(SPECIALS)
        self.vocab_size = self.n_special + 256
        self.eos_id = self.specials["<|eos|>"]
        self.pad_id = self.specials["<|pad|>"]

    def token_to_id(self, tok: str) -> int:
        return self.specials[tok]

    def encode(self, text: str) -> list[int]:
        out, i = [], 0
        while i < len(text):
            for s, sid in self.specials.items():
                if text.startswith(s, i):
                    out.append(sid)
                    i += len(s)
                    break
            else:
                out += [self.n_special + b for b in text[i].encode("utf-8")]
                i += 1
        return out

    def decode(self, ids, skip_special: bool = False) -> str:
        parts, buf = [], bytearray()
        for t in ids:
            if t < self.n_special:
                parts.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
                if not skip_special:
                    parts.append(SPECIALS[t])
            else:
                buf.append(t - self.n_special)
        parts.append(buf.decode("utf-8", errors="replace"))
        return "".join(parts)

    def apply_chat_template(self, messages, add_generation_prompt: bool = True) -> str:
        s = "".join(f"<|{m['role']}|>{m['content']}" for m in messages)
        return s + ("<|assistant|>" if add_generation_prompt else "")


def make_tokenizer():
    try:
        from tinyseek.tokenizer import byte_tokenizer
        return byte_tokenizer()
    except ImportError:
        return FakeByteTokenizer()


def make_model(tokenizer, seed: int = 0, **overrides):
    from tinyseek.config import model_micro
    from tinyseek.model.transformer import Transformer

    cfg = model_micro()
    cfg.vocab_size = tokenizer.vocab_size
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(seed)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # larger weights than the init so greedy outputs vary from token to token
        for p in model.parameters():
            if p.dim() > 1:
                p.mul_(8.0)
    return model
