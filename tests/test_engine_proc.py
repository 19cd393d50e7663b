"""The engine in a child process (tinyseek/serve/engine_proc.py) == the in-process engine."""
from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from serve_fixtures import make_model
from test_server import model, run_dir, tok  # noqa: F401  (the same fixtures)
from tinyseek.errors import UserError
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.serve.engine_proc import ProcessEngine

PROMPTS = ["hello", "the quick brown fox", "a", "12+7=", "xyz" * 5]


@pytest.fixture(scope="module")
def peng(run_dir):
    eng = ProcessEngine(str(run_dir), device="cpu", max_batch=4, max_wait=0.002)
    yield eng
    eng.stop(drain=False, timeout=5)


def _wait(cond, timeout=20.0):
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.01)


def test_same_greedy_completions_as_in_process(peng, model, tok):
    sp = SamplingParams(max_tokens=8, ignore_eos=True)
    ref = Engine(model, tok, max_batch=4).generate([tok.encode(p) for p in PROMPTS], sp)

    async def run():
        return await asyncio.gather(*(peng.acomplete(tok.encode(p), sp) for p in PROMPTS))
    got = asyncio.run(run())
    assert [c.token_ids for c in got] == [c.token_ids for c in ref]
    assert [c.text for c in got] == [c.text for c in ref] and all(c.finish_reason == "length" for c in got)
    assert peng.max_len == model.cfg.max_seq_len and peng.tokenizer.vocab_size == tok.vocab_size
    _wait(lambda: peng.stats["finished"] >= len(PROMPTS))  # the child's counters reach the parent
    assert peng.stats["decode_tokens"] >= len(PROMPTS) * 7


def test_stream_events_stop_string_and_step_listeners(peng, tok):
    steps = []
    peng.step_listeners.append(lambda b, dt: steps.append((b, dt)))
    sp = SamplingParams(max_tokens=12, ignore_eos=True, seed=3, temperature=1.0)

    async def run():
        return [ev async for ev in peng.astream(tok.encode("hello"), sp)]
    evs = asyncio.run(run())
    peng.step_listeners.clear()
    assert evs[-1].finished and not any(e.finished for e in evs[:-1])
    c = evs[-1].completion
    assert "".join(e.text for e in evs) == c.text and sum(len(e.token_ids) for e in evs) == len(c.token_ids) == 12
    assert steps and all(b >= 1 and dt > 0 for b, dt in steps)
    ref = Engine(make_model(tok), tok, max_batch=1).generate([tok.encode("hello")], sp)[0]
    assert c.token_ids == ref.token_ids        # seeded sampling: the same tokens in either process
    stop = c.text[3:5]
    if stop.strip():
        sp2 = SamplingParams(max_tokens=12, ignore_eos=True, seed=3, temperature=1.0, stop=[stop])
        c2 = asyncio.run(peng.acomplete(tok.encode("hello"), sp2))
        assert c2.finish_reason == "stop" and stop not in c2.text


def test_bad_requests_and_cancel(peng, tok):
    with pytest.raises(UserError, match="empty"):
        peng.submit([], SamplingParams())
    with pytest.raises(UserError, match="limit"):
        peng.submit([1] * peng.max_len, SamplingParams())
    with pytest.raises(UserError, match="max_tokens"):
        peng.submit([1, 2], SamplingParams(max_tokens=0))

    async def leave_early():
        n = 0
        async for _ in peng.astream(tok.encode("hello"), SamplingParams(max_tokens=10_000, ignore_eos=True)):
            n += 1
            if n == 3:
                break
    asyncio.run(leave_early())
    _wait(lambda: peng.num_active() == 0 and peng.queue_depth() == 0)  # cancelled in the child


def test_bad_checkpoint_is_a_one_line_error(tmp_path):
    (tmp_path / "ckpt").mkdir()
    with pytest.raises(UserError) as e:
        ProcessEngine(str(tmp_path), device="cpu")
    assert "\n" not in str(e.value)


def test_stop_drains_then_refuses_and_a_dead_child_fails_requests(run_dir, tok):
    eng = ProcessEngine(str(run_dir), device="cpu", max_batch=2)
    got = {}

    def keep(_r, ev):
        if ev.finished:
            got["c"] = ev.completion
    eng.submit(tok.encode("hello"), SamplingParams(max_tokens=30, ignore_eos=True), keep, stream=False)
    os.kill(eng._proc.pid, signal.SIGINT)  # Ctrl-C reaches the child too: it waits for the parent's stop
    eng.stop(drain=True, timeout=30)
    assert got["c"].finish_reason == "length" and len(got["c"].token_ids) == 30  # finished, not dropped
    with pytest.raises(UserError, match="not running"):
        eng.submit(tok.encode("hello"))
    eng = ProcessEngine(str(run_dir), device="cpu", max_batch=2)
    eng.submit(tok.encode("hello"), SamplingParams(max_tokens=100_000, ignore_eos=True), keep, stream=False)
    os.kill(eng._proc.pid, signal.SIGKILL)
    _wait(lambda: got["c"].finish_reason == "error")
    assert "exited" in got["c"].error
    eng.stop(timeout=1)
    assert not eng._proc.is_alive()


def test_engine_cpus_pin_the_child_and_bad_lists_are_one_line_errors(run_dir):
    from tinyseek.serve.engine_proc import available_cpus, parse_cpus

    avail = available_cpus()
    for bad in ("0-x", "999999", ",".join(map(str, avail))):  # not a list, not available, none left
        with pytest.raises(UserError):
            parse_cpus(bad, avail)
    if len(avail) < 2 or not hasattr(os, "sched_getaffinity"):
        pytest.skip("needs two CPUs and Linux affinity")
    eng = ProcessEngine(str(run_dir), device="cpu", max_batch=1, cpus=avail[:1])
    try:
        assert os.sched_getaffinity(eng._proc.pid) == set(avail[:1])
        assert os.sched_getaffinity(0) == set(avail)      # the parent is left alone
    finally:
        eng.stop(timeout=5)


def test_n_samples_and_logprobs_through_the_child(peng, model, tok):
    """n > 1 (one prefill, forked) and logprob records cross the pipe: the same as in-process."""
    sp = SamplingParams(max_tokens=5, temperature=1.0, seed=4, n=3, logprobs=2, prompt_logprobs=1, ignore_eos=True)
    ids = tok.encode("hello")

    async def run():
        done = await peng.acomplete_all(ids, sp)
        streamed: dict[int, list[int]] = {}
        async for ev in peng.astream(ids, sp):
            streamed.setdefault(ev.index, []).extend(ev.token_ids)
        return done, streamed
    done, streamed = asyncio.run(run())
    eng = Engine(model, tok, max_batch=4)
    req = eng.submit(ids, sp)
    while not req.done:
        eng.step()
    local = req.results()
    assert [c.token_ids for c in done] == [c.token_ids for c in local] == [streamed[i] for i in range(3)]
    assert [len(c.logprobs) for c in done] == [5, 5, 5] and done[0].prompt_logprobs[0] is None
    assert all(abs(a[1] - b[1]) < 1e-4 for c, d in zip(done, local) for a, b in zip(c.logprobs, d.logprobs))
