"""Shared fixtures for the serving tests: a tiny random model and the byte tokenizer.

Also ``start_uvicorn``: a real server on a free loopback port, for the tests that need HTTP."""
from __future__ import annotations

import torch


def make_tokenizer():
    from tinyseek.tokenizer import byte_tokenizer
    return byte_tokenizer()


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


def start_uvicorn(app, **server_kw):
    """Run ``app`` under a real uvicorn on a free 127.0.0.1 port in a daemon thread and wait until
    ``/health`` answers. Returns ``(base_url, server, thread)``; stop with ``server.should_exit = True``."""
    import socket
    import threading
    import time

    import httpx
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", **server_kw))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    base = f"http://127.0.0.1:{port}"
    for _ in range(500):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.02)
    return base, server, th


def greedy_cached(model, prompt: list[int], n: int) -> list[int]:
    """Prompt + ``n`` greedy tokens decoded one at a time through the model's KV cache."""
    import torch
    ids, cache = torch.tensor([prompt]), model.new_cache(1)
    with torch.no_grad():
        logits = model(ids, cache=cache).logits
        for _ in range(n):
            nxt = logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], dim=1)
            logits = model(nxt, cache=cache).logits
    return ids[0].tolist()
