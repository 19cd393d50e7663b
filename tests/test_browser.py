"""Headless Chromium loads the web chat from a real uvicorn on 127.0.0.1, sends a message and sees
the reply stream in.

Setup (once per machine, done here): Debian ``chromium`` via apt-get when /usr/bin/chromium is
missing and we are root, and the ``playwright`` Python package via pip (we drive the system
Chromium, no browser download). Without either, the test is skipped with the reason.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

import pytest

from serve_fixtures import make_model, make_tokenizer, start_uvicorn
from tinyseek.serve.engine import Engine, SamplingParams
from tinyseek.serve.server import Config, create_app

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage"]


def _ensure_chromium() -> str | None:
    if os.path.exists(CHROMIUM):
        return None
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("apt-get")):
        return f"{CHROMIUM} missing and not root (install Debian's chromium package)"
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    r = subprocess.run(["apt-get", "install", "-y", "chromium"], env=env, capture_output=True, text=True)
    if r.returncode != 0 or not os.path.exists(CHROMIUM):
        r = subprocess.run("apt-get update && apt-get install -y chromium", shell=True, env=env,
                           capture_output=True, text=True)
    return None if os.path.exists(CHROMIUM) else f"apt-get install chromium failed: {r.stderr[-300:]}"


def _ensure_playwright() -> str | None:
    try:
        import playwright.sync_api  # noqa: F401
        return None
    except ImportError:
        pass
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "playwright"], capture_output=True, text=True)
    try:
        import playwright.sync_api  # noqa: F401
        return None
    except ImportError:
        return f"pip install playwright failed: {r.stderr[-300:]}"


@pytest.fixture(scope="module")
def browser():
    why = _ensure_chromium() or _ensure_playwright()
    if why:
        pytest.skip(why)
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
        yield b
        b.close()


@pytest.fixture()
def live_server():
    tok = make_tokenizer()
    model = make_model(tok)
    eng = Engine(model, tok, max_batch=2, max_len=96)
    eng.step_listeners.append(lambda n, dt: time.sleep(0.005))  # slow enough to see tokens arrive one by one
    app = create_app(eng, tok, Config(max_tokens=32))
    url, server, th = start_uvicorn(app)
    yield url, model, tok
    server.should_exit = True
    th.join(30)


def test_chat_page_streams_reply(browser, live_server):
    url, model, tok = live_server
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(url + "/")
    assert page.title() == "tinyseek chat"
    page.click("#settings summary")  # open the settings panel like a user would
    page.fill("#temperature", "0")
    page.dispatch_event("#temperature", "change")
    page.fill("#max-tokens", "12")
    page.dispatch_event("#max-tokens", "change")
    page.fill("#input", "hello there")
    page.click("#send")
    page.wait_for_function("document.body.dataset.state === 'streaming'", timeout=10_000)
    page.wait_for_selector(".msg.assistant[data-done='1']", timeout=30_000)
    reply = page.inner_text(".msg.assistant")
    chunks = page.evaluate("window.tinyseekChunks")
    status = page.inner_text("#status")
    page.close()
    assert not errors, errors
    # the page showed the model's greedy answer, which arrived in several streamed pieces
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "hello there"}]))
    ref = Engine(model, tok, max_batch=1).generate([ids], SamplingParams(max_tokens=12))[0]
    assert chunks >= 2
    assert reply.strip() == ref.text.strip() and reply.strip()
    assert "tokens" in status and "finish" in status


# --- a multi-turn chat past the model's context ----------------------------------------------
API_KEY = "sekret-key"


@pytest.fixture()
def short_context_server():
    """The tiny byte-level model with 96 cache positions (prompts of at most 95 tokens) behind an API key."""
    tok = make_tokenizer()
    eng = Engine(make_model(tok), tok, max_batch=2, max_len=96)
    url, server, th = start_uvicorn(create_app(eng, tok, Config(max_tokens=32, api_key=API_KEY)))
    yield url
    server.should_exit = True
    th.join(30)


def _sse(*deltas) -> str:
    """A canned streamed chat completion: one chunk per delta, then finish and [DONE]."""
    import json
    chunks = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
    chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


# the reply to a user message holding the key: R1 tags in content, or DeepSeek's reasoning_content
CANNED = {
    "[tags]": _sse({"role": "assistant", "content": ""}, {"content": "<think>The user"}, {"content": " wants a number.</th"},
                   {"content": "ink>\n<answer>42 <b>bold</b>"}, {"content": "</answer>"}),
    "[rc]": _sse({"role": "assistant", "content": ""}, {"reasoning_content": "Weighing "}, {"reasoning_content": "colours."},
                 {"content": "Blue."}),
}


def test_chat_past_the_context(browser, short_context_server):
    """Ten turns with a model that holds ~3 of them: every turn is answered (old turns are left out
    before sending, and a 400 context_length_exceeded is retried with one turn fewer), the page says
    how many messages were left out, reasoning renders as a collapsed block (tags or reasoning_content,
    as text), and the API key lives in sessionStorage only (an old localStorage copy is moved)."""
    url = short_context_server
    page = browser.new_page()
    errors, sent, statuses = [], [], []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("response", lambda r: statuses.append(r.status) if r.url.endswith("/v1/chat/completions") else None)

    def chat_route(route):
        import json
        body = json.loads(route.request.post_data)
        sent.append(body["messages"])
        key = next((k for k in CANNED if k in body["messages"][-1]["content"]), None)
        if key:
            route.fulfill(status=200, content_type="text/event-stream", body=CANNED[key])
        else:
            route.continue_()

    def card_route(route):  # a card that overstates the context: the server's 400s must be retried
        route.fulfill(status=200, content_type="application/json",
                      body='{"object": "list", "data": [{"id": "tinyseek", "object": "model", "max_model_len": 400}]}')

    page.route("**/v1/chat/completions", chat_route)
    page.route("**/v1/models", card_route)
    page.goto(url + "/")
    page.evaluate(f"localStorage.setItem('tinyseek.api-key', '{API_KEY}')")  # what an older page version left
    page.reload()
    assert page.input_value("#api-key") == API_KEY
    page.click("#settings summary")
    for sel, value in (("#temperature", "0"), ("#max-tokens", "8"), ("#system", "Be brief.")):
        page.fill(sel, value)
        page.dispatch_event(sel, "change")

    turns = ["hello there", "what is 2+2?", "tell a joke", "[tags] think first", "more please", "go on",
             "[rc] a colour?", "and then?", "why so?", "last one"]
    for i, text in enumerate(turns, 1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_selector(f".msg.assistant:nth-of-type({2 * i})[data-done='1']", timeout=20_000)
        assert page.locator(".msg.error").count() == 0, page.inner_text(".msg.error")
        assert sent[-1][0] == {"role": "system", "content": "Be brief."} and sent[-1][-1] == {"role": "user", "content": text}
    answers = page.locator(".msg.assistant .answer").all_inner_texts()
    assert len(answers) == len(turns) and all(a.strip() for a in answers), answers
    assert not errors, errors

    # old turns were left out, and the page says so (non-blocking: the composer still works)
    assert min(len(m) for m in sent[-5:]) < 2 * len(turns)
    assert 400 in statuses and statuses[-1] == 200  # the overstated card was corrected by a retry
    note = page.locator("#context-note")
    assert note.is_visible() and "left out of the context" in note.inner_text()
    assert page.locator(".msg.out-of-context").count() >= 2

    # reasoning: a collapsed block above the answer, tags stripped, model text never parsed as HTML
    tags_msg = page.locator(".msg.assistant").nth(3)
    details = tags_msg.locator("details.reasoning")
    assert details.is_visible() and details.get_attribute("open") is None
    assert tags_msg.locator("summary").inner_text() == "Reasoning"
    assert tags_msg.locator(".reasoning-text").text_content() == "The user wants a number."
    assert tags_msg.locator(".answer").inner_text() == "42 <b>bold</b>"
    assert tags_msg.locator("b").count() == 0
    rc_msg = page.locator(".msg.assistant").nth(6)
    assert rc_msg.locator("details.reasoning").get_attribute("open") is None
    assert rc_msg.locator(".reasoning-text").text_content() == "Weighing colours."
    assert rc_msg.locator(".answer").inner_text() == "Blue."
    assert page.locator(".msg.assistant").nth(0).locator("details.reasoning").is_hidden()  # no reasoning: no block
    # only the answer went back to the model in later turns
    later = [m["content"] for msgs in sent[4:6] for m in msgs if m["role"] == "assistant"]
    assert "42 <b>bold</b>" in later and not any("<think>" in c for c in later)

    # streaming: an unclosed <think> shows as reasoning in progress (a partial closing tag is held back)
    split = page.evaluate("""() => [
        tinyseekChat.splitReasoning('<think>Let me see</thi', false),
        tinyseekChat.splitReasoning('<think>a</think><answer>4', false),
        tinyseekChat.splitReasoning('r1 style</think>\\n<answer>7</answer>', true),
        tinyseekChat.splitReasoning('plain <thing> text', true)]""")
    assert split[0] == {"reasoning": "Let me see", "answer": "", "open": True}
    assert split[1] == {"reasoning": "a", "answer": "4", "open": False}
    assert split[2] == {"reasoning": "r1 style", "answer": "7", "open": False}
    assert split[3] == {"reasoning": "", "answer": "plain <thing> text", "open": False}
    # fitting: whole turns leave from the oldest; the system message and the newest user message stay
    fits = page.evaluate("""() => { const m = (role, content) => ({role, content});
        const turns = [m('user', 'u1'), m('assistant', 'a1'), m('user', 'u2'), m('assistant', 'a2'), m('user', 'u3')];
        return [tinyseekChat.fitMessages('S', turns, 1000, 1, 0), tinyseekChat.fitMessages('S', turns, 1000, 1, 1),
                tinyseekChat.fitMessages('S', turns, 1, 1, 0)]; }""")
    assert [(f["dropped"], f["canDropMore"]) for f in fits] == [(0, True), (2, True), (4, False)]
    assert [x["content"] for x in fits[2]["messages"]] == ["S", "u3"]
    state = page.evaluate("""() => { const v = tinyseekChat.addReply();
        tinyseekChat.renderReply(v, '<think>Let me', '', false);
        return [v.details.hidden, v.details.open, v.details.dataset.state, v.summary.textContent, v.answer.textContent]; }""")
    assert state == [False, False, "thinking", "Reasoning…", ""]

    # the API key: this tab only
    assert page.evaluate("sessionStorage.getItem('tinyseek.api-key')") == API_KEY
    assert page.evaluate("localStorage.getItem('tinyseek.api-key')") is None
    page.fill("#api-key", "other-key")
    page.dispatch_event("#api-key", "change")
    assert page.evaluate("sessionStorage.getItem('tinyseek.api-key')") == "other-key"
    assert page.evaluate("localStorage.getItem('tinyseek.api-key')") is None
    page.fill("#api-key", API_KEY)
    page.dispatch_event("#api-key", "change")

    # with the server's real card (max_model_len 96) old turns are left out before sending: no 400 at all
    page.unroute("**/v1/models")
    page.click("#clear")
    assert page.locator("#context-note").is_hidden()
    page.evaluate("tinyseekChat.state.maxPrompt = null")
    n_sent, n_status = len(sent), len(statuses)
    for i, text in enumerate(["one more", "and again", "a third", "the end"], 1):
        page.fill("#input", text)
        page.press("#input", "Enter")
        page.wait_for_selector(f".msg.assistant:nth-of-type({2 * i})[data-done='1']", timeout=20_000)
        assert page.locator(".msg.error").count() == 0, page.inner_text(".msg.error")
    assert page.evaluate("tinyseekChat.promptBudget(tinyseekChat.state.card, 8)") == 88  # 96 less room for the reply
    assert statuses[n_status:] == [200] * 4 and len(sent) == n_sent + 4
    assert len(sent[-1]) < 1 + 2 * 4 - 1 and page.locator("#context-note").is_visible()
    assert not errors, errors
    page.close()


def test_favicon_files(short_context_server):
    import httpx
    url = short_context_server
    for name, ctype in (("favicon.svg", "image/svg+xml"), ("favicon.ico", "image/")):
        r = httpx.get(f"{url}/static/{name}")
        assert r.status_code == 200 and r.headers["content-type"].startswith(ctype) and r.content
    page = httpx.get(url + "/").text
    assert 'rel="icon" href="/static/favicon.svg"' in page


def test_favicon_route(short_context_server):
    import httpx
    r = httpx.get(short_context_server + "/favicon.ico")
    assert r.status_code == 200 and r.headers["content-type"].startswith("image/") and r.content
