"""Measured communication per dimension (tinyseek/train/comm_meter.py) against the analytic model
(tinyseek/train/comm_model.py) and the counters the parallel pieces keep themselves.

One 2-process torchrun launch (gloo, CPU; tests/comm_meter_worker.py) meters one forward + backward
of the micro model (2 rows of 64 tokens a rank) under ``dp=2`` (DDP), ``tp=2``, ``dp=2,ep=2`` and
``pp=2`` (1F1B, 2 micro-batches of 2 rows). What each layout must show, per rank:

- ``dp=2``: DDP's gradient all-reduce (its Python comm hook, in the backward) sends exactly what
  ``comm_model.comm_bytes(cfg, ParallelSpec(dp=2), 2, 64)["dp"]`` predicts (fp32 buckets, no
  padding on CPU: exact). The meter also sees what the model leaves out: DDP's broadcast of the
  buffers (the MoE ``expert_bias``, rotary tables) from rank 0 in every forward.
- ``tp=2``: the functional all-reduces DTensor issues equal comm_model's ``"tp"`` term exactly: 4
  forward (o_proj and the FFN / shared-expert down_proj outputs of 2 layers) and 10 backward (the
  column-wise projections' input gradients: q, kv_b, k_pe of each layer, gate and up of each FFN).
  The replicated norms' gradients need no reduction without sequence parallelism, so the model's
  leaving them out costs nothing here.
- ``dp=2,ep=2``: the ``ep`` dimension is the token all-to-alls, forward ``ExpertParallel.bytes_sent``
  and as much again in the backward, plus one split-size exchange per MoE layer (4 int64 counts,
  half of them leave: 16 bytes). comm_model's ``ep`` term assumes uniform routing (half of the
  ``tokens * top_k`` rows leave); the measured routing of an untrained router is near it, not equal
  (checked within 25%). The ``dp`` backward all-reduce is comm_model's ``dp`` (experts left out of
  DDP; ep == dp, so no expert-data-parallel reduction); the forward adds the load statistics'
  small all-reduces over the dp group (counts, P) and DDP's buffer broadcasts.
- ``pp=2``: P2P sends of ``micro-batches x rows x T x d_model x 4`` bytes (activations from stage 0,
  gradients from stage 1), which is comm_model's ``pp`` with ``grad_accum`` = micro-batches;
  receives count 0; plus the pipeline's all-reduce of (ce, aux) over the pp group.

Time: positive for every dimension with traffic, absent (zero) for every other. The unit tests
check the ring-bytes conversion of every op the meter knows, table-driven, without a process group.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_distributed import torchrun

from tinyseek.config import model_micro
from tinyseek.report import write_report
from tinyseek.train import comm_meter as CM
from tinyseek.train.comm_model import comm_bytes
from tinyseek.train.distributed import ring_bytes
from tinyseek.train.mesh import ParallelSpec

ROOT = Path(__file__).resolve().parents[1]
LAYOUTS = ["dp=2", "tp=2", "dp=2,ep=2", "pp=2"]
B, T, MICRO = 2, 64, 2  # as tests/comm_meter_worker.py


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, list[dict]]:
    out = tmp_path_factory.mktemp("comm_meter")
    torchrun([str(ROOT / "tests" / "comm_meter_worker.py"), str(out), *LAYOUTS], cwd=ROOT, timeout=120)
    return {lay: [torch.load(out / f"{lay}.rank{r}.pt", weights_only=True) for r in (0, 1)] for lay in LAYOUTS}


def sent(run: dict, dim: str, kind: str | None = None, backward: bool | None = None) -> int:
    return sum(r["bytes"] for r in run["records"] if r["dim"] == dim and (kind is None or r["kind"] == kind)
               and (backward is None or r["backward"] == backward))


@pytest.mark.parametrize("layout,dims", [("dp=2", {"dp"}), ("tp=2", {"tp"}), ("dp=2,ep=2", {"dp", "ep"}),
                                         ("pp=2", {"pp"})])
def test_time_where_traffic(runs, layout, dims):
    for run in runs[layout]:
        assert set(run["by_dim"]) == dims, run["by_dim"]  # nothing else, no "other"
        for d, row in run["by_dim"].items():
            assert row["bytes"] > 0 and row["time_s"] > 0 and row["calls"] > 0, (d, row)
            assert row["bytes"] == sent(run, d) and row["calls"] == sum(r["dim"] == d for r in run["records"])
        assert run["unknown"] == {}


def test_ddp_matches_comm_model(runs):
    cfg = model_micro()
    want = comm_bytes(cfg, ParallelSpec(dp=2), B, T)["dp"]
    for run in runs["dp=2"]:
        assert sent(run, "dp", "all_reduce", backward=True) == want
        assert sent(run, "dp", "all_reduce", backward=False) == 0
        kinds = {r["kind"] for r in run["records"] if not r["backward"]}
        assert kinds == {"broadcast"}  # DDP's buffer broadcast, forward
        assert 0 < sent(run, "dp", "broadcast") < want / 50


def test_tp_matches_comm_model(runs):
    want = comm_bytes(model_micro(), ParallelSpec(tp=2), B, T)["tp"]
    for run in runs["tp=2"]:
        assert sent(run, "tp") == sent(run, "tp", "all_reduce") == want
        fwd = [r for r in run["records"] if not r["backward"]]
        assert len(fwd) == 4 and len(run["records"]) == 14
        assert {r["op"] for r in run["records"]} == {"_c10d_functional.all_reduce"}


def test_ep_matches_its_own_counter(runs):
    cfg = model_micro()
    n_moe = cfg.n_layers - cfg.n_dense_layers
    splits = n_moe * CM.sent_bytes("all_to_all", cfg.n_routed_experts * 8, 2)
    for run in runs["dp=2,ep=2"]:
        assert run["ep_bytes_sent"] > 0
        assert sent(run, "ep") == 2 * run["ep_bytes_sent"] + splits
        assert sent(run, "ep", backward=True) == run["ep_bytes_sent"]
        model = comm_bytes(cfg, ParallelSpec(dp=2, ep=2), B, T)
        assert 0.75 * model["ep"] < sent(run, "ep") < 1.25 * model["ep"]  # uniform routing vs measured
        assert sent(run, "dp", "all_reduce", backward=True) == model["dp"]
        load_stats = sent(run, "dp", "all_reduce", backward=False)
        assert 0 < load_stats < 1024


def test_pp_sends(runs):
    cfg = model_micro()
    want = MICRO * B * T * cfg.d_model * 4
    assert comm_bytes(cfg, ParallelSpec(pp=2), B, T, grad_accum=MICRO)["pp"] == want
    for run in runs["pp=2"]:
        assert sent(run, "pp", "send") == want
        assert [r["bytes"] for r in run["records"] if r["kind"] == "recv"] == [0] * MICRO
        assert sent(run, "pp", "all_reduce") == ring_bytes("all_reduce", 2 * 4, 2)


# --- unit: the ring-bytes conversion of every op, no process group -------------------------------
def t(n: int) -> torch.Tensor:
    return torch.zeros(n)  # n fp32 elements: 4n bytes


W, ME = 4, 1  # a 4-rank group, this rank 1
CASES = {  # op -> (args as the dispatcher passes them, bytes this rank sends)
    "c10d.allreduce_": (([t(10), t(5)], None), 2 * 3 * 60 // 4),
    "c10d.allreduce_coalesced_": (([t(10)], None), 60),
    "c10d._allgather_base_": ((t(40), t(10), None), 120),  # (W-1)/W of the gathered 160 bytes
    "c10d.allgather_": (([[t(10)] * W], [t(10)], None), 120),
    "c10d.allgather_coalesced_": (([[t(10)] * W], [t(10)], None), 120),
    "c10d.allgather_into_tensor_coalesced_": (([t(40)], [t(10)], None), 120),
    "c10d._reduce_scatter_base_": ((t(10), t(40), None), 120),
    "c10d.reduce_scatter_": (([t(10)], [[t(10)] * W], None), 120),
    "c10d.reduce_scatter_tensor_coalesced_": (([t(10)], [t(40)], None), 120),
    "c10d.alltoall_base_": ((t(40), torch.zeros(10, 4), None, [], [1, 2, 3, 4]), (10 - 2) * 16),
    "c10d.alltoall_": (([t(1)] * W, [t(1), t(2), t(3), t(4)], None), (1 + 3 + 4) * 4),
    "c10d.broadcast_": (([t(10)], None, 0, 0), 30),
    "c10d.reduce_": (([t(10)], None, None, 0, 0), 30),
    "c10d.gather_": (([], [t(10)], None, 0), 40),  # this rank is not the root
    "c10d.scatter_": (([t(10)], [], None, 0), 0),  # nor here
    "c10d.send": (([t(10)], None, 0, 0), 40),
    "c10d.recv_": (([t(10)], None, 0, 0), 0),
    "c10d.recv_any_source_": (([t(10)], None, 0), 0),
    "c10d.barrier": ((t(1), None, []), 0),
    "c10d.monitored_barrier_": ((t(1), None, [], 0, False), 0),
    "_c10d_functional.all_reduce": ((t(10), "sum", "g"), 60),
    "_c10d_functional.all_reduce_": ((t(10), "sum", "g"), 60),
    "_c10d_functional.all_reduce_coalesced": (([t(10), t(10)], "sum", "g"), 120),
    "_c10d_functional.all_reduce_coalesced_": (([t(10)], "sum", "g"), 60),
    "_c10d_functional.all_gather_into_tensor": ((t(10), W, "g"), 120),
    "_c10d_functional.all_gather_into_tensor_out": ((t(10), W, "g"), 120),
    "_c10d_functional.all_gather_into_tensor_coalesced": (([t(10)], W, "g"), 120),
    "_c10d_functional.reduce_scatter_tensor": ((t(40), "sum", W, "g"), 120),
    "_c10d_functional.reduce_scatter_tensor_out": ((t(40), "sum", W, "g"), 120),
    "_c10d_functional.reduce_scatter_tensor_coalesced": (([t(40)], "sum", W, "g"), 120),
    "_c10d_functional.all_to_all_single": ((torch.zeros(10, 4), [], [4, 3, 2, 1], "g"), (10 - 3) * 16),
    "_c10d_functional.broadcast": ((t(10), 0, "g"), 30),
    "_c10d_functional.broadcast_": ((t(10), 0, "g"), 30),
    "_c10d_functional.isend": ((t(10), 0, 0, "g"), 40),
    "_c10d_functional.irecv": ((t(10), 0, 0, "g"), 0),
}


def test_every_op_has_a_case():
    assert set(CASES) == set(CM.OPS)


@pytest.mark.parametrize("op", sorted(CASES))
def test_op_sent_bytes(op):
    args, want = CASES[op]
    kind, got = CM.op_sent_bytes(op, args, W, ME)
    assert got == want, (op, kind)
    assert CM.op_sent_bytes(op, args, 1, 0)[1] == 0  # a one-rank group sends nothing
    spec = CM.OPS[op]
    assert spec.group_arg < len(args) and args[spec.group_arg] in (None, "g")  # the group is where it reads it


def test_ring_convention_matches_distributed():
    for kind in ("all_reduce", "all_gather", "reduce_scatter"):
        for w in (1, 2, 3, 8):
            assert CM.sent_bytes(kind, 1000, w) == ring_bytes(kind, 1000, w)
    root_side = [CM.sent_bytes("scatter", 400, 4, rank=0, root=0), CM.sent_bytes("gather", 10, 4, rank=0, root=0)]
    assert root_side == [300, 0]
    with pytest.raises(ValueError):
        CM.sent_bytes("all_to_some", 1, 2)


def test_covers_torchs_own_list():
    """Every collective torch's CommDebugMode counts is one the meter reads (its private lists)."""
    mode = pytest.importorskip("torch.distributed.tensor.debug._comm_mode")
    theirs = {str(op) for op in getattr(mode, "c10d_collective_ops", ())}
    theirs |= {str(op) for op in getattr(mode, "NATIVE_TO_PY_MAPPING", {}) if "autograd" not in str(op)}
    assert theirs and theirs <= set(CM.OPS), theirs - set(CM.OPS)


def test_report_shows_the_probed_communication(tmp_path):
    """The run report's Communication section: one row per dimension the probe saw, from the
    pretraining result (final.json / the stage marker's ``comm_probe``); absent without a probe."""
    run = tmp_path / "run"
    (run / "stages").mkdir(parents=True)
    result = {"step": 5, "loss": 4.9, "parallel": "dp=2,dp_shard=1,tp=2,pp=1,ep=1",
              "comm_probe": {"dp": {"bytes": 123456, "time_s": 0.01, "calls": 11},
                             "tp": {"bytes": 2949180, "time_s": 0.09, "calls": 30}}}
    (run / "stages" / "pretrain.json").write_text(json.dumps(result))
    write_report(run)
    md = (run / "report" / "report.md").read_text()
    assert "Communication" in md and "--parallel dp=2,dp_shard=1,tp=2,pp=1,ep=1" in md
    assert "| dp | 123456 | 0.01 | 11 |" in md and "| tp | 2949180 | 0.09 | 30 |" in md
    (run / "stages" / "pretrain.json").write_text(json.dumps({"step": 5, "loss": 4.9}))
    write_report(run)
    assert "Communication" not in (run / "report" / "report.md").read_text()
