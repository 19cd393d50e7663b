"""The checkpoint-format registry (tinyseek/train/checkpoint.py): formats register with the one loader,
train/ never imports quant/, and tinyseek.quant.load loads any checkpoint in a fresh process."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train import checkpoint as ckpt


def _float_ckpt(tmp_path):
    torch.manual_seed(0)
    m = Transformer(model_micro()).eval()
    return m, ckpt.save_checkpoint(tmp_path / "run" / "ckpt", 3, m, None, {"note": "f"})


def test_registered_format_claims_its_directories_on_the_path_and_after_resolving(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt, "CHECKPOINT_FORMATS", list(ckpt.CHECKPOINT_FORMATS))
    m, step = _float_ckpt(tmp_path)
    seen = []

    def load(d, device, chain):
        seen.append((d, device, chain))
        return "toy-model", {"toy": True}

    toy = ckpt.CheckpointFormat("toy", lambda d: (d / "toy.json").is_file(), load)
    ckpt.register_format(toy)
    ckpt.register_format(toy)                       # registering again replaces, never duplicates
    assert [f.name for f in ckpt.CHECKPOINT_FORMATS].count("toy") == 1
    loaded, meta = ckpt.load_model(tmp_path / "run")   # nothing claims it: the float checkpoint
    assert isinstance(loaded, Transformer) and meta["note"] == "f" and not seen
    (step / "toy.json").write_text("{}")
    assert ckpt.load_model(tmp_path / "run", "cpu") == ("toy-model", {"toy": True})  # claimed once resolved
    assert seen == [(step, "cpu", ())]
    other = tmp_path / "bare"
    other.mkdir()
    (other / "toy.json").write_text("{}")           # claimed as given, before resolving (no meta.json)
    ckpt.load_model(other)
    assert seen[-1][0] == other
    with pytest.raises(UserError, match="no checkpoint found"):
        ckpt.load_model(tmp_path / "missing")


def test_train_checkpoint_imports_no_quant_and_quant_load_loads_a_quantized_dir_in_a_fresh_process(tmp_path):
    from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized

    m, step = _float_ckpt(tmp_path)
    spec = QuantSpec("int4", 32)
    kinds = quantize_model(m, spec)["modules"]
    qdir = save_quantized(m, tmp_path / "q", quant_config(m, spec, kinds), ckpt.read_meta(step))
    idx = torch.randint(0, m.cfg.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = m(idx).logits[0, -1, :4].tolist()
    code = f"""
import json, sys, torch
import tinyseek.train.checkpoint as c
assert not any(k.startswith("tinyseek.quant") for k in sys.modules), "train/ imported quant/"
assert [f.name for f in c.CHECKPOINT_FORMATS] == ["lora-adapter"]
from tinyseek.quant.load import load_model
model, meta = load_model({str(qdir)!r})
with torch.no_grad():
    out = model(torch.tensor({idx.tolist()})).logits[0, -1, :4].tolist()
print(json.dumps({{"formats": [f.name for f in c.CHECKPOINT_FORMATS], "method": meta["quant"]["method"],
                   "note": meta["note"], "out": out}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert got["formats"] == ["lora-adapter", "tinyseek-quant"] and got["method"] == "int4" and got["note"] == "f"
    assert torch.allclose(torch.tensor(got["out"]), torch.tensor(want), atol=1e-5)  # the same model, reloaded
