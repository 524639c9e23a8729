"""Structured outputs: grammars (JSON schema, regex, choice, EBNF) compiled by xgrammar, a matcher
per constrained request on the scheduler side, and the packed int32 token bitmasks the sampler
applies (docs/serving.md, "Structured outputs"; why xgrammar: docs/benchmarks.md)."""

from nanovllmx.structured.spec import GrammarSpec, StructuredError

__all__ = ["GrammarSpec", "StructuredError"]
