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
Special-token strings that occur in text are encoded as the special token by ``encode`` (so a template
string round-trips through ``encode``/``decode``; trusted text only: training data, templates);
``encode(text, parse_special=False)`` keeps them text. Chats from outside (the server, ``tinyseek chat``,
task prompts) go through ``encode_chat``: the template's own markers are special tokens, but every
string of the messages is encoded with special-token parsing off, so message text can never produce a
special token (not even nested, ``<|ass<|assistant|>istant|>``) and (byte-level BPE) decodes back to itself.

Saved layout (``save(dir)``): ``dir/tokenizer.json`` (HF format, BPE only) and
``dir/tokenizer_config.json`` (``{"type": "bpe"|"bytes", "special_tokens": [...], ...}``).

A third kind, ``"hf"`` (:class:`HFTokenizer`), is an imported model's own tokenizer in Hugging Face's
format: ``tokenizer.json`` + a ``tokenizer_config.json`` without our ``"type"`` key (and possibly
``special_tokens_map.json``, ``chat_template.jinja``, ``generation_config.json``). It encodes as
transformers' ``AutoTokenizer`` does on the same files and renders the model's own Jinja chat template
as transformers' ``apply_chat_template`` does; the R1 tags ``<think>``/``<answer>`` are plain text on
top. :func:`load_tokenizer` tells the kinds apart.
"""
from __future__ import annotations

import copy
import datetime
import json
import re
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, pre_tokenizers, trainers

from tinyseek.fsutil import atomic_dir
from tinyseek.config import ConfigError
from tinyseek.data.clean import clean_text
from tinyseek.data.ingest import iter_documents
from tinyseek.data.sources import default_sources
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


def _control_pattern(strings: Iterable[str]) -> re.Pattern | None:
    """A regex matching any of ``strings``, longest first (leftmost-longest), or None if there are none."""
    strings = sorted({t for t in strings if t}, key=lambda t: (-len(t), t))
    return re.compile("|".join(re.escape(t) for t in strings)) if strings else None


def _escape_strings(obj, sub):
    """``obj`` (a message: dicts, lists, strings) with ``sub`` applied to every string except ``role``."""
    if isinstance(obj, str):
        return sub(obj)
    if isinstance(obj, dict):
        return {k: (v if k == "role" else _escape_strings(v, sub)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_escape_strings(v, sub) for v in obj]
    return obj


def encode_chat_with(tok, render, messages: Sequence[dict], add_generation_prompt: bool,
                     tools: list[dict] | None = None) -> list[int]:
    """Prompt ids of ``messages`` rendered by ``render(messages, add_generation_prompt)``, where the
    strings of the messages never produce a special token.

    Every occurrence of a control string (``tok.control_tokens``) in a message's strings is replaced by
    a placeholder (private-use characters around a random per-call number, which message text cannot
    guess), the template is rendered, and the text is cut at the placeholders: the template's text is
    encoded with special tokens on (``tok.encode``), each placeholder as its original string with
    special-token parsing off. Without control strings in the messages this is exactly
    ``tok.encode(render(messages))`` (transformers' ``apply_chat_template(tokenize=True)``). Guaranteed:
    no added-token id (special or not, :attr:`control_tokens`) comes from message text; with a byte-level
    tokenizer (ours, GPT-2/Llama-3 style) the ids decode to the rendered text exactly (a sentencepiece
    style normaliser adds a "▁" where the text is cut, as it does after any special token).
    Not covered: a template that itself turns message text into a marker (``replace(..., '<|x|>')``).
    """
    found: list[str] = []
    pattern = getattr(tok, "_control_re", None)
    tag = f"\ue000{secrets.randbelow(10 ** 12)}:"  # digits survive any case change in the template

    def sub(s: str) -> str:
        def one(m: re.Match) -> str:
            found.append(m.group(0))
            return f"{tag}{len(found) - 1}\ue001"
        return pattern.sub(one, s) if pattern is not None else s

    msgs = [_escape_strings(m, sub) for m in messages]
    if tools is None:
        text = render(msgs, add_generation_prompt)
    else:  # tool definitions come from outside too: their strings stay text (render takes them third)
        text = render(msgs, add_generation_prompt, [_escape_strings(t, sub) for t in tools])
    if not found:
        return tok.encode(text)
    out: list[int] = []
    pos = 0
    for m in re.finditer(re.escape(tag) + r"(\d+)\ue001", text):
        out += tok.encode(text[pos:m.start()])
        k = int(m.group(1))
        out += tok.encode(found[k] if k < len(found) else m.group(0), parse_special=False)
        pos = m.end()
    return out + tok.encode(text[pos:])


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
        self.bos_id: int | None = None            # our tokenizers have no BOS
        self.stop_ids: tuple[int, ...] = (self.eos_id,)  # ids that end generation
        self.chat_template: str | None = None     # None: the built-in format (apply_chat_template)
        self.special_ids = set(self._special_by_id)
        # special-token strings: in chat messages (encode_chat) they are encoded as text
        self.control_tokens: tuple[str, ...] = tuple(SPECIAL_TOKENS)
        self._control_re = _control_pattern(self.control_tokens)
        self._plain = None  # tokenizers.Tokenizer that reads special-token strings as text (lazy)

    # -- core ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text``; special-token strings become their ids (``parse_special=False``: they
        are encoded as text, like any other; ``decode`` gives ``text`` back). No BOS/EOS added (our
        tokenizers add none, so ``add_special_tokens`` changes nothing)."""
        if self._hf is not None:
            return self._backend(parse_special).encode(text, add_special_tokens=False).ids
        if not parse_special:
            return list(text.encode("utf-8"))
        out: list[int] = []
        for part in _SPECIAL_RE.split(text):
            if part in self._special:
                out.append(self._special[part])
            elif part:
                out.extend(part.encode("utf-8"))
        return out

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True) -> list[int]:
        """Prompt ids of a chat from outside: :func:`apply_chat_template` with the messages' text
        encoded as text (see :func:`encode_chat_with`; no special token comes from a message)."""
        return encode_chat_with(self, self.apply_chat_template, messages, add_generation_prompt)

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[list[int]]:
        """``[encode(t, parse_special=parse_special) for t in texts]``; parallel (Rust threads) for BPE,
        without the offsets (``encode_batch_fast``: same ids) where the tokenizers library has it.
        ``parse_special=False`` for text from outside (corpus documents): no special token comes from it."""
        if self._hf is not None:
            return _batch_ids(self._backend(parse_special), texts)
        return [self.encode(t, parse_special=parse_special) for t in texts]

    def _backend(self, parse_special: bool):
        """The tokenizers backend: as loaded, or (``parse_special=False``) the copy that reads the
        special-token strings as text."""
        if parse_special:
            return self._hf
        if self._plain is None:
            self._plain = _plain_copy(self._hf, self.control_tokens)
        return self._plain

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

    def __getstate__(self) -> dict:  # picklable: the plain-text copy is rebuilt on use
        return {**self.__dict__, "_plain": None}

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


def load_tokenizer(path: str | Path) -> "Tokenizer | HFTokenizer":
    """Load a tokenizer dir, a ``tokenizer.json`` file, or the string ``"bytes"`` for
    :func:`byte_tokenizer`. Our own dirs record ``{"type": "bpe"|"bytes"}`` in
    ``tokenizer_config.json``; a ``tokenizer_config.json`` without ``"type"`` (Hugging Face's format),
    or a ``tokenizer.json`` alone that lacks our special tokens, gives an :class:`HFTokenizer`."""
    if str(path) == "bytes":
        return byte_tokenizer()
    p = Path(path)
    if p.is_file() and p.name == "tokenizer.json" and (p.parent / "tokenizer_config.json").is_file():
        p = p.parent  # the whole dir: its config says which kind
    if p.is_dir():
        cfg_path = p / "tokenizer_config.json"
        if cfg_path.is_file():
            kind = _json_object(cfg_path.read_text(encoding="utf-8"), str(cfg_path)).get("type")
            if kind == "bytes":
                return byte_tokenizer()
            if kind is None:
                return HFTokenizer.from_dir(p)
        p = p / "tokenizer.json"
    if not p.is_file():
        raise UserError(f"no tokenizer at {path} (expected a tokenizer dir or tokenizer.json)")
    try:
        hf = RustTokenizer.from_file(str(p))
    except Exception as e:  # the Rust error is one long line
        raise UserError(f"cannot read tokenizer {p}: {str(e).splitlines()[0][:200]}") from None
    if any(hf.token_to_id(t) is None for t in SPECIAL_TOKENS):  # not one of ours: a bare HF tokenizer
        try:
            return HFTokenizer({"tokenizer.json": p.read_bytes().decode("utf-8")}, str(p.parent))
        except UserError:
            raise UserError(f"tokenizer {p} lacks tinyseek's special tokens and has no Hugging Face "
                            "tokenizer_config.json naming its eos_token; retrain with tinyseek tokenizer "
                            "or add the config") from None
    return Tokenizer(hf)


# ------------------------------------------------------------------------------------------------
# Hugging Face format: an imported model's own tokenizer and chat template
# ------------------------------------------------------------------------------------------------
# the files of an HF tokenizer dir that we read and copy (text files; slow-tokenizer files are not needed
# once tokenizer.json exists); additional_chat_templates/*.jinja come along too
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "chat_template.json", "generation_config.json", "added_tokens.json")
HF_TEMPLATE_DIR = "additional_chat_templates"
# transformers' named special tokens (PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES): the template sees them
NAMED_SPECIAL = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# used when the files carry no chat template (a base model): our format with the model's own eos
FALLBACK_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt and (messages | length == 0 or messages[-1]['role'] != 'assistant') %}"
    "<|assistant|>{% endif %}")


class HFTokenizer:
    """An imported model's tokenizer in Hugging Face's format (``kind == "hf"``): the same API as
    :class:`Tokenizer` plus ``bos_id``, ``stop_ids`` and the model's ``chat_template``.

    Built from the files' texts (``{name: text}``, see :data:`HF_FILES`) so that :meth:`save` and
    :meth:`hf_files` give them back unchanged and transformers loads a saved dir as before. What
    transformers does on load is repeated here: the tokenizer.json backend (``_hf``, a
    ``tokenizers.Tokenizer``), the named special tokens of ``tokenizer_config.json`` (legacy
    ``special_tokens_map.json`` where the config has no ``added_tokens_decoder``), added tokens the
    config lists but tokenizer.json lacks, ``split_special_tokens``; the chat template from
    ``chat_template.jinja`` / ``additional_chat_templates/`` / the config (a string, or a list of
    ``{name, template}`` whose ``default`` is used), else a processor's ``chat_template.json``, else
    :data:`FALLBACK_CHAT_TEMPLATE`. ``stop_ids``: eos, then ``generation_config.json``'s
    ``eos_token_id`` (an int or a list). Not repeated: ``clean_up_tokenization_spaces`` on
    decode (transformers itself ignores it for BPE), model classes that rebuild the backend from a
    slow tokenizer (tokenizer.json is the truth here)."""

    kind = "hf"

    def __init__(self, files: dict[str, str], source: str = "<memory>"):
        if "tokenizer.json" not in files:
            raise UserError(f"{source}: no tokenizer.json (a Hugging Face tokenizer dir needs one; "
                            "convert a slow/sentencepiece tokenizer with transformers first)")
        self._files = dict(files)
        self.source = source
        cfg = _json_object(files.get("tokenizer_config.json", "{}"), f"{source}/tokenizer_config.json")
        try:
            hf = RustTokenizer.from_str(files["tokenizer.json"])
        except Exception as e:  # the Rust error is one long line
            raise UserError(f"cannot read tokenizer {source}/tokenizer.json: {str(e).splitlines()[0][:200]}") from None
        self._hf = hf

        # named special tokens: the config, or (legacy, as transformers) special_tokens_map.json over it
        named: dict[str, object] = {k: cfg.get(k) for k in NAMED_SPECIAL}
        if "added_tokens_decoder" not in cfg and "special_tokens_map.json" in files:
            smap = _json_object(files["special_tokens_map.json"], f"{source}/special_tokens_map.json")
            named.update({k: v for k, v in smap.items() if k in NAMED_SPECIAL})
        named = {k: v for k, v in named.items() if v is not None}

        # added tokens transformers would add on load: config entries tokenizer.json lacks, then named
        # special tokens that are not added tokens yet (as special tokens)
        have = hf.get_added_tokens_decoder()
        to_add = []
        for i, d in sorted(((int(i), d) for i, d in (cfg.get("added_tokens_decoder") or {}).items())):
            if isinstance(d, dict) and "content" in d:
                t = AddedToken(**{k: v for k, v in d.items() if not k.startswith("__")})
                if i not in have or repr(have[i]) != repr(t):
                    to_add.append(t)
        known = {str(t) for t in have.values()} | {str(t) for t in to_add}
        for k, v in named.items():
            content = _token_content(v)
            if content is not None and content not in known:
                attrs = {a: b for a, b in v.items() if not a.startswith("__")} if isinstance(v, dict) else {}
                attrs.update(content=content, special=True)
                to_add.append(AddedToken(**attrs))
                known.add(content)
        if to_add:
            hf.add_tokens(to_add)
        hf.encode_special_tokens = bool(cfg.get("split_special_tokens", False))

        self.special_tokens_map = {k: c for k, v in named.items() if (c := _token_content(v)) is not None}
        ids = {k: hf.token_to_id(c) for k, c in self.special_tokens_map.items()}
        self.bos_id: int | None = ids.get("bos_token")
        eos = ids.get("eos_token")
        gen = _json_object(files.get("generation_config.json", "{}"), f"{source}/generation_config.json")
        gen_eos = gen.get("eos_token_id")
        gen_eos = [gen_eos] if isinstance(gen_eos, int) else [i for i in gen_eos or [] if isinstance(i, int)]
        if eos is None and gen_eos:
            eos = gen_eos[0]
        if eos is None:
            raise UserError(f"{source}: no eos_token (tokenizer_config.json) or eos_token_id "
                            "(generation_config.json) names a token of the tokenizer")
        self.eos_id: int = eos
        self.pad_id: int = ids["pad_token"] if ids.get("pad_token") is not None else eos
        self.stop_ids: tuple[int, ...] = (eos, *sorted(set(gen_eos) - {eos}))
        added = hf.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special} | {i for i in ids.values() if i is not None}
        # the special tokens' strings and every other added token but whitespace runs (e.g. <tool_call>):
        # in chat messages (encode_chat) they are encoded as text, so a message cannot forge turns
        strings = {added[i].content if i in added else hf.id_to_token(i) for i in self.special_ids}
        strings |= {t.content for t in added.values() if t.content.strip()}
        self.control_tokens: tuple[str, ...] = tuple(sorted(strings - {None, ""}, key=lambda t: (-len(t), t)))
        self._control_re = _control_pattern(self.control_tokens)
        self._plain = None  # a copy of the backend that reads control_tokens as text (lazy)
        self.vocab_size: int = max(hf.get_vocab_size(with_added_tokens=True), max(added, default=-1) + 1)
        self.model_max_length = cfg.get("model_max_length")

        # chat templates: chat_template.jinja and additional_chat_templates/*.jinja over the config's
        templates: dict[str, str] = {}
        ct = cfg.get("chat_template")
        if isinstance(ct, str):
            templates["default"] = ct
        elif isinstance(ct, list):
            templates.update({t["name"]: t["template"] for t in ct if isinstance(t, dict) and "name" in t})
        elif isinstance(ct, dict):
            templates.update(ct)
        from_files = {n[len(HF_TEMPLATE_DIR) + 1:-len(".jinja")]: t for n, t in files.items()
                      if n.startswith(HF_TEMPLATE_DIR + "/") and n.endswith(".jinja")}
        if "chat_template.jinja" in files:
            from_files["default"] = files["chat_template.jinja"]
        if from_files:
            templates = from_files
        if not templates and "chat_template.json" in files:  # a processor's (transformers' tokenizer ignores it)
            legacy = _json_object(files["chat_template.json"], f"{source}/chat_template.json").get("chat_template")
            if isinstance(legacy, str):
                templates["default"] = legacy
        self.chat_templates = templates
        self.chat_template: str = templates.get("default") or FALLBACK_CHAT_TEMPLATE
        self.own_chat_template = "default" in templates  # False: the fallback (a model without a template)
        self._compiled = None

    # -- core ---------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = False, parse_special: bool = True) -> list[int]:
        """Token ids of ``text`` as transformers' ``tok(text, add_special_tokens=False)``: special-token
        strings become their ids, no BOS/EOS is added (a chat template that writes a BOS into the text
        gets exactly one). ``add_special_tokens=True``: what tokenizer.json's post-processor adds
        (e.g. Llama 3's BOS), as ``tok(text)``. ``parse_special=False``: no added-token string
        (:attr:`control_tokens`) becomes its id; they are encoded as text by the model's BPE, as
        transformers' ``split_special_tokens=True`` does."""
        return self._backend(parse_special).encode(text, add_special_tokens=add_special_tokens).ids

    def encode_chat(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                    tools: list[dict] | None = None) -> list[int]:
        """Prompt ids of a chat from outside: the model's template (:meth:`apply_chat_template`, given
        ``tools`` when not None) with every string of the messages and tools encoded as text (see
        :func:`encode_chat_with`)."""
        return encode_chat_with(self, self.apply_chat_template, messages, add_generation_prompt, tools)

    def encode_batch(self, texts: Sequence[str], parse_special: bool = True) -> list[list[int]]:
        """Ids of every text (no special tokens added): ``encode_batch_fast`` (no offsets, same ids);
        ``parse_special=False``: added-token strings are encoded as text, as in :meth:`encode`."""
        return _batch_ids(self._backend(parse_special), texts)

    def _backend(self, parse_special: bool):
        """The tokenizers backend: as loaded, or (``parse_special=False``) the copy that reads
        :attr:`control_tokens` as text."""
        if parse_special:
            return self._hf
        if self._plain is None:
            self._plain = _plain_copy(self._hf, self.control_tokens)
        return self._plain

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """Text of ``ids`` as transformers' ``tok.decode(ids, skip_special_tokens=skip_special)``;
        a cut-off multi-byte character becomes U+FFFD."""
        return self._hf.decode([int(i) for i in ids], skip_special_tokens=skip_special)

    def token_to_id(self, tok: str) -> int | None:
        return self._hf.token_to_id(tok)

    def id_to_token(self, i: int) -> str | None:
        return self._hf.id_to_token(int(i))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = True,
                            tools: list[dict] | None = None) -> str:
        """The model's chat template rendered as transformers' ``apply_chat_template(messages,
        tokenize=False, add_generation_prompt=..., tools=...)`` does (sandboxed Jinja, the same globals)."""
        if self._compiled is None:
            self._compiled = _compile_chat_template(self.chat_template)
        msgs = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict):
                raise UserError(f"message {i} must be a dict with role and content")
            m = {k: v for k, v in m.items() if v is not None}  # as transformers: None values dropped
            reasoning = next((m[k] for k in ("reasoning_content", "thinking", "reasoning") if k in m), None)
            if reasoning is not None:
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            msgs.append(copy.deepcopy(m))
        try:
            return self._compiled.render(messages=msgs, tools=copy.deepcopy(tools) if tools else None, documents=None,
                                         add_generation_prompt=add_generation_prompt, **self.special_tokens_map)
        except jinja2.TemplateError as e:
            raise UserError(f"chat template: {e}") from None

    def __len__(self) -> int:
        return self.vocab_size

    def __getstate__(self) -> dict:  # picklable (data loader workers): the compiled template is rebuilt
        return {**self.__dict__, "_compiled": None, "_plain": None}

    def __repr__(self) -> str:
        return (f"HFTokenizer(source={self.source!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id}, "
                f"stop_ids={self.stop_ids})")

    # -- files --------------------------------------------------------------------------------
    def hf_files(self) -> dict[str, str]:
        """The original files' texts by name (``tokenizer.json``, ``tokenizer_config.json``, ...)."""
        return dict(self._files)

    def save(self, out_dir: str | Path) -> Path:
        """Write the original files unchanged into ``out_dir`` (atomically): transformers and
        :func:`load_tokenizer` read the copy as they read the source."""
        out_dir = Path(out_dir)
        with atomic_dir(out_dir) as tmp:
            for name, text in self._files.items():
                (tmp / name).parent.mkdir(parents=True, exist_ok=True)
                (tmp / name).write_bytes(text.encode("utf-8"))
        return out_dir

    @classmethod
    def from_dir(cls, path: str | Path) -> "HFTokenizer":
        p = Path(path)
        names = [n for n in HF_FILES if (p / n).is_file()]
        if (p / HF_TEMPLATE_DIR).is_dir():
            names += sorted(f"{HF_TEMPLATE_DIR}/{f.name}" for f in (p / HF_TEMPLATE_DIR).glob("*.jinja"))
        files = {}
        for n in names:
            try:
                files[n] = (p / n).read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                raise UserError(f"{p / n} is not UTF-8 text") from None
        return cls(files, str(p))


def _batch_ids(hf, texts: Sequence[str]) -> list[list[int]]:
    """Ids of ``texts`` by the tokenizers backend ``hf``, no special tokens added: ``encode_batch_fast``
    (no offsets, same ids; tokenizers >= 0.20) in the library's threads."""
    fast = getattr(hf, "encode_batch_fast", None) or hf.encode_batch
    return [e.ids for e in fast(list(texts), add_special_tokens=False)]


def _plain_copy(hf, strings: Sequence[str]):
    """A copy of the ``tokenizers.Tokenizer`` ``hf`` that encodes ``strings`` (added tokens) as text:
    they are marked special in the copy and its ``encode_special_tokens`` is on (the tokenizers
    library then skips special added tokens when it splits the input)."""
    d = json.loads(hf.to_str())
    want = set(strings)
    for t in d.get("added_tokens") or []:
        if t.get("content") in want:
            t["special"] = True
    plain = RustTokenizer.from_str(json.dumps(d))
    plain.encode_special_tokens = True
    return plain


def _json_object(text: str, where: str) -> dict:
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"corrupt {where}: {e}") from None
    if not isinstance(obj, dict):
        raise UserError(f"corrupt {where}: expected a JSON object")
    return obj


def _token_content(v) -> str | None:
    """A special token's string from its config value: a string or an AddedToken dict."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _compile_chat_template(template: str):
    """A Jinja template compiled in a sandbox with the options and globals transformers gives chat
    templates: trim_blocks, lstrip_blocks, loop controls, the ``{% generation %}`` tag (rendered as its
    body), ``raise_exception``, ``strftime_now``, a ``tojson`` that keeps non-ASCII text, and ``dict`` /
    ``namespace`` that refuse underscore names."""
    class GenerationTag(Extension):  # {% generation %}...{% endgeneration %}: marks assistant text
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def strftime_now(fmt):
        return datetime.datetime.now().strftime(fmt)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def no_underscore(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot use the name {name!r}")

    class SafeNamespace(jinja2.utils.Namespace):
        def __init__(*args, **kwargs):  # noqa: N805 (jinja's signature trick: `self` may be a keyword)
            self, attrs = args[0], dict(*args[1:], **kwargs)
            for name in attrs:
                no_underscore(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            no_underscore(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

    class DictMaker:  # `dict(...)` and `dict.fromkeys(...)` without reaching the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[GenerationTag, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=strftime_now, dict=DictMaker(),
                       namespace=SafeNamespace)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise UserError(f"chat template: syntax error at line {e.lineno}: {e.message}") from None


def _new_bpe():
    tok = RustTokenizer(models.BPE())
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


@dataclass
class Config:
    inputs: str = ""               # comma-separated text/JSONL/Parquet files or folders; "" = the default corpus
    text_field: str = "text"       # JSONL/Parquet field holding the text
    vocab_size: int = 2048         # BPE vocabulary incl. 9 special tokens (>= 265)
    max_chars: int = 20_000_000    # stop reading input after this many characters
    out: str = "runs/tokenizer"    # output tokenizer dir

    def validate(self) -> "Config":
        if self.vocab_size < MIN_VOCAB:
            raise ConfigError(f"vocab_size must be >= {MIN_VOCAB}")
        if self.max_chars <= 0:
            raise ConfigError("max_chars must be > 0")
        if not self.out:
            raise ConfigError("out must name a directory")
        return self


def preset(name: str) -> Config:
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
