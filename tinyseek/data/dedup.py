"""Deduplication: exact (content hash) and near-duplicate (MinHash LSH, ``datasketch``).

- Exact: a document is a duplicate if its cleaned text hashes (xxhash64, or MD5 as in the seeds) to a
  digest seen before; the first occurrence is kept. Memory: 8 (xxhash) or 16 (MD5) bytes a document.
- Near: MinHash over character ``k``-shingles of the lower-cased, whitespace-collapsed text
  (characters, not words, so Chinese works), banded LSH for candidates, then the MinHash Jaccard
  estimate against each candidate must reach ``threshold`` (LSH alone has false positives). The first
  document of a near-duplicate cluster is kept. Shingles are hashed to 32 bits in one numpy pass (a
  rolling hash over code points) and handed to datasketch as integers (its default hashes each
  shingle's bytes with SHA-1 in a Python loop: several times slower, same estimates).
"""
from __future__ import annotations

import hashlib
import re

import numpy as np
import xxhash

_WS = re.compile(r"\s+")


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
    t = _WS.sub(" ", text.lower()).strip()
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
    t = _WS.sub(" ", text.lower()).strip()
    cp = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(cp) - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(min(k, len(cp))):
            h = h * _MUL + cp[j:j + n]
        return np.unique((h * _MIX) >> np.uint64(32))


def _identity(x: int) -> int:
    return x


class NearDedup:
    """MinHash LSH near-duplicate detector over a stream of documents.

    >>> nd = NearDedup(threshold=0.8)
    >>> a = "the quick brown fox jumps over the lazy dog " * 5
    >>> nd.check("a", a), nd.check("b", a + "!"), nd.check("c", "completely different words here " * 5)
    (None, 'a', None)
    """

    def __init__(self, threshold: float = 0.8, num_perm: int = 128, k: int = 5, seed: int = 1):
        from datasketch import MinHash, MinHashLSH
        self.threshold, self.num_perm, self.k, self.seed = threshold, num_perm, k, seed
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs: dict[str, np.ndarray] = {}

    def signature(self, text: str):
        """datasketch ``MinHash`` (its default ``affine32`` scheme) of the shingle hashes."""
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity)
        m.update_batch(shingle_hashes(text, self.k).tolist())
        return m

    def check(self, key: str, text: str) -> str | None:
        """Key of an earlier near-duplicate of ``text``, or None (then ``text`` is indexed as ``key``)."""
        m = self.signature(text)
        for cand in sorted(self.lsh.query(m)):
            if float(np.mean(self.sigs[cand] == m.hashvalues)) >= self.threshold:
                return cand
        self.lsh.insert(key, m)
        self.sigs[key] = m.hashvalues
        return None


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard similarity (the pure-Python baseline uses it pairwise).

    >>> jaccard({1, 2, 3}, {2, 3, 4})
    0.5
    """
    return len(a & b) / len(a | b) if a or b else 1.0
