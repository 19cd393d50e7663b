"""gRPC front end: the same engine as a real HTTP server beside it; HTTP's answers are the oracle.

Greedy text (unary and streamed, text and chat prompts) equals HTTP's; a wrong or missing API key is
UNAUTHENTICATED; bad fields are INVALID_ARGUMENT with HTTP's one-line message; the queue limit,
the time limit and the safety filter act as over HTTP; a cancelled stream cancels its engine
request; the health service answers SERVING; the checked-in generated modules match the .proto.
Every wait is bounded (call time-outs); everything listens on 127.0.0.1.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import grpc
import httpx
import pytest
from google.protobuf import descriptor_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc

from serve_fixtures import make_model, make_tokenizer, start_uvicorn
from tinyseek.errors import UserError
from tinyseek.serve import tinyseek_pb2 as pb
from tinyseek.serve import tinyseek_pb2_grpc as pb_grpc
from tinyseek.serve.engine import Completion, Engine
from tinyseek.serve.grpc_server import SERVICE, start_grpc
from tinyseek.serve.safety import SafetyFilter
from tinyseek.serve.server import Config, build, create_app
from tinyseek.train.checkpoint import save_checkpoint

KEY = "sk-grpc-test"
AUTH = (("authorization", f"Bearer {KEY}"),)
T = 20.0  # the bound on every call
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def servers(tok):
    """(http base url, gRPC stub, channel, engine): one engine behind uvicorn and the gRPC server."""
    eng = Engine(make_model(tok), tok, max_batch=4, max_len=96)
    cfg = Config(api_key=KEY, max_tokens=64, default_max_tokens=8, max_prompt_tokens=60, blocklist=["forbidden topic"])
    app = create_app(eng, tok, cfg)
    base, server, th = start_uvicorn(app)
    handle = start_grpc(eng, tok, cfg, app.state.safety, 0, metrics=app.state.metrics)
    assert handle.address.startswith("127.0.0.1:")
    channel = grpc.insecure_channel(f"127.0.0.1:{handle.port}")
    grpc.channel_ready_future(channel).result(timeout=T)
    try:
        yield base, pb_grpc.GenerationStub(channel), channel, eng
    finally:
        channel.close()
        handle.stop(grace=1)
        server.should_exit = True
        th.join(T)


def http(base: str, path: str, body: dict) -> dict:
    r = httpx.post(base + path, json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=T)
    assert r.status_code == 200, r.text
    return r.json()


def streamed(stub, req) -> tuple[str, list]:
    chunks = list(stub.GenerateStream(req, metadata=AUTH, timeout=T))
    return "".join(c.text for c in chunks), chunks


def code_and_details(call) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code(), e.value.details()


CHAT = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello there"}]


@pytest.mark.parametrize("kind", ["text", "chat"])
def test_greedy_unary_and_stream_equal_http(servers, kind):
    base, stub, _, _ = servers
    if kind == "text":
        h = http(base, "/v1/completions", {"prompt": "Once upon a time", "max_tokens": 20, "temperature": 0})
        want, req = h["choices"][0]["text"], pb.GenerateRequest(text="Once upon a time")
    else:
        h = http(base, "/v1/chat/completions", {"messages": CHAT, "max_tokens": 20, "temperature": 0})
        want = h["choices"][0]["message"]["content"]
        req = pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(**m) for m in CHAT]))
    req.max_tokens, req.temperature = 20, 0
    resp = stub.Generate(req, metadata=AUTH, timeout=T)
    assert want and resp.text == want
    assert resp.finish_reason == h["choices"][0]["finish_reason"] and resp.model == "tinyseek"
    u = h["usage"]
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == (
        u["prompt_tokens"], u["completion_tokens"], u["total_tokens"])
    text, chunks = streamed(stub, req)
    assert text == want and len(chunks) >= 3  # in pieces, then the last chunk
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("gen-")
    assert [c.finish_reason for c in chunks[:-1]] == [""] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == resp.finish_reason and chunks[-1].usage == resp.usage
    assert all(not c.HasField("usage") for c in chunks[:-1])


def test_stop_string_and_seed_as_http(servers):
    base, stub, _, _ = servers
    body = {"prompt": "abc", "max_tokens": 24, "temperature": 0.9, "seed": 7, "stop": ["e", "z"]}
    want = http(base, "/v1/completions", body)["choices"][0]
    req = pb.GenerateRequest(text="abc", max_tokens=24, temperature=0.9, seed=7, stop=["e", "z"])
    resp = stub.Generate(req, metadata=AUTH, timeout=T)
    assert (resp.text, resp.finish_reason) == (want["text"], want["finish_reason"])
    assert streamed(stub, req)[0] == want["text"]


@pytest.mark.parametrize("metadata", [None, (("authorization", "Bearer wrong"),), (("authorization", KEY),)])
def test_wrong_or_missing_key_is_unauthenticated(servers, metadata):
    _, stub, _, _ = servers
    req = pb.GenerateRequest(text="hi", max_tokens=2)
    for call in (lambda: stub.Generate(req, metadata=metadata, timeout=T),
                 lambda: list(stub.GenerateStream(req, metadata=metadata, timeout=T))):
        code, details = code_and_details(call)
        assert code == grpc.StatusCode.UNAUTHENTICATED and "API key" in details


def test_health_serving(servers):
    _, _, channel, _ = servers
    h = health_pb2_grpc.HealthStub(channel)
    for name in ("", SERVICE):
        r = h.Check(health_pb2.HealthCheckRequest(service=name), timeout=T)
        assert r.status == health_pb2.HealthCheckResponse.SERVING


@pytest.mark.parametrize("req, http_body, field", [
    (pb.GenerateRequest(text="hi", max_tokens=-1), {"prompt": "hi", "max_tokens": -1}, "max_tokens"),
    (pb.GenerateRequest(text="hi", max_tokens=65), {"prompt": "hi", "max_tokens": 65}, "max_tokens"),
    (pb.GenerateRequest(text="hi", temperature=3), {"prompt": "hi", "temperature": 3.0}, "temperature"),
    (pb.GenerateRequest(text="hi", top_p=0), {"prompt": "hi", "top_p": 0.0}, "top_p"),
    (pb.GenerateRequest(text="hi", stop=["x"] * 17), {"prompt": "hi", "stop": ["x"] * 17}, "stop"),
    (pb.GenerateRequest(chat=pb.Chat()), {"messages": []}, "messages"),
    (pb.GenerateRequest(chat=pb.Chat(messages=[pb.ChatMessage(role="robot", content="hi")])),
     {"messages": [{"role": "robot", "content": "hi"}]}, "messages"),
    (pb.GenerateRequest(text="x" * 61), {"prompt": "x" * 61}, "prompt"),
    (pb.GenerateRequest(text=""), {"prompt": ""}, "prompt"),
    (pb.GenerateRequest(max_tokens=2), None, "prompt"),
])
def test_bad_argument_is_invalid_argument_in_one_line(servers, req, http_body, field):
    base, stub, _, _ = servers
    code, details = code_and_details(lambda: stub.Generate(req, metadata=AUTH, timeout=T))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "\n" not in details and details
    assert field in details
    if http_body is not None:  # word for word what HTTP says
        path = "/v1/chat/completions" if "messages" in http_body else "/v1/completions"
        r = httpx.post(base + path, json=http_body, headers={"Authorization": f"Bearer {KEY}"}, timeout=T)
        assert r.status_code == 400 and r.json()["error"]["message"] == details
    assert code_and_details(lambda: list(stub.GenerateStream(req, metadata=AUTH, timeout=T))) == (code, details)


def test_other_model_is_not_found(servers):
    _, stub, _, _ = servers
    code, details = code_and_details(lambda: stub.Generate(pb.GenerateRequest(text="hi", model="gpt-9"),
                                                            metadata=AUTH, timeout=T))
    assert code == grpc.StatusCode.NOT_FOUND and "gpt-9" in details


def test_safety_filter_on_prompt_as_http(servers):
    base, stub, _, _ = servers
    want = http(base, "/v1/completions", {"prompt": "tell me about the FORBIDDEN topic", "max_tokens": 4})
    req = pb.GenerateRequest(text="tell me about the FORBIDDEN topic", max_tokens=4)
    resp = stub.Generate(req, metadata=AUTH, timeout=T)
    assert (resp.text, resp.finish_reason) == (want["choices"][0]["text"], "content_filter")
    assert resp.usage.completion_tokens == 0
    text, chunks = streamed(stub, req)
    assert text == resp.text and chunks[-1].finish_reason == "content_filter"
    chat = pb.Chat(messages=[pb.ChatMessage(role="system", content="forbidden\u200b topic"),
                             pb.ChatMessage(role="user", content="hi")])
    assert stub.Generate(pb.GenerateRequest(chat=chat), metadata=AUTH, timeout=T).finish_reason == "content_filter"


def test_cancelled_stream_cancels_the_engine_request(servers, monkeypatch):
    _, stub, _, eng = servers
    seen = []
    submit = eng.submit

    def recording_submit(*a, **kw):
        seen.append(submit(*a, **kw))
        return seen[-1]
    monkeypatch.setattr(eng, "submit", recording_submit)
    slow = lambda b, dt: time.sleep(0.02)  # noqa: E731 (a 64-token request now takes > 1 s)
    eng.step_listeners.append(slow)
    try:
        call = stub.GenerateStream(pb.GenerateRequest(text="hi", max_tokens=64, ignore_eos=True, temperature=0),
                                   metadata=AUTH, timeout=T)
        assert next(call).text  # generating
        call.cancel()
        (req,) = seen
        deadline = time.monotonic() + T
        while not req.done and time.monotonic() < deadline:
            time.sleep(0.01)
        assert req.done and req.completion.finish_reason == "cancelled" and len(req.completion.token_ids) < 64
    finally:
        eng.step_listeners.remove(slow)


class FakeEngine:
    """What the checks read of an engine: a full queue, or a request that times out."""
    max_len = 96
    _alive = True  # engine_running(): a ProcessEngine's flag

    def __init__(self, queued: int, finish: str):
        self.queued, self.finish = queued, finish

    def start(self):
        return self

    def queue_depth(self) -> int:
        return self.queued

    async def acomplete(self, ids, sp, timeout=None):
        return Completion([], None, self.finish, len(ids))


@pytest.mark.parametrize("queued, finish, code", [
    (4, "stop", grpc.StatusCode.RESOURCE_EXHAUSTED),  # queue full (429 over HTTP)
    (0, "timeout", grpc.StatusCode.DEADLINE_EXCEEDED),  # over the server's timeout_s (504)
    (0, "error", grpc.StatusCode.INTERNAL),
])
def test_limits_map_to_status_codes(tok, queued, finish, code):
    cfg = Config(max_queue=4, timeout_s=0.5)
    handle = start_grpc(FakeEngine(queued, finish), tok, cfg, SafetyFilter(), 0)
    try:
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            got, details = code_and_details(lambda: pb_grpc.GenerationStub(ch).Generate(
                pb.GenerateRequest(text="hi"), timeout=T))
        assert got == code and "\n" not in details
    finally:
        handle.stop(grace=0)


def test_stop_refuses_new_calls_and_a_taken_port_is_an_error(tok):
    handle = start_grpc(FakeEngine(0, "stop"), tok, Config(), SafetyFilter(), 0)
    try:
        with pytest.raises(UserError, match="cannot listen for gRPC"):
            start_grpc(FakeEngine(0, "stop"), tok, Config(), SafetyFilter(), handle.port)
    finally:
        handle.stop(grace=0)
    with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
        code, _ = code_and_details(lambda: pb_grpc.GenerationStub(ch).Generate(pb.GenerateRequest(text="hi"), timeout=2))
    assert code == grpc.StatusCode.UNAVAILABLE


def test_generated_modules_match_the_proto(tmp_path):
    """The checked-in tinyseek_pb2*.py describe tinyseek.proto as it is (regenerate: see its header)."""
    out = tmp_path / "set.pb"
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", "-I.", f"--descriptor_set_out={out}",
                    "tinyseek/serve/tinyseek.proto"], cwd=REPO, check=True, timeout=60)
    (fresh,) = descriptor_pb2.FileDescriptorSet.FromString(out.read_bytes()).file
    for msg in fresh.message_type:  # derived from the field names; protoc's Python output leaves it out
        for f in msg.field:
            f.ClearField("json_name")
    checked_in = descriptor_pb2.FileDescriptorProto.FromString(pb.DESCRIPTOR.serialized_pb)
    assert checked_in == fresh, "tinyseek_pb2.py is stale: regenerate it from tinyseek.proto"
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["Generation"].methods}
    assert methods == {n for n in vars(pb_grpc.GenerationServicer) if not n.startswith("_")}


def test_engine_process_as_main_wires_it(tok, tmp_path, monkeypatch):
    """``build()`` (the engine in its own process, as ``tinyseek serve`` runs it), then the wiring
    ``main`` does for ``--grpc-port``: both front ends on the one child engine, the key from the env."""
    model = make_model(tok)
    save_checkpoint(tmp_path / "ckpt", 3, model, None, {})
    tok.save(tmp_path / "tokenizer")
    monkeypatch.setenv("TINYSEEK_API_KEY", KEY)
    cfg = Config(ckpt=str(tmp_path), device="cpu", max_batch=2, engine_process=True)
    app, engine = build(cfg)
    base, server, th = start_uvicorn(app)
    handle = start_grpc(engine, app.state.tokenizer, cfg, app.state.safety, 0, metrics=app.state.metrics)
    try:
        want = http(base, "/v1/completions", {"prompt": "hello", "max_tokens": 6, "temperature": 0})["choices"][0]["text"]
        with grpc.insecure_channel(f"127.0.0.1:{handle.port}") as ch:
            req = pb.GenerateRequest(text="hello", max_tokens=6, temperature=0)
            assert pb_grpc.GenerationStub(ch).Generate(req, metadata=AUTH, timeout=T).text == want
            assert streamed(pb_grpc.GenerationStub(ch), req)[0] == want
        assert 'endpoint="/tinyseek.v1.Generation/Generate",status="OK"' in httpx.get(base + "/metrics", timeout=T).text
    finally:
        handle.stop(grace=1)
        server.should_exit = True
        th.join(T)  # the lifespan stops the engine process
