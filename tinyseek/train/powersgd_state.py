"""PowerSGD hook state that survives DDP bucket changes and checkpoints.

torch's ``powerSGD_hook`` keeps three tensors per DDP *bucket*: the error-feedback residual (flat,
one entry per gradient element of the bucket) and the warm-start P and Q factors (flat,
concatenated over the bucket's compressed matrices, grouped by matrix shape). Their layout
follows the bucket's parameter order, and that order changes: DDP rebuilds its buckets after the
first iteration of every new DDP instance (in gradient-ready order), so the state of a run that
is restored into a fresh DDP no longer lines up with the buckets it meets, and a resumed run
drifts from the uninterrupted one.

This module stores the state *per parameter* instead (:func:`explode`) and lays it out again for
whatever bucket order the hook sees next (:func:`assemble`). Every piece of PowerSGD's maths is
per matrix (P = M Q, orthogonalisation, Q = M^T P) or elementwise (the all-reduces), so the
regrouping is exact: a resumed run reproduces the uninterrupted one bit for bit
(tests/test_distributed.py). :class:`LayoutTracker` does the regrouping inside the hook wrapper.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.algorithms.ddp_comm_hooks.powerSGD_hook import _should_compress

Layout = tuple[tuple[str, tuple[int, ...]], ...]  # (parameter name, shape) in bucket order


def _matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    n = shape[0] if shape else 1
    return n, math.prod(shape) // n if n else 0


def _compressed(shape: tuple[int, ...], rank: int, min_rate: float) -> tuple[bool, int, int, int]:
    """(compressed?, n, m, r) for one gradient, by the hook's own rule."""
    n, m = _matrix_shape(shape)
    r = min(n, m, rank)
    return bool(_should_compress(n, m, r, min_rate)[0]), n, m, r


def _pq_slots(layout: Layout, rank: int, min_rate: float) -> dict[str, tuple[int, int, int, int]]:
    """name -> (p_offset, p_len, q_offset, q_len) in the bucket's flat P and Q memories: the hook
    orders the compressed matrices by shape group (first appearance), then by bucket order."""
    groups: OrderedDict[tuple[int, int], list[tuple[str, int, int, int]]] = OrderedDict()
    for name, shape in layout:
        ok, n, m, r = _compressed(shape, rank, min_rate)
        if ok:
            groups.setdefault((n, m), []).append((name, n, m, r))
    out, p, q = {}, 0, 0
    for members in groups.values():
        for name, n, m, r in members:
            out[name] = (p, n * r, q, m * r)
            p, q = p + n * r, q + m * r
    return out


def explode(layout: Layout, error: torch.Tensor | None, p: torch.Tensor | None, q: torch.Tensor | None,
            rank: int, min_rate: float) -> dict[str, dict[str, torch.Tensor]]:
    """Split one bucket's flat state into ``{name: {"error": ..., "p": ..., "q": ...}}`` (keys only
    for the tensors that exist)."""
    pieces: dict[str, dict[str, torch.Tensor]] = {name: {} for name, _ in layout}
    if error is not None:
        off = 0
        for name, shape in layout:
            k = math.prod(shape)
            pieces[name]["error"] = error[off:off + k].clone()
            off += k
        if off != error.numel():
            raise ValueError(f"PowerSGD error buffer has {error.numel()} elements, the bucket {off}")
    if p is not None and q is not None:
        for name, (po, pl, qo, ql) in _pq_slots(layout, rank, min_rate).items():
            pieces[name]["p"], pieces[name]["q"] = p[po:po + pl].clone(), q[qo:qo + ql].clone()
    return pieces


def assemble(layout: Layout, pieces: dict[str, dict[str, torch.Tensor]], rank: int, min_rate: float
             ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Inverse of :func:`explode` for a (possibly different) bucket order. A tensor comes back
    only if every parameter of the bucket has its piece (else the hook starts it afresh)."""
    have = [pieces.get(name, {}) for name, _ in layout]
    error = torch.cat([h["error"] for h in have]) if have and all("error" in h for h in have) else None
    slots = _pq_slots(layout, rank, min_rate)
    p = q = None
    if slots and all("p" in pieces.get(n, {}) and "q" in pieces.get(n, {}) for n in slots):
        order = sorted(slots, key=lambda n: slots[n][0])
        p = torch.cat([pieces[n]["p"] for n in order])
        q = torch.cat([pieces[n]["q"] for n in order])
    return error, p, q


@dataclass
class LayoutTracker:
    """Keeps a ``PowerSGDState`` aligned with the buckets the hook is called with.

    ``names`` maps ``id(parameter)`` to its name. Call :meth:`before_hook` with each bucket before
    the hook runs. When a bucket's parameter order differs from the one its state was built
    with, all buckets' state is exploded per parameter and re-assembled bucket by bucket as they
    come. :meth:`state_dict` / :meth:`load_state_dict` save and restore the state per parameter.
    """
    state: Any                                   # torch PowerSGDState
    names: dict[int, str]
    layouts: dict[int, Layout] = field(default_factory=dict)
    pending: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def _args(self) -> tuple[int, float]:
        return self.state.matrix_approximation_rank, self.state.min_compression_rate

    def layout_of(self, bucket) -> Layout:
        return tuple((self.names[id(p)], tuple(p.shape)) for p in bucket.parameters())

    def _exploded(self) -> dict[str, dict[str, torch.Tensor]]:
        """Every bucket's state split per parameter (the buckets' own memory is left as it is)."""
        st, out = self.state, {}
        for idx, layout in self.layouts.items():
            got = explode(layout, st.error_dict.get(idx), st.p_memory_dict.get(idx), st.q_memory_dict.get(idx),
                          *self._args())
            for name, d in got.items():
                out.setdefault(name, {}).update(d)
        return out

    def _explode_all(self) -> None:
        for name, d in self._exploded().items():
            self.pending.setdefault(name, {}).update(d)
        self.state.error_dict.clear(), self.state.p_memory_dict.clear(), self.state.q_memory_dict.clear()
        self.layouts.clear()

    def before_hook(self, bucket) -> None:
        idx, layout = bucket.index(), self.layout_of(bucket)
        if idx in self.layouts and self.layouts[idx] != layout:
            self._explode_all()
        if idx not in self.layouts and self.pending:
            error, p, q = assemble(layout, self.pending, *self._args())
            device = bucket.buffer().device
            if error is not None:
                self.state.error_dict[idx] = error.to(device)
            if p is not None:
                self.state.p_memory_dict[idx], self.state.q_memory_dict[idx] = p.to(device), q.to(device)
            for name, _ in layout:
                self.pending.pop(name, None)
        self.layouts[idx] = layout

    def state_dict(self) -> dict:
        st = self.state
        params: dict[str, dict[str, torch.Tensor]] = {k: {n: t.cpu() for n, t in d.items()}
                                                      for k, d in self.pending.items()}
        for name, d in self._exploded().items():
            params.setdefault(name, {}).update({k: t.cpu() for k, t in d.items()})
        return {"kind": "powersgd", "params": params, "iter": st.iter, "rng": st.rng.get_state(),
                "total_numel_before_compression": st.total_numel_before_compression,
                "total_numel_after_compression": st.total_numel_after_compression,
                "next_stats_report": st.next_stats_report}

    def load_state_dict(self, sd: dict) -> None:
        st = self.state
        st.error_dict.clear(), st.p_memory_dict.clear(), st.q_memory_dict.clear()
        self.layouts.clear()
        self.pending = {name: dict(d) for name, d in sd["params"].items()}
        st.rng.set_state(sd["rng"])
        for k in ("iter", "total_numel_before_compression", "total_numel_after_compression", "next_stats_report"):
            setattr(st, k, sd[k])
