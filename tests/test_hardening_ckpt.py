"""Checkpoint and training-config hardening (issue 15): nothing is unpickled, checksums catch damage,
damaged files are one-line errors, --resume never silently starts over, metrics are never deleted,
non-finite settings and runs that learn nothing fail."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from test_pretrain import repetitive_shards, small_cfg
from tinyseek import cli
from tinyseek.common import rng_state, set_rng_state
from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.integrity import quick_ranges
from tinyseek.model.transformer import Transformer
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import distributed as D
from tinyseek.train import pretrain
from tinyseek.train.optim import build_optimizer


class Payload:
    """Unpickling this object creates ``marker`` (what a crafted checkpoint file would do)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def saved(tmp_path: Path, step: int = 3) -> tuple[Path, Transformer, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = Transformer(model_micro())
    opt = build_optimizer(model, 1e-3)
    x = torch.randint(0, 256, (2, 9))
    model(x[:, :-1], x[:, 1:]).loss.backward()
    opt.step()
    return ckpt.save_checkpoint(tmp_path / "ckpt", step, model, opt, {}), model, opt


def flip_byte(p: Path, at: int | None = None) -> None:
    b = bytearray(p.read_bytes())
    i = len(b) // 2 if at is None else at
    b[i] ^= 0x01
    p.write_bytes(bytes(b))


def one_line_error(capsys, argv: list[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyseek: error: ") and "\n" not in err and "Traceback" not in err, err
    return err


# ---- item 1: nothing is unpickled -------------------------------------------------------------
@pytest.mark.parametrize("name", ["optim.pt", "rng.pt", "comm.pt"])
def test_pickled_payload_is_refused_and_never_runs(tmp_path, name):
    d, model, opt = saved(tmp_path)
    marker = tmp_path / "pwned"
    obj = {"state": {}, "param_groups": [], "x": Payload(marker)} if name == "optim.pt" else [Payload(marker)]
    torch.save(obj, d / name)
    ckpt.write_checksums(d)  # a consistent, re-checksummed file: the loader itself must refuse it
    with pytest.raises(UserError, match=f"{name}.*refused") as e:
        if name == "comm.pt":
            pretrain._restore_comm_state(None, d, rank=0, world=2)  # what a 2-rank --resume runs
        else:
            ckpt.load_training_state(d, Transformer(model.cfg), build_optimizer(Transformer(model.cfg), 1e-3))
    assert "\n" not in str(e.value)
    assert not marker.exists()


def test_pretrain_resume_refuses_pickled_optim_at_the_cli(tmp_path, capsys):
    data = repetitive_shards(tmp_path / "shards")
    pretrain.main(small_cfg(tmp_path, data=str(data), steps=2, eval_every=0, log_every=1))
    d = ckpt.latest_checkpoint(tmp_path / "run" / "ckpt")
    marker = tmp_path / "pwned"
    shutil.rmtree(d / "train_state")  # a checkpoint of the optim.pt era (before distributed checkpoints)
    torch.save({"state": {}, "param_groups": [Payload(marker)]}, d / "optim.pt")
    ckpt.write_checksums(d)
    err = one_line_error(capsys, ["pretrain", "--run-dir", str(tmp_path / "run"), "--data", str(data),
                                  "--model.d-model", "32", "--model.n-heads", "2", "--model.d-ff", "64",
                                  "--model.moe-d-ff", "16", "--model.kv-lora-rank", "16",
                                  "--model.qk-nope-head-dim", "8", "--model.qk-rope-head-dim", "8",
                                  "--model.v-head-dim", "8", "--steps", "4", "--batch-size", "4", "--seq-len", "32",
                                  "--progress", "false", "--resume"])
    assert "optim.pt" in err and not marker.exists()


def test_rng_state_round_trips_through_weights_only_and_old_format_still_loads(tmp_path):
    random.seed(5), np.random.seed(5), torch.manual_seed(5)
    st = rng_state()
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.save(st, tmp_path / "new.pt")
    back = torch.load(tmp_path / "new.pt", weights_only=True)  # plain lists and tensors only
    set_rng_state(back)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want
    # a checkpoint written before this change (numpy state with an ndarray): still read, safely
    d, _, _ = saved(tmp_path)
    random.seed(6), np.random.seed(6), torch.manual_seed(6)
    old = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    want = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    torch.save(old, d / "rng.pt")
    (d / "checksums.json").unlink()  # old checkpoints have none
    with pytest.raises(Exception):
        torch.load(d / "rng.pt", weights_only=True)  # plain weights_only refuses the ndarray...
    st = ckpt.load_rng_state(d)  # ...the loader admits numpy arrays, nothing more
    ckpt.restore_rng_state(st, d)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == want


def test_comm_state_numpy_rng_is_stored_as_plain_lists():
    rs = np.random.RandomState(7)
    state = rs.get_state()

    class Tracker:
        def state_dict(self):
            return {"kind": "powersgd", "params": {}, "rng": rs.get_state(), "iter": 3}

        def load_state_dict(self, sd):
            self.loaded = sd

    m = torch.nn.Linear(2, 2)
    m._tinyseek_comm_tracker = Tracker()
    sd = D.comm_state_dict(m)
    assert isinstance(sd["rng"], list) and isinstance(sd["rng"][1], list)
    assert D.load_comm_state_dict(m, sd)
    got = m._tinyseek_comm_tracker.loaded["rng"]
    assert got[0] == state[0] and (got[1] == state[1]).all() and got[2:] == state[2:]


# ---- item 4: checksums -------------------------------------------------------------------------
def test_checksums_catch_flipped_bytes_in_every_file(tmp_path, monkeypatch):
    d, model, _ = saved(tmp_path)
    sums = json.loads((d / "checksums.json").read_text())["files"]
    assert set(sums) == {"model.safetensors", "optim.pt", "rng.pt", "meta.json"}
    good = d / "model.safetensors"
    flip_byte(good, at=good.stat().st_size - 10)  # inside a tensor: safetensors alone would load it
    with pytest.raises(UserError, match=r"model.safetensors is damaged \(sha256") as e:
        ckpt.load_model(d)
    assert "\n" not in str(e.value)
    monkeypatch.setenv("TINYSEEK_VERIFY", "off")  # the check is what catches it: off, it loads silently
    loaded, _ = ckpt.load_model(d)
    monkeypatch.delenv("TINYSEEK_VERIFY")
    for name in ("optim.pt", "rng.pt"):
        d2, m2, _ = saved(tmp_path / name)
        flip_byte(d2 / name)
        with pytest.raises(UserError, match=f"{name} is damaged"):
            ckpt.load_training_state(d2, Transformer(m2.cfg), build_optimizer(Transformer(m2.cfg), 1e-3))
    d3, _, _ = saved(tmp_path / "meta")
    meta = (d3 / "meta.json").read_text()
    (d3 / "meta.json").write_text(meta.replace('"step": 3', '"step": 4'))  # still valid JSON, wrong
    with pytest.raises(UserError, match="meta.json is damaged"):
        ckpt.read_meta(d3)


def test_quick_mode_samples_large_files_and_old_checkpoints_load(tmp_path, monkeypatch):
    """Above FULL_CHECK_BYTES quick mode compares the sampled hash (16 pieces; here 4 x 64 bytes): a
    flipped byte inside a piece is caught, one between pieces only by ``full``; sizes always."""
    monkeypatch.setattr(ckpt, "QUICK_CHUNKS", 4)
    monkeypatch.setattr(ckpt, "QUICK_CHUNK_BYTES", 64)
    d, model, _ = saved(tmp_path)
    monkeypatch.setattr(ckpt, "FULL_CHECK_BYTES", 0)  # every file counts as large
    monkeypatch.setenv("TINYSEEK_VERIFY", "quick")
    f = d / "model.safetensors"
    ranges = quick_ranges(f.stat().st_size, 4, 64)
    orig = f.read_bytes()
    flip_byte(f, at=(ranges[1][1] + ranges[2][0]) // 2)   # between two sampled pieces
    ckpt.load_model(d)  # quick mode does not see it
    monkeypatch.setenv("TINYSEEK_VERIFY", "full")
    with pytest.raises(UserError, match="model.safetensors is damaged .sha256 differs"):
        ckpt.load_model(d)
    monkeypatch.setenv("TINYSEEK_VERIFY", "quick")
    f.write_bytes(orig)
    flip_byte(f, at=ranges[-1][1] - 10)                      # inside the last piece
    with pytest.raises(UserError, match="sampled sha256 differs"):
        ckpt.load_model(d)
    f.write_bytes(orig)
    with open(f, "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(UserError, match="bytes, checksums.json records"):
        ckpt.load_model(d)
    monkeypatch.setenv("TINYSEEK_VERIFY", "sometimes")
    with pytest.raises(UserError, match="TINYSEEK_VERIFY"):
        ckpt.load_model(d)
    monkeypatch.delenv("TINYSEEK_VERIFY")
    d2, m2, _ = saved(tmp_path / "old")
    (d2 / "checksums.json").unlink()  # written before checksums existed
    loaded, _ = ckpt.load_model(d2)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), m2.state_dict().values()))


def test_quantized_and_adapter_checkpoints_carry_checksums(tmp_path):
    from tinyseek.post.common import save as post_save
    from tinyseek.model.lora import apply_lora
    from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized

    d, model, _ = saved(tmp_path)
    q = Transformer(model.cfg)
    q.load_state_dict(model.state_dict())
    spec = QuantSpec(method="int8")
    kinds = quantize_model(q, spec, None)["modules"]
    out = save_quantized(q, tmp_path / "quant", quant_config(q, spec, kinds))
    assert "model.safetensors" in json.loads((out / "checksums.json").read_text())["files"]
    flip_byte(out / "model.safetensors", at=(out / "model.safetensors").stat().st_size - 10)
    with pytest.raises(UserError, match="model.safetensors is damaged"):
        ckpt.load_model(out)
    apply_lora(model, 2, 4.0, "all-linear", 0.0, base=str(d))
    a = post_save(tmp_path / "lora", 1, model, None, {})
    assert "adapter.safetensors" in json.loads((a / "checksums.json").read_text())["files"]


# ---- item 8: damaged files are one line ---------------------------------------------------------
@pytest.mark.parametrize("name", ["model.safetensors", "meta.json", "optim.pt", "rng.pt"])
@pytest.mark.parametrize("with_sums", [True, False])
def test_truncated_file_is_a_one_line_error(tmp_path, name, with_sums):
    d, model, _ = saved(tmp_path)
    if not with_sums:
        (d / "checksums.json").unlink()
    p = d / name
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    with pytest.raises(UserError, match=f"checkpoint file .*{name} is damaged") as e:
        ckpt.load_training_state(d, Transformer(model.cfg), build_optimizer(Transformer(model.cfg), 1e-3))
    assert "\n" not in str(e.value)


def test_truncated_weights_at_the_cli_is_one_line(tmp_path, capsys):
    d, _, _ = saved(tmp_path)
    (d / "checksums.json").unlink()
    p = d / "model.safetensors"
    p.write_bytes(p.read_bytes()[:100])
    err = one_line_error(capsys, ["eval", "--ckpt", str(d), "--n-problems", "1"])
    assert "model.safetensors is damaged" in err


# ---- item 5: --resume and metrics --------------------------------------------------------------
def test_resume_without_checkpoint_is_an_error_and_metrics_are_never_deleted(tmp_path, capsys):
    data = repetitive_shards(tmp_path / "shards")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 3.0}\n')
    with pytest.raises(UserError, match="--resume: no complete checkpoint"):
        pretrain.main(small_cfg(tmp_path, data=str(data), steps=2, resume=True))
    assert (run / "metrics.jsonl").read_text() == '{"step": 1, "loss": 3.0}\n'
    # asked for: a fresh start when none exists; the old curve is moved aside, not unlinked
    pretrain.main(small_cfg(tmp_path, data=str(data), steps=2, eval_every=0, log_every=1, resume=True,
                            allow_fresh=True))
    aside = list(run.glob("metrics.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == '{"step": 1, "loss": 3.0}\n'
    assert [r["step"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r] == [1, 2]


def test_post_stage_rerun_moves_metrics_and_checkpoints_aside(tmp_path):
    from tinyseek.post import sft

    cfg = sft.Config(n_examples=8, epochs=2, batch_size=8, out_dir=str(tmp_path), name="s", device="cpu", log_every=1)
    sft.main(cfg)
    first = (tmp_path / "s" / "metrics.jsonl").read_text()
    first_steps = [s for s, _ in ckpt.list_checkpoints(tmp_path / "s" / "ckpt")]
    cfg.epochs = 1  # a shorter rerun: the longer run's last step must not stay the "latest"
    sft.main(cfg)
    aside = list((tmp_path / "s").glob("metrics.*.jsonl"))
    assert len(aside) == 1 and aside[0].read_text() == first
    assert len((tmp_path / "s" / "metrics.jsonl").read_text().splitlines()) < len(first.splitlines())
    assert ckpt.resolve_checkpoint(tmp_path / "s").name == "step_000001"
    old = list((tmp_path / "s").glob("ckpt.*"))
    assert len(old) == 1 and [s for s, _ in ckpt.list_checkpoints(old[0])] == first_steps and max(first_steps) == 2


# ---- item 6: the final checkpoint records the run's losses -------------------------------------
def test_final_meta_records_final_losses(tmp_path):
    data = repetitive_shards(tmp_path / "shards")
    res = pretrain.main(small_cfg(tmp_path, data=str(data), steps=4, eval_every=2, log_every=3, ckpt_every=0))
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run" / "ckpt"))
    assert meta["val_loss"] == res["val_loss"] and meta["val_loss_step"] == 4
    assert meta["loss"] == res["loss"] and meta["loss_step"] == 4  # the final step is always logged


# ---- item 9: numeric settings and runs that learn nothing --------------------------------------
@pytest.mark.parametrize("argv,field", [
    (["pretrain", "--model.rope-theta", "0"], "model.rope_theta"),
    (["pretrain", "--model.norm-eps", "-1"], "model.norm_eps"),
    (["pretrain", "--model.init-std", "-1"], "model.init_std"),
    (["pretrain", "--lr", "inf"], "lr"),
    (["pretrain", "--min-lr", "nan"], "min_lr"),
    (["pretrain", "--grad-clip", "inf"], "grad_clip"),
    (["sft", "--lr", "inf"], "lr"),
    (["sft", "--log-every", "0"], "log_every"),
    (["sft", "--model.rope-theta", "0"], "model.rope_theta"),
    (["grpo", "--lr", "nan"], "lr"),
    (["grpo", "--rewards", '{"accuracy": Infinity}'], "rewards"),
    (["dpo", "--grad-clip", "-1"], "grad_clip"),
    (["distill", "--teacher", "x", "--kd-temperature", "inf"], "kd_temperature"),
    (["rejection", "--ckpt", "x", "--top-p", "2"], "top_p"),
])
def test_bad_numbers_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, argv, field):
    monkeypatch.chdir(tmp_path)
    err = one_line_error(capsys, argv)
    assert field in err
    assert not (tmp_path / "runs").exists()


def test_a_run_whose_every_step_is_skipped_fails_without_checkpoint(tmp_path):
    data = repetitive_shards(tmp_path / "shards")
    with pytest.raises(UserError, match="all 1 steps of this run were skipped"):
        pretrain.main(small_cfg(tmp_path, data=str(data), steps=1, debug_nan_step=1, eval_every=0))
    assert ckpt.latest_checkpoint(tmp_path / "run" / "ckpt") is None
    assert not (tmp_path / "run" / "final.json").exists()


def test_non_finite_weights_are_never_saved(tmp_path):
    torch.manual_seed(0)
    model = Transformer(model_micro())
    with torch.no_grad():
        model.embed.weight[3, 1] = float("nan")
    with pytest.raises(UserError, match="embed.weight holds NaN or inf"):
        ckpt.save_checkpoint(tmp_path / "ckpt", 1, model, None, {})
    assert ckpt.latest_checkpoint(tmp_path / "ckpt") is None and not list((tmp_path / "ckpt").glob(".tmp-*"))
