"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH, ``datasketch``).

- Exact: a document is a duplicate if its cleaned text hashes (xxhash64, or MD5 as in the seeds) to a
  digest seen before; the first occurrence is kept. Memory: 8 (xxhash) or 16 (MD5) bytes a document.
- Near: MinHash over character ``k``-shingles of the lower-cased, whitespace-collapsed text
  (characters, not words, so Chinese works), banded LSH for candidates, then the MinHash Jaccard
  estimate against each candidate must reach ``threshold`` (LSH alone has false positives). The first
  document of a near-duplicate cluster is kept. Shingles are hashed to 32 bits in one numpy pass (a
  rolling hash over code points) and handed to datasketch as integers (its default hashes each
  shingle's bytes with SHA-1 in a Python loop: several times slower, same estimates).

Fast path: :func:`minhash_signature` computes the same signature as datasketch (its ``affine32``
scheme) without datasketch, in one C pass (``tinyseek/kernels/textdedup.c``, built on first use
through ctypes; ``TINYSEEK_DATA_KERNELS=0`` or no compiler: a chunked numpy pass, same values).
:func:`lsh_params` and :func:`band_hashes` give the LSH banding for a parallel index.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import threading

import numpy as np
import xxhash

from tinyseek.kernels import loader


def _normalise(text: str) -> str:
    """Lower-cased, whitespace runs collapsed to one space, stripped: ``re.sub(r"\\s+", " ",
    text.lower()).strip()`` (``str.split`` and ``\\s`` agree on what is whitespace), faster."""
    return " ".join(text.lower().split())


def content_hash(text: str, algo: str = "xxhash") -> bytes:
    """Digest of the exact text.

    >>> content_hash("a") == content_hash("a") != content_hash("b"), len(content_hash("a", "md5"))
    (True, 16)
    """
    data = text.encode("utf-8")
    if algo == "md5":
        return hashlib.md5(data).digest()
    if algo == "xxhash":
        return xxhash.xxh64_digest(data)
    raise ValueError(f"unknown hash {algo!r}; use xxhash or md5")


class ExactDedup:
    """``is_duplicate(text)`` is True for any text already seen (and records unseen ones)."""

    def __init__(self, algo: str = "xxhash"):
        self.algo = algo
        self.seen: set[bytes] = set()

    def is_duplicate(self, text: str) -> bool:
        h = content_hash(text, self.algo)
        if h in self.seen:
            return True
        self.seen.add(h)
        return False


def shingles(text: str, k: int = 5) -> list[bytes]:
    """Distinct character ``k``-grams of the normalised text (sorted for determinism).

    >>> shingles("Ab  c", 3)
    [b'ab ', b'b c']
    """
    t = _normalise(text)
    if len(t) <= k:
        return [t.encode("utf-8")]
    return sorted({t[i:i + k].encode("utf-8") for i in range(len(t) - k + 1)})


_MIX = np.uint64(0x9E3779B97F4A7C15)
_MUL = np.uint64(1_000_003)


def shingle_hashes(text: str, k: int = 5) -> np.ndarray:
    """Distinct 32-bit hashes of the character ``k``-shingles of :func:`shingles` (vectorised:
    a polynomial rolling hash over code points, then a multiplicative mix).

    >>> len(shingle_hashes("Ab  c", 3)) == len(shingles("Ab  c", 3))
    True
    """
    return np.unique(_shingle_hash_values(_codepoints(text), k))


def _codepoints(text: str) -> np.ndarray:
    """Code points of the normalised text (:func:`_normalise`), uint32."""
    return np.frombuffer(_normalise(text).encode("utf-32-le"), dtype=np.uint32)


def _shingle_hash_values(cp: np.ndarray, k: int) -> np.ndarray:
    """The 32-bit hash of every character ``k``-shingle of ``cp``, in order, repeats kept (uint64):
    a polynomial rolling hash over code points, then a multiplicative mix."""
    cp = cp.astype(np.uint64)
    n = max(1, len(cp) - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(min(k, len(cp))):
            h = h * _MUL + cp[j:j + n]
        return (h * _MIX) >> np.uint64(32)


def _identity(x: int) -> int:
    return x


_NATIVE: dict = {"lib": None, "failed": False}
_NATIVE_LOCK = threading.Lock()
_P, _I64 = ctypes.c_void_p, ctypes.c_int64
_SIGNATURES = {"ts_minhash": ([_P, _I64, _I64, _P, _P, _I64, _P], None),
               "ts_xxh64_windows": ([_P, _P, _P, _I64, _P], None)}


def native():
    """The ``textdedup`` C kernels (ctypes), built on first use; None when switched off
    (``TINYSEEK_DATA_KERNELS=0``) or when they cannot be built (callers then take their numpy path)."""
    if os.environ.get("TINYSEEK_DATA_KERNELS", "1") == "0":
        return None
    if _NATIVE["lib"] is None and not _NATIVE["failed"]:
        with _NATIVE_LOCK:
            if _NATIVE["lib"] is None and not _NATIVE["failed"]:
                try:
                    _NATIVE["lib"] = loader.load("textdedup", loader.source("textdedup.c"), _SIGNATURES,
                                                 kind="ctypes")
                except Exception:  # no compiler, failed build: numpy fallback (same values)
                    _NATIVE["failed"] = True
    return _NATIVE["lib"]


@functools.lru_cache(maxsize=16)
def _permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """datasketch's ``affine32`` permutation parameters ``(a, b)`` for ``MinHash(num_perm, seed)``
    (its ``_init_permutations``: odd ``a``, any ``b``, from ``RandomState(seed)``), read-only."""
    gen = np.random.RandomState(seed)
    a = gen.randint(0, 1 << 31, num_perm, dtype=np.uint32) * np.uint32(2) + np.uint32(1)
    b = gen.randint(0, 1 << 32, num_perm, dtype=np.uint32)
    a.flags.writeable = b.flags.writeable = False
    return a, b


def _fmix32(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 32-bit finalizer (datasketch's pre-mix), element-wise on uint32."""
    h = h ^ (h >> np.uint32(16))
    h = h * np.uint32(0x85EBCA6B)
    h = h ^ (h >> np.uint32(13))
    h = h * np.uint32(0xC2B2AE35)
    return h ^ (h >> np.uint32(16))


def _minhash_numpy(cp: np.ndarray, k: int, a: np.ndarray, b: np.ndarray, chunk: int = 512) -> np.ndarray:
    hv = _fmix32(_shingle_hash_values(cp, k).astype(np.uint32))
    with np.errstate(over="ignore"):
        out = np.full(len(a), 0xFFFFFFFF, dtype=np.uint32)
        for i in range(0, len(hv), chunk):
            np.minimum(out, (hv[i:i + chunk, None] * a + b).min(axis=0), out=out)
    return out


def minhash_signature(text: str, num_perm: int = 128, k: int = 5, seed: int = 1) -> np.ndarray:
    """MinHash signature of ``text``'s character ``k``-shingles: uint32, shape ``(num_perm,)``, equal
    value for value to ``NearDedup(num_perm=num_perm, k=k, seed=seed).signature(text).hashvalues``
    (datasketch ``affine32``: ``min over shingles of a * fmix32(h) + b mod 2**32``, ``h`` the hashes of
    :func:`shingle_hashes`; duplicates do not change a minimum, so they are not removed). Needs no
    datasketch; one C pass where the kernel builds, else numpy.

    >>> sig = minhash_signature("the quick brown fox")
    >>> sig.dtype, sig.shape, bool((sig == NearDedup().signature("the quick brown fox").hashvalues).all())
    (dtype('uint32'), (128,), True)
    """
    cp = _codepoints(text)
    a, b = _permutations(num_perm, seed)
    lib = native()
    if lib is None:
        return _minhash_numpy(cp, k, a, b)
    out = np.empty(num_perm, dtype=np.uint32)
    lib.ts_minhash(cp.ctypes.data, len(cp), k, a.ctypes.data, b.ctypes.data, num_perm, out.ctypes.data)
    return out


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int) -> tuple[int, int]:
    """``(bands, rows)`` that datasketch ``MinHashLSH(threshold=threshold, num_perm=num_perm)`` picks
    (the weighted false positive/negative optimum; cached: it takes ~0.1 s).

    >>> lsh_params(0.8, 128)
    (9, 13)
    """
    from datasketch import MinHashLSH
    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
    return int(lsh.b), int(lsh.r)


_BAND_MUL = np.uint64(0x9E3779B97F4A7C15)
_BAND_M1 = np.uint64(0xBF58476D1CE4E5B9)
_BAND_M2 = np.uint64(0x94D049BB133111EB)


def band_hashes(sigs: np.ndarray, b: int, r: int) -> np.ndarray:
    """A 64-bit hash of every LSH band: ``out[i, j]`` hashes ``sigs[i, j*r:(j+1)*r]`` (uint64, shape
    ``(n, b)``). Equal slices give equal hashes (a deterministic function of the slice's values and
    of ``r``, independent of ``i``, ``j`` and of the other columns); unequal slices collide with
    probability about ``2**-64``. ``sigs``: ``(n, >= b*r)`` unsigned integers below ``2**32``.

    >>> s = np.array([[1, 2, 3, 4], [1, 2, 9, 9], [3, 4, 1, 2]], dtype=np.uint32)
    >>> h = band_hashes(s, 2, 2)
    >>> h.shape, h.dtype, bool(h[0, 0] == h[1, 0] == h[2, 1]), bool(h[0, 1] != h[1, 1]), bool(h[0, 0] != h[0, 1])
    ((3, 2), dtype('uint64'), True, True, True)
    """
    sigs = np.asarray(sigs)
    n = sigs.shape[0]
    x = sigs[:, :b * r].astype(np.uint64).reshape(n, b, r)
    h = np.full((n, b), np.uint64(r), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(r):                    # h = (h + x_j + 1) * odd, then a splitmix finalizer
            h = (h + x[:, :, j] + np.uint64(1)) * _BAND_MUL
            h ^= h >> np.uint64(31)
        h ^= h >> np.uint64(30)
        h *= _BAND_M1
        h ^= h >> np.uint64(27)
        h *= _BAND_M2
        h ^= h >> np.uint64(31)
    return h


class _BandIndex:
    """The LSH band tables: ``b`` dicts from a band's exact bytes to the keys indexed with it (what
    datasketch ``MinHashLSH`` keeps, without its per-call overhead). ``query`` takes a signature
    array or anything with ``.hashvalues`` (a datasketch ``MinHash``)."""

    def __init__(self, b: int, r: int):
        self.b, self.r = b, r
        self.tables: list[dict[bytes, list]] = [{} for _ in range(b)]

    def _bands(self, sig) -> list[bytes]:
        raw = np.ascontiguousarray(getattr(sig, "hashvalues", sig), dtype=np.uint32).tobytes()
        w = 4 * self.r
        return [raw[i * w:(i + 1) * w] for i in range(self.b)]

    def query(self, sig) -> set:
        """Keys sharing at least one band with ``sig`` (datasketch ``MinHashLSH.query``)."""
        out: set = set()
        for table, band in zip(self.tables, self._bands(sig)):
            keys = table.get(band)
            if keys:
                out.update(keys)
        return out

    def insert(self, key, sig) -> None:
        for table, band in zip(self.tables, self._bands(sig)):
            table.setdefault(band, []).append(key)


class NearDedup:
    """MinHash LSH near-duplicate detector over a stream of documents (datasketch's signatures and
    banding: :func:`minhash_signature`, :func:`lsh_params`; the same verdicts as datasketch's
    ``MinHashLSH``).

    >>> nd = NearDedup(threshold=0.8)
    >>> a = "the quick brown fox jumps over the lazy dog " * 5
    >>> nd.check("a", a), nd.check("b", a + "!"), nd.check("c", "completely different words here " * 5)
    (None, 'a', None)
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, k: int = 5, seed: int = 1):
        self.threshold, self.num_perm, self.k, self.seed = threshold, num_perm, k, seed
        self.lsh = _BandIndex(*lsh_params(threshold, num_perm))
        self.sigs: dict[str, np.ndarray] = {}

    def signature(self, text: str):
        """datasketch ``MinHash`` (its default ``affine32`` scheme) of the shingle hashes."""
        from datasketch import MinHash
        return MinHash(seed=self.seed, hashvalues=minhash_signature(text, self.num_perm, self.k, self.seed),
                       permutations=np.array(_permutations(self.num_perm, self.seed)), scheme="affine32")

    def check(self, key: str, text: str) -> str | None:
        """Key of an earlier near-duplicate of ``text``, or None (then ``text`` is indexed as ``key``;
        a key indexed before is a ValueError, as in datasketch)."""
        sig = minhash_signature(text, self.num_perm, self.k, self.seed)
        for cand in sorted(self.lsh.query(sig)):
            if float(np.mean(self.sigs[cand] == sig)) >= self.threshold:
                return cand
        if key in self.sigs:
            raise ValueError("The given key already exists")
        self.lsh.insert(key, sig)
        self.sigs[key] = sig
        return None


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity (the pure-Python baseline uses it pairwise).

    >>> jaccard({1, 2, 3}, {2, 3, 4})
    0.5
    """
    return len(a & b) / len(a | b) if a or b else 1.0
