"""Tokenizers: byte-level BPE (HF ``tokenizers``) and a byte fallback, chat special tokens, chat template.

Two implementations behind one small API (:class:`Tokenizer`):

- **BPE**: byte-level BPE trained with HF ``tokenizers`` (:func:`train_tokenizer`). No normaliser (the
  data pipeline already applied NFKC), so ``decode(encode(s)) == s`` exactly for any string, including
  Chinese and code. Digits are split one per token before BPE (as in LLaMA/DeepSeek), which helps
  arithmetic. Special tokens get ids ``0..8`` in the order of :data:`SPECIAL_TOKENS`.
- **bytes** (:func:`byte_tokenizer`): ids ``0..255`` are UTF-8 bytes, then the special tokens with
  ``<|eos|>`` first (id 256, the same end-of-document id as pretraining's byte-level fallback shards).

Chat template (one format everywhere; no per-model Jinja)::

    <|system|>{system}<|user|>{user}<|assistant|>{assistant}<|eos|><|user|>...<|assistant|>

and the model writes ``<think>…</think><answer>…</answer><|eos|>`` after the final ``<|assistant|>``.
Special-token strings that occur in text are encoded as the special token (so a template string
round-trips through ``encode``/``decode``).

Saved layout (``save(dir)``): ``dir/tokenizer.json`` (HF format, BPE only) and
``dir/tokenizer_config.json`` (``{"type": "bpe"|"bytes", "special_tokens": [...], ...}``).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterable, Iterator, Sequence

from tinyseek.common import atomic_dir
from tinyseek.errors import UserError

PAD, EOS, SYSTEM, USER, ASSISTANT = "<|pad|>", "<|eos|>", "<|system|>", "<|user|>", "<|assistant|>"
THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
SPECIAL_TOKENS: list[str] = [PAD, EOS, SYSTEM, USER, ASSISTANT, THINK, END_THINK, ANSWER, END_ANSWER]
ROLE_TOKENS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
MIN_VOCAB = 256 + len(SPECIAL_TOKENS)  # every byte plus the special tokens

_SPECIAL_RE = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKENS) + ")")


def apply_chat_template(messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
    """Render chat messages as one string.

    >>> apply_chat_template([{"role": "user", "content": "2+2?"}])
    '<|user|>2+2?<|assistant|>'
    >>> apply_chat_template([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
    ...                      {"role": "assistant", "content": "hello"}], add_generation_prompt=False)
    '<|system|>Be brief.<|user|>hi<|assistant|>hello<|eos|>'
    """
    out = []
    for i, m in enumerate(messages):
        role, content = m.get("role"), m.get("content")
        if role not in ROLE_TOKENS:
            raise UserError(f"message {i}: unknown role {role!r}; use system, user or assistant")
        if not isinstance(content, str):
            raise UserError(f"message {i}: content must be a string")
        out.append(ROLE_TOKENS[role] + content + (EOS if role == "assistant" else ""))
    if add_generation_prompt and (not messages or messages[-1].get("role") != "assistant"):
        out.append(ASSISTANT)
    return "".join(out)


class Tokenizer:
    """Common API of both tokenizers. Build with :func:`load_tokenizer`, :func:`train_tokenizer`
    or :func:`byte_tokenizer`; ``kind`` is ``"bpe"`` or ``"bytes"``."""

    def __init__(self, hf=None):
        self._hf = hf  # tokenizers.Tokenizer, or None for the byte tokenizer
        self.kind = "bpe" if hf is not None else "bytes"
        if hf is None:
            order = [EOS] + [t for t in SPECIAL_TOKENS if t != EOS]
            self._special = {t: 256 + i for i, t in enumerate(order)}
            self.vocab_size = 256 + len(order)
        else:
            self._special = {t: hf.token_to_id(t) for t in SPECIAL_TOKENS}
            missing = [t for t, i in self._special.items() if i is None]
            if missing:
                raise UserError(f"tokenizer lacks special tokens {missing}; retrain with tinyseek tokenizer")
            self.vocab_size = hf.get_vocab_size(with_added_tokens=True)
        self._special_by_id = {i: t for t, i in self._special.items()}
        self.eos_id = self._special[EOS]
        self.pad_id = self._special[PAD]
        self.special_ids = set(self._special_by_id)

    # -- core ---------------------------------------------------------------------------------
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings become their ids. No BOS/EOS added."""
        if self._hf is not None:
            return self._hf.encode(text, add_special_tokens=False).ids
        out: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part in self._special:
                out.append(self._special[part])
            elif part:
                out.extend(part.encode("utf-8"))
        return out

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """``[encode(t) for t in texts]``; parallel (Rust threads) for BPE."""
        if self._hf is not None:
            return [e.ids for e in self._hf.encode_batch(list(texts), add_special_tokens=False)]
        return [self.encode(t) for t in texts]

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids``; invalid UTF-8 (a cut-off multi-byte character) becomes U+FFFD."""
        ids = [int(i) for i in ids]
        if self._hf is not None:
            if skip_special:
                ids = [i for i in ids if i not in self.special_ids]
            # decode runs between special tokens separately: the HF ByteLevel decoder handles them right
            out, run = [], []
            for i in ids:
                if i in self._special_by_id:
                    if run:
                        out.append(self._hf.decode(run, skip_special_tokens=False))
                        run = []
                    out.append(self._special_by_id[i])
                else:
                    run.append(i)
            if run:
                out.append(self._hf.decode(run, skip_special_tokens=False))
            return "".join(out)
        out_s, buf = [], bytearray()
        for i in ids:
            if 0 <= i < 256:
                buf.append(i)
                continue
            if buf:
                out_s.append(buf.decode("utf-8", errors="replace"))
                buf = bytearray()
            if i in self._special_by_id:
                if not skip_special:
                    out_s.append(self._special_by_id[i])
            else:
                raise UserError(f"token id {i} out of range for the byte tokenizer (vocab {self.vocab_size})")
        if buf:
            out_s.append(buf.decode("utf-8", errors="replace"))
        return "".join(out_s)

    def token_to_id(self, tok: str) -> int | None:
        """Id of a token string (special tokens, single bytes for the byte tokenizer); None if unknown."""
        if tok in self._special:
            return self._special[tok]
        if self._hf is not None:
            return self._hf.token_to_id(tok)
        b = tok.encode("utf-8")
        return b[0] if len(b) == 1 else None

    def id_to_token(self, i: int) -> str | None:
        if i in self._special_by_id:
            return self._special_by_id[i]
        if self._hf is not None:
            return self._hf.id_to_token(i)
        return bytes([i]).decode("latin-1") if 0 <= i < 256 else None

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> str:
        return apply_chat_template(messages, add_generation_prompt)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"

    # -- files --------------------------------------------------------------------------------
    def save(self, out_dir: str | Path) -> Path:
        """Write ``out_dir/{tokenizer.json (BPE), tokenizer_config.json}`` atomically."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            if self._hf is not None:
                self._hf.save(str(tmp / "tokenizer.json"))
            cfg = {"type": self.kind, "vocab_size": self.vocab_size, "eos_id": self.eos_id,
                   "pad_id": self.pad_id, "special_tokens": dict(self._special),
                   "chat_template": "<|system|>{system}<|user|>{user}<|assistant|>{assistant}<|eos|>"}
            (tmp / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        return out_dir


def byte_tokenizer() -> Tokenizer:
    """Tokenizer-free fallback: UTF-8 bytes (0..255) + special tokens (eos = 256, vocab 265).

    >>> t = byte_tokenizer(); ids = t.encode("héllo<|eos|>")
    >>> ids[-1] == t.eos_id == 256, t.decode(ids), t.vocab_size
    (True, 'héllo<|eos|>', 265)
    """
    return Tokenizer(None)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer dir (``tokenizer.json`` and/or ``tokenizer_config.json``), a ``tokenizer.json``
    file, or the string ``"bytes"`` for :func:`byte_tokenizer`."""
    if str(path) == "bytes":
        return byte_tokenizer()
    p = Path(path)
    if p.is_dir():
        cfg_path = p / "tokenizer_config.json"
        if cfg_path.is_file():
            try:
                kind = json.loads(cfg_path.read_text()).get("type", "bpe")
            except json.JSONDecodeError as e:
                raise UserError(f"corrupt {cfg_path}: {e}") from None
            if kind == "bytes":
                return byte_tokenizer()
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"no tokenizer at {path} (expected a tokenizer dir or tokenizer.json)")
    from tokenizers import Tokenizer as HFTokenizer
    try:
        hf = HFTokenizer.from_file(str(p))
    except Exception as e:  # the Rust error is one long line
        raise UserError(f"cannot read tokenizer {p}: {str(e).splitlines()[0][:200]}") from None
    return Tokenizer(hf)


def _new_bpe():
    from tokenizers import Tokenizer as HFTokenizer, decoders, models, pre_tokenizers
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None,
                    min_frequency: int = 2) -> Tokenizer:
    """Train a byte-level BPE of ``vocab_size`` (incl. the 9 special tokens) on ``texts``; save to
    ``out_dir`` if given. Deterministic for the same texts (in the same order)."""
    if vocab_size < MIN_VOCAB:
        raise UserError(f"vocab_size must be >= {MIN_VOCAB} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if vocab_size > 1 << 20:
        raise UserError("vocab_size must be <= 1048576")
    from tokenizers import pre_tokenizers, trainers
    hf = _new_bpe()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    hf.train_from_iterator(_nonempty(texts), trainer=trainer)
    tok = Tokenizer(hf)
    if out_dir is not None:
        tok.save(out_dir)
    return tok


def _nonempty(texts: Iterable[str]) -> Iterator[str]:
    for t in texts:
        if t:
            yield t


# ------------------------------------------------------------------------------------------------
# `tinyseek tokenizer`: train a BPE on text files / a data run's kept documents
# ------------------------------------------------------------------------------------------------
from dataclasses import dataclass  # noqa: E402


@dataclass
class Config:
    inputs: str = ""               # comma-separated text/JSONL/Parquet files or folders; "" = the default corpus
    text_field: str = "text"       # JSONL/Parquet field holding the text
    vocab_size: int = 2048         # BPE vocabulary incl. 9 special tokens (>= 265)
    max_chars: int = 20_000_000    # stop reading input after this many characters
    out: str = "runs/tokenizer"    # output tokenizer dir

    def validate(self) -> "Config":
        from tinyseek.config import ConfigError
        if self.vocab_size < MIN_VOCAB:
            raise ConfigError(f"vocab_size must be >= {MIN_VOCAB}")
        if self.max_chars <= 0:
            raise ConfigError("max_chars must be > 0")
        if not self.out:
            raise ConfigError("out must name a directory")
        return self


def preset(name: str) -> Config:
    from tinyseek.config import ConfigError
    presets = {"cpu-tiny": lambda: Config(vocab_size=2048, max_chars=5_000_000),
               "gpu-small": lambda: Config(vocab_size=16384),
               "default": Config}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


def main(cfg: Config) -> dict:
    """Train a BPE on cleaned text: the given files/folders, else the default corpus (see
    :mod:`tinyseek.data.sources`). ``tinyseek data`` trains one itself; this stage is for reuse."""
    cfg.validate()
    from tinyseek.data.clean import clean_text
    from tinyseek.data.ingest import iter_documents
    from tinyseek.data.sources import default_sources
    paths = [s.strip() for s in cfg.inputs.split(",") if s.strip()]
    docs = (iter_documents(paths, text_field=cfg.text_field) if paths
            else _round_robin([src.read() for src in default_sources(math_docs=400)]))
    n_chars = 0

    def texts() -> Iterator[str]:
        nonlocal n_chars
        for doc in docs:
            if doc.text is None:
                continue
            t = clean_text(doc.text)
            yield t
            n_chars += len(t)
            if n_chars >= cfg.max_chars:
                return

    tok = train_tokenizer(texts(), cfg.vocab_size, cfg.out)
    print(f"tokenizer: vocab {tok.vocab_size} trained on {n_chars:,} characters -> {cfg.out}")
    return {"out": cfg.out, "vocab_size": tok.vocab_size, "chars": n_chars}


def _round_robin(iterators: list) -> Iterator:
    """One item from each iterator in turn until all are exhausted (mixes the corpus' domains)."""
    its = list(iterators)
    while its:
        for it in list(its):
            x = next(it, None)
            if x is None:
                its.remove(it)
            else:
                yield x
