/* Per-document hashing for the data stage (tinyseek/data/dedup.py, decontam.py); loaded through ctypes.

ts_minhash: the datasketch "affine32" MinHash of the character k-shingles of a code point array,
  bit-identical to dedup.shingle_hashes + datasketch MinHash.update_batch:
    h_i   = polynomial hash of cp[i..i+k) (uint64 wraparound: h = h * 1000003 + cp),
    hv_i  = fmix32((h_i * 0x9E3779B97F4A7C15) >> 32),
    out_p = min_i (a_p * hv_i + b_p) mod 2^32.
  Fewer than k code points: one shingle of all of them (none: the hash of nothing, 0).
ts_xxh64_windows: XXH64 (seed 0) of buf[start_i, end_i) for every i (the decontamination n-grams).
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TS_SHINGLE_BLOCK 4096

static inline uint32_t ts_fmix32(uint32_t h) {
    h ^= h >> 16;
    h *= 0x85EBCA6Bu;
    h ^= h >> 13;
    h *= 0xC2B2AE35u;
    return h ^ (h >> 16);
}

void ts_minhash(const uint32_t *cp, int64_t ncp, int64_t k, const uint32_t *a, const uint32_t *b,
                int64_t num_perm, uint32_t *out) {
    uint32_t hv[TS_SHINGLE_BLOCK];
    int64_t n = ncp - k + 1 > 1 ? ncp - k + 1 : 1;
    int64_t kk = k < ncp ? k : ncp;
    for (int64_t p = 0; p < num_perm; p++) out[p] = 0xFFFFFFFFu;
    for (int64_t i0 = 0; i0 < n; i0 += TS_SHINGLE_BLOCK) {
        int64_t m = n - i0 < TS_SHINGLE_BLOCK ? n - i0 : TS_SHINGLE_BLOCK;
        for (int64_t i = 0; i < m; i++) {
            uint64_t h = 0;
            for (int64_t j = 0; j < kk; j++) h = h * 1000003ull + (uint64_t)cp[i0 + i + j];
            hv[i] = ts_fmix32((uint32_t)((h * 0x9E3779B97F4A7C15ull) >> 32));
        }
        for (int64_t p = 0; p < num_perm; p++) {
            uint32_t ap = a[p], bp = b[p], lo = out[p];
            for (int64_t i = 0; i < m; i++) {
                uint32_t v = ap * hv[i] + bp;
                lo = v < lo ? v : lo;
            }
            out[p] = lo;
        }
    }
}

#define P64_1 0x9E3779B185EBCA87ull
#define P64_2 0xC2B2AE3D27D4EB4Full
#define P64_3 0x165667B19E3779F9ull
#define P64_4 0x85EBCA77C2B2AE63ull
#define P64_5 0x27D4EB2F165667C5ull

static inline uint64_t ts_rotl64(uint64_t x, int r) { return (x << r) | (x >> (64 - r)); }
static inline uint64_t ts_read64(const uint8_t *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline uint32_t ts_read32(const uint8_t *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t ts_round(uint64_t acc, uint64_t in) {
    acc += in * P64_2;
    acc = ts_rotl64(acc, 31);
    return acc * P64_1;
}
static inline uint64_t ts_merge(uint64_t acc, uint64_t v) {
    acc ^= ts_round(0, v);
    return acc * P64_1 + P64_4;
}

static uint64_t ts_xxh64(const uint8_t *p, size_t len) {  /* little-endian hosts (x86, arm64) */
    const uint8_t *end = p + len;
    uint64_t h;
    if (len >= 32) {
        uint64_t v1 = P64_1 + P64_2, v2 = P64_2, v3 = 0, v4 = 0 - P64_1;
        const uint8_t *limit = end - 32;
        do {
            v1 = ts_round(v1, ts_read64(p));
            v2 = ts_round(v2, ts_read64(p + 8));
            v3 = ts_round(v3, ts_read64(p + 16));
            v4 = ts_round(v4, ts_read64(p + 24));
            p += 32;
        } while (p <= limit);
        h = ts_rotl64(v1, 1) + ts_rotl64(v2, 7) + ts_rotl64(v3, 12) + ts_rotl64(v4, 18);
        h = ts_merge(h, v1);
        h = ts_merge(h, v2);
        h = ts_merge(h, v3);
        h = ts_merge(h, v4);
    } else {
        h = P64_5;
    }
    h += (uint64_t)len;
    while (p + 8 <= end) {
        h ^= ts_round(0, ts_read64(p));
        h = ts_rotl64(h, 27) * P64_1 + P64_4;
        p += 8;
    }
    if (p + 4 <= end) {
        h ^= (uint64_t)ts_read32(p) * P64_1;
        h = ts_rotl64(h, 23) * P64_2 + P64_3;
        p += 4;
    }
    while (p < end) {
        h ^= (uint64_t)(*p) * P64_5;
        h = ts_rotl64(h, 11) * P64_1;
        p++;
    }
    h ^= h >> 33;
    h *= P64_2;
    h ^= h >> 29;
    h *= P64_3;
    return h ^ (h >> 32);
}

void ts_xxh64_windows(const uint8_t *buf, const int64_t *start, const int64_t *end, int64_t n, uint64_t *out) {
    for (int64_t i = 0; i < n; i++) out[i] = ts_xxh64(buf + start[i], (size_t)(end[i] - start[i]));
}
