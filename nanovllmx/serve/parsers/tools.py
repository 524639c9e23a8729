"""Hermes-style tool calls, as Qwen3 writes them:

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

Text before the first block is content; each well-formed block is a tool call (`arguments` is the
JSON text of the arguments object as the model wrote it, so the streamed fragments concatenate to
the same string as the whole response's); a block that is not valid JSON with a string `name` is
given back as content. Incremental: `feed` returns content text and tool-call deltas shaped like
OpenAI's stream (the first delta of a call carries its index, id, type and name with empty
arguments; the next ones argument fragments)."""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field
from typing import Any

from nanovllmx.serve.parsers.text import partial_tag_len

CALL_START, CALL_END = "<tool_call>", "</tool_call>"
# the head of a call, up to where its arguments' value starts (once its first character came)
_HEAD = re.compile(r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"arguments"\s*:\s*(?=\S)')
_DECODER = json.JSONDecoder()


def new_call_id() -> str:
    return f"call_{secrets.token_hex(12)}"


@dataclass
class _Call:
    index: int
    buf: str = ""  # the block's text so far (after <tool_call>)
    id: str = field(default_factory=new_call_id)
    name: str | None = None  # set once the head is parsed and its delta sent
    args_start: int = 0  # offset of the arguments' value in buf
    sent_args: str = ""  # argument text already sent


def parse_call(block: str) -> tuple[str, str] | None:
    """(name, arguments JSON text) of one block's text, or None when it is not a valid call."""
    m = _HEAD.match(block)
    if m is not None:
        try:
            name = json.loads(f'"{m.group(1)}"')
            args, end = _DECODER.raw_decode(block, m.end())
            rest = block[end:].strip()
        except ValueError:
            return None
        if rest == "}" and isinstance(args, dict):
            return name, block[m.end() : end]
        return None
    try:  # any other key order: {"arguments": ..., "name": ...}
        obj = json.loads(block)
    except ValueError:
        return None
    if isinstance(obj, dict) and isinstance(obj.get("name"), str) and isinstance(obj.get("arguments", {}), dict):
        return obj["name"], json.dumps(obj.get("arguments", {}), ensure_ascii=False)
    return None


class ToolCallParser:
    def __init__(self) -> None:
        self.buf = ""  # content text held back (a possible partial <tool_call>)
        self.call: _Call | None = None  # the open block
        self.num_calls = 0  # tool calls sent
        self.after_calls = ""  # text outside blocks once a call was made (given back if no call parses)

    def feed(self, text: str) -> tuple[str, list[dict[str, Any]]]:
        """-> (content, tool-call deltas) known now."""
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        self.buf += text
        while self.buf:
            if self.call is None:
                i = self.buf.find(CALL_START)
                if i < 0:
                    keep = partial_tag_len(self.buf, CALL_START)
                    out, self.buf = self.buf[: len(self.buf) - keep], self.buf[len(self.buf) - keep :]
                    self._content(out, content)
                    break
                self._content(self.buf[:i], content)
                self.buf = self.buf[i + len(CALL_START) :]
                self.call = _Call(self.num_calls)
                continue
            c = self.call
            j = self.buf.find(CALL_END)
            if j < 0:
                keep = partial_tag_len(self.buf, CALL_END)
                c.buf += self.buf[: len(self.buf) - keep]
                self.buf = self.buf[len(self.buf) - keep :]
                deltas += self._stream(c)
                break
            c.buf += self.buf[:j]
            self.buf = self.buf[j + len(CALL_END) :]
            deltas += self._close(c, content)
        return "".join(content), deltas

    def finish(self) -> tuple[str, list[dict[str, Any]]]:
        """The end of the output: a block cut short is a call if it parses, else content."""
        content: list[str] = []
        deltas: list[dict[str, Any]] = []
        if self.call is not None:
            self.call.buf += self.buf
            self.buf = ""
            deltas = self._close(self.call, content, cut=True)
        self._content(self.buf, content)
        self.buf = ""
        return "".join(content), deltas

    def _content(self, text: str, out: list[str]) -> None:
        # once calls were made, whitespace between and after blocks is layout, not content
        if self.num_calls and not text.strip():
            return
        out.append(text)

    def _stream(self, c: _Call) -> list[dict[str, Any]]:
        """Deltas of an open block: its head once the name is known, then argument text up to the
        last "}" (the rest may be the call's own closing brace)."""
        out: list[dict[str, Any]] = []
        if c.name is None:
            m = _HEAD.match(c.buf)
            if m is None:
                return out
            try:
                c.name = json.loads(f'"{m.group(1)}"')
            except ValueError:
                return out
            c.args_start = m.end()
            out.append(self._head(c))
        args = c.buf[c.args_start :]
        k = args.rfind("}")
        safe = args[:k] if k >= 0 else args.rstrip()
        if len(safe) > len(c.sent_args) and safe.startswith(c.sent_args):
            out.append(self._args(c, safe[len(c.sent_args) :]))
        return out

    def _close(self, c: _Call, content: list[str], cut: bool = False) -> list[dict[str, Any]]:
        self.call = None
        parsed = parse_call(c.buf)
        if parsed is None:
            if c.name is None:  # nothing of it was sent: it is text
                content.append(CALL_START + c.buf + ("" if cut else CALL_END))
            else:  # its head went out already: the client has the call, with what was sent of it
                self.num_calls += 1
            return []
        name, args = parsed
        out: list[dict[str, Any]] = []
        if c.name is None:
            c.name = name
            out.append(self._head(c))
        if args.startswith(c.sent_args) and len(args) > len(c.sent_args):
            out.append(self._args(c, args[len(c.sent_args) :]))
        self.num_calls += 1
        return out

    @staticmethod
    def _head(c: _Call) -> dict[str, Any]:
        return {"index": c.index, "id": c.id, "type": "function", "function": {"name": c.name, "arguments": ""}}

    @staticmethod
    def _args(c: _Call, piece: str) -> dict[str, Any]:
        c.sent_args += piece
        return {"index": c.index, "function": {"arguments": piece}}


def merge_tool_deltas(deltas: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The whole tool calls of a list of deltas (a non-streaming message's `tool_calls`)."""
    calls: dict[int, dict[str, Any]] = {}
    for d in deltas:
        c = calls.get(d["index"])
        if c is None:
            calls[d["index"]] = {"id": d["id"], "type": "function", "function": dict(d["function"])}
        else:
            c["function"]["arguments"] += d["function"]["arguments"]
    return [calls[i] for i in sorted(calls)]
