"""The OpenAI API's request rules, shared by the HTTP server (server.py) and the gRPC front end (grpc_server.py).

Pure parsing of request fields into engine parameters and the checks every front end makes, each
raising :class:`ApiError` (an HTTP status, one-line message, OpenAI error type, the field it names):
``parse_sampling`` / ``parse_messages`` (fields), ``check_auth`` (API key), ``check_prompt`` (length,
queue), ``completion_error`` / ``finish_reason`` (how a completion ends). ``check_auth`` and
``check_prompt`` read ``request.app.state`` (``api_key``, ``max_prompt``, ``engine``, ``cfg``) and
``request.headers``: the gRPC front end passes an object with the same attributes. ``cfg`` is the
server's :class:`tinyseek.serve.server.Config` (read, never imported: server.py imports this module).
"""
from __future__ import annotations

import hmac
from typing import Any

from fastapi import Request

from tinyseek.serve.engine import MAX_TOP_LOGPROBS, Completion, SamplingParams
from tinyseek.serve.metrics import ServerMetrics


class ApiError(Exception):
    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(msg: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, msg, param=param, code=code)


def _num(body: dict, key: str, default, lo=None, hi=None, integer: bool = False):
    v = body.get(key, default)
    if v is None:
        v = default
    ok = isinstance(v, int) if integer else isinstance(v, (int, float))
    if isinstance(v, bool) or not ok:
        raise bad_request(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}", key)
    if (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
        raise bad_request(f"'{key}' must be {rng}, got {v!r}", key)
    return v


def parse_sampling(body: dict, cfg: Any, kind: str = "chat", vocab_size: int = 1 << 31
                   ) -> tuple[SamplingParams, bool, bool]:
    """``(SamplingParams, stream, include_usage)`` from an OpenAI request body (``kind``: ``chat`` or
    ``completion``, whose ``logprobs`` differ: a boolean plus ``top_logprobs`` in chat, an integer
    0..20 in completions). A listed OpenAI field is either honoured or a 400 naming it
    (:data:`UNSUPPORTED`); other unknown fields are ignored, as OpenAI does.

    >>> from tinyseek.serve.server import Config
    >>> sp, stream, _ = parse_sampling({"max_tokens": 5, "stop": "\\n", "temperature": 0}, Config())
    >>> sp.max_tokens, sp.stop, sp.temperature, stream
    (5, ['\\n'], 0, False)
    >>> parse_sampling({"max_tokens": -1}, Config())
    Traceback (most recent call last):
    ...
    tinyseek.serve.api.ApiError: 'max_tokens' must be between 1 and 512, got -1
    >>> parse_sampling({"top_logprobs": 2}, Config())
    Traceback (most recent call last):
    ...
    tinyseek.serve.api.ApiError: 'top_logprobs' needs 'logprobs': true
    """
    for key, why in UNSUPPORTED.items():
        if body.get(key) is not None:
            raise bad_request(f"'{key}' is not supported: {why}", key)
    fmt = body.get("response_format")
    if fmt is not None and fmt != {"type": "text"}:
        raise bad_request("'response_format': only {\"type\": \"text\"} is supported (no constrained decoding)",
                   "response_format")
    echo = body.get("echo", False) if kind == "completion" else False
    if not isinstance(echo, bool):
        raise bad_request("'echo' must be a boolean", "echo")
    if kind == "chat":
        lp = body.get("logprobs", False)
        if lp is None:
            lp = False
        if not isinstance(lp, bool):
            raise bad_request("'logprobs' must be a boolean", "logprobs")
        top = body.get("top_logprobs")
        if top is not None and not lp:
            raise bad_request("'top_logprobs' needs 'logprobs': true", "top_logprobs")
        logprobs = _num(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True) if lp else None
    else:
        if body.get("top_logprobs") is not None:
            raise bad_request("'top_logprobs' is a chat field; /v1/completions takes 'logprobs': <int>", "top_logprobs")
        logprobs = None if body.get("logprobs") is None else _num(body, "logprobs", 0, 0, MAX_TOP_LOGPROBS, integer=True)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    lo = 0 if echo and logprobs is not None else 1  # lm-eval's loglikelihood: echo + logprobs + max_tokens 0
    max_tokens = _num(body, key, min(cfg.default_max_tokens, cfg.max_tokens), lo, cfg.max_tokens, integer=True)
    temperature = _num(body, "temperature", cfg.default_temperature, 0, 2)
    top_p = _num(body, "top_p", 1.0, 0, 1)
    if top_p == 0:
        raise bad_request("'top_p' must be > 0", "top_p")
    top_k = _num(body, "top_k", 0, 0, None, integer=True)
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise bad_request(f"'seed' must be an integer, got {seed!r}", "seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)) or len(stop) > 16:
        raise bad_request("'stop' must be a string or a list of at most 16 strings", "stop")
    stop = [s for s in stop if s]
    n = _num(body, "n", 1, 1, cfg.max_batch, integer=True)
    best_of = body.get("best_of")
    if kind == "completion" and best_of is not None and best_of != n:
        raise bad_request("'best_of' is not supported (only best_of == n)", "best_of")
    presence = float(_num(body, "presence_penalty", 0.0, -2, 2))
    frequency = float(_num(body, "frequency_penalty", 0.0, -2, 2))
    bias = body.get("logit_bias") or {}
    if not isinstance(bias, dict):
        raise bad_request("'logit_bias' must be an object mapping token ids to biases", "logit_bias")
    logit_bias = {}
    for t, b in bias.items():
        try:
            tid = int(t)
        except (TypeError, ValueError):
            raise bad_request(f"'logit_bias' key {t!r} is not a token id", "logit_bias") from None
        if not 0 <= tid < vocab_size or isinstance(b, bool) or not isinstance(b, (int, float)) or not -100 <= b <= 100:
            raise bad_request(f"'logit_bias': token {t!r} must be in [0, {vocab_size}) with a bias in [-100, 100]",
                       "logit_bias")
        logit_bias[tid] = float(b)
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise bad_request("'stream' must be a boolean", "stream")
    opts = body.get("stream_options") or {}
    if not isinstance(opts, dict):
        raise bad_request("'stream_options' must be an object", "stream_options")
    ignore_eos = body.get("ignore_eos", False)  # extension (as in vLLM): fixed-length outputs for benchmarks
    if not isinstance(ignore_eos, bool):
        raise bad_request("'ignore_eos' must be a boolean", "ignore_eos")
    sp = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=float(top_p),
                        stop=stop, seed=seed, ignore_eos=ignore_eos, n=n, logprobs=logprobs,
                        prompt_logprobs=logprobs if echo else None, presence_penalty=presence,
                        frequency_penalty=frequency, logit_bias=logit_bias)
    return sp, stream, bool(opts.get("include_usage", False))


# OpenAI request fields this server refuses (400 naming the field) rather than ignore
UNSUPPORTED = {
    "suffix": "no fill-in-the-middle",
    "functions": "use 'tools'",
    "function_call": "use 'tool_choice'",
    "audio": "text only",
    "prediction": "no predicted outputs",
    "web_search_options": "no web search",
}


ROLES = ("system", "developer", "user", "assistant", "tool")


def parse_messages(body: dict) -> list[dict]:
    """The request's messages as ``{role, content}`` (text parts of a content list joined; a
    ``tool`` message keeps its ``tool_call_id``, an assistant message its ``tool_calls``, and then
    its content may be null). The text is kept as sent: ``encode_chat`` encodes it as text, so no
    marker in it becomes a special token."""
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad_request("'messages' must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise bad_request(f"messages[{i}] must be an object with role {'/'.join(ROLES)}", "messages")
        content = m.get("content")
        if isinstance(content, list):  # OpenAI content parts: keep the text parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
        calls = m.get("tool_calls") if m["role"] == "assistant" else None
        if calls is not None:
            if not (isinstance(calls, list) and all(
                    isinstance(c, dict) and isinstance(c.get("function"), dict)
                    and isinstance(c["function"].get("name"), str)
                    and isinstance(c["function"].get("arguments", ""), str) for c in calls)):
                raise bad_request(f"messages[{i}].tool_calls must be a list of {{id, type, function: {{name, arguments}}}}",
                           "messages")
            calls = [{"id": str(c.get("id", "")), "type": "function",
                      "function": {"name": c["function"]["name"], "arguments": c["function"].get("arguments", "")}}
                     for c in calls]
            content = content if content is not None else ""
        if not isinstance(content, str):
            raise bad_request(f"messages[{i}].content must be a string", "messages")
        msg = {"role": m["role"], "content": content}
        if calls:
            msg["tool_calls"] = calls
        if m["role"] == "tool":
            tid = m.get("tool_call_id")
            if not isinstance(tid, str):
                raise bad_request(f"messages[{i}] (role tool) needs a string tool_call_id", "messages")
            msg["tool_call_id"] = tid
        out.append(msg)
    return out


def add_stop_ids(sp: SamplingParams, tokenizer) -> SamplingParams:
    """Every id in ``tokenizer.stop_ids`` ends the request too (an imported model's end-of-turn
    tokens beside its eos), unless the request asked to ignore eos."""
    stops = getattr(tokenizer, "stop_ids", ())
    if not sp.ignore_eos:
        sp.stop_token_ids = list(dict.fromkeys([*sp.stop_token_ids, *stops]))
    return sp


def check_auth(request: Request) -> None:
    """401 unless the server has no API key or the request carries ``Authorization: Bearer <key>``
    (compared in constant time)."""
    api_key = request.app.state.api_key
    if not api_key:
        return
    got = request.headers.get("authorization", "")
    scheme, _, token = got.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')",
                       "authentication_error", code="invalid_api_key")


def check_prompt(request: Request, ids: list[int]) -> list[int]:
    """``ids`` unless empty (400), longer than the server's prompt limit (400
    ``context_length_exceeded``) or the queue is full (429)."""
    st = request.app.state
    if not ids:
        raise bad_request("the prompt is empty", "prompt")
    if len(ids) > st.max_prompt:
        raise bad_request(f"the prompt has {len(ids)} tokens; this server accepts at most {st.max_prompt}",
                   "messages", "context_length_exceeded")
    if st.engine.queue_depth() >= st.cfg.max_queue > 0:
        raise ApiError(429, "too many requests queued; retry later", "rate_limit_error", code="queue_full")
    return ids


def finish_reason(c: Completion) -> str:
    return c.finish_reason if c.finish_reason in ("stop", "length") else "stop"


def completion_error(c: Completion, timeout_s: float) -> ApiError | None:
    """The error a completion that did not finish normally turns into (timeout 504, failure 500,
    cancelled at shutdown 503); None for ``stop`` / ``length``."""
    if c.finish_reason == "timeout":
        return ApiError(504, f"generation exceeded the {timeout_s} s time limit", "timeout_error", code="timeout")
    if c.finish_reason == "error":
        return ApiError(500, f"generation failed: {c.error}", "server_error")
    if c.finish_reason == "cancelled":
        return ApiError(503, "request cancelled (server shutting down)", "server_error")
    return None


def record_completion(metrics: ServerMetrics, c: Completion) -> None:
    if c.index == 0:  # n samples share one prompt
        metrics.prompt_tokens.inc(c.prompt_tokens)
    metrics.completion_tokens.inc(len(c.token_ids))
    if c.first_token_s is not None:
        metrics.ttft.observe(c.first_token_s)
