"""The serving engine in its own process, so the HTTP server's Python never competes with it for the GIL.

In one process the event-loop thread (HTTP parsing, JSON, tokenizing, safety checks) and the
engine thread share one interpreter lock. Every PyTorch op and C kernel call releases the lock,
so the engine hands it to the event loop hundreds of times per decode step and waits to get it
back (a convoy): measured on cpu-tiny with a Python thread busy 30% of the time beside the
engine, a 16-row step took 2.3-4.1 ms instead of 1.4 ms, and with the same work in another
process 1.3-1.7 ms. So ``tinyseek serve`` runs the :class:`~tinyseek.serve.engine.Engine` in a
child process (``--engine-process``, on by default), as vLLM's v1 engine core does.

:class:`ProcessEngine` is what the server sees: the same calls it makes on an in-process
``Engine`` (``submit``, ``acomplete``, ``astream``, ``start``, ``stop``, ``num_active``,
``queue_depth``, ``stats``, ``prefill_seconds``, ``step_listeners``, ``max_len``, ``device``).
The child (``spawn``: safe with CUDA and with OpenMP threads) loads the checkpoint itself, runs
the engine's own scheduler thread, and reads commands (submit / cancel / stop) from a pipe. After
every scheduler step it sends one message back: the events of that step (tokens, text deltas,
completions), the decode steps' (batch size, seconds) for the metrics, and a status snapshot
(active, queued, counters); a step without events sends only every 50 ms (the parent's reader
thread shares its GIL with the HTTP event loop: one message per step made the child wait on a
full pipe, 0.45 ms a step). The parent's reader thread hands events to the waiting requests.

CPU placement (``--engine-cpus``, off by default): ``auto`` pins the engine process to all CPUs
but the last and the HTTP process (``tinyseek serve``) to the last one, so the two never take
turns on a core; the engine then runs one torch thread per CPU it owns (unless ``OMP_NUM_THREADS``
says otherwise). Measured on the 2-core CPU with the load generator kept on the HTTP core: 16
clients vs 1 over HTTP 7.7-10.3x pinned against 6.2-7.2x unpinned (the step at ~15 rows 1.3-1.7
ms instead of 1.6-2.1), but at 64 clients the single HTTP core cannot keep up (4.4-5.1k tok/s,
mean batch 6-10, against ~7.5k unpinned). So it is an option for machines whose HTTP side is
light next to the engine, not the default.

Deviations from the in-process engine: ``queue_depth()`` / ``num_active()`` / ``stats`` are the
child's last snapshot (at most 50 ms old while it decodes); a child that dies fails its in-flight requests with
``finish_reason="error"`` and later submissions with a one-line error.
"""
from __future__ import annotations

import itertools
import multiprocessing as mp
import os
import signal
import threading
import time
from typing import Any, Callable

import torch

from tinyseek.errors import UserError
from tinyseek.serve.engine import (AsyncCalls, Completion, Engine, SamplingParams, StreamEvent, _notify, check_params,
                                   check_prompt)
from tinyseek.serve.loading import find_tokenizer, load_for_serving
from tinyseek.tokenizer import load_tokenizer

STATS_EVERY_S = 0.05      # step records and the status snapshot go at least this often while decoding
_START_TIMEOUT_S = 600.0  # loading a big checkpoint (and compiling the C kernels) may take a while


def parse_cpus(spec: str, available: list[int]) -> list[int] | None:
    """The CPUs for the engine process from ``--engine-cpus``: ``""`` = no pinning (None);
    ``"auto"`` = all but the last of ``available`` when there are at least two (the HTTP side keeps
    the last one), else None; or a list such as ``"0"`` / ``"0-2,5"`` (each one available, at least
    one left for the HTTP side).

    >>> parse_cpus("auto", [0, 1]), parse_cpus("auto", [0]), parse_cpus("", [0, 1]), parse_cpus("0-1,3", [0, 1, 2, 3])
    ([0], None, None, [0, 1, 3])
    """
    if spec == "":
        return None
    if spec == "auto":
        return available[:-1] if len(available) >= 2 else None
    cpus: set[int] = set()
    try:
        for part in spec.split(","):
            lo, _, hi = part.strip().partition("-")
            cpus.update(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise UserError(f"engine_cpus must be auto, empty or a CPU list like 0-2,5; got {spec!r}") from None
    bad = sorted(cpus - set(available))
    if not cpus or bad:
        raise UserError(f"engine_cpus {spec!r}: CPU(s) {bad or spec} not available (this process may use {available})")
    if len(cpus) >= len(available):
        raise UserError(f"engine_cpus {spec!r} leaves no CPU for the HTTP side (available: {available})")
    return sorted(cpus)


def available_cpus() -> list[int]:
    """The CPUs this process may run on (all of them where affinity is not supported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pin(cpus: list[int] | None) -> None:
    """Pin the calling thread (and the threads it starts later) to ``cpus`` (None: leave as is)."""
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)


def pin_process(cpus: list[int]) -> None:
    """Pin every thread of this process (Linux: ``/proc/self/task``) and the ones started later."""
    pin(cpus)
    try:
        tids = [int(t) for t in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in tids:
        try:
            os.sched_setaffinity(tid, cpus)
        except OSError:  # a thread that just ended
            pass


# ---------------------------------------------------------------------------------------------
# child side
# ---------------------------------------------------------------------------------------------
class _ChildEngine(Engine):
    """The engine inside the child: listeners fill an outbox, sent once per scheduler step."""

    def __init__(self, *a, send: Callable[[tuple], None], **kw):
        super().__init__(*a, **kw)
        self._send = send
        self._outbox: list[tuple[int, StreamEvent]] = []
        self._steps: list[tuple[int, float]] = []
        self._last_send = 0.0
        self.step_listeners.append(lambda b, dt: self._steps.append((b, dt)))

    def step(self) -> None:
        super().step()
        self.flush(force=False)

    def flush(self, force: bool = True) -> None:
        """Send the outbox: at once when it holds events, else (step records only) at most every
        ``STATS_EVERY_S`` (a message per step would cost the parent's reader more than it is worth)."""
        now = time.monotonic()
        if not (self._outbox or (self._steps and (force or now - self._last_send >= STATS_EVERY_S))):
            return
        self._last_send = now
        events, self._outbox = self._outbox, []
        steps, self._steps = self._steps, []
        self._send(("step", events, steps, self.snapshot()))

    def snapshot(self) -> dict:
        return {"active": self.num_active(), "queued": self.queue_depth(), "stats": dict(self.stats),
                "prefill_seconds": self.prefill_seconds}


def _child_main(conn, spec: dict) -> None:
    # Ctrl-C in a terminal signals the whole process group: the parent's graceful shutdown tells us
    # when to stop (after draining), and a parent that dies closes the pipe, which stops us too
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if spec.get("cpus"):
        pin(spec["cpus"])
        if "OMP_NUM_THREADS" not in os.environ:  # one torch thread per CPU it may use
            torch.set_num_threads(len(spec["cpus"]))
    lock = threading.Lock()

    def send(msg: tuple) -> None:
        with lock:
            conn.send(msg)

    try:
        model, tok, meta = load_for_serving(spec["ckpt"], spec["tokenizer"], spec["device"], spec["dtype"])
        tok_spec = spec["tokenizer"] or find_tokenizer(spec["ckpt"], meta)
        engine = _ChildEngine(model, tok, max_batch=spec["max_batch"], max_len=spec["max_len"] or None,
                              max_wait=spec["max_wait"], mix_prefill=spec["mix_prefill"], send=send)
    except Exception as e:  # a bad checkpoint / tokenizer: one line back to the parent
        send(("failed", f"{e}" if isinstance(e, UserError) else f"{type(e).__name__}: {e}"))
        return
    send(("ready", {"max_len": engine.max_len, "device": str(engine.device), "vocab_size": model.cfg.vocab_size,
                    "tokenizer": tok_spec, "snapshot": engine.snapshot()}))
    engine.start()
    reqs: dict[int, Any] = {}
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):  # the parent is gone: stop at once
            engine.stop(drain=False, timeout=5)
            return
        kind = msg[0]
        if kind == "submit":
            _, rid, prompt, params, timeout, holds, stream = msg

            def listener(r, ev, rid=rid):
                engine._outbox.append((rid, ev))
                if ev.finished:
                    reqs.pop(rid, None)
            try:
                reqs[rid] = engine.submit(prompt, params, listener, timeout=timeout, holds=holds, stream=stream)
            except UserError as e:
                send(("rejected", rid, str(e)))
        elif kind == "cancel":
            r = reqs.get(msg[1])
            if r is not None:
                r.cancel()
        elif kind == "stop":
            engine.stop(drain=msg[1], timeout=msg[2])
            engine.flush()
            send(("stopped", engine.snapshot()))
            return


# ---------------------------------------------------------------------------------------------
# parent side
# ---------------------------------------------------------------------------------------------
class _Handle:
    """A request in the child as the parent sees it (what ``Engine.submit``'s Request is in-process):
    ``done`` once its last event arrived, ``cancel()`` asks the child to stop it."""
    __slots__ = ("_engine", "rid", "listener", "done", "left")

    def __init__(self, engine: "ProcessEngine", rid: int, listener, n: int = 1):
        self._engine, self.rid, self.listener, self.done = engine, rid, listener, False
        self.left = n  # samples not finished yet

    def cancel(self) -> None:
        self._engine._cancel(self.rid)


class ProcessEngine(AsyncCalls):
    """An :class:`~tinyseek.serve.engine.Engine` in a child process, driven over a pipe (see the
    module docstring). Blocks until the child has loaded the checkpoint; a checkpoint that does not
    load raises :class:`UserError` with the child's message. ``cpus``: pin the child to these CPUs
    (and, unless ``OMP_NUM_THREADS`` is set, give it one torch thread per CPU); None = no pinning."""

    def __init__(self, ckpt: str, tokenizer: str = "", device: str = "auto", dtype: str = "auto",
                 max_batch: int = 16, max_len: int = 0, max_wait: float = 0.0, cpus: list[int] | None = None,
                 mix_prefill: bool = True):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe(duplex=True)
        spec = {"ckpt": ckpt, "tokenizer": tokenizer, "device": device, "dtype": dtype, "max_batch": max_batch,
                "max_len": max_len, "max_wait": max_wait, "cpus": cpus, "mix_prefill": mix_prefill}
        self._proc = ctx.Process(target=_child_main, args=(child, spec), name="tinyseek-engine", daemon=True)
        self._proc.start()
        child.close()
        if not self._conn.poll(_START_TIMEOUT_S):
            self._proc.kill()
            raise UserError(f"the engine process did not start in {_START_TIMEOUT_S:.0f} s")
        try:
            msg = self._conn.recv()
        except EOFError:
            self._proc.join(5)
            raise UserError(f"the engine process exited while loading (exit code {self._proc.exitcode})") from None
        if msg[0] == "failed":
            self._proc.join(5)
            raise UserError(msg[1])
        info = msg[1]
        self.cpus = cpus
        self.max_len: int = info["max_len"]
        self.max_batch = max_batch
        self.device: str = info["device"]
        self.vocab_size: int = info["vocab_size"]
        self.tokenizer = load_tokenizer(info["tokenizer"]) if info["tokenizer"] else None
        self._snap = info["snapshot"]
        self.step_listeners: list[Callable[[int, float], None]] = []
        self._pending: dict[int, _Handle] = {}
        self._ids = itertools.count()
        self._lock = threading.Lock()   # guards _pending and sends
        self._alive = True
        self._stopped = threading.Event()
        self._reader = threading.Thread(target=self._read_loop, name="tinyseek-engine-reader", daemon=True)
        self._reader.start()

    # --- the Engine surface the server uses ----------------------------------------------
    @property
    def stats(self) -> dict:
        return self._snap["stats"]

    @property
    def prefill_seconds(self) -> float:
        return self._snap["prefill_seconds"]

    def num_active(self) -> int:
        return self._snap["active"]

    def queue_depth(self) -> int:
        return self._snap["queued"]

    def start(self) -> "ProcessEngine":
        return self  # the child's scheduler runs from the start

    def stop(self, drain: bool = True, timeout: float | None = None) -> None:
        """Stop the child (finishing or cancelling what it holds, as ``Engine.stop``) and wait for it."""
        with self._lock:
            if self._alive:
                try:
                    self._conn.send(("stop", drain, timeout))
                except OSError:
                    pass
        self._stopped.wait((timeout or 0) + 30)
        self._proc.join(10)
        if self._proc.is_alive():
            self._proc.kill()
            self._proc.join(5)
        self._reader.join(5)
        self._fail_pending("the engine process stopped")

    def submit(self, prompt: list[int], params: SamplingParams | None = None,
               listener: Callable[[Any, StreamEvent], None] | None = None,
               timeout: float | None = None, holds: list[str] | None = None, stream: bool = True) -> _Handle:
        """Queue one prompt in the child; returns its handle. ``listener(handle, event)`` runs on
        the reader thread (with ``stream=False`` only once, at the end)."""
        params = check_params((params or SamplingParams()).validate(), self.max_batch, self.vocab_size)
        prompt = check_prompt(prompt, self.max_len, self.vocab_size)
        if params.stop and self.tokenizer is None:
            raise UserError("stop strings need an engine with a tokenizer")
        with self._lock:
            if not self._alive:
                raise UserError("the engine process is not running")
            h = _Handle(self, next(self._ids), listener, params.n)
            self._pending[h.rid] = h
            self._conn.send(("submit", h.rid, prompt, params, timeout, holds, stream))
        return h

    def _cancel(self, rid: int) -> None:
        with self._lock:
            if self._alive and rid in self._pending:
                self._conn.send(("cancel", rid))

    # --- reader thread -------------------------------------------------------------------
    def _read_loop(self) -> None:
        try:
            while True:
                msg = self._conn.recv()
                kind = msg[0]
                if kind == "step":
                    _, events, steps, snap = msg
                    self._snap = snap
                    for b, dt in steps:
                        for cb in self.step_listeners:
                            cb(b, dt)
                    for rid, ev in events:
                        self._deliver(rid, ev)
                elif kind == "rejected":  # the child refused a request the parent's checks let through
                    _, rid, err = msg
                    self._deliver(rid, _error_event(err))
                elif kind == "stopped":
                    self._snap = msg[1]
                    break
        except (EOFError, OSError):
            pass
        finally:
            with self._lock:
                self._alive = False
            self._fail_pending("the engine process exited")
            self._stopped.set()

    def _deliver(self, rid: int, ev: StreamEvent) -> None:
        with self._lock:
            h = self._pending.get(rid)
            if h is not None and ev.finished:
                h.left -= 1
                if h.left <= 0 or ev.completion.finish_reason == "error":
                    del self._pending[rid]
        if h is not None:
            self._hand_over(h, ev)

    def _fail_pending(self, why: str) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for h in pending.values():
            self._hand_over(h, _error_event(why))

    @staticmethod
    def _hand_over(h: _Handle, ev: StreamEvent) -> None:
        if ev.finished and (h.left <= 0 or ev.completion.finish_reason == "error"):
            h.done = True
        if h.listener is not None:
            _notify(h, ev)  # a broken listener (closed event loop) cancels its request, as in Engine


def _error_event(msg: str) -> StreamEvent:
    c = Completion([], None, "error", error=msg)
    return StreamEvent([], "", True, c)

