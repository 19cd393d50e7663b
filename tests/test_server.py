"""OpenAI-compatible server: shapes of JSON and SSE, errors, auth, limits, safety, metrics, shutdown."""
from __future__ import annotations

import json
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient

from serve_fixtures import make_model, make_tokenizer, start_uvicorn
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.serve.safety import SafetyFilter
from tinyseek.serve.server import Config, create_app

KEY = "sk-test-123"


def unsafe_classifier(text: str) -> float:
    """Example classifier hook for the tests: flags text that shouts."""
    return 0.9 if "!!!" in text else 0.0


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


@pytest.fixture(scope="module")
def client(model, tok):
    eng = Engine(model, tok, max_batch=4, max_len=96)
    cfg = Config(max_tokens=64, default_max_tokens=8, max_prompt_tokens=60, blocklist=["forbidden topic"],
                 classifier="test_server:unsafe_classifier", max_body_bytes=20_000)
    with TestClient(create_app(eng, tok, cfg), base_url="http://localhost") as c:
        yield c


def sse_events(text: str) -> list:
    """Parse an SSE body into JSON objects; checks the framing and the final [DONE]."""
    blocks = [b for b in text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks), blocks
    assert blocks[-1] == "data: [DONE]"
    return [json.loads(b[len("data: "):]) for b in blocks[:-1]]


def assert_error(r, status: int, param: str | None = None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert isinstance(err["message"], str) and err["message"] and "type" in err
    if param is not None:
        assert err["param"] == param


def test_chat_completion_shape_and_usage(client, tok):
    msgs = [{"role": "user", "content": "hello there"}]
    r = client.post("/v1/chat/completions", json={"model": "tinyseek", "messages": msgs, "max_tokens": 6,
                                                  "temperature": 0})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "chat.completion" and body["id"].startswith("chatcmpl-")
    assert body["model"] == "tinyseek" and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert choice["finish_reason"] in ("stop", "length")
    prompt_ids = tok.encode(tok.apply_chat_template(msgs, add_generation_prompt=True))
    u = body["usage"]
    assert u["prompt_tokens"] == len(prompt_ids) and 1 <= u["completion_tokens"] <= 6
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    # the same answer as the engine gives directly (greedy)
    eng = Engine(client.app.state.engine.model, tok, max_batch=1)
    ref = eng.generate([prompt_ids], SamplingParams(max_tokens=6))[0]
    assert choice["message"]["content"] == ref.text


def test_chat_stream_chunks(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True,
                                                  "max_tokens": 7, "temperature": 0,
                                                  "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    assert len({e["id"] for e in events}) == 1
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"
    usage = events[-1]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] >= 1
    final = events[-2]["choices"][0]
    assert final["finish_reason"] in ("stop", "length") and final["delta"] == {}
    content = "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-2])
    n_deltas = sum(1 for e in events[1:-2] if e["choices"][0]["delta"].get("content"))
    assert n_deltas >= 2  # streamed in pieces, not in one final blob
    # streaming and non-streaming give the same text
    r2 = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                   "max_tokens": 7, "temperature": 0})
    assert r2.json()["choices"][0]["message"]["content"] == content


def test_completions_json_and_stream(client):
    r = client.post("/v1/completions", json={"model": "tinyseek", "prompt": "Once upon", "max_tokens": 5,
                                             "temperature": 0})
    body = r.json()
    assert r.status_code == 200 and body["object"] == "text_completion"
    assert body["choices"][0]["finish_reason"] in ("stop", "length") and "text" in body["choices"][0]
    rs = client.post("/v1/completions", json={"prompt": "Once upon", "max_tokens": 5, "temperature": 0, "stream": True})
    events = sse_events(rs.text)
    assert all(e["object"] == "text_completion" for e in events)
    assert "".join(e["choices"][0]["text"] for e in events) == body["choices"][0]["text"]
    assert events[-1]["choices"][0]["finish_reason"] == body["choices"][0]["finish_reason"]


def test_stop_and_max_tokens_honoured(client):
    base = {"prompt": "the quick brown fox", "temperature": 0, "max_tokens": 20}
    full = client.post("/v1/completions", json=base).json()["choices"][0]
    text = full["text"]
    stop = text[3:5]
    r = client.post("/v1/completions", json={**base, "stop": stop}).json()
    assert r["choices"][0]["text"] == text[:text.find(stop)] and r["choices"][0]["finish_reason"] == "stop"
    r = client.post("/v1/completions", json={**base, "max_tokens": 3}).json()
    assert r["usage"]["completion_tokens"] == 3 and r["choices"][0]["finish_reason"] == "length"


def test_seeded_sampling_reproducible(client):
    req = {"prompt": "abc", "max_tokens": 8, "temperature": 1.0, "top_p": 0.95, "seed": 42}
    a = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=req).json()["choices"][0]["text"]
    assert a == b


@pytest.mark.parametrize("payload, status, param", [
    (b"{not json", 400, None),
    (b"[1, 2]", 400, None),
    ({"model": "gpt-4", "prompt": "hi"}, 404, "model"),
    ({"prompt": "x" * 200}, 400, "messages"),               # over max_prompt_tokens
    ({"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": 10_000}, 400, "max_tokens"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "max_tokens"),
    ({"prompt": "hi", "temperature": 9}, 400, "temperature"),
    ({"prompt": "hi", "stop": 3}, 400, "stop"),
    ({"prompt": "hi", "n": 0}, 400, "n"),
    ({"prompt": "hi", "n": 99}, 400, "n"),  # more than the engine's slots
    ({"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    ({"prompt": "hi", "top_logprobs": 2}, 400, "top_logprobs"),
    ({"prompt": "hi", "presence_penalty": 3}, 400, "presence_penalty"),
    ({"prompt": "hi", "logit_bias": {"99999": 1}}, 400, "logit_bias"),
    ({"prompt": "hi", "logit_bias": {"5": 101}}, 400, "logit_bias"),
    ({"prompt": "hi", "suffix": "x"}, 400, "suffix"),
    ({"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ({"prompt": "hi", "response_format": {"type": "json_object"}}, 400, "response_format"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),  # 0 only with echo + logprobs
    ({"prompt": [1, 99999]}, 400, "prompt"),
    ({"prompt": [[1, 2], "a"]}, 400, "prompt"),
    ({"prompt": 5}, 400, "prompt"),
    ({"prompt": ""}, 400, "prompt"),
    (b"{\"prompt\": \"" + b"a" * 30_000 + b"\"}", 413, None),  # body over max_body_bytes
])
def test_bad_completion_requests_get_4xx(client, payload, status, param):
    if isinstance(payload, bytes):
        r = client.post("/v1/completions", content=payload, headers={"content-type": "application/json"})
    else:
        r = client.post("/v1/completions", json=payload)
    assert_error(r, status, param)
    # the server keeps serving
    ok = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1


@pytest.mark.parametrize("payload", [
    {"messages": []}, {"messages": "hi"}, {"messages": [{"role": "wizard", "content": "x"}]},
    {"messages": [{"role": "user", "content": 3}]}, {"messages": [{"role": "user", "content": "y" * 300}]},
    {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
    {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
    {"messages": [{"role": "tool", "content": "x"}]},  # no tool_call_id
    {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function", "function": {"name": "f"}}]},
    {"messages": [{"role": "user", "content": "x"}], "tool_choice": "required"},
    {"messages": [{"role": "user", "content": "x"}], "response_format": {"type": "json_schema"}},
])
def test_bad_chat_requests_get_400(client, payload):
    assert_error(client.post("/v1/chat/completions", json=payload), 400)


def test_unknown_route_and_method_are_openai_errors(client):
    assert_error(client.get("/v1/nope"), 404)
    assert_error(client.get("/v1/chat/completions"), 405)


def test_models_health_and_metrics(client):
    m = client.get("/v1/models").json()
    assert m["object"] == "list" and m["data"][0]["id"] == "tinyseek" and m["data"][0]["object"] == "model"
    assert client.get("/v1/models/tinyseek").status_code == 200
    assert_error(client.get("/v1/models/other"), 404)
    h = client.get("/health")
    assert h.status_code == 200 and h.json()["status"] == "ok"
    client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
    text = client.get("/metrics").text
    for name in ("tinyseek_requests_total", "tinyseek_request_latency_seconds_bucket", "tinyseek_tokens_per_second",
                 "tinyseek_queue_depth", "tinyseek_batch_size_bucket", "tinyseek_completion_tokens_total",
                 "tinyseek_time_to_first_token_seconds_count"):
        assert name in text, name
    assert 'tinyseek_requests_total{endpoint="/v1/completions",status="200"}' in text
    assert 'tinyseek_requests_total{endpoint="/v1/completions",status="400"}' in text


def test_blocked_prompt_gets_refusal(client):
    before = client.app.state.metrics.refusals.value(stage="prompt")
    msgs = [{"role": "user", "content": "Tell me about the Forbidden   Topic please"}]
    r = client.post("/v1/chat/completions", json={"messages": msgs})
    assert r.status_code == 200
    ch = r.json()["choices"][0]
    assert ch["finish_reason"] == "content_filter" and ch["message"]["content"] == client.app.state.safety.refusal
    assert r.json()["usage"]["completion_tokens"] == 0
    # the classifier hook refuses too, and streaming gets the refusal as chunks
    rs = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "do it now!!!"}],
                                                   "stream": True})
    events = sse_events(rs.text)
    assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events) == client.app.state.safety.refusal
    assert client.app.state.metrics.refusals.value(stage="prompt") == before + 2
    # a harmless prompt that merely contains the word as part of another word is fine
    ok = client.post("/v1/completions", json={"prompt": "unforbidden topical", "max_tokens": 2})
    assert ok.json()["choices"][0]["finish_reason"] != "content_filter"


def _output_filter_case(eng, tok, safety, prompt):
    with TestClient(create_app(eng, tok, Config(), safety=safety), base_url="http://localhost") as c:
        body = {"prompt": prompt, "max_tokens": 20, "temperature": 0}
        r = c.post("/v1/completions", json=body).json()
        assert r["choices"][0]["finish_reason"] == "content_filter"
        assert r["choices"][0]["text"] == safety.refusal
        events = sse_events(c.post("/v1/completions", json={**body, "stream": True}).text)
        streamed = "".join(e["choices"][0]["text"] for e in events)
        assert events[-1]["choices"][0]["finish_reason"] == "content_filter"
        assert streamed.endswith(safety.refusal)
        assert c.app.state.metrics.refusals.value(stage="output") == 2
        assert c.app.state.metrics.refusals.value(stage="prompt") == 0
        return streamed[:-len(safety.refusal)]


def test_blocked_output_is_refused(model, tok):
    """Block text the model is known to produce: the output is replaced by the refusal and the
    streamed text stops before the blocked piece."""
    import re

    eng = Engine(model, tok, max_batch=2, max_len=96)
    prompt = "the quick brown fox"
    text = eng.generate([tok.encode(prompt)], SamplingParams(max_tokens=20, ignore_eos=True))[0].text
    piece = next(text[i:i + 3] for i in range(3, len(text) - 3) if text[i:i + 3] not in prompt)
    shown = _output_filter_case(eng, tok, SafetyFilter([], classifier=lambda t: float(piece in t)), prompt)
    assert piece not in shown
    # keyword blocklist on the output, when the output has a whole word to block
    words = [w for w in re.findall(r"\w{2,}", text) if w.lower() not in prompt]
    if words:
        shown = _output_filter_case(eng, tok, SafetyFilter([words[0]]), prompt)
        assert words[0].lower() not in shown.lower()


def test_api_key(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=96)
    with TestClient(create_app(eng, tok, Config(api_key=KEY)), base_url="http://localhost") as c:
        req = {"prompt": "hi", "max_tokens": 2}
        assert_error(c.post("/v1/completions", json=req), 401)
        assert_error(c.post("/v1/completions", json=req, headers={"Authorization": "Bearer wrong"}), 401)
        assert_error(c.get("/v1/models", headers={"Authorization": "Basic " + KEY}), 401)
        r = c.post("/v1/completions", json=req, headers={"Authorization": f"Bearer {KEY}"})
        assert r.status_code == 200
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # open pages


def test_apps_in_one_process_keep_their_own_state(model, tok):
    """The routes are module-level functions reading ``request.app.state``: two apps side by side
    answer with their own model name, API key, limits and metrics, never each other's."""
    a_eng, b_eng = Engine(model, tok, max_batch=2, max_len=96), Engine(model, tok, max_batch=2, max_len=64)
    auth = {"Authorization": f"Bearer {KEY}"}
    with TestClient(create_app(a_eng, tok, Config(model_name="a")), base_url="http://localhost") as a, \
            TestClient(create_app(b_eng, tok, Config(model_name="b", api_key=KEY, max_tokens=4)),
                       base_url="http://localhost") as b:
        assert a.get("/v1/models").json()["data"][0] == {"id": "a", "object": "model", "created": 0,
                                                        "owned_by": "tinyseek", "max_model_len": 96}
        assert_error(b.get("/v1/models"), 401)
        assert b.get("/v1/models", headers=auth).json()["data"][0]["max_model_len"] == 64
        assert_error(a.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}), 404)
        assert a.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8}).status_code == 200
        assert_error(b.post("/v1/completions", json={"prompt": "hi", "max_tokens": 8}, headers=auth), 400)
        r = b.post("/v1/completions", json={"model": "b", "prompt": "hi", "max_tokens": 2}, headers=auth)
        assert r.status_code == 200 and r.json()["model"] == "b"
        assert a.app.state.metrics is not b.app.state.metrics
        assert a.app.state.metrics.requests.value(endpoint="/v1/completions", status="200") == 1
        assert b.app.state.metrics.requests.value(endpoint="/v1/completions", status="200") == 1
        assert b.app.state.metrics.requests.value(endpoint="/v1/models", status="401") == 1


def test_web_page_served(client):
    r = client.get("/")
    assert r.status_code == 200 and "<textarea" in r.text and "/static/chat.js" in r.text
    assert "http://" not in r.text and "https://" not in r.text  # no CDN
    js = client.get("/static/chat.js")
    assert js.status_code == 200 and "/v1/chat/completions" in js.text and "https://" not in js.text


def test_timeout_gives_504(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=96)
    with TestClient(create_app(eng, tok, Config(timeout_s=1e-4, max_tokens=64)), base_url="http://localhost") as c:
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64})
        assert_error(r, 504)
        events = sse_events(c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 64, "stream": True}).text)
        assert "error" in events[-1]


def test_graceful_shutdown_finishes_in_flight(model, tok):
    """A real uvicorn on loopback: ask it to exit while a request is generating; the request still
    completes with all its tokens and the server then stops."""
    eng = Engine(model, tok, max_batch=2, max_len=96)
    slow = threading.Event()
    eng.step_listeners.append(lambda n, dt: time.sleep(0.01) if not slow.is_set() else None)
    app = create_app(eng, tok, Config(max_tokens=64))
    base, server, th = start_uvicorn(app, timeout_graceful_shutdown=30)
    result = {}

    def call():
        result["r"] = httpx.post(base + "/v1/completions", json={"prompt": "hi", "max_tokens": 40, "temperature": 0},
                                 timeout=60)
    t = threading.Thread(target=call)
    t.start()
    while eng.num_active() == 0 and t.is_alive():
        time.sleep(0.005)
    server.should_exit = True  # what SIGINT/SIGTERM does
    t.join(60)
    th.join(60)
    assert not th.is_alive()
    r = result["r"]
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 40
    assert eng._thread is None  # the engine was drained and stopped by the lifespan shutdown


def test_concurrent_streams_join_running_batches_with_the_same_text(model, tok):
    """A real uvicorn: greedy requests (half streamed, with a stop string) sent one at a time, then
    all at once and staggered so that they join running batches (mixed steps): the same texts."""
    import asyncio

    eng = Engine(model, tok, max_batch=4, max_len=96, max_wait=0.002)
    app = create_app(eng, tok, Config(max_tokens=64))
    base, server, th = start_uvicorn(app)
    mixed = []
    ragged = model.forward_ragged
    model.forward_ragged = lambda *a, **k: (mixed.append(1), ragged(*a, **k))[1]
    prompts = ["hello", "the quick brown fox", "a", "12+7=", "what is it", "xyz xyz", "ab", "tell me"]

    async def one(c, p, stream):
        body = {"prompt": p, "max_tokens": 12, "temperature": 0, "stop": ["zz"], "stream": stream}
        if not stream:
            return (await c.post(base + "/v1/completions", json=body)).json()["choices"][0]["text"]
        async with c.stream("POST", base + "/v1/completions", json=body) as r:
            return "".join([json.loads(ln[6:])["choices"][0].get("text", "") async for ln in r.aiter_lines()
                            if ln.startswith("data: ") and ln != "data: [DONE]"])

    async def late(c, i, p):
        await asyncio.sleep(0.004 * i)
        return await one(c, p, i % 2 == 1)

    async def main():
        async with httpx.AsyncClient(timeout=60) as c:
            alone = [await one(c, p, False) for p in prompts]
            together = await asyncio.gather(*[one(c, p, i % 2 == 0) for i, p in enumerate(prompts)])
            staggered = await asyncio.gather(*[late(c, i, p) for i, p in enumerate(prompts)])
            return alone, together, staggered

    try:
        alone, together, staggered = asyncio.run(main())
    finally:
        del model.forward_ragged  # back to the class method
        server.should_exit = True
        th.join(60)
    assert together == alone and staggered == alone
    assert mixed  # some requests joined running batches inside a decode forward


@pytest.fixture(scope="module")
def run_dir(model, tok, tmp_path_factory):
    """A run dir as training leaves it: ckpt/step_*/ and tokenizer/."""
    from tinyseek.train.checkpoint import save_checkpoint

    d = tmp_path_factory.mktemp("run")
    save_checkpoint(d / "ckpt", 3, model, None, {})
    tok.save(d / "tokenizer")
    return d


def test_build_from_checkpoint_serves_same_answers(run_dir, model, tok):
    from tinyseek.serve.server import build

    app, eng = build(Config(ckpt=str(run_dir), device="cpu", max_batch=2))
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0}).json()
    ref = Engine(model, tok, max_batch=1).generate([tok.encode("hello")], SamplingParams(max_tokens=6))[0]
    assert r["choices"][0]["text"] == ref.text


def test_cli_errors(tmp_path):
    from tinyseek.cli import main as cli

    assert cli(["serve"]) == 2                                    # --ckpt missing
    assert cli(["serve", "--ckpt", str(tmp_path / "none")]) == 2  # no such checkpoint
    assert cli(["serve", "--port", "70000", "--ckpt", "x"]) == 2  # bad config
    assert cli(["chat", "--temperature", "-1"]) == 2


def test_terminal_chat(run_dir, model, tok):
    import io

    from tinyseek.serve import chat

    out = io.StringIO()
    cfg = chat.Config(ckpt=str(run_dir), device="cpu", max_tokens=5, temperature=0.0)
    res = chat.main(cfg, stdin=io.StringIO("hello\n\n/reset\nhello\n/exit\nnot read\n"), stdout=out)
    assert res["turns"] == 2 and res["tokens"] >= 2
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello"}]))
    ref = Engine(model, tok, max_batch=1).generate([ids], SamplingParams(max_tokens=5))[0]
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("bot> ")]
    assert lines == ["bot> " + ref.text] * 2  # after /reset the same greedy answer again
    assert "(conversation cleared)" in out.getvalue() and "tok/s" in out.getvalue()


def test_serves_quantized_checkpoint(run_dir, model, tok, tmp_path):
    """An int8 checkpoint (tinyseek.quant) loads through the same path and serves answers."""
    import copy

    from tinyseek.quant.quantize import QuantSpec, quant_config, quantize_model, save_quantized
    from tinyseek.serve.server import build

    q = copy.deepcopy(model)
    spec = QuantSpec(method="int8")
    rep = quantize_model(q, spec)
    save_quantized(q, tmp_path / "q", quant_config(q, spec, rep["modules"]))
    app, eng = build(Config(ckpt=str(tmp_path / "q"), tokenizer=str(run_dir / "tokenizer"), device="cpu"))
    with TestClient(app, base_url="http://localhost") as c:
        r = c.post("/v1/completions", json={"prompt": "hello", "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    ref = Engine(q, tok, max_batch=1).generate([tok.encode("hello")], SamplingParams(max_tokens=6))[0]
    assert r.json()["choices"][0]["text"] == ref.text
