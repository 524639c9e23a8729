"""Output parsers for chat responses (streaming-safe: text may be split at any character):
Qwen3's reasoning (`<think>...</think>` -> reasoning_content) and Hermes-style tool calls
(`<tool_call>{"name": ..., "arguments": ...}</tool_call>` -> tool_calls), chained per choice by
`ChatOutputParser`."""

from nanovllmx.serve.parsers.chat import ChatOutputParser, ParserConfig
from nanovllmx.serve.parsers.reasoning import ReasoningParser
from nanovllmx.serve.parsers.tools import ToolCallParser

__all__ = ["ChatOutputParser", "ParserConfig", "ReasoningParser", "ToolCallParser"]
