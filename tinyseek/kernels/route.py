"""The MoE router's bookkeeping on CPU (C in ``route.c``): per-token top-k expert selection and the
stable sort of assignments by expert, for :func:`tinyseek.model.moe.route` and ``MoE._plan``.

- :func:`topk_indices`: k masked arg-max passes over each row, AVX-512 (portable loops otherwise;
  equal scores: the lower expert id first);
- :func:`sort_by_expert`: a counting sort (stable: assignments of one expert keep their order), the
  same ``(sorted ids, order)`` as ``torch.sort(e_A, stable=True)``.

Why: ``torch.topk`` and the stable ``torch.sort`` were ~1.5% of a 64-expert MoE block's training
step on CPU, the C passes a sixth and a tenth of them (timings: ``benchmarks/README.md``, moe section).

Used for CPU fp32 / int64 tensors when the model kernels are on (``TINYSEEK_MODEL_KERNELS``), built,
and not under ``torch.compile`` tracing; else the PyTorch ops run (same results; for top-k also the
same order wherever scores are distinct: ``torch.topk`` does not define the order of ties).
"""
from __future__ import annotations

import torch

from tinyseek.kernels import loader
from tinyseek.kernels.loader import I64, INT, P

_SIGS = {"ts_topk_f32": ([P, I64, I64, I64, P], INT), "ts_sort_ids": ([P, I64, I64, P, P, P], INT)}
KERNELS = loader.Kernels("_tinyseek_route", loader.source("route.c"), _SIGS, "TINYSEEK_MODEL_KERNELS",
                         "tinyseek.kernels.route")
MAX_K = 64  # the kernel's top-k limit (torch.topk beyond)


def _lib():
    st = KERNELS.state
    if not st["enabled"] or st["failed"] or torch.compiler.is_compiling():  # tracing: the torch ops
        return None
    return st["lib"] if st["lib"] is not None else KERNELS.ready()


def topk_indices(sel_NE: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` largest entries of each row, largest first (``sel.topk(k).indices``).

    >>> topk_indices(torch.tensor([[0.1, 0.7, 0.2, 0.7]]), 3).tolist()   # the tie: lower id first
    [[1, 3, 2]]
    """
    lib = _lib() if sel_NE.dim() == 2 and 1 <= k <= min(MAX_K, sel_NE.shape[1]) else None
    if lib is None or sel_NE.dtype is not torch.float32 or sel_NE.device.type != "cpu" or sel_NE.requires_grad:
        return sel_NE.topk(k, dim=-1).indices
    sel_NE = sel_NE.contiguous()
    N, E = sel_NE.shape
    idx = torch.empty(N, k, dtype=torch.int64)
    if lib.ts_topk_f32(sel_NE.data_ptr(), N, E, k, idx.data_ptr()):
        raise ValueError(f"top-k: k={k} does not fit {E} experts")
    return idx


def sort_by_expert(e_A: torch.Tensor, n_bins: int, counts: bool = True
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """``torch.sort(e_A, stable=True)`` plus the count of each value in ``[0, n_bins)`` (the kernel
    has them for free; on the PyTorch path only with ``counts``, since a CUDA ``bincount`` waits
    for the device).

    >>> [t.tolist() for t in sort_by_expert(torch.tensor([2, 0, 2, 1, 0]), 3)]
    [[0, 0, 1, 2, 2], [1, 4, 3, 0, 2], [2, 1, 2]]
    """
    lib = _lib()
    if lib is None or e_A.dtype is not torch.int64 or e_A.device.type != "cpu" or e_A.dim() != 1:
        e_S, order_S = torch.sort(e_A, stable=True)
        return e_S, order_S, torch.bincount(e_A, minlength=n_bins)[:n_bins] if counts else None
    e_A = e_A.contiguous()
    A = e_A.shape[0]
    e_S, order_S, counts_B = torch.empty(A, dtype=torch.int64), torch.empty(A, dtype=torch.int64), \
        torch.empty(n_bins, dtype=torch.int64)
    if lib.ts_sort_ids(e_A.data_ptr(), A, n_bins, e_S.data_ptr(), order_S.data_ptr(), counts_B.data_ptr()):
        raise IndexError(f"expert id outside [0, {n_bins})")
    return e_S, order_S, counts_B
