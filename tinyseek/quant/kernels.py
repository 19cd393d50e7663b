"""Optional fused CPU kernels for the decode case (a few rows times a quantized weight).

The PyTorch-op path of :class:`tinyseek.quant.modules.QuantLinear` converts the whole int8/int4
weight to float on every call before the GEMM; at decode (one row per sequence) that conversion
costs more than the matmul itself. These kernels read the integer codes directly, convert in
registers and accumulate in fp32 (``y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k]``),
parallel over output rows; they are compiled once with ``torch.utils.cpp_extension.load_inline``
(``-O3 -march=native -ffast-math``: the sums may be reassociated; cached in the torch extensions dir).

Measured here (1 thread, one 8192x4096 matrix times one row, median): fp32 ``F.linear`` 6.0 ms;
fused int8 1.2 ms; fused int4 (group 32 or 128) 5.3-5.5 ms; the PyTorch-op path 81 ms (int8) and
184 ms (int4), since it materialises the float weight. At the cpu-tiny sizes (384x128) the call
overheads dominate: fp32 4 us, fused int8 7 us, fused int4 13 us.

Off by default (the first build takes a minute): :func:`enable` or ``TINYSEEK_QUANT_KERNELS=1``.
When disabled, unavailable (no compiler) or not applicable (CUDA tensors, non-fp32 input, more
than ``MAX_ROWS`` rows) the PyTorch-op path runs; results agree to float rounding (tested).
"""
from __future__ import annotations

import os
import threading

import torch

MAX_ROWS = 8  # above this, dequantise + one BLAS GEMM is faster

_SRC = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <vector>
#if defined(__F16C__)
#include <immintrin.h>
static inline float half_to_float(const at::Half* h) { return _cvtsh_ss(*reinterpret_cast<const uint16_t*>(h)); }
#else
static inline float half_to_float(const at::Half* h) { return (float)*h; }
#endif

// output of x (..., K) times an (N, K) weight: (..., N)
static torch::Tensor out_like(const torch::Tensor& x, int64_t N) {
  auto sizes = x.sizes().vec();
  sizes.back() = N;
  return torch::empty(sizes, x.options());
}

// x (..., K) fp32 contiguous, q (N, K) int8, s (N) or (N, 1) fp32 -> (..., N)
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t K = x.size(-1), M = x.numel() / K, N = q.size(0);
  auto y = out_like(x, N);
  const float* xp = x.data_ptr<float>();
  const int8_t* qp = q.data_ptr<int8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int8_t* row = qp + n * K;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t k = 0; k < K; ++k) acc += xr[k] * (float)row[k];
        yp[m * N + n] = acc * sp[n];
      }
    }
  });
  return y;
}

// x (..., K) fp32 contiguous, p (N, H = ceil(K/2)) uint8 nibbles (code + 8, low nibble = even
// column), s (N, G) fp16 scales, group size gs (even) -> (..., N). x is split once per call into
// its even and odd columns, so byte j of a row meets x_even[j] (low nibble) and x_odd[j] (high
// nibble): one contiguous, vectorisable loop per output, the group scale gathered per byte.
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor s, int64_t gs) {
  const int64_t K = x.size(-1), M = x.numel() / K, N = p.size(0), H = p.size(1), G = s.size(1);
  auto y = out_like(x, N);
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const at::Half* sp = s.data_ptr<at::Half>();
  float* yp = y.data_ptr<float>();
  std::vector<float> xe(M * H, 0.f), xo(M * H, 0.f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) (k % 2 ? xo : xe)[m * H + k / 2] = xp[m * K + k];
  const int64_t hg = gs / 2;  // bytes per group
  int shift = -1;
  if (hg > 0 && (hg & (hg - 1)) == 0) { shift = 0; while ((int64_t(1) << shift) < hg) ++shift; }
  std::vector<int32_t> gidx(H);
  for (int64_t j = 0; j < H; ++j) gidx[j] = (int32_t)std::min<int64_t>(G - 1, shift >= 0 ? (j >> shift) : j / hg);
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    std::vector<float> sf(G);
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = pp + n * H;
      for (int64_t g = 0; g < G; ++g) sf[g] = half_to_float(sp + n * G + g);
      const float* sfp = sf.data();
      const int32_t* gi = gidx.data();
      for (int64_t m = 0; m < M; ++m) {
        const float* e = xe.data() + m * H;
        const float* o = xo.data() + m * H;
        float acc = 0.f;
        #pragma omp simd reduction(+:acc)
        for (int64_t j = 0; j < H; ++j) {
          const int b = row[j];
          acc += (e[j] * (float)((b & 0x0F) - 8) + o[j] * (float)((b >> 4) - 8)) * sfp[gi[j]];
        }
        yp[m * N + n] = acc;
      }
    }
  });
  return y;
}
"""

_lock = threading.Lock()
_state: dict = {"enabled": os.environ.get("TINYSEEK_QUANT_KERNELS", "") == "1", "module": None, "failed": False}


def enable(flag: bool = True) -> bool:
    """Turn the fused kernels on (building them if needed); returns whether they are usable."""
    _state["enabled"] = flag
    return not flag or _module() is not None


def _module():
    if _state["module"] is not None or _state["failed"]:
        return _state["module"]
    with _lock:
        if _state["module"] is None and not _state["failed"]:
            try:
                from torch.utils.cpp_extension import load_inline

                _state["module"] = load_inline(
                    name="tinyseek_quant_kernels", cpp_sources=[_SRC], functions=["int8_mm", "int4_mm"],
                    extra_cflags=["-O3", "-march=native", "-ffast-math", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler / headers: the PyTorch-op path is used
                _state["failed"] = True
                print(f"tinyseek.quant.kernels: build failed, using the PyTorch path ({type(e).__name__})")
    return _state["module"]


def quant_mm(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int):
    """``x @ W_hat^T`` for ``x (..., K)`` with a fused kernel, or None when not enabled / not applicable.

    ``scale`` must be what :func:`tinyseek.quant.modules.quantize_weight` stores (fp32 for int8,
    fp16 for int4), contiguous.
    """
    if not _state["enabled"] or x.device.type != "cpu" or x.dtype != torch.float32 \
            or x.numel() > MAX_ROWS * x.shape[-1] or (x.requires_grad and torch.is_grad_enabled()):
        return None
    mod = _state["module"] or _module()
    if mod is None:
        return None
    if not x.is_contiguous():
        x = x.contiguous()
    if bits == 8:
        return mod.int8_mm(x, qweight, scale)
    return mod.int4_mm(x, qweight, scale, group_size if group_size > 0 else x.shape[-1] + x.shape[-1] % 2)
