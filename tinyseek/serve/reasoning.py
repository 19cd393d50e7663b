"""R1-style answers split into ``reasoning_content`` and ``content`` (DeepSeek's API shape).

The model writes ``<think>reasoning</think><answer>answer</answer>``; the client gets the reasoning in
``message.reasoning_content`` (streamed as ``delta.reasoning_content``) and the answer, tags removed,
in ``content``. Text after ``</think>`` outside ``<answer>`` tags also goes to ``content`` (models that
write no answer tags), text before a ``<think>`` too; an unclosed ``<think>`` keeps the rest as
reasoning. Streaming holds back only a possible partial tag at the end of the text (``<thi``), so a
tag is never split between two deltas. The server's ``--reasoning-format raw`` keeps the raw text.
"""
from __future__ import annotations

from tinyseek.serve.detok import safe_prefix_len

THINK, END_THINK, ANSWER, END_ANSWER = "<think>", "</think>", "<answer>", "</answer>"
_TAGS = (THINK, END_THINK, ANSWER, END_ANSWER)


def uses_reasoning(tokenizer) -> bool:
    """Whether the tokenizer's chat template is R1-style: ours (always), or an imported one whose
    template mentions ``<think>`` (DeepSeek-R1, Qwen3)."""
    if getattr(tokenizer, "kind", None) in ("bpe", "bytes"):
        return True
    return THINK in (getattr(tokenizer, "chat_template", "") or "")


class ReasoningSplitter:
    """Feed text deltas, get ``[(field, text)]`` with field ``reasoning_content`` or ``content``.

    >>> s = ReasoningSplitter()
    >>> s.feed("<think>2+2") + s.feed(" is 4</thi") + s.feed("nk><answer>4</answer>") + s.flush()
    [('reasoning_content', '2+2'), ('reasoning_content', ' is 4'), ('content', '4')]
    >>> split_reasoning("<think>a</think>b")
    ('a', 'b')
    """

    def __init__(self):
        self.buf = ""
        self.thinking = False

    def feed(self, text: str, final: bool = False) -> list[tuple[str, str]]:
        self.buf += text
        out: list[tuple[str, str]] = []
        while True:
            hits = [(self.buf.find(t), t) for t in _TAGS if t in self.buf]
            if not hits:
                break
            at, tag = min(hits)
            self._emit(out, self.buf[:at])
            self.buf = self.buf[at + len(tag):]
            if tag == THINK:
                self.thinking = True
            elif tag == END_THINK:
                self.thinking = False
        n = len(self.buf) if final else safe_prefix_len(self.buf, list(_TAGS))
        self._emit(out, self.buf[:n])
        self.buf = self.buf[n:]
        return out

    def flush(self) -> list[tuple[str, str]]:
        return self.feed("", final=True)

    def _emit(self, out: list, text: str) -> None:
        if text:
            field = "reasoning_content" if self.thinking else "content"
            if out and out[-1][0] == field:
                out[-1] = (field, out[-1][1] + text)
            else:
                out.append((field, text))


def split_reasoning(text: str) -> tuple[str | None, str]:
    """``(reasoning_content or None, content)`` of a whole answer."""
    s = ReasoningSplitter()
    parts = s.feed(text, final=True)
    reasoning = "".join(t for f, t in parts if f == "reasoning_content")
    content = "".join(t for f, t in parts if f == "content")
    return (reasoning if THINK in text else None), content
