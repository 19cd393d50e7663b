"""``tinyseek pretrain --parallel``: the device-mesh layouts against today's data parallelism, and
bad layouts refused in one line before any collective (2 processes under torchrun, gloo, fp32).

One torchrun launch runs every layout in turn (one process group; ``pretrain.main`` finds it
started), on small patterned token shards written once, so the suite pays the start-up once; the
same launch resumes checkpoints under other layouts.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinyseek import cli
from tinyseek.data.shards import write_shards
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import dist_ckpt
from test_distributed import ROOT, torchrun

COMMON = ["--preset", "micro", "--steps", "5", "--batch-size", "4", "--grad-accum", "2", "--log-every", "1",
          "--eval-every", "0", "--eval-batches", "1", "--ckpt-every", "3", "--peak-flops", "1e11", "--progress", "false"]
LAYOUTS = {  # run name -> extra flags
    "ddp": ["--dist-mode", "ddp"],
    "dp2": ["--parallel", "dp=2"],
    "fsdp": ["--dist-mode", "fsdp"],
    "dp_shard2": ["--parallel", "dp_shard=2"],
    "tp2": ["--parallel", "tp=2", "--batch-size", "8"],  # both ranks read the global batch of 8
    "ep2": ["--parallel", "dp=2,ep=2"],  # 4 sequences a rank: the same global batch of 8
    "shard_ep2": ["--parallel", "dp_shard=2,ep=2"],  # FSDP2 over the replicated weights, experts split
    "pp2": ["--parallel", "pp=2", "--batch-size", "8"],  # 2 stages, 2 micro-batches of 8 through 1F1B
    # fp16: the loss scale applied through the pipeline schedule, the unscale over TP's DTensor gradients
    "pp2_fp16": ["--parallel", "pp=2", "--batch-size", "8", "--dtype", "fp16"],
    "tp2_fp16": ["--parallel", "tp=2", "--batch-size", "8", "--dtype", "fp16"],
    # step 3's checkpoint of one layout resumed under another (the global batch is kept)
    "tp2_to_pp2": ["--parallel", "pp=2", "--resume-from", "tp2/ckpt/step_000003"],
    "pp2_to_ep2": ["--parallel", "dp=2,ep=2", "--resume-from", "pp2/ckpt/step_000003"],
}
WORKER = textwrap.dedent("""
    import json, shutil, sys
    from tinyseek.cli import run_stage
    from tinyseek.train import distributed as D
    out, data, runs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    dist = D.init_distributed("cpu")  # one process group for every run (a re-initialised one hangs under torchrun)
    cleanup, D.cleanup = D.cleanup, lambda dist=None: D._set_active_stats(None)
    for name, flags in runs.items():
        if "--resume-from" in flags:  # an earlier run's checkpoint, copied in and resumed
            i = flags.index("--resume-from")
            src, flags = flags[i + 1], flags[:i] + flags[i + 2:] + ["--resume"]
            if dist.rank == 0:
                shutil.copytree(f"{out}/{src}", f"{out}/{name}/ckpt/{src.rsplit('/', 1)[1]}")
            D.barrier(dist)
        run_stage("pretrain", [*flags, "--data", data, "--run-dir", f"{out}/{name}"])
    cleanup(dist)
""")


def shards(root: Path) -> Path:
    """Documents that follow t -> 7t + 3 (mod 256) from a random start: learnable in a few steps."""
    rng = random.Random(0)
    docs = []
    for _ in range(60):
        t, doc = rng.randrange(256), []
        for _ in range(rng.randrange(200, 2000)):
            doc.append(t)
            t = (7 * t + 3) % 256
        docs.append(doc)
    write_shards(docs, root / "train", 257, 256)
    return root / "train"


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("par")
    script = out / "worker.py"
    script.write_text(WORKER)
    data = shards(out)
    torchrun([str(script), str(out), str(data), json.dumps({k: COMMON + v for k, v in LAYOUTS.items()})],
             cwd=out, timeout=180)
    return out


@pytest.fixture(scope="module")
def one_process(runs, tmp_path_factory) -> Path:
    """The global batch of the 2-rank runs (8 sequences a micro-step) in one process."""
    run = tmp_path_factory.mktemp("one") / "run"
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        assert cli.main(["pretrain", *COMMON, "--batch-size", "8", "--data", str(runs / "train"),
                         "--run-dir", str(run)]) == 0
    finally:
        os.environ.update(env)
    return run


@pytest.mark.parametrize("run", ["pp2_fp16", "tp2_fp16"])
def test_fp16_layouts_match_one_process_fp16(runs, tmp_path, run):
    """``--dtype fp16`` under pp=2 (the scale multiplies the schedule's loss and every stage's balance
    loss; the returned losses are unscaled) and tp=2 (DTensor and plain gradients unscaled alike): one
    fp16 process's losses within 1e-4 (fp16 summation order; measured 2e-5) and the same loss scale."""
    env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        assert cli.main(["pretrain", *COMMON, "--batch-size", "8", "--dtype", "fp16", "--ckpt-every", "0",
                         "--data", str(runs / "train"), "--run-dir", str(tmp_path / "one")]) == 0
    finally:
        os.environ.update(env)
    par, one = losses(runs / run), losses(tmp_path / "one")
    assert [s for s, _ in par] == [s for s, _ in one] == [1, 2, 3, 4, 5]
    assert max(abs(a - b) for (_, a), (_, b) in zip(par, one)) < 1e-4, (par, one)
    scale = lambda r: [x.get("loss_scale") for x in map(json.loads, (r / "metrics.jsonl").read_text().splitlines())
                       if "loss" in x]  # noqa: E731
    assert scale(runs / run) == scale(tmp_path / "one") and scale(runs / run)[0] == 65536.0


@pytest.mark.parametrize("mesh_run, today", [("dp2", "ddp"), ("dp_shard2", "fsdp")])
def test_parallel_dp_matches_todays_data_parallelism(runs, mesh_run, today):
    """``--parallel dp=2`` is DDP over the mesh's dp dim and ``dp_shard=2`` FSDP2 over its dp_shard
    dim: the same losses and the same final weights, bit for bit, as ``--dist-mode ddp / fsdp``."""
    a, b = losses(runs / mesh_run), losses(runs / today)
    assert [s for s, _ in a] == [1, 2, 3, 4, 5] and a == b
    assert a[-1][1] < a[0][1]
    ck = "ckpt/step_000005/model.safetensors"
    w, w0 = load_file(runs / mesh_run / ck), load_file(runs / today / ck)
    assert w.keys() == w0.keys() and all(torch.equal(w[k], w0[k]) for k in w)
    meta = json.loads((runs / mesh_run / "ckpt/step_000005/meta.json").read_text())
    assert meta["parallel"] == {"dp2": "dp=2,dp_shard=1,tp=1,pp=1,ep=1",
                                "dp_shard2": "dp=1,dp_shard=2,tp=1,pp=1,ep=1"}[mesh_run]
    final = json.loads((runs / mesh_run / "final.json").read_text())
    assert final["world_size"] == 2 and final["tokens_seen"] == 5 * 4 * 2 * 2 * 64  # steps x B x accum x dp x T


@pytest.mark.parametrize("run", ["dp2", "dp_shard2", "tp2", "ep2", "shard_ep2", "pp2"])
def test_parallel_layouts_match_one_process(runs, one_process, run):
    """``--parallel dp=2`` and ``dp_shard=2`` (the MoE's load statistics over both replicas),
    ``tp=2`` (DTensor over heads and FFN widths, both ranks reading the same batch),
    ``dp=2,ep=2`` (2 of 4 routed experts a rank, tokens all-to-all, load statistics over both
    ranks), ``dp_shard=2,ep=2`` (the same with FSDP2 sharding the rest) and ``pp=2`` (one block a
    stage, the step's micro-batches through 1F1B): the losses of one process on the same global
    batch within 1e-5 over 5 steps, the same final weights (model.safetensors, read back from the
    distributed checkpoint) and AdamW moments (its train_state/, read whole) within 1e-5."""
    par, one = losses(runs / run), losses(one_process)
    assert [s for s, _ in par] == [s for s, _ in one] == [1, 2, 3, 4, 5]
    assert max(abs(a - b) for (_, a), (_, b) in zip(par, one)) < 1e-5, (par, one)
    ck = runs / run / "ckpt/step_000005"
    a, b = load_file(ck / "model.safetensors"), load_file(one_process / "ckpt/step_000005/model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)
    oa, ob = (dist_ckpt.read_flat(d / "train_state") for d in (ck, one_process / "ckpt/step_000005"))
    assert oa.keys() == ob.keys() and any(k.endswith("experts.w_gate_up.exp_avg") for k in oa)
    for k in ob:  # weights, AdamW moments and step counts, by one-process name and shape
        torch.testing.assert_close(oa[k], ob[k], atol=1e-5, rtol=0, msg=k)
    final = json.loads((runs / run / "final.json").read_text())
    assert final["tokens_seen"] == 5 * 8 * 2 * 64  # the global batch: 8 sequences x 2 micro-steps
    ref = json.loads((one_process / "final.json").read_text())
    assert abs(final["val_loss"] - ref["val_loss"]) < 1e-5  # held-out loss (pp: the schedule's eval pass)


LAYOUTS_4 = {  # 4 ranks, the same global batch of 8 sequences a micro-step; every dimension alone and composed
    "tp4": ["--parallel", "tp=4", "--batch-size", "8"],
    "dp4ep4": ["--parallel", "dp=4,ep=4", "--batch-size", "2"],      # one routed expert a rank
    "dp2tp2": ["--parallel", "dp=2,tp=2"],                           # HSDP (replicate 2) over TP DTensors
    "dp4ep2": ["--parallel", "dp=4,ep=2", "--batch-size", "2"],      # expert grads averaged over 2 replicas
    "pp2dp2": ["--parallel", "pp=2,dp=2"],                           # two 2-stage pipelines, stage grads averaged
    "pp2tp2": ["--parallel", "pp=2,tp=2", "--batch-size", "8"],      # TP'd stages
    "pp2dp2ep2": ["--parallel", "pp=2,dp=2,ep=2"],                   # experts split inside each stage
    "pp2shard2": ["--parallel", "pp=2,dp_shard=2"],                  # FSDP2 on each stage
    "dp2tp2ep2": ["--parallel", "dp=2,tp=2,ep=2"],                   # EP groups per TP coordinate
    "shard2tp2ep2": ["--parallel", "dp_shard=2,tp=2,ep=2"],          # FSDP2 x TP, experts out of FSDP
    "hsdp_ep4": ["--parallel", "dp=2,dp_shard=2,ep=4", "--batch-size", "2"],
    "pp4": ["--parallel", "pp=4", "--batch-size", "8", "--model.n-layers", "4", "--grad-accum", "4"],
    # step 3 of a composed layout resumed under another composed one (experts resharded 2 -> 2 over new groups)
    "pp2dp2ep2_to_shard2tp2ep2": ["--parallel", "dp_shard=2,tp=2,ep=2", "--resume-from", "pp2dp2ep2/ckpt/step_000003"],
}
DEEPER = ["--model.n-layers", "4", "--grad-accum", "4"]  # pp4's one-process reference


@pytest.mark.slow
def test_four_rank_layouts(runs, one_process, tmp_path):
    """Every dimension on 4 ranks (tp=4, dp=4 x ep=4, pp=4) and composed (dp x tp, dp x ep, pp x dp,
    pp x tp, pp x dp x ep, pp x dp_shard, dp x tp x ep, dp_shard x tp x ep, HSDP x ep) gives one
    process's losses and final weights on the same global batch within 1e-5; so does pp x dp x ep's
    step-3 checkpoint resumed as dp_shard x tp x ep."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4",
           str(runs / "worker.py"), str(tmp_path), str(runs / "train"),
           json.dumps({k: COMMON + v for k, v in LAYOUTS_4.items()})]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    env1 = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
    try:
        assert cli.main(["pretrain", *COMMON, "--batch-size", "8", *DEEPER, "--data", str(runs / "train"),
                         "--run-dir", str(tmp_path / "one4")]) == 0
    finally:
        os.environ.update(env1)
    for run in LAYOUTS_4:
        ref = tmp_path / "one4" if run == "pp4" else one_process
        par, one = losses(tmp_path / run), losses(ref)
        if "_to_" in run:
            one = one[3:]
        assert len(par) == len(one) and max(abs(a - b) for (_, a), (_, b) in zip(par, one)) < 1e-5, (run, par, one)
        a = load_file(tmp_path / run / "ckpt/step_000005/model.safetensors")
        b = load_file(ref / "ckpt/step_000005/model.safetensors")
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=f"{run}: {k}")


@pytest.mark.parametrize("run", ["tp2_to_pp2", "pp2_to_ep2", "ep2_to_one"])
def test_resume_under_another_layout(runs, one_process, tmp_path, run):
    """Step 3's checkpoint of tp=2 resumed as pp=2, of pp=2 as dp=2,ep=2, of dp=2,ep=2 in one
    process: steps 4 and 5 are the uninterrupted one-process run's (within 1e-5), and so are the
    final weights."""
    if run == "ep2_to_one":
        shutil.copytree(runs / "ep2/ckpt/step_000003", tmp_path / "run/ckpt/step_000003")
        env = {k: os.environ.pop(k) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK") if k in os.environ}
        try:
            assert cli.main(["pretrain", *COMMON, "--data", str(runs / "train"), "--run-dir", str(tmp_path / "run"),
                             "--resume"]) == 0
        finally:
            os.environ.update(env)
        out = tmp_path / "run"
    else:
        out = runs / run
    got, ref = losses(out), losses(one_process)[3:]
    assert [s for s, _ in got] == [4, 5] and max(abs(a - b) for (_, a), (_, b) in zip(got, ref)) < 1e-5, (got, ref)
    a = load_file(out / "ckpt/step_000005/model.safetensors")
    b = load_file(one_process / "ckpt/step_000005/model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=0, msg=k)


def test_sigkill_then_resume_under_torchrun_is_exact(runs, tmp_path):
    """``kill -9`` of torchrun and both ranks of a dp=2,ep=2 run once its step-3 checkpoint is on
    disk, then ``--resume`` under torchrun: steps 4 and 5 are the uninterrupted run's, bit for bit."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    run = tmp_path / "run"
    args = ["-m", "tinyseek", "pretrain", *COMMON, *LAYOUTS["ep2"], "--data", str(runs / "train"),
            "--run-dir", str(run)]
    victim = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                               *args], cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 120
    while ckpt.latest_checkpoint(run / "ckpt") is None:
        assert victim.poll() is None, "the run ended before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.002)
    os.killpg(victim.pid, signal.SIGKILL)  # torchrun and both ranks at once
    victim.wait()
    assert ckpt.latest_checkpoint(run / "ckpt").name == "step_000003"
    torchrun([*args, "--resume"], cwd=tmp_path)
    assert losses(run) == losses(runs / "ep2")


def test_bad_layout_under_torchrun_is_one_line_before_any_collective(tmp_path):
    """tp=3 on 2 processes: the ranks stop in Config.validate (WORLD_SIZE from torchrun's
    environment) with status 2 and one line; nothing waits on a collective."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "tinyseek",
           "pretrain", *COMMON, "--run-dir", str(tmp_path / "run"), "--parallel", "tp=3"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    msg = ("tinyseek: error: --parallel dp=1,dp_shard=1,tp=3,pp=1,ep=1 needs pp*dp*dp_shard*tp = 1*1*1*3 = 3 "
           "processes, but the world has 2")
    lines = (proc.stdout + proc.stderr).splitlines()
    errors = [line.strip() for line in lines if "tinyseek: error" in line]
    # one line from each rank that got to print before torchrun stopped the other (SIGTERM)
    assert errors and set(errors) == {msg}, proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # torchrun's report of the ranks' status
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


@pytest.mark.parametrize("flags, msg", [
    (["--parallel", "dp=3"], "needs pp*dp*dp_shard*tp = 1*3*1*1 = 3 processes, but the world has 2"),
    (["--parallel", "dp=1,tp=2,ep=2"], "ep=2 must divide dp*dp_shard = 1*1 = 1"),
    (["--parallel", "pp=2", "--model.tie-embeddings", "true"], "pp=2 needs untied embeddings"),
    (["--parallel", "pp=2", "--grad-accum", "1"], "pp=2 needs --grad-accum >= 2 (1F1B runs at least one micro-batch"),
    (["--parallel", "dp=2,ep=4"], "ep=4 must divide dp*dp_shard = 2*1 = 2"),
    (["--parallel", "dp=2,ep=3"], "ep=3 does not divide model.n_routed_experts = 4"),
    (["--parallel", "dp=2,sp=1"], "'sp=1' is not one of"),
    (["--parallel", "dp_shard=2", "--compression", "powersgd"], "powersgd is a DDP hook"),
])
def test_bad_layout_exits_2_with_one_line(monkeypatch, capsys, tmp_path, flags, msg):
    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun would set; validation never starts a group
    assert cli.main(["pretrain", *COMMON, "--run-dir", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("run, dims", [("dp2", {"dp"}), ("tp2", {"tp"}), ("ep2", {"dp", "ep"}),
                                       ("shard_ep2", {"dp_shard", "ep"}), ("pp2", {"pp"})])
def test_communication_is_probed_per_dimension(runs, run, dims):
    """Step 2 of every layout is a communication probe: a ``comm_probe`` event with the busiest
    rank's bytes, serialized time and calls for exactly the dimensions the layout uses (plus the
    small loss all-reduces over groups no dimension names), also in final.json; a one-process run
    never probes."""
    recs = [json.loads(line) for line in (runs / run / "metrics.jsonl").read_text().splitlines()]
    probes = [r for r in recs if r.get("event") == "comm_probe"]
    assert [r["step"] for r in probes] == [2]
    seen = {k.split("/")[1] for k in probes[0] if k.startswith("comm/")}
    assert dims <= seen <= dims | {"other", "edp"}, seen
    for d in dims:
        assert probes[0][f"comm/{d}/bytes"] > 0 and probes[0][f"comm/{d}/time_s"] > 0
    final = json.loads((runs / run / "final.json").read_text())
    assert {d: r["bytes"] for d, r in final["comm_probe"].items()} == {
        d: probes[0][f"comm/{d}/bytes"] for d in seen}


def test_one_process_never_probes(one_process):
    recs = [json.loads(line) for line in (one_process / "metrics.jsonl").read_text().splitlines()]
    assert not any(r.get("event") == "comm_probe" for r in recs)
    assert json.loads((one_process / "final.json").read_text())["comm_probe"] == {}
