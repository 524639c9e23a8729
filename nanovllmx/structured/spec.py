"""What a request asks its output to match: plain, picklable, no grammar library needed to build
one (it rides in SamplingParams from the HTTP layer to the scheduler, also across Ray)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

GrammarKind = Literal["json", "json_object", "regex", "choice", "grammar", "tool_calls"]
KINDS: tuple[str, ...] = ("json", "json_object", "regex", "choice", "grammar", "tool_calls")


class StructuredError(ValueError):
    """A grammar the library refuses (invalid schema, unsupported feature, bad regex): a 400 naming
    `param`, the request field it came from."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param or message.split(":", 1)[0]


@dataclass(frozen=True)
class GrammarSpec:
    """kind: "json" (value: a JSON schema, as JSON text), "json_object" (any JSON object; value
    unused), "regex", "choice" (value: a JSON list of strings), "grammar" (EBNF, xgrammar's GBNF
    dialect), "tool_calls" (value: {"schema": one call's JSON schema, "max_calls": K} as JSON: 1..K
    Hermes blocks `<tool_call>\n{call}\n</tool_call>` separated by newlines). `field` names the
    request field it came from, for error messages."""

    kind: GrammarKind
    value: str = ""
    field: str = "structured_outputs"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise StructuredError(f"{self.field}: unknown grammar kind {self.kind!r}")
        if not isinstance(self.value, str):
            raise StructuredError(f"{self.field}: the grammar must be given as text")

    @classmethod
    def json_schema(cls, schema: object, field: str) -> GrammarSpec:
        if isinstance(schema, bool):  # JSON schema's `true`: anything
            schema = {}
        if not isinstance(schema, dict):
            raise StructuredError(f"{field}: a JSON schema must be an object, got {type(schema).__name__}")
        return cls("json", json.dumps(schema, sort_keys=True), field)

    @classmethod
    def choice(cls, options: object, field: str) -> GrammarSpec:
        if not isinstance(options, list) or not options or not all(isinstance(o, str) for o in options):
            raise StructuredError(f"{field}: must be a non-empty list of strings")
        return cls("choice", json.dumps(options), field)

    @classmethod
    def tool_calls(cls, call_schema: dict[str, object], max_calls: int, field: str) -> GrammarSpec:
        return cls("tool_calls", json.dumps({"schema": call_schema, "max_calls": max_calls}, sort_keys=True), field)

    @property
    def key(self) -> tuple[str, str]:
        """The compiled-grammar cache key."""
        return (self.kind, self.value)
