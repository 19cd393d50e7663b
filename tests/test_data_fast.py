"""The fast per-document data functions return exactly what the reference implementations (copied
here from before the speed-up, as ``_ref_*``) return: same strings, same verdicts, bit-identical
floats, same hash sets, over the repo samples, edge cases and random strings; both the C kernel
path and the numpy fallback of the MinHash/n-gram hashing (``TINYSEEK_DATA_KERNELS=0``)."""
from __future__ import annotations

import functools
import json
import math
import random
import re
import unicodedata
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import xxhash

from tinyseek.data import clean as C
from tinyseek.data import decontam as X
from tinyseek.data import dedup as D
from tinyseek.data import quality as Q

SAMPLES = Path(C.__file__).resolve().parent / "samples"


def _chunks(text: str, sizes=(300, 4096)) -> list[str]:
    out = []
    for size in sizes:
        out += [text[i:i + size] for i in range(0, min(len(text), 40_000), size)]
    return out


def _random_text(rng: random.Random, n: int) -> str:
    pools = ["abcdefghij ", "ABC xyz\n\n\n  \t", "你好世界中文。，", "ｱｲｳ한국어ひらがな・゛", "\x00\x07\x1c\x1f\x7f\x85\xa0",
             "\u200b\u2028\u2029\ufeff\r\n", "😀🎉𝔘𝔫", "_-+=#$%^&*()[]{}'\"", "İıßẞﬁ①²½", "\u0301\u0307\u3000"]
    return "".join(rng.choice(rng.choice(pools)) for _ in range(n))


@functools.lru_cache(maxsize=1)
def corpus() -> list[str]:
    docs: list[str] = []
    for p in sorted((SAMPLES / "code").iterdir()) + sorted((SAMPLES / "shakespeare").iterdir()):
        docs += _chunks(p.read_text(encoding="utf-8"))
    docs += _chunks(open(SAMPLES / "people_daily_199801.tagged", encoding="utf-8").read())
    docs += [json.loads(line)["text"] for line in open(SAMPLES / "kjv.jsonl", encoding="utf-8")][:40]
    docs += ["", "a", " ", "\n", "\t \n \n", "\x00", "\x85", "你", "ab", "abcde", "abcdef", "😀" * 7, "A" * 20_000,
             "x = 1\n" * 300, ("same line\n" * 5 + "other\n") * 10, "word " * 400, "$#@! " * 40,
             "今天天气很好，我们去公园散步，看见很多人在跳舞唱歌。" * 3, "a_b c_d " * 30, "İstanbul ẞ ﬁ ½ ① " * 20,
             "line  \r\n\r\n\r\n\r\nnext\u2028x\u2029y\u200b\ufeff  \t\n", "\n\n\nlead and trail\n\n\n",
             "the quick brown fox jumps over the lazy dog " * 5, "ｱｲｳ・ｴｵ 한국어 ひらがな・カタカナ゛" * 8]
    rng = random.Random(0)
    docs += [_random_text(rng, rng.choice([1, 5, 13, 60, 400, 3000])) for _ in range(120)]
    return docs


# ----------------------------------------------------------------------------- dedup (MinHash LSH)

def _identity(x):
    return x


_REF_WS = re.compile(r"\s+")
_MIX, _MUL = np.uint64(0x9E3779B97F4A7C15), np.uint64(1_000_003)


def _ref_shingles(text, k=5):
    t = _REF_WS.sub(" ", text.lower()).strip()
    if len(t) <= k:
        return [t.encode("utf-8")]
    return sorted({t[i:i + k].encode("utf-8") for i in range(len(t) - k + 1)})


def _ref_shingle_hashes(text, k=5):
    t = _REF_WS.sub(" ", text.lower()).strip()
    cp = np.frombuffer(t.encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    n = max(1, len(cp) - k + 1)
    h = np.zeros(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j in range(min(k, len(cp))):
            h = h * _MUL + cp[j:j + n]
        return np.unique((h * _MIX) >> np.uint64(32))


def test_shingles_unchanged():
    for text in corpus():
        assert D.shingles(text, 5) == _ref_shingles(text, 5)
        np.testing.assert_array_equal(D.shingle_hashes(text, 5), _ref_shingle_hashes(text, 5))


def _ref_signature(text: str, num_perm=128, k=5, seed=1) -> np.ndarray:
    from datasketch import MinHash
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=_identity)
    m.update_batch(_ref_shingle_hashes(text, k).tolist())
    return m.hashvalues


class _RefNearDedup:
    def __init__(self, threshold=0.8, num_perm=128, k=5, seed=1):
        from datasketch import MinHash, MinHashLSH
        self.threshold, self.num_perm, self.k, self.seed = threshold, num_perm, k, seed
        self._MinHash = MinHash
        self.lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        self.sigs = {}

    def check(self, key, text):
        m = self._MinHash(num_perm=self.num_perm, seed=self.seed, hashfunc=_identity)
        m.update_batch(_ref_shingle_hashes(text, self.k).tolist())
        for cand in sorted(self.lsh.query(m)):
            if float(np.mean(self.sigs[cand] == m.hashvalues)) >= self.threshold:
                return cand
        self.lsh.insert(key, m)
        self.sigs[key] = m.hashvalues
        return None


@pytest.fixture(params=["native", "numpy"])
def kernels(request, monkeypatch):
    if request.param == "numpy":
        monkeypatch.setenv("TINYSEEK_DATA_KERNELS", "0")
    elif D.native() is None:
        pytest.skip("no C compiler: the numpy path is tested")
    return request.param


@pytest.mark.parametrize("num_perm,k,seed", [(128, 5, 1), (64, 3, 7), (256, 9, 42)])
def test_minhash_signature_equals_datasketch(kernels, num_perm, k, seed):
    for text in corpus()[::2] if num_perm != 128 else corpus():
        got = D.minhash_signature(text, num_perm, k, seed)
        assert got.dtype == np.uint32 and got.shape == (num_perm,)
        np.testing.assert_array_equal(got, _ref_signature(text, num_perm, k, seed), err_msg=repr(text[:80]))


def test_signature_object_and_lsh_params():
    from datasketch import MinHashLSH
    for threshold, num_perm in [(0.8, 128), (0.5, 64), (0.9, 256), (0.7, 100)]:
        lsh = MinHashLSH(threshold=threshold, num_perm=num_perm)
        assert D.lsh_params(threshold, num_perm) == (lsh.b, lsh.r)
    nd = D.NearDedup()
    for text in corpus()[:50]:
        np.testing.assert_array_equal(nd.signature(text).hashvalues, _ref_signature(text))


def test_near_dedup_same_verdicts(kernels):
    rng = random.Random(1)
    base = [d for d in corpus() if len(d) > 200][:60]
    stream = []
    for i, d in enumerate(base):
        stream.append(d)
        if i % 3 == 0:   # planted near-duplicates: a few edits, and exact copies
            chars = list(d)
            for _ in range(rng.choice([1, 3, 10, 40])):
                chars[rng.randrange(len(chars))] = rng.choice("xyz ")
            stream.append("".join(chars))
        if i % 7 == 0:
            stream.append(d)
    for threshold in (0.5, 0.8):
        new, ref = D.NearDedup(threshold), _RefNearDedup(threshold)
        got = [new.check(str(i), t) for i, t in enumerate(stream)]
        assert got == [ref.check(str(i), t) for i, t in enumerate(stream)]
        assert sum(g is not None for g in got) > 10


def test_band_hashes():
    rng = np.random.default_rng(0)
    sigs = rng.integers(0, 1 << 32, size=(200, 128), dtype=np.uint64).astype(np.uint32)
    sigs[100:, :13] = sigs[:100, :13]                 # band 0 shared
    sigs[50:100, 13 * 8:13 * 9] = sigs[0, 13 * 8:13 * 9]
    h = D.band_hashes(sigs, 9, 13)
    assert h.shape == (200, 9) and h.dtype == np.uint64
    np.testing.assert_array_equal(h[100:, 0], h[:100, 0])
    assert (h[50:100, 8] == h[0, 8]).all()
    assert len(np.unique(h[:100])) == 100 * 9 - 50   # everything else distinct
    keys = {sig[:13].tobytes() for sig in sigs}
    assert len(set(h[:, 0].tolist())) == len(keys)


# ----------------------------------------------------------------------------- clean + heuristics

_REF_CTRL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200e\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
_REF_TRAIL_WS = re.compile(r"[ \t]+$", re.M)
_REF_BLANK_RUN = re.compile(r"\n{3,}")
_REF_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_REF_WORD_RE = re.compile(rf"[{_REF_CJK}]|[^\s{_REF_CJK}]+")
_REF_CJK_RE = re.compile(rf"[{_REF_CJK}]")
_REF_SPACE_RE = re.compile(r"\s")
_REF_SYMBOL_RE = re.compile(r"[^\w\s]|_")


def _ref_clean_text(s):
    s = unicodedata.normalize("NFKC", s)
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\u2028", "\n").replace("\u2029", "\n\n")
    s = _REF_CTRL.sub("", s)
    s = _REF_TRAIL_WS.sub("", s)
    s = _REF_BLANK_RUN.sub("\n\n", s)
    return s.strip("\n")


def _ref_words(s):
    return _REF_WORD_RE.findall(s)


def _ref_cjk_fraction(s):
    n = sum(1 for c in s if not c.isspace())
    return len(_REF_CJK_RE.findall(s)) / n if n else 0.0


def _ref_symbol_ratio(s):
    n = len(s) - len(_REF_SPACE_RE.findall(s))
    return len(_REF_SYMBOL_RE.findall(s)) / n if n else 0.0


def _ref_dup_line_fraction(s):
    seen, dup, n = set(), 0, 0
    for line in s.split("\n"):
        line = line.strip()
        if not line:
            continue
        n += 1
        if line in seen:
            dup += 1
        seen.add(line)
    return dup / n if n else 0.0


def _ref_top_ngram_fraction(ws, n=3):
    if len(ws) < n + 1:
        return 0.0
    grams = Counter(tuple(ws[i:i + n]) for i in range(len(ws) - n + 1))
    gram, count = grams.most_common(1)[0]
    if count < 2:
        return 0.0
    total = sum(len(w) for w in ws)
    return min(1.0, count * sum(len(w) for w in gram) / total) if total else 0.0


def _ref_heuristic_reason(s, cfg):
    if len(s) < cfg.min_chars:
        return "too_short"
    if len(s) > cfg.max_chars:
        return "too_long"
    ws = _ref_words(s)
    if len(ws) < cfg.min_words:
        return "too_few_words"
    if _ref_symbol_ratio(s) > cfg.max_symbol_ratio:
        return "symbol_ratio"
    if _ref_dup_line_fraction(s) > cfg.max_dup_line_frac:
        return "repeated_lines"
    if _ref_top_ngram_fraction(ws, 3) > cfg.max_top_3gram_frac:
        return "repeated_ngrams"
    if _ref_cjk_fraction(s) < 0.5:
        latin = [w for w in ws if not _REF_CJK_RE.match(w)]
        if len(latin) >= 5:
            mean = sum(len(w) for w in latin) / len(latin)
            if not cfg.min_mean_word_len <= mean <= cfg.max_mean_word_len:
                return "mean_word_length"
    return None


def _texts() -> list[str]:
    """The corpus raw and cleaned (the heuristics see cleaned text in the pipeline)."""
    return corpus() + [_ref_clean_text(t) for t in corpus()]


def test_clean_text_identical():
    for text in corpus():
        assert C.clean_text(text) == _ref_clean_text(text), repr(text[:80])


def test_text_statistics_identical():
    for text in _texts():
        ws = C.words(text)
        assert ws == _ref_words(text)
        for n in (1, 2, 3, 5):
            assert C.top_ngram_fraction(ws, n) == _ref_top_ngram_fraction(ws, n)
        assert C.cjk_fraction(text) == _ref_cjk_fraction(text)
        assert C.symbol_ratio(text) == _ref_symbol_ratio(text)
        assert C.dup_line_fraction(text) == _ref_dup_line_fraction(text)


def test_every_bmp_and_some_astral_characters_classified_as_the_regexes_do():
    chars = [chr(c) for c in range(0x10000)] + [chr(c) for c in range(0x10000, 0x110000, 97)] + ["😀", "𝔘", "𝟙"]
    for i in range(0, len(chars), 4096):
        text = " ".join(chars[i:i + 4096])
        assert (C.symbol_ratio(text), C.cjk_fraction(text)) == (_ref_symbol_ratio(text), _ref_cjk_fraction(text))
    for ch in chars[::7]:
        assert (C.symbol_ratio(ch), C.cjk_fraction(ch)) == (_ref_symbol_ratio(ch), _ref_cjk_fraction(ch)), repr(ch)


def test_heuristic_reason_identical():
    rng = random.Random(2)
    cfgs = [C.HeuristicConfig(), C.relaxed_heuristics()]
    for _ in range(12):  # random thresholds reach every branch
        cfgs.append(C.HeuristicConfig(min_chars=rng.choice([0, 1, 20, 50]), max_chars=rng.choice([100, 10**6]),
                                      min_words=rng.choice([0, 3, 10, 50]), max_symbol_ratio=rng.random(),
                                      max_dup_line_frac=rng.random(), max_top_3gram_frac=rng.random() / 2,
                                      min_mean_word_len=rng.uniform(1, 5), max_mean_word_len=rng.uniform(3, 12)))
    seen = Counter()
    for text in _texts():
        for cfg in cfgs:
            got = C.heuristic_reason(text, cfg)
            assert got == _ref_heuristic_reason(text, cfg), (repr(text[:80]), cfg)
            seen[got] += 1
    assert len(seen) == 8, seen   # every reason and None


# ----------------------------------------------------------------------------- decontamination

_REF_PUNCT = re.compile(r"[^\w]+")


def _ref_ngram_tokens(text):
    out = []
    for w in _ref_words(text.lower()):
        w = _REF_PUNCT.sub("", w)
        if w:
            out.append(w)
    return out


def _ref_ngram_hashes(text, n):
    toks = _ref_ngram_tokens(text)
    return {xxhash.xxh64_intdigest(" ".join(toks[i:i + n]).encode()) for i in range(len(toks) - n + 1)}


def test_ngram_hashes_identical(kernels):
    for text in _texts():
        assert X.ngram_tokens(text) == _ref_ngram_tokens(text), repr(text[:80])
        for n in (1, 2, 13) if len(text) < 5000 else (13,):
            assert X.ngram_hashes(text, n) == _ref_ngram_hashes(text, n), (n, repr(text[:80]))
    for size in (0, 1, 7, 8, 31, 32, 33, 64, 100, 1000):  # every XXH64 length branch
        word = "x" * size + "é" * (size % 3)
        assert X.ngram_hashes(f"{word} a {word}", 2) == _ref_ngram_hashes(f"{word} a {word}", 2)


# ----------------------------------------------------------------------------- tokenizer

def test_encode_batch_same_ids(tmp_path):
    from tinyseek.tokenizer import train_tokenizer
    tok = train_tokenizer(corpus()[:200], 600, tmp_path / "tok")
    texts = corpus()
    want = [e.ids for e in tok._hf.encode_batch(list(texts), add_special_tokens=False)]  # the reference
    assert tok.encode_batch(texts) == want
    assert tok.encode_batch(texts[:30]) == [tok.encode(t) for t in texts[:30]]


# ----------------------------------------------------------------------------- quality

def _ref_char_entropy(text):
    if not text:
        return 0.0
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values()) + 0.0


def test_char_entropy_bit_identical():
    for text in _texts() + ["a\ud800b\udfff", "\x00" * 5 + "\x7f"]:
        got, want = Q.char_entropy(text), _ref_char_entropy(text)
        assert got.hex() == want.hex(), repr(text[:80])
