"""OpenAI-compatible request and response models (the subset Nano-vLLM-X serves).

Requests are validated by pydantic (wrong types -> 400 with OpenAI's error JSON); value checks
(ranges, context length) happen in the app through `SamplingParams`, so the offline API and the
HTTP API share one contract. Numbers, booleans and token ids are strict: `"0.5"` is not a float,
`true` is not a token id.

Fields that are accepted but not supported yet (logprobs, penalties, ...) are declared so
that the app can answer them with a clear 400 rather than silently ignoring them. Unknown fields
are ignored, as in vLLM.
"""
from __future__ import annotations

import time
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, StrictStr

Number = Union[StrictInt, StrictFloat]


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------------------------- requests
class StreamOptions(_Request):
    include_usage: Optional[StrictBool] = False
    # vLLM extension: a usage object on every chunk, not only on the last one
    continuous_usage_stats: Optional[StrictBool] = False


class ContentPart(_Request):
    """Only {"type": "text", "text": ...} is supported; other types (image_url, input_audio, ...)
    are parsed so that the app can refuse them with a clear 400."""
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Optional[Union[StrictStr, list[ContentPart]]] = None
    name: Optional[StrictStr] = None
    tool_calls: Optional[list[dict[str, Any]]] = None
    tool_call_id: Optional[StrictStr] = None
    reasoning_content: Optional[StrictStr] = None


class _SamplingFields(_Request):
    model: Optional[StrictStr] = Field(None, description="A served model name (GET /v1/models); "
                                                         "optional when one model is served")
    temperature: Optional[Number] = Field(None, description="default: the checkpoint's generation_config, else 1.0")
    top_p: Optional[Number] = None
    top_k: Optional[StrictInt] = Field(None, description="-1 or 0: disabled")
    min_p: Optional[Number] = None
    stop: Optional[Union[StrictStr, list[StrictStr]]] = None
    stop_token_ids: Optional[list[StrictInt]] = None
    ignore_eos: Optional[StrictBool] = False
    seed: Optional[StrictInt] = None
    stream: Optional[StrictBool] = False
    stream_options: Optional[StreamOptions] = None
    n: Optional[StrictInt] = Field(1, description="choices to generate for the prompt (1..64); with a seed, "
                                                   "choice i uses seed + i")
    user: Optional[StrictStr] = None
    # accepted, only their neutral values are supported
    presence_penalty: Optional[Number] = 0.0
    frequency_penalty: Optional[Number] = 0.0
    repetition_penalty: Optional[Number] = 1.0
    logit_bias: Optional[dict[str, Number]] = None
    # vLLM extension: return the prompt's and the generated token ids
    return_token_ids: Optional[StrictBool] = False


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[StrictInt] = Field(None, description="deprecated alias of max_completion_tokens")
    max_completion_tokens: Optional[StrictInt] = Field(
        None, description="default: the rest of the context (context_len - prompt tokens)")
    logprobs: Optional[StrictBool] = False
    top_logprobs: Optional[StrictInt] = None
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Optional[Union[StrictStr, dict[str, Any]]] = None
    parallel_tool_calls: Optional[StrictBool] = None
    response_format: Optional[dict[str, Any]] = None
    # vLLM extensions for the chat template
    add_generation_prompt: Optional[StrictBool] = True
    continue_final_message: Optional[StrictBool] = False
    chat_template_kwargs: Optional[dict[str, Any]] = Field(
        None, description="extra variables for the chat template, e.g. {\"enable_thinking\": false}")


class CompletionRequest(_SamplingFields):
    prompt: Union[StrictStr, list[StrictInt], list[StrictStr], list[list[StrictInt]]] = Field(
        ..., description="text, or token ids; a list of several prompts is not supported yet")
    max_tokens: Optional[StrictInt] = Field(16, description="default 16, as in OpenAI's API")
    logprobs: Optional[StrictInt] = None
    echo: Optional[StrictBool] = False
    suffix: Optional[StrictStr] = None
    best_of: Optional[StrictInt] = None


# ------------------------------------------------------------------------------------- responses
class PromptTokensDetails(BaseModel):
    cached_tokens: int = 0


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails = Field(default_factory=PromptTokensDetails)

    @classmethod
    def of(cls, prompt: int, completion: int, cached: int) -> "Usage":
        return cls(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                   prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))


class ChatCompletionMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: Optional[str] = None


class ChatCompletionChoice(BaseModel):
    index: int = 0
    message: ChatCompletionMessage
    logprobs: None = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = None  # with return_token_ids


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatCompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None
    prompt_token_ids: Optional[list[int]] = None  # with return_token_ids


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: Optional[str] = None
    token_ids: Optional[list[int]] = None  # with return_token_ids
    prompt_token_ids: Optional[list[int]] = None  # with return_token_ids


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage
    system_fingerprint: Optional[str] = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "nanovllmx"
    root: Optional[str] = None  # what `model` named: a folder, hub id or the demo name
    parent: Optional[str] = None
    max_model_len: Optional[int] = None
    random_weights: bool = False
    description: Optional[str] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorInfo(BaseModel):
    message: str
    type: str
    param: Optional[str] = None
    code: Optional[str] = None


class ErrorResponse(BaseModel):
    error: ErrorInfo


def drop_none(d: dict, keys: tuple[str, ...]) -> dict:
    """Remove optional extension keys (e.g. token_ids) that were not asked for."""
    for k in keys:
        if d.get(k) is None:
            d.pop(k, None)
    return d
