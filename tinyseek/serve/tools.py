"""Tool calling: which chat templates have a tool syntax, how tool turns are rendered, parsing calls.

- **Syntax.** A template that writes ``<tool_call>`` (Qwen 2.5 / Qwen 3 / Hermes) has one: the
  request's ``tools`` are passed to it and the model's ``<tool_call>{"name": ..., "arguments": ...}
  </tool_call>`` blocks come back as OpenAI ``tool_calls`` (finish_reason ``tool_calls``). Any other
  template (ours, Llama's fallback) has none: a request with ``tools`` is a 400 ("tools: this model's
  chat template has no tool-call syntax") rather than tools silently ignored.
- **Roles.** ``developer`` is rendered as ``system``. A template with a tool syntax gets ``tool``
  messages and assistant ``tool_calls`` as transformers passes them. A template without one (ours)
  gets them in a plain documented form: a ``tool`` message becomes a user turn
  ``[tool result <tool_call_id>]\\n<content>``, an assistant's calls are appended to its content
  as ``[tool call <id>] <name>(<arguments JSON>)`` lines. Either way every string of a message and of
  ``tools`` is encoded as text (``encode_chat``), never as a special token.
"""
from __future__ import annotations

import json
import re
import uuid

from tinyseek.serve.detok import safe_prefix_len

TOOL_CALL, END_TOOL_CALL = "<tool_call>", "</tool_call>"
_CALL_RE = re.compile(re.escape(TOOL_CALL) + r"\s*(.*?)\s*" + re.escape(END_TOOL_CALL), re.S)


def has_tool_syntax(tokenizer) -> bool:
    """Whether the tokenizer's chat template defines a tool-call syntax we parse (Hermes ``<tool_call>``)."""
    return getattr(tokenizer, "kind", None) == "hf" and TOOL_CALL in (getattr(tokenizer, "chat_template", "") or "")


def plain_messages(msgs: list[dict]) -> list[dict]:
    """Messages for a template without tool syntax: ``developer`` as system, tool turns in the plain form.

    >>> plain_messages([{"role": "assistant", "content": None, "tool_calls": [{"id": "c1", "type": "function",
    ...   "function": {"name": "add", "arguments": "{\\"a\\": 1}"}}]}, {"role": "tool", "tool_call_id": "c1", "content": "3"}])
    [{'role': 'assistant', 'content': '[tool call c1] add({"a": 1})'}, {'role': 'user', 'content': '[tool result c1]\\n3'}]
    """
    out = []
    for m in msgs:
        role, content = m["role"], m.get("content") or ""
        if role == "developer":
            role = "system"
        elif role == "tool":
            role, content = "user", f"[tool result {m.get('tool_call_id', '')}]\n{content}"
        calls = [f"[tool call {c.get('id', '')}] {c['function']['name']}({c['function']['arguments']})"
                 for c in m.get("tool_calls") or []]
        if calls:
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": role, "content": content})
    return out


def template_messages(msgs: list[dict]) -> list[dict]:
    """Messages for a template with tool syntax: ``developer`` as system, tool-call arguments as
    objects (what the Qwen/Hermes templates expect: they ``tojson`` them), the rest as sent."""
    out = []
    for m in msgs:
        m = dict(m, role="system" if m["role"] == "developer" else m["role"])
        if m.get("tool_calls"):
            calls = []
            for c in m["tool_calls"]:
                args = c["function"]["arguments"]
                try:
                    args = json.loads(args) if isinstance(args, str) else args
                except json.JSONDecodeError:
                    pass
                calls.append({**c, "function": {**c["function"], "arguments": args}})
            m["tool_calls"] = calls
        out.append(m)
    return out


def parse_tool_calls(text: str) -> tuple[str | None, list[dict]]:
    """``(content before the first call or None, tool_calls)`` from a Hermes-style answer; blocks whose
    JSON does not parse (or lacks a name) stay in the content and give no call.

    >>> c, calls = parse_tool_calls('ok <tool_call>{"name": "add", "arguments": {"a": 1}}</tool_call>')
    >>> c, calls[0]["function"], calls[0]["type"]
    ('ok', {'name': 'add', 'arguments': '{"a": 1}'}, 'function')
    >>> parse_tool_calls("no call")
    ('no call', [])
    """
    calls = []
    for m in _CALL_RE.finditer(text):
        try:
            obj = json.loads(m.group(1))
        except json.JSONDecodeError:
            return text, []
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return text, []
        args = obj.get("arguments", obj.get("parameters", {}))
        calls.append({"id": "call_" + uuid.uuid4().hex[:24], "type": "function",
                      "function": {"name": obj["name"],
                                   "arguments": args if isinstance(args, str) else json.dumps(args, ensure_ascii=False)}})
    if not calls:
        return text, []
    content = text[:text.find(TOOL_CALL)].strip()
    return content or None, calls


class ToolCallHolder:
    """Streaming: content passes through until a ``<tool_call>`` starts (a possible partial tag is
    held back); from there the text is kept for :func:`parse_tool_calls` at the end.

    >>> h = ToolCallHolder()
    >>> h.feed("hi <tool"), h.feed('_call>{"name": "f"}</tool_call>'), h.held
    ('hi ', '', '<tool_call>{"name": "f"}</tool_call>')
    """

    def __init__(self):
        self.pending = ""
        self.held = ""

    def feed(self, text: str, final: bool = False) -> str:
        if self.held:
            self.held += text
            return ""
        self.pending += text
        at = self.pending.find(TOOL_CALL)
        if at >= 0:
            out, self.held, self.pending = self.pending[:at], self.pending[at:], ""
            return out
        n = len(self.pending) if final else safe_prefix_len(self.pending, [TOOL_CALL])
        out, self.pending = self.pending[:n], self.pending[n:]
        return out
