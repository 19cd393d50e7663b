"""The training state through DCP (tinyseek/train/dist_ckpt.py): saved under one parallel layout,
loaded under another.

The test writes the one-process run after 3 of 5 batches (``one3``) and its continuation (the
reference); one 2-rank torchrun (tests/dist_ckpt_worker.py, ~10 s) then, for each layout (tp=2;
dp=2,ep=2; pp=2 with the optimizer over the whole model; dp_shard=2 (FSDP2); dp=2 (DDP)), loads
``one3``, saves it again, trains the last two batches, saves, reloads into a fresh copy, and loads
some layouts' checkpoints into others. Checked: a load under any layout is exact (the re-saved
checkpoint holds ``one3``'s every tensor, AdamW moments and steps included, bit for bit); a
same-layout round trip is bit-exact and the next step's losses are equal; the steps after a load
follow the uninterrupted one-process run (losses within 1e-5: float summation order differs
between layouts); cross-layout loads are exact; a parallel checkpoint loads in one process;
``load_full_model_state`` works on rank 0 alone under a live process group; damaged, incomplete
and other-config checkpoints are one-line UserErrors. A slow 4-rank launch adds dp=4,ep=2 (expert
replicas), dp_shard=4 and tp=4.
"""
from __future__ import annotations

import dataclasses
import os
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch

from test_distributed import torchrun
from tinyseek.config import model_micro
from tinyseek.errors import UserError
from tinyseek.model.transformer import Transformer
from tinyseek.train import checkpoint as ckpt
from tinyseek.train import dist_ckpt

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
import dist_ckpt_worker as W  # noqa: E402 (the worker's model, batches and one-process step)

LAYOUTS = ["tp", "ep", "pp", "fsdp", "ddp"]
LAYOUTS4 = ["ep4", "fsdp4", "tp4"]


def reference(out: Path) -> dict:
    """The one-process run: ``out/one3`` after 3 batches, then the last two batches' losses and the
    state after them."""
    data = W.batches()
    torch.manual_seed(0)
    model = Transformer(W.config())
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR)
    for b in data[:3]:
        W.one_step(model, opt, b)
    dist_ckpt.save(out / "one3", model, opt)
    losses = [W.one_step(model, opt, b) for b in data[3:]]
    return {"losses": losses, "state": {k: v.clone() for k, v in model.state_dict().items()}}


def launch(out: Path, layouts: list[str], nproc: int) -> tuple[dict, list[dict]]:
    ref = reference(out)
    if nproc == 2:
        torchrun([str(ROOT / "tests" / "dist_ckpt_worker.py"), str(out), *layouts], cwd=ROOT, timeout=240)
    else:
        from test_parallel_tp import torchrun as torchrun_n  # noqa: PLC0415 (the slow tier only)
        torchrun_n([str(ROOT / "tests" / "dist_ckpt_worker.py"), str(out), *layouts], timeout=400, nproc=nproc)
    return ref, [torch.load(out / f"results.rank{r}.pt", weights_only=True) for r in range(nproc)]


@pytest.fixture(scope="module")
def run2(tmp_path_factory):
    out = tmp_path_factory.mktemp("dcp2")
    ref, res = launch(out, LAYOUTS, 2)
    return out, ref, res


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys(), f"{what}: {sorted(a.keys() ^ b.keys())[:5]}"
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def check_layouts(out: Path, ref: dict, res: list[dict], layouts: list[str]) -> None:
    one3 = dist_ckpt.read_flat(out / "one3")
    assert any(k.endswith(".step") for k in one3) and any(".experts.w_gate_up" in k for k in one3)
    for layout in layouts:
        # loaded under the layout and saved again: every tensor of the one-process checkpoint, exactly
        assert_same(dist_ckpt.read_flat(out / f"{layout}-loaded"), one3, f"{layout} loaded one3")
        assert len(list((out / f"{layout}-5").glob("*.distcp"))) == len(res)  # every rank wrote its shards
        for r in res:
            got = r[layout]
            assert got["roundtrip_equal"], f"{layout}: the reloaded copy differs"
            assert got["n_optim_tensors"] > 0
            assert got["next"][0] == got["next"][1], f"{layout}: the step after a reload differs"
            # the two steps after the load follow the uninterrupted one-process run
            assert got["losses"] == pytest.approx(ref["losses"], abs=1e-5, rel=0), layout
        full = dist_ckpt.load_full_model_state(out / f"{layout}-5", W.config())
        assert full.keys() == ref["state"].keys()
        for k, v in ref["state"].items():  # two AdamW steps apart from one process: float order only
            torch.testing.assert_close(full[k], v, atol=1e-4, rtol=0, msg=f"{layout}: {k}")
    for dst, src in W.CROSS:
        if dst in layouts and src in layouts:
            assert_same(dist_ckpt.read_flat(out / f"{dst}-from-{src}"), dist_ckpt.read_flat(out / f"{src}-5"),
                        f"{src} -> {dst}")
    # rank 0 alone, the process group up, read the first layout's checkpoint as one process's weights
    assert_same(res[0]["full"], dist_ckpt.load_full_model_state(out / f"{layouts[0]}-5", W.config()), "rank 0 read")


def test_layouts_2_ranks(run2):
    out, ref, res = run2
    check_layouts(out, ref, res, LAYOUTS)
    # expert slices are saved with the global shape: the one-process names and shapes
    flat = dist_ckpt.read_flat(out / "ep-5")
    assert flat["model.blocks.1.ffn.experts.w_gate_up"].shape == (4, 64, 64)
    assert flat["optim.state.blocks.1.ffn.experts.w_down.exp_avg"].shape == (4, 32, 64)


@pytest.mark.parametrize("src", ["ep", "pp", "tp"])
def test_parallel_checkpoint_loads_in_one_process(run2, src):
    out, _, _ = run2
    model = Transformer(W.config())
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR)
    dist_ckpt.load(out / f"{src}-5", model, opt)
    assert_same(model.state_dict(), dist_ckpt.load_full_model_state(out / f"{src}-5", W.config()), src)
    flat = dist_ckpt.read_flat(out / f"{src}-5")
    names = {id(p): n for n, p in model.named_parameters()}
    for p, st in opt.state.items():
        for k, v in st.items():
            assert torch.equal(v, flat[f"optim.state.{names[id(p)]}.{k}"]), f"{names[id(p)]}.{k}"
    assert float(next(iter(opt.state.values()))["step"]) == 5.0
    assert len(opt.state) == len(list(model.parameters()))


@pytest.mark.slow
def test_layouts_4_ranks(tmp_path):
    ref, res = launch(tmp_path, LAYOUTS4, 4)
    check_layouts(tmp_path, ref, res, LAYOUTS4)


# --- one process: round trip, tied embeddings, errors --------------------------------------------
def trained(cfg, steps: int = 2, seed: int = 0, **opt_kw):
    torch.manual_seed(seed)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=W.LR, **opt_kw)
    for b in W.batches()[:steps]:
        W.one_step(model, opt, b)
    return model, opt


def test_tied_embeddings_round_trip(tmp_path):
    cfg = dataclasses.replace(W.config(), tie_embeddings=True)
    model, opt = trained(cfg)
    dist_ckpt.save(tmp_path / "c", model, opt)
    other, other_opt = trained(cfg, steps=1, seed=5)  # a state to overwrite, one step behind
    dist_ckpt.load(tmp_path / "c", other, other_opt)
    assert_same(other.state_dict(), model.state_dict(), "tied")
    assert other.lm_head.weight is other.embed.weight
    b = W.batches()[4]
    assert W.one_step(model, opt, b) == W.one_step(other, other_opt, b)
    full = dist_ckpt.load_full_model_state(tmp_path / "c", cfg)
    assert full["lm_head.weight"] is full["embed.weight"]


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("dcp1") / "c"
    model, opt = trained(W.config())
    dist_ckpt.save(d, model, opt)
    return d


def one_line_error(fn, *args, match: str) -> str:
    with pytest.raises(UserError, match=match) as e:
        fn(*args)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def fresh(cfg=None, **opt_kw):
    model = Transformer(cfg or W.config())
    return model, torch.optim.AdamW(model.parameters(), lr=W.LR, **opt_kw)


def test_missing_and_reused_directories(tmp_path, saved):
    missing = tmp_path / "nope"
    assert str(missing) in one_line_error(dist_ckpt.load, missing, *fresh(), match="does not exist")
    one_line_error(dist_ckpt.load_full_model_state, missing, W.config(), match="does not exist")
    one_line_error(dist_ckpt.save, saved, *fresh(), match="already holds files")


@pytest.mark.parametrize("damage", ["shard", "metadata", "no_checksums", "truncated_unverified"])
def test_damaged_checkpoint(tmp_path, saved, monkeypatch, damage):
    d = tmp_path / "c"
    shutil.copytree(saved, d)
    shard = d / "__0_0.distcp"
    if damage == "shard":
        data = bytearray(shard.read_bytes())
        data[len(data) // 2] ^= 0xFF
        shard.write_bytes(bytes(data))
        match = "is damaged"
    elif damage == "metadata":
        (d / ".metadata").write_bytes(b"garbage")
        match = "is damaged"
    elif damage == "no_checksums":
        (d / "checksums.json").unlink()
        match = "has no checksums.json"
    else:  # checksums not compared: the read itself fails
        monkeypatch.setenv("TINYSEEK_VERIFY", "off")
        shard.write_bytes(shard.read_bytes()[:1000])
        match = "could not be read"
    msg = one_line_error(dist_ckpt.load, d, *fresh(), match=match)
    assert str(d) in msg
    one_line_error(dist_ckpt.load_full_model_state, d, W.config(), match=match)


@pytest.mark.parametrize("change", [{"n_layers": 3}, {"d_model": 32}, {"n_layers": 1}])
def test_other_config(saved, change):
    cfg = dataclasses.replace(W.config(), **change)
    msg = one_line_error(dist_ckpt.load, saved, *fresh(cfg), match="another model config")
    assert str(saved) in msg
    one_line_error(dist_ckpt.load_full_model_state, saved, cfg, match="another model config")


def test_other_optimizer_state(saved):
    model, opt = fresh(amsgrad=True)
    msg = one_line_error(dist_ckpt.load, saved, model, opt, match="optimizer state of")
    assert "max_exp_avg_sq" in msg
    assert not opt.state  # a refused load leaves the optimizer as it was


def test_model_only(tmp_path, saved):
    """Without an optimizer: the weights only, and an optimizer state that was never stepped is not saved."""
    model, _ = fresh()
    dist_ckpt.load(saved, model)
    assert_same(model.state_dict(), dist_ckpt.load_full_model_state(saved, W.config()), "model only")
    model, opt = fresh()
    dist_ckpt.save(tmp_path / "m", model, opt)
    assert not any(k.startswith("optim.") for k in dist_ckpt.read_flat(tmp_path / "m"))
    other, other_opt = trained(W.config())
    dist_ckpt.load(tmp_path / "m", other, other_opt)  # the checkpoint holds no optimizer state: none kept
    assert not other_opt.state


def test_planted_metadata_pickle_never_runs(tmp_path):
    """A ``.metadata`` whose pickle names a global outside DCP's metadata classes (a ``__reduce__``
    payload), with checksums rewritten to match: a one-line UserError, and the payload never ran."""
    model = Transformer(model_micro())
    dist_ckpt.save(tmp_path / "ck", model)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    (tmp_path / "ck" / ".metadata").write_bytes(pickle.dumps(Payload()))
    (tmp_path / "ck" / "checksums.json").unlink()
    ckpt.write_checksums(tmp_path / "ck")
    for read in (lambda: dist_ckpt.load(tmp_path / "ck", Transformer(model_micro())),
                 lambda: dist_ckpt.load_full_model_state(tmp_path / "ck", model_micro())):
        with pytest.raises(UserError, match=r"refused global (posix|os)\.system") as e:
            read()
        assert "\n" not in str(e.value)
    assert not marker.exists()
