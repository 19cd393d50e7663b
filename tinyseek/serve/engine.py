"""Batched generation with a preallocated KV cache and a continuous-batching scheduler.

One :class:`Engine` owns a model and a KV cache of ``max_batch`` slots (rows) of ``max_len``
positions, allocated once. Each request lives in one slot. A scheduler step:

1. admits queued requests into free slots (lowest free slot first, so the busy rows stay packed
   at the top of the cache); while rows are decoding, the admitted prompts go into the decode
   forward itself (a *mixed step*, :meth:`Engine._mixed`: one ragged forward over the busy rows'
   next tokens and the new prompts, up to :data:`MIX_MAX_TOKENS` tokens; MLA models with the fp32
   CPU kernels) and steps 2-3 are that one forward. Where mixing does not apply (GQA, GPU, kernels
   off, ``mix_prefill=False``) arrivals are held back while more keep coming (at most
   ``max_wait``, not once they fill the free slots), so that requests trickling in share one
   prefill forward (:meth:`Engine._hold_back`);
2. prefills the admitted prompts together: right-padded into a small temporary cache, copied into
   their slots, and each slot's length set to its own prompt length (the padding written past it is
   never attended to: the causal mask only looks at positions below a row's length, and the next
   token overwrites it); the first token of each is sampled from its last prompt position;
3. decodes one token for every busy slot in one forward over rows ``[0, highest busy slot]`` (a
   view of the cache, so finished slots in between cost a wasted row, not a copy);
4. samples per row (:mod:`tinyseek.serve.sampling`, one generator per request) and retires rows
   that hit eos, a stop token or string, ``max_tokens``, the cache end, a cancel or a deadline.

Requests can join and leave between any two decode steps (continuous batching). ``generate()`` is
the batch API used by GRPO rollouts and eval (it runs the steps in the caller's thread, or hands
the requests to the background thread when one runs); ``stream()`` is its one-prompt streaming
form (terminal chat). The server uses ``start()`` (a background scheduler thread; when idle it
gathers a burst of arrivals, up to ``max_wait`` seconds, before the first prefill; when busy it
coalesces arrivals for up to ``max_wait``), ``astream()`` (async
iterator of token/text events) and ``acomplete()`` (await the final completion only).

OpenAI extras per request (:class:`SamplingParams`): ``n`` samples are admitted together into n slots,
the prompt is prefilled once and its cache rows copied to the others (a fork); ``logprobs`` /
``prompt_logprobs`` record log-softmax of the raw logits (before penalties, bias and temperature);
presence / frequency penalties and ``logit_bias`` change the logits that are sampled
(:func:`~tinyseek.serve.sampling.apply_penalties`). Requests with n > 1 or prompt logprobs take the
prefill path, never a mixed step.

Not done (on purpose, for size): no prefix caching, no chunking of long prompts (a prompt goes
into one forward, mixed or not; a mixed step takes whole prompts only), no paged KV memory (a slot
owns ``max_len`` positions), no CUDA graphs.

Exactness: a request's tokens depend only on its own prompt, parameters and seed: sampling is per
row with a per-request generator, positions are per row and padding is masked. Bitwise equality of
logits between batch sizes is not guaranteed: BLAS picks different kernels for different matrix
shapes (on this CPU a 1-row and a 16-row GEMM differ in the last bit). Greedy ties are broken to the
lowest id; tests check that greedy tokens alone and batched are identical.
"""
from __future__ import annotations

import asyncio
import itertools
import queue
import random
import threading
import time
import traceback
from collections import deque
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterator

import torch

from tinyseek.common import get_device
from tinyseek.errors import UserError
from tinyseek.kernels import attn as attn_kernel
from tinyseek.kernels.linear import MAX_ROWS as _LINEAR_MAX_ROWS
from tinyseek.serve.detok import TextTracker
from tinyseek.serve.sampling import apply_penalties, sample_tokens, token_logprobs
from tinyseek.quant.load import load_model


@dataclass
class SamplingParams:
    max_tokens: int = 64            # new tokens at most (finish_reason "length")
    temperature: float = 0.0        # 0 = greedy; otherwise softmax temperature
    top_k: int = 0                  # sample among the k most likely tokens; 0 = all
    top_p: float = 1.0              # nucleus: smallest set of tokens with this much mass; 1 = all
    stop: list[str] = field(default_factory=list)  # stop strings (need a tokenizer); cut from text
    seed: int | None = None         # per-request seed: same seed -> same tokens, whatever the batch
    stop_token_ids: list[int] = field(default_factory=list)  # extra ids that end generation
    ignore_eos: bool = False        # keep going past eos (benchmarks)
    n: int = 1                      # samples of the prompt: prefilled once, its KV cache forked into n slots
    logprobs: int | None = None     # record each sampled token's logprob and this many top alternatives (0..20)
    prompt_logprobs: int | None = None  # same for the prompt's tokens (the first has none); then max_tokens may be 0
    presence_penalty: float = 0.0   # OpenAI: logit[j] -= presence * (count[j] > 0), counts over generated tokens
    frequency_penalty: float = 0.0  # OpenAI: logit[j] -= frequency * count[j]
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit before sampling

    def validate(self) -> "SamplingParams":
        lo = 0 if self.prompt_logprobs is not None else 1
        if not isinstance(self.max_tokens, int) or self.max_tokens < lo:
            raise UserError(f"max_tokens must be an integer >= {lo}, got {self.max_tokens!r}")
        if not isinstance(self.n, int) or self.n < 1:
            raise UserError(f"n must be a positive integer, got {self.n!r}")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and not (isinstance(v, int) and 0 <= v <= MAX_TOP_LOGPROBS):
                raise UserError(f"{name} must be None or an integer in [0, {MAX_TOP_LOGPROBS}], got {v!r}")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2 <= getattr(self, name) <= 2:
                raise UserError(f"{name} must be in [-2, 2], got {getattr(self, name)!r}")
        if any(not -100 <= b <= 100 for b in self.logit_bias.values()):
            raise UserError("logit_bias values must be in [-100, 100]")
        if not self.temperature >= 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise UserError(f"top_k must be an integer >= 0, got {self.top_k!r}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if any(not isinstance(s, str) for s in self.stop):
            raise UserError("stop must be a list of strings")
        return self


MAX_TOP_LOGPROBS = 20  # alternatives per token at most (OpenAI's limit)

# one token's logprob record: (token id, log-softmax of the raw logits at temperature 1, [(id, logprob)] top alternatives)
TokenLogprob = tuple[int, float, list[tuple[int, float]]]


@dataclass
class Completion:
    token_ids: list[int]            # generated ids (an eos / stop token that ended it included)
    text: str | None                # decoded text without eos and stop string (None without tokenizer)
    finish_reason: str              # "stop" (eos, stop token/string), "length", "cancelled", "timeout", "error"
    prompt_tokens: int = 0          # prompt length in tokens
    stop: str | int | None = None   # the stop string or token id that ended it
    error: str | None = None        # message when finish_reason == "error"
    first_token_s: float | None = None  # seconds from submission to the first generated token
    index: int = 0                  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # per generated token (aligned with token_ids) when asked
    prompt_logprobs: list[TokenLogprob | None] | None = None  # per prompt token (the first None) when asked


@dataclass
class StreamEvent:
    token_ids: list[int]            # ids produced since the previous event
    text: str                       # text delta that is safe to show (stop strings held back)
    finished: bool = False
    completion: Completion | None = None  # set on the last event
    index: int = 0                  # which of the request's n samples
    logprobs: list[TokenLogprob] | None = None  # records of token_ids (when the request asked for logprobs)
    prompt_logprobs: list[TokenLogprob | None] | None = None  # on a request's first event, when asked


_ids = itertools.count()


def check_prompt(prompt: list[int], max_len: int, vocab_size: int) -> list[int]:
    """The prompt as a list of ints, or :class:`UserError` (empty, too long for ``max_len`` cache
    positions, an id outside the vocabulary)."""
    prompt = [int(t) for t in prompt]
    if not prompt:
        raise UserError("prompt is empty")
    if len(prompt) >= max_len:
        raise UserError(f"prompt has {len(prompt)} tokens; the limit is {max_len - 1}")
    if min(prompt) < 0 or max(prompt) >= vocab_size:
        raise UserError(f"prompt token ids must be in [0, {vocab_size})")
    return prompt


def check_params(params: SamplingParams, max_batch: int, vocab_size: int) -> SamplingParams:
    """``params`` unless ``n`` exceeds the slots or a ``logit_bias`` id is outside the vocabulary (UserError)."""
    if params.n > max_batch:
        raise UserError(f"n = {params.n} exceeds the engine's {max_batch} slots")
    bad = [t for t in params.logit_bias if not (isinstance(t, int) and 0 <= t < vocab_size)]
    if bad:
        raise UserError(f"logit_bias: token id {bad[0]!r} is not in [0, {vocab_size})")
    return params


def sample_seeds(seed: int | None, n: int, fresh: random.Random) -> list[int]:
    """The generator seeds of n samples: sample 0 uses ``seed`` itself (n = 1 is unchanged), sample i
    a seed derived from ``(seed, i)``; without a seed, fresh ones.

    >>> s = sample_seeds(7, 3, random.Random()); s[0], s == sample_seeds(7, 3, random.Random()), len(set(s))
    (7, True, 3)
    """
    if seed is None:
        return [fresh.getrandbits(63) for _ in range(n)]
    return [seed] + [random.Random(f"{seed}:{i}").getrandbits(63) for i in range(1, n)]


class Request:
    """Handle for one submitted prompt: wait with :meth:`result`, stop with :meth:`cancel`."""

    def __init__(self, prompt: list[int], params: SamplingParams, tokenizer,
                 listener: Callable[["Request", StreamEvent], None] | None, deadline: float | None,
                 holds: list[str] | None, seed: int, stream: bool = True, index: int = 0):
        self.id = next(_ids)
        self.index = index                 # sample number within its group (n > 1)
        self.siblings: list[Request] = []  # on sample 0 only: the other n - 1 samples (admitted with it)
        self.logprobs: list[TokenLogprob] | None = [] if params.logprobs is not None else None
        self.prompt_logprobs: list[TokenLogprob | None] | None = None
        self._lp_sent = 0
        self._plp_sent = False
        self.prompt = prompt
        self.params = params
        self.listener = listener
        self.stream = stream and listener is not None  # listener hears every token (else: only the end)
        self.deadline = deadline           # time.monotonic() limit, None = none
        self.rng = random.Random(seed)
        self.token_ids: list[int] = []
        self.slot: int | None = None
        self.cancelled = False
        self.completion: Completion | None = None
        self.submitted = time.monotonic()
        self.first_token_at: float | None = None
        self.finished_at: float | None = None
        self._done = threading.Event()
        track = tokenizer is not None and (params.stop or self.stream)
        self.tracker = TextTracker(tokenizer, params.stop, holds) if track else None
        self._tokenizer = tokenizer
        self._new_ids: list[int] = []

    @property
    def group(self) -> list["Request"]:
        return [self, *self.siblings]

    @property
    def done(self) -> bool:
        """This sample and (on sample 0) its siblings finished."""
        return self._done.is_set() and all(s._done.is_set() for s in self.siblings)

    @property
    def simple(self) -> bool:
        """One sample, no prompt logprobs: may go into a mixed step (the others take the prefill path)."""
        return not self.siblings and self.params.prompt_logprobs is None

    def cancel(self) -> None:
        """Ask the engine to stop this request (and its siblings) at the next step (finish_reason "cancelled")."""
        for r in self.group:
            r.cancelled = True

    def results(self, timeout: float | None = None) -> list[Completion]:
        """The completions of all n samples, in index order."""
        return [r.result(timeout) for r in self.group]

    def result(self, timeout: float | None = None) -> Completion:
        if not self._done.wait(timeout):
            raise TimeoutError(f"request {self.id} not finished after {timeout} s")
        return self.completion


class AsyncCalls:
    """``acomplete`` / ``astream`` over ``self.submit(prompt, params, listener, timeout=, holds=,
    stream=)``, whose handle has ``done`` and ``cancel()``: shared by :class:`Engine` and the
    server's :class:`~tinyseek.serve.engine_proc.ProcessEngine`."""

    async def acomplete(self, prompt: list[int], params: SamplingParams | None = None,
                        timeout: float | None = None) -> Completion:
        """Await one completion (needs :meth:`start`); cancelling the awaiting task cancels it."""
        return (await self.acomplete_all(prompt, params, timeout))[0]

    async def acomplete_all(self, prompt: list[int], params: SamplingParams | None = None,
                            timeout: float | None = None) -> list[Completion]:
        """Await the ``params.n`` completions of one prompt, in index order."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[list[Completion]] = loop.create_future()
        n = params.n if params is not None else 1
        got: dict[int, Completion] = {}

        def done(r, ev: StreamEvent) -> None:
            got[ev.index] = ev.completion  # (events come from one thread, in order)
            if len(got) == n or ev.completion.finish_reason == "error":
                out = [got.get(i, ev.completion) for i in range(n)]
                loop.call_soon_threadsafe(lambda: fut.done() or fut.set_result(out))
        req = self.submit(prompt, params, done, timeout=timeout, stream=False)
        try:
            return await fut
        finally:
            if not req.done:
                req.cancel()

    async def astream(self, prompt: list[int], params: SamplingParams | None = None,
                      timeout: float | None = None, holds: list[str] | None = None) -> AsyncIterator[StreamEvent]:
        """Async iterator of :class:`StreamEvent` for one prompt (needs :meth:`start`): the events of
        all ``params.n`` samples interleaved (``ev.index``), ending after the last one finished.
        Leaving the loop early cancels the request."""
        loop = asyncio.get_running_loop()
        q: asyncio.Queue[StreamEvent] = asyncio.Queue()
        left = params.n if params is not None else 1
        req = self.submit(prompt, params, lambda r, ev: loop.call_soon_threadsafe(q.put_nowait, ev),
                          timeout=timeout, holds=holds)
        try:
            while True:
                ev = await q.get()
                yield ev
                if ev.finished:
                    left -= 1
                    if left == 0 or ev.completion.finish_reason == "error" and not ev.completion.token_ids:
                        return
        finally:
            if not req.done:
                req.cancel()


class Engine(AsyncCalls):
    def __init__(self, model, tokenizer=None, max_batch: int = 16, max_len: int | None = None,
                 eos_id: int | None = None, max_wait: float = 0.0, prefill_tokens: int = 8192,
                 mix_prefill: bool = True):
        """``max_len``: cache positions per slot (prompt + completion), default the model's
        ``max_seq_len``. ``eos_id`` defaults to ``tokenizer.eos_id``. ``max_wait``: seconds a
        request may wait to be prefilled together with others: an idle background scheduler
        gathers a burst (stopping earlier once no request came for ``max_wait / 4``); a busy
        engine coalesces arrivals the same way (:meth:`_hold_back`; 0 = admit at once). ``prefill_tokens``: padded tokens
        per prefill forward (larger admissions are split). ``mix_prefill``: while rows decode, new
        prompts go into the decode step's forward (:meth:`_mixed`) where the model supports it
        (MLA with the fp32 CPU kernels), instead of a prefill forward of their own."""
        if max_batch < 1:
            raise UserError(f"max_batch must be >= 1, got {max_batch}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.cfg = model.cfg
        self.max_batch = max_batch
        self.max_len = min(max_len or self.cfg.max_seq_len, self.cfg.max_seq_len)
        self.eos_id = eos_id if eos_id is not None else getattr(tokenizer, "eos_id", None)
        # only ids the tokenizer can decode may be sampled (a model may have a padded, larger vocabulary)
        self.n_vocab = min(self.cfg.vocab_size, getattr(tokenizer, "vocab_size", None) or self.cfg.vocab_size)
        self.max_wait = max_wait
        self.prefill_tokens = max(prefill_tokens, self.max_len)
        self.device = next(model.parameters()).device
        self.cache = model.new_cache(max_batch, self.max_len)
        self.slots: list[Request | None] = [None] * max_batch
        self._views: dict[int, _RowsView] = {}  # first-n-rows views of the cache, made once per n
        self._last = torch.zeros(max_batch, dtype=torch.long, device=self.device)  # next input id per slot
        self._queue: deque[Request] = deque()
        self._cv = threading.Condition()
        self._drive = threading.Lock()     # one thread runs model steps at a time
        self._thread: threading.Thread | None = None
        self._stopping = False
        self._seed_rng = random.Random()
        # counters read by the server's /metrics
        self.stats = {"steps": 0, "decode_tokens": 0, "prefill_tokens": 0, "prefills": 0, "finished": 0}
        self.prefill_seconds = 0.0
        self.step_listeners: list[Callable[[int, float], None]] = []  # (batch size, seconds) per decode
        self.mix_prefill = mix_prefill
        self._ragged: tuple | None = None  # (weights key, model.can_ragged) cached per weights version

    # --- submission --------------------------------------------------------------------------
    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               listener: Callable[[Request, StreamEvent], None] | None = None,
               timeout: float | None = None, holds: list[str] | None = None, stream: bool = True) -> Request:
        """Queue one prompt. ``listener(request, event)`` is called from the engine thread after each
        token (only once, at the end, with ``stream=False``); ``holds`` are extra strings whose
        prefixes are held back from streamed text."""
        params = check_params((params or SamplingParams()).validate(), self.max_batch, self.cfg.vocab_size)
        prompt = check_prompt(prompt, self.max_len, self.cfg.vocab_size)
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need an engine with a tokenizer")
        seeds = sample_seeds(params.seed, params.n, self._seed_rng)
        deadline = time.monotonic() + timeout if timeout else None
        req = Request(prompt, params, self.tokenizer, listener, deadline, holds, seeds[0], stream)
        req.siblings = [Request(prompt, params, self.tokenizer, listener, deadline, holds, s, stream, index=i)
                        for i, s in enumerate(seeds[1:], 1)]
        with self._cv:
            if self._stopping:
                raise UserError("the engine is shutting down")
            self._queue.append(req)
            self._cv.notify_all()
        return req

    def generate(self, prompts: list[list[int]], params: SamplingParams | list[SamplingParams] | None = None
                 ) -> list[Completion]:
        """Generate for every prompt (batched, continuous) and return completions in order."""
        if isinstance(params, list):
            if len(params) != len(prompts):
                raise UserError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        else:
            params = [params or SamplingParams()] * len(prompts)
        reqs = [self.submit(p, sp) for p, sp in zip(prompts, params)]
        if self._thread is None:
            with self._drive:
                while not all(r.done for r in reqs):
                    self.step()
        return [r.result() for r in reqs]

    def stream(self, prompt: list[int], params: SamplingParams | None = None,
               timeout: float | None = None) -> Iterator[StreamEvent]:
        """Synchronous iterator of :class:`StreamEvent` (drives the steps itself when no background
        thread runs). Leaving the loop early cancels the request."""
        q: queue.SimpleQueue[StreamEvent] = queue.SimpleQueue()
        req = self.submit(prompt, params, lambda r, ev: q.put(ev), timeout=timeout)
        try:
            while True:
                if self._thread is None and q.empty():
                    with self._drive:
                        if q.empty():
                            self.step()
                    continue
                ev = q.get()
                yield ev
                if ev.finished:
                    return
        finally:
            if not req.done:
                req.cancel()
                if self._thread is None:
                    with self._drive:
                        self.step()  # retire it now

    # --- background scheduler -----------------------------------------------------------------
    def start(self) -> "Engine":
        if self._thread is None:
            self._stopping = False
            self._thread = threading.Thread(target=self._loop, name="tinyseek-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the background thread; with ``drain`` it first finishes queued and running requests,
        otherwise they are cancelled."""
        with self._cv:
            self._stopping = True
            if not drain:
                for r in list(self._queue) + [r for r in self.slots if r is not None]:
                    r.cancel()
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._queue and self.num_active() == 0 and not self._stopping:
                    self._cv.wait()
                if self._stopping and not self._queue and self.num_active() == 0:
                    return
                if self.num_active() == 0 and self.max_wait > 0:  # idle: gather a burst first
                    self._gather_burst()
            with self._drive:
                try:
                    self.step()
                except Exception:  # step() already failed the affected requests; keep the thread alive
                    traceback.print_exc()

    def _gather_burst(self) -> None:
        """An idle engine waits (holding ``_cv``) while requests keep arriving: until none came for
        ``max_wait / 4``, ``max_wait`` after the first, or the batch is full. A lone request thus
        waits only the short gap, and a burst (clients that all got their answers at once and
        send again) is prefilled in one forward instead of one straggler at a time."""
        end = self._queue[0].submitted + self.max_wait
        gap = self.max_wait / 4
        while len(self._queue) < self.max_batch:
            left = min(end, self._queue[-1].submitted + gap) - time.monotonic()
            if left <= 0:
                return
            self._cv.wait(left)

    def num_active(self) -> int:
        return sum(r is not None for r in self.slots)

    def queue_depth(self) -> int:
        return len(self._queue)

    # --- one scheduler step -----------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        """Admit + prefill new requests, then decode one token for every busy slot."""
        try:
            self._retire_cancelled()
            admitted, mixed = self._admit()
            if mixed:
                self._mixed(admitted)  # prefill and decode in one forward
                return
            if admitted:
                self._prefill(admitted)
            if self.num_active():
                self._decode()
        except Exception as e:  # fail the affected requests, keep serving the others
            msg = f"{type(e).__name__}: {e}"
            for r in [r for r in self.slots if r is not None]:
                r.tracker = None
                self._finish(r, "error", error=msg, decode=False)
            if self._thread is None:
                raise

    def _retire_cancelled(self) -> None:
        now = time.monotonic()
        for r in self.slots:
            if r is not None:
                if r.cancelled:
                    self._finish(r, "cancelled")
                elif r.deadline is not None and now > r.deadline:
                    self._finish(r, "timeout")

    def _admit(self) -> tuple[list[Request], bool]:
        """Queued requests moved into free slots, and whether they go into a mixed step with the
        busy rows (:meth:`_mixed`; then they fit :data:`MIX_MAX_TOKENS` together with them)."""
        admitted = []
        with self._cv:
            free = [i for i, r in enumerate(self.slots) if r is None]
            if self._hold_back(len(free)):
                return admitted, False
            # a mixed step takes what fits next to the busy rows' tokens; the rest waits one step
            # (the first queued prompt fits, or _mixing would be False)
            budget = MIX_MAX_TOKENS - self.num_active() if self._queue and self._mixing() else None
            while self._queue and free:
                r = self._queue[0]
                if budget is not None and (len(r.prompt) > budget or not r.simple):
                    break
                if len(r.group) > len(free):  # n samples need n slots at once (FIFO: the rest waits too)
                    break
                self._queue.popleft()
                if r.cancelled or (r.deadline is not None and time.monotonic() > r.deadline):
                    for g in r.group:
                        self._finish(g, "cancelled" if r.cancelled else "timeout")
                    continue
                if budget is not None:
                    budget -= len(r.prompt)
                for g in r.group:
                    g.slot = free.pop(0)
                    self.slots[g.slot] = g
                admitted.append(r)
        return admitted, budget is not None and bool(admitted)

    def _hold_back(self, n_free: int) -> bool:
        """Coalesce prefills while decoding: with rows busy, queued requests wait while more keep
        arriving (the newest came less than ``max_wait / 4`` ago), at most ``max_wait`` after the
        oldest, and not once they fill the free slots; so requests trickling in share one prefill
        forward instead of paying one each (the busy rows keep decoding meanwhile; only the waiting
        requests' first token is later)."""
        if not self._queue or self.max_wait <= 0 or len(self._queue) >= n_free or self.num_active() == 0:
            return False
        if self._mixing():  # a prefill rides along with the decode step: no need to wait
            return False
        now = time.monotonic()
        return now - self._queue[0].submitted < self.max_wait and now - self._queue[-1].submitted < self.max_wait / 4

    def _prefill(self, reqs: list[Request]) -> None:
        reqs = sorted(reqs, key=lambda r: len(r.prompt))
        chunk: list[Request] = []
        for r in reqs:  # split so that padded tokens per forward stay under the budget
            if chunk and (len(chunk) + 1) * len(r.prompt) > self.prefill_tokens:
                self._prefill_chunk(chunk)
                chunk = []
            chunk.append(r)
        if chunk:
            self._prefill_chunk(chunk)

    def _prefill_chunk(self, reqs: list[Request]) -> None:
        t0 = time.perf_counter()
        dev = self.device
        k, T = len(reqs), max(len(r.prompt) for r in reqs)
        ids = torch.zeros(k, T, dtype=torch.long)
        for i, r in enumerate(reqs):
            ids[i, :len(r.prompt)] = torch.tensor(r.prompt)
        lens = torch.tensor([len(r.prompt) for r in reqs], device=dev)
        tmp = self.model.new_cache(k, T, dtype=next(iter(self.cache.layers[0].values())).dtype)
        if any(r.params.prompt_logprobs is not None for r in reqs):  # every position's logits
            full = self.model(ids.to(dev), cache=tmp).logits
            last = full[torch.arange(k, device=dev), lens - 1]
            for i, r in enumerate(reqs):
                if r.params.prompt_logprobs is not None:
                    lps = [None] + token_logprobs(full[i, :len(r.prompt) - 1, :self.n_vocab],
                                                  r.prompt[1:], r.params.prompt_logprobs)
                    for g in r.group:
                        g.prompt_logprobs = lps
        else:
            last = self.model(ids.to(dev), cache=tmp, logits_at=lens - 1).logits[:, 0]
        # fork: every sample of a request gets a copy of its prompt's cache rows
        members = [(i, g) for i, r in enumerate(reqs) for g in r.group]
        src_idx = torch.tensor([i for i, _ in members], device=dev)
        rows = torch.tensor([g.slot for _, g in members], device=dev)
        for big, small in zip(self.cache.layers, tmp.layers):
            for name, buf in big.items():
                src = small[name] if len(members) == k else small[name][src_idx]
                if buf.dim() == 3:   # (B, L, C): MLA latent
                    buf[rows, :T] = src
                else:                # (B, H, L, K): GQA keys / values
                    buf[rows, :, :T] = src
        self.cache.lengths[rows] = lens[src_idx]
        self.stats["prefill_tokens"] += int(sum(len(r.prompt) for r in reqs))
        self.stats["prefills"] += 1
        self.prefill_seconds += time.perf_counter() - t0
        for _, g in members:
            if g.params.max_tokens == 0:  # prompt logprobs only (echo with max_tokens 0)
                self._finish(g, "length")
        keep = [j for j, (_, g) in enumerate(members) if not g.done]
        if keep:
            self._sample_and_advance([members[j][1] for j in keep], last[src_idx[keep]], rows[keep])

    def _mixing(self) -> bool:
        """Whether admissions now would go into a mixed step: rows are decoding, mixing is on and the
        model supports ragged forwards, and the first queued prompt fits next to the busy rows in
        :data:`MIX_MAX_TOKENS` (so every GEMM stays in the C kernel, whose rows do not depend on each
        other: a request's tokens are the same mixed or not). Else a prefill forward, held back as
        usual."""
        n = self.num_active()
        first = len(self._queue[0].prompt) if self._queue else 1
        if self._queue and not self._queue[0].simple:  # n > 1 / prompt logprobs: the prefill path
            return False
        return self.mix_prefill and 0 < n and n + first <= MIX_MAX_TOKENS and self._ragged_ok()

    def _ragged_ok(self) -> bool:
        """``model.can_ragged``, asked again only when the weights or the kernel switch change."""
        key = self._weights_key()
        if self._ragged is None or self._ragged[0] != key:
            self._ragged = (key, self.model.can_ragged(self.cache))
        return self._ragged[1]

    def _weights_key(self):
        """Changes when the model's parameters are replaced or updated (GRPO steps, loads) or the
        attention kernels are switched."""
        p = next(self.model.parameters())
        return p.data_ptr(), p._version, p.dtype, attn_kernel.KERNELS.state["enabled"]

    def _mixed(self, admitted: list[Request]) -> None:
        """One forward for the busy rows' next tokens and the admitted requests' whole prompts
        (:meth:`~tinyseek.model.transformer.Transformer.forward_ragged`): the new requests get their
        first token, the others their next one. A separate prefill forward costs about as much as a
        decode step (at cpu-tiny sizes most of a forward is per-call overhead, not arithmetic) and
        stalls every busy row; here a prompt costs only its own tokens. Counted as one decode step
        of all its rows and one prefill."""
        t0 = time.perf_counter()
        dev = self.device
        new = set(id(r) for r in admitted)
        busy = [i for i, r in enumerate(self.slots) if r is not None and id(r) not in new]
        dec = torch.tensor(busy, device=dev)
        lens = [len(r.prompt) for r in admitted]
        lens_t = torch.tensor(lens, device=dev)
        new_rows = torch.tensor([r.slot for r in admitted], device=dev)
        ids = torch.cat([self._last[dec], torch.tensor([t for r in admitted for t in r.prompt], device=dev)])
        rows = torch.cat([dec, new_rows.repeat_interleave(lens_t)])
        pos = torch.cat([self.cache.lengths[dec], torch.cat([torch.arange(n, device=dev) for n in lens])])
        ends = lens_t.cumsum(0) + len(busy) - 1
        logits = self.model.forward_ragged(ids, rows, pos, self.cache, torch.cat([torch.arange(len(busy), device=dev), ends]))
        self.cache.lengths[dec] += 1
        self.cache.lengths[new_rows] = lens_t
        self._sample_and_advance([self.slots[i] for i in busy] + admitted, logits, torch.cat([dec, new_rows]))
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(busy)
        self.stats["prefills"] += 1
        self.stats["prefill_tokens"] += sum(lens)
        dt = time.perf_counter() - t0
        for cb in self.step_listeners:
            cb(len(busy) + len(admitted), dt)

    def _decode(self) -> None:
        t0 = time.perf_counter()
        busy = [i for i, r in enumerate(self.slots) if r is not None]
        n = busy[-1] + 1
        view = self._views.get(n)
        if view is None:
            view = self._views[n] = _RowsView(self.cache, n)
        packed = len(busy) == n  # the usual case: no finished slot below the highest busy one
        if not packed:  # holes: keep their length at 0 so they do not stretch the key length
            holes = torch.tensor([i for i in range(n) if self.slots[i] is None], device=self.device)
            view.lengths[holes] = 0
        logits = self.model(self._last[:n, None], cache=view).logits[:, -1]
        if packed:
            rows = slice(0, n)
        else:
            view.lengths[holes] = 0
            rows = torch.tensor(busy, device=self.device)
            logits = logits[rows]
        self._sample_and_advance([self.slots[i] for i in busy], logits, rows)
        self.stats["steps"] += 1
        self.stats["decode_tokens"] += len(busy)
        dt = time.perf_counter() - t0
        for cb in self.step_listeners:
            cb(len(busy), dt)

    def _sample_and_advance(self, reqs: list[Request], logits_NV: torch.Tensor,
                            rows: slice | torch.Tensor | None = None) -> None:
        """Sample one token per request (row i of ``logits_NV`` is ``reqs[i]``), store it as the
        slot's next input (``rows``: the slots, default ``[r.slot for r in reqs]``) and append it."""
        if self.n_vocab < logits_NV.shape[-1]:
            logits_NV = logits_NV[:, :self.n_vocab]
        raw_NV = logits_NV
        logits_NV = apply_penalties(logits_NV, [r.params for r in reqs], [r.token_ids for r in reqs])
        ps = [r.params for r in reqs]
        u = [r.rng.random() if (p.temperature > 0 and p.top_k != 1) else 0.0 for r, p in zip(reqs, ps)]
        toks_t = sample_tokens(logits_NV, [p.temperature for p in ps], [p.top_k for p in ps],
                               [p.top_p for p in ps], u)
        if rows is None:
            rows = torch.tensor([r.slot for r in reqs], device=self.device)
        self._last[rows] = toks_t
        toks = toks_t.tolist()
        want = [i for i, r in enumerate(reqs) if r.logprobs is not None]
        if want:  # the model's own distribution: log-softmax of the raw logits (no temperature, penalties, bias)
            k = max(reqs[i].params.logprobs for i in want)
            recs = token_logprobs(raw_NV[want], [toks[i] for i in want], k)
            for i, rec in zip(want, recs):
                reqs[i].logprobs.append((rec[0], rec[1], rec[2][:reqs[i].params.logprobs]))
        now = time.monotonic()
        for r, t in zip(reqs, toks):
            self._append(r, t, now)

    def _append(self, r: Request, tok: int, now: float) -> None:
        p = r.params
        r.token_ids.append(tok)
        r._new_ids.append(tok)
        if r.first_token_at is None:
            r.first_token_at = now
        if (tok == self.eos_id and not p.ignore_eos) or tok in p.stop_token_ids:
            self._finish(r, "stop", stop=tok)
            return
        delta = ""
        if r.tracker is not None:
            delta = r.tracker.update(r.token_ids)
            if r.tracker.stopped is not None:
                self._finish(r, "stop", stop=r.tracker.stopped, pending=delta)
                return
        if len(r.token_ids) >= p.max_tokens or len(r.prompt) + len(r.token_ids) >= self.max_len:
            self._finish(r, "length", pending=delta)
            return
        if r.stream:
            ids, r._new_ids = r._new_ids, []
            _notify(r, _event(r, ids, delta))

    def _finish(self, r: Request, reason: str, stop: str | int | None = None, error: str | None = None,
                pending: str = "", decode: bool = True) -> None:
        if r.done:
            return
        if r.slot is not None and self.slots[r.slot] is r:
            self.slots[r.slot] = None
            self.cache.lengths[r.slot] = 0
        ids = r.token_ids
        text = None
        if self.tokenizer is not None and decode:
            if r.tracker is not None:
                text = r.tracker.text if r.tracker.stopped is not None else None
            if text is None:
                body = ids[:-1] if reason == "stop" and isinstance(stop, int) else ids
                text = self.tokenizer.decode(body)
                if r.tracker is not None:
                    r.tracker.text = text
        ttft = r.first_token_at - r.submitted if r.first_token_at is not None else None
        r.completion = Completion(list(ids), text, reason, len(r.prompt), stop, error, ttft, r.index,
                                  None if r.logprobs is None else list(r.logprobs), r.prompt_logprobs)
        r.finished_at = time.monotonic()
        self.stats["finished"] += 1
        if r.listener is not None:
            delta = pending + (r.tracker.flush(final=True) if r.tracker is not None else "")
            new, r._new_ids = r._new_ids, []
            _notify(r, _event(r, new, delta, finished=True))
        r._done.set()


MIX_MAX_TOKENS = _LINEAR_MAX_ROWS  # tokens of a mixed step at most: the linear C kernel's row limit


def _event(r: Request, ids: list[int], text: str, finished: bool = False) -> StreamEvent:
    """A stream event with the logprob records not yet sent (the prompt's with the first event)."""
    ev = StreamEvent(ids, text, finished, r.completion if finished else None, r.index)
    if r.logprobs is not None:
        ev.logprobs, r._lp_sent = r.logprobs[r._lp_sent:], len(r.logprobs)
    if r.prompt_logprobs is not None and not r._plp_sent:
        ev.prompt_logprobs, r._plp_sent = r.prompt_logprobs, True
    return ev


def _notify(r: Request, ev: StreamEvent) -> None:
    try:
        r.listener(r, ev)
    except Exception:  # a broken listener (closed event loop) must not stop the engine
        r.cancel()


class _RowsView:
    """The first ``n`` rows of a :class:`KVCache` as a cache object (views, no copies): the model
    writes through to the engine's cache and advances its lengths in place."""

    def __init__(self, cache, n: int):
        self.max_len = cache.max_len
        self.batch_size = n
        self.lengths = cache.lengths[:n]
        self.layers = [{k: v[:n] for k, v in layer.items()} for layer in cache.layers]


def engine_from_checkpoint(path: str, tokenizer=None, device: str = "auto", **kw: Any) -> Engine:
    """Load ``tinyseek.quant.load.load_model(path)`` (any registered checkpoint format) onto ``device`` and wrap it."""
    model, _meta = load_model(path, device=get_device(device))
    return Engine(model, tokenizer, **kw)
