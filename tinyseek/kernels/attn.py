"""Fused fp32 CPU kernel for the latent attention core of absorbed MLA decoding: the C variant of
:meth:`tinyseek.model.attention.MLA._latent_attention` (its PyTorch reference).

Absorbed MLA attends the H latent queries of each new token over the row's cached latent
``[c_kv | k_pe]`` (X = C + R floats a position, shared by all heads). The reference builds an
additive mask, concatenates the query parts, then runs ``baddbmm``, ``softmax`` and ``bmm`` and
slices the value half. ``ts_latent_attn`` (``attn.c``) does it in one call, per row ``b`` and query
token ``t``, for all H heads together (so each cache row is read once per token):

- the visible keys are one range ``lo <= j < hi`` (``hi = min(pos + 1, key_len)``, ``lo = pos -
  window + 1`` with a sliding window, else 0): no mask is built;
- ``s[h, j] = (scale * q[h]) . lat[j]`` over X (the scale folded into the query copy);
- ``p = softmax(s)`` per head, the max subtracted; ``exp`` is a Cephes-style polynomial
  (relative error ~3e-7);
- ``out[h] = sum_j p[h, j] * lat[j, :C]``, written contiguous ``(N, H, C)``.

AVX-512 intrinsics where the CPU has them (masked tails: any C and R), compiler-vectorised loops
otherwise (``TS_PORTABLE`` forces those; for tests). Large calls (``N * H * key_len * X`` above ~1M
multiply-adds, ``torch.get_num_threads() > 1``) split the tokens over OpenMP threads.

Guarantees: the result equals the reference up to float summation order (tested), and a token's
result does not depend on the other tokens of the call. The functions return None where their
inputs are not CPU fp32 tensors in a cache layout they know, or a gradient is to be recorded, and
the caller runs the reference; whether to try at all (the module's variant, the switch
``TINYSEEK_ATTN_KERNELS=0`` / ``KERNELS.enable(False)``, a failed build: one printed line) is the
caller's seam. The cache may be a view of the first B rows of a bigger one (its row stride is
passed). Timings: benchmarks/README.md, "Kernel timings".

Departs from the reference: a query that sees no key at all (impossible in valid use: a token
always sees itself) gets a zero output here, where the reference's softmax over an all ``-inf``
row gives NaN.
"""
from __future__ import annotations

import torch

from tinyseek.kernels import loader
from tinyseek.kernels.loader import F32, I64, INT, P

KERNELS = loader.Kernels("_tinyseek_attn", loader.source("attn.c"),
                         {"ts_latent_attn": ([P, I64, I64, P, I64, I64, I64, P, I64, I64, P, P, I64, I64, I64, I64, I64,
                                              I64, I64, F32, INT, P], INT)},
                         "TINYSEEK_ATTN_KERNELS", "tinyseek.kernels.attn")


def latent_attention(q_NHC: torch.Tensor, pe_BTJR: torch.Tensor, lat: torch.Tensor, pos_BT: torch.Tensor,
                     key_len: int, window: int, scale: float, lib=None) -> torch.Tensor | None:
    """The attended latent ``(N, H, C)`` (contiguous) of :meth:`MLA._latent_attention` in one kernel
    call, or None when the kernel does not apply (see the module docstring) and the caller runs the
    reference. ``q_NHC``: latent query parts of the N = B*T tokens; ``pe_BTJR``: roped rope parts
    of the H queries (and, last, of the new key, unused here); ``lat``: the latent cache (B, L_max,
    C + R), already holding the new tokens; ``lib``: a loaded kernel library to use instead of
    :data:`KERNELS` (tests compare builds)."""
    # kept lean (each tensor attribute costs ~0.1 us; this runs once per layer per decode step)
    if not _inputs_fit(q_NHC, pe_BTJR, lat, pos_BT):
        return None
    B, T, J, R = pe_BTJR.shape
    N, H, C = q_NHC.shape
    ls = lat.stride()
    if (J != H + 1 or N != B * T or len(ls) != 3 or ls[2] != 1 or lat.shape[0] != B or lat.shape[2] != C + R
            or not 0 < key_len <= lat.shape[1] or pos_BT.shape != (B, T)):
        return None  # not a cache layout we know: the reference
    if lib is None:
        lib = KERNELS.ready()
        if lib is None:
            return None
    qs, ps = q_NHC.stride(), pe_BTJR.stride()
    if qs[2] != 1:
        q_NHC = q_NHC.contiguous()
        qs = q_NHC.stride()
    if ps[3] != 1:
        pe_BTJR = pe_BTJR.contiguous()
        ps = pe_BTJR.stride()
    if pos_BT.dtype is not torch.int64 or not pos_BT.is_contiguous():
        pos_BT = pos_BT.to(torch.int64).contiguous()
    out = torch.empty(N, H, C, dtype=torch.float32)
    _check(lib.ts_latent_attn(q_NHC.data_ptr(), qs[0], qs[1], pe_BTJR.data_ptr(), ps[0], ps[1], ps[2], lat.data_ptr(),
                              ls[0], ls[1], pos_BT.data_ptr(), out.data_ptr(), B, T, H, C, R, key_len, window,
                              scale, torch.get_num_threads(), 0))
    return out


def _inputs_fit(q: torch.Tensor, pe: torch.Tensor, lat: torch.Tensor, pos: torch.Tensor) -> bool:
    """CPU fp32 query / rope / cache tensors, CPU positions, no gradient to record."""
    f32 = torch.float32
    if not (q.dtype is f32 and pe.dtype is f32 and lat.dtype is f32 and q.is_cpu and lat.is_cpu and pe.is_cpu
            and pos.is_cpu):
        return False
    return not (torch.is_grad_enabled() and (q.requires_grad or pe.requires_grad or lat.requires_grad))


def _check(rc: int) -> None:
    if rc != 0:
        raise MemoryError("latent attention kernel: out of memory for its scratch buffer")


def latent_attention_rows(q_NHC: torch.Tensor, pe_NJR: torch.Tensor, lat: torch.Tensor, rows_N: torch.Tensor,
                          pos_N: torch.Tensor, window: int, scale: float, lib=None) -> torch.Tensor | None:
    """:func:`latent_attention` for a ragged batch: query token n belongs to cache row ``rows_N[n]`` at
    position ``pos_N[n]`` and sees that row's keys up to its own position (the cache already holds
    the new tokens). Used by :meth:`tinyseek.model.transformer.Transformer.forward_ragged` (decode
    rows and new prompts in one forward). ``pe_NJR``: roped rope parts (N, H + 1, R). None where
    the kernel does not apply (the caller has no reference for this form: it asks
    :meth:`tinyseek.model.attention.MLA.can_ragged` first)."""
    if not _inputs_fit(q_NHC, pe_NJR, lat, pos_N):
        return None
    N, H, C = q_NHC.shape
    ls = lat.stride()
    if (pe_NJR.shape[:2] != (N, H + 1) or len(ls) != 3 or ls[2] != 1 or lat.shape[2] != C + pe_NJR.shape[2]
            or rows_N.shape != (N,) or pos_N.shape != (N,)):
        return None
    if lib is None:
        lib = KERNELS.ready()
        if lib is None:
            return None
    q_NHC, pe_NJR = q_NHC.contiguous(), pe_NJR.contiguous()
    rows_N = rows_N.to(torch.int64).contiguous()
    pos_N = pos_N.to(torch.int64).contiguous()
    qs, ps = q_NHC.stride(), pe_NJR.stride()
    out = torch.empty(N, H, C, dtype=torch.float32)
    _check(lib.ts_latent_attn(q_NHC.data_ptr(), qs[0], qs[1], pe_NJR.data_ptr(), 0, ps[0], ps[1], lat.data_ptr(),
                              ls[0], ls[1], pos_N.data_ptr(), out.data_ptr(), 1, N, H, C, pe_NJR.shape[2],
                              lat.shape[1], window, scale, torch.get_num_threads(), rows_N.data_ptr()))
    return out
