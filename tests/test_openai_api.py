"""The server through the official ``openai`` client on a real uvicorn: logprobs (chat and legacy
shapes, echo, max_tokens 0) against a direct forward of the model, the prompt forms, n > 1 with a
shared prefill, penalties and logit_bias, R1 reasoning split, the developer / tool roles."""
from __future__ import annotations

import openai
import pytest
import torch

from serve_fixtures import make_model, make_tokenizer, start_uvicorn
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.serve.reasoning import split_reasoning
from tinyseek.serve.server import Config, create_app
from tinyseek.serve.tools import plain_messages

MSGS = [{"role": "user", "content": "2+2?"}]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def _serve(model, tok, **cfg):
    eng = Engine(model, tok, max_batch=8, max_len=96)
    app = create_app(eng, tok, Config(max_tokens=64, default_max_tokens=8, **cfg))
    base, server, th = start_uvicorn(app)
    return openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0), server, th


@pytest.fixture(scope="module")
def client(model, tok):
    c, server, th = _serve(model, tok)
    yield c
    server.should_exit = True
    th.join(10)


@pytest.fixture(scope="module")
def raw_client(model, tok):
    c, server, th = _serve(model, tok, reasoning_format="raw")
    yield c
    server.should_exit = True
    th.join(10)


def ref_logprobs(model, ids: list[int]) -> torch.Tensor:
    """log-softmax of the model's raw logits over ``ids`` (one forward, no cache): row t predicts ids[t+1]."""
    with torch.no_grad():
        return torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), -1)


def test_chat_logprobs_equal_a_direct_forward(client, model, tok):
    prompt = tok.encode_chat(MSGS)
    for stream in (False, True):
        kw = dict(model="tinyseek", messages=MSGS, max_tokens=6, temperature=0.7, seed=3, logprobs=True,
                  top_logprobs=3, extra_body={"ignore_eos": True})
        if stream:
            content = [e for ch in client.chat.completions.create(stream=True, **kw)
                       for c in ch.choices if c.logprobs and c.logprobs.content for e in c.logprobs.content]
        else:
            content = client.chat.completions.create(**kw).choices[0].logprobs.content
        assert len(content) == 6
        ids = [e.bytes[0] for e in content]  # byte tokenizer: a byte token's bytes are its id
        ref = ref_logprobs(model, prompt + ids)
        for t, e in enumerate(content):
            row = ref[len(prompt) - 1 + t]
            assert abs(e.logprob - row[ids[t]].item()) < 1e-4
            top = row.topk(3)
            assert [x.bytes for x in e.top_logprobs] == [[i] for i in top.indices.tolist()]
            assert max(abs(x.logprob - v) for x, v in zip(e.top_logprobs, top.values.tolist())) < 1e-4


def test_echo_logprobs_with_max_tokens_0_as_lm_eval_asks(client, model, tok):
    """lm-eval's loglikelihood: token-id prompts, echo, logprobs, max_tokens 0 (and 1)."""
    prompts = [tok.encode("The cat sat"), tok.encode("on the mat.")]
    r = client.completions.create(model="tinyseek", prompt=prompts, max_tokens=0, echo=True, logprobs=2, temperature=0)
    assert [c.index for c in r.choices] == [0, 1] and r.usage.completion_tokens == 0
    for c, ids in zip(r.choices, prompts):
        lp = c.logprobs
        assert c.text == tok.decode(ids) and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert len(lp.tokens) == len(ids) and lp.text_offset == list(range(len(ids)))  # one byte a token
        ref = ref_logprobs(model, ids)
        got = torch.tensor(lp.token_logprobs[1:])
        want = ref[torch.arange(len(ids) - 1), torch.tensor(ids[1:])]
        assert (got - want).abs().max() < 1e-4
        assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    one = client.completions.create(model="tinyseek", prompt=prompts[0], max_tokens=1, echo=True, logprobs=1,
                                    temperature=0)
    lp = one.choices[0].logprobs
    assert len(lp.token_logprobs) == len(prompts[0]) + 1 and one.choices[0].text.startswith("The cat sat")
    ref = ref_logprobs(model, prompts[0] + [tok.encode(lp.tokens[-1])[0]] if lp.tokens[-1] != "\ufffd" else prompts[0])
    assert abs(lp.token_logprobs[len(prompts[0]) - 1] - ref[len(prompts[0]) - 2, prompts[0][-1]].item()) < 1e-4
    # streamed: the echo first, then the prompt's logprobs with the first token's
    chunks = list(client.completions.create(model="tinyseek", prompt=prompts[0], max_tokens=2, echo=True, logprobs=0,
                                            temperature=0, stream=True, extra_body={"ignore_eos": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    lps = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert text.startswith("The cat sat") and len(lps) == len(prompts[0]) + 2 and lps[0] is None


def test_prompt_forms_and_choice_indices(client, tok):
    base = dict(model="tinyseek", max_tokens=4, temperature=0)
    text = client.completions.create(prompt="hello", **base).choices[0].text
    assert client.completions.create(prompt=["hello"], **base).choices[0].text == text
    assert client.completions.create(prompt=tok.encode("hello"), **base).choices[0].text == text
    r = client.completions.create(prompt=[tok.encode("hello"), tok.encode("bye")], n=2, **base)
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    by = {c.index: c.text for c in r.choices}
    assert by[0] == by[1] == text  # greedy: every sample of a prompt is the same
    assert r.usage.prompt_tokens == 8  # each prompt counted once, not n times
    s = client.completions.create(prompt=["hello", "bye"], n=2, stream=True, **base)
    got: dict[int, str] = {}
    for ch in s:
        for c in ch.choices:
            got[c.index] = got.get(c.index, "") + c.text
    assert got == by


def test_n_samples_fork_one_prefill_and_derive_seeds(model, tok):
    eng = Engine(model, tok, max_batch=4, max_len=64)
    prompt = tok.encode("once upon")
    sp = SamplingParams(max_tokens=8, temperature=1.0, seed=11, n=3, ignore_eos=True)
    req = eng.submit(prompt, sp)
    before = eng.stats["prefill_tokens"]
    while not req.done:
        eng.step()
    outs = req.results()
    assert eng.stats["prefill_tokens"] - before == len(prompt)  # prefilled once for the three samples
    assert [c.index for c in outs] == [0, 1, 2] and len({tuple(c.token_ids) for c in outs}) > 1
    from tinyseek.serve.engine import sample_seeds
    import random
    seeds = sample_seeds(11, 3, random.Random())
    alone = eng.generate([prompt] * 3, [SamplingParams(max_tokens=8, temperature=1.0, seed=s, ignore_eos=True)
                                        for s in seeds])
    assert [c.token_ids for c in alone] == [c.token_ids for c in outs]  # sample i == a lone request seeded seeds[i]


def test_seeded_n_reproducible_through_the_api(client):
    kw = dict(model="tinyseek", messages=MSGS, n=3, max_tokens=6, temperature=1.0, seed=5)
    a = [c.message.content for c in client.chat.completions.create(**kw).choices]
    b = [c.message.content for c in client.chat.completions.create(**kw).choices]
    assert a == b and len(a) == 3


def test_logit_bias_and_penalties_match_a_reference(client, model, tok):
    r = client.completions.create(model="tinyseek", prompt="hi", max_tokens=5, temperature=0,
                                  logit_bias={str(ord("z")): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == "zzzzz"
    prompt = tok.encode("abc")
    for pres, freq in ((1.5, 0.0), (0.0, 2.0), (-1.0, 0.5)):
        r = client.completions.create(model="tinyseek", prompt="abc", max_tokens=8, temperature=0, presence_penalty=pres,
                                      frequency_penalty=freq, extra_body={"ignore_eos": True})
        ids, out = list(prompt), []
        for _ in range(8):  # OpenAI's definition over the generated tokens
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1, :tok.vocab_size].float()
            counts = torch.bincount(torch.tensor(out, dtype=torch.long), minlength=logits.numel()).float()
            t = int((logits - freq * counts - pres * (counts > 0).float()).argmax())
            out.append(t)
            ids.append(t)
        assert r.choices[0].text == tok.decode(out)


def test_reasoning_split_and_raw(client, raw_client, tok):
    """The byte model's output holds tags now and then; split == split_reasoning(raw), streamed too."""
    for seed in range(4):
        kw = dict(model="tinyseek", messages=MSGS, max_tokens=24, temperature=1.0, seed=seed,
                  logit_bias={str(tok.token_to_id("<think>")): 3, str(tok.token_to_id("</think>")): 3})
        raw = raw_client.chat.completions.create(**kw).choices[0].message
        split = client.chat.completions.create(**kw).choices[0].message
        reasoning, content = split_reasoning(raw.content)
        assert split.content == content and getattr(split, "reasoning_content", None) == reasoning
        parts = {"content": "", "reasoning_content": ""}
        for ch in client.chat.completions.create(stream=True, **kw):
            for c in ch.choices:
                parts["content"] += c.delta.content or ""
                parts["reasoning_content"] += getattr(c.delta, "reasoning_content", None) or ""
        assert parts == {"content": content, "reasoning_content": reasoning or ""}


def test_developer_tool_roles_in_the_plain_form(client, tok):
    msgs = [{"role": "developer", "content": "be brief"}, {"role": "user", "content": "add 1 and 2"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "3 <|user|>"}]
    r = client.chat.completions.create(model="tinyseek", messages=msgs, max_tokens=2, temperature=0)
    ids = tok.encode_chat(plain_messages(msgs))
    assert r.usage.prompt_tokens == len(ids)
    assert ids.count(tok.token_to_id("<|user|>")) == 2  # the tool text's "<|user|>" stayed text
    with pytest.raises(openai.BadRequestError, match="no tool-call syntax"):
        client.chat.completions.create(model="tinyseek", messages=MSGS, tools=[
            {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}])


HERMES = ("{% if tools %}<|system|>Tools:{% for t in tools %} {{ t['function']['name'] }}{% endfor %}{% endif %}"
          "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] or '' }}"
          "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
          "{% if m['role'] == 'assistant' %}<|eos|>{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def test_tools_reach_a_template_with_tool_syntax(tmp_path):
    """An imported-style tokenizer whose template writes <tool_call>: tools are rendered (as text)."""
    import json as _json

    from tinyseek.interop.hf_export import byte_tokenizer_json
    from tinyseek.serve.tools import template_messages
    from tinyseek.tokenizer import HFTokenizer, byte_tokenizer
    bt = byte_tokenizer()
    files = {"tokenizer.json": byte_tokenizer_json(dict(bt._special)),
             "tokenizer_config.json": _json.dumps({"eos_token": "<|eos|>", "chat_template": HERMES})}
    tok = HFTokenizer(files)
    m = make_model(tok)
    c, server, th = _serve(m, tok)
    try:
        tools = [{"type": "function", "function": {"name": "f<|user|>"}}]
        msgs = [{"role": "user", "content": "1+2"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "c1", "type": "function", "function": {"name": "f", "arguments": '{"a": 1}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}]
        r = c.chat.completions.create(model="tinyseek", messages=msgs, tools=tools, max_tokens=2, temperature=0)
        ids = tok.encode_chat(template_messages(msgs), tools=tools)
        assert r.usage.prompt_tokens == len(ids) > len(tok.encode_chat(template_messages(msgs)))
        assert ids.count(tok.token_to_id("<|user|>")) == 1  # the tool name's marker stayed text
        assert '<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>' in tok.decode(ids)
        assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    finally:
        server.should_exit = True
        th.join(10)
