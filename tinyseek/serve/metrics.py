"""Minimal Prometheus text-format metrics (counters, gauges, histograms), thread-safe.

We write the exposition format ourselves (a few dozen lines) instead of depending on
``prometheus_client``. Gauges may be callables evaluated at scrape time (queue depth, batch size).
"""
from __future__ import annotations

import bisect
import threading
import time
from collections import deque
from typing import Callable


def _labels(names: tuple[str, ...], values: tuple[str, ...], extra: str = "") -> str:
    """Render a label set.

    >>> _labels(("a", "b"), ("1", 'x"y'))
    '{a="1",b="x\\\\"y"}'
    >>> _labels((), ())
    ''
    """
    parts = [f'{n}="{_esc(v)}"' for n, v in zip(names, values)]
    if extra:
        parts.append(extra)
    return "{" + ",".join(parts) + "}" if parts else ""


def _esc(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Metric:
    kind = ""

    def __init__(self, name: str, help: str, labelnames: tuple[str, ...] = ()):
        self.name, self.help, self.labelnames = name, help, tuple(labelnames)
        self._lock = threading.Lock()

    def header(self) -> list[str]:
        return [f"# HELP {self.name} {self.help}", f"# TYPE {self.name} {self.kind}"]


class Counter(_Metric):
    kind = "counter"

    def __init__(self, name, help, labelnames=()):
        super().__init__(name, help, labelnames)
        self._v: dict[tuple, float] = {}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            self._v[key] = self._v.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._v.get(tuple(str(labels[n]) for n in self.labelnames), 0.0)

    def render(self) -> list[str]:
        with self._lock:
            items = sorted(self._v.items())
        if not items and not self.labelnames:
            items = [((), 0.0)]
        return self.header() + [f"{self.name}{_labels(self.labelnames, k)} {v:g}" for k, v in items]


class Gauge(_Metric):
    kind = "gauge"

    def __init__(self, name, help, fn: Callable[[], float] | None = None):
        super().__init__(name, help)
        self.fn = fn
        self._v = 0.0

    def set(self, v: float) -> None:
        self._v = float(v)

    def render(self) -> list[str]:
        v = self.fn() if self.fn is not None else self._v
        return self.header() + [f"{self.name} {float(v):g}"]


class Histogram(_Metric):
    kind = "histogram"

    def __init__(self, name, help, buckets: list[float], labelnames=()):
        super().__init__(name, help, labelnames)
        self.buckets = sorted(buckets)
        self._v: dict[tuple, list] = {}  # key -> [bucket counts..., sum, count]

    def observe(self, x: float, **labels: str) -> None:
        key = tuple(str(labels[n]) for n in self.labelnames)
        with self._lock:
            st = self._v.setdefault(key, [0] * len(self.buckets) + [0.0, 0])
            i = bisect.bisect_left(self.buckets, x)
            if i < len(self.buckets):
                st[i] += 1
            st[-2] += x
            st[-1] += 1

    def count(self, **labels: str) -> int:
        st = self._v.get(tuple(str(labels[n]) for n in self.labelnames))
        return st[-1] if st else 0

    def render(self) -> list[str]:
        lines = self.header()
        with self._lock:
            items = sorted((k, list(v)) for k, v in self._v.items())
        for key, st in items:
            cum = 0
            for b, c in zip(self.buckets, st):
                cum += c
                le = _labels(self.labelnames, key, 'le="%g"' % b)
                lines.append(f"{self.name}_bucket{le} {cum}")
            le = _labels(self.labelnames, key, 'le="+Inf"')
            lines.append(f"{self.name}_bucket{le} {st[-1]}")
            lines.append(f"{self.name}_sum{_labels(self.labelnames, key)} {st[-2]:g}")
            lines.append(f"{self.name}_count{_labels(self.labelnames, key)} {st[-1]}")
        return lines


class RateWindow:
    """Events per second over the last ``window`` seconds (e.g. generated tokens/s)."""

    def __init__(self, window: float = 10.0):
        self.window = window
        self._ev: deque[tuple[float, float]] = deque()
        self._lock = threading.Lock()

    def add(self, n: float, now: float | None = None) -> None:
        with self._lock:
            self._ev.append((now if now is not None else time.monotonic(), n))

    def rate(self, now: float | None = None) -> float:
        now = now if now is not None else time.monotonic()
        with self._lock:
            while self._ev and self._ev[0][0] < now - self.window:
                self._ev.popleft()
            total = sum(n for _, n in self._ev)
        return total / self.window


class Registry:
    def __init__(self):
        self.metrics: list[_Metric] = []

    def add(self, m: _Metric) -> _Metric:
        self.metrics.append(m)
        return m

    def render(self) -> str:
        return "\n".join(line for m in self.metrics for line in m.render()) + "\n"


LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120]


class ServerMetrics:
    """The serving metrics, wired to an engine's queue and batch for the gauges."""

    def __init__(self, engine=None):
        r = self.registry = Registry()
        self.requests = r.add(Counter("tinyseek_requests_total", "HTTP requests by endpoint and status code",
                                      ("endpoint", "status")))
        self.latency = r.add(Histogram("tinyseek_request_latency_seconds", "Request latency (to the last byte)",
                                       LATENCY_BUCKETS, ("endpoint",)))
        self.ttft = r.add(Histogram("tinyseek_time_to_first_token_seconds", "Time to first generated token",
                                    LATENCY_BUCKETS))
        self.prompt_tokens = r.add(Counter("tinyseek_prompt_tokens_total", "Prompt tokens processed"))
        self.completion_tokens = r.add(Counter("tinyseek_completion_tokens_total", "Tokens generated"))
        self.refusals = r.add(Counter("tinyseek_safety_refusals_total", "Requests refused by the safety filter",
                                      ("stage",)))
        self.batch = r.add(Histogram("tinyseek_batch_size", "Requests decoded together per engine step",
                                     [1, 2, 4, 8, 16, 32, 64, 128]))
        self.step_time = r.add(Histogram("tinyseek_decode_step_seconds", "Time of one batched decode step",
                                         [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1]))
        self._rate = RateWindow(10.0)
        r.add(Gauge("tinyseek_tokens_per_second", "Generated tokens per second over the last 10 s", self._rate.rate))
        if engine is not None:
            r.add(Gauge("tinyseek_queue_depth", "Requests waiting for a batch slot", engine.queue_depth))
            r.add(Gauge("tinyseek_active_requests", "Requests in the running batch", engine.num_active))
            engine.step_listeners.append(self.on_step)
            for key, help in (("prefills", "Admissions of new prompts: prefill forwards and mixed steps (each admits one or more requests)"),
                              ("prefill_tokens", "Prompt tokens prefilled")):
                r.add(Gauge(f"tinyseek_{key}_total", help, lambda key=key: engine.stats[key]))
            r.add(Gauge("tinyseek_prefill_seconds_total", "Time spent in prefill forwards (mixed steps count as decode steps)",
                        lambda: engine.prefill_seconds))

    def on_step(self, batch_size: int, seconds: float) -> None:
        self.batch.observe(batch_size)
        self.step_time.observe(seconds)
        self._rate.add(batch_size)

    def render(self) -> str:
        return self.registry.render()
