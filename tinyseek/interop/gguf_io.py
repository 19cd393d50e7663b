"""GGUF in and out for Llama-architecture models: :func:`read_gguf` and :func:`write_gguf`.

``read_gguf(path) -> (hf_config, tensors, tokenizer_files)`` turns a llama.cpp file into what a Hugging Face
Llama checkpoint holds: a ``LlamaForCausalLM`` config dict, fp32 tensors under HF names, and
``tokenizer.json`` / ``tokenizer_config.json`` rebuilt from the vocabulary in the metadata. It is checked
against transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``): the same tensors, and a
tokenizer that encodes the same (for a byte-level vocabulary, the same ``tokenizers`` JSON).
``write_gguf(hf_config, tensors, tokenizer_dir, out_path, qtype)`` goes the other way (f32, f16, q8_0).

=========================================  ============================================  ==============
Hugging Face name                          GGUF name                                     stored as
=========================================  ============================================  ==============
model.embed_tokens.weight                  token_embd.weight                             qtype
model.layers.N.input_layernorm.weight      blk.N.attn_norm.weight                        F32
model.layers.N.self_attn.{q,k}_proj.*      blk.N.attn_{q,k}.*  (rows permuted, below)    qtype
model.layers.N.self_attn.{v,o}_proj.*      blk.N.attn_{v,output}.*                       qtype
model.layers.N.post_attention_layernorm.*  blk.N.ffn_norm.weight                         F32
model.layers.N.mlp.{gate,up,down}_proj.*   blk.N.ffn_{gate,up,down}.*                    qtype
model.norm.weight                          output_norm.weight                            F32
lm_head.weight                             output.weight (absent when tied)              qtype
=========================================  ============================================  ==============

The q/k permutation. HF Llama rotates half-split pairs (i, i + d/2) of each head; llama.cpp rotates
adjacent pairs (2i, 2i+1), so its converter reorders each head's rows of q_proj / k_proj (and their
biases): ``w.reshape(heads, 2, d/2, -1).swapaxes(1, 2)`` (:func:`permute_qk`); :func:`unpermute_qk` undoes it
exactly (k uses the KV head count).

Tokenizers. ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE) is rebuilt as transformers'
``GPT2Tokenizer`` would be: tokens respelled into the byte alphabet, the file's merges, the GPT-2 split
regex unless ``tokenizer.ggml.pre`` names one in :data:`PRE_TOKENIZER_SPLITS` (transformers' table), control
tokens (type 3) and the bos/eos/unk/pad tokens as special added tokens, user-defined ones (type 4) as plain
added tokens, a BOS/EOS template from ``add_bos_token`` / ``add_eos_token``. ``"llama"`` (SentencePiece BPE)
is rebuilt as transformers' ``LlamaTokenizer``: Metaspace, byte fallback, merges from the file or from the
scores. On writing, the ``pre`` name is read off tokenizer.json's pre-tokenizer (:func:`pre_name`):
tinyseek's own (individual digits, then the GPT-2 regex) is llama.cpp's ``"smollm"``. The chat template is
read where transformers 5 saves it (``chat_template.jinja`` over ``tokenizer_config.json``; :func:`chat_templates`).
Checked against llama.cpp itself (llama-cpp-python) in tests/test_llamacpp.py (slow): logits, greedy tokens,
tokenization and the chat template of exported files.

Not handled (one-line UserError): architectures other than llama, llama3-style rope scaling (a
``rope_freqs`` tensor) and rope types other than default / linear, partial rotary, per-layer head counts.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import re
import struct
import tempfile
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

from tinyseek.errors import UserError

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF metadata value types: fixed-size ones as struct formats; 8 is a string, 9 an array
_SCALAR = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_NP_SCALAR = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
              12: "<f8"}
_STRING, _ARRAY = 8, 9

# llama.cpp token types (tokenizer.ggml.token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# GGUF leaf name -> HF module path, inside a block
_LAYER_NAMES = {
    "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_HF_LAYER = {v: k for k, v in _LAYER_NAMES.items()}
_HF_TOP = {v: k for k, v in _TOP_NAMES.items()}

# Pre-tokenizer split regexes by tokenizer.ggml.pre, as transformers' GGUF converter has them; any other
# name (gpt-2, smollm, starcoder, ...) keeps the GPT-2 regex of the ByteLevel pre-tokenizer.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_TEKKEN_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                 r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                 r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_GPT4O_SPLIT = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
                r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
                r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
                 r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
PRE_TOKENIZER_SPLITS = {
    **dict.fromkeys(["llama-bpe", "llama3", "llama-v3", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"], _LLAMA3_SPLIT),
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(["qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"], _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    **dict.fromkeys(["gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"], _GPT4O_SPLIT),
}

QTYPES = {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}  # write_gguf's qtype -> ggml type of the 2-D weights


# ---------------------------------------------------------------------------------------------
# pure helpers
# ---------------------------------------------------------------------------------------------
def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF (half-split RoPE) rows of q_proj / k_proj -> llama.cpp (interleaved) rows, per head.

    >>> permute_qk(torch.arange(8.0), n_head=2).tolist()
    [0.0, 2.0, 1.0, 3.0, 4.0, 6.0, 5.0, 7.0]
    """
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Inverse of :func:`permute_qk` (what transformers' GGUF loader does to attn_q / attn_k).

    >>> w = torch.randn(12, 3); torch.equal(unpermute_qk(permute_qk(w, 3), 3), w)
    True
    """
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the alphabet of byte-level BPE tokens).

    >>> t = bytes_to_unicode(); t[ord("a")], t[ord(" ")], len(set(t.values()))
    ('a', 'Ġ', 256)
    """
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def gguf_to_hf_name(name: str) -> str | None:
    """llama.cpp tensor name -> HF Llama name (None if it is not one of a llama model's tensors).

    >>> gguf_to_hf_name("blk.3.attn_q.weight"), gguf_to_hf_name("output.weight"), gguf_to_hf_name("x.weight")
    ('model.layers.3.self_attn.q_proj.weight', 'lm_head.weight', None)
    """
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)\.(weight|bias)", name)
    if m and m[2] in _LAYER_NAMES:
        return f"model.layers.{m[1]}.{_LAYER_NAMES[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(\w+)\.(weight|bias)", name)
    if m and m[1] in _TOP_NAMES:
        return f"{_TOP_NAMES[m[1]]}.{m[2]}"
    return None


def hf_to_gguf_name(name: str) -> str | None:
    """HF Llama name -> llama.cpp tensor name (None if it has none).

    >>> hf_to_gguf_name("model.layers.0.mlp.down_proj.weight"), hf_to_gguf_name("model.embed_tokens.weight")
    ('blk.0.ffn_down.weight', 'token_embd.weight')
    """
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)\.(weight|bias)", name)
    if m and m[2] in _HF_LAYER:
        return f"blk.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"
    m = re.fullmatch(r"(.+)\.(weight|bias)", name)
    if m and m[1] in _HF_TOP:
        return f"{_HF_TOP[m[1]]}.{m[2]}"
    return None


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Every tensor of an HF Llama model with this config -> its shape (lm_head only when untied).

    >>> s = expected_shapes({"hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
    ...                      "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 10})
    >>> s["model.layers.0.self_attn.k_proj.weight"], len(s)
    ((4, 8), 12)
    """
    d, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    h = cfg["num_attention_heads"]
    kv = cfg.get("num_key_value_heads") or h
    hd = cfg.get("head_dim") or d // h
    out = {"model.embed_tokens.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.get("tie_word_embeddings", False):
        out["lm_head.weight"] = (v, d)
    lin = {"self_attn.q_proj": (h * hd, d), "self_attn.k_proj": (kv * hd, d), "self_attn.v_proj": (kv * hd, d),
           "self_attn.o_proj": (d, h * hd), "mlp.gate_proj": (f, d), "mlp.up_proj": (f, d), "mlp.down_proj": (d, f)}
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out[p + "input_layernorm.weight"] = (d,)
        out[p + "post_attention_layernorm.weight"] = (d,)
        for mod, shape in lin.items():
            out[f"{p}{mod}.weight"] = shape
            if cfg.get("attention_bias") if mod.startswith("self_attn") else cfg.get("mlp_bias"):
                out[f"{p}{mod}.bias"] = shape[:1]
    return out


def generate_merges(vocab: dict[str, int], scores: dict[str, float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges implied by a vocabulary: every split of a token into two tokens, best
    score first (ties: shorter left, then shorter right), as transformers derives them.

    >>> generate_merges({"a": 0, "b": 1, "ab": 2, "abb": 3}, {"a": 0, "b": 0, "ab": -1.0, "abb": -2.0})
    [('a', 'b'), ('ab', 'b')]
    """
    merges = []
    for tok, score in scores.items():
        local = [(tok[:i], tok[i:], score) for i in range(1, len(tok)) if tok[:i] in vocab and tok[i:] in vocab]
        merges.extend(sorted(local, key=lambda x: (vocab[x[0]], vocab[x[1]])))
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return [(a, b) for a, b, _ in merges]


# ---------------------------------------------------------------------------------------------
# reading the file
# ---------------------------------------------------------------------------------------------
class _Cursor:
    """Little-endian reads over a buffer; any read past its end is a truncated file."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str):
        try:
            vals = struct.unpack_from(fmt, self.buf, self.pos)
        except struct.error:
            raise UserError(f"{self.path}: truncated GGUF file (header ends at byte {len(self.buf)})") from None
        self.pos += struct.calcsize(fmt)
        return vals[0] if len(vals) == 1 else vals

    def string(self) -> str:
        n = self.unpack("<Q")
        end = self.pos + n
        if end > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file (a string runs past the end)")
        raw = self.buf[self.pos:end]
        self.pos = end
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return raw.decode("utf-8", errors="replace")

    def value(self, vtype: int):
        if vtype in _SCALAR:
            return self.unpack(_SCALAR[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.unpack("<IQ")
            if etype in _NP_SCALAR:
                dt = np.dtype(_NP_SCALAR[etype])
                if self.pos + n * dt.itemsize > len(self.buf):
                    raise UserError(f"{self.path}: truncated GGUF file (an array runs past the end)")
                arr = np.frombuffer(self.buf, dtype=dt, count=n, offset=self.pos)
                self.pos += n * dt.itemsize
                return arr.tolist()
            if etype == _STRING:
                return [self.string() for _ in range(n)]
            if etype == _ARRAY:
                return [self.value(_ARRAY) for _ in range(n)]
            raise UserError(f"{self.path}: bad GGUF metadata array element type {etype}")
        raise UserError(f"{self.path}: bad GGUF metadata value type {vtype}")


def _read_header(path: Path, buf) -> tuple[dict, list[tuple[str, tuple[int, ...], int, int]], int]:
    """(metadata, [(name, torch-order shape, ggml type id, offset)], start of the data section)."""
    if len(buf) < 4 or buf[:4] != GGUF_MAGIC:
        raise UserError(f"{path} is not a GGUF file (no GGUF magic bytes)")
    c = _Cursor(buf, path)
    c.pos = 4
    version = c.unpack("<I")
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are)")
    n_tensors, n_kv = c.unpack("<QQ")
    if n_tensors > len(buf) or n_kv > len(buf):
        raise UserError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} metadata keys)")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.unpack("<I"))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.unpack("<I")
        if n_dims > 8:
            raise UserError(f"{path}: corrupt GGUF tensor info for {name!r} ({n_dims} dims)")
        dims = c.unpack(f"<{n_dims}Q") if n_dims else ()
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        ggml_type, offset = c.unpack("<IQ")
        infos.append((name, tuple(reversed(dims)), ggml_type, offset))
    align = meta.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(align, int) or align <= 0 or align & (align - 1):
        raise UserError(f"{path}: bad general.alignment {align!r}")
    return meta, infos, (c.pos + align - 1) // align * align


def _gguf():
    """The ``gguf`` package (llama.cpp's GGUF types, block (de)quantizers and writer): an optional
    dependency, needed only to read or write a GGUF file, imported here only."""
    import gguf
    return gguf


def _type_name(ggml_type: int) -> str:
    gguf = _gguf()
    try:
        return gguf.GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"unknown ggml type {ggml_type}"


def _dequantize(path: Path, buf, start: int, name: str, shape: tuple[int, ...], ggml_type: int) -> np.ndarray:
    """One tensor's bytes at ``start`` -> a fresh fp32 array of ``shape`` (torch order), by ``gguf.quants``."""
    gguf = _gguf()
    try:
        qtype = gguf.GGMLQuantizationType(ggml_type)
        block, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    except (ValueError, KeyError):
        qtype = None
    if qtype is None:
        raise UserError(f"{path}: tensor {name} has type {_type_name(ggml_type)}, which tinyseek cannot "
                        "dequantize (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, Q2_K..Q6_K, ...)")
    n = int(np.prod(shape, dtype=np.int64)) if shape else 1
    row = shape[-1] if shape else 1
    if row % block:
        raise UserError(f"{path}: tensor {name} of shape {list(shape)} does not fill whole {qtype.name} blocks")
    nbytes = n // block * block_bytes
    if start + nbytes > len(buf):
        raise UserError(f"{path}: truncated GGUF file (tensor {name} runs past the end)")
    raw = np.frombuffer(buf, dtype=np.uint8, count=nbytes, offset=start)
    if qtype == gguf.GGMLQuantizationType.F32:
        return raw.view(np.float32).reshape(shape).copy()
    try:
        out = gguf.quants.dequantize(raw.reshape(n // row, row // block * block_bytes), qtype)
    except NotImplementedError:
        raise UserError(f"{path}: tensor {name} has type {qtype.name}, which tinyseek cannot dequantize "
                        "(gguf.quants has no dequantizer for it)") from None
    return np.ascontiguousarray(out, dtype=np.float32).reshape(shape)


def _hf_config(path: Path, meta: dict, names: set[str]) -> dict:
    """The HF Llama config dict the metadata describes (keys as transformers' GGUF loader sets them)."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise UserError(f"{path}: GGUF architecture {arch!r} is not supported (tinyseek reads llama GGUF files)")

    def key(k: str, default=KeyError):
        v = meta.get(f"llama.{k}", default)
        if v is KeyError:
            raise UserError(f"{path}: GGUF metadata lacks llama.{k}")
        if isinstance(v, list):
            raise UserError(f"{path}: llama.{k} is per layer ({v[:4]}...); tinyseek reads one value for all layers")
        return v

    if "rope_freqs.weight" in names:
        raise UserError(f"{path}: llama3-style rope scaling (a rope_freqs tensor) is not supported")
    d, h = key("embedding_length"), key("attention.head_count")
    head_dim = key("attention.key_length", None) or key("rope.dimension_count", None) or d // h
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim or key("attention.value_length", head_dim) != head_dim:
        raise UserError(f"{path}: rotary/value dims ({rope_dim}, {key('attention.value_length', head_dim)}) differ "
                        f"from the head dim {head_dim}; a Llama model rotates whole heads")
    rope = {"rope_type": "default", "rope_theta": float(key("rope.freq_base", 10000.0))}
    scaling = key("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=float(key("rope.scaling.factor")))
    elif scaling != "none":
        raise UserError(f"{path}: rope scaling {scaling!r} is not supported (none and linear are)")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = key("vocab_size", None) or (len(tokens) if tokens else None)
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "vocab_size": vocab, "hidden_size": d, "intermediate_size": key("feed_forward_length"),
        "num_hidden_layers": key("block_count"), "num_attention_heads": h,
        "num_key_value_heads": key("attention.head_count_kv", h), "head_dim": head_dim,
        "hidden_act": "silu", "max_position_embeddings": key("context_length"),
        "rms_norm_eps": key("attention.layer_norm_rms_epsilon"), "rope_parameters": rope,
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": any(re.fullmatch(r"blk\.\d+\.attn_\w+\.bias", n) for n in names),
        "mlp_bias": any(re.fullmatch(r"blk\.\d+\.ffn_\w+\.bias", n) for n in names),
    }
    for hf_key, g_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                          ("pad_token_id", "padding_token_id"), ("unk_token_id", "unknown_token_id")):
        cfg[hf_key] = meta.get(f"tokenizer.ggml.{g_key}")
    if cfg["vocab_size"] is None:
        cfg["vocab_size"] = 0  # filled from the embedding by read_gguf
    return cfg


# ---------------------------------------------------------------------------------------------
# tokenizer: GGUF metadata -> tokenizer.json + tokenizer_config.json
# ---------------------------------------------------------------------------------------------
def _special_tokens(meta: dict, tokens: list[str]) -> dict[str, str | None]:
    out = {}
    for name, key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                      ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        i = meta.get(f"tokenizer.ggml.{key}")
        out[name] = tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None
    return out


def _merges(path: Path, meta: dict) -> list[tuple[str, str]] | None:
    merges = meta.get("tokenizer.ggml.merges")
    if merges is None:
        return None
    out = [tuple(m.split(" ")) for m in merges]
    bad = next((m for m in out if len(m) != 2), None)
    if bad is not None:
        raise UserError(f"{path}: tokenizer merge {' '.join(bad)!r} is not two tokens")
    return out


def build_tokenizer(meta: dict, path: str | Path = "<gguf>"):
    """A ``tokenizers.Tokenizer`` from GGUF tokenizer metadata, built as transformers' GGUF converter builds it
    (see the module docstring); plus (add_bos, add_eos). ``path`` only names the file in errors."""
    path = Path(path)
    kind = meta.get("tokenizer.ggml.model")
    tokens = meta.get("tokenizer.ggml.tokens")
    if not tokens:
        raise UserError(f"{path}: GGUF metadata has no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type") or []
    alphabet = bytes_to_unicode()
    letters = set(alphabet.values())
    try:
        if kind == "gpt2":
            vocab = {t if set(t) <= letters else "".join(alphabet[b] for b in t.encode("utf-8")): i
                     for i, t in enumerate(tokens)}
            tok = Tokenizer(models.BPE(vocab=vocab, merges=_merges(path, meta) or [], dropout=None,
                                       continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False))
            tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
            tok.decoder = decoders.ByteLevel()
        elif kind == "llama":
            vocab = {t: i for i, t in enumerate(tokens)}
            merges = _merges(path, meta)
            if merges is None:
                scores = meta.get("tokenizer.ggml.scores")
                if not scores:
                    raise UserError(f"{path}: SentencePiece tokenizer has neither merges nor scores")
                merges = generate_merges(vocab, dict(zip(tokens, scores)))
            tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=True, byte_fallback=True, dropout=None))
            tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
            tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(content=" ", left=1, right=0)])
        else:
            raise UserError(f"{path}: tokenizer model {kind!r} is not supported (gpt2 byte-level BPE and llama "
                            "SentencePiece BPE are)")
    except UserError:
        raise
    except Exception as e:  # tokenizers rejects the vocabulary or merges
        raise UserError(f"{path}: the GGUF tokenizer cannot be built: {str(e).splitlines()[0]}") from None

    control = [t for t, ty in zip(tokens, types) if ty == CONTROL and (kind != "gpt2" or set(t) <= letters)]
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    known = tok.get_vocab()
    user = [t for t, ty in zip(tokens, types) if ty == USER_DEFINED and t in known]
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    specials = _special_tokens(meta, tokens)
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in specials.values() if t])

    split = PRE_TOKENIZER_SPLITS.get(meta.get("tokenizer.ggml.pre"))
    if split is not None:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(split), behavior="isolated"),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=False)])
    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", kind == "llama")) and specials["bos_token"] is not None
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and specials["eos_token"] is not None
    bos, eos = specials["bos_token"], specials["eos_token"]
    single = f"{bos + ':0 ' if add_bos else ''}$A:0{' ' + eos + ':0' if add_eos else ''}"
    pair = f"{single}{' ' + bos + ':1' if add_bos else ''} $B:1{' ' + eos + ':1' if add_eos else ''}"
    tok.post_processor = processors.TemplateProcessing(
        single=single, pair=pair,
        special_tokens=[(t, tok.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on])
    return tok, add_bos, add_eos


def _tokenizer_files(path: Path, meta: dict, cfg: dict) -> dict[str, object]:
    if "tokenizer.ggml.model" not in meta:
        return {}
    tok, add_bos, add_eos = build_tokenizer(meta, path)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", **_special_tokens(meta, meta["tokenizer.ggml.tokens"]),
               "add_bos_token": add_bos, "add_eos_token": add_eos, "clean_up_tokenization_spaces": False,
               "model_max_length": cfg["max_position_embeddings"]}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        tok_cfg["chat_template"] = meta["tokenizer.chat_template"]
    return {"tokenizer.json": tok.to_str(), "tokenizer_config.json": tok_cfg}


# ---------------------------------------------------------------------------------------------
# read_gguf
# ---------------------------------------------------------------------------------------------
def read_gguf(path: str | Path) -> tuple[dict, dict[str, torch.Tensor], dict[str, object]]:
    """A llama GGUF file -> (HF Llama config dict, fp32 tensors under HF names, tokenizer files).

    Tensors are dequantized with ``gguf.quants`` and the q/k rows un-permuted (:func:`unpermute_qk`);
    ``lm_head.weight`` is present only if the file has ``output.weight`` (else ``tie_word_embeddings``).
    Tokenizer files: ``{"tokenizer.json": str, "tokenizer_config.json": dict}`` ({} if the file has no
    vocabulary). One-line UserError for a file that is not GGUF or is truncated, another architecture,
    an unsupported tensor type, missing or extra tensors, or shapes that contradict the metadata.
    """
    path = Path(path)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"cannot read {path}: {e.strerror}") from None
    with f:
        if os.fstat(f.fileno()).st_size < 24:
            raise UserError(f"{path} is not a GGUF file (only {os.fstat(f.fileno()).st_size} bytes)")
        buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        try:
            meta, infos, data_start = _read_header(path, buf)
            names = {n for n, *_ in infos}
            cfg = _hf_config(path, meta, names)
            unknown = sorted(n for n in names if gguf_to_hf_name(n) is None)
            if unknown:
                raise UserError(f"{path}: tensor {unknown[0]} is not part of a llama model "
                                f"({len(unknown)} such tensors)")
            tensors = {}
            for name, shape, ggml_type, offset in infos:
                arr = _dequantize(path, buf, data_start + offset, name, shape, ggml_type)
                tensors[gguf_to_hf_name(name)] = torch.from_numpy(arr)
        finally:
            with contextlib.suppress(BufferError):
                buf.close()
    if not cfg["vocab_size"] and "model.embed_tokens.weight" in tensors:
        cfg["vocab_size"] = tensors["model.embed_tokens.weight"].shape[0]
    want = expected_shapes(cfg)
    missing = [k for k in want if k not in tensors]
    if missing:
        raise UserError(f"{path}: missing tensor {hf_to_gguf_name(missing[0])} ({len(missing)} missing)")
    for k, t in tensors.items():
        if k not in want:
            raise UserError(f"{path}: tensor {hf_to_gguf_name(k)} does not belong to the model the metadata "
                            "describes")
        if tuple(t.shape) != want[k]:
            raise UserError(f"{path}: tensor {hf_to_gguf_name(k)} has shape {list(t.shape)}, the metadata says "
                            f"{list(want[k])}")
    h, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    for k in list(tensors):
        if ".self_attn.q_proj." in k:
            tensors[k] = unpermute_qk(tensors[k], h).contiguous()
        elif ".self_attn.k_proj." in k:
            tensors[k] = unpermute_qk(tensors[k], kv).contiguous()
    return cfg, tensors, _tokenizer_files(path, meta, cfg)


# ---------------------------------------------------------------------------------------------
# write_gguf
# ---------------------------------------------------------------------------------------------
def _llama_cfg(hf_cfg: dict, tensors: dict[str, torch.Tensor]) -> dict:
    """The HF config with LlamaConfig's defaults filled in; UserError for what a llama GGUF cannot say."""
    mt, archs = hf_cfg.get("model_type"), hf_cfg.get("architectures") or []
    if mt != "llama" and "LlamaForCausalLM" not in archs:
        raise UserError(f"write_gguf writes Llama models; this config is {mt or archs!r}")
    miss = [k for k in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
            if not hf_cfg.get(k)]
    if miss:
        raise UserError(f"the Llama config lacks {', '.join(miss)}")
    if hf_cfg.get("hidden_act", "silu") != "silu":
        raise UserError(f"hidden_act {hf_cfg['hidden_act']!r}: llama.cpp's llama architecture uses silu")
    rp = dict(hf_cfg.get("rope_parameters") or hf_cfg.get("rope_scaling") or {})
    rtype = rp.get("rope_type", rp.get("type", "default"))
    if rtype not in ("default", "linear"):
        raise UserError(f"rope type {rtype!r} is not supported in GGUF export (default and linear are)")
    if rp.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError("partial rotary (partial_rotary_factor != 1) has no llama GGUF form")
    d, h = hf_cfg["hidden_size"], hf_cfg["num_attention_heads"]
    emb = tensors.get("model.embed_tokens.weight")
    return {**hf_cfg,
            "vocab_size": hf_cfg.get("vocab_size") or (emb.shape[0] if emb is not None else 0),
            "num_key_value_heads": hf_cfg.get("num_key_value_heads") or h,
            "head_dim": hf_cfg.get("head_dim") or d // h,
            "rms_norm_eps": hf_cfg.get("rms_norm_eps", 1e-6),
            "max_position_embeddings": hf_cfg.get("max_position_embeddings", 2048),
            "tie_word_embeddings": bool(hf_cfg.get("tie_word_embeddings", False)),
            "rope_theta": float(rp.get("rope_theta", hf_cfg.get("rope_theta", 10000.0))),
            "rope_type": rtype, "rope_factor": float(rp.get("factor", 1.0))}


def pre_name(pre: dict | None, has_merges: bool = True) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level tokenizer.json pre-tokenizer (UserError if none fits).

    >>> bl = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": True}
    >>> pre_name(bl), pre_name({"type": "Sequence", "pretokenizers": [
    ...     {"type": "Digits", "individual_digits": True}, bl]})
    ('gpt-2', 'smollm')
    """
    def byte_level(p, regex):
        return (isinstance(p, dict) and p.get("type") == "ByteLevel" and not p.get("add_prefix_space", False)
                and p.get("use_regex", True) == regex)

    parts = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    if len(parts) == 1 and byte_level(parts[0], True):
        return "gpt-2"
    if len(parts) == 1 and byte_level(parts[0], False) and not has_merges:
        return "gpt-2"  # nothing to merge: every split encodes the same
    if len(parts) == 2 and byte_level(parts[1], True) and parts[0].get("type") == "Digits" \
            and parts[0].get("individual_digits"):
        return "smollm"  # llama.cpp: \p{N} then the GPT-2 regex
    if len(parts) == 2 and byte_level(parts[1], False) and parts[0].get("type") == "Split" \
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert"):
        regex = (parts[0].get("pattern") or {}).get("Regex")
        for name in ("llama-bpe", "qwen2", "tekken", "gpt-4o", "qwen35"):
            if PRE_TOKENIZER_SPLITS[name] == regex:
                return name
    raise UserError(f"tokenizer.json pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent "
                    "(byte-level BPE with the GPT-2, llama3, qwen2, tekken or gpt-4o split is supported)")


def _token_id(tok, vocab: dict[str, int]) -> int | None:
    if isinstance(tok, dict):
        tok = tok.get("content")
    return vocab.get(tok) if isinstance(tok, str) else None


def tokenizer_metadata(tokenizer_dir: str | Path, hf_cfg: dict, vocab_size: int) -> list[tuple[str, str, object]]:
    """GGUF tokenizer keys ``[(key, kind, value)]`` from an HF tokenizer dir (byte-level BPE tokenizer.json
    [+ tokenizer_config.json]); the token list is padded to ``vocab_size`` with ``[PADi]`` (type UNUSED)."""
    d = Path(tokenizer_dir)
    try:
        tj = json.loads((d / "tokenizer.json").read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {d / 'tokenizer.json'}: {getattr(e, 'strerror', None) or e}") from None
    tc = {}
    if (d / "tokenizer_config.json").exists():
        try:
            tc = json.loads((d / "tokenizer_config.json").read_text())
        except ValueError as e:
            raise UserError(f"{d / 'tokenizer_config.json'} is not JSON: {e}") from None
    model = tj.get("model") or {}
    if model.get("type") != "BPE":
        raise UserError(f"{d}/tokenizer.json: model {model.get('type')!r} is not supported (byte-level BPE is)")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    pre = pre_name(tj.get("pre_tokenizer"), bool(merges))
    vocab = dict(model.get("vocab") or {})
    added = {a["id"]: a for a in tj.get("added_tokens") or []}
    vocab.update({a["content"]: i for i, a in added.items()})
    top = max(vocab.values(), default=-1)
    if top >= vocab_size:
        raise UserError(f"tokenizer has token id {top}, beyond the model's vocab_size {vocab_size}")
    tokens, types = [f"[PAD{i}]" for i in range(vocab_size)], [UNUSED] * vocab_size
    for t, i in vocab.items():
        tokens[i], types[i] = t, NORMAL
    for i, a in added.items():
        tokens[i], types[i] = a["content"], CONTROL if a.get("special") else USER_DEFINED
    post = tj.get("post_processor") or {}
    single = post.get("single") or [] if post.get("type") == "TemplateProcessing" else []
    out = [("tokenizer.ggml.model", "str", "gpt2"), ("tokenizer.ggml.pre", "str", pre),
           ("tokenizer.ggml.tokens", "arr", tokens), ("tokenizer.ggml.token_type", "arr", types),
           ("tokenizer.ggml.merges", "arr", merges)]
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        i = _token_id(tc.get(f"{name}_token"), vocab)
        if i is None and name == "unk":
            i = _token_id(model.get("unk_token"), vocab)
        if i is None:
            i = hf_cfg.get(f"{name}_token_id")
        if isinstance(i, int) and 0 <= i < vocab_size:
            out.append((f"tokenizer.ggml.{key}", "u32", i))
    add_bos = tc.get("add_bos_token", bool(single) and "SpecialToken" in single[0])
    add_eos = tc.get("add_eos_token", bool(single) and "SpecialToken" in single[-1])
    out += [("tokenizer.ggml.add_bos_token", "bool", bool(add_bos)),
            ("tokenizer.ggml.add_eos_token", "bool", bool(add_eos))]
    templates = chat_templates(d, tc)
    if "default" in templates:
        out.append(("tokenizer.chat_template", "str", templates.pop("default")))
    for name, t in templates.items():  # named ones as llama.cpp's converter (gguf's add_chat_template) writes them
        out.append((f"tokenizer.chat_template.{name}", "str", t))
    if templates:
        out.append(("tokenizer.chat_templates", "arr", list(templates)))
    return out


def chat_templates(tokenizer_dir: str | Path, tc: dict) -> dict[str, str]:
    """An HF tokenizer dir's chat templates ``{name: template}`` ("default" the one transformers applies), where
    transformers 5 saves them: ``chat_template.jinja`` and ``additional_chat_templates/*.jinja`` over
    ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of ``{name, template}``), else a
    processor's ``chat_template.json``. Names are sanitized as gguf's ``add_chat_template`` does.
    """
    d = Path(tokenizer_dir)
    out: dict[str, str] = {}
    ct = tc.get("chat_template")
    if isinstance(ct, str):
        out["default"] = ct
    elif isinstance(ct, list):
        out.update({t["name"]: t["template"] for t in ct if isinstance(t, dict) and isinstance(t.get("template"), str)
                    and isinstance(t.get("name"), str)})
    files = {p.stem: p.read_text() for p in sorted((d / "additional_chat_templates").glob("*.jinja"))}
    if (d / "chat_template.jinja").is_file():
        files["default"] = (d / "chat_template.jinja").read_text()
    if files:
        out = files
    if not out and (d / "chat_template.json").is_file():
        try:
            legacy = json.loads((d / "chat_template.json").read_text()).get("chat_template")
        except (ValueError, AttributeError):
            legacy = None
        if isinstance(legacy, str):
            out["default"] = legacy
    return {re.sub(r"[^a-zA-Z0-9_]", "_", k) if k != "default" else k: v for k, v in out.items()}


def write_gguf(hf_cfg: dict, tensors: dict[str, torch.Tensor], tokenizer_dir: str | Path | None,
               out_path: str | Path, qtype: str = "f16") -> dict:
    """Write a Llama model (HF config dict + HF-named tensors [+ HF tokenizer dir]) as a llama.cpp GGUF file.

    ``qtype`` ("f32", "f16", "q8_0") is the type of the 2-D weights; norms and biases stay F32, and a
    weight whose rows do not fill whole Q8_0 blocks falls back to F16 (both as llama.cpp's converter does).
    Written atomically (a temp file beside ``out_path``, then a rename): on any error nothing is left.
    Returns ``{"path", "qtype", "n_tensors", "bytes"}``.
    """
    gguf = _gguf()

    if qtype not in QTYPES:
        raise UserError(f"GGUF qtype {qtype!r} is not supported (choose from {', '.join(QTYPES)})")
    cfg = _llama_cfg(hf_cfg, tensors)
    want = expected_shapes(cfg)
    ts = {k: v for k, v in tensors.items() if not k.endswith("rotary_emb.inv_freq")}
    if cfg["tie_word_embeddings"]:
        ts.pop("lm_head.weight", None)
    missing = [k for k in want if k not in ts]
    if missing:
        raise UserError(f"tensor {missing[0]} is missing ({len(missing)} missing) for the Llama config given")
    for k, t in ts.items():
        if k not in want:
            raise UserError(f"tensor {k} is not part of a Llama model with this config")
        if tuple(t.shape) != want[k]:
            raise UserError(f"tensor {k} has shape {list(t.shape)}; the config says {list(want[k])}")
        if not t.is_floating_point() or not bool(torch.isfinite(t).all()):
            raise UserError(f"tensor {k} is not finite floating point")
        if qtype == "f16" and t.dim() == 2 and float(t.abs().max()) > 65504.0:
            raise UserError(f"tensor {k} exceeds the float16 range; export with qtype f32 or q8_0")
    tok_meta = tokenizer_metadata(tokenizer_dir, hf_cfg, cfg["vocab_size"]) if tokenizer_dir is not None else []

    GT = gguf.GGMLQuantizationType
    file_type = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                 "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[qtype]
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    w = None
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_string("general.name", str(hf_cfg.get("_name_or_path") or out.stem))
        w.add_uint32("general.file_type", int(file_type))
        w.add_uint32("general.quantization_version", gguf.GGML_QUANT_VERSION)
        for k, v in (("vocab_size", cfg["vocab_size"]), ("context_length", cfg["max_position_embeddings"]),
                     ("embedding_length", cfg["hidden_size"]), ("block_count", cfg["num_hidden_layers"]),
                     ("feed_forward_length", cfg["intermediate_size"]),
                     ("rope.dimension_count", cfg["head_dim"]),
                     ("attention.head_count", cfg["num_attention_heads"]),
                     ("attention.head_count_kv", cfg["num_key_value_heads"]),
                     ("attention.key_length", cfg["head_dim"]), ("attention.value_length", cfg["head_dim"])):
            w.add_uint32(f"llama.{k}", int(v))
        w.add_float32("llama.attention.layer_norm_rms_epsilon", float(cfg["rms_norm_eps"]))
        w.add_float32("llama.rope.freq_base", cfg["rope_theta"])
        if cfg["rope_type"] == "linear":
            w.add_string("llama.rope.scaling.type", "linear")
            w.add_float32("llama.rope.scaling.factor", cfg["rope_factor"])
        for key, kind, val in tok_meta:
            {"str": w.add_string, "u32": w.add_uint32, "bool": w.add_bool, "arr": w.add_array}[kind](key, val)
        n_heads = {"q_proj": cfg["num_attention_heads"], "k_proj": cfg["num_key_value_heads"]}
        for k in want:
            t = ts[k].detach().to("cpu", torch.float32)
            proj = k.split(".")[-2]
            if proj in n_heads:
                t = permute_qk(t, n_heads[proj])
            a = t.contiguous().numpy()
            if a.ndim == 1 or qtype == "f32":
                w.add_tensor(hf_to_gguf_name(k), a)
            elif qtype == "q8_0" and a.shape[-1] % gguf.GGML_QUANT_SIZES[GT.Q8_0][0] == 0:
                w.add_tensor(hf_to_gguf_name(k), gguf.quants.quantize(a, GT.Q8_0), raw_dtype=GT.Q8_0)
            else:
                w.add_tensor(hf_to_gguf_name(k), a.astype(np.float16))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        if w is not None:
            with contextlib.suppress(Exception):
                w.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return {"path": str(out), "qtype": qtype, "n_tensors": len(want), "bytes": out.stat().st_size}
