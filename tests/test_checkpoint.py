"""Checkpoints: atomic writes, interrupted writes never picked up, tied weights, pruning, load_model."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from tinyseek.common import atomic_dir, remove_stale_temps
from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train import checkpoint as ckpt
from tinyseek.train.optim import build_optimizer


def make(tie: bool = False):
    torch.manual_seed(0)
    cfg = model_micro()
    cfg.tie_embeddings = tie
    model = Transformer(cfg)
    model.moe_layers[0].router.expert_bias.copy_(torch.tensor([0.1, -0.2, 0.3, 0.0]))
    opt = build_optimizer(model, 1e-3)
    x = torch.randint(0, cfg.vocab_size, (2, 9))
    model(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    return model, opt, x


def test_roundtrip_with_tied_weights_and_buffers(tmp_path):
    model, opt, x = make(tie=True)
    d = ckpt.save_checkpoint(tmp_path / "ckpt", 7, model, opt, {"loader": {"pos": 5, "epoch": 0}})
    assert d.name == "step_000007" and {p.name for p in d.iterdir()} == {"model.safetensors", "optim.pt", "rng.pt", "meta.json",
                                                                   "checksums.json"}
    with safe_open(str(d / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert ("lm_head.weight" in keys) != ("embed.weight" in keys)  # the tied tensor is stored once
    loaded, meta = ckpt.load_model(tmp_path)  # a run dir: finds ckpt/ and its latest step
    assert meta["step"] == 7 and meta["loader"] == {"pos": 5, "epoch": 0} and meta["model_config"]["tie_embeddings"]
    assert loaded.lm_head.weight is loaded.embed.weight
    assert torch.equal(loaded.moe_layers[0].router.expert_bias, model.moe_layers[0].router.expert_bias)
    model.eval()
    assert torch.equal(loaded(x).logits, model(x).logits)
    # optimizer state restores exactly
    model2 = Transformer(model.cfg)
    opt2 = build_optimizer(model2, 1e-3)
    ckpt.load_training_state(d, model2, opt2)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)


def test_interrupted_checkpoint_is_never_picked_up(tmp_path, monkeypatch):
    model, opt, _ = make()
    root = tmp_path / "ckpt"
    ckpt.save_checkpoint(root, 100, model, opt, {})
    # a crash while writing step 200: the temp dir is cleaned up and step 100 stays the latest
    monkeypatch.setattr(ckpt.torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        ckpt.save_checkpoint(root, 200, model, opt, {})
    monkeypatch.undo()
    assert ckpt.latest_checkpoint(root).name == "step_000100"
    assert sorted(p.name for p in root.iterdir()) == ["step_000100"]
    # leftovers of a SIGKILLed writer: a .tmp-* dir with complete-looking files, a step dir without
    # meta.json, one with a torn meta.json, and unrelated names
    good = root / "step_000100"
    for bad in (root / ".tmp-step_000300-abc", root / "step_000400", root / "step_000500"):
        bad.mkdir()
        (bad / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    (root / ".tmp-step_000300-abc" / "meta.json").write_text((good / "meta.json").read_text())
    (root / "step_000500" / "meta.json").write_text('{"step": 5')
    (root / "step_latest").mkdir()
    assert ckpt.latest_checkpoint(root).name == "step_000100"
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [100]
    assert [p.name for p in ckpt.remove_partial(root)] == [".tmp-step_000300-abc"]
    assert ckpt.latest_checkpoint(root).name == "step_000100"
    assert ckpt.latest_checkpoint(tmp_path / "missing") is None
    with pytest.raises(UserError):
        ckpt.load_model(tmp_path / "missing")


def test_prune_keeps_newest(tmp_path):
    model, opt, _ = make()
    for s in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, s, model, None, {})
    removed = ckpt.prune_checkpoints(tmp_path, 2)
    assert [p.name for p in removed] == ["step_000001", "step_000002"]
    assert [s for s, _ in ckpt.list_checkpoints(tmp_path)] == [3, 4]
    assert not (tmp_path / "step_000004" / "optim.pt").exists()  # no optimizer given
    assert json.loads((tmp_path / "step_000004" / "meta.json").read_text())["step"] == 4


def test_resave_same_step_replaces_atomically(tmp_path):
    model, opt, _ = make()
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"v": 1})
    ckpt.save_checkpoint(tmp_path, 5, model, opt, {"v": 2})
    assert ckpt.read_meta(tmp_path / "step_000005")["v"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["step_000005"]



def test_atomic_dir_removes_temps_of_dead_writers_only(tmp_path):
    final = tmp_path / "out"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dpid = int(dead.stdout)
    stale = [tmp_path / f".tmp-out-{dpid}-abcd1234", tmp_path / f".old-out-{dpid}"]
    live = [tmp_path / f".tmp-out-{os.getppid()}-abcd1234",      # a running process
            tmp_path / f".tmp-out-{dpid}-1-abcd1234",             # another final's temp (out-<dpid>)
            tmp_path / f".tmp-other-{dpid}-abcd1234"]             # another final
    for p in stale + live:
        p.mkdir()
        (p / "f").write_text("x")
    with atomic_dir(final) as tmp:
        assert f"-{os.getpid()}-" in tmp.name
        (tmp / "a").write_text("1")
    assert (final / "a").read_text() == "1"
    assert not any(p.exists() for p in stale)
    assert all(p.exists() for p in live)
    assert remove_stale_temps(final) == []
