"""SFT: chat template + loss on response tokens only, run-dir artifacts, JSONL data, DP-SGD option."""
import json

import pytest
import torch
from safetensors import safe_open

from tinyseek.common import read_metrics
from tinyseek.errors import UserError
from tinyseek.post import common as C
from tinyseek.post import sft
from tinyseek.post.seqs import pack, sft_targets
from tinyseek.tasks import get_task
from tinyseek.tokenizer import byte_tokenizer
from tinyseek.train.checkpoint import load_model


def test_targets_cover_only_the_response_and_eos():
    tok = byte_tokenizer()
    p = get_task("arithmetic").generate(1, seed=0, difficulty=1)[0]
    prompt = C.prompt_ids(tok, p.prompt)
    resp = tok.encode(C.worked_response(p)) + [tok.eos_id]
    ids, mask = pack([prompt], [resp], tok.pad_id)
    tgt = sft_targets(ids, mask)[0].tolist()
    assert tok.decode(prompt).endswith("<|assistant|>") and tok.decode(prompt).startswith("<|user|>")
    n_prompt = len(prompt)
    assert tgt[:n_prompt - 1] == [-100] * (n_prompt - 1)       # no loss on the prompt
    assert tgt[n_prompt - 1:] == resp                           # every response token + eos is a target
    assert tok.decode(resp).startswith("<think>") and resp[-1] == tok.eos_id


def test_sft_main_learns_and_writes_run_dir(tmp_path):
    cfg = sft.Config(out_dir=str(tmp_path), name="s", n_examples=48, epochs=4, batch_size=16, lr=3e-3,
                     log_every=1, warmup_steps=2)
    res = sft.main(cfg)
    run = tmp_path / "s"
    assert (run / "config.json").exists() and (run / "tokenizer" / "tokenizer_config.json").exists()
    losses = [r["loss"] for r in read_metrics(run / "metrics.jsonl")]
    assert len(losses) == res["steps"] == 12
    assert losses[-1] < losses[0] * 0.7
    model, meta = load_model(run)
    assert meta["stage"] == "sft" and model.cfg.vocab_size >= byte_tokenizer().vocab_size
    assert json.loads((run / "result.json").read_text())["checkpoint"] == res["checkpoint"]


def test_sft_from_jsonl_and_init_checkpoint(tmp_path):
    first = sft.main(sft.Config(out_dir=str(tmp_path), name="a", n_examples=16, epochs=1, batch_size=8))
    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"prompt": f"Compute {i} + 1.", "response":
                                          f"<think>{i} + 1 = {i + 1}</think><answer>{i + 1}</answer>"})
                              for i in range(10)) + "\n")
    res = sft.main(sft.Config(out_dir=str(tmp_path), name="b", init=first["run_dir"], data=str(data),
                              epochs=1, batch_size=5))
    assert res["n_examples"] == 10 and res["steps"] == 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x"}\n')
    with pytest.raises(UserError, match="bad.jsonl:1"):
        sft.main(sft.Config(out_dir=str(tmp_path), name="c", data=str(bad)))


def test_sft_config_errors():
    with pytest.raises(UserError):
        sft.Config(epochs=0).validate()
    with pytest.raises(UserError):
        sft.Config(data="/nonexistent.jsonl").validate()
    with pytest.raises(UserError):
        sft.preset("nope")


def test_dp_sgd_reports_epsilon_and_rejects_moe(tmp_path):
    pytest.importorskip("opacus")
    cfg = sft.Config(out_dir=str(tmp_path), name="dp", n_examples=32, epochs=2, batch_size=8, dp=True,
                     dp_noise_multiplier=1.0, dp_max_grad_norm=1.0)
    cfg.model.n_routed_experts = 0  # dense: Opacus has no per-sample grads for the MoE router/experts
    res = sft.main(cfg)
    assert 0 < res["dp_epsilon"] < 100 and res["dp_delta"] == 1e-5
    eps = [r["dp_epsilon"] for r in read_metrics(tmp_path / "dp" / "metrics.jsonl")]
    assert eps == sorted(eps)  # privacy spent only grows
    moe = sft.Config(out_dir=str(tmp_path), name="dp2", n_examples=8, epochs=1, dp=True)
    with pytest.raises(UserError, match="dense model"):
        sft.main(moe)


def test_sft_from_byte_pretrain_grows_vocab_for_special_tokens(tmp_path):
    from tinyseek.config import model_micro
    from tinyseek.model.transformer import Transformer
    from tinyseek.train.checkpoint import save_checkpoint
    cfg = model_micro()
    cfg.vocab_size = 257  # byte-level pretraining: bytes + eos, no chat tokens
    base = Transformer(cfg)
    save_checkpoint(tmp_path / "pre" / "ckpt", 5, base, None, {})
    res = sft.main(sft.Config(out_dir=str(tmp_path), name="s", init=str(tmp_path / "pre"), tokenizer="bytes", n_examples=8,
                              epochs=1, batch_size=8))
    model, _ = load_model(res["checkpoint"])
    assert model.cfg.vocab_size == byte_tokenizer().vocab_size
    x = torch.tensor([[72, 105]])
    assert model(x).logits.shape[-1] == byte_tokenizer().vocab_size


def test_dp_sgd_with_lora_from_a_checkpoint(tmp_path):
    """DP-SGD on LoRA adapters of a dense --init checkpoint: Opacus clips the adapters' per-sample grads."""
    pytest.importorskip("opacus")
    base = sft.Config(out_dir=str(tmp_path), name="base", n_examples=8, epochs=1, batch_size=8)
    base.model.n_routed_experts = 0
    run = sft.main(base)["run_dir"]
    cfg = sft.Config(out_dir=str(tmp_path), name="dp", init=run, n_examples=32, epochs=2, batch_size=8, dp=True,
                     lora_rank=4)
    res = sft.main(cfg)
    assert 0 < res["dp_epsilon"] < 100
    meta = load_model(res["checkpoint"])[1]
    with safe_open(res["checkpoint"] + "/adapter.safetensors", "pt") as f:
        assert meta["lora"]["rank"] == 4 and all(".lora_" in k for k in f.keys())


def test_init_without_tokenizer_is_the_same_error_as_serve(tmp_path):
    """No silent byte fallback for a checkpoint whose tokenizer is missing: post stages say what
    serve and eval say (``--tokenizer bytes`` is the explicit way back)."""
    from tinyseek.config import model_micro
    from tinyseek.errors import UserError
    from tinyseek.model.transformer import Transformer
    from tinyseek.serve.loading import load_tokenizer_for as serve_tokenizer_for
    from tinyseek.train.checkpoint import save_checkpoint
    save_checkpoint(tmp_path / "pre" / "ckpt", 5, Transformer(model_micro()), None, {})
    with pytest.raises(UserError) as serve_err:
        serve_tokenizer_for(str(tmp_path / "pre"))
    with pytest.raises(UserError) as sft_err:
        sft.main(sft.Config(out_dir=str(tmp_path), name="s", init=str(tmp_path / "pre"), n_examples=8, epochs=1,
                            batch_size=8))
    assert str(sft_err.value) == str(serve_err.value) and "--tokenizer" in str(sft_err.value)
    assert not (tmp_path / "s").exists()  # refused before anything was written
