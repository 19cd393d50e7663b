"""Token shards: checksums recorded when written and verified when loaded (full / quick / off, the
``TINYSEEK_VERIFY`` variable), out-of-vocabulary ids as one-line errors naming the shard."""
from __future__ import annotations

import json

import numpy as np
import pytest

from tinyseek.data import shards as S
from tinyseek.data.loader import ShardLoader
from tinyseek.data.shards import read_index, verify_shards, write_shards
from tinyseek.errors import UserError

VOCAB = 100


def make(tmp_path, n_docs=40, doc_len=50, shard_tokens=1000, vocab=VOCAB):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, vocab - 1, size=doc_len) for _ in range(n_docs)]
    path = tmp_path / "s"
    write_shards(docs, path, vocab_size=vocab, eos_id=vocab - 1, shard_tokens=shard_tokens)
    return path


def poke(f, byte_offset, value):
    """Overwrite one uint16 token in place (same size, so only a checksum can notice)."""
    raw = bytearray(f.read_bytes())
    raw[byte_offset:byte_offset + 2] = int(value).to_bytes(2, "little")
    f.write_bytes(bytes(raw))


def one_line_error(excinfo, *needles):
    msg = str(excinfo.value)
    assert "\n" not in msg
    for n in needles:
        assert n in msg, msg
    return msg


def test_index_records_checksums_and_max_id(tmp_path):
    path = make(tmp_path)
    idx = read_index(path)
    assert idx["max_id"] == VOCAB - 1 and idx["quick_check"] == {"chunks": S.QUICK_CHUNKS, "chunk_bytes": S.QUICK_CHUNK_BYTES}
    for s in idx["shards"]:
        data = np.fromfile(path / s["file"], dtype=idx["dtype"])
        assert s["max_id"] == int(data.max())
        assert s["sha256"] == s["quick_sha256"]                     # small shard: the sample is the whole file
    assert max(s["max_id"] for s in idx["shards"]) == idx["max_id"]
    for mode in ("full", "quick", "off"):
        assert ShardLoader(path, 2, 16, verify=mode).verify == mode


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_changed_shard_fails_its_checksum(tmp_path, mode):
    path = make(tmp_path)
    f = path / "shard_00001.bin"
    poke(f, 100, 7 if int(np.fromfile(f, np.uint16)[50]) != 7 else 8)   # in-vocabulary id, same size
    with pytest.raises(UserError) as e:
        ShardLoader(path, 2, 16, verify=mode)
    one_line_error(e, str(f), "sha256")
    ShardLoader(path, 2, 16, verify="off")                               # sizes only: loads


def test_env_variable_selects_the_mode(tmp_path, monkeypatch):
    path = make(tmp_path)
    poke(path / "shard_00000.bin", 10, 3 if int(np.fromfile(path / "shard_00000.bin", np.uint16)[5]) != 3 else 4)
    monkeypatch.setenv("TINYSEEK_VERIFY", "off")
    ShardLoader(path, 2, 16)
    monkeypatch.setenv("TINYSEEK_VERIFY", "full")
    with pytest.raises(UserError, match="shard_00000.bin"):
        ShardLoader(path, 2, 16)
    monkeypatch.setenv("TINYSEEK_VERIFY", "paranoid")
    with pytest.raises(UserError, match="TINYSEEK_VERIFY"):
        ShardLoader(path, 2, 16)


def test_quick_check_samples_large_shards_and_full_reads_all(tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES the quick check hashes only the recorded chunks: a change inside one is
    caught, a change between them is caught by ``full`` only (what the docstring promises)."""
    monkeypatch.setattr(S, "QUICK_CHUNKS", 4)
    monkeypatch.setattr(S, "QUICK_CHUNK_BYTES", 64)
    monkeypatch.setattr(S, "FULL_CHECK_BYTES", 256)
    path = make(tmp_path, n_docs=80, shard_tokens=4000)                 # one 8000-byte shard
    idx = read_index(path)
    assert idx["quick_check"] == {"chunks": 4, "chunk_bytes": 64}
    f = path / idx["shards"][0]["file"]
    ranges = S.quick_ranges(f.stat().st_size, 4, 64)
    assert len(ranges) == 4 and ranges[0][0] == 0 and ranges[-1][1] == f.stat().st_size
    inside = ranges[1][0] + 8
    gap = (ranges[1][1] + ranges[2][0]) // 2 // 2 * 2
    assert not any(a <= gap < b for a, b in ranges)
    orig = f.read_bytes()
    poke(f, gap, 5 if orig[gap] != 5 else 6)
    assert verify_shards(path, verify="quick") == "quick"               # outside the sample: not seen
    with pytest.raises(UserError, match="fails its sha256"):
        verify_shards(path, verify="full")
    f.write_bytes(orig)
    poke(f, inside, 5 if orig[inside] != 5 else 6)
    with pytest.raises(UserError) as e:
        verify_shards(path, verify="quick")
    one_line_error(e, str(f), "sampled sha256 (4 x 64 bytes)")


def test_model_vocab_smaller_than_shard_ids_is_an_error(tmp_path):
    path = make(tmp_path)
    ShardLoader(path, 2, 16, vocab_size=VOCAB)
    with pytest.raises(UserError) as e:
        ShardLoader(path, 2, 16, vocab_size=VOCAB - 10)
    one_line_error(e, str(path), f"up to {VOCAB - 1}", f"{VOCAB - 10} entries")


def test_out_of_vocabulary_id_is_a_user_error_not_an_index_error(tmp_path):
    """A shard whose index predates max_id (or lies about it), read without verification: the batch
    holding the bad id raises a UserError naming the shard; with verification the load does."""
    path = make(tmp_path, n_docs=10, doc_len=20, shard_tokens=80)
    idx = json.loads((path / "index.json").read_text())
    for s in [idx] + idx["shards"]:
        s.pop("max_id")
    (path / "index.json").write_text(json.dumps(idx))
    f = path / "shard_00001.bin"
    raw = bytearray(f.read_bytes())
    raw[20:22] = (VOCAB + 5).to_bytes(2, "little")
    f.write_bytes(bytes(raw))
    h = __import__("hashlib").sha256(bytes(raw)).hexdigest()
    idx["shards"][1]["sha256"] = idx["shards"][1]["quick_sha256"] = h  # checksums agree: only the id is wrong
    (path / "index.json").write_text(json.dumps(idx))
    with pytest.raises(UserError) as e:
        ShardLoader(path, 2, 8, verify="quick")
    one_line_error(e, str(f), f"token id {VOCAB + 5}", f"[0, {VOCAB})")
    loader = ShardLoader(path, 2, 8, verify="off", shuffle=False)
    with pytest.raises(UserError) as e:
        for _ in range(loader.n_blocks):
            loader.next_batch()
    one_line_error(e, str(f), f"token id {VOCAB + 5} at token 10")


def test_missing_and_truncated_shards(tmp_path):
    path = make(tmp_path)
    f = path / "shard_00001.bin"
    f.write_bytes(f.read_bytes()[:-2])
    with pytest.raises(UserError) as e:
        ShardLoader(path, 2, 16, verify="off")
    one_line_error(e, str(f), "bytes")
    f.unlink()
    with pytest.raises(UserError, match="missing shard file"):
        ShardLoader(path, 2, 16, verify="off")


def test_held_out_falls_back_only_when_val_is_missing_or_small(tmp_path):
    """pretrain's held-out set uses the tail of train when val is absent or shorter than a batch, but a
    damaged val split is an error (falling back would hide it)."""
    from tinyseek.train.pretrain import HeldOut

    train = make(tmp_path / "t")
    small = make(tmp_path / "v", n_docs=1, doc_len=10)
    assert HeldOut(train, None, 2, 16, 0, 1, "cpu", 2).start > 0
    assert HeldOut(train, small, 2, 16, 0, 1, "cpu", 2).start > 0
    val = make(tmp_path / "w")
    assert HeldOut(train, val, 2, 16, 0, 1, "cpu", 2).start == 0
    f = val / "shard_00001.bin"
    poke(f, 100, 7 if int(np.fromfile(f, np.uint16)[50]) != 7 else 8)
    with pytest.raises(UserError) as e:
        HeldOut(train, val, 2, 16, 0, 1, "cpu", 2)
    one_line_error(e, str(f), "sha256")
