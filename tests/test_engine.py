"""Serving engine: batching invariance, sampling parameters, stops, limits, scheduler, streaming."""
from __future__ import annotations

import asyncio
import threading
import time

import pytest
import torch

from serve_fixtures import make_model, make_tokenizer
from tinyseek.errors import UserError
from tinyseek.serve.detok import TextTracker
from tinyseek.serve import engine as engine_mod
from tinyseek.serve.engine import Engine, SamplingParams

PROMPTS = ["hello", "the quick brown fox jumps", "a", "12+7=", "what is love? baby don't hurt me", "xyz" * 7]


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return make_model(tok)


def reference_greedy(model, ids: list[int], n: int) -> list[int]:
    """Plain greedy decoding without a cache: full forward over the growing sequence each step."""
    seq = list(ids)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    return seq[len(ids):]


def test_greedy_matches_uncached_reference(model, tok):
    eng = Engine(model, tok, max_batch=4)
    ids = tok.encode(PROMPTS[1])
    out = eng.generate([ids], SamplingParams(max_tokens=12, ignore_eos=True))[0]
    assert out.token_ids == reference_greedy(model, ids, 12)
    assert out.finish_reason == "length" and out.prompt_tokens == len(ids)


@pytest.mark.parametrize("attn", ["mla", "mla-naive", "gqa"])
def test_greedy_alone_equals_batched(tok, attn):
    model = make_model(tok, seed=1, attn=attn.split("-")[0])
    if attn == "mla-naive":  # decode re-expanding the latent cache instead of the absorbed form
        for b in model.blocks:
            b.attn.impl = "naive"
    eng = Engine(model, tok, max_batch=4)  # fewer slots than prompts: requests join as others leave
    prompts = [tok.encode(p) for p in PROMPTS]
    lengths = [7, 20, 3, 15, 11, 9]  # different lengths so the batch changes shape while decoding
    params = [SamplingParams(max_tokens=n, ignore_eos=True) for n in lengths]
    alone = [Engine(model, tok, max_batch=1).generate([p], sp)[0] for p, sp in zip(prompts, params)]
    batched = eng.generate(prompts, params)
    for a, b, n in zip(alone, batched, lengths):
        assert a.token_ids == b.token_ids and len(a.token_ids) == n
        assert a.text == b.text
    # the slots of finished requests were reused and left empty
    assert eng.num_active() == 0 and eng.queue_depth() == 0 and int(eng.cache.lengths.sum()) == 0
    # all admitted at once but prefilled in several small chunks (budget = max_len = 64 padded tokens)
    chunked = Engine(model, tok, max_batch=8, max_len=64, prefill_tokens=0).generate(prompts, params)
    assert [c.token_ids for c in chunked] == [a.token_ids for a in alone]


def test_absorbed_and_naive_mla_decode_agree(tok):
    """Greedy tokens of the default (absorbed) MLA decode equal those of the naive form."""
    model = make_model(tok, seed=2)
    prompts = [tok.encode(p) for p in PROMPTS]
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    absorbed = [c.token_ids for c in Engine(model, tok, max_batch=8).generate(prompts, sp)]
    for b in model.blocks:
        b.attn.impl = "naive"
    naive = [c.token_ids for c in Engine(model, tok, max_batch=8).generate(prompts, sp)]
    assert absorbed == naive and len(set(map(tuple, absorbed))) > 1


def test_seeded_sampling_independent_of_batch(model, tok):
    prompts = [tok.encode(p) for p in PROMPTS[:4]]
    sp = [SamplingParams(max_tokens=10, temperature=1.0, top_p=0.9, top_k=50, seed=100 + i, ignore_eos=True)
          for i in range(4)]
    alone = [Engine(model, tok, max_batch=1).generate([p], s)[0].token_ids for p, s in zip(prompts, sp)]
    batched = [c.token_ids for c in Engine(model, tok, max_batch=8).generate(prompts, sp)]
    assert alone == batched
    # a different seed gives a different sample; the same seed reproduces it
    again = Engine(model, tok, max_batch=2).generate(prompts[:1], sp[0])[0].token_ids
    other = Engine(model, tok, max_batch=2).generate(
        prompts[:1], SamplingParams(max_tokens=10, temperature=1.0, seed=7, ignore_eos=True))[0].token_ids
    assert again == alone[0] and other != alone[0]


def test_top_k_one_and_zero_temperature_are_greedy(model, tok):
    ids = tok.encode("hello")
    eng = Engine(model, tok, max_batch=2)
    g = eng.generate([ids], SamplingParams(max_tokens=8, ignore_eos=True))[0].token_ids
    k1 = eng.generate([ids], SamplingParams(max_tokens=8, temperature=1.5, top_k=1, seed=3, ignore_eos=True))[0]
    assert k1.token_ids == g


def test_top_k_restricts_sampled_tokens(model, tok):
    ids = tok.encode("hello")
    eng = Engine(model, tok, max_batch=4)
    with torch.no_grad():
        top3 = set(model(torch.tensor([ids])).logits[0, -1].topk(3).indices.tolist())
    firsts = {c.token_ids[0] for c in eng.generate(
        [ids] * 40, [SamplingParams(max_tokens=1, temperature=5.0, top_k=3, seed=s) for s in range(40)])}
    assert firsts <= top3 and len(firsts) >= 2


def test_max_tokens_and_eos(model, tok):
    eng = Engine(model, tok, max_batch=2)
    ids = tok.encode("abc")
    out = eng.generate([ids], SamplingParams(max_tokens=5, ignore_eos=True))[0]
    assert len(out.token_ids) == 5 and out.finish_reason == "length"
    # make the model's greedy choice the eos token: generation stops there, eos not in the text
    first = out.token_ids[0]
    eng2 = Engine(model, tok, max_batch=2, eos_id=first)
    out2 = eng2.generate([ids], SamplingParams(max_tokens=5))[0]
    assert out2.token_ids == [first] and out2.finish_reason == "stop" and out2.stop == first
    assert out2.text == ""
    # stop_token_ids works the same way without touching eos
    third = out.token_ids[2]
    out3 = eng.generate([ids], SamplingParams(max_tokens=5, stop_token_ids=[third], ignore_eos=True))[0]
    assert out3.token_ids == out.token_ids[:out.token_ids.index(third) + 1] and out3.finish_reason == "stop"


def test_stop_strings_cut_text(model, tok):
    eng = Engine(model, tok, max_batch=2)
    ids = tok.encode("the quick brown fox jumps")
    full = eng.generate([ids], SamplingParams(max_tokens=24, ignore_eos=True))[0]
    text = full.text
    assert len(text) >= 6
    stop = text[4:6]  # a stop string that first appears somewhere in the middle
    cut = text.find(stop)
    out = eng.generate([ids], SamplingParams(max_tokens=24, stop=[stop, "never-appears"], ignore_eos=True))[0]
    assert out.finish_reason == "stop" and out.stop == stop
    assert out.text == text[:cut] and stop not in out.text
    assert len(out.token_ids) < len(full.token_ids)
    assert out.token_ids == full.token_ids[:len(out.token_ids)]


def test_cache_end_finishes_with_length(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=16)
    out = eng.generate([tok.encode("0123456789")], SamplingParams(max_tokens=100, ignore_eos=True))[0]
    assert out.finish_reason == "length" and 10 + len(out.token_ids) == 16


def test_bad_requests_raise_user_errors(model, tok):
    eng = Engine(model, tok, max_batch=2, max_len=16)
    with pytest.raises(UserError, match="limit"):
        eng.submit(list(range(20)), SamplingParams())
    with pytest.raises(UserError, match="empty"):
        eng.submit([], SamplingParams())
    with pytest.raises(UserError, match="max_tokens"):
        eng.submit([1, 2], SamplingParams(max_tokens=-1))
    with pytest.raises(UserError, match="token ids"):
        eng.submit([10 ** 6], SamplingParams())
    with pytest.raises(UserError, match="top_p"):
        eng.submit([1, 2], SamplingParams(top_p=0))
    with pytest.raises(UserError, match="tokenizer"):
        Engine(model, None).submit([1, 2], SamplingParams(stop=["x"]))
    assert eng.queue_depth() == 0


def test_no_tokenizer_batch_api(model, tok):
    """The GRPO/eval path: token ids in, token ids out, eos given explicitly."""
    eng = Engine(model, None, max_batch=3, eos_id=tok.eos_id)
    outs = eng.generate([[5, 6, 7]] * 5, SamplingParams(max_tokens=6, temperature=1.0, seed=1))
    assert len(outs) == 5 and all(o.text is None and 1 <= len(o.token_ids) <= 6 for o in outs)
    assert len({tuple(o.token_ids) for o in outs}) == 1  # same prompt, same seed -> same sample


def test_background_scheduler_admits_into_running_batch(model, tok):
    eng = Engine(model, tok, max_batch=4, max_wait=0.01).start()
    sizes = []
    eng.step_listeners.append(lambda n, dt: sizes.append(n))
    try:
        long = eng.submit(tok.encode("hello"), SamplingParams(max_tokens=40, ignore_eos=True))
        while not long.token_ids:
            time.sleep(0.001)
        late = eng.submit(tok.encode("a"), SamplingParams(max_tokens=5, ignore_eos=True))  # joins mid-flight
        c_late, c_long = late.result(30), long.result(30)
        assert len(c_long.token_ids) == 40 and len(c_late.token_ids) == 5
        assert 2 in sizes  # decoded together with the long one
        assert late.finished_at < long.finished_at
        # and the late request's tokens equal what it gets alone
        assert c_late.token_ids == Engine(model, tok, max_batch=1).generate(
            [tok.encode("a")], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids
        # generate() from another thread goes through the running scheduler
        outs = eng.generate([tok.encode(p) for p in PROMPTS], SamplingParams(max_tokens=3, ignore_eos=True))
        assert all(len(o.token_ids) == 3 for o in outs)
    finally:
        eng.stop()
    assert eng._thread is None


def test_idle_engine_gathers_a_burst_but_not_a_lone_request(model, tok):
    """Requests arriving together are prefilled in one forward (a full batch starts at once); a lone
    request waits only the quiet gap (max_wait / 4), not the whole max_wait."""
    eng = Engine(model, tok, max_batch=4, max_wait=3.0)
    sp = SamplingParams(max_tokens=2, ignore_eos=True)
    with eng._cv:  # the scheduler thread cannot look at the queue until all four are in
        eng.start()
        burst = [eng.submit(tok.encode(p), sp) for p in PROMPTS[:4]]
    try:
        assert all(len(r.result(30).token_ids) == 2 for r in burst)
        assert eng.stats["prefills"] == 1
        t0 = time.monotonic()
        lone = eng.submit(tok.encode("hello"), sp).result(30)
        assert lone.first_token_s < 2.5 and time.monotonic() - t0 >= 0.75 - 0.05  # the gap, not 3 s
    finally:
        eng.stop()


class FakeClock:
    """Stands in for the ``time`` module inside the engine: ``monotonic()`` is ``now``, set by the test."""

    def __init__(self, now: float = 1000.0):
        self.now = now

    def monotonic(self) -> float:
        return self.now

    def __getattr__(self, name):
        return getattr(time, name)


def test_busy_engine_coalesces_trickling_arrivals_into_one_prefill(model, tok, monkeypatch):
    """While rows decode, requests that arrive one by one wait (at most max_wait) until they fill
    the free slots and share one prefill; the running row keeps decoding meanwhile."""
    sp = SamplingParams(max_tokens=60, ignore_eos=True)
    # (with mixed prefill a busy engine admits at once: see test_mixed_step_...)
    eng = Engine(model, tok, max_batch=4, max_wait=30.0, mix_prefill=False)
    long = eng.submit(tok.encode("hello"), sp)
    eng.step()
    assert eng.stats["prefills"] == 1
    late = []
    for p in PROMPTS[1:4]:
        late.append(eng.submit(tok.encode(p), sp))
        steps = eng.stats["steps"]
        eng.step()
        assert eng.stats["steps"] == steps + 1  # the running row decoded
        if len(late) < 3:
            assert eng.stats["prefills"] == 1 and all(r.slot is None for r in late)
    assert eng.stats["prefills"] == 2 and all(r.slot is not None for r in late)  # 3 queued = 3 free: one prefill
    assert len(long.token_ids) == 5  # prefill token + 4 decode steps
    # without max_wait (generate() for GRPO / eval) nothing is held back
    eng = Engine(model, tok, max_batch=4, mix_prefill=False)
    eng.submit(tok.encode("hello"), sp)
    eng.step()
    lone = eng.submit(tok.encode("a"), sp)
    eng.step()
    assert lone.slot is not None
    # once arrivals pause for max_wait / 4 the waiting ones are admitted (here 0.1 s, not max_wait);
    # the engine reads a fake clock here, so how busy the machine is cannot change the outcome
    clock = FakeClock()
    monkeypatch.setattr(engine_mod, "time", clock)
    eng = Engine(model, tok, max_batch=4, max_wait=0.4, mix_prefill=False)
    eng.submit(tok.encode("hello"), sp)
    eng.step()
    lone = eng.submit(tok.encode("a"), sp)
    clock.now += 0.05
    eng.step()
    assert lone.slot is None and eng.stats["prefills"] == 1            # inside the gap: held back
    clock.now += 0.06
    eng.step()
    assert lone.slot is not None and eng.stats["prefills"] == 2        # 0.11 s quiet >= 0.1 s: admitted
    # a steady trickle (a new arrival every 0.08 s, never a quiet gap) is held at most max_wait
    eng = Engine(model, tok, max_batch=8, max_wait=0.4, mix_prefill=False)
    eng.submit(tok.encode("hello"), sp)
    eng.step()
    trickle = []
    for i in range(5):                                                 # arrivals at 0, .08, ..., .32 s
        trickle.append(eng.submit(tok.encode(PROMPTS[i]), sp))
        eng.step()
        assert all(r.slot is None for r in trickle) and eng.stats["prefills"] == 1, i
        clock.now += 0.08
    clock.now += 0.01                                                  # 0.41 s after the first arrival
    eng.step()
    assert all(r.slot is not None for r in trickle) and eng.stats["prefills"] == 2


def test_mixed_step_prefills_new_prompts_inside_the_decode_forward(model, tok):
    """While rows decode, a new request's prompt goes into the same forward as their next tokens
    (one model call per step, no prefill forward, no hold-back) and it gets the same tokens as
    alone; with mix_prefill=False the same requests take a prefill forward of their own."""
    sp = SamplingParams(max_tokens=12, ignore_eos=True)
    alone = [Engine(model, tok, max_batch=1).generate([tok.encode(p)], sp)[0].token_ids for p in PROMPTS[:3]]
    calls = {"forward": 0, "ragged": 0}
    for mix in (True, False):
        eng = Engine(model, tok, max_batch=4, max_wait=30.0 if mix else 0.0, mix_prefill=mix)
        first = eng.submit(tok.encode(PROMPTS[0]), sp)
        eng.step()  # nothing decodes yet: an ordinary prefill (+ decode)
        late = [eng.submit(tok.encode(p), sp) for p in PROMPTS[1:3]]
        for name in calls:
            calls[name] = 0
        fwd, rag = model.forward, model.forward_ragged
        model.forward = lambda *a, **k: (calls.__setitem__("forward", calls["forward"] + 1), fwd(*a, **k))[1]
        model.forward_ragged = lambda *a, **k: (calls.__setitem__("ragged", calls["ragged"] + 1), rag(*a, **k))[1]
        try:
            steps = eng.stats["steps"]
            eng.step()
        finally:
            del model.forward, model.forward_ragged  # back to the class methods
        assert all(r.slot is not None for r in late)  # admitted at once (mixed: max_wait 30 s is not waited)
        assert eng.stats["prefills"] == 2 and eng.stats["steps"] == steps + 1
        assert calls == ({"forward": 0, "ragged": 1} if mix else {"forward": 2, "ragged": 0})
        assert [len(r.token_ids) for r in late] == ([1, 1] if mix else [2, 2])  # prefill token (+ decode)
        while not all(r.done for r in [first] + late):
            eng.step()
        assert [r.result().token_ids for r in [first] + late] == alone
    # the same engine with the attention kernels switched off later: separate prefills again, same tokens
    from tinyseek.kernels import attn as attn_kernel

    before = attn_kernel.KERNELS.state["enabled"]
    attn_kernel.KERNELS.enable(False)
    try:
        eng.mix_prefill = True
        first = eng.submit(tok.encode(PROMPTS[0]), sp)
        eng.step()
        late = eng.submit(tok.encode(PROMPTS[1]), sp)
        prefills = eng.stats["prefills"]
        eng.step()
        assert eng.stats["prefills"] == prefills + 1 and len(late.token_ids) == 2  # prefill forward + decode
        while not (first.done and late.done):
            eng.step()
        plain = [Engine(model, tok, max_batch=1).generate([tok.encode(p)], sp)[0].token_ids for p in PROMPTS[:2]]
        assert [first.result().token_ids, late.result().token_ids] == plain
    finally:
        attn_kernel.KERNELS.enable(before)


def test_mixed_step_takes_only_what_fits(model, tok, monkeypatch):
    """A mixed step holds at most MIX_MAX_TOKENS tokens: prompts that do not fit next to the busy
    rows wait a step, and a prompt too long to fit at all gets a prefill forward of its own."""
    from tinyseek.serve import engine as engine_mod

    monkeypatch.setattr(engine_mod, "MIX_MAX_TOKENS", 12)
    sp = SamplingParams(max_tokens=20, ignore_eos=True)
    eng = Engine(model, tok, max_batch=4)
    eng.submit(tok.encode("hi"), sp)
    eng.step()  # one busy row
    a, b = eng.submit(tok.encode("abcdef"), sp), eng.submit(tok.encode("ghijkl"), sp)  # 6 tokens each
    eng.step()
    assert a.slot is not None and b.slot is None  # 1 + 6 fit, + 6 more would not
    assert len(a.token_ids) == 1  # mixed: its first token from the shared forward
    eng.step()
    assert b.slot is not None and len(b.token_ids) == 1
    long = eng.submit(tok.encode("x" * 20), sp)  # 3 busy rows + 20 tokens > 12: a prefill forward
    prefills = eng.stats["prefills"]
    eng.step()
    assert long.slot is not None and len(long.token_ids) == 2 and eng.stats["prefills"] == prefills + 1


def test_mixed_step_needs_the_kernels_and_mla(tok):
    """No ragged forward for GQA, for MLA forced to the naive form, or without the C kernels: the
    engine then prefills separately (and still gives the same tokens)."""
    from tinyseek.kernels import attn as attn_kernel

    gqa = make_model(tok, seed=1, attn="gqa")
    assert not gqa.can_ragged(gqa.new_cache(2, 16))
    mla = make_model(tok, seed=1)
    cache = mla.new_cache(2, 16)
    with torch.no_grad():
        assert mla.can_ragged(cache)
        before = attn_kernel.KERNELS.state["enabled"]
        attn_kernel.KERNELS.enable(False)
        try:
            assert not mla.can_ragged(cache)
        finally:
            attn_kernel.KERNELS.enable(before)
        mla.blocks[0].attn.impl = "naive"
        try:
            assert not mla.can_ragged(cache)
        finally:
            mla.blocks[0].attn.impl = "auto"
    assert not mla.can_ragged(cache)  # gradients on


def test_cancel_timeout_and_drain(model, tok):
    eng = Engine(model, tok, max_batch=2).start()
    try:
        r = eng.submit(tok.encode("hi"), SamplingParams(max_tokens=10_000, ignore_eos=True))
        r.cancel()
        assert r.result(10).finish_reason == "cancelled"
        t = eng.submit(tok.encode("hi"), SamplingParams(max_tokens=100, ignore_eos=True), timeout=1e-4)
        assert t.result(10).finish_reason == "timeout"
        # stop(drain=True) finishes what is queued and running before the thread exits
        reqs = [eng.submit(tok.encode(p), SamplingParams(max_tokens=8, ignore_eos=True)) for p in PROMPTS]
    finally:
        eng.stop(drain=True, timeout=30)
    assert all(r.done and r.completion.finish_reason == "length" for r in reqs)
    with pytest.raises(UserError, match="shutting down"):
        eng.submit([1, 2], SamplingParams())


def test_astream_yields_tokens_and_matches_generate(model, tok):
    eng = Engine(model, tok, max_batch=4).start()
    ids = tok.encode("the quick brown fox jumps")
    sp = SamplingParams(max_tokens=16, ignore_eos=True)

    async def collect():
        return [ev async for ev in eng.astream(ids, sp)]
    try:
        events = asyncio.run(collect())
    finally:
        eng.stop()
    ref = Engine(model, tok, max_batch=1).generate([ids], sp)[0]
    assert len(events) == 16 and events[-1].finished and not events[0].finished
    assert [t for ev in events for t in ev.token_ids] == ref.token_ids
    assert "".join(ev.text for ev in events) == ref.text == events[-1].completion.text


def test_text_tracker_holds_back_stop_prefixes(tok):
    tr = TextTracker(tok, ["STOP"])
    ids = tok.encode("abc ST")
    assert tr.update(ids) == "abc "            # "ST" might become "STOP": held back
    assert tr.update(tok.encode("abc STX")) == "STX"
    assert tr.update(tok.encode("abc STX yes STOP no")) == " yes " and tr.stopped == "STOP"
    assert tr.text == "abc STX yes "
    # a multi-byte character split across tokens is not emitted half-way
    tr2 = TextTracker(tok, [])
    euro = tok.encode("\u20ac")
    if len(euro) > 1:
        assert tr2.update(euro[:1]) == ""
        assert tr2.update(euro) == "\u20ac"


def test_text_tracker_holds_blocked_words_as_the_safety_filter_sees_them(tok):
    """A safety word is held back however the model spells its start (case, zero-width characters,
    full-width letters), so the filter can still refuse the whole word before any of it streams;
    stop strings stay exact."""
    for spelled in ("bo", "BO", "b\u200bo", "\uff42\uff4f", "b\u00ado"):
        tr = TextTracker(tok, ["STOP"], holds=["Bomb"])
        assert tr.update(tok.encode("make a " + spelled)) == "make a ", spelled
        assert tr.update(tok.encode("make a " + spelled + "at")) == spelled + "at", spelled  # "boat": released
    tr = TextTracker(tok, [], holds=["credit card"])
    assert tr.update(tok.encode("my credit  ca")) == "my "          # phrases across a run of spaces
    tr = TextTracker(tok, ["STOP"])
    assert tr.update(tok.encode("a st")) == "a st"                  # stop strings match exactly


def test_engine_thread_safety_many_clients(model, tok):
    """Concurrent submitters from several threads all get complete, correct answers."""
    eng = Engine(model, tok, max_batch=4).start()
    ref = {p: Engine(model, tok, max_batch=1).generate([tok.encode(p)], SamplingParams(max_tokens=6, ignore_eos=True))[0].token_ids
           for p in PROMPTS}
    results, errors = {}, []

    def client(i):
        try:
            p = PROMPTS[i % len(PROMPTS)]
            results[i] = (p, eng.submit(tok.encode(p), SamplingParams(max_tokens=6, ignore_eos=True)).result(60))
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    finally:
        eng.stop()
    assert not errors and len(results) == 12
    assert all(c.token_ids == ref[p] for p, c in results.values())


def test_model_vocab_larger_than_tokenizer(tok):
    """Only ids the tokenizer can decode are sampled (the model may have a padded vocabulary)."""
    model = make_model(tok, vocab_size=tok.vocab_size + 300)
    eng = Engine(model, tok, max_batch=4)
    outs = eng.generate([tok.encode(p) for p in PROMPTS],
                        SamplingParams(max_tokens=20, temperature=2.0, seed=0, ignore_eos=True))
    assert all(max(o.token_ids) < tok.vocab_size and o.finish_reason == "length" for o in outs)


def test_engine_survives_a_failing_step(model, tok):
    """An exception inside a step fails the running requests with an error; later ones are served."""
    eng = Engine(model, tok, max_batch=2).start()
    real = eng._decode
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real()
    eng._decode = broken
    try:
        bad = eng.submit(tok.encode("hi"), SamplingParams(max_tokens=10, ignore_eos=True)).result(30)
        assert bad.finish_reason == "error" and "boom" in bad.error
        good = eng.submit(tok.encode("hi"), SamplingParams(max_tokens=3, ignore_eos=True)).result(30)
        assert good.finish_reason == "length" and len(good.token_ids) == 3
    finally:
        eng.stop()


@pytest.mark.parametrize("top_k, top_p", [(0, 1.0), (3, 1.0), (0, 0.8), (4, 0.9)])
def test_sampling_distribution_matches_filtered_softmax(top_k, top_p):
    """With u on a fine uniform grid, token frequencies equal the filtered, renormalised softmax."""
    from tinyseek.serve.sampling import sample_tokens

    torch.manual_seed(0)
    logits = torch.randn(12) * 2
    T, n = 0.7, 4000
    toks = sample_tokens(logits.expand(n, -1).contiguous(), [T] * n, [top_k] * n, [top_p] * n,
                         [(i + 0.5) / n for i in range(n)])
    freq = torch.bincount(toks, minlength=12).float() / n
    p = (logits / T).softmax(-1)
    order = p.argsort(descending=True)
    if top_k:  # top-k first, then top-p on the renormalised top-k distribution (as HF / vLLM do)
        p = torch.zeros_like(p).scatter(0, order[:top_k], p[order[:top_k]])
        p = p / p.sum()
    keep = torch.zeros(12, dtype=torch.bool)
    mass = 0.0
    for rank, t in enumerate(order.tolist()):
        if (top_k and rank >= top_k) or mass >= top_p:
            break
        keep[t] = True
        mass += float(p[t])
    expect = torch.where(keep, p, 0.0)
    expect = expect / expect.sum()
    assert torch.allclose(freq, expect, atol=2.0 / n)


def test_sampling_never_picks_a_filtered_token_at_the_cdf_end():
    """A uniform that rounds up to 1 lands past the end of the CDF: the pick must fall back to the
    last token with probability > 0, not a token removed by top-p / top-k."""
    from tinyseek.serve.sampling import sample_tokens

    logits = torch.tensor([[0.0, 2.0, 1.0], [0.0, 2.0, 1.0]])
    u = [0.9999999999, 0.3]  # the first rounds to 1.0 in float32
    assert sample_tokens(logits, [1.0, 1.0], [0, 0], [0.5, 0.5], u).tolist() == [1, 1]
    # top-p 0.9 keeps tokens 1 and 2 (sorted: 1, 2, 0): the end falls back to token 2, not 0
    assert sample_tokens(logits, [1.0, 1.0], [0, 0], [0.9, 1.0], [0.9999999999, 0.0]).tolist() == [2, 1]


def test_leaving_a_stream_early_cancels_the_request(model, tok):
    """A client that goes away (the server stops iterating) frees its slot at the next step."""
    eng = Engine(model, tok, max_batch=2).start()

    async def take_two():
        agen = eng.astream(tok.encode("hi"), SamplingParams(max_tokens=500, ignore_eos=True))
        got = [await agen.__anext__(), await agen.__anext__()]
        await agen.aclose()
        return got
    try:
        got = asyncio.run(take_two())
        assert len(got) == 2 and not got[-1].finished
        for _ in range(1000):
            if eng.num_active() == 0:
                break
            time.sleep(0.01)
        assert eng.num_active() == 0 and eng.stats["finished"] == 1
    finally:
        eng.stop()
    # and the synchronous stream() does the same
    sync = Engine(model, tok, max_batch=2)
    it = sync.stream(tok.encode("hi"), SamplingParams(max_tokens=500, ignore_eos=True))
    next(it)
    it.close()
    assert sync.num_active() == 0 and sync.stats["finished"] == 1
