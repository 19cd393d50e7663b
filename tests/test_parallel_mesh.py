"""The device mesh (tinyseek/train/mesh.py): parsing ``--parallel``, validating a layout against the
world size and the model before any collective, the rank layout, and a real 2-rank mesh (gloo)."""
from __future__ import annotations

import dataclasses
import textwrap

import pytest
import torch

from tinyseek.config import ConfigError, model_micro
from tinyseek.train.mesh import ParallelSpec, parse_parallel, resolve
from test_distributed import ROOT, torchrun


# --- parsing -------------------------------------------------------------------------------------
def test_parse_all_keys_and_defaults():
    assert parse_parallel("dp=2,tp=2,pp=1,ep=2,dp_shard=1") == ParallelSpec(dp=2, tp=2, pp=1, ep=2, dp_shard=1)
    assert parse_parallel("") == ParallelSpec()
    assert parse_parallel("dp_shard=4") == ParallelSpec(dp_shard=4)
    assert parse_parallel(str(ParallelSpec(dp=2, tp=3, ep=2))) == ParallelSpec(dp=2, tp=3, ep=2)


@pytest.mark.parametrize("text, msg", [
    ("dp=2,cp=2", "'cp=2' is not one of dp=N, dp_shard=N, tp=N, pp=N, ep=N"),
    ("tp", "'tp' is not one of"),
    ("dp=two", "dp must be a positive integer, got 'two'"),
    ("dp=1.5", "dp must be a positive integer, got '1.5'"),
    ("tp=0", "tp must be a positive integer, got '0'"),
    ("pp=-1", "pp must be a positive integer, got '-1'"),
    ("dp=2,dp=2", "dp is given twice"),
])
def test_parse_errors_are_one_line(text, msg):
    with pytest.raises(ConfigError) as e:
        parse_parallel(text)
    assert msg in str(e.value) and "\n" not in str(e.value)


def test_resolve_default_is_todays_data_parallelism():
    assert resolve("", 2, "ddp") == ParallelSpec(dp=2)
    assert resolve("", 2, "fsdp") == ParallelSpec(dp_shard=2)
    assert resolve("  ", 1, "ddp") == ParallelSpec()
    assert resolve("tp=2", 2, "fsdp") == ParallelSpec(tp=2)  # --parallel wins over --dist-mode


# --- validation table (pure arithmetic: no process group) ----------------------------------------------
MICRO = model_micro()  # 4 heads (MLA), d_ff 128, 4 routed experts, shared width 32, 2 layers (1 dense)
GQA = dataclasses.replace(model_micro(), attn="gqa", n_kv_heads=2)
DENSE = dataclasses.replace(model_micro(), n_routed_experts=0)


@pytest.mark.parametrize("spec, world, model, ok", [
    (ParallelSpec(dp=2), 2, MICRO, True),
    (ParallelSpec(tp=2), 2, MICRO, True),
    (ParallelSpec(tp=4), 4, MICRO, True),
    (ParallelSpec(pp=2), 2, MICRO, True),
    (ParallelSpec(dp=2, ep=2), 2, MICRO, True),
    (ParallelSpec(dp=2, dp_shard=2, ep=4), 4, MICRO, True),
    (ParallelSpec(dp=2, tp=2, ep=2), 4, MICRO, True),
    (ParallelSpec(pp=2, dp=2), 4, MICRO, True),
    (ParallelSpec(tp=2), 2, GQA, True),
    (ParallelSpec(tp=4), 4, GQA, False),  # 2 KV heads
    (ParallelSpec(dp=2), 4, MICRO, False),
    (ParallelSpec(tp=3), 3, MICRO, False),
    (ParallelSpec(ep=2), 1, MICRO, False),  # ep carved from dp*dp_shard = 1
    (ParallelSpec(dp=3, ep=3), 3, MICRO, False),  # 4 experts
    (ParallelSpec(dp=2, ep=2), 2, DENSE, False),
    (ParallelSpec(pp=3), 3, MICRO, False),  # 2 layers
])
def test_validate_table(spec, world, model, ok):
    if ok:
        assert spec.validate(world, model) is spec
    else:
        with pytest.raises(ConfigError) as e:
            spec.validate(world, model)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("spec, world, model, msg", [
    (ParallelSpec(dp=2, tp=2), 2, MICRO, "needs pp*dp*dp_shard*tp = 1*2*1*2 = 4 processes, but the world has 2"),
    (ParallelSpec(tp=3), 3, MICRO, "tp=3 does not divide model.n_heads = 4"),
    (ParallelSpec(tp=4), 4, GQA, "tp=4 does not divide model.n_kv_heads = 2"),
    (ParallelSpec(tp=2), 2, dataclasses.replace(model_micro(), d_ff=129), "tp=2 does not divide model.d_ff = 129"),
    (ParallelSpec(tp=2), 2, dataclasses.replace(model_micro(), shared_d_ff=33), "shared expert's width"),
    (ParallelSpec(dp=3, ep=3), 3, MICRO, "ep=3 does not divide model.n_routed_experts = 4"),
    (ParallelSpec(dp=2, ep=4), 2, dataclasses.replace(model_micro(), n_routed_experts=8),
     "ep=4 must divide dp*dp_shard = 2*1 = 2"),
    (ParallelSpec(dp=2, ep=2), 2, DENSE, "ep=2 needs a MoE model"),
    (ParallelSpec(pp=3), 3, MICRO, "pp=3 exceeds model.n_layers = 2"),
])
def test_validate_messages_name_the_numbers(spec, world, model, msg):
    with pytest.raises(ConfigError, match=msg.replace("*", r"\*").replace("(", r"\(").replace(")", r"\)")):
        spec.validate(world, model)


def test_dense_model_with_no_dense_ffn_width_is_not_checked_for_moe_only():
    # an all-MoE model (no dense block) does not need tp to divide d_ff
    m = dataclasses.replace(model_micro(), n_dense_layers=0, d_ff=129)
    ParallelSpec(tp=2).validate(2, m)


# --- rank layout -----------------------------------------------------------------------------------
def test_rank_layout_is_row_major_pp_dp_shard_tp():
    s = ParallelSpec(pp=2, dp=2, dp_shard=2, tp=2)
    grid = torch.arange(16).view(s.shape)
    for r in range(16):
        c = s.coords(r)
        assert grid[c["pp"], c["dp"], c["dp_shard"], c["tp"]] == r == s.rank_of(**c)
        assert s.dp_rank(r) == c["dp"] * 2 + c["dp_shard"]
    assert s.dp_groups()[0] == [0, 2, 4, 6] and s.dp_groups()[-1] == [9, 11, 13, 15]
    assert sorted(r for g in s.dp_groups() for r in g) == list(range(16))


def test_ep_groups_partition_each_dp_group():
    s = ParallelSpec(dp=2, dp_shard=2, tp=2, ep=2)
    groups = s.ep_groups()
    assert groups == [[0, 2], [4, 6], [1, 3], [5, 7]]  # inside one dp_shard group first
    assert sorted(r for g in groups for r in g) == list(range(8))
    for g in groups:  # same tp coordinate, distinct data-parallel coordinates
        assert len({s.coords(r)["tp"] for r in g}) == 1 and len({s.dp_rank(r) for r in g}) == len(g)


# --- a real mesh on 2 ranks ---------------------------------------------------------------------------------
WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as tdist
    from tinyseek.config import model_micro
    from tinyseek.train import distributed as D
    from tinyseek.train.mesh import build_mesh, dp_group, ep_group, parse_parallel

    dist = D.init_distributed("cpu")
    out = {}
    for text in ("dp=2,ep=2", "tp=2", "dp_shard=2"):
        spec = parse_parallel(text).validate(dist.world_size, model_micro())
        mesh = build_mesh(spec, "cpu")
        ep, dpg = ep_group(mesh, spec), dp_group(mesh, spec)
        t = torch.tensor([float(dist.rank + 1)])
        if ep is not None:
            tdist.all_reduce(t, group=ep)
        u = torch.tensor([float(dist.rank + 1)])
        tdist.all_reduce(u, group=dpg)
        out[text] = {"names": mesh.mesh_dim_names, "shape": tuple(mesh.mesh.shape),
                     "sizes": {d: mesh[d].size() for d in mesh.mesh_dim_names},
                     "local": {d: mesh[d].get_local_rank() for d in mesh.mesh_dim_names},
                     "ep_sum": t.item(), "dp_sum": u.item(), "dp_rank": spec.dp_rank(dist.rank)}
    torch.save(out, sys.argv[1] + f"/mesh.rank{dist.rank}.pt")
    D.cleanup(dist)
""")


def test_two_rank_mesh(tmp_path):
    script = tmp_path / "mesh_worker.py"
    script.write_text(WORKER)
    torchrun([str(script), str(tmp_path)], cwd=ROOT, timeout=120)
    res = [torch.load(tmp_path / f"mesh.rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r, out in enumerate(res):
        dp = out["dp=2,ep=2"]
        assert dp["names"] == ("pp", "dp", "dp_shard", "tp") and dp["shape"] == (1, 2, 1, 1)
        assert dp["sizes"] == {"pp": 1, "dp": 2, "dp_shard": 1, "tp": 1}
        assert dp["local"]["dp"] == r and dp["dp_rank"] == r
        assert dp["ep_sum"] == 3.0 and dp["dp_sum"] == 3.0  # both ranks in one EP and one DP group
        tp = out["tp=2"]
        assert tp["shape"] == (1, 1, 1, 2) and tp["local"]["tp"] == r and tp["local"]["dp"] == 0
        assert tp["dp_sum"] == r + 1.0 and tp["dp_rank"] == 0  # a DP group of one: both read the same batch
        assert tp["ep_sum"] == r + 1.0  # no EP group
        sh = out["dp_shard=2"]
        assert sh["shape"] == (1, 1, 2, 1) and sh["local"]["dp_shard"] == r and sh["dp_rank"] == r
