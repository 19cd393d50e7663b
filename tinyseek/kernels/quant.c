/* Fused weight-only int8 / int4 CPU kernels for decode (a few rows times a quantized weight), and
   the W8A8 product (ts_w8a8: per-token uint8 activations x int8 weights, int32 accumulation).
   Glue and contract: tinyseek/kernels/quant.py. Built by tinyseek/kernels/loader.py; TS_PORTABLE
   leaves out the AVX-512 paths, TS_PYEXT adds the CPython-extension entry points. Format ids: 8 =
   int8 codes (N, K) with one fp16 scale a row, 4 = packed int4 (N, ceil(K/2)) with fp16 group
   scales (N, G), 9 = W8A8 (int8's layout; each product quantizes its input rows per token,
   ts_w8a8), so ts_swiglu / ts_ffn / ts_moe run W8A8 experts and FFNs in one call too. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

#define PAR_WORK 1048576  /* multiply-adds below which a call stays on one thread */

static inline float h2f(uint16_t h) {
  uint32_t sign = (uint32_t)(h & 0x8000u) << 16, e = (h >> 10) & 0x1Fu, m = h & 0x3FFu, bits;
  float f;
  if (e == 0) {                      /* zero / subnormal: m * 2^-24 */
    f = (float)m * 5.9604644775390625e-8f;
    memcpy(&bits, &f, 4);
    bits |= sign;
  } else if (e == 31) {
    bits = sign | 0x7F800000u | (m << 13);
  } else {
    bits = sign | ((e + 112u) << 23) | (m << 13);
  }
  memcpy(&f, &bits, 4);
  return f;
}

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__F16C__) && !defined(TS_PORTABLE)
#include <immintrin.h>
#define TS_AVX512 1
#endif

/* int8 codes q (N, K), one fp16 scale per row: y (M, N) = x (M, K) @ (q * s)^T.
   Rows go in blocks of 4 (4 independent accumulator chains; a block past N repeats row N-1).
   AVX-512: input rows in tiles of 4, so each 16-code step of the 4 weight rows is widened to floats
   once and used by 4 input rows (16 accumulators); the last M % 4 rows go one at a time. Each output
   is one accumulator over k in order, whatever tile it sits in: the same bits as the row alone. */
static void mm8(const float* x, const int8_t* q, const uint16_t* s, float* y,
                int64_t M, int64_t N, int64_t K, int nt) {
  const int64_t NB = (N + 3) / 4;
  #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t n = 4 * b;
    const int8_t* r[4];
    for (int i = 0; i < 4; ++i) r[i] = q + (n + i < N ? n + i : N - 1) * K;
#ifdef TS_AVX512
    const int64_t K16 = K & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
    float sc[4];
    for (int i = 0; i < 4; ++i) sc[i] = h2f(s[n + i < N ? n + i : N - 1]);
    int64_t m0 = 0;
    for (; m0 + 4 <= M; m0 += 4) {
      const float* xr[4];
      for (int j = 0; j < 4; ++j) xr[j] = x + (m0 + j) * K;
      __m512 a[4][4];
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 4; ++i) a[j][i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = k < K16 ? (__mmask16)0xFFFF : tail;
        __m512 w[4];
        for (int i = 0; i < 4; ++i)
          w[i] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, r[i] + k)));
        for (int j = 0; j < 4; ++j) {
          const __m512 xv = _mm512_maskz_loadu_ps(mk, xr[j] + k);
          for (int i = 0; i < 4; ++i) a[j][i] = _mm512_fmadd_ps(xv, w[i], a[j][i]);
        }
      }
      for (int j = 0; j < 4; ++j)
        for (int i = 0; i < 4 && n + i < N; ++i) y[(m0 + j) * N + n + i] = _mm512_reduce_add_ps(a[j][i]) * sc[i];
    }
    for (; m0 < M; ++m0) {  /* the last M % 4 rows one at a time (no wasted lanes at decode's M = 1) */
      const float* xr = x + m0 * K;
      __m512 a[4];
      for (int i = 0; i < 4; ++i) a[i] = _mm512_setzero_ps();
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mk = k < K16 ? (__mmask16)0xFFFF : tail;
        const __m512 xv = _mm512_maskz_loadu_ps(mk, xr + k);
        for (int i = 0; i < 4; ++i)
          a[i] = _mm512_fmadd_ps(
              xv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mk, r[i] + k))), a[i]);
      }
      for (int i = 0; i < 4 && n + i < N; ++i) y[m0 * N + n + i] = _mm512_reduce_add_ps(a[i]) * sc[i];
    }
#else
    for (int64_t m = 0; m < M; ++m) {
      const float* xr = x + m * K;
      float acc[4];
      float a0 = 0.f, a1 = 0.f, a2 = 0.f, a3 = 0.f;
      #pragma omp simd reduction(+:a0, a1, a2, a3)
      for (int64_t k = 0; k < K; ++k) {
        const float xv = xr[k];
        a0 += xv * (float)r[0][k]; a1 += xv * (float)r[1][k]; a2 += xv * (float)r[2][k]; a3 += xv * (float)r[3][k];
      }
      acc[0] = a0; acc[1] = a1; acc[2] = a2; acc[3] = a3;
      for (int i = 0; i < 4 && n + i < N; ++i) y[m * N + n + i] = acc[i] * h2f(s[n + i]);
    }
#endif
  }
}

/* packed int4 p (N, H = ceil(K/2)): byte j = code(2j) + 8 | (code(2j+1) + 8) << 4; fp16 scales
   (N, G), group size gs (even). x is split once into its even / odd columns (xe, xo: M x H16,
   zero past K), so byte j meets xe[j] (low nibble) and xo[j] (high nibble). AVX-512: 16 bytes a
   step, two rows at a time, each 16-byte step inside one group (gs / 2 is a multiple of 16); input
   rows in tiles of 4 that share each decoded step (the last M % 4 one at a time, the same bits). */
static void mm4(const float* x, const uint8_t* p, const uint16_t* s, float* y,
                int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  const int64_t H = (K + 1) / 2, H16 = (H + 15) & ~(int64_t)15, hg = G == 1 ? H : gs / 2;
  float* xe = (float*)calloc((size_t)(2 * M * H16), sizeof(float));
  float* xo = xe + M * H16;
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k) (k & 1 ? xo : xe)[m * H16 + k / 2] = x[m * K + k];
#ifdef TS_AVX512
  if (G == 1 || hg % 16 == 0) {
    const int64_t Hf = H & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (H - Hf)) - 1u);
    const __m512i low = _mm512_set1_epi32(15), eight = _mm512_set1_epi32(8);
    const int64_t NB = (N + 1) / 2;
    #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
    for (int64_t b = 0; b < NB; ++b) {
      const int64_t n = 2 * b;
      const int two = n + 1 < N;
      const uint8_t* r0 = p + n * H;
      const uint8_t* r1 = two ? r0 + H : r0;
      const uint16_t* s0 = s + n * G;
      const uint16_t* s1 = two ? s0 + G : s0;
      int64_t m = 0;
      for (; m + 4 <= M; m += 4) {  /* 4 input rows share each decoded 16-byte step of the 2 weight rows */
        __m512 a[4][2];
        for (int t = 0; t < 4; ++t) a[t][0] = a[t][1] = _mm512_setzero_ps();
        for (int64_t j = 0; j < H; j += 16) {
          const __mmask16 mk = j < Hf ? (__mmask16)0xFFFF : tail;
          const int64_t g = G == 1 ? 0 : j / hg;
          const __m512i b0 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r0 + j));
          const __m512i b1 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r1 + j));
          const __m512 l0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b0, low), eight));
          const __m512 l1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b1, low), eight));
          const __m512 h0 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b0, 4), eight));
          const __m512 h1 = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b1, 4), eight));
          const __m512 c0 = _mm512_set1_ps(_cvtsh_ss(s0[g])), c1 = _mm512_set1_ps(_cvtsh_ss(s1[g]));
          for (int t = 0; t < 4; ++t) {
            const __m512 ev = _mm512_loadu_ps(xe + (m + t) * H16 + j), ov = _mm512_loadu_ps(xo + (m + t) * H16 + j);
            a[t][0] = _mm512_fmadd_ps(_mm512_fmadd_ps(ov, h0, _mm512_mul_ps(ev, l0)), c0, a[t][0]);
            a[t][1] = _mm512_fmadd_ps(_mm512_fmadd_ps(ov, h1, _mm512_mul_ps(ev, l1)), c1, a[t][1]);
          }
        }
        for (int t = 0; t < 4; ++t) {
          y[(m + t) * N + n] = _mm512_reduce_add_ps(a[t][0]);
          if (two) y[(m + t) * N + n + 1] = _mm512_reduce_add_ps(a[t][1]);
        }
      }
      for (; m < M; ++m) {  /* the last M % 4 rows one at a time; same operations, same bits */
        const float* e = xe + m * H16;
        const float* o = xo + m * H16;
        __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps();
        for (int64_t j = 0; j < H; j += 16) {
          const __mmask16 mk = j < Hf ? (__mmask16)0xFFFF : tail;
          const int64_t g = G == 1 ? 0 : j / hg;
          const __m512 ev = _mm512_loadu_ps(e + j), ov = _mm512_loadu_ps(o + j);
          const __m512i b0 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r0 + j));
          const __m512i b1 = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(mk, r1 + j));
          __m512 t0 = _mm512_mul_ps(ev, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b0, low), eight)));
          __m512 t1 = _mm512_mul_ps(ev, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_and_si512(b1, low), eight)));
          t0 = _mm512_fmadd_ps(ov, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b0, 4), eight)), t0);
          t1 = _mm512_fmadd_ps(ov, _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_srli_epi32(b1, 4), eight)), t1);
          a0 = _mm512_fmadd_ps(t0, _mm512_set1_ps(_cvtsh_ss(s0[g])), a0);
          a1 = _mm512_fmadd_ps(t1, _mm512_set1_ps(_cvtsh_ss(s1[g])), a1);
        }
        y[m * N + n] = _mm512_reduce_add_ps(a0);
        if (two) y[m * N + n + 1] = _mm512_reduce_add_ps(a1);
      }
    }
    free(xe);
    return;
  }
#endif
  /* portable: one vectorisable loop over the bytes of a row, the group scale gathered per byte */
  int32_t* gidx = (int32_t*)malloc((size_t)H * sizeof(int32_t));
  for (int64_t j = 0; j < H; ++j) gidx[j] = (int32_t)(j / hg < G ? j / hg : G - 1);
  #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* row = p + n * H;
    float sf[G];
    for (int64_t g = 0; g < G; ++g) sf[g] = h2f(s[n * G + g]);
    for (int64_t m = 0; m < M; ++m) {
      const float* e = xe + m * H16;
      const float* o = xo + m * H16;
      float acc = 0.f;
      #pragma omp simd reduction(+:acc)
      for (int64_t j = 0; j < H; ++j) {
        const int b = row[j];
        acc += (e[j] * (float)((b & 0x0F) - 8) + o[j] * (float)((b >> 4) - 8)) * sf[gidx[j]];
      }
      y[m * N + n] = acc;
    }
  }
  free(gidx);
  free(xe);
}

void ts_w8a8(const float* x, const int8_t* q, const uint16_t* sw, float* y, int64_t M, int64_t N, int64_t K,
             int nt);

/* format 9 (W8A8): int8's codes and scales, and every product quantizes its input per token */
static void mm(int bits, const float* x, const void* q, const uint16_t* s, float* y,
               int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  if (bits == 9) ts_w8a8(x, (const int8_t*)q, s, y, M, N, K, nt);
  else if (bits == 8) mm8(x, (const int8_t*)q, s, y, M, N, K, nt);
  else mm4(x, (const uint8_t*)q, s, y, M, N, K, G, gs, nt);
}

/* AWQ smoothing: the weight was quantized as W * sm per input column, so the input is divided by
   sm (fp16, length K) first; returns x itself when sm is NULL, else a new buffer (*buf, freed by
   the caller). */
static const float* smooth_input(const float* x, const uint16_t* sm, int64_t M, int64_t K, float** buf) {
  *buf = NULL;
  if (!sm) return x;
  float* xs = (float*)malloc((size_t)(M * K) * sizeof(float));
  for (int64_t k = 0; k < K; ++k) {
    const float d = h2f(sm[k]);
    for (int64_t m = 0; m < M; ++m) xs[m * K + k] = x[m * K + k] / d;
  }
  *buf = xs;
  return xs;
}

void ts_mm(int bits, const float* x, const void* q, const uint16_t* s, const uint16_t* sm, float* y,
           int64_t M, int64_t N, int64_t K, int64_t G, int64_t gs, int nt) {
  float* buf;
  const float* xs = smooth_input(x, sm, M, K, &buf);
  mm(bits, xs, q, s, y, M, N, K, G, gs, nt);
  free(buf);
}

/* SwiGLU expert: h = x @ Wgu^T (M, 2F; rows 0..F-1 gate, F..2F-1 up), a = silu(g) * u,
   y = a @ Wd^T (M, D). Wgu: (2F, D) codes, scales (2F, G1); Wd: (D, F) codes, scales (D, G2);
   smgu / smd: optional AWQ smoothing of each matrix's input (NULL: none). */
void ts_swiglu(int bits, const float* x, const void* qgu, const uint16_t* sgu, const uint16_t* smgu,
               const void* qd, const uint16_t* sd, const uint16_t* smd, float* y, int64_t M, int64_t D,
               int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  float* buf;
  const float* xs = smooth_input(x, smgu, M, D, &buf);
  float* h = (float*)malloc((size_t)(3 * M * F) * sizeof(float));
  float* a = h + 2 * M * F;
  mm(bits, xs, qgu, sgu, h, M, 2 * F, D, G1, gs, nt);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t f = 0; f < F; ++f) {
      const float g = h[m * 2 * F + f], u = h[m * 2 * F + F + f];
      a[m * F + f] = g / (1.f + expf(-g)) * u;
      if (smd) a[m * F + f] /= h2f(smd[f]);
    }
  mm(bits, a, qd, sd, y, M, D, F, G2, gs, nt);
  free(h);
  free(buf);
}

/* Dense SwiGLU FFN from three separate matrices (QuantLinear gate_proj, up_proj: (F, D); down_proj:
   (D, F)): y (M, D) = (silu(x Wg^T) * (x Wu^T)) Wd^T, each matrix with its optional AWQ smoothing. */
void ts_ffn(int bits, const float* x, const void* qg, const uint16_t* sg, const uint16_t* smg, const void* qu,
            const uint16_t* su, const uint16_t* smu, const void* qd, const uint16_t* sd, const uint16_t* smd,
            float* y, int64_t M, int64_t D, int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  float *bg, *bu;
  const float* xg = smooth_input(x, smg, M, D, &bg);
  const float* xu = smooth_input(x, smu, M, D, &bu);
  float* h = (float*)malloc((size_t)(3 * M * F) * sizeof(float));
  float* u = h + M * F;
  float* a = u + M * F;
  mm(bits, xg, qg, sg, h, M, F, D, G1, gs, nt);
  mm(bits, xu, qu, su, u, M, F, D, G1, gs, nt);
  for (int64_t i = 0; i < M * F; ++i) {
    a[i] = h[i] / (1.f + expf(-h[i])) * u[i];
    if (smd) a[i] /= h2f(smd[i % F]);
  }
  mm(bits, a, qd, sd, y, M, D, F, G2, gs, nt);
  free(h);
  free(bu);
  free(bg);
}

/* All routed experts of a MoE layer for a few tokens (decode): y (N, D) with
   y[n] = sum_k w[n, k] * expert_{idx[n, k]}(x[n]); stacked experts as ts_swiglu's matrices, expert e
   at e times the per-expert strides. Returns -1 (y partly written) on an expert outside [0, E). */
int ts_moe(int bits, const float* x, const int64_t* idx, const float* w, int64_t N, int64_t TK, int64_t E,
           const uint8_t* qgu, const uint16_t* sgu, const uint16_t* smgu, const uint8_t* qd, const uint16_t* sd,
           const uint16_t* smd, float* y, int64_t D, int64_t F, int64_t G1, int64_t G2, int64_t gs, int nt) {
  const int64_t rgu = bits != 4 ? D : (D + 1) / 2, rd = bits != 4 ? F : (F + 1) / 2;  /* bytes a row */
  float* t = (float*)malloc((size_t)D * sizeof(float));
  memset(y, 0, (size_t)(N * D) * sizeof(float));
  for (int64_t n = 0; n < N; ++n)
    for (int64_t k = 0; k < TK; ++k) {
      const int64_t e = idx[n * TK + k];
      if (e < 0 || e >= E) {
        free(t);
        return -1;
      }
      ts_swiglu(bits, x + n * D, qgu + e * 2 * F * rgu, sgu + e * 2 * F * G1, smgu ? smgu + e * D : NULL,
                qd + e * D * rd, sd + e * D * G2, smd ? smd + e * F : NULL, t, 1, D, F, G1, G2, gs, nt);
      const float wk = w[n * TK + k];
      float* yr = y + n * D;
      for (int64_t d = 0; d < D; ++d) yr[d] += wk * t[d];
    }
  free(t);
  return 0;
}

/* out (R, K) float rows of a quantized (V, K) matrix: row r is idx[r] (idx may be NULL: r).
   Returns -1 (writing nothing more) on an index outside [0, V). */
int ts_dequant(int bits, const int64_t* idx, int64_t R, int64_t V, const void* q, const uint16_t* s,
               float* out, int64_t K, int64_t G, int64_t gs) {
  const int64_t H = bits != 4 ? K : (K + 1) / 2;
  for (int64_t r = 0; r < R; ++r) {
    const int64_t v = idx ? idx[r] : r;
    if (v < 0 || v >= V) return -1;
    float* o = out + r * K;
    if (bits != 4) {
      const int8_t* row = (const int8_t*)q + v * K;
      const float sc = h2f(s[v]);
      #pragma omp simd
      for (int64_t k = 0; k < K; ++k) o[k] = (float)row[k] * sc;
    } else {
      const uint8_t* row = (const uint8_t*)q + v * H;
      for (int64_t k = 0; k < K; ++k) {
        const int b = row[k / 2];
        o[k] = (float)((k & 1 ? (b >> 4) : (b & 0x0F)) - 8) * h2f(s[v * G + k / gs]);
      }
    }
  }
  return 0;
}

/* ---- W8A8: per-token dynamic asymmetric uint8 activations x symmetric int8 weights ----------------
   The maths (and its PyTorch reference, bit for bit): tinyseek/quant/ops.py quantize_act, w8a8_reference.
   Activation row m: lo = min(x, 0), hi = max(x, 0), s = max((hi - lo) * fp32(1/255), 1e-30), inv = 1 / s,
   zp = round(-lo * inv), code = clamp(round(x * inv) + zp, 0, 255) (round half to even; one IEEE op each,
   written with intrinsics / explicit steps so -ffast-math cannot fuse or reorder them).
   y[m, n] = float(acc) * (s[m] * sw[n]) with the exact int32 acc = sum_k c[m, k] q[n, k] - zp[m] * sum_k q[n, k]
   (the weight row sum computed once per call per row, on the same pass over the row as the first token's
   dot product). int32 holds it for K < 2^31 / (255 * 127) ~ 66k. VNNI (vpdpbusd: u8 x s8 -> int32) where
   the CPU has AVX512_VNNI, AVX-512BW widening multiply-adds otherwise, plain C in a portable build. */
#define TS_INV255 ((float)(1.0 / 255.0))
#define TS_ACT_MIN_SCALE 1e-30f

/* codes q (row stride ldq; columns K..ldq-1 are left untouched), scales s, zero points zp of M rows */
void ts_quant_act(const float* x, uint8_t* q, float* s, int32_t* zp, int64_t M, int64_t K, int64_t ldq) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xr = x + m * K;
    uint8_t* qr = q + m * ldq;
    float lo = 0.f, hi = 0.f;
#ifdef TS_AVX512
    const int64_t K16 = K & ~(int64_t)15;
    const __mmask16 tail = (__mmask16)((1u << (K - K16)) - 1u);
    __m512 vlo = _mm512_setzero_ps(), vhi = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = k < K16 ? (__mmask16)0xFFFF : tail;
      const __m512 v = _mm512_maskz_loadu_ps(mk, xr + k);  /* masked lanes read 0: inside [lo, hi] */
      vlo = _mm512_min_ps(vlo, v);
      vhi = _mm512_max_ps(vhi, v);
    }
    lo = _mm512_reduce_min_ps(vlo);
    hi = _mm512_reduce_max_ps(vhi);
#else
    for (int64_t k = 0; k < K; ++k) {
      lo = xr[k] < lo ? xr[k] : lo;
      hi = xr[k] > hi ? xr[k] : hi;
    }
#endif
    /* volatile: under -ffast-math the compiler may otherwise fold 1 / ((hi - lo) * c) into
       (1 / c) / (hi - lo), a different rounding than the reference's two steps */
    volatile float sc_v = (hi - lo) * TS_INV255;
    float sc = sc_v;
    if (!(sc >= TS_ACT_MIN_SCALE)) sc = TS_ACT_MIN_SCALE;
    sc_v = sc;
    const float inv = 1.0f / sc_v;
    float z = nearbyintf(-lo * inv);
    z = z < 0.f ? 0.f : (z > 255.f ? 255.f : z);
    s[m] = sc;
    zp[m] = (int32_t)z;
#ifdef TS_AVX512
    const __m512 vinv = _mm512_set1_ps(inv), vz = _mm512_set1_ps(z);
    const __m512 v0 = _mm512_setzero_ps(), v255 = _mm512_set1_ps(255.f);
    for (int64_t k = 0; k < K; k += 16) {
      const __mmask16 mk = k < K16 ? (__mmask16)0xFFFF : tail;
      __m512 v = _mm512_mul_ps(_mm512_maskz_loadu_ps(mk, xr + k), vinv);
      v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(v, vz), v0), v255);
      _mm_mask_storeu_epi8(qr + k, mk, _mm512_cvtusepi32_epi8(_mm512_cvtps_epu32(v)));
    }
#else
    for (int64_t k = 0; k < K; ++k) {
      float v = nearbyintf(xr[k] * inv) + z;
      v = v < 0.f ? 0.f : (v > 255.f ? 255.f : v);
      qr[k] = (uint8_t)v;
    }
#endif
  }
}

#if defined(TS_AVX512) && defined(__AVX512VNNI__)
#define TS_VNNI 1
#endif

/* acc[i] = sum_k a[k] * r[i][k] over K (a: uint8 codes, r: 4 int8 weight rows); with rs (not NULL)
   also rs[i] = sum_k r[i][k] in the same pass */
static void dot4_u8s8(const uint8_t* a, const int8_t* const* r, int64_t K, int32_t* acc, int32_t* rs) {
#ifdef TS_AVX512
  __m512i c[4], t[4];
  for (int i = 0; i < 4; ++i) c[i] = t[i] = _mm512_setzero_si512();
#ifdef TS_VNNI
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t k = 0; k < K; k += 64) {
    const __mmask64 mk = K - k >= 64 ? ~(__mmask64)0 : (((__mmask64)1 << (K - k)) - 1);
    const __m512i av = _mm512_maskz_loadu_epi8(mk, a + k);
    for (int i = 0; i < 4; ++i) {
      const __m512i wv = _mm512_maskz_loadu_epi8(mk, r[i] + k);
      c[i] = _mm512_dpbusd_epi32(c[i], av, wv);
      if (rs) t[i] = _mm512_dpbusd_epi32(t[i], ones, wv);
    }
  }
#else
  const __m512i ones16 = _mm512_set1_epi16(1);
  for (int64_t k = 0; k < K; k += 32) {
    const __mmask32 mk = K - k >= 32 ? ~(__mmask32)0 : (((__mmask32)1 << (K - k)) - 1);
    const __m512i av = _mm512_cvtepu8_epi16(_mm256_maskz_loadu_epi8(mk, a + k));
    for (int i = 0; i < 4; ++i) {
      const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mk, r[i] + k));
      c[i] = _mm512_add_epi32(c[i], _mm512_madd_epi16(av, wv));
      if (rs) t[i] = _mm512_add_epi32(t[i], _mm512_madd_epi16(ones16, wv));
    }
  }
#endif
  for (int i = 0; i < 4; ++i) {
    acc[i] = _mm512_reduce_add_epi32(c[i]);
    if (rs) rs[i] = _mm512_reduce_add_epi32(t[i]);
  }
#else
  for (int i = 0; i < 4; ++i) {
    int32_t c = 0, t = 0;
    for (int64_t k = 0; k < K; ++k) {
      c += (int32_t)a[k] * (int32_t)r[i][k];
      t += r[i][k];
    }
    acc[i] = c;
    if (rs) rs[i] = t;
  }
#endif
}

/* y (M, N) fp32 = W8A8 product of x (M, K) fp32 and int8 codes q (N, K) with fp16 scales sw (N) */
void ts_w8a8(const float* x, const int8_t* q, const uint16_t* sw, float* y, int64_t M, int64_t N, int64_t K,
             int nt) {
  uint8_t* qx = (uint8_t*)malloc((size_t)(M * K) + 1);
  float* sx = (float*)malloc((size_t)M * sizeof(float));
  int32_t* zp = (int32_t*)malloc((size_t)M * sizeof(int32_t));
  ts_quant_act(x, qx, sx, zp, M, K, K);
  const int64_t NB = (N + 3) / 4;
  #pragma omp parallel for schedule(static) if (nt > 1 && M * N * K >= PAR_WORK) num_threads(nt)
  for (int64_t b = 0; b < NB; ++b) {
    const int64_t n = 4 * b;
    const int8_t* r[4];
    int32_t acc[4], rs[4] = {0, 0, 0, 0};
    float swf[4];
    for (int i = 0; i < 4; ++i) {
      r[i] = q + (n + i < N ? n + i : N - 1) * K;
      swf[i] = h2f(sw[n + i < N ? n + i : N - 1]);
    }
    for (int64_t m = 0; m < M; ++m) {
      dot4_u8s8(qx + m * K, r, K, acc, m == 0 ? rs : NULL);
      for (int i = 0; i < 4 && n + i < N; ++i) {
        const float f = sx[m] * swf[i];
        y[m * N + n + i] = (float)(acc[i] - zp[m] * rs[i]) * f;
      }
    }
  }
  free(zp);
  free(sx);
  free(qx);
}

#include "pyext.h"
#ifdef TS_PYEXT  /* the same functions as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
static PyObject* py_mm(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[12];
  if (ts_int_args(args, nargs, 12, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_mm((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
        PTR(float*, 5), v[6], v[7], v[8], v[9], v[10], (int)v[11]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_swiglu(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[16];
  if (ts_int_args(args, nargs, 16, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_swiglu((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
            PTR(const void*, 5), PTR(const uint16_t*, 6), PTR(const uint16_t*, 7), PTR(float*, 8), v[9], v[10],
            v[11], v[12], v[13], v[14], (int)v[15]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_dequant(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[10];
  int rc;
  if (ts_int_args(args, nargs, 10, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_dequant((int)v[0], PTR(const int64_t*, 1), v[2], v[3], PTR(const void*, 4), PTR(const uint16_t*, 5),
                  PTR(float*, 6), v[7], v[8], v[9]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_moe(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[20];
  int rc;
  if (ts_int_args(args, nargs, 20, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  rc = ts_moe((int)v[0], PTR(const float*, 1), PTR(const int64_t*, 2), PTR(const float*, 3), v[4], v[5], v[6],
              PTR(const uint8_t*, 7), PTR(const uint16_t*, 8), PTR(const uint16_t*, 9), PTR(const uint8_t*, 10),
              PTR(const uint16_t*, 11), PTR(const uint16_t*, 12), PTR(float*, 13), v[14], v[15], v[16], v[17],
              v[18], (int)v[19]);
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyObject* py_ffn(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[19];
  if (ts_int_args(args, nargs, 19, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_ffn((int)v[0], PTR(const float*, 1), PTR(const void*, 2), PTR(const uint16_t*, 3), PTR(const uint16_t*, 4),
         PTR(const void*, 5), PTR(const uint16_t*, 6), PTR(const uint16_t*, 7), PTR(const void*, 8),
         PTR(const uint16_t*, 9), PTR(const uint16_t*, 10), PTR(float*, 11), v[12], v[13], v[14], v[15], v[16],
         v[17], (int)v[18]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_w8a8(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[8];
  if (ts_int_args(args, nargs, 8, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_w8a8(PTR(const float*, 0), PTR(const int8_t*, 1), PTR(const uint16_t*, 2), PTR(float*, 3), v[4], v[5], v[6],
          (int)v[7]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyObject* py_quant_act(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[7];
  if (ts_int_args(args, nargs, 7, v)) return NULL;
  Py_BEGIN_ALLOW_THREADS
  ts_quant_act(PTR(const float*, 0), PTR(uint8_t*, 1), PTR(float*, 2), PTR(int32_t*, 3), v[4], v[5], v[6]);
  Py_END_ALLOW_THREADS
  Py_RETURN_NONE;
}
static PyMethodDef methods[] = {
  {"ts_w8a8", (PyCFunction)(void (*)(void))py_w8a8, METH_FASTCALL, NULL},
  {"ts_quant_act", (PyCFunction)(void (*)(void))py_quant_act, METH_FASTCALL, NULL},
  {"ts_ffn", (PyCFunction)(void (*)(void))py_ffn, METH_FASTCALL, NULL},
  {"ts_moe", (PyCFunction)(void (*)(void))py_moe, METH_FASTCALL, NULL},
  {"ts_mm", (PyCFunction)(void (*)(void))py_mm, METH_FASTCALL, NULL},
  {"ts_swiglu", (PyCFunction)(void (*)(void))py_swiglu, METH_FASTCALL, NULL},
  {"ts_dequant", (PyCFunction)(void (*)(void))py_dequant, METH_FASTCALL, NULL},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_quant", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_quant(void) { return PyModule_Create(&module); }
#endif
