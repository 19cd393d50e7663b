"""The gRPC front end (``tinyseek.v1.Generation``, :file:`tinyseek.proto`) beside the HTTP server, on the same engine.

:func:`start_grpc` runs a ``grpc.aio`` server on its own event loop in a daemon thread of the HTTP
server's process, so both front ends submit to one engine object (an in-process
:class:`~tinyseek.serve.engine.Engine` or the :class:`~tinyseek.serve.engine_proc.ProcessEngine`;
their ``acomplete`` / ``astream`` hand results to whichever loop awaits them). Beside it: the standard
``grpc.health.v1.Health`` service.

Guarantees (what HTTP does, checked by the same functions of :mod:`tinyseek.serve.api`):
- A request is the HTTP body it mirrors (:func:`request_body`): ``text`` is ``/v1/completions``'
  ``prompt``, ``chat`` is ``/v1/chat/completions``' ``messages``; sampling fields go through
  ``parse_sampling`` / ``parse_messages``, the prompt through ``check_prompt`` (length, queue), the API
  key through ``check_auth`` (from the metadata ``authorization: Bearer <key>``), so the same greedy
  request gets the same text over both, and every refusal the same one-line message.
- HTTP statuses map to gRPC codes (:data:`CODES`): 400 INVALID_ARGUMENT (the message names the
  field), 401 UNAUTHENTICATED, 404 NOT_FOUND (``model`` not this server's), 429 RESOURCE_EXHAUSTED
  (queue full; also a message over ``max_body_bytes``), 503 UNAVAILABLE (stopping), 504
  DEADLINE_EXCEEDED (the server's ``timeout_s``), 500 INTERNAL. Details are one line.
- Safety: a refused prompt gets the refusal as a normal answer (``finish_reason`` ``content_filter``); a
  blocked output is replaced by it (streamed: the text so far is kept, the refusal comes in the last
  chunk; text held back at a blocked-word prefix is never sent), as over HTTP.
- A client that cancels, goes away or passes its deadline cancels its engine request.
- Health: ``""`` and ``tinyseek.v1.Generation`` are SERVING while the engine runs (polled every
  :data:`HEALTH_POLL_S`) and the server is not stopping; NOT_SERVING otherwise.
- Binds ``cfg.host`` (127.0.0.1 by default) without SO_REUSEPORT: a taken port is an error, not a
  second server sharing it.

Generated code: ``tinyseek_pb2.py`` / ``.pyi`` / ``tinyseek_pb2_grpc.py`` are checked in (the runtime
needs grpcio and protobuf only, not grpcio-tools and its protoc); tests/test_grpc.py regenerates
them with grpc_tools and checks they describe the same .proto.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
import time
import uuid
from types import SimpleNamespace
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tinyseek.errors import UserError
from tinyseek.serve import tinyseek_pb2 as pb
from tinyseek.serve import tinyseek_pb2_grpc as pb_grpc
from tinyseek.serve.engine import Completion, SamplingParams
from tinyseek.serve.api import (ApiError, add_stop_ids, check_auth, check_prompt, completion_error, finish_reason,
                                parse_messages, parse_sampling, record_completion)
from tinyseek.serve.metrics import ServerMetrics
from tinyseek.serve.safety import SafetyFilter

SERVICE = pb.DESCRIPTOR.services_by_name["Generation"].full_name  # "tinyseek.v1.Generation"
HEALTH_POLL_S = 0.25  # how often the health status follows the engine
_START_TIMEOUT_S = 30.0

CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED, 429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE, 504: grpc.StatusCode.DEADLINE_EXCEEDED,
}


# ---------------------------------------------------------------------------------------------
# requests and errors (pure)
# ---------------------------------------------------------------------------------------------
def request_body(req: pb.GenerateRequest) -> dict:
    """The HTTP body ``req`` mirrors: ``prompt`` (text) or ``messages`` (chat), the sampling fields
    that are set (unset optional fields are absent, so the server's defaults apply), ``model`` if set.

    >>> request_body(pb.GenerateRequest(text="hi", max_tokens=5, stop=["."]))
    {'stop': ['.'], 'ignore_eos': False, 'max_tokens': 5, 'prompt': 'hi'}
    >>> chat = pb.Chat(messages=[pb.ChatMessage(role="user", content="hi")])
    >>> request_body(pb.GenerateRequest(chat=chat, temperature=0, model="m"))
    {'stop': [], 'ignore_eos': False, 'temperature': 0.0, 'messages': [{'role': 'user', 'content': 'hi'}], 'model': 'm'}
    """
    body: dict = {"stop": list(req.stop), "ignore_eos": req.ignore_eos}
    for name in ("max_tokens", "temperature", "top_p", "seed", "top_k"):
        if req.HasField(name):
            body[name] = getattr(req, name)
    kind = req.WhichOneof("prompt")
    if kind == "text":
        body["prompt"] = req.text
    elif kind == "chat":
        body["messages"] = [{"role": m.role, "content": m.content} for m in req.chat.messages]
    if req.model:
        body["model"] = req.model
    return body


def as_api_error(e: Exception) -> ApiError:
    """The :class:`ApiError` an exception of a handler becomes (as the HTTP error handlers map them).

    >>> as_api_error(UserError("prompt is empty")).status, as_api_error(KeyError("x")).message
    (400, 'internal error: KeyError')
    """
    if isinstance(e, ApiError):
        return e
    if isinstance(e, UserError):
        return ApiError(400, str(e))
    return ApiError(500, f"internal error: {type(e).__name__}", "server_error")


def grpc_status(e: ApiError) -> tuple[grpc.StatusCode, str]:
    """``(code, one-line details)`` for an HTTP error.

    >>> grpc_status(ApiError(429, "too many requests queued;\\nretry later"))
    (<StatusCode.RESOURCE_EXHAUSTED: (8, 'resource exhausted')>, 'too many requests queued; retry later')
    """
    return CODES.get(e.status, grpc.StatusCode.UNKNOWN), " ".join(e.message.split())


def engine_running(engine) -> bool:
    """Is ``engine`` serving? An in-process Engine: its scheduler thread is alive and not stopping; a
    ProcessEngine: its child has not exited or been stopped."""
    if hasattr(engine, "_alive"):  # ProcessEngine: False once the reader saw the child stop or die
        return bool(engine._alive)
    thread = getattr(engine, "_thread", None)
    return thread is not None and thread.is_alive() and not getattr(engine, "_stopping", False)


# ---------------------------------------------------------------------------------------------
# the service
# ---------------------------------------------------------------------------------------------
class GenerationService(pb_grpc.GenerationServicer):
    """``Generate`` / ``GenerateStream`` over the shared state ``st``: the fields of the HTTP app's
    state that its checks read (``engine``, ``tokenizer``, ``cfg``, ``safety``, ``metrics``,
    ``api_key``, ``max_prompt``) plus ``stopping``."""

    def __init__(self, st: SimpleNamespace):
        self.st = st

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext) -> pb.GenerateResponse:
        t0, err = time.monotonic(), None
        try:
            resp = await self._generate(request, context)
        except Exception as e:  # (a cancelled call raises CancelledError, not caught here)
            err = as_api_error(e)
        self._count("Generate", err, t0)
        if err is not None:
            await context.abort(*grpc_status(err))
        return resp

    async def GenerateStream(self, request: pb.GenerateRequest,
                             context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateChunk]:
        t0, err = time.monotonic(), None
        try:
            async for chunk in self._stream(request, context):
                yield chunk
        except Exception as e:
            err = as_api_error(e)
        self._count("GenerateStream", err, t0)
        if err is not None:
            await context.abort(*grpc_status(err))

    # --- shared steps --------------------------------------------------------------------------
    def _prepare(self, request: pb.GenerateRequest, context) -> tuple[list[int], SamplingParams, str]:
        """``(prompt ids, sampling params, text the safety filter reads)``, checked in the HTTP order:
        API key, stopping, model, prompt / messages, sampling fields, prompt length and queue."""
        st = self.st
        auth = next((v for k, v in context.invocation_metadata() or () if k == "authorization"), "")
        as_http = SimpleNamespace(app=SimpleNamespace(state=st), headers={"authorization": auth})
        check_auth(as_http)
        if st.stopping or not engine_running(st.engine):
            raise ApiError(503, "server is shutting down", "server_error")
        body = request_body(request)
        model = body.get("model")
        if model is not None and model != st.cfg.model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves '{st.cfg.model_name}'",
                           "not_found_error", "model", "model_not_found")
        if "messages" in body:
            msgs = parse_messages(body)
            sp = parse_sampling(body, st.cfg)[0]
            ids = st.tokenizer.encode_chat(msgs, add_generation_prompt=True)  # message text stays text
            checked = "\n".join(m["content"] for m in msgs)  # every role, as over HTTP
        elif "prompt" in body:
            sp = parse_sampling(body, st.cfg)[0]
            ids = st.tokenizer.encode(body["prompt"], add_special_tokens=True, parse_special=st.cfg.prompt_special_tokens)
            checked = body["prompt"]
        else:
            raise ApiError(400, "'prompt' must be set: text or chat", param="prompt")
        ids = check_prompt(as_http, ids)
        sp.max_tokens = max(1, min(sp.max_tokens, st.engine.max_len - len(ids)))
        add_stop_ids(sp, st.tokenizer)
        return ids, sp, checked

    def _refused(self, text: str, stage: str) -> bool:
        safety = self.st.safety
        if safety.active and safety.check(text).blocked:
            if self.st.metrics is not None:
                self.st.metrics.refusals.inc(stage=stage)
            return True
        return False

    def _done(self, comp: Completion) -> None:
        """Raise the error a completion that did not finish normally is; count its tokens."""
        err = completion_error(comp, self.st.cfg.timeout_s)
        if err is not None:
            raise err
        if self.st.metrics is not None:
            record_completion(self.st.metrics, comp)

    def _count(self, method: str, err: ApiError | None, t0: float) -> None:
        m = self.st.metrics
        if m is not None:
            ep = f"/{SERVICE}/{method}"
            m.requests.inc(endpoint=ep, status=(grpc_status(err)[0] if err else grpc.StatusCode.OK).name)
            m.latency.observe(time.monotonic() - t0, endpoint=ep)

    async def _generate(self, request: pb.GenerateRequest, context) -> pb.GenerateResponse:
        st = self.st
        ids, sp, checked = self._prepare(request, context)
        rid = "gen-" + uuid.uuid4().hex[:24]
        if self._refused(checked, "prompt"):
            return _response(rid, st.cfg.model_name, st.safety.refusal, "content_filter", len(ids), 0)
        comp = await st.engine.acomplete(ids, sp, timeout=st.cfg.timeout_s)  # cancelled with this call
        self._done(comp)
        text, fr = comp.text or "", finish_reason(comp)
        if self._refused(text, "output"):
            text, fr = st.safety.refusal, "content_filter"
        return _response(rid, st.cfg.model_name, text, fr, len(ids), len(comp.token_ids))

    async def _stream(self, request: pb.GenerateRequest, context) -> AsyncIterator[pb.GenerateChunk]:
        st = self.st
        ids, sp, checked = self._prepare(request, context)
        rid = "gen-" + uuid.uuid4().hex[:24]
        if self._refused(checked, "prompt"):
            yield pb.GenerateChunk(id=rid, text=st.safety.refusal, finish_reason="content_filter",
                                   usage=_usage(len(ids), 0))
            return
        holds = st.safety.words if st.safety.pattern is not None else None
        agen = st.engine.astream(ids, sp, timeout=st.cfg.timeout_s, holds=holds)
        shown, n_out, comp = "", 0, None
        try:
            async for ev in agen:
                n_out += len(ev.token_ids)
                if ev.text:
                    if self._refused(shown + ev.text, "output"):
                        yield pb.GenerateChunk(id=rid, text=("\n" if shown else "") + st.safety.refusal,
                                               finish_reason="content_filter", usage=_usage(len(ids), n_out))
                        return
                    shown += ev.text
                    yield pb.GenerateChunk(id=rid, text=ev.text)
                if ev.finished:
                    comp = ev.completion
            self._done(comp)
            yield pb.GenerateChunk(id=rid, finish_reason=finish_reason(comp), usage=_usage(len(ids), len(comp.token_ids)))
        finally:
            await agen.aclose()  # a client that went away (or a refusal) cancels the engine request


def _usage(n_prompt: int, n_out: int) -> pb.Usage:
    return pb.Usage(prompt_tokens=n_prompt, completion_tokens=n_out, total_tokens=n_prompt + n_out)


def _response(rid: str, model: str, text: str, fr: str, n_prompt: int, n_out: int) -> pb.GenerateResponse:
    return pb.GenerateResponse(id=rid, model=model, text=text, finish_reason=fr, usage=_usage(n_prompt, n_out))


# ---------------------------------------------------------------------------------------------
# the server: its own event loop in a daemon thread
# ---------------------------------------------------------------------------------------------
class GrpcHandle:
    """A running gRPC server: ``port`` (the bound one; useful with port 0), ``address``, :meth:`stop`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread, st: SimpleNamespace,
                 server: grpc.aio.Server, health_servicer: health.aio.HealthServicer, port: int, host: str):
        self._loop, self._thread, self._st, self._server, self._health = loop, thread, st, server, health_servicer
        self.port, self.address = port, f"{_host_port(host, port)}"

    def stop(self, grace: float | None = None) -> None:
        """Refuse new calls (UNAVAILABLE; health NOT_SERVING), let running ones finish for up to
        ``grace`` seconds (None: the config's ``shutdown_timeout_s``), then cancel them and end the
        thread. The engine is left running (its owner stops it). Idempotent."""
        if not self._thread.is_alive():
            return
        grace = self._st.cfg.shutdown_timeout_s if grace is None else grace
        self._st.stopping = True
        fut = asyncio.run_coroutine_threadsafe(self._shutdown(grace), self._loop)
        try:
            fut.result(timeout=grace + 10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)

    async def _shutdown(self, grace: float) -> None:
        await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)


def _host_port(host: str, port: int) -> str:
    """``host:port`` with an IPv6 address in brackets.

    >>> _host_port("127.0.0.1", 50051), _host_port("::1", 50051), _host_port("[::1]", 1)
    ('127.0.0.1:50051', '[::1]:50051', '[::1]:1')
    """
    host = host.strip("[]")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def start_grpc(engine, tokenizer, cfg, safety: SafetyFilter, port: int, *,
               metrics: ServerMetrics | None = None, host: str | None = None) -> GrpcHandle:
    """Start the gRPC server for ``engine`` on ``host`` (default ``cfg.host``) and ``port`` (0: a free
    one, see ``handle.port``) and return once it accepts calls. Starts the engine if it is not
    running (``engine.start()`` is idempotent; the HTTP app's lifespan starts it too). Shares with the
    HTTP app: the engine, ``cfg``'s limits, ``safety``, ``metrics`` (pass the app's to count gRPC
    calls on ``/metrics``) and the API key (``cfg.api_key`` or ``TINYSEEK_API_KEY``). ``cfg``: the HTTP
    server's :class:`tinyseek.serve.server.Config`. A port that cannot be bound is a :class:`UserError`."""
    cfg = cfg.validate()
    if not 0 <= port < 65536:
        raise UserError(f"grpc_port must be in [0, 65535], got {port}")
    st = SimpleNamespace(engine=engine, tokenizer=tokenizer, cfg=cfg, safety=safety, metrics=metrics,
                         api_key=cfg.api_key or os.environ.get("TINYSEEK_API_KEY", ""),
                         max_prompt=min(cfg.max_prompt_tokens or engine.max_len - 1, engine.max_len - 1),  # as create_app
                         stopping=False)
    host = cfg.host if host is None else host
    engine.start()
    loop = asyncio.new_event_loop()
    ready: concurrent.futures.Future = concurrent.futures.Future()
    thread = threading.Thread(target=_serve, args=(loop, st, host, port, ready), name="tinyseek-grpc", daemon=True)
    thread.start()
    server, health_servicer, bound = ready.result(timeout=_START_TIMEOUT_S)
    return GrpcHandle(loop, thread, st, server, health_servicer, bound, host)


def _serve(loop: asyncio.AbstractEventLoop, st: SimpleNamespace, host: str, port: int,
           ready: concurrent.futures.Future) -> None:
    """The gRPC thread: start the server on ``loop``, report ``(server, health, port)`` or the error
    through ``ready``, then run the loop until :meth:`GrpcHandle.stop` stops it."""
    asyncio.set_event_loop(loop)
    try:
        started = loop.run_until_complete(_start(st, host, port))
    except BaseException as e:  # noqa: BLE001 (handed to the caller's thread)
        ready.set_exception(e)
        loop.close()
        return
    watcher = loop.create_task(_follow_engine(st, started[1]))
    ready.set_result(started)
    try:
        loop.run_forever()
    finally:
        watcher.cancel()
        for task in asyncio.all_tasks(loop):
            task.cancel()
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()


async def _start(st: SimpleNamespace, host: str, port: int):
    server = grpc.aio.server(options=[("grpc.so_reuseport", 0),
                                      ("grpc.max_receive_message_length", st.cfg.max_body_bytes)])
    pb_grpc.add_GenerationServicer_to_server(GenerationService(st), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    addr = _host_port(host, port)
    try:
        bound = server.add_insecure_port(addr)
    except RuntimeError as e:  # grpcio raises on a port it cannot bind
        raise UserError(f"cannot listen for gRPC on {addr}: {' '.join(str(e).split())}") from None
    if bound == 0:  # older grpcio returns 0 instead
        raise UserError(f"cannot listen for gRPC on {addr}")
    await server.start()
    await _set_health(st, health_servicer)  # before the first call can ask
    return server, health_servicer, bound


async def _set_health(st: SimpleNamespace, health_servicer: health.aio.HealthServicer, last: int | None = None) -> int:
    """Set both names' status from the engine and ``stopping`` (only when it differs from ``last``)."""
    ok = not st.stopping and engine_running(st.engine)
    status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
    if status != last:
        for name in ("", SERVICE):
            await health_servicer.set(name, status)
    return status


async def _follow_engine(st: SimpleNamespace, health_servicer: health.aio.HealthServicer) -> None:
    last = None
    while not st.stopping:  # once stopping, enter_graceful_shutdown owns the status
        last = await _set_health(st, health_servicer, last)
        await asyncio.sleep(HEALTH_POLL_S)
