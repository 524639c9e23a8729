"""OpenAI-compatible request and response models (the subset Nano-vLLM-X serves).

Requests are validated by pydantic (wrong types -> 400 with OpenAI's error JSON); value checks
(ranges, context length) happen in the app through `SamplingParams`, so the offline API and the
HTTP API share one contract. Numbers, booleans and token ids are strict: `"0.5"` is not a float,
`true` is not a token id.

Every declared field is honoured, or refused with a 400 naming it when it asks for what this
server does not do (tests/serve/test_serve.py walks them; docs/serving.md lists the few
accepted and ignored on purpose, such as `user`). Unknown fields are ignored, as in vLLM.
"""

from __future__ import annotations

import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = StrictInt | StrictFloat


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------- requests
class StreamOptions(_Request):
    include_usage: StrictBool | None = False
    # vLLM extension: a usage object on every chunk, not only on the last one
    continuous_usage_stats: StrictBool | None = False


class ContentPart(_Request):
    """Only {"type": "text", "text": ...} is supported; other types (image_url, input_audio, ...)
    are parsed so that the app can refuse them with a clear 400."""

    type: StrictStr
    text: StrictStr | None = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[ContentPart] | None = None
    name: StrictStr | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: StrictStr | None = None
    reasoning_content: StrictStr | None = None


class _SamplingFields(_Request):
    model: StrictStr | None = Field(
        None, description="A served model name (GET /v1/models); optional when one model is served"
    )
    temperature: Number | None = Field(None, description="default: the checkpoint's generation_config, else 1.0")
    top_p: Number | None = None
    top_k: StrictInt | None = Field(None, description="-1 or 0: disabled")
    min_p: Number | None = None
    stop: StrictStr | list[StrictStr] | None = None
    stop_token_ids: list[StrictInt] | None = None
    ignore_eos: StrictBool | None = False
    seed: StrictInt | None = None
    stream: StrictBool | None = False
    stream_options: StreamOptions | None = None
    n: StrictInt | None = Field(
        1, description="choices to generate for the prompt (1..64); with a seed, choice i uses seed + i"
    )
    user: StrictStr | None = Field(None, description="accepted and ignored")
    metadata: dict[str, StrictStr] | None = Field(None, description="accepted and ignored")
    presence_penalty: Number | None = Field(None, description="[-2, 2], over the output's tokens")
    frequency_penalty: Number | None = Field(None, description="[-2, 2], per occurrence in the output")
    repetition_penalty: Number | None = Field(None, description="vLLM: > 0, over prompt and output tokens")
    logit_bias: dict[str, Number] | None = Field(None, description="token id -> [-100, 100], at most 300")
    # vLLM extensions
    return_token_ids: StrictBool | None = False  # the prompt's and the generated token ids
    min_tokens: StrictInt | None = Field(None, description="EOS and stop_token_ids masked until this many tokens")
    include_stop_str_in_output: StrictBool | None = False
    skip_special_tokens: StrictBool | None = True
    prompt_logprobs: StrictInt | None = Field(None, description="logprobs of each prompt token (0..20)")
    # vLLM's structured outputs (one of json / regex / choice / grammar / json_object), and its
    # older guided_* fields (serve/structured_fields.py)
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: list[StrictStr] | None = None
    guided_grammar: StrictStr | None = None
    guided_decoding_backend: StrictStr | None = None
    guided_whitespace_pattern: StrictStr | None = None


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: StrictInt | None = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: StrictInt | None = Field(
        None, description="default: the rest of the context (context_len - prompt tokens)"
    )
    logprobs: StrictBool | None = False
    top_logprobs: StrictInt | None = Field(None, description="0..20, with logprobs: true")
    tools: list[dict[str, Any]] | None = None
    tool_choice: StrictStr | dict[str, Any] | None = None
    parallel_tool_calls: StrictBool | None = None
    response_format: dict[str, Any] | None = None
    # vLLM extensions for the chat template
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = Field(
        None, description='extra variables for the chat template, e.g. {"enable_thinking": false}'
    )


class CompletionRequest(_SamplingFields):
    prompt: StrictStr | list[StrictInt] | list[StrictStr] | list[list[StrictInt]] = Field(
        ..., description="text, token ids, or a list of several (choice index = prompt index * n + j)"
    )
    max_tokens: StrictInt | None = Field(16, description="default 16, as in OpenAI's API")
    logprobs: StrictInt | None = Field(None, description="0..20: the sampled token's and the most likely ones'")
    echo: StrictBool | None = Field(False, description="prepend the prompt (and its logprobs) to each choice")
    suffix: StrictStr | None = None
    best_of: StrictInt | None = None


# ------------------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class CompletionTokensDetails(BaseModel):
    reasoning_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)
    # chat with the reasoning parser on: the tokens of the think block
    completion_tokens_details: CompletionTokensDetails | None = None

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int, reasoning: int | None = None) -> Usage:
        return cls(
            prompt_tokens=prompt,
            completion_tokens=completion,
            total_tokens=prompt + completion,
            prompt_tokens_details=PromptTokensDetails(cached_tokens=cached),
            completion_tokens_details=None
            if reasoning is None
            else CompletionTokensDetails(reasoning_tokens=reasoning),
        )

    def dump(self) -> dict[str, Any]:
        """The JSON of the usage, without completion_tokens_details when not counted."""
        return drop_none(self.model_dump(), ("completion_tokens_details",))


class ToolCallFunction(BaseModel):
    name: str
    arguments: str  # JSON text


class ToolCall(BaseModel):
    id: str
    type: Literal["function"] = "function"
    function: ToolCallFunction


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None = None
    reasoning_content: str | None = None  # with the reasoning parser (omitted when None)
    tool_calls: list[ToolCall] | None = None  # omitted when None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None = None
    refusal: list[ChatTokenLogprob] | None = None


class CompletionLogprobs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, with prompt_logprobs


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    token_ids: list[int] | None = None  # with return_token_ids
    prompt_token_ids: list[int] | None = None  # with return_token_ids
    prompt_logprobs: list[dict[str, Any] | None] | None = None  # vLLM's, with prompt_logprobs


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: str | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanovllmx"
    root: str | None = None  # the hub id or demo name; for a local folder the served name (never its path)
    parent: str | None = None
    max_model_len: int | None = None
    random_weights: bool = False
    description: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeCompletionRequest(_Request):
    """vLLM's /tokenize with a prompt."""

    model: StrictStr | None = None
    prompt: StrictStr
    add_special_tokens: StrictBool | None = True
    return_token_strs: StrictBool | None = False


class TokenizeChatRequest(_Request):
    """vLLM's /tokenize with chat messages (rendered through the chat template, as for a chat completion)."""

    model: StrictStr | None = None
    messages: list[ChatMessage] = Field(..., min_length=1)
    add_generation_prompt: StrictBool | None = True
    continue_final_message: StrictBool | None = False
    add_special_tokens: StrictBool | None = False
    chat_template_kwargs: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    return_token_strs: StrictBool | None = False


class TokenizeResponse(BaseModel):
    count: int
    max_model_len: int
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeRequest(_Request):
    model: StrictStr | None = None
    tokens: list[StrictInt]


class DetokenizeResponse(BaseModel):
    prompt: str


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def drop_none(d: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    """Remove optional extension keys (e.g. token_ids) that were not asked for."""
    for k in keys:
        if d.get(k) is None:
            d.pop(k, None)
    return d
