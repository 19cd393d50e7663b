"""``tinyseek serve --ckpt PATH``: an OpenAI-compatible HTTP server over the batching engine.

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (``"stream": true`` gives
server-sent events ``data: {chunk}`` ending with ``data: [DONE]``), ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (Prometheus text) and the web chat at ``/``.

Behaviour worth knowing:
- Binds 127.0.0.1 unless told otherwise. With ``api_key`` (or ``TINYSEEK_API_KEY``) set, ``/v1/*``
  needs ``Authorization: Bearer <key>`` (401 otherwise).
- Cross-site and DNS-rebinding requests: the ``Host`` header must be an IP address, ``localhost``, the
  bound host name or one of ``allowed_hosts`` (``*``: any, for a server behind a proxy), else 400
  ``invalid_host``; POST bodies must be ``Content-Type: application/json`` (415 otherwise), which a
  browser cannot send cross-site without a CORS preflight (that this server never grants). JSON bodies
  nested deeper than :data:`MAX_JSON_DEPTH` or holding a lone surrogate (``"\\ud800"``) are 400.
- Every error is ``{"error": {"message", "type", "param", "code"}}`` with a 4xx/5xx status, as
  OpenAI's API does; a bad request never stops the server.
- Limits: body size (413), prompt tokens (400 ``context_length_exceeded``), ``max_tokens`` (400),
  queue length (429), per-request time (504, or an error event when streaming).
- Safety: prompts (the messages of every role) and outputs go through
  :class:`tinyseek.serve.safety.SafetyFilter` (after NFKC and removal of zero-width characters);
  a refused request gets a normal completion whose content is the refusal message and whose
  ``finish_reason`` is ``content_filter``. Streamed text is held back at a possible blocked-word
  prefix so a blocked word is never sent.
- Graceful shutdown (SIGINT/SIGTERM): uvicorn stops accepting connections and waits up to
  ``shutdown_timeout_s`` for in-flight requests; the engine then drains and stops.
- Chat messages are encoded with ``tokenizer.encode_chat``: the template's markers are special tokens,
  the messages' text never is (``<|user|>``, ``<think>`` or an imported model's ``<|eot_id|>`` in a
  message are encoded as plain text), so a message cannot forge turns. An imported model's own chat
  template renders the prompt, and generation stops at any of its ``stop_ids`` (eos plus e.g.
  ``<|eot_id|>``). A ``/v1/completions`` prompt is text too (as OpenAI's API treats it): special-token
  strings in it stay text unless the operator sets ``prompt_special_tokens``; it gets what its
  tokenizer adds to a text (Llama 3's BOS; ours add nothing).
- OpenAI fields honoured: ``n`` (the samples share one prefill: the engine forks the prompt's KV
  cache; with ``seed``, sample i uses a seed derived from ``(seed, i)``; usage counts the prompt
  once), ``logprobs`` / ``top_logprobs`` (chat shape) and ``logprobs: int`` + ``echo`` (completions,
  legacy shape; ``echo`` + ``logprobs`` allows ``max_tokens: 0``), all being the log-softmax of the
  model's raw logits at temperature 1 over the tokenizer's vocabulary (:mod:`tinyseek.serve.logprobs`),
  ``presence_penalty`` / ``frequency_penalty`` (-2..2, over the generated tokens), ``logit_bias``
  (-100..100, ids checked), ``stop``, ``seed``, ``max_completion_tokens``, ``stream_options``,
  ``response_format: {"type": "text"}``, ``tools`` / ``tool_choice`` auto|none where the chat template
  has a tool syntax (:mod:`tinyseek.serve.tools`), ``best_of == n``. Refused with a 400 naming the
  field: ``top_logprobs`` without ``logprobs``, other ``response_format`` types, ``tool_choice``
  required / named, ``tools`` for a template without tool syntax, and :data:`UNSUPPORTED`. Other
  unknown fields are ignored (as OpenAI does). ``/v1/completions`` ``prompt``: a string, a list of
  strings, a list of token ids or a list of such lists (ids taken as given, special ids included, as
  vLLM does; choice ``index`` = prompt index * n + sample). Extensions: ``top_k`` and ``ignore_eos``
  (as in vLLM).
- Roles: system, developer (as system), user, assistant (with ``tool_calls``, content may be null),
  tool (``tool_call_id``); every string stays text. R1 answers: with our template (or one that
  writes ``<think>``), ``<think>…</think>`` goes to ``reasoning_content`` and the rest, answer tags
  removed, to ``content`` (``--reasoning-format raw`` keeps the raw text; :mod:`tinyseek.serve.reasoning`).

Layout: request parsing is pure functions (``parse_*``, raising :class:`ApiError`); each endpoint is a
module-level function on :data:`router` that reads the shared state from ``request.app.state``
(see :func:`create_app`); the Host check and the metrics are ASGI middleware classes; an endpoint is
added as one more route function here plus its test in tests/test_server.py.
"""
from __future__ import annotations

import asyncio
import contextlib
import copy
import ipaddress
import json
import os
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvicorn
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinyseek.config import ConfigError
from tinyseek.errors import UserError
from tinyseek.serve.api import (ApiError, add_stop_ids, bad_request, check_auth, check_prompt, completion_error,
                                finish_reason, parse_messages, parse_sampling, record_completion)
from tinyseek.serve.engine import Completion, Engine, SamplingParams
from tinyseek.serve.engine_proc import ProcessEngine, available_cpus, parse_cpus, pin_process
from tinyseek.serve.grpc_server import start_grpc
from tinyseek.serve.loading import check_ckpt, load_for_serving
from tinyseek.serve.logprobs import chat_logprobs, legacy_logprobs, prompt_records
from tinyseek.serve.metrics import ServerMetrics
from tinyseek.serve.reasoning import ReasoningSplitter, split_reasoning, uses_reasoning
from tinyseek.serve.safety import DEFAULT_REFUSAL, SafetyFilter
from tinyseek.serve.tools import (ToolCallHolder, has_tool_syntax, parse_tool_calls, plain_messages,
                                  template_messages)

STATIC = Path(__file__).parent / "static"
MAX_JSON_DEPTH = 64  # request bodies nested deeper are refused (OpenAI bodies nest < 10; tool schemas a few more)


@dataclass
class Config:
    ckpt: str = ""                 # checkpoint: run dir, ckpt root or step dir (required)
    tokenizer: str = ""            # tokenizer dir; "" = found next to the checkpoint; "bytes" = byte fallback
    device: str = "auto"           # auto (cuda if available) / cpu / cuda
    dtype: str = "auto"            # weights and KV cache: auto (bf16 on CUDA, fp32 on CPU) / fp32 / bf16 / fp16
    host: str = "127.0.0.1"        # bind address (loopback by default)
    port: int = 8000               # TCP port
    grpc_port: int = 0             # also serve gRPC (tinyseek.v1.Generation + grpc.health.v1) on this port, same engine and limits; 0 = off
    allowed_hosts: str = ""        # Host header names accepted besides IP addresses, localhost and --host (comma list; "*" = any, behind a proxy)
    prompt_special_tokens: bool = False  # /v1/completions: special-token strings in a prompt become special tokens (trusted clients only); off = text
    api_key: str = ""              # require "Authorization: Bearer <key>" on /v1/*; "" = env TINYSEEK_API_KEY or none
    model_name: str = "tinyseek"   # the model id clients must use (or omit)
    max_batch: int = 16            # KV-cache slots = requests decoded together
    max_wait_ms: float = 5.0       # a request waits this long at most to share a prefill with others
    mix_prefill: bool = True       # new prompts join the decode step's forward (MLA + CPU kernels) instead of a prefill forward
    engine_process: bool = True    # run the engine in its own process (no GIL contention with the HTTP side)
    engine_cpus: str = ""          # pin the engine process: "" (no), auto (all CPUs but the last, which the HTTP side gets), or e.g. 0-2
    max_len: int = 0               # cache positions per request (prompt + completion); 0 = model max_seq_len
    max_prompt_tokens: int = 0     # longest accepted prompt; 0 = max_len - 1
    max_tokens: int = 512          # largest max_tokens a request may ask for
    default_max_tokens: int = 256  # max_tokens when the request gives none (capped by max_tokens)
    default_temperature: float = 1.0  # temperature when the request gives none (OpenAI default)
    max_queue: int = 256           # waiting requests beyond this get 429
    max_body_bytes: int = 1_000_000  # request body limit (413)
    timeout_s: float = 120.0       # per-request generation time limit (504)
    shutdown_timeout_s: float = 30.0  # graceful shutdown: wait this long for in-flight requests
    blocklist: list[str] = field(default_factory=list)  # safety: words / phrases refused in prompts and outputs
    blocklist_file: str = ""       # safety: more blocklist entries, one per line
    classifier: str = ""           # safety: "package.module:function" text -> score in [0,1] (or bool)
    classifier_threshold: float = 0.5  # safety: refuse at or above this score
    refusal_message: str = DEFAULT_REFUSAL  # what a refused request gets back
    reasoning_format: str = "split"  # R1 template: split <think>…</think> into reasoning_content (split) or keep the raw text (raw)
    log_level: str = "info"        # uvicorn log level

    def validate(self) -> "Config":
        def need(cond, msg):
            if not cond:
                raise ConfigError(msg)

        need(0 <= self.port < 65536, f"port must be in [0, 65535], got {self.port}")
        need(0 <= self.grpc_port < 65536, f"grpc_port must be in [0, 65535], got {self.grpc_port}")
        for name in ("max_batch", "max_tokens", "default_max_tokens", "max_body_bytes"):
            need(getattr(self, name) >= 1, f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("max_len", "max_prompt_tokens", "max_queue", "max_wait_ms"):
            need(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}")
        need(self.timeout_s > 0, f"timeout_s must be > 0, got {self.timeout_s}")
        need(self.shutdown_timeout_s >= 0, f"shutdown_timeout_s must be >= 0, got {self.shutdown_timeout_s}")
        need(0 <= self.default_temperature <= 2, f"default_temperature must be in [0, 2], got {self.default_temperature}")
        need(0 <= self.classifier_threshold <= 1, f"classifier_threshold must be in [0, 1], got {self.classifier_threshold}")
        need(self.model_name != "", "model_name must not be empty")
        need(self.reasoning_format in ("split", "raw"), f"reasoning_format must be split or raw, got {self.reasoning_format!r}")
        return self


def preset(name: str) -> Config:
    presets = {"default": Config, "local": Config}
    if name not in presets:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(presets)}")
    return presets[name]()


# ---------------------------------------------------------------------------------------------
# errors
# ---------------------------------------------------------------------------------------------


# ---------------------------------------------------------------------------------------------
# request parsing (pure; raises ApiError)
# ---------------------------------------------------------------------------------------------


def parse_tools(body: dict, tokenizer) -> list[dict] | None:
    """The request's ``tools`` (function definitions) when the chat template has a tool syntax; 400
    when tools are given but it has none, or when ``tool_choice`` asks for something we cannot
    force (``required`` / a named function: no constrained decoding). ``tool_choice: "none"`` drops them."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise bad_request("'tool_choice': only \"auto\" and \"none\" are supported (no constrained decoding)", "tool_choice")
    if not tools:
        return None
    if not (isinstance(tools, list) and all(isinstance(t, dict) and t.get("type") == "function"
                                            and isinstance(t.get("function"), dict)
                                            and isinstance(t["function"].get("name"), str) for t in tools)):
        raise bad_request("'tools' must be a list of {type: function, function: {name, ...}}", "tools")
    if not has_tool_syntax(tokenizer):
        raise bad_request("tools: this model's chat template has no tool-call syntax", "tools")
    return None if choice == "none" else tools


def parse_prompts(body: dict, tokenizer, vocab_size: int, parse_special: bool) -> list[tuple[list[int], str]]:
    """``/v1/completions`` ``prompt`` as ``[(ids, text)]``: a string, a list of strings, a list of token
    ids or a list of lists of token ids (ids checked against the vocabulary; their text decoded)."""
    prompt = body.get("prompt")

    def ids_ok(x):
        return isinstance(x, list) and bool(x) and all(isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        items = [prompt]
    elif ids_ok(prompt):
        items = [prompt]
    elif isinstance(prompt, list) and prompt and (all(isinstance(p, str) for p in prompt)
                                                   or all(ids_ok(p) for p in prompt)):
        items = prompt
    else:
        raise bad_request("'prompt' must be a string, a list of strings, a list of token ids or a list of lists of token ids",
                   "prompt")
    if len(items) > MAX_PROMPTS:
        raise bad_request(f"'prompt' holds {len(items)} prompts; at most {MAX_PROMPTS}", "prompt")
    out = []
    for p in items:
        if isinstance(p, str):
            # an imported model's BOS, as tok(prompt) adds it; special-token strings stay text unless the operator opts in
            out.append((tokenizer.encode(p, add_special_tokens=True, parse_special=parse_special), p))
        else:
            bad = [t for t in p if not 0 <= t < vocab_size]
            if bad:
                raise bad_request(f"'prompt': token id {bad[0]} is not in the vocabulary [0, {vocab_size})", "prompt")
            out.append((list(p), tokenizer.decode(p)))
    return out


MAX_PROMPTS = 256  # prompts in one /v1/completions request at most


def parse_json_body(raw: bytes, max_depth: int = MAX_JSON_DEPTH) -> dict:
    r"""A request body as a JSON object, or :class:`ApiError` 400: not JSON, not an object, nested
    deeper than ``max_depth``, or holding a lone UTF-16 surrogate (which no UTF-8 text can carry).

    >>> parse_json_body(b'{"a": [1, {"b": "\\ud83d\\ude00"}]}')
    {'a': [1, {'b': '😀'}]}
    >>> parse_json_body(b'{"a": "\\ud800"}')
    Traceback (most recent call last):
    ...
    tinyseek.serve.api.ApiError: request body is not valid JSON: a string holds a lone surrogate (\ud800)
    >>> parse_json_body(b"[" * 100 + b"]" * 100)
    Traceback (most recent call last):
    ...
    tinyseek.serve.api.ApiError: request body is not valid JSON: nested deeper than 64 levels
    """
    try:
        body = json.loads(raw or b"null")
    except RecursionError:  # the parser's own limit (about 1000 levels)
        raise bad_request(f"request body is not valid JSON: nested deeper than {max_depth} levels") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad_request(f"request body is not valid JSON: {e.msg if hasattr(e, 'msg') else e}") from None
    stack = [(body, 1)]
    while stack:  # no recursion: depth and strings checked iteratively
        x, depth = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                raise bad_request("request body is not valid JSON: a string holds a lone surrogate "
                           f"(\\u{ord(x[e.start]):04x})") from None
        elif isinstance(x, (list, dict)):
            if depth > max_depth:
                raise bad_request(f"request body is not valid JSON: nested deeper than {max_depth} levels")
            items = list(x.items()) if isinstance(x, dict) else [(None, v) for v in x]
            stack.extend((k, depth) for k, _ in items if k is not None)
            stack.extend((v, depth + 1) for _, v in items)
    if not isinstance(body, dict):
        raise bad_request("request body must be a JSON object")
    return body


def host_allowed(host: str | None, names: frozenset[str] | set[str]) -> bool:
    """Is a request's ``Host`` header acceptable? IP addresses always are (DNS rebinding needs a
    name), a missing header too (only non-browser clients omit it); a name must be in ``names``
    (lower case), any port. ``"*"`` in ``names`` accepts every host.

    >>> names = {"localhost", "myhost"}
    >>> [host_allowed(h, names) for h in ["localhost:8000", "127.0.0.1", "[::1]:80", "MyHost.", "evil.com:8000"]]
    [True, True, True, True, False]
    >>> host_allowed("evil.com", {"*"}), host_allowed(None, names), host_allowed("[::1", names)
    (True, True, False)
    """
    if "*" in names or host is None:
        return True
    host = host.strip().lower()
    if host.startswith("["):  # [v6] or [v6]:port
        end = host.find("]")
        if end < 0 or (host[end + 1:] and not host[end + 1:].startswith(":")):
            return False
        name = host[1:end]
    else:
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        pass
    return name.rstrip(".") in names


def allowed_host_names(cfg: Config) -> frozenset[str]:
    """Host names :func:`host_allowed` accepts for ``cfg``: localhost, the bound host, ``allowed_hosts``."""
    names = {"localhost", cfg.host.strip("[]").lower()}
    names |= {h.strip().lower().rstrip(".") for h in cfg.allowed_hosts.split(",") if h.strip()}
    return frozenset(n for n in names if n)


# ---------------------------------------------------------------------------------------------
# the app: state, middleware, error handlers, routes
# ---------------------------------------------------------------------------------------------
# What the routes share lives on ``app.state`` (set once by create_app): ``engine``, ``tokenizer``,
# ``cfg``, ``safety``, ``metrics``, ``api_key``, ``host_names``, ``max_prompt`` and ``shutting_down``.
# A route reads it from its request (``request.app.state``); nothing is captured in closures.
router = APIRouter()


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """Start the engine with the server; on shutdown refuse new requests (503), drain, stop."""
    st = app.state
    st.engine.start()
    yield
    st.shutting_down = True
    st.engine.stop(drain=True, timeout=st.cfg.shutdown_timeout_s)


class MetricsMiddleware:
    """Counts every HTTP request by endpoint and status and observes its latency (to the last byte,
    streams included). Paths that are not routes count as ``other`` (``/static`` for the page's files)."""

    def __init__(self, app, metrics: ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0, status = time.monotonic(), {"code": 500}

        async def send_wrapper(msg):
            if msg["type"] == "http.response.start":
                status["code"] = msg["status"]
            await send(msg)
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            path = scope.get("path", "")
            ep = path if path in ENDPOINTS else ("/static" if path.startswith("/static/") else "other")
            self.metrics.requests.inc(endpoint=ep, status=str(status["code"]))
            self.metrics.latency.observe(time.monotonic() - t0, endpoint=ep)


class HostMiddleware:
    """400 ``invalid_host`` unless the request has at most one ``Host`` header that
    :func:`host_allowed` accepts (DNS rebinding: a page of evil.com resolving to 127.0.0.1 sends
    ``Host: evil.com``)."""

    def __init__(self, app, host_names: frozenset[str]):
        self.app, self.host_names = app, host_names

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":  # (no websocket routes)
            hosts = [v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"host"]
            if len(hosts) > 1 or not host_allowed(hosts[0] if hosts else None, self.host_names):
                err = ApiError(400, f"Host header {hosts[0] if len(hosts) == 1 else hosts!r} is not allowed "
                               "(start the server with --allowed-hosts NAME to accept it)", code="invalid_host")
                return await JSONResponse(err.body(), status_code=400)(scope, receive, send)
        return await self.app(scope, receive, send)


def error_response(e: ApiError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _api_error(request: Request, e: ApiError):
    return error_response(e)


async def _http_error(request: Request, e: StarletteHTTPException):
    typ = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return error_response(ApiError(e.status_code, str(e.detail), typ))


async def _user_error(request: Request, e: UserError):
    return error_response(bad_request(str(e)))


async def _internal(request: Request, e: Exception):
    return error_response(ApiError(500, f"internal error: {type(e).__name__}", "server_error"))


# every error leaves in OpenAI's {"error": {...}} shape (Starlette picks the handler by the exception's class)
EXCEPTION_HANDLERS = {ApiError: _api_error, StarletteHTTPException: _http_error, UserError: _user_error,
                      Exception: _internal}


# --- request checks (raise ApiError) ----------------------------------------------------------


async def read_body(request: Request) -> dict:
    """A POST body as a JSON object, checked in this order: API key (401), shutting down (503),
    ``Content-Type: application/json`` (415), size (413, read in chunks: never more than the limit
    is kept), JSON (400, :func:`parse_json_body`), ``model`` (404 unless absent or this server's)."""
    check_auth(request)
    st = request.app.state
    cfg = st.cfg
    if st.shutting_down:
        raise ApiError(503, "server is shutting down", "server_error")
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if ctype != "application/json":  # a cross-site form or text/plain "simple request" is refused
        raise ApiError(415, f"Content-Type must be application/json, got {ctype or 'none'!r}",
                       code="unsupported_media_type")
    raw = bytearray()
    async for chunk in request.stream():
        raw += chunk
        if len(raw) > cfg.max_body_bytes:
            raise ApiError(413, f"request body exceeds {cfg.max_body_bytes} bytes", code="request_too_large")
    body = parse_json_body(bytes(raw))
    model = body.get("model")
    if model is not None and model != cfg.model_name:
        raise ApiError(404, f"the model '{model}' does not exist; this server serves '{cfg.model_name}'",
                       "not_found_error", "model", "model_not_found")
    return body


# --- response bodies (pure) ------------------------------------------------------------------
@dataclass
class Shape:
    """How the choices of one request are written."""
    kind: str                       # "chat" or "completion"
    logprobs: int | None = None     # top alternatives per token; None = no logprobs
    echo: bool = False              # completions: the prompt (and its logprobs) before the completion
    reasoning: bool = False         # chat: <think>...</think> into reasoning_content (R1 template, --reasoning-format split)
    tools: bool = False             # chat: parse <tool_call> blocks into tool_calls


def chunk_body(kind: str, rid: str, created: int, model: str, text: str | None, finish: str | None,
               first: bool = False, index: int = 0, extra: dict | None = None, logprobs: dict | None = None) -> dict:
    """One streamed chunk: ``chat.completion.chunk`` (a delta; the first carries the role; ``extra``
    adds e.g. ``reasoning_content`` or ``tool_calls``) or ``text_completion``."""
    if kind == "chat":
        delta: dict[str, Any] = {}
        if first:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        if extra:
            delta.update(extra)
        choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish}
        obj = "text_completion"
    return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}


def usage_body(n_prompt: int, n_out: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}


def completion_body(kind: str, rid: str, created: int, model: str, text: str, finish: str, n_prompt: int,
                    n_out: int) -> dict:
    """A whole (non-streamed) ``chat.completion`` or ``text_completion`` with one plain choice and its usage."""
    if kind == "chat":
        choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                  "finish_reason": finish}
    else:
        choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return response_body(kind, rid, created, model, [choice], usage_body(n_prompt, n_out))


def response_body(kind: str, rid: str, created: int, model: str, choices: list[dict], usage: dict) -> dict:
    return {"id": rid, "object": "chat.completion" if kind == "chat" else "text_completion", "created": created,
            "model": model, "choices": choices, "usage": usage}


def generated_records(c: Completion) -> list:
    """The logprob records of the tokens behind the completion's text (an eos / stop token that ended it dropped)."""
    recs = c.logprobs or []
    return recs[:-1] if c.finish_reason == "stop" and isinstance(c.stop, int) and recs else recs


def make_choice(shape: Shape, tok, index: int, c: Completion, text: str, finish: str, prompt: list[int],
                echo_text: str) -> dict:
    """One non-streamed choice in the shape's form (message or text, logprobs, tool calls, reasoning)."""
    lp = shape.logprobs is not None and finish != "content_filter"
    if shape.kind == "chat":
        msg: dict[str, Any] = {"role": "assistant", "content": text}
        if shape.reasoning and finish != "content_filter":
            reasoning, msg["content"] = split_reasoning(text)
            if reasoning is not None:
                msg["reasoning_content"] = reasoning
        if shape.tools and finish != "content_filter":
            content, calls = parse_tool_calls(msg["content"])
            if calls:
                msg["content"], msg["tool_calls"], finish = content, calls, "tool_calls"
        return {"index": index, "message": msg, "logprobs": chat_logprobs(tok, generated_records(c)) if lp else None,
                "finish_reason": finish}
    logprobs = None
    if lp:
        gen = legacy_logprobs(tok, generated_records(c), len(echo_text) if shape.echo else 0)
        if shape.echo:
            pre = legacy_logprobs(tok, prompt_records(prompt, c.prompt_logprobs))
            gen = {k: pre[k] + gen[k] for k in gen}
        logprobs = gen
    return {"index": index, "text": (echo_text if shape.echo else "") + text, "logprobs": logprobs,
            "finish_reason": finish}


# --- generation -----------------------------------------------------------------------------
class _ChoiceStream:
    """One streamed choice's state: text shown (for the safety filter), the reasoning splitter, the
    tool-call holder, generated ids so far (legacy text offsets)."""

    def __init__(self, shape: Shape, start: int):
        self.shown, self.ids, self.start, self.done = "", [], start, False
        self.splitter = ReasoningSplitter() if shape.reasoning else None
        self.holder = ToolCallHolder() if shape.tools else None

    def parts(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        """``[(field, text)]`` to send for a text delta (``content`` / ``reasoning_content``)."""
        parts = self.splitter.feed(text, final) if self.splitter else ([("content", text)] if text else [])
        if self.holder is not None:
            parts = [(f, self.holder.feed(t) if f == "content" else t) for f, t in parts]
            if final:
                parts.append(("content", self.holder.feed("", final=True)))
        return [(f, t) for f, t in parts if t]


async def _merged(engine, prompts: list[list[int]], sps: list[SamplingParams], timeout: float, holds):
    """``(prompt index, event)`` of every prompt's stream, as they come; closing it cancels them all."""
    q: asyncio.Queue = asyncio.Queue()

    async def pump(i: int):
        try:
            async for ev in engine.astream(prompts[i], sps[i], timeout=timeout, holds=holds):
                await q.put((i, ev))
        finally:
            await q.put((i, None))

    tasks = [asyncio.create_task(pump(i)) for i in range(len(prompts))]
    try:
        left = len(tasks)
        while left:
            i, ev = await q.get()
            if ev is None:
                left -= 1
            else:
                yield i, ev
    finally:
        for t in tasks:
            t.cancel()


async def respond(request: Request, shape: Shape, prompts: list[list[int]], sp: SamplingParams, stream: bool,
                  include_usage: bool, checked_text: str, echo_texts: list[str] | None = None):
    """Generate for checked prompts (``sp.n`` samples each; choice ``index`` = prompt index * n + sample)
    and answer as OpenAI does (a JSON body, or server-sent events). ``checked_text`` is what the
    safety filter reads of the request: a refused prompt gets the refusal as a normal completion
    (``finish_reason`` ``content_filter``); a blocked output is replaced by it (or, streamed, ends
    with it: the text held back at a blocked-word prefix is never sent)."""
    st = request.app.state
    engine, cfg, safety, metrics, tok = st.engine, st.cfg, st.safety, st.metrics, st.tokenizer
    kind, model, n = shape.kind, cfg.model_name, sp.n
    echo_texts = echo_texts or [""] * len(prompts)
    rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    sps = []
    for ids in prompts:
        p = copy.deepcopy(sp)
        p.max_tokens = max(0 if p.prompt_logprobs is not None else 1, min(p.max_tokens, engine.max_len - len(ids)))
        sps.append(add_stop_ids(p, tok))
    n_prompt = sum(len(ids) for ids in prompts)
    refused = safety.check(checked_text) if safety.active else None
    if refused is not None and refused.blocked:
        metrics.refusals.inc(stage="prompt")
        if not stream:
            choices = [{**make_choice(Shape(kind), tok, j, None, safety.refusal, "content_filter", [], ""),
                        "index": j} for j in range(len(prompts) * n)]
            return JSONResponse(response_body(kind, rid, created, model, choices, usage_body(n_prompt, 0)))

        async def refusal_events():
            for j in range(len(prompts) * n):
                yield _sse(chunk_body(kind, rid, created, model, "", None, first=True, index=j))
                yield _sse(chunk_body(kind, rid, created, model, safety.refusal, None, index=j))
                yield _sse(chunk_body(kind, rid, created, model, None if kind == "chat" else "", "content_filter", index=j))
            if include_usage:
                yield _sse({**chunk_body(kind, rid, created, model, None, None), "choices": [],
                            "usage": usage_body(n_prompt, 0)})
            yield "data: [DONE]\n\n"
        return StreamingResponse(refusal_events(), media_type="text/event-stream")

    holds = safety.words if safety.pattern is not None else None

    if not stream:
        groups = await asyncio.gather(*(engine.acomplete_all(ids, p, timeout=cfg.timeout_s) for ids, p in zip(prompts, sps)))
        choices, n_out = [], 0
        for pi, comps in enumerate(groups):
            for comp in comps:
                err = completion_error(comp, cfg.timeout_s)
                if err is not None:
                    raise err
                record_completion(metrics, comp)
                n_out += len(comp.token_ids)
                text, fr = comp.text or "", finish_reason(comp)
                if safety.active and safety.check(text).blocked:
                    metrics.refusals.inc(stage="output")
                    text, fr = safety.refusal, "content_filter"
                choices.append(make_choice(shape, tok, pi * n + comp.index, comp, text, fr, prompts[pi], echo_texts[pi]))
        return JSONResponse(response_body(kind, rid, created, model, choices, usage_body(n_prompt, n_out)))

    agen = _merged(engine, prompts, sps, cfg.timeout_s, holds)

    def sse(text, finish, j, **kw):
        return _sse(chunk_body(kind, rid, created, model, text, finish, index=j, **kw))

    async def events():
        states = {pi * n + i: _ChoiceStream(shape, len(echo_texts[pi]) if shape.echo else 0)
                  for pi in range(len(prompts)) for i in range(n)}
        n_out = 0
        try:
            for j in states:
                pi = j // n
                if kind == "completion" and shape.echo:  # the prompt's logprobs come with its first event
                    yield sse(echo_texts[pi], None, j)
                else:
                    yield sse("", None, j, first=True)
            async for pi, ev in agen:
                j = pi * n + ev.index
                s = states[j]
                if s.done:
                    continue
                comp = ev.completion if ev.finished else None
                if comp is not None:
                    err = completion_error(comp, cfg.timeout_s)
                    if err is not None:
                        yield _sse(err.body())
                        yield "data: [DONE]\n\n"
                        return
                if ev.text and safety.active and safety.check(s.shown + ev.text).blocked:
                    metrics.refusals.inc(stage="output")
                    yield sse(("\n" if s.shown else "") + safety.refusal, None, j)
                    yield sse(None if kind == "chat" else "", "content_filter", j)
                    s.done = True
                    continue
                s.shown += ev.text
                recs = ev.logprobs or []
                if comp is not None and comp.finish_reason == "stop" and isinstance(comp.stop, int) and recs:
                    recs = recs[:-1]
                lp = None
                if shape.logprobs is not None and (recs or ev.prompt_logprobs is not None):
                    if kind == "chat":
                        lp = chat_logprobs(tok, recs)
                    else:
                        lp = legacy_logprobs(tok, recs, s.start + len(tok.decode(s.ids)))
                        if ev.prompt_logprobs is not None:  # echo: the prompt's records, with the first event
                            pre = legacy_logprobs(tok, prompt_records(prompts[pi], ev.prompt_logprobs))
                            lp = {k: pre[k] + lp[k] for k in lp}
                    s.ids += [r[0] for r in recs]
                parts = s.parts(ev.text, final=comp is not None) if kind == "chat" else ([("content", ev.text)] if ev.text else [])
                if lp is not None and not parts:
                    parts = [("content", "")]
                for f, t in parts:
                    if f == "content":
                        yield sse(t, None, j, logprobs=lp)
                    else:
                        yield sse(None, None, j, extra={f: t}, logprobs=lp)
                    lp = None
                if comp is not None:
                    record_completion(metrics, comp)
                    n_out += len(comp.token_ids)
                    s.done = True
                    fr = finish_reason(comp)
                    if s.holder is not None and s.holder.held:
                        content, calls = parse_tool_calls(s.holder.held)
                        if calls:
                            fr = "tool_calls"
                            if content:
                                yield sse(content, None, j)
                            yield sse(None, None, j, extra={"tool_calls": [{**c, "index": k} for k, c in enumerate(calls)]})
                        else:
                            yield sse(s.holder.held, None, j)
                    yield sse(None if kind == "chat" else "", fr, j)
            if include_usage:
                yield _sse({**chunk_body(kind, rid, created, model, None, None), "choices": [],
                            "usage": usage_body(n_prompt, n_out)})
            yield "data: [DONE]\n\n"
        finally:
            await agen.aclose()  # a client that went away cancels its requests

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# --- routes (one function each; a new endpoint is one more here plus its test) -----------------
@router.post("/v1/chat/completions")
async def chat_completions(request: Request):
    body = await read_body(request)
    st = request.app.state
    msgs = parse_messages(body)
    tools = parse_tools(body, st.tokenizer)
    sp, stream, include_usage = parse_sampling(body, st.cfg, "chat", st.vocab_size)
    if has_tool_syntax(st.tokenizer):
        ids = st.tokenizer.encode_chat(template_messages(msgs), add_generation_prompt=True, tools=tools)
    else:  # our template (and templates without tool syntax): tool turns in a plain form
        ids = st.tokenizer.encode_chat(plain_messages(msgs), add_generation_prompt=True)  # message text stays text
    ids = check_prompt(request, ids)
    all_text = "\n".join([m["content"] for m in msgs] + [json.dumps(c) for m in msgs for c in m.get("tool_calls", [])])
    shape = Shape("chat", sp.logprobs, reasoning=st.reasoning, tools=tools is not None)
    return await respond(request, shape, [ids], sp, stream, include_usage, all_text)


@router.post("/v1/completions")
async def completions(request: Request):
    body = await read_body(request)
    st = request.app.state
    cfg = st.cfg
    prompts = parse_prompts(body, st.tokenizer, st.vocab_size, cfg.prompt_special_tokens)
    sp, stream, include_usage = parse_sampling(body, cfg, "completion", st.vocab_size)
    ids = [check_prompt(request, p) for p, _ in prompts]
    shape = Shape("completion", sp.logprobs, echo=bool(body.get("echo")))
    return await respond(request, shape, ids, sp, stream, include_usage, "\n".join(t for _, t in prompts),
                         [t for _, t in prompts])


@router.get("/v1/models")
async def models(request: Request):
    check_auth(request)
    return {"object": "list", "data": [_model_card(request.app.state)]}


@router.get("/v1/models/{model_id}")
async def model(model_id: str, request: Request):
    check_auth(request)
    st = request.app.state
    if model_id != st.cfg.model_name:
        raise ApiError(404, f"the model '{model_id}' does not exist", "not_found_error", "model", "model_not_found")
    return _model_card(st)


@router.get("/health")
async def health(request: Request):
    st = request.app.state
    ok = not st.shutting_down
    return JSONResponse({"status": "ok" if ok else "shutting_down", "model": st.cfg.model_name,
                         "active": st.engine.num_active(), "queued": st.engine.queue_depth()},
                        status_code=200 if ok else 503)


@router.get("/metrics")
async def prom_metrics(request: Request):
    return PlainTextResponse(request.app.state.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/")
async def index():
    return FileResponse(STATIC / "index.html", headers=_PAGE_HEADERS)


@router.get("/favicon.ico")
async def favicon():
    return FileResponse(STATIC / "favicon.ico", headers={"Cache-Control": "public, max-age=86400"})


ENDPOINTS = frozenset(r.path for r in router.routes)  # the metrics' endpoint label (others count as "other")
_PAGE_HEADERS = {"Content-Security-Policy": "default-src 'self'; style-src 'self'; script-src 'self'",
                 "Cache-Control": "no-cache"}


def _model_card(st) -> dict:
    return {"id": st.cfg.model_name, "object": "model", "created": 0, "owned_by": "tinyseek",
            "max_model_len": st.engine.max_len}


def _sse(obj: dict) -> str:
    return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"


def create_app(engine: Engine, tokenizer, cfg: Config | None = None, safety: SafetyFilter | None = None,
               metrics: ServerMetrics | None = None) -> FastAPI:
    """The FastAPI app over a ready engine (tests build one from a tiny model directly): the
    :data:`router`'s routes, the middleware and error handlers above, the page's static files, and
    the shared state on ``app.state``."""
    cfg = (cfg or Config()).validate()
    app = FastAPI(title="tinyseek", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    st = app.state
    st.engine, st.tokenizer, st.cfg = engine, tokenizer, cfg
    st.safety = safety or SafetyFilter.from_config(cfg.blocklist, cfg.blocklist_file, cfg.classifier,
                                                   cfg.classifier_threshold, cfg.refusal_message)
    st.metrics = metrics or ServerMetrics(engine)
    st.api_key = cfg.api_key or os.environ.get("TINYSEEK_API_KEY", "")
    st.host_names = allowed_host_names(cfg)
    st.vocab_size = getattr(engine, "vocab_size", None) or engine.cfg.vocab_size
    st.reasoning = cfg.reasoning_format == "split" and uses_reasoning(tokenizer)
    st.max_prompt = min(cfg.max_prompt_tokens or engine.max_len - 1, engine.max_len - 1)
    st.shutting_down = False
    app.add_middleware(HostMiddleware, host_names=st.host_names)
    app.add_middleware(MetricsMiddleware, metrics=st.metrics)  # outermost: counts the requests HostMiddleware refuses
    for exc, handler in EXCEPTION_HANDLERS.items():
        app.add_exception_handler(exc, handler)
    app.include_router(router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def build(cfg: Config):
    """``(app, engine)`` from a config: load the checkpoint, the tokenizer, the safety filter."""
    if cfg.engine_process:
        check_ckpt(cfg.ckpt)  # before starting a process for nothing
        cpus = parse_cpus(cfg.engine_cpus, available_cpus())
        engine = ProcessEngine(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.dtype, max_batch=cfg.max_batch,
                               max_len=cfg.max_len, max_wait=cfg.max_wait_ms / 1000, cpus=cpus,
                               mix_prefill=cfg.mix_prefill)
        return create_app(engine, engine.tokenizer, cfg), engine
    model, tok, _meta = load_for_serving(cfg.ckpt, cfg.tokenizer, cfg.device, cfg.dtype)
    engine = Engine(model, tok, max_batch=cfg.max_batch, max_len=cfg.max_len or None,
                    max_wait=cfg.max_wait_ms / 1000, mix_prefill=cfg.mix_prefill)
    return create_app(engine, tok, cfg), engine


def main(cfg: Config) -> dict:
    cfg.validate()
    app, engine = build(cfg)
    where = ""
    if getattr(engine, "cpus", None):  # the engine process owns these CPUs: keep the HTTP side off them
        rest = [c for c in available_cpus() if c not in engine.cpus]
        pin_process(rest)
        where = f", engine on CPUs {engine.cpus}, HTTP on {rest}"
    print(f"tinyseek serve: model '{cfg.model_name}' on http://{cfg.host}:{cfg.port}  "
          f"(max_batch {cfg.max_batch}, max_len {engine.max_len}, device {engine.device}{where})", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                                           timeout_graceful_shutdown=cfg.shutdown_timeout_s))
    st = app.state
    grpc = start_grpc(engine, st.tokenizer, cfg, st.safety, cfg.grpc_port, metrics=st.metrics) if cfg.grpc_port else None
    if grpc is not None:
        print(f"tinyseek serve: gRPC (tinyseek.v1.Generation, grpc.health.v1) on {grpc.address}", flush=True)
    try:
        server.run()  # on shutdown the lifespan drains the engine: in-flight gRPC calls finish, new ones get UNAVAILABLE
    finally:
        if grpc is not None:
            grpc.stop(grace=0)
    m = app.state.metrics
    return {"completion_tokens": m.completion_tokens.value(), "prompt_tokens": m.prompt_tokens.value()}
