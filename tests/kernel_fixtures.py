"""Shared by the C kernel tests: switch a ``tinyseek.kernels.loader.Kernels`` on or off and count its calls."""
from __future__ import annotations

import contextlib


class Counting:
    """Stands in for a loaded kernel library: forwards ``name`` and records each call's arguments."""

    def __init__(self, lib, name: str):
        self.lib, self.name, self.args = lib, name, []

    @property
    def calls(self) -> int:
        return len(self.args)

    def __getattr__(self, attr):
        if attr != self.name:
            raise AttributeError(attr)

        def call(*args):
            self.args.append(args)
            return getattr(self.lib, self.name)(*args)
        return call


@contextlib.contextmanager
def switched(kernels, name: str, on: bool):
    """``kernels`` on (its function ``name`` counted) or off; the state is restored afterwards.
    Yields the :class:`Counting` stand-in."""
    state = kernels.state
    saved = dict(state)
    counter = Counting(kernels.lib(), name)
    state.update(enabled=on, lib=counter)
    try:
        yield counter
    finally:
        state.clear()
        state.update(saved)


def ragged_decode(model, kernels_on, kernels_off=contextlib.nullcontext, n_new: int = 6, seed: int = 11):
    """Three rows with prompts of different lengths: a right-padded prefill, then ``n_new`` decode
    steps with the KV cache, inside ``kernels_on()`` (a context yielding a :class:`Counting`); the
    reference is each row's full forward inside ``kernels_off()``. Returns ``(decoded, reference,
    counter, calls_after_prefill)`` with ``decoded[b]`` / ``reference[b]`` the (n_new, V) logits."""
    import torch

    g = torch.Generator().manual_seed(seed)
    V = model.cfg.vocab_size
    seqs = [torch.randint(0, V, (n,), generator=g) for n in (14, 9, 12)]
    prompt_lens = [8, 3, 6]
    with torch.no_grad():
        with kernels_off():
            refs = [model(s[None, :pl + n_new]).logits[0, pl:pl + n_new] for s, pl in zip(seqs, prompt_lens)]
        pad = torch.zeros(3, max(prompt_lens), dtype=torch.long)
        for b, (s, pl) in enumerate(zip(seqs, prompt_lens)):
            pad[b, :pl] = s[:pl]
        with kernels_on() as counter:
            cache = model.new_cache(3)
            model(pad, cache=cache)
            cache.lengths[:] = torch.tensor(prompt_lens)
            after_prefill = counter.calls
            outs = [[] for _ in seqs]
            for i in range(n_new):
                tok = torch.stack([s[pl + i] for s, pl in zip(seqs, prompt_lens)])[:, None]
                logits = model(tok, cache=cache).logits[:, -1]
                for b in range(3):
                    outs[b].append(logits[b])
    return [torch.stack(o) for o in outs], refs, counter, after_prefill
