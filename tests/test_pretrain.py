"""Pretraining engine: grad-accumulation equivalence, exact resume after SIGKILL, NaN skip, smoke run."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tinyseek.common import read_metrics
from tinyseek.config import model_micro
from tinyseek.data.shards import read_index, write_shards
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import dist_ckpt
from tinyseek.train.pretrain import Config, build_byte_shards, fallback_texts, forward_backward, main

ROOT = Path(__file__).resolve().parents[1]


def tiny_model_cfg(**kw):
    m = model_micro()
    m.d_model, m.n_heads, m.d_ff, m.moe_d_ff, m.kv_lora_rank = 32, 2, 64, 16, 16
    m.qk_nope_head_dim, m.qk_rope_head_dim, m.v_head_dim = 8, 8, 8
    for k, v in kw.items():
        setattr(m, k, v)
    return m


def grads_after(model, batches, accum, **kw):
    model.zero_grad(set_to_none=True)
    it = iter(batches)
    fb = forward_backward(model, lambda: next(it), accum, **kw)
    return {n: p.grad.clone() for n, p in model.named_parameters()}, fb


@pytest.mark.parametrize("aux_loss", ["none", "switch"])
def test_grad_accumulation_equals_one_big_batch(aux_loss):
    """k micro-batches of b (the trainer's forward_backward) == one batch of k*b.

    Exact for the cross-entropy (equal tokens per micro-batch) and for the summed expert counts.
    The balance loss is a per-forward batch statistic: with aux on, the accumulated gradient equals
    the one-batch CE gradient plus the mean of the per-micro-batch balance-loss gradients."""
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg(aux_loss=aux_loss, aux_loss_alpha=0.1, vocab_size=64))
    k, b, T = 4, 2, 16
    x = torch.randint(0, 64, (k * b, T + 1))
    micro = [(x[i * b:(i + 1) * b, :-1], x[i * b:(i + 1) * b, 1:]) for i in range(k)]
    g_acc, fb_acc = grads_after(model, micro, k)
    g_big, fb_big = grads_after(model, [(x[:, :-1], x[:, 1:])], 1)
    assert torch.equal(fb_acc["counts"], fb_big["counts"])  # bias update sees identical counts
    assert torch.allclose(fb_acc["ce_loss"], fb_big["ce_loss"], rtol=1e-6, atol=1e-6)
    if aux_loss == "switch":
        # reference: one-batch CE + mean of the per-micro-batch aux losses
        model.zero_grad(set_to_none=True)
        out = model(x[:, :-1], x[:, 1:])
        ref = out.ce_loss + sum(model(xm, ym).aux_loss for xm, ym in micro) / k
        ref.backward()
        g_big = {n: p.grad.clone() for n, p in model.named_parameters()}
        assert fb_acc["aux_loss"] > 0
    for n in g_big:
        assert torch.allclose(g_acc[n], g_big[n], rtol=1e-4, atol=1e-6), f"{n}: max diff {(g_acc[n] - g_big[n]).abs().max()}"


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    model = Transformer(tiny_model_cfg(vocab_size=64))
    x = torch.randint(0, 64, (2, 17))
    g0, _ = grads_after(model, [(x[:, :-1], x[:, 1:])], 1)
    model.grad_checkpointing = True
    g1, _ = grads_after(model, [(x[:, :-1], x[:, 1:])], 1)
    for n in g0:
        assert torch.allclose(g0[n], g1[n], atol=1e-6), n


def repetitive_shards(path: Path, vocab: int = 64) -> Path:
    """A short repeating token pattern: a tiny model learns it within a few dozen steps."""
    pattern = [int(t) for t in torch.randint(1, vocab - 1, (37,), generator=torch.Generator().manual_seed(3))]
    write_shards([pattern * 40 for _ in range(20)], path, vocab_size=vocab, eos_id=vocab - 1)
    return path


def small_cfg(tmp: Path, **kw) -> Config:
    cfg = Config(name="t", run_dir=str(tmp / "run"), model=tiny_model_cfg(), steps=30, batch_size=4, seq_len=32,
                 lr=1e-2, min_lr=1e-3, warmup_steps=3, log_every=5, eval_every=15, ckpt_every=15, keep_last=1,
                 progress=False, peak_flops=1e11)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


def test_smoke_micro_writes_everything_and_loss_falls(tmp_path):
    data = repetitive_shards(tmp_path / "shards")
    res = main(small_cfg(tmp_path, data=str(data)))
    run = tmp_path / "run"
    recs = [r for r in read_metrics(run / "metrics.jsonl") if "loss" in r]
    assert [r["step"] for r in recs] == list(range(5, 31, 5))
    assert recs[-1]["loss"] < recs[0]["loss"] - 1.5, [r["loss"] for r in recs]
    for key in ("ce_loss", "aux_loss", "lr", "tokens_per_s", "mfu", "grad_norm", "load_frac", "load_max_mean", "dropped"):
        assert key in recs[-1], key
    assert len(recs[-1]["load_frac"]) == 1 and abs(sum(recs[-1]["load_frac"][0]) - 1) < 1e-3
    assert any("val_loss" in r for r in read_metrics(run / "metrics.jsonl"))
    assert (run / "loss.png").stat().st_size > 1000 and (run / "config.json").is_file()
    assert [p.name for _, p in ckpt.list_checkpoints(run / "ckpt")] == ["step_000030"]  # keep_last=1
    model, meta = ckpt.load_model(run)
    assert meta["step"] == 30 and meta["loader"]["pos"] > 0 and meta["tokens_seen"] == 30 * 4 * 32
    assert res["step"] == 30 and res["skipped_steps"] == 0
    assert model.cfg.vocab_size == read_index(data)["vocab_size"]
    # a fresh start must not silently mix with (or delete) an existing run's checkpoints
    with pytest.raises(UserError, match="--resume"):
        main(small_cfg(tmp_path, data=str(data)))


def test_micro_preset_default_data(tmp_path):
    """The real ``micro`` preset on the default byte-level corpus, a few steps: every artifact appears."""
    from tinyseek.tokenizer import load_tokenizer
    from tinyseek.train.pretrain import preset

    cfg = preset("micro")
    cfg.run_dir, cfg.steps, cfg.log_every, cfg.eval_every, cfg.progress = str(tmp_path / "m"), 4, 2, 0, False
    res = main(cfg)
    run = tmp_path / "m"
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r] == [2, 4]
    assert (run / "loss.png").is_file() and json.loads((run / "config.json").read_text())["steps"] == 4
    meta = ckpt.read_meta(ckpt.latest_checkpoint(run / "ckpt"))
    assert meta["step"] == 4 and meta["model_config"]["vocab_size"] == load_tokenizer(run / "tokenizer").vocab_size
    assert res["val_loss"] is not None and res["mfu"] > 0


def test_nan_loss_skips_step(tmp_path):
    data = repetitive_shards(tmp_path / "shards")
    res = main(small_cfg(tmp_path, data=str(data), steps=6, log_every=1, eval_every=0, ckpt_every=0, debug_nan_step=3))
    recs = read_metrics(tmp_path / "run" / "metrics.jsonl")
    skips = [r for r in recs if r.get("event") == "skipped_nonfinite"]
    assert [r["step"] for r in skips] == [3] and res["skipped_steps"] == 1
    assert [r["step"] for r in recs if "loss" in r] == [1, 2, 4, 5, 6]
    assert all(r["loss"] == r["loss"] for r in recs if "loss" in r)  # finite after the skip
    d = ckpt.latest_checkpoint(tmp_path / "run" / "ckpt")
    state = dist_ckpt.read_flat(d / "train_state")
    assert {float(v) for k, v in state.items() if k.endswith(".step")} == {5.0}  # 6 steps, one optimizer step skipped
    model, _ = ckpt.load_model(d)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_adaptive_accumulation_reaches_target(tmp_path):
    data = repetitive_shards(tmp_path / "shards")
    res = main(small_cfg(tmp_path, data=str(data), steps=2, target_tokens_per_step=4 * 32 * 3, batch_size=4,
                         eval_every=0, ckpt_every=0))
    assert res["micro_batch"] * res["grad_accum"] * 32 >= 4 * 32 * 3
    assert res["micro_batch"] <= 4 and res["tokens_seen"] == 2 * res["micro_batch"] * res["grad_accum"] * 32
    start = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("event") == "start"]
    assert len(start) == 1 and start[0]["adaptive"] and start[0]["grad_accum"] == res["grad_accum"]


def test_byte_fallback_is_deterministic(tmp_path):
    a = build_byte_shards(tmp_path / "a")
    b = build_byte_shards(tmp_path / "b")
    ia, ib = read_index(a[0]), read_index(b[0])
    from tinyseek.tokenizer import byte_tokenizer
    tok = byte_tokenizer()  # same ids as the byte tokenizer later stages use (chat special tokens included)
    assert ia["vocab_size"] == tok.vocab_size and ia["eos_id"] == tok.eos_id == 256 and ia["n_tokens"] > 10_000
    head = np.fromfile(a[0] / ia["shards"][0]["file"], dtype=np.uint16)[:64].tolist()
    assert bytes(head) == fallback_texts()[0][1].encode("utf-8")[:64]  # raw UTF-8 bytes, in path order
    assert [s["sha256"] for s in ia["shards"]] == [s["sha256"] for s in ib["shards"]]
    assert read_index(a[1])["n_tokens"] > 0


# --- exact resume after SIGKILL --------------------------------------------------------------------
def _cmd(run_dir: Path, data: Path, steps: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "tinyseek", "pretrain", "--run-dir", str(run_dir), "--data", str(data),
            "--model.d-model", "32", "--model.n-heads", "2", "--model.d-ff", "64", "--model.moe-d-ff", "16",
            "--model.kv-lora-rank", "16", "--model.qk-nope-head-dim", "8", "--model.qk-rope-head-dim", "8",
            "--model.v-head-dim", "8", "--steps", str(steps), "--batch-size", "4", "--seq-len", "32",
            "--log-every", "1", "--eval-every", "0", "--ckpt-every", str(steps // 2), "--keep-last", "0",
            "--warmup-steps", "2", "--progress", "false", "--peak-flops", "1e11", *extra]


def _env():
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # two runs share the cores: avoid OpenMP oversubscription (same for all runs)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _losses(run_dir: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run_dir / "metrics.jsonl") if "loss" in r]


def test_resume_after_sigkill_reproduces_loss_curve(tmp_path):
    N = 6
    data = repetitive_shards(tmp_path / "shards")
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    ref = subprocess.Popen(_cmd(straight, data, 2 * N), env=_env(), cwd=tmp_path,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # the victim: killed with SIGKILL as soon as its step-N checkpoint is on disk
    victim = subprocess.Popen(_cmd(killed, data, 2 * N), env=_env(), cwd=tmp_path,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(killed / "ckpt") is None:
        assert victim.poll() is None, "victim exited before writing its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.002)
    victim.send_signal(signal.SIGKILL)
    assert victim.wait() == -signal.SIGKILL
    assert ckpt.latest_checkpoint(killed / "ckpt").name == f"step_{N:06d}"
    _, err = ref.communicate(timeout=180)
    assert ref.returncode == 0, err.decode()[-2000:]

    proc = subprocess.run(_cmd(killed, data, 2 * N, "--resume"), env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    want, got = _losses(straight), _losses(killed)
    assert [s for s, _ in want] == list(range(1, 2 * N + 1))
    assert got == want  # bit-identical loss sequence, no duplicated or missing steps
    a = ckpt.load_weights(straight / "ckpt" / f"step_{2 * N:06d}" / "model.safetensors")
    b = ckpt.load_weights(killed / "ckpt" / f"step_{2 * N:06d}" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    meta = json.loads((killed / "ckpt" / f"step_{2 * N:06d}" / "meta.json").read_text())
    assert meta["tokens_seen"] == 2 * N * 4 * 32


@pytest.mark.slow
@pytest.mark.parametrize("mode,compression", [("ddp", "powersgd"), ("fsdp", "bf16")])
def test_torchrun_two_ranks(tmp_path, mode, compression):
    """``torchrun --nproc_per_node=2 -m tinyseek pretrain`` (gloo): loss falls, comm bytes logged, and
    the checkpoint resumes in a single process (FSDP2 checkpoints hold full, unsharded state)."""
    data = repetitive_shards(tmp_path / "shards")
    base = _cmd(tmp_path / "run", data, 16)[3:]  # drop "python -m tinyseek"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tinyseek",
           *base, "--dist-mode", mode, "--compression", compression, "--grad-accum", "2", "--lr", "1e-2"]
    proc = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r]
    assert len(recs) == 16 and recs[-1]["loss"] < recs[0]["loss"] - 1.0
    assert all(r["comm_bytes_per_step"] > 0 for r in recs)
    if compression == "powersgd":  # low-rank P, Q instead of full gradients
        assert recs[-1]["comm_ratio"] < 0.5
    meta = ckpt.read_meta(ckpt.latest_checkpoint(tmp_path / "run" / "ckpt"))
    assert meta["world_size"] == 2 and meta["tokens_seen"] == 16 * 2 * 2 * 4 * 32
    single = subprocess.run([sys.executable, "-m", "tinyseek", *_cmd(tmp_path / "run", data, 18)[3:], "--resume"],
                            env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert single.returncode == 0, single.stderr[-3000:]
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "loss" in r][-2:] == [17, 18]
