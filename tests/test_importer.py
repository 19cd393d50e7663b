"""`tinyseek import`: a Hugging Face directory (a tiny Qwen2 built here, with a ChatML tokenizer) becomes a
run dir that the other stages accept; bad input is one line, exit status 2, and nothing in --out."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from tinyseek import cli
from tinyseek.train.checkpoint import load_model

transformers = pytest.importorskip("transformers")

CHATML = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
          "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
          "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
TEXT = ["Compute 3 + 4. The answer is 7.", "<think>3 + 4 = 7</think><answer>7</answer>",
        "The quick brown fox jumps over the lazy dog 1234567890 times.", "Solve 12 * 11 = 132 step by step."] * 20


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer=trainer)
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                                bos_token=None, chat_template=CHATML)


def save_tiny(src, arch: str = "qwen2"):
    """A tiny random Qwen2 (q/k/v biases) or Llama, tied embeddings, and its tokenizer, saved as
    transformers does; returns (transformers model, tokenizer)."""
    tok = make_tokenizer()
    tok.save_pretrained(src)
    conf, cls = ((transformers.Qwen2Config, transformers.Qwen2ForCausalLM) if arch == "qwen2"
                 else (transformers.LlamaConfig, transformers.LlamaForCausalLM))
    cfg = conf(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
               tie_word_embeddings=True, initializer_range=0.2, rope_theta=10000.0,
               eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or name.endswith("norm.weight"):
                p.copy_(torch.randn_like(p) * 0.3 + (1.0 if name.endswith("norm.weight") else 0.0))
    model.save_pretrained(src)
    return model, tok


@pytest.fixture(scope="module")
def hf_src(tmp_path_factory):
    src = tmp_path_factory.mktemp("qwen2")
    model, tok = save_tiny(src, "qwen2")
    return src, model, tok


def test_import_cli_writes_a_run_dir_every_loader_accepts(hf_src, tmp_path, capsys):
    src, hf, hf_tok = hf_src
    out = tmp_path / "imp"
    assert cli.main(["import", str(src), "--out", str(out), "--max-seq-len", "256"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["ckpt", "config.json", "tokenizer"]
    model, meta = load_model(out)
    assert meta["imported"]["architecture"] == "Qwen2ForCausalLM" and model.cfg.max_seq_len == 256
    idx = torch.randint(0, len(hf_tok), (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (model(idx).logits - hf(input_ids=idx).logits).abs().max() < 1e-4
    from tinyseek.tokenizer import load_tokenizer
    tok = load_tokenizer(out / "tokenizer")
    msgs = [{"role": "user", "content": "Compute 3 + 4."}]
    assert tok.apply_chat_template(msgs) == hf_tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert tok.eos_id == hf_tok.eos_token_id
    # an existing --out is refused (and left alone) unless --force
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    assert cli.main(["import", str(src), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert cli.main(["import", str(src), "--out", str(out), "--force"]) == 0


def _fails(argv, out, capsys, needle):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyseek: error:") and "\n" not in err and needle in err, err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".tmp-{out.name}")]


def test_bad_sources_are_one_line_exit_2_and_leave_nothing(hf_src, tmp_path, capsys):
    src, _, _ = hf_src
    out = tmp_path / "o" / "imp"
    out.parent.mkdir()
    _fails(["import", str(tmp_path / "missing"), "--out", str(out)], out, capsys, "does not exist")
    no_cfg = tmp_path / "no_cfg"
    shutil.copytree(src, no_cfg)
    (no_cfg / "config.json").unlink()
    _fails(["import", str(no_cfg), "--out", str(out)], out, capsys, "config.json")
    trunc = tmp_path / "trunc"
    shutil.copytree(src, trunc)
    w = trunc / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    _fails(["import", str(trunc), "--out", str(out)], out, capsys, "model.safetensors")
    bad_shape = tmp_path / "bad_shape"
    shutil.copytree(src, bad_shape)
    cfg = json.loads((bad_shape / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (bad_shape / "config.json").write_text(json.dumps(cfg))
    _fails(["import", str(bad_shape), "--out", str(out)], out, capsys, "shape")
    no_tok = tmp_path / "no_tok"
    shutil.copytree(src, no_tok)
    (no_tok / "tokenizer.json").unlink()
    _fails(["import", str(no_tok), "--out", str(out)], out, capsys, "tokenizer.json")
    not_gguf = tmp_path / "model.gguf"
    not_gguf.write_bytes(b"not a gguf file at all")
    _fails(["import", str(not_gguf), "--out", str(out)], out, capsys, "GGUF")
    assert cli.main(["import", str(src), "--out", str(out), "--dtype", "float8"]) == 2


def test_real_model_recipe_runs_end_to_end_on_an_imported_llama(tmp_path):
    """`tinyseek run --preset smollm2 --src DIR` (a tiny Llama instead of SmolLM2, few steps): import ->
    LoRA SFT -> LoRA GRPO -> int8/int4 -> eval of base/sft/grpo -> HF + GGUF export -> serve -> report."""
    src = tmp_path / "llama"
    save_tiny(src, "llama")
    argv = ["run", "--preset", "smollm2", "--src", str(src), "--runs-dir", str(tmp_path / "runs"), "--name", "r",
            "--eval-problems", "4", "--sft.n-examples", "16", "--sft.batch-size", "8", "--grpo.steps", "1",
            "--grpo.prompts-per-step", "2", "--grpo.group-size", "2", "--grpo.max-new-tokens", "8",
            "--grpo.eval-problems", "2", "--grpo.lora-rank", "4", "--sft.lora-rank", "4"]
    assert cli.main(argv) == 0
    run = tmp_path / "runs" / "r"
    for s in ("import", "sft", "grpo", "quantize", "eval", "export", "serve", "report"):
        assert (run / "stages" / f"{s}.json").is_file(), s
    assert not (run / "stages" / "pretrain.json").exists()
    ev = json.loads((run / "stages" / "eval.json").read_text())
    assert {"base", "sft", "grpo", "grpo-int8", "grpo-int4"} <= set(ev)
    assert (run / "grpo" / "ckpt").is_dir() and list((run / "grpo" / "ckpt").glob("*/adapter.safetensors"))
    gg = next((run / "export" / "gguf").glob("*.gguf"))
    ours, _ = load_model(run / "grpo")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(gg.parent), gguf_file=gg.name, dtype=torch.float32)
    idx = torch.randint(0, 300, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # f16 weights in the file
        assert (ours(idx).logits - hf(input_ids=idx).logits).abs().max() < 2e-2
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(run / "export" / "hf"), dtype=torch.float32)
    with torch.no_grad():
        assert (ours(idx).logits - hf2(input_ids=idx).logits).abs().max() < 1e-4
    msgs = [{"role": "user", "content": "Compute 3 + 4."}]  # the exported tokenizer is the model's own
    exp_tok = transformers.AutoTokenizer.from_pretrained(str(run / "export" / "hf"))
    assert exp_tok.apply_chat_template(msgs, tokenize=False) == make_tokenizer().apply_chat_template(msgs, tokenize=False)
    md = (run / "report" / "report.md").read_text()
    assert "| import |" in md and "| pretrain |" not in md
