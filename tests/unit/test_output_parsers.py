"""The reasoning and tool-call parsers on recorded Qwen3-style outputs, fed in every way a stream
can cut them: whole, one character at a time, and cut at every one and every pair of positions.
Each chunking must add up to the same message as the whole output."""

from __future__ import annotations

import itertools
import json
from typing import Any

import pytest

from nanovllmx.serve.parsers import ChatOutputParser, ParserConfig
from nanovllmx.serve.parsers.tools import merge_tool_deltas

CFG = ParserConfig("qwen3", "hermes", 151667, 151668)

# (output text, start_in_reasoning, with tools, expected reasoning, content, [(name, arguments)])
CASES: list[tuple[str, bool, bool, str | None, str | None, list[tuple[str, dict[str, Any]]]]] = [
    # thinking on, then an answer
    (
        "<think>\nThe user greets.\n\nSay hi.\n</think>\n\nHello! How can I help?",
        False,
        False,
        "The user greets.\n\nSay hi.",
        "Hello! How can I help?",
        [],
    ),
    # thinking off: the template's empty block is in the prompt, the output is all content
    ("Hello!\n\nHow can I help?", False, False, None, "Hello!\n\nHow can I help?", []),
    # cut by max_tokens inside the think block: all reasoning
    ("<think>\nLet me think about <b>this</b>\n", False, False, "Let me think about <b>this</b>", None, []),
    # the prompt opened the block (a thinking-only template)
    ("plan: call it\n</think>\n\nDone.", True, False, "plan: call it", "Done.", []),
    # one tool call after reasoning
    (
        "<think>\nNeed weather.\n</think>\n\n"
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
        False,
        True,
        "Need weather.",
        None,
        [("get_weather", {"city": "Paris"})],
    ),
    # content, then two calls (nested braces and a '}' inside a string)
    (
        'Checking both.\n<tool_call>\n{"name": "a", "arguments": {"x": {"y": [1, 2]}, "s": "}{"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>',
        False,
        True,
        None,
        "Checking both.\n",
        [("a", {"x": {"y": [1, 2]}, "s": "}{"}), ("b", {})],
    ),
    # a block that is not a call stays text
    ("<tool_call>\nnot json\n</tool_call> ok", False, True, None, "<tool_call>\nnot json\n</tool_call> ok", []),
    # tools not requested: the tags are text
    (
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>',
        False,
        False,
        None,
        '<tool_call>\n{"name": "a", "arguments": {}}\n</tool_call>',
        [],
    ),
    # a call cut before </tool_call> that still parses
    ('<tool_call>\n{"name": "a", "arguments": {"k": 1}}', False, True, None, None, [("a", {"k": 1})]),
    # near-tags that are not tags
    ("<thinking> is not <think", False, False, None, "<thinking> is not <think", []),
]


def _run(text: str, start: bool, tools: bool, pieces: list[str]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    p = ChatOutputParser(CFG, tools=tools, start_in_reasoning=start)
    deltas = [p.feed(x) for x in pieces] + [p.finish()]
    msg = {
        "reasoning_content": "".join(d.get("reasoning_content", "") for d in deltas) or None,
        "content": "".join(d.get("content", "") for d in deltas) or None,
        "tool_calls": merge_tool_deltas([t for d in deltas for t in d.get("tool_calls", [])]) or None,
    }
    return msg, [t for d in deltas for t in d.get("tool_calls", [])]


def _chunkings(text: str):
    n = len(text)
    yield [text]
    yield list(text)
    for i in range(1, n):
        yield [text[:i], text[i:]]
    step = max(1, n // 25)  # pairs of cuts (a grid over long texts)
    for i, j in itertools.combinations(range(1, n, step), 2):
        yield [text[:i], text[i:j], text[j:]]


@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
def test_every_chunking_gives_the_same_message(case) -> None:
    text, start, tools, reasoning, content, calls = case
    whole = ChatOutputParser(CFG, tools=tools, start_in_reasoning=start).parse(text, [])
    assert whole["reasoning_content"] == reasoning
    assert whole["content"] == content
    got = [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in whole["tool_calls"] or []]
    assert got == calls
    for c in whole["tool_calls"] or []:
        assert c["type"] == "function" and c["id"].startswith("call_")
    for pieces in _chunkings(text):
        msg, tool_deltas = _run(text, start, tools, pieces)
        assert msg["reasoning_content"] == whole["reasoning_content"], pieces
        assert msg["content"] == whole["content"], pieces
        assert [(c["function"]["name"], c["function"]["arguments"]) for c in msg["tool_calls"] or []] == [
            (c["function"]["name"], c["function"]["arguments"]) for c in whole["tool_calls"] or []
        ], pieces
        # OpenAI's stream shape: a call's first delta has id, type and name; the others only arguments
        seen: set[int] = set()
        for d in tool_deltas:
            if d["index"] not in seen:
                seen.add(d["index"])
                assert d["id"].startswith("call_") and d["type"] == "function" and d["function"]["name"]
            else:
                assert set(d) == {"index", "function"} and set(d["function"]) == {"arguments"}


@pytest.mark.parametrize("pieces", [["<think>", "a", " b", "</think>", "\n\n", "ok"], list("<think>ab</think>ok")])
def test_reasoning_tokens_inside_the_block(pieces) -> None:
    # token i's text is pieces[i]: the tags, as one token each or written in pieces, are not counted
    # (in pieces, the ones that end a tag are not, the partial ones before are: one per char here)
    p = ChatOutputParser(CFG, tools=False, piece_of=lambda i: pieces[i])
    for i, x in enumerate(pieces):
        p.feed(x, [i])
    p.finish()
    inside = "".join(pieces).split("</think>")[0]
    assert p.reasoning_tokens == (2 if len(pieces) == 6 else len("ab") + len("</think>") - 1), inside
    off = ChatOutputParser(CFG, tools=False, piece_of=lambda i: "x")
    off.feed("xxx", [1, 2, 3])
    assert off.reasoning_tokens == 0


class _Vocab:
    def __init__(self, words: list[str]):
        self.words = words

    def get_vocab(self) -> dict[str, int]:
        return {w: i for i, w in enumerate(self.words)}


def test_parser_switches() -> None:
    qwen = _Vocab(["a", "<think>", "</think>", "<tool_call>", "</tool_call>"])
    auto = ParserConfig.for_tokenizer(qwen)
    assert (auto.reasoning, auto.tools, auto.think_start_id, auto.think_end_id) == ("qwen3", "hermes", 1, 2)
    plain = ParserConfig.for_tokenizer(_Vocab(["a", "b"]))  # not a Qwen3 tokenizer: auto is off
    assert (plain.reasoning, plain.tools) == ("none", "none")
    off = ParserConfig.for_tokenizer(qwen, reasoning="none", tools="none")
    p = ChatOutputParser(off, tools=True)
    assert not p.active  # the app sends text as it came
    assert ChatOutputParser(off, tools=False).parse("<think>x</think>y", []) == {
        "reasoning_content": None,
        "content": "<think>x</think>y",
        "tool_calls": None,
    }
    with pytest.raises(ValueError, match="reasoning_parser"):
        ParserConfig.for_tokenizer(qwen, reasoning="deepseek")
