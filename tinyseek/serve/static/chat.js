// tinyseek web chat: sends the conversation to /v1/chat/completions with stream=true and renders
// the server-sent events as they arrive. No dependencies, no CDN. Model text is only ever set with
// textContent (never innerHTML).
//
// Reasoning: a reply's thinking is shown in a collapsed <details> "Reasoning" above the answer. It
// comes either as `reasoning_content` (message / stream delta, DeepSeek's API shape) or inline in
// `content` as <think>...</think> (R1 style, <answer> tags stripped); an unclosed <think> while
// streaming is reasoning in progress. Only the answer goes back to the model in later turns.
//
// Context: before each request the oldest turns are left out (the system message and the newest user
// message are always kept) so that the prompt fits the model's context, read from GET /v1/models
// (`max_model_len`, or `context_length`; FALLBACK_CONTEXT when the card has neither; a
// `max_prompt_tokens` there, or the "at most N" of a context_length_exceeded error, caps the prompt),
// keeping room for the reply (max tokens, at most a quarter of the context). Tokens are estimated conservatively
// as the text's UTF-8 bytes (an upper bound for byte-level tokenizers: every token is >= 1 byte) plus
// a per-message template overhead; once the server reports a prompt's real token count (usage, or a
// context_length_exceeded error) the bytes-to-tokens ratio is scaled down to what it saw (+10%, never
// above 1). If the server still answers 400 context_length_exceeded, one more old turn is left out
// and the request retried (at most MAX_RETRIES times). A note under the log says how many older
// messages were left out; those messages are dimmed.
//
// API key: kept for this tab only (sessionStorage); a key an older version left in localStorage is
// moved to this tab and deleted from localStorage.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), form = $("composer"), stopBtn = $("stop"), statusEl = $("status");
const noteEl = $("context-note");
const FALLBACK_CONTEXT = 2048;  // tokens, when GET /v1/models gives no context length
const PROMPT_OVERHEAD = 16;     // tokens a chat template adds once (generation prompt, BOS, ...)
const MSG_OVERHEAD = 8;         // tokens a chat template adds per message (role markers, separators)
const MAX_RETRIES = 6;          // re-sends after a 400 context_length_exceeded, one more turn left out each
const history = [];             // {role, content, el}: every turn shown in the log (content: the answer only)
const state = {
  card: null,          // the model card from GET /v1/models (null: not fetched yet or failed)
  cardKey: null,       // the API key the card was fetched with
  maxPrompt: null,     // the server's prompt limit, when a context_length_exceeded error told us
  tokensPerByte: 1,    // conservative until the server reports a real prompt size
  lastDropped: 0,      // messages left out of the last request
};
let controller = null;   // the in-flight request's AbortController
window.tinyseekChunks = 0; // number of content deltas received (the browser test reads it)

const PREFS = ["temperature", "max-tokens", "system"]; // not secret: kept across reloads
for (const id of PREFS) {
  const saved = localStorage.getItem("tinyseek." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("tinyseek." + id, $(id).value));
}
const KEY = "tinyseek.api-key";
(function keepKeyForThisTabOnly() {
  const legacy = localStorage.getItem(KEY);
  if (legacy !== null) {
    if (sessionStorage.getItem(KEY) === null && legacy) sessionStorage.setItem(KEY, legacy);
    localStorage.removeItem(KEY);
  }
  $("api-key").value = sessionStorage.getItem(KEY) || "";
  $("api-key").addEventListener("change", () => {
    const v = $("api-key").value.trim();
    if (v) sessionStorage.setItem(KEY, v); else sessionStorage.removeItem(KEY);
    state.card = null; // fetch the card again with the new key
  });
})();

// --- pure helpers (the browser test calls them through window.tinyseekChat) -------------------
const TAGS = ["<think>", "</think>", "<answer>", "</answer>"];

function dropPartialTag(text) {
  // while streaming, hide a trailing prefix of a tag ("</thi") until the next piece completes it
  const lt = text.lastIndexOf("<");
  if (lt < 0 || text.length - lt >= 9) return text;
  const tail = text.slice(lt);
  return TAGS.some((t) => t.startsWith(tail) && t !== tail) ? text.slice(0, lt) : text;
}

function splitReasoning(text, done) {
  // content -> {reasoning, answer, open}: <think>...</think> blocks are reasoning (also a leading
  // "...</think>" whose <think> the chat template wrote), <answer> tags are dropped; `open`: a
  // <think> is not closed yet (reasoning in progress while streaming).
  let reasoning = [], answer = "", rest = text, open = false;
  const tagged = /<\/?(think|answer)>/.test(text);
  const firstOpen = rest.indexOf("<think>"), firstClose = rest.indexOf("</think>");
  if (firstClose >= 0 && (firstOpen < 0 || firstClose < firstOpen)) {
    reasoning.push(rest.slice(0, firstClose));
    rest = rest.slice(firstClose + 8);
  }
  for (;;) {
    const i = rest.indexOf("<think>");
    if (i < 0) { answer += rest; break; }
    answer += rest.slice(0, i);
    rest = rest.slice(i + 7);
    const j = rest.indexOf("</think>");
    if (j < 0) { reasoning.push(done ? rest : dropPartialTag(rest)); open = !done; break; }
    reasoning.push(rest.slice(0, j));
    rest = rest.slice(j + 8);
  }
  answer = answer.replace(/<\/?answer>/g, "");
  if (!done && !open) answer = dropPartialTag(answer);
  reasoning = reasoning.map((r) => r.trim()).filter((r) => r).join("\n\n");
  return { reasoning, answer: tagged ? answer.trim() : answer, open };
}

function utf8Bytes(s) { return new TextEncoder().encode(s).length; }

function contentBytes(msgs) { return msgs.reduce((n, m) => n + utf8Bytes(m.content), 0); }

function estimateTokens(msgs, tokensPerByte) {
  return PROMPT_OVERHEAD + msgs.reduce((n, m) => n + MSG_OVERHEAD + Math.ceil(utf8Bytes(m.content) * tokensPerByte), 0);
}

function fitMessages(system, turns, budget, tokensPerByte, minDropped) {
  // The request's messages: `system` (or null), then the newest `turns` whose estimate fits `budget`,
  // leaving out whole turns (a user message and the replies after it) from the oldest, at least
  // `minDropped` messages; the newest user message is always kept. -> {messages, dropped, canDropMore}.
  const starts = [];
  turns.forEach((m, i) => { if (m.role === "user") starts.push(i); });
  const head = system ? [{ role: "system", content: system }] : [];
  const build = (from) => head.concat(turns.slice(from).map((m) => ({ role: m.role, content: m.content })));
  let k = 0; // index into starts: the first kept turn
  while (k < starts.length - 1 && (starts[k] < minDropped || estimateTokens(build(starts[k]), tokensPerByte) > budget)) k++;
  const from = starts.length ? starts[k] : 0;
  return { messages: build(from), dropped: from, canDropMore: k < starts.length - 1 };
}

// --- page --------------------------------------------------------------------------------------
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: "Bearer " + key } : {};
}

async function loadCard() {
  const key = $("api-key").value.trim();
  if (state.card && state.cardKey === key) return state.card;
  try {
    const resp = await fetch("/v1/models", { headers: authHeaders() });
    if (resp.ok) {
      const data = (await resp.json()).data || [];
      state.card = data[0] || {};
      state.cardKey = key;
    }
  } catch (e) { /* keep the fallback; the request itself reports a server that is down */ }
  return state.card;
}

function promptBudget(card, maxTokens) {
  const c = card || {};
  let ctx = Number(c.max_model_len || c.context_length || c.context_window) || FALLBACK_CONTEXT;
  let limit = Number(c.max_prompt_tokens) || ctx - 1;
  if (state.maxPrompt) { // the server said so: trust it over the card (and assume no room beyond it)
    limit = Math.min(limit, state.maxPrompt);
    ctx = Math.min(ctx, state.maxPrompt + 1);
  }
  const reserve = Math.min(Math.max(1, maxTokens || 1), Math.floor(ctx / 4));
  return Math.max(1, Math.min(limit, ctx - reserve));
}

function calibrate(promptTokens, msgs) {
  const bytes = contentBytes(msgs);
  if (promptTokens > 0 && bytes > 0) state.tokensPerByte = Math.min(1, 1.1 * promptTokens / bytes);
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function addReply() {
  // <div.msg.assistant><details.reasoning hidden><summary/><div.reasoning-text/></details><div.answer/></div>
  const div = addMessage("assistant", "");
  const details = document.createElement("details");
  details.className = "reasoning";
  details.hidden = true;
  const summary = document.createElement("summary");
  summary.textContent = "Reasoning";
  const body = document.createElement("div");
  body.className = "reasoning-text";
  details.append(summary, body);
  const answer = document.createElement("div");
  answer.className = "answer";
  div.append(details, answer);
  return { div, details, summary, body, answer };
}

function renderReply(view, content, reasoningContent, done) {
  const parts = splitReasoning(content, done);
  const reasoning = [reasoningContent.trim(), parts.reasoning].filter((r) => r).join("\n\n");
  const thinking = !done && (parts.open || (reasoningContent !== "" && content === ""));
  view.details.hidden = !reasoning && !thinking;
  view.details.dataset.state = thinking ? "thinking" : "done";
  view.summary.textContent = thinking ? "Reasoning…" : "Reasoning";
  view.body.textContent = reasoning;
  view.answer.textContent = parts.answer;
  return parts.answer;
}

function showDropped(dropped) {
  state.lastDropped = dropped;
  history.forEach((m, i) => m.el.classList.toggle("out-of-context", i < dropped));
  noteEl.hidden = dropped === 0;
  noteEl.textContent = dropped === 0 ? "" : dropped + " older message" + (dropped === 1 ? " was" : "s were") +
    " left out of the context (the model's context is too short for the whole chat).";
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  stopBtn.disabled = !busy;
}

class ContextError extends Error {}

async function post(messages, maxTokens, signal) {
  const body = {
    messages, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: maxTokens,
  };
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() },
    body: JSON.stringify(body), signal,
  });
  if (!resp.ok) {
    let msg = resp.status + " " + resp.statusText, code = null;
    try { const e = (await resp.json()).error; msg = e.message; code = e.code; } catch (e) { /* keep the status line */ }
    if (resp.status === 400 && (code === "context_length_exceeded" || /context length|too long/i.test(msg))) {
      const err = new ContextError(msg);
      const has = /has (\d+) tokens/.exec(msg), most = /at most (\d+)/.exec(msg);
      err.promptTokens = has ? Number(has[1]) : 0;
      err.limit = most ? Number(most[1]) : 0;
      throw err;
    }
    throw new Error(msg);
  }
  return resp;
}

async function send(text) {
  const userEl = addMessage("user", text);
  history.push({ role: "user", content: text, el: userEl });
  const view = addReply();
  setBusy(true);
  statusEl.textContent = "generating...";
  const ctrl = new AbortController();
  controller = ctrl;
  const maxTokens = Number($("max-tokens").value);
  const system = $("system").value.trim() || null;
  let content = "", reasoningContent = "", finish = null, usage = null, answer = "";
  const t0 = performance.now();
  try {
    const card = await loadCard();
    let resp = null, sent = null, minDropped = 0;
    for (let attempt = 0; ; attempt++) {
      const fit = fitMessages(system, history, promptBudget(card, maxTokens), state.tokensPerByte, minDropped);
      sent = fit.messages;
      showDropped(fit.dropped);
      try {
        resp = await post(sent, maxTokens, ctrl.signal);
        break;
      } catch (err) {
        if (!(err instanceof ContextError) || attempt >= MAX_RETRIES || !fit.canDropMore) throw err;
        if (err.limit) state.maxPrompt = err.limit;
        if (err.promptTokens) calibrate(err.promptTokens, sent);
        minDropped = fit.dropped + 1; // the next try leaves out at least one more turn
      }
    }
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          const obj = JSON.parse(data);
          if (obj.error) throw new Error(obj.error.message);
          if (obj.usage) usage = obj.usage;
          for (const ch of obj.choices || []) {
            const delta = ch.delta || {};
            if (delta.reasoning_content) reasoningContent += delta.reasoning_content;
            if (delta.content) { content += delta.content; window.tinyseekChunks += 1; }
            if (delta.content || delta.reasoning_content) {
              answer = renderReply(view, content, reasoningContent, false);
              log.scrollTop = log.scrollHeight;
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          }
        }
      }
    }
    answer = renderReply(view, content, reasoningContent, true);
    history.push({ role: "assistant", content: answer, el: view.div });
    if (usage && usage.prompt_tokens) calibrate(usage.prompt_tokens, sent);
    const secs = (performance.now() - t0) / 1000;
    statusEl.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + secs.toFixed(2) + " s" +
      (finish ? ", finish: " + finish : "");
  } catch (err) {
    if (err.name === "AbortError") {
      answer = renderReply(view, content, reasoningContent, true);
      history.push({ role: "assistant", content: answer, el: view.div });
      statusEl.textContent = "stopped";
    } else {
      renderReply(view, content, reasoningContent, true);
      view.div.classList.add("error");
      view.answer.textContent = (view.answer.textContent ? view.answer.textContent + "\n" : "") + "error: " + err.message;
      history.pop(); // drop the failed user turn so the next request is well-formed
      statusEl.textContent = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    view.div.dataset.done = "1";
  }
}

form.addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) { ev.preventDefault(); form.requestSubmit(); }
});
stopBtn.addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  history.length = 0; log.textContent = ""; statusEl.textContent = ""; showDropped(0);
});
window.tinyseekChat = { splitReasoning, fitMessages, estimateTokens, promptBudget, addReply, renderReply, state, history };
