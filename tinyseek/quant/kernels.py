"""Optional fused CPU kernels for the decode case (a few rows times a quantized weight).

The PyTorch-op path of :class:`tinyseek.quant.modules.QuantLinear` converts the whole int8/int4
weight to float on every call before the GEMM; at decode (one row per sequence) that conversion
costs more than the matmul itself. These kernels read the integer codes directly, convert in
registers and accumulate in fp32 (``y[m, n] = sum_g s[n, g] * sum_{k in g} x[m, k] * q[n, k]``),
parallel over output rows; they are compiled once with ``torch.utils.cpp_extension.load_inline``
(``-O3 -march=native``, cached in the torch extensions dir).

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

// x (M, K) fp32, q (N, K) int8, s (N) fp32 -> (M, N)
torch::Tensor int8_mm(torch::Tensor x, torch::Tensor q, torch::Tensor s) {
  const int64_t M = x.size(0), K = x.size(1), N = q.size(0);
  auto y = torch::empty({M, N}, x.options());
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

// x (M, K) fp32, p (N, ceil(K/2)) uint8 nibbles (code + 8, low nibble = even column),
// s (N, G) fp32, group size gs -> (M, N)
torch::Tensor int4_mm(torch::Tensor x, torch::Tensor p, torch::Tensor s, int64_t gs) {
  const int64_t M = x.size(0), K = x.size(1), N = p.size(0), H = p.size(1), G = s.size(1);
  auto y = torch::empty({M, N}, x.options());
  const float* xp = x.data_ptr<float>();
  const uint8_t* pp = p.data_ptr<uint8_t>();
  const float* sp = s.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* row = pp + n * H;
      for (int64_t m = 0; m < M; ++m) {
        const float* xr = xp + m * K;
        float total = 0.f;
        for (int64_t g = 0; g < G; ++g) {
          const int64_t k0 = g * gs, k1 = std::min(K, k0 + gs);
          float acc = 0.f;
          const int64_t half = (k1 - k0) / 2;
          const uint8_t* b = row + k0 / 2;
          const float* xg = xr + k0;
          #pragma omp simd reduction(+:acc)
          for (int64_t j = 0; j < half; ++j) {
            const int lo = (int)(b[j] & 0x0F) - 8, hi = (int)(b[j] >> 4) - 8;
            acc += xg[2 * j] * (float)lo + xg[2 * j + 1] * (float)hi;
          }
          if ((k1 - k0) % 2) acc += xg[k1 - k0 - 1] * (float)((int)(b[half] & 0x0F) - 8);
          total += acc * sp[n * G + g];
        }
        yp[m * N + n] = total;
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
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
            except Exception as e:  # no compiler / headers: the PyTorch-op path is used
                _state["failed"] = True
                print(f"tinyseek.quant.kernels: build failed, using the PyTorch path ({type(e).__name__})")
    return _state["module"]


def quant_mm(x_MK: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int):
    """``x @ W_hat^T`` with a fused kernel, or None when not enabled / not applicable."""
    if not _state["enabled"] or x_MK.device.type != "cpu" or x_MK.dtype != torch.float32 \
            or x_MK.shape[0] > MAX_ROWS or torch.is_grad_enabled() and x_MK.requires_grad:
        return None
    mod = _module()
    if mod is None:
        return None
    x = x_MK.contiguous()
    if bits == 8:
        return mod.int8_mm(x, qweight, scale.reshape(-1).float().contiguous())
    return mod.int4_mm(x, qweight, scale.float().contiguous(), group_size if group_size > 0 else x.shape[1])
