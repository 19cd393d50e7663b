// tinyseek web chat: sends the conversation to /v1/chat/completions with stream=true and renders
// the server-sent events as they arrive. No dependencies, no CDN.
"use strict";
const $ = (id) => document.getElementById(id);
const log = $("log"), input = $("input"), form = $("composer"), stopBtn = $("stop"), statusEl = $("status");
const history = [];
let controller = null;
window.tinyseekChunks = 0; // number of content deltas received (the browser test reads it)

for (const id of ["temperature", "max-tokens", "api-key"]) { // keep settings across reloads
  const saved = localStorage.getItem("tinyseek." + id);
  if (saved !== null) $(id).value = saved;
  $(id).addEventListener("change", () => localStorage.setItem("tinyseek." + id, $(id).value));
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

function setBusy(busy) {
  document.body.dataset.state = busy ? "streaming" : "idle";
  $("send").disabled = busy;
  stopBtn.disabled = !busy;
}

async function send(text) {
  history.push({ role: "user", content: text });
  addMessage("user", text);
  const out = addMessage("assistant", "");
  setBusy(true);
  statusEl.textContent = "generating...";
  controller = new AbortController();
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  const body = {
    messages: history, stream: true, stream_options: { include_usage: true },
    temperature: Number($("temperature").value), max_tokens: Number($("max-tokens").value),
  };
  let reply = "", finish = null, usage = null;
  const t0 = performance.now();
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers, body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      let msg = resp.status + " " + resp.statusText;
      try { msg = (await resp.json()).error.message; } catch (e) { /* keep the status line */ }
      throw new Error(msg);
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
            const piece = ch.delta && ch.delta.content;
            if (piece) {
              reply += piece;
              out.textContent = reply;
              window.tinyseekChunks += 1;
              log.scrollTop = log.scrollHeight;
            }
            if (ch.finish_reason) finish = ch.finish_reason;
          }
        }
      }
    }
    history.push({ role: "assistant", content: reply });
    const secs = (performance.now() - t0) / 1000;
    statusEl.textContent = (usage ? usage.completion_tokens + " tokens, " : "") + secs.toFixed(2) + " s" +
      (finish ? ", finish: " + finish : "");
  } catch (err) {
    if (err.name === "AbortError") {
      history.push({ role: "assistant", content: reply });
      statusEl.textContent = "stopped";
    } else {
      out.classList.add("error");
      out.textContent = (reply ? reply + "\n" : "") + "error: " + err.message;
      history.pop(); // drop the failed user turn so the next request is well-formed
      statusEl.textContent = "error";
    }
  } finally {
    controller = null;
    setBusy(false);
    out.dataset.done = "1";
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
$("clear").addEventListener("click", () => { history.length = 0; log.textContent = ""; statusEl.textContent = ""; });
