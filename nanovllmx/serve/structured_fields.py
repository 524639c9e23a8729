"""The request fields that constrain a response, mapped to one GrammarSpec (or a 400 naming the
field): OpenAI's `response_format` and forced `tool_choice`, vLLM's `structured_outputs` and its
older `guided_*` fields. At most one per request. Whether the grammar compiles is checked when the
request is submitted (LLM.submit), also a 400 naming the field."""

from __future__ import annotations

import json
from typing import Any

from nanovllmx.serve.errors import APIError, bad_request
from nanovllmx.serve.protocol import ChatCompletionRequest, CompletionRequest
from nanovllmx.structured.spec import GrammarSpec, StructuredError

MAX_PARALLEL_TOOL_CALLS = 4  # tool_choice "required" with parallel_tool_calls: at most this many calls
_STRUCTURED_OUTPUTS_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _unsupported(msg: str, param: str) -> APIError:
    return bad_request(msg, param, "unsupported_parameter")


def _schema(value: Any, param: str) -> GrammarSpec:
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as e:
            raise bad_request(f"{param}: not valid JSON: {e}", param, "invalid_schema") from None
    try:
        return GrammarSpec.json_schema(value, param)
    except StructuredError as e:
        raise bad_request(str(e), param, "invalid_schema") from None


def _text(value: Any, param: str) -> str:
    if not isinstance(value, str) or not value:
        raise bad_request(f"{param} must be a non-empty string", param)
    return value


def _response_format(rf: dict[str, Any]) -> GrammarSpec | None:
    kind = rf.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return GrammarSpec("json_object", "", "response_format")
    if kind == "json_schema":
        js = rf.get("json_schema")
        if not isinstance(js, dict):
            raise bad_request("response_format.json_schema must be an object", "response_format.json_schema")
        if "schema" not in js:
            raise bad_request("response_format.json_schema.schema is required", "response_format.json_schema.schema")
        # strict or not, the output is held to the schema (OpenAI's strict: true behaviour)
        return _schema(js["schema"], "response_format.json_schema.schema")
    raise _unsupported(
        f"response_format.type must be text, json_object or json_schema, got {kind!r}", "response_format.type"
    )


def _structured_outputs(so: dict[str, Any]) -> GrammarSpec | None:
    set_keys = [k for k, v in so.items() if v is not None and v is not False]
    unknown = [k for k in set_keys if k not in _STRUCTURED_OUTPUTS_KEYS]
    if unknown:
        raise _unsupported(
            f"structured_outputs.{unknown[0]} is not supported (supported: {', '.join(_STRUCTURED_OUTPUTS_KEYS)})",
            f"structured_outputs.{unknown[0]}",
        )
    if len(set_keys) > 1:
        raise bad_request(f"structured_outputs takes one of {set_keys}, not several", "structured_outputs")
    if not set_keys:
        return None
    k = set_keys[0]
    param = f"structured_outputs.{k}"
    v = so[k]
    if k == "json":
        return _schema(v, param)
    if k == "json_object":
        return GrammarSpec("json_object", "", param)
    if k == "choice":
        try:
            return GrammarSpec.choice(v, param)
        except StructuredError as e:
            raise bad_request(str(e), param) from None
    return GrammarSpec("regex" if k == "regex" else "grammar", _text(v, param), param)


def tool_call_schema(tools: list[dict[str, Any]], name: str | None) -> dict[str, Any]:
    """JSON schema of one call {"name": ..., "arguments": {...}} of the named tool, or of any tool."""
    options = []
    for t in tools:
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise bad_request("each tool must be {'type': 'function', 'function': {'name': ...}}", "tools")
        if name is not None and fn["name"] != name:
            continue
        params = fn.get("parameters")
        if params is None:
            params = {"type": "object", "properties": {}}
        if not isinstance(params, dict):
            raise bad_request(f"tools: the parameters of {fn['name']!r} must be a JSON schema object", "tools")
        options.append(
            {
                "type": "object",
                "properties": {"name": {"const": fn["name"]}, "arguments": params},
                "required": ["name", "arguments"],
                "additionalProperties": False,
            }
        )
    return options[0] if len(options) == 1 else {"anyOf": options}


def forced_tool(body: ChatCompletionRequest) -> str | None:
    """The function a tool_choice names ({"type": "function", "function": {"name": ...}}), or None."""
    tc = body.tool_choice
    if not isinstance(tc, dict):
        return None
    fn = tc.get("function")
    if tc.get("type") != "function" or not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise bad_request(
            "tool_choice must be none, auto, required or {'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    return str(fn["name"])


def check_tool_choice(body: ChatCompletionRequest) -> None:
    tc = body.tool_choice
    if isinstance(tc, str) and tc not in ("none", "auto", "required"):
        raise bad_request(f"tool_choice must be none, auto, required or a named function, got {tc!r}", "tool_choice")
    name = forced_tool(body)
    if (tc == "required" or name is not None) and not body.tools:
        raise bad_request("tool_choice requires tools", "tool_choice")
    if name is not None:
        names = [t.get("function", {}).get("name") for t in body.tools or [] if isinstance(t, dict)]
        if name not in names:
            raise bad_request(f"tool_choice names {name!r}, which is not among the tools {names}", "tool_choice")


def grammar_of(body: ChatCompletionRequest | CompletionRequest) -> GrammarSpec | None:
    """The one grammar the request's fields ask for, or None; 400 when several are set."""
    found: list[tuple[str, GrammarSpec]] = []

    def add(param: str, spec: GrammarSpec | None) -> None:
        if spec is not None:
            found.append((param, spec))

    if isinstance(body, ChatCompletionRequest):
        if body.response_format:
            add("response_format", _response_format(body.response_format))
        name = forced_tool(body)
        if body.tools and (body.tool_choice == "required" or name is not None):
            k = 1 if (name is not None or body.parallel_tool_calls is False) else MAX_PARALLEL_TOOL_CALLS
            add("tool_choice", GrammarSpec.tool_calls(tool_call_schema(body.tools, name), k, "tool_choice"))
    if body.structured_outputs:
        add("structured_outputs", _structured_outputs(body.structured_outputs))
    if body.guided_json is not None:
        add("guided_json", _schema(body.guided_json, "guided_json"))
    if body.guided_regex is not None:
        add("guided_regex", GrammarSpec("regex", _text(body.guided_regex, "guided_regex"), "guided_regex"))
    if body.guided_choice is not None:
        try:
            add("guided_choice", GrammarSpec.choice(body.guided_choice, "guided_choice"))
        except StructuredError as e:
            raise bad_request(str(e), "guided_choice") from None
    if body.guided_grammar is not None:
        add("guided_grammar", GrammarSpec("grammar", _text(body.guided_grammar, "guided_grammar"), "guided_grammar"))
    for extra in ("guided_decoding_backend", "guided_whitespace_pattern"):
        if getattr(body, extra) is not None:
            raise _unsupported(f"{extra} is not supported (the grammar library is xgrammar)", extra)
    if len(found) > 1:
        raise bad_request(
            f"{found[1][0]} cannot be combined with {found[0][0]}: a response follows one grammar", found[1][0]
        )
    return found[0][1] if found else None
