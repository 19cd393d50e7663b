"""Shared by the C kernel tests: switch a ``tinyseek.ckernels.Kernels`` on or off and count its calls."""
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
