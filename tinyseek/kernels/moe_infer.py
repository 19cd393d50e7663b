"""Fused fp32 CPU kernel for the routed experts of a MoE layer at inference (decode and prefill).

``y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n])`` with ``expert_e(x) = (silu(x @ Wg_e) * (x @ Wu_e))
@ Wd_e`` over stacked expert weights (``w_gate_up (E, D, 2F)``, gate columns first, and
``w_down (E, F, D)``: the layout of :class:`tinyseek.model.moe.Experts`) in ONE C call per layer
(``moe_infer.c``), replacing the sort, gathers, per-expert GEMM calls (or ``torch._grouped_mm``),
activation and scatter-add of the PyTorch dispatch.

Inside the call: a counting sort groups the (token, slot) assignments by expert; each expert's
assignments go in blocks of up to 4 tokens, so every weight load feeds 4 tokens (16 AVX-512
accumulators: 4 tokens x 64 columns; masked loads/stores for column tails, so any D / F works;
portable loops where AVX-512 is missing or ``TS_PORTABLE`` is defined). The routing weight scales
the activation (F wide) before the down projection, each assignment's output goes to its own row and
the rows of a token are summed in slot order at the end (deterministic, no write races, the same
result on any number of threads). Large calls (``N * K * 3 * D * F`` >= 2M multiply-adds, with
more than one torch thread) share the blocks over OpenMP (``torch.get_num_threads()`` threads);
small ones stay on the calling thread (there a fork/join costs more than it saves).

Chosen by ``MoE`` (``moe_impl`` ``auto`` or ``kernel``: dispatch ``"kernel"``, ``MoE._kernel``) for
plain :class:`~tinyseek.model.moe.Experts` on CPU fp32; per call it runs where no gradient is needed,
the input is a CPU fp32 tensor without autocast and no assignment was dropped by capacity, else
(and when the kernels are off: ``TINYSEEK_MODEL_KERNELS=0``, ``KERNELS.enable(False)``,
``loader.enable_all(False)``, or did not build: one printed line) the PyTorch inference path runs.
Results equal the PyTorch paths up to float summation order (tested against the ``loop`` reference).
"""
from __future__ import annotations

import torch

from tinyseek.kernels import loader
from tinyseek.kernels.loader import I64, INT, P

_SIGS = {"ts_moe_f32": ([P, P, P, I64, I64, I64, P, P, P, I64, I64, INT], INT)}
KERNELS = loader.Kernels("_tinyseek_moe", loader.source("moe_infer.c"), _SIGS, "TINYSEEK_MODEL_KERNELS",
                         "tinyseek.kernels.moe_infer")


def routed_experts(x_ND: torch.Tensor, idx_NK: torch.Tensor, w_NK: torch.Tensor, w_gate_up: torch.Tensor,
                   w_down: torch.Tensor, lib=None) -> torch.Tensor | None:
    """``y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n])`` in one kernel call, or None where the kernel
    does not apply (kernels off / not built, not CPU fp32, a gradient needed). ``lib`` overrides the
    loaded library (tests: the ctypes and portable builds). An expert id outside ``[0, E)`` raises
    ``IndexError``. Kept lean (it runs once per MoE layer per decode step)."""
    if lib is None:
        st = KERNELS.state
        lib = st["lib"] if st["enabled"] else None
        if lib is None:
            lib = KERNELS.ready()
            if lib is None:
                return None
    f32 = torch.float32
    if not (x_ND.dtype is f32 and w_NK.dtype is f32 and w_gate_up.dtype is f32 and w_down.dtype is f32
            and x_ND.is_cpu and w_gate_up.is_cpu and w_down.is_cpu and idx_NK.is_cpu and w_NK.is_cpu):
        return None
    if torch.is_grad_enabled() and (x_ND.requires_grad or w_NK.requires_grad or w_gate_up.requires_grad
                                    or w_down.requires_grad):
        return None
    N, D = x_ND.shape
    E, D_in, F2 = w_gate_up.shape
    if D_in != D or w_down.shape != (E, F2 // 2, D) or idx_NK.shape != w_NK.shape or idx_NK.shape[0] != N:
        raise ValueError(f"expert shapes {tuple(w_gate_up.shape)} / {tuple(w_down.shape)} do not fit input "
                         f"{tuple(x_ND.shape)} and routing {tuple(idx_NK.shape)}")
    x_ND, w_NK = x_ND.contiguous(), w_NK.contiguous()
    if not (w_gate_up.is_contiguous() and w_down.is_contiguous()):
        w_gate_up, w_down = w_gate_up.contiguous(), w_down.contiguous()
    if idx_NK.dtype is not torch.int64 or not idx_NK.is_contiguous():
        idx_NK = idx_NK.to(torch.int64).contiguous()
    y = torch.empty(N, D, dtype=f32)
    rc = lib.ts_moe_f32(x_ND.data_ptr(), idx_NK.data_ptr(), w_NK.data_ptr(), N, idx_NK.shape[1], E,
                        w_gate_up.data_ptr(), w_down.data_ptr(), y.data_ptr(), D, F2 // 2, torch.get_num_threads())
    if rc:
        if rc == -1:
            raise IndexError(f"expert index out of range for {E} experts")
        raise MemoryError("moe kernel: out of memory")
    return y
