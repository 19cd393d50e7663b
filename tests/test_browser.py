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
