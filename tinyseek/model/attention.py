"""Attention: MLA (DeepSeek-V2/V3 multi-head latent attention) and GQA, both with RoPE, an optional
sliding window, and the per-row KV cache of :mod:`tinyseek.model.cache`.

Deviations from the DeepSeek-V3 reference, on purpose:
- MLA caches the normalised latent ``c_kv`` and the roped shared key ``k_pe`` (one buffer). A forward
  without a cache, or a prefill that fills a fresh one, expands per-head keys and values with
  ``kv_b_proj`` ("naive"). Decode steps (queries that continue a cached sequence) use the absorbed
  form (``MLA._absorbed``): ``kv_b_proj`` is folded into the query and the output and attention
  runs over the latent itself, so a step no longer re-expands the whole cache (that made the step
  cost grow with batch x length). Without grad, with plain Linear or quantized (``dequant``) weights,
  the folding is done once on the (dequantised) weights (``MLA._absorbed_folded``: two GEMMs a
  layer instead of five), refreshed when a weight changes. ``MLA.impl`` = "auto" | "naive" |
  "absorbed" selects; the forms agree up to float rounding (tests compare them). The cache stays the
  latent (the whole point of MLA). The latent attention itself (scores, softmax, weighted sum over
  each row's visible keys) has one seam: ``MLA._latent_attention`` is the PyTorch reference, and
  where the module's variant is the C one (chosen at build/move, :meth:`MLA.select_variant`) and
  no gradient is recorded, one C call (:mod:`tinyseek.kernels.attn`) does it.
- Softmax scale 1/sqrt(qk_nope + qk_rope), times YaRN's ``mscale(factor, mscale_all_dim)^2`` where the
  config scales RoPE that way (``layers.mla_softmax_mscale``, as DeepSeek-V3 and HF do); the RoPE table
  itself carries YaRN's cos/sin factor (``layers.Rotary``).

GQA has the options of the Llama family: biases on q/k/v (``qkv_bias``, Qwen2) and on the output
(``o_bias``), and a per-head RMSNorm of queries and keys before RoPE (``qk_norm``, Qwen3). MLA has none
of them (the absorbed/folded decode forms assume bias-free projections).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from tinyseek.kernels import attn as attn_kernel
from tinyseek.model.cache import write_rows
from tinyseek.model.layers import KernelSeam, Linear, RMSNorm, apply_rope, linear_or_f, mla_softmax_mscale


def attention_mask(pos_BT: torch.Tensor, key_len: int, window: int) -> torch.Tensor:
    """Boolean mask (B, 1, T, L): query at absolute position p sees keys j with p-window < j <= p.

    >>> attention_mask(torch.tensor([[0, 1, 2]]), 3, 0).int().squeeze().tolist()
    [[1, 0, 0], [1, 1, 0], [1, 1, 1]]
    >>> attention_mask(torch.tensor([[0, 1, 2]]), 3, 2).int().squeeze().tolist()
    [[1, 0, 0], [1, 1, 0], [0, 1, 1]]
    """
    return _visible(pos_BT, key_len, window).unsqueeze(1)


def _visible(pos_BT: torch.Tensor, key_len: int, window: int) -> torch.Tensor:
    """(B, T, L): whether the query at absolute position p sees key j (p - window < j <= p)."""
    j = torch.arange(key_len, device=pos_BT.device)
    p = pos_BT.unsqueeze(-1)  # (B, T, 1)
    m = j <= p
    if window > 0:
        m = m & (j > p - window)
    return m


def attention_bias(pos_BT: torch.Tensor, key_len: int, window: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive form of :func:`attention_mask` without the head axis: (B, T, L), 0 or -inf.

    >>> attention_bias(torch.tensor([[1]]), 3, 0, torch.float32).tolist()
    [[[0.0, 0.0, -inf]]]
    """
    seen = _visible(pos_BT, key_len, window)
    return torch.full(seen.shape, float("-inf"), dtype=dtype, device=pos_BT.device).masked_fill_(seen, 0.0)


def _sdpa(q, k, v, pos_BT, key_len, window, cached, scale, gqa=False):
    if not cached and window == 0:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    mask = attention_mask(pos_BT, key_len, window)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=gqa)


class MLA(KernelSeam, nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.window = cfg.sliding_window
        qk = self.nope + self.rope
        if cfg.q_lora_rank > 0:
            self.q_a_proj = Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.mla_latent_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * qk, bias=False)
        else:
            self.q_proj = Linear(cfg.d_model, self.n_heads * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(cfg.d_model, self.kv_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_rank, cfg.mla_latent_eps)
        self.kv_b_proj = Linear(self.kv_rank, self.n_heads * (self.nope + self.vdim), bias=False)
        self.o_proj = Linear(self.n_heads * self.vdim, cfg.d_model, bias=False)
        m = mla_softmax_mscale(cfg)
        self.scale = qk ** -0.5 * m * m  # m = 1 unless YaRN with mscale_all_dim (HF's order of products)
        # cached forward: "auto" (absorbed for decode steps, naive for a fresh prefill), "naive", "absorbed"
        self.impl = "auto"
        self._folded = None  # (source weight versions, folded decode weights): see _folded_weights
        self.init_seam()

    # --- the latent-attention seam: C kernel or PyTorch reference, chosen once ------------------
    def select_variant(self) -> None:
        """The latent attention runs the C kernel (:mod:`tinyseek.kernels.attn`) where this module
        computes in CPU fp32 (its latent norm's weight is CPU fp32: quantized projections keep it)."""
        w = self.kv_a_layernorm.weight
        self.use_kernel = w.dtype is torch.float32 and w.device.type == "cpu"

    def _kernel_lib(self, x: torch.Tensor):
        """The loaded latent-attention kernels when the variant is the C one, no gradient is to be
        recorded for ``x`` and the kernels are on and built (the switch stays live for A/B runs);
        else None (the reference)."""
        if not self.use_kernel or (torch.is_grad_enabled() and x.requires_grad):
            return None
        return attn_kernel.KERNELS.ready()

    def forward(self, x_BTD, cos, sin, pos_BT, cache_layer=None, key_len=None):
        B, T, _ = x_BTD.shape
        lib = self._kernel_lib(x_BTD) if cache_layer is not None else None
        absorbed = cache_layer is not None and _use_absorbed(
            self.impl, T, key_len, self.kv_b_proj, short_prefill=T <= SHORT_PREFILL and lib is not None)
        if absorbed and not torch.is_grad_enabled():
            folded = self._folded_weights(x_BTD.dtype)
            if folded is not None:
                return self._absorbed_folded(x_BTD, folded, cos, sin, pos_BT, cache_layer["latent"], key_len, lib)
        if hasattr(self, "q_proj"):
            q = self.q_proj(x_BTD)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x_BTD)))
        q_BTHK = q.view(B, T, self.n_heads, self.nope + self.rope)
        ckv, k_pe = self.kv_a_proj_with_mqa(x_BTD).split([self.kv_rank, self.rope], dim=-1)
        ckv_BTC = self.kv_a_layernorm(ckv)
        if absorbed:
            return self._absorbed(q_BTHK, ckv_BTC, k_pe, cos, sin, pos_BT, cache_layer["latent"], key_len, lib)
        kpe_BTR = apply_rope(k_pe.unsqueeze(1), cos, sin).squeeze(1)
        if cache_layer is not None:
            lat = cache_layer["latent"]  # (B, L, C + R): [c_kv | k_pe]
            write_rows(lat, torch.cat([ckv_BTC, kpe_BTR], dim=-1), pos_BT, 1)
            ckv_BTC, kpe_BTR = lat[:, :key_len].to(x_BTD.dtype).split([self.kv_rank, self.rope], dim=-1)
        return self._expanded(q_BTHK, ckv_BTC, kpe_BTR, cos, sin, pos_BT, cache_layer is not None)

    def _expanded(self, q_BTHK, ckv_BLC, kpe_BLR, cos, sin, pos_BT, cached):
        """Naive MLA: expand per-head keys and values from the latent with ``kv_b_proj``."""
        B, T, H, _ = q_BTHK.shape
        q_nope, q_pe = q_BTHK.transpose(1, 2).split([self.nope, self.rope], dim=-1)
        q_pe = apply_rope(q_pe, cos, sin)
        L = ckv_BLC.shape[1]
        kv = self.kv_b_proj(ckv_BLC).view(B, L, H, self.nope + self.vdim).transpose(1, 2)
        k_nope, v_BHLK = kv.split([self.nope, self.vdim], dim=-1)
        k_BHLK = torch.cat([k_nope, kpe_BLR.unsqueeze(1).expand(B, H, L, self.rope)], dim=-1)
        q_BHTK = torch.cat([q_nope, q_pe], dim=-1)
        o = _sdpa(q_BHTK, k_BHLK, v_BHLK, pos_BT, L, self.window, cached, self.scale)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, H * self.vdim))

    def _absorbed(self, q_BTHK, ckv_BTC, k_pe_BTR, cos, sin, pos_BT, lat, key_len, lib=None):
        """Absorbed MLA over the cached latent ``[c_kv | k_pe]`` (X = C + R wide), never re-expanded.

        Score of head h: ``q_nope . (W_uk[h] c) + q_pe . k_pe = [q_nope W_uk[h] | q_pe] . [c | k_pe]``,
        and its output ``W_uv[h] (sum_j p_j c_j)``. So the key half of ``kv_b_proj`` is applied to
        the query, the value half to the attention output, and attention itself is one head shared
        by all H heads (:meth:`_latent_attention`). Per step this costs O(B * L * H * X) instead of
        re-expanding O(B * L * C * H * (nope + v)) every step."""
        B, T, H, _ = q_BTHK.shape
        N = B * T
        w = _linear_weight(self.kv_b_proj, q_BTHK.dtype).view(H, self.nope + self.vdim, self.kv_rank)
        q_HNC = torch.bmm(q_BTHK[..., :self.nope].reshape(N, H, self.nope).transpose(0, 1), w[:, :self.nope])
        # rope the queries' rope parts and the new key's together: (B, T, H + 1, R)
        pe = apply_rope(torch.cat([q_BTHK[..., self.nope:], k_pe_BTR.unsqueeze(2)], dim=2),
                        cos.transpose(1, 2), sin.transpose(1, 2))
        o_NHC = self._latent_attention(q_HNC.transpose(0, 1), pe, ckv_BTC, pos_BT, lat, key_len, lib)
        o_HNV = torch.bmm(o_NHC.transpose(0, 1), w[:, self.nope:].transpose(1, 2))
        return self.o_proj(o_HNV.transpose(0, 1).reshape(B, T, H * self.vdim))

    def _absorbed_folded(self, x_BTD, folded, cos, sin, pos_BT, lat, key_len, lib=None):
        """:meth:`_absorbed` with the weights folded once (:meth:`_folded_weights`): one GEMM gives
        the latent queries, the new latent, the rope parts and their ``rotate_half`` (so RoPE is
        ``pe * cos + pe_rot * sin``); one GEMM maps the attended latent to the model width (``W_o``
        after ``W_uv``). Five GEMM calls a layer become two, and RoPE three elementwise ops."""
        B, T, _ = x_BTD.shape
        q_lat, ckv, pe = self._folded_in(x_BTD, folded, cos, sin)
        o_NHC = self._latent_attention(q_lat.reshape(B * T, self.n_heads, self.kv_rank), pe, ckv, pos_BT, lat, key_len,
                                       lib)
        return linear_or_f(o_NHC.reshape(B, T, -1), folded[2])

    def _folded_in(self, x_BTD, folded, cos, sin):
        """The folded input GEMM(s) of :meth:`_absorbed_folded`: (latent queries (B, T, H*C), the new
        normalised latent (B, T, C), the roped rope parts of the H queries and the key (B, T, H+1, R))."""
        B, T, _ = x_BTD.shape
        H, C, R = self.n_heads, self.kv_rank, self.rope
        w_in, w_qb, _ = folded
        y = linear_or_f(x_BTD, w_in)  # the C kernel where it applies, else F.linear
        if w_qb is None:  # [q_lat (H*C) | c_kv (C) | pe (H+1)*R | rotate_half(pe) (H+1)*R]
            q_lat, ckv, pe, pe_rot = y.split([H * C, C, (H + 1) * R, (H + 1) * R], dim=-1)
        else:  # [q_a | c_kv | k_pe | rotate_half(k_pe)], then q_b: [q_lat | q_pe | rotate_half(q_pe)]
            qa, ckv, k_pe, k_rot = y.split([w_qb.shape[1], C, R, R], dim=-1)
            q_lat, q_pe, q_rot = linear_or_f(self.q_a_layernorm(qa), w_qb).split([H * C, H * R, H * R], dim=-1)
            pe, pe_rot = torch.cat([q_pe, k_pe], dim=-1), torch.cat([q_rot, k_rot], dim=-1)
        pe = pe.view(B, T, H + 1, R) * cos.transpose(1, 2) + pe_rot.view(B, T, H + 1, R) * sin.transpose(1, 2)
        return q_lat, self.kv_a_layernorm(ckv), pe

    def can_ragged(self, x: torch.Tensor) -> bool:
        """Whether :meth:`forward_ragged` runs for layer input ``x``: not forced to the naive form, no
        gradient, the weights fold (plain or quantized Linear projections) and the latent-attention
        kernel runs."""
        return (self.impl != "naive" and x.dtype is torch.float32 and x.is_cpu and self._kernel_lib(x) is not None
                and self._folded_weights(x.dtype) is not None)

    def forward_ragged(self, x_1ND, cos, sin, rows_N, pos_N, lat):
        """Absorbed MLA for a ragged batch of N tokens, token n at position ``pos_N[n]`` of cache row
        ``rows_N[n]`` (decode tokens of busy rows and whole prompts of new ones in ONE forward, see
        :meth:`tinyseek.model.transformer.Transformer.forward_ragged`): writes the new latents
        into ``lat`` (S, L, C + R), then each token attends over its row up to its own position
        (so a prompt is causal within itself). Only where :meth:`can_ragged` holds (no PyTorch
        path: the engine uses separate prefill and decode forwards otherwise)."""
        N = x_1ND.shape[1]
        folded = self._folded_weights(x_1ND.dtype)
        q_lat, ckv, pe = self._folded_in(x_1ND, folded, cos, sin)
        lat[rows_N, pos_N] = torch.cat([ckv[0], pe[0, :, self.n_heads]], dim=-1).to(lat.dtype)
        o_NHC = attn_kernel.latent_attention_rows(q_lat.reshape(N, self.n_heads, self.kv_rank), pe[0], lat,
                                                  rows_N, pos_N, self.window, self.scale)
        if o_NHC is None:
            raise RuntimeError("MLA.forward_ragged needs the latent-attention kernel (check can_ragged first)")
        return linear_or_f(o_NHC.reshape(1, N, -1), folded[2])

    def _latent_attention(self, q_NHC, pe_BTJR, ckv_BTC, pos_BT, lat, key_len, lib=None):
        """Cache write and one-head attention over the latent cache: the N = B*T tokens' H queries
        ``[q_lat | q_pe]`` are rows of a (B, T*H, X) batch against the cache (B, L, X). ``pe_BTJR``:
        the roped rope parts of the H queries and (last, J = H + 1) of the new key. Returns the
        attended latent (N, H, C). The PyTorch reference below; with ``lib`` (the variant chosen by
        :meth:`_kernel_lib`) the C kernel, where it takes these inputs (CPU fp32, a known layout)."""
        B, T, J, R = pe_BTJR.shape
        H, C, X = J - 1, self.kv_rank, self.kv_rank + self.rope
        write_rows(lat, torch.cat([ckv_BTC, pe_BTJR[:, :, H]], dim=-1), pos_BT, 1)
        if lib is not None:
            o_NHC = attn_kernel.latent_attention(q_NHC, pe_BTJR, lat, pos_BT, key_len, self.window, self.scale, lib)
            if o_NHC is not None:
                return o_NHC
        lat_BLX = lat[:, :key_len]
        if lat_BLX.dtype != q_NHC.dtype:
            lat_BLX = lat_BLX.to(q_NHC.dtype)
        q_BQX = torch.cat([q_NHC, pe_BTJR[:, :, :H].reshape(B * T, H, R)], dim=-1).view(B, T * H, X)
        bias = attention_bias(pos_BT, lat_BLX.shape[1], self.window, q_BQX.dtype)  # (B, T, L)
        if T > 1:
            bias = bias.repeat_interleave(H, dim=1)                              # (B, T*H, L)
        s_BQL = torch.baddbmm(bias, q_BQX, lat_BLX.transpose(1, 2), alpha=self.scale)
        p_BQL = s_BQL.softmax(-1) if s_BQL.dtype == torch.float32 else s_BQL.float().softmax(-1).to(s_BQL.dtype)
        return torch.bmm(p_BQL, lat_BLX).view(B * T, H, X)[..., :C]

    def _folded_weights(self, dtype: torch.dtype):
        """``(w_in, w_qb, w_out)`` for :meth:`_absorbed_folded`, or None where a projection is not a
        plain ``nn.Linear`` or quantized stand-in (see :func:`_source_tensors`) or a weight is an
        inference tensor (no version counter). Quantized projections fold their dequantised float
        weights: the folded matrices are float (a decode-time cache, not stored in checkpoints).

        ``w_in`` stacks [per head ``W_uk[h]^T W_q_nope[h]`` | ``W_ckv`` | ``W_q_pe``, ``W_k_pe`` | the
        same rows rotated by ``rotate_half``] (no q LoRA), or [``W_q_a`` | ``W_ckv`` | ``W_k_pe`` | its
        rotation] with ``w_qb`` the folded ``q_b_proj`` [latent | rope | rotated rope]; ``w_out[:, h]
        = W_o[:, h] W_uv[h]``. Folded in fp32 once and kept until a source weight changes (its
        storage or version: an optimizer step or a load bumps it), so GRPO's updates are seen. A
        write through ``weight.data`` bypasses the version counter: reset ``_folded = None`` then."""
        lora = not hasattr(self, "q_proj")
        mods = [self.q_b_proj if lora else self.q_proj, self.kv_a_proj_with_mqa, self.kv_b_proj, self.o_proj]
        if lora:
            mods.append(self.q_a_proj)
        srcs = [_source_tensors(m) for m in mods]
        if any(t is None for t in srcs) or any(t.is_inference() for ts in srcs for t in ts):
            return None
        key = (dtype,) + tuple((t.data_ptr(), t._version) for ts in srcs for t in ts)
        if self._folded is not None and self._folded[0] == key:
            return self._folded[1]
        H, C, R, nope = self.n_heads, self.kv_rank, self.rope, self.nope
        with torch.no_grad():
            wq = _linear_weight(mods[0], torch.float32).view(H, nope + R, -1)      # (H, nope + R, Din)
            wkv = _linear_weight(self.kv_b_proj, torch.float32).view(H, nope + self.vdim, C)
            wq_lat = torch.einsum("hnc,hnd->hcd", wkv[:, :nope], wq[:, :nope]).reshape(H * C, -1)
            wq_pe = wq[:, nope:].reshape(H * R, -1)
            w_kva = _linear_weight(self.kv_a_proj_with_mqa, torch.float32)
            w_ckv, w_kpe = w_kva[:C], w_kva[C:]
            if lora:
                w_in = torch.cat([_linear_weight(self.q_a_proj, torch.float32), w_ckv, w_kpe,
                                  _rotate_half_rows(w_kpe, R)])
                w_qb = torch.cat([wq_lat, wq_pe, _rotate_half_rows(wq_pe, R)])
            else:
                pe = torch.cat([wq_pe, w_kpe])
                w_in, w_qb = torch.cat([wq_lat, w_ckv, pe, _rotate_half_rows(pe, R)]), None
            wo = _linear_weight(self.o_proj, torch.float32).view(-1, H, self.vdim)
            w_out = torch.einsum("dhv,hvc->dhc", wo, wkv[:, nope:]).reshape(wo.shape[0], H * C)
            folded = tuple(None if w is None else w.to(dtype).contiguous() for w in (w_in, w_qb, w_out))
        self._folded = (key, folded)
        return folded


def _rotate_half_rows(w_MD: torch.Tensor, R: int) -> torch.Tensor:
    """Rows of a weight whose outputs come in RoPE groups of R, rearranged so that ``x @ W'.T ==
    rotate_half(x @ W.T)`` per group (``rotate_half([a, b]) = [-b, a]``).

    >>> from tinyseek.model.layers import rotate_half
    >>> w = torch.randn(8, 3); x = torch.randn(2, 3)
    >>> torch.allclose(x @ _rotate_half_rows(w, 4).T, rotate_half((x @ w.T).view(2, 2, 4)).view(2, 8))
    True
    """
    g = w_MD.view(-1, 2, R // 2, w_MD.shape[-1])
    return torch.stack([-g[:, 1], g[:, 0]], dim=1).reshape(w_MD.shape)


SHORT_PREFILL = 64  # prompts up to this long prefill in the absorbed form when the fused kernel runs


def _use_absorbed(impl: str, T: int, key_len: int, kv_b_proj: nn.Module, short_prefill: bool = False) -> bool:
    """``auto``: absorbed when the queries continue a cached sequence (decode steps, chunks), naive
    for a prefill that fills a fresh cache (there, expanding the T keys once is the cheaper order in
    FLOPs), except a short prefill (``short_prefill``: at most ``SHORT_PREFILL`` tokens, the fused
    latent-attention kernel runs): fewer, fused ops win there (benchmarks/README.md, "Kernel
    timings"; at DeepSeek-V3 widths the absorbed form of a 64-token prefill costs ~20% more FLOPs).
    A ``kv_b_proj`` without a readable weight (not a Linear or quantized Linear) stays naive."""
    if impl == "naive" or (impl == "auto" and T >= key_len and not short_prefill):
        return False
    return isinstance(kv_b_proj, nn.Linear) or hasattr(kv_b_proj, "dequant")


def _source_tensors(mod: nn.Module) -> tuple[torch.Tensor, ...] | None:
    """The tensors a projection's weight is made of (its folded form is rebuilt when one changes):
    ``(weight,)`` of a plain ``nn.Linear``, the codes/scales of a quantized stand-in (``dequant``),
    None for anything else (not folded)."""
    if type(mod) in (nn.Linear, Linear):
        return (mod.weight,)
    if hasattr(mod, "dequant"):
        return tuple(b for b in mod.buffers(recurse=False) if b is not None)
    return None


def _linear_weight(mod: nn.Module, dtype: torch.dtype) -> torch.Tensor:
    """The ``(out, in)`` float weight of an ``nn.Linear`` or a quantized stand-in (``dequant``)."""
    if isinstance(mod, nn.Linear):
        return mod.weight if mod.weight.dtype == dtype else mod.weight.to(dtype)
    return mod.dequant(dtype)


class GQA(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, cfg.n_kv_heads
        self.hd = cfg.gqa_head_dim
        self.window = cfg.sliding_window
        self.q_proj = Linear(cfg.d_model, self.n_heads * self.hd, bias=cfg.qkv_bias)
        self.k_proj = Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.v_proj = Linear(cfg.d_model, self.n_kv * self.hd, bias=cfg.qkv_bias)
        self.o_proj = Linear(self.n_heads * self.hd, cfg.d_model, bias=cfg.o_bias)
        if cfg.qk_norm:  # Qwen3: RMSNorm over each head's width, before RoPE
            self.q_norm = RMSNorm(self.hd, cfg.norm_eps)
            self.k_norm = RMSNorm(self.hd, cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x_BTD, cos, sin, pos_BT, cache_layer=None, key_len=None):
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD).view(B, T, self.n_heads, self.hd)
        k = self.k_proj(x_BTD).view(B, T, self.n_kv, self.hd)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = self.v_proj(x_BTD).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache_layer is not None:
            write_rows(cache_layer["k"], k, pos_BT, 2)
            write_rows(cache_layer["v"], v, pos_BT, 2)
            k = cache_layer["k"][:, :, :key_len].to(x_BTD.dtype)
            v = cache_layer["v"][:, :, :key_len].to(x_BTD.dtype)
        o = _sdpa(q, k, v, pos_BT, k.shape[2], self.window, cache_layer is not None, self.hd ** -0.5,
                  gqa=self.n_kv != self.n_heads)
        return self.o_proj(o.transpose(1, 2).reshape(B, T, self.n_heads * self.hd))


def build_attention(cfg) -> nn.Module:
    return MLA(cfg) if cfg.attn == "mla" else GQA(cfg)
