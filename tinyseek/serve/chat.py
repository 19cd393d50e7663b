"""``tinyseek chat --ckpt PATH``: a terminal chat with a checkpoint, streaming tokens as they come.

Reads one user turn per line from stdin (so it also works with a pipe). Commands: ``/reset``
forgets the conversation, ``/exit`` (or end of input) quits. The conversation goes through the
tokenizer's chat template, like the server's ``/v1/chat/completions``.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from tinyseek.config import ConfigError
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.serve.loading import load_for_serving


@dataclass
class Config:
    ckpt: str = ""                 # checkpoint: run dir, ckpt root or step dir (required)
    tokenizer: str = ""            # tokenizer dir; "" = found next to the checkpoint; "bytes" = byte fallback
    device: str = "auto"           # auto / cpu / cuda
    dtype: str = "auto"            # auto (bf16 on CUDA, fp32 on CPU) / fp32 / bf16 / fp16
    system: str = ""               # optional system prompt
    max_tokens: int = 256          # tokens per reply at most
    temperature: float = 0.7       # 0 = greedy
    top_p: float = 0.95            # nucleus sampling mass
    top_k: int = 0                 # 0 = off
    seed: int = -1                 # -1 = a fresh random seed per reply
    max_len: int = 0               # context positions; 0 = model max_seq_len (older turns are dropped to fit)
    stats: bool = True             # print tokens and tokens/s after each reply

    def validate(self) -> "Config":
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise ConfigError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0 or self.max_len < 0:
            raise ConfigError("top_k and max_len must be >= 0")
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "greedy": lambda: Config(temperature=0.0)}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def fit_history(tokenizer, messages: list[dict], budget: int) -> list[int]:
    """Prompt ids of the conversation (``tokenizer.encode_chat``: what was typed is text, never a special
    token), dropping the oldest non-system turns until it fits ``budget``."""
    msgs = list(messages)
    while True:
        ids = tokenizer.encode_chat(msgs, add_generation_prompt=True)
        droppable = [i for i, m in enumerate(msgs[:-1]) if m["role"] != "system"]
        if len(ids) <= budget or not droppable:
            return ids[-budget:]
        del msgs[droppable[0]]


def main(cfg: Config, stdin=None, stdout=None) -> dict:
    cfg.validate()
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tok, _ = load_for_serving(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.dtype)
    engine = Engine(model, tok, max_batch=1, max_len=cfg.max_len or None)
    interactive = stdin.isatty()
    messages = [{"role": "system", "content": cfg.system}] if cfg.system else []
    turns, tokens = 0, 0
    print(f"tinyseek chat ({engine.max_len} tokens of context; /reset, /exit)", file=stdout, flush=True)
    while True:
        if interactive:
            print("you> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/exit", "/quit"):
            break
        if text == "/reset":
            messages = messages[:1] if cfg.system else []
            print("(conversation cleared)", file=stdout, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        budget = engine.max_len - min(cfg.max_tokens, engine.max_len // 2)
        ids = fit_history(tok, messages, budget)
        sp = SamplingParams(max_tokens=min(cfg.max_tokens, engine.max_len - len(ids)), temperature=cfg.temperature,
                            top_k=cfg.top_k, top_p=cfg.top_p, seed=None if cfg.seed < 0 else cfg.seed + turns,
                            stop_token_ids=list(getattr(tok, "stop_ids", ())))  # e.g. <|eot_id|> beside eos
        print("bot> ", end="", file=stdout, flush=True)
        t0, reply, comp = time.perf_counter(), "", None
        try:
            for ev in engine.stream(ids, sp):
                reply += ev.text
                print(ev.text, end="", file=stdout, flush=True)
                comp = ev.completion or comp
        except KeyboardInterrupt:
            print(" [interrupted]", end="", file=stdout)
        dt = time.perf_counter() - t0
        print(file=stdout)
        n = len(comp.token_ids) if comp else 0
        if cfg.stats and comp:
            print(f"[{n} tokens, {n / max(dt, 1e-9):.1f} tok/s, {comp.finish_reason}]", file=stdout, flush=True)
        messages.append({"role": "assistant", "content": comp.text if comp else reply})
        turns += 1
        tokens += n
    return {"turns": turns, "tokens": tokens}
