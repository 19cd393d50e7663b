/* Fused fp32 latent attention of absorbed MLA decoding (tinyseek/kernels/attn.py is its Python
   glue, tinyseek/model/attention.py MLA._latent_attention its PyTorch reference). Per query token:
   scores over the visible key range of its cache row for all H heads, softmax, weighted sum of the
   latent's first C columns. AVX-512 where the CPU has it (TS_PORTABLE: compiler-vectorised loops). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#if defined(__AVX512F__) && !defined(TS_PORTABLE)
#include <immintrin.h>
#define TS_AVX512 1
#endif

#define PAR_WORK 1048576  /* multiply-adds below which a call stays on one thread */

/* v[i] = exp(v[i]) for v[i] <= 0 (scores minus their max); returns the sum. Cephes expf:
   2^n * (1 + r + r^2 P(r)), |r| <= ln2 / 2; relative error ~3e-7. Vectorised by the compiler. */
static float exp_sum(float* v, int64_t n) {
  float sum = 0.f;
  #pragma omp simd reduction(+:sum)
  for (int64_t i = 0; i < n; ++i) {
    float x = v[i] < -87.0f ? -87.0f : v[i];
    float fn = floorf(x * 1.44269504088896341f + 0.5f);
    float r = x - fn * 0.693359375f + fn * 2.12194440e-4f;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    union { uint32_t u; float f; } s;
    s.u = (uint32_t)((int32_t)fn + 127) << 23;
    float y = p * s.f;
    v[i] = y;
    sum += y;
  }
  return sum;
}

#ifdef TS_AVX512
static inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1u);
}

/* lane k of the result = sum of the 16 lanes of a[k] */
static inline __m512 reduce16(const __m512* a) {
  __m512 w[8], x[4], y[2];
  /* 512 -> 256: w[i] = [a[2i] halves summed | a[2i+1] halves summed] (128-bit blocks) */
  for (int i = 0; i < 8; ++i)
    w[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44),   /* blocks 0,1 | 0,1 */
                         _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));  /* blocks 2,3 | 2,3 */
  /* 256 -> 128: block b of x[i] holds 4 partial sums of a[4i + b] */
  for (int i = 0; i < 4; ++i)
    x[i] = _mm512_add_ps(_mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0x88),   /* blocks 0,2 | 0,2 */
                         _mm512_shuffle_f32x4(w[2 * i], w[2 * i + 1], 0xDD));  /* blocks 1,3 | 1,3 */
  /* within blocks, 4 -> 2 -> 1 */
  for (int i = 0; i < 2; ++i)
    y[i] = _mm512_add_ps(_mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0x44), _mm512_shuffle_ps(x[2 * i], x[2 * i + 1], 0xEE));
  __m512 z = _mm512_add_ps(_mm512_shuffle_ps(y[0], y[1], 0x88), _mm512_shuffle_ps(y[0], y[1], 0xDD));
  /* lane 4 * b + e now holds a[4 * e + b]: transpose the 4x4 order back */
  const __m512i perm = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
  return _mm512_permutexvar_ps(perm, z);
}
#endif

/* S[h * Lv + j] = q[h] . lat[lo + j] for the H heads (q packed (H, X), already scaled). */
static void scores(const float* q, const float* lat, int64_t sl, int64_t lo, int64_t Lv, int64_t H, int64_t X,
                   float* S) {
#ifdef TS_AVX512
  /* per head, 16 keys at a time: 16 accumulators (one q load feeds 16 FMAs), then one transposing
     reduction gives the 16 scores as one vector (3 shuffle-adds a score instead of ~10) */
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * X;
    for (int64_t j0 = 0; j0 < Lv; j0 += 16) {
      const float* r[16];
      for (int k = 0; k < 16; ++k)  /* past the end: repeat a valid row, its scores are not stored */
        r[k] = lat + (lo + (j0 + k < Lv ? j0 + k : j0)) * sl;
      __m512 a[16];
      for (int k = 0; k < 16; ++k) a[k] = _mm512_setzero_ps();
      int64_t x = 0;
      for (; x + 16 <= X; x += 16) {
        const __m512 qv = _mm512_loadu_ps(qh + x);
        for (int k = 0; k < 16; ++k) a[k] = _mm512_fmadd_ps(qv, _mm512_loadu_ps(r[k] + x), a[k]);
      }
      if (x < X) {
        const __mmask16 m = tail_mask(X - x);
        const __m512 qv = _mm512_maskz_loadu_ps(m, qh + x);
        for (int k = 0; k < 16; ++k) a[k] = _mm512_fmadd_ps(qv, _mm512_maskz_loadu_ps(m, r[k] + x), a[k]);
      }
      _mm512_mask_storeu_ps(S + h * Lv + j0, tail_mask(Lv - j0), reduce16(a));
    }
  }
#else
  /* four keys at a time per head: four independent sums share each q load */
  for (int64_t h = 0; h < H; ++h) {
    const float* qh = q + h * X;
    int64_t j = 0;
    for (; j + 4 <= Lv; j += 4) {
      const float *r0 = lat + (lo + j) * sl, *r1 = r0 + sl, *r2 = r1 + sl, *r3 = r2 + sl;
      float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
      #pragma omp simd reduction(+:s0, s1, s2, s3)
      for (int64_t x = 0; x < X; ++x) {
        s0 += qh[x] * r0[x]; s1 += qh[x] * r1[x]; s2 += qh[x] * r2[x]; s3 += qh[x] * r3[x];
      }
      S[h * Lv + j] = s0; S[h * Lv + j + 1] = s1; S[h * Lv + j + 2] = s2; S[h * Lv + j + 3] = s3;
    }
    for (; j < Lv; ++j) {
      const float* row = lat + (lo + j) * sl;
      float s = 0.f;
      #pragma omp simd reduction(+:s)
      for (int64_t x = 0; x < X; ++x) s += qh[x] * row[x];
      S[h * Lv + j] = s;
    }
  }
#endif
}

/* o[h, :C] = inv[h] * sum_j P[h * Lv + j] * lat[lo + j, :C] */
static void weighted_sum(const float* P, const float* inv, const float* lat, int64_t sl, int64_t lo, int64_t Lv,
                         int64_t H, int64_t C, float* o) {
#ifdef TS_AVX512
  /* four heads x 64 columns at a time: 16 accumulators, each row chunk loaded once for 4 heads */
  for (int64_t h = 0; h < H; h += 4) {
    const int nh = H - h < 4 ? (int)(H - h) : 4;
    const float* p[4];
    for (int i = 0; i < 4; ++i) p[i] = P + (h + (i < nh ? i : 0)) * Lv;  /* missing heads: computed, not stored */
    for (int64_t c0 = 0; c0 < C; c0 += 64) {
      __mmask16 m[4];
      for (int k = 0; k < 4; ++k) m[k] = tail_mask(C - c0 - 16 * k);
      __m512 a[4][4];
      for (int i = 0; i < 4; ++i)
        for (int k = 0; k < 4; ++k) a[i][k] = _mm512_setzero_ps();
      for (int64_t j = 0; j < Lv; ++j) {
        const float* row = lat + (lo + j) * sl + c0;
        __m512 v[4];
        for (int k = 0; k < 4; ++k) v[k] = _mm512_maskz_loadu_ps(m[k], row + 16 * k);
        for (int i = 0; i < 4; ++i) {
          const __m512 w = _mm512_set1_ps(p[i][j]);
          for (int k = 0; k < 4; ++k) a[i][k] = _mm512_fmadd_ps(v[k], w, a[i][k]);
        }
      }
      for (int i = 0; i < nh; ++i) {
        const __m512 s = _mm512_set1_ps(inv[h + i]);
        for (int k = 0; k < 4; ++k) _mm512_mask_storeu_ps(o + (h + i) * C + c0 + 16 * k, m[k], _mm512_mul_ps(a[i][k], s));
      }
    }
  }
#else
  for (int64_t h = 0; h < H; ++h) {
    float* oh = o + h * C;
    const float* ph = P + h * Lv;
    int64_t c0 = 0;
    for (; c0 + 32 <= C; c0 += 32) {  /* a fixed-size block: the accumulators stay in registers */
      float acc[32] = {0};
      for (int64_t j = 0; j < Lv; ++j) {
        const float* row = lat + (lo + j) * sl + c0;
        const float w = ph[j];
        #pragma omp simd
        for (int c = 0; c < 32; ++c) acc[c] += w * row[c];
      }
      #pragma omp simd
      for (int c = 0; c < 32; ++c) oh[c0 + c] = acc[c] * inv[h];
    }
    if (c0 == C) continue;
    memset(oh + c0, 0, (size_t)(C - c0) * sizeof(float));
    for (int64_t j = 0; j < Lv; ++j) {
      const float* row = lat + (lo + j) * sl;
      const float w = ph[j];
      #pragma omp simd
      for (int64_t c = c0; c < C; ++c) oh[c] += w * row[c];
    }
    const float s = inv[h];
    #pragma omp simd
    for (int64_t c = c0; c < C; ++c) oh[c] *= s;
  }
#endif
}

/* Latent attention of N = B * T query tokens, H heads each, over the latent cache.
   qc (N, H, C) latent query parts: element [n, h, c] at qc[n * qc_sn + h * qc_sh + c];
   qr rope parts: [b, t, h, r] at qr[b * qr_sb + t * qr_st + h * qr_sh + r];
   lat cache: [b, j, x] at lat[b * lat_sb + j * lat_sl + x], X = C + R;
   pos (B, T) contiguous absolute positions; out (N, H, C) contiguous; rows NULL (query token n = (b,
   t) reads cache row b), or (N) cache rows, one per query token (a ragged batch: B = 1, T = N).
   Returns 0, or -1 when scratch memory could not be allocated. */
int ts_latent_attn(const float* qc, int64_t qc_sn, int64_t qc_sh, const float* qr, int64_t qr_sb, int64_t qr_st,
                   int64_t qr_sh, const float* lat, int64_t lat_sb, int64_t lat_sl, const int64_t* pos, float* out,
                   int64_t B, int64_t T, int64_t H, int64_t C, int64_t R, int64_t key_len, int64_t window, float scale,
                   int nt, const int64_t* rows) {
  const int64_t X = C + R, N = B * T;
  const int64_t scratch = H * X + H * (key_len > 0 ? key_len : 1) + 2 * H;
  int rc = 0;
  #pragma omp parallel num_threads(nt) if (nt > 1 && N > 1 && N * H * key_len * X >= PAR_WORK)
  {
    float* buf = (float*)malloc((size_t)scratch * sizeof(float));
    if (buf == NULL) {
      #pragma omp atomic write
      rc = -1;
    }
    #pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (buf == NULL) continue;
      const int64_t b = n / T, t = n % T, p = pos[n];
      const int64_t hi = p + 1 < key_len ? p + 1 : key_len;
      const int64_t lo = window > 0 && p - window + 1 > 0 ? p - window + 1 : 0;
      float* o = out + n * H * C;
      if (hi <= lo) {  /* sees no key (not in valid use): zeros rather than the NaN of softmax(-inf) */
        memset(o, 0, (size_t)(H * C) * sizeof(float));
        continue;
      }
      const int64_t Lv = hi - lo;
      float* q = buf;                       /* (H, X) scaled queries */
      float* S = q + H * X;                 /* (H, Lv) scores, then probabilities */
      float* inv = S + H * (key_len > 0 ? key_len : 1);
      for (int64_t h = 0; h < H; ++h) {
        const float* a = qc + n * qc_sn + h * qc_sh;
        const float* r = qr + b * qr_sb + t * qr_st + h * qr_sh;
        float* qh = q + h * X;
        #pragma omp simd
        for (int64_t c = 0; c < C; ++c) qh[c] = scale * a[c];
        #pragma omp simd
        for (int64_t k = 0; k < R; ++k) qh[C + k] = scale * r[k];
      }
      const float* latb = lat + (rows ? rows[n] : b) * lat_sb;
      scores(q, latb, lat_sl, lo, Lv, H, X, S);
      for (int64_t h = 0; h < H; ++h) {
        float* sh = S + h * Lv;
        float mx = sh[0];
        for (int64_t j = 1; j < Lv; ++j) mx = sh[j] > mx ? sh[j] : mx;
        #pragma omp simd
        for (int64_t j = 0; j < Lv; ++j) sh[j] -= mx;
        inv[h] = 1.0f / exp_sum(sh, Lv);
      }
      weighted_sum(S, inv, latb, lat_sl, lo, Lv, H, C, o);
    }
    free(buf);
  }
  return rc;
}

#include "pyext.h"
#ifdef TS_PYEXT  /* the same function as a CPython extension: a call costs ~0.2 us, ctypes ~1.7 */
#define NARGS 22
#define SCALE_ARG 19
static PyObject* py_latent_attn(PyObject* self, PyObject* const* args, Py_ssize_t nargs) {
  long long v[NARGS];
  double scale = 0.0;
  int rc;
  if (nargs != NARGS) {
    PyErr_Format(PyExc_TypeError, "expected %d arguments, got %zd", NARGS, nargs);
    return NULL;
  }
  for (Py_ssize_t i = 0; i < NARGS; ++i) {
    if (i == SCALE_ARG) {
      scale = PyFloat_AsDouble(args[i]);
      if (scale == -1.0 && PyErr_Occurred()) return NULL;
      continue;
    }
    v[i] = PyLong_AsLongLong(args[i]);
    if (v[i] == -1 && PyErr_Occurred()) return NULL;
  }
  Py_BEGIN_ALLOW_THREADS
  rc = ts_latent_attn(PTR(const float*, 0), v[1], v[2], PTR(const float*, 3), v[4], v[5], v[6], PTR(const float*, 7),
                      v[8], v[9], PTR(const int64_t*, 10), PTR(float*, 11), v[12], v[13], v[14], v[15], v[16], v[17],
                      v[18], (float)scale, (int)v[20], PTR(const int64_t*, 21));
  Py_END_ALLOW_THREADS
  return PyLong_FromLong(rc);
}
static PyMethodDef methods[] = {
  {"ts_latent_attn", (PyCFunction)(void (*)(void))py_latent_attn, METH_FASTCALL, "latent attention (MLA decode)"},
  {NULL, NULL, 0, NULL}};
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_tinyseek_attn", NULL, -1, methods};
PyMODINIT_FUNC PyInit__tinyseek_attn(void) { return PyModule_Create(&module); }
#endif
