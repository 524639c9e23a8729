"""One mapping between the OpenAI API and the engine, for chat and completions alike.

A request becomes prompt token ids (the chat template rendered, the text encoded, or the ids as
sent) and a `SamplingParams` (OpenAI's fields, the checkpoint's generation defaults, the context
length); what the engine returns becomes a non-streaming response. Where chat and completions
differ (which fields they refuse, `max_completion_tokens`, the names of their choices' fields),
the request's type decides.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Callable
from typing import Any, cast

from nanovllmx.engine.protocol import EngineClient
from nanovllmx.outputs import StreamDelta, TokenLogprob
from nanovllmx.sampling_params import MAX_LOGPROBS, SamplingParams
from nanovllmx.serve.errors import APIError, bad_request
from nanovllmx.serve.logprobs import CompletionLogprobsBuilder, TokenTexts, chat_logprobs, prompt_logprobs_json
from nanovllmx.serve.parsers import ChatOutputParser, ParserConfig
from nanovllmx.serve.prompt_jobs import PromptJobs, RenderTimeout, call_with_deadline
from nanovllmx.serve.protocol import (
    ChatCompletionChoice,
    ChatCompletionMessage,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogprobs,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeChatRequest,
    TokenizeCompletionRequest,
    TokenizeResponse,
    ToolCall,
    Usage,
    drop_none,
)
from nanovllmx.serve.structured_fields import check_tool_choice, grammar_of
from nanovllmx.structured.spec import GrammarSpec, StructuredError

OpenAIRequest = ChatCompletionRequest | CompletionRequest
# a chat choice's output parser (RequestMapping.output_parser): None for completions or parsers off
ParserFactory = Callable[[OpenAIRequest, list[int]], ChatOutputParser | None]

MAX_CHOICES = 64  # most `n` per request: each choice is an engine request (they share the prompt's KV)
_INT64_MAX = 2**63 - 1
# keys a client may not set through chat_template_kwargs: the app sets them
_RESERVED_TEMPLATE_KWARGS = (
    "conversation",
    "messages",
    "tokenize",
    "add_generation_prompt",
    "continue_final_message",
    "tools",
    "return_dict",
)
DEFAULT_CHAT_TEMPLATE_TIMEOUT_S = 5.0  # build_app's chat_template_timeout_s: a client template's render budget
DEFAULT_PROMPT_JOB_STUCK_AFTER_S = 60.0  # build_app's prompt_job_stuck_after_s: the health check fails past it
CLIENT_TEMPLATE_PARAM = "chat_template_kwargs.chat_template"


def generation_defaults(folder: str) -> dict[str, Any]:
    """Sampling defaults from the checkpoint's generation_config.json (as vLLM does by default)."""
    path = os.path.join(folder, "generation_config.json")
    try:
        with open(path) as f:
            gc = json.load(f)
    except (OSError, ValueError):
        return {}
    if gc.get("do_sample") is False:
        return {}
    return {
        k: gc[k]
        for k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")
        if isinstance(gc.get(k), (int, float)) and not isinstance(gc.get(k), bool)
    }


def param_of(message: str) -> str | None:
    """SamplingParams errors start with the field's name."""
    word = message.split(" ", 1)[0]
    return word if word in {f.name for f in dataclasses.fields(SamplingParams)} else None


def unsupported(message: str, param: str) -> APIError:
    return bad_request(message, param, "unsupported_parameter")


def usage_of_choices(
    lasts: list[StreamDelta | None], n_prompt: int, n: int | None = None, reasoning: int | None = None
) -> Usage:
    """Usage of a response with one choice per last delta, `n` choices per prompt (default: one
    prompt): each prompt counts once (as OpenAI's), completion tokens add up; cached tokens are
    those of each prompt's first choice. `reasoning`: the choices' reasoning tokens (chat with the
    reasoning parser), else None."""
    done = sum(d.num_output_tokens for d in lasts if d is not None)
    step = n or max(len(lasts), 1)
    cached = sum(d.num_cached_tokens for d in lasts[::step] if d is not None)
    return Usage.of(n_prompt, done, cached, reasoning)


@dataclasses.dataclass
class ChoiceResult:
    """One choice of a non-streaming response, collected from its deltas."""

    text: str
    token_ids: list[int]
    last: StreamDelta
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None


class RequestMapping:
    """Turns a validated OpenAI request into what the engine takes. One per replica."""

    def __init__(
        self,
        llm: EngineClient,
        defaults: dict[str, Any],
        trust_request_chat_template: bool = False,
        chat_template_timeout_s: float = DEFAULT_CHAT_TEMPLATE_TIMEOUT_S,
        reasoning_parser: str = "auto",
        tool_call_parser: str = "auto",
    ):
        self.llm = llm
        # a client's own chat template (chat_template_kwargs.chat_template) is refused unless the
        # operator trusts the clients; then it renders in Jinja's sandbox within chat_template_timeout_s
        self.trust_request_chat_template = trust_request_chat_template
        self.chat_template_timeout_s = chat_template_timeout_s
        self.jobs = PromptJobs()
        self.tokenizer = llm.tokenizer
        context_len = llm.config.context_len
        assert context_len is not None  # EngineConfig resolves it when the engine is built
        self.context_len: int = context_len
        self.vocab_size: int = llm.config.hf_config.vocab_size
        self.defaults = defaults  # generation_defaults(), or {} for OpenAI's
        self.texts = TokenTexts(self.tokenizer)  # token texts and bytes of logprobs and /tokenize
        # chat outputs: Qwen3's think block -> reasoning_content, Hermes tool calls -> tool_calls
        self.parsers = ParserConfig.for_tokenizer(self.tokenizer, reasoning_parser, tool_call_parser)

    # ------------------------------------------------------------------------- checks
    @staticmethod
    def check(body: OpenAIRequest) -> None:
        """400 for values this server does not take (the rest: `sampling_params`), and for constraints
        (response_format, tool_choice, structured_outputs, guided_*) it cannot take."""
        if body.n is not None and not 1 <= body.n <= MAX_CHOICES:
            raise bad_request(f"n must be between 1 and {MAX_CHOICES}, got {body.n}", "n")
        if body.prompt_logprobs is not None and body.stream:
            raise unsupported("prompt_logprobs is not supported with stream: true", "prompt_logprobs")
        if isinstance(body, ChatCompletionRequest):
            if body.top_logprobs is not None:
                if not 0 <= body.top_logprobs <= MAX_LOGPROBS:
                    raise bad_request(
                        f"top_logprobs must be between 0 and {MAX_LOGPROBS}, got {body.top_logprobs}", "top_logprobs"
                    )
                if body.top_logprobs > 0 and not body.logprobs:
                    raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
            check_tool_choice(body)
        else:
            if body.suffix:
                raise unsupported("suffix is not supported", "suffix")
            if body.best_of not in (None, 1):
                raise unsupported("best_of > 1 is not supported yet", "best_of")
        grammar_of(body)  # the fields' shapes now; whether the grammar compiles when submitted

    async def compile_grammar(self, spec: GrammarSpec) -> None:
        """Compile a request's grammar in the prompt-job pool (a stuck compile fails the health
        check like a stuck render); 400 naming the field if the library refuses it."""
        try:
            await self.jobs.run(self.llm.compile_grammar, spec)
        except StructuredError as e:
            raise bad_request(str(e), e.param, "invalid_grammar") from e

    def output_parser(self, body: OpenAIRequest, prompt_ids: list[int]) -> ChatOutputParser | None:
        """A chat choice's parser (reasoning, tool calls), or None: completions, or both parsers off."""
        if not isinstance(body, ChatCompletionRequest):
            return None
        cfg = self.parsers
        tail = prompt_ids[-4:]
        # a prompt ending inside an open think block (a thinking-only template): the output starts in it
        opened = cfg.think_start_id in tail and cfg.think_end_id not in tail
        p = ChatOutputParser(
            cfg,
            tools=bool(body.tools) and body.tool_choice != "none",
            start_in_reasoning=opened,
            piece_of=self._piece_of,
        )
        return p if p.active else None

    def _piece_of(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id]))

    # ------------------------------------------------------------------------- the prompt
    async def prompt_ids(self, body: OpenAIRequest) -> list[list[int]]:
        """Each prompt's token ids (one, but for a completions request with a list of prompts): chat
        rendered through the chat template, text encoded (both off the event loop), token ids as sent."""
        if isinstance(body, ChatCompletionRequest):
            return [await self.jobs.run(self.render_chat, body)]
        prompt = body.prompt
        prompts: list[str | list[int]]
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            prompts = list(prompt)
            if len(prompts) * (body.n or 1) > MAX_CHOICES:
                raise bad_request(
                    f"{len(prompts)} prompts x n={body.n or 1} choices; this server returns at most "
                    f"{MAX_CHOICES} choices per request",
                    "prompt",
                )
        else:
            prompts = [cast("str | list[int]", prompt)]
        out = []
        for p in prompts:
            if isinstance(p, str):
                try:
                    out.append(await self.jobs.run(self.llm.encode, p))
                except ValueError as e:  # e.g. far longer than the context: refused before it is all tokenized
                    raise bad_request(str(e), "prompt", "context_length_exceeded") from e
            else:
                out.append(list(p))
        return out

    def chat_messages(self, body: ChatCompletionRequest | TokenizeChatRequest) -> list[dict[str, Any]]:
        """The messages as the chat template takes them (text parts joined)."""
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content
            if isinstance(content, list):
                texts = []
                for j, part in enumerate(content):
                    if part.type != "text" or part.text is None:
                        raise bad_request(
                            f"messages[{i}].content[{j}]: content parts of type {part.type!r} are not "
                            "supported (text only)",
                            "messages",
                            "unsupported_content",
                        )
                    texts.append(part.text)
                content = "\n".join(texts)
            if content is None and m.role != "assistant":
                raise bad_request(
                    f"messages[{i}]: a {m.role} message needs content", "messages", "missing_required_parameter"
                )
            msg: dict[str, Any] = {
                "role": "system" if m.role == "developer" else m.role,
                "content": content if content is not None else "",
            }
            for extra in ("name", "tool_calls", "tool_call_id", "reasoning_content"):
                v = getattr(m, extra)
                if v is not None:
                    msg[extra] = v
            messages.append(msg)
        return messages

    def tokenize(self, body: TokenizeCompletionRequest | TokenizeChatRequest) -> TokenizeResponse:
        """vLLM's /tokenize: a prompt encoded, or chat messages rendered and encoded."""
        if isinstance(body, TokenizeChatRequest):
            ids = self.render_chat(body)
            if body.add_special_tokens:
                ids = self.tokenizer.build_inputs_with_special_tokens(ids)
        else:
            try:
                ids = self.tokenizer.encode(body.prompt, add_special_tokens=bool(body.add_special_tokens))
            except Exception as e:  # noqa: BLE001 - the input's fault
                raise bad_request(f"the prompt could not be tokenized: {e}", "prompt") from e
        strs = [self.texts.text(t) for t in ids] if body.return_token_strs else None
        return TokenizeResponse(count=len(ids), max_model_len=self.context_len, tokens=ids, token_strs=strs)

    def detokenize(self, body: DetokenizeRequest) -> DetokenizeResponse:
        if any(not 0 <= t < self.vocab_size for t in body.tokens):
            raise bad_request(f"tokens must be token ids of this model, in [0, {self.vocab_size})", "tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(body.tokens))

    def render_chat(self, body: ChatCompletionRequest | TokenizeChatRequest) -> list[int]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise bad_request("this model has no chat template; use /v1/completions", "messages", "no_chat_template")
        messages = self.chat_messages(body)
        kwargs = dict(body.chat_template_kwargs or {})
        for reserved in _RESERVED_TEMPLATE_KWARGS:
            if reserved in kwargs:
                raise bad_request(f"chat_template_kwargs may not set {reserved!r}", "chat_template_kwargs")
        client_template = kwargs.get("chat_template") is not None
        if client_template and not self.trust_request_chat_template:
            raise bad_request(
                f"{CLIENT_TEMPLATE_PARAM}: this server renders chats with the model's own chat template; "
                "templates sent by clients are refused (the operator may allow them: trust_request_chat_template)",
                CLIENT_TEMPLATE_PARAM,
                "chat_template_not_allowed",
            )
        tools = body.tools if getattr(body, "tool_choice", None) != "none" else None
        render_kwargs = dict(
            tools=tools or None,
            tokenize=False,
            add_generation_prompt=bool(body.add_generation_prompt) and not body.continue_final_message,
            continue_final_message=bool(body.continue_final_message),
            **kwargs,
        )
        try:
            if client_template:  # transformers renders in Jinja's ImmutableSandboxedEnvironment; and a budget
                text = call_with_deadline(
                    self.chat_template_timeout_s, tok.apply_chat_template, messages, **render_kwargs
                )
            else:
                text = tok.apply_chat_template(messages, **render_kwargs)
        except RenderTimeout as e:  # the input's fault, as any template error
            raise bad_request(
                f"{CLIENT_TEMPLATE_PARAM}: {e} (the budget of a client's template); nothing was generated",
                CLIENT_TEMPLATE_PARAM,
                "chat_template_timeout",
            ) from None
        except Exception as e:  # jinja2.TemplateError, ValueError from transformers, ... : the input's fault
            raise bad_request(
                f"the chat template could not render these messages: {type(e).__name__}: {e}",
                CLIENT_TEMPLATE_PARAM if client_template else "messages",
                "invalid_messages",
            ) from e
        try:
            return self.llm.encode(text)  # the same bounded encoding as a text prompt
        except ValueError as e:
            raise bad_request(str(e), "messages", "context_length_exceeded") from e

    # ------------------------------------------------------------------------- sampling
    def sampling_params(self, body: OpenAIRequest, n_prompt: int) -> SamplingParams:
        """OpenAI's sampling fields, else the checkpoint's defaults, else OpenAI's; max_tokens by
        default the rest of the context. 400 for a prompt or output that does not fit."""
        max_tokens: int | None
        if isinstance(body, ChatCompletionRequest):
            prompt_param = "messages"
            if body.max_completion_tokens is not None:
                max_tokens, max_param = body.max_completion_tokens, "max_completion_tokens"
            else:
                max_tokens, max_param = body.max_tokens, "max_tokens"
        else:
            prompt_param, max_tokens, max_param = "prompt", body.max_tokens, "max_tokens"
        ctx = self.context_len
        if n_prompt == 0:
            raise bad_request("the prompt is empty", prompt_param, "empty_prompt")
        if n_prompt >= ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens, but the prompt has "
                f"{n_prompt} tokens (at least one token must be left for the output).",
                prompt_param,
                "context_length_exceeded",
            )
        if max_tokens is None:
            max_tokens = ctx - n_prompt
        elif isinstance(max_tokens, int) and max_tokens >= 1 and n_prompt + max_tokens > ctx:
            raise bad_request(
                f"This model's maximum context length is {ctx} tokens. However, you "
                f"requested {n_prompt + max_tokens} tokens ({n_prompt} in the prompt, {max_tokens} "
                f"for the completion). Reduce the prompt or {max_param}.",
                max_param,
                "context_length_exceeded",
            )

        structured = grammar_of(body)
        defaults = self.defaults
        if structured is not None:  # a grammar takes no penalties (SamplingParams): not the checkpoint's either
            defaults = {k: v for k, v in defaults.items() if k != "repetition_penalty"}

        def pick(name: str, default: Any) -> Any:
            v = getattr(body, name)
            return v if v is not None else defaults.get(name, default)

        top_k = pick("top_k", -1)
        if isinstance(top_k, int) and top_k >= self.vocab_size:
            top_k = -1  # no cut-off, and keeps the engine's int32 arrays in range
        logit_bias = None
        if body.logit_bias:
            try:
                logit_bias = {int(k): v for k, v in body.logit_bias.items()}
            except ValueError:
                raise bad_request("logit_bias keys must be token ids (integers as strings)", "logit_bias") from None
        if isinstance(body, ChatCompletionRequest):
            logprobs = (body.top_logprobs or 0) if body.logprobs else None
            prompt_logprobs = body.prompt_logprobs
        else:
            logprobs = body.logprobs
            prompt_logprobs = body.prompt_logprobs
            if body.echo and logprobs is not None:  # echo shows the prompt's logprobs too
                prompt_logprobs = max(prompt_logprobs or 0, logprobs)
        seed = body.seed
        if seed is not None:
            if not -(2**63) <= seed <= _INT64_MAX:
                raise bad_request(f"seed must be a 64-bit integer, got {seed}", "seed")
            seed %= 2**63  # the engine treats negative seeds as "unseeded"
        try:
            return SamplingParams(
                temperature=pick("temperature", 1.0),
                top_p=pick("top_p", 1.0),
                top_k=top_k,
                min_p=pick("min_p", 0.0),
                max_tokens=max_tokens,
                stop=body.stop or [],
                stop_token_ids=body.stop_token_ids or [],
                ignore_eos=bool(body.ignore_eos),
                seed=seed,
                presence_penalty=pick("presence_penalty", 0.0),
                frequency_penalty=pick("frequency_penalty", 0.0),
                repetition_penalty=pick("repetition_penalty", 1.0),
                logit_bias=logit_bias,
                min_tokens=body.min_tokens or 0,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                skip_special_tokens=body.skip_special_tokens is not False,
                include_stop_str_in_output=bool(body.include_stop_str_in_output),
                structured=structured,
            )
        except ValueError as e:
            msg = str(e)
            param = param_of(msg)
            if param == "max_tokens":
                param, msg = max_param, msg.replace("max_tokens", max_param, 1)
            raise bad_request(msg, param) from e


def finish_reason_of(reason: str | None, num_tool_calls: int) -> str | None:
    """OpenAI's "tool_calls" for a choice that stopped after calling tools."""
    return "tool_calls" if num_tool_calls and reason == "stop" else reason


def full_response(
    body: OpenAIRequest,
    rid: str,
    created: int,
    name: str,
    prompts: list[list[int]],
    results: list[ChoiceResult],
    texts: TokenTexts,
    parser_of: ParserFactory | None = None,
) -> dict[str, Any]:
    """The non-streaming response's JSON: choice i answers prompt i // n (OpenAI's order); chat
    messages through `parser_of`'s output parsers (reasoning, tool calls)."""
    ids = bool(body.return_token_ids)
    n = max(len(results) // max(len(prompts), 1), 1)
    resp: dict[str, Any]
    if isinstance(body, ChatCompletionRequest):
        prompt_ids = prompts[0]
        top = body.top_logprobs or 0
        chat_choices = []
        reasoning: int | None = None
        for i, r in enumerate(results):
            parser = parser_of(body, prompt_ids) if parser_of is not None else None
            finish: str | None = r.last.finish_reason
            if parser is None:
                message = ChatCompletionMessage(content=r.text)
            else:
                m = parser.parse(r.text, r.token_ids)
                calls = [ToolCall.model_validate(c) for c in m["tool_calls"] or []]
                # an empty output keeps content "" (as without the parsers); null: only calls or reasoning
                empty = m["content"] is None and not calls and m["reasoning_content"] is None
                message = ChatCompletionMessage(
                    content="" if empty else m["content"],
                    reasoning_content=m["reasoning_content"],
                    tool_calls=calls or None,
                )
                finish = finish_reason_of(r.last.finish_reason, len(calls))
                if parser.reasoning is not None:
                    reasoning = (reasoning or 0) + parser.reasoning_tokens
            chat_choices.append(
                ChatCompletionChoice(
                    index=i,
                    message=message,
                    finish_reason=finish,
                    token_ids=r.token_ids if ids else None,
                    logprobs=ChatLogprobs.model_validate(chat_logprobs(texts, r.logprobs, top))
                    if r.logprobs is not None
                    else None,
                )
            )
        usage = usage_of_choices([r.last for r in results], len(prompt_ids), n, reasoning)
        resp = ChatCompletionResponse(
            id=rid,
            created=created,
            model=name,
            choices=chat_choices,
            usage=usage,
            prompt_token_ids=prompt_ids if ids else None,
            prompt_logprobs=prompt_logprobs_json(texts, prompt_ids, results[0].prompt_logprobs)
            if body.prompt_logprobs is not None
            else None,
        ).model_dump()
        drop_none(resp, ("prompt_token_ids", "prompt_logprobs"))
        resp["usage"] = usage.dump()
        for c in resp["choices"]:
            drop_none(c["message"], ("reasoning_content", "tool_calls"))
    else:
        usage = usage_of_choices([r.last for r in results], sum(map(len, prompts)), n)
        choices = []
        for i, r in enumerate(results):
            prompt_ids = prompts[i // n]
            text, lps = r.text, None
            if body.echo:
                text = echo_text(texts, prompt_ids) + text
            if body.logprobs is not None:
                b = CompletionLogprobsBuilder(texts, body.logprobs)
                seq: list[TokenLogprob | int] = list(r.logprobs or [])
                if body.echo:
                    seq = b.echoed(prompt_ids, r.prompt_logprobs) + seq
                lps = CompletionLogprobs.model_validate(b.build(seq))
            choices.append(
                CompletionChoice(
                    index=i,
                    text=text,
                    logprobs=lps,
                    finish_reason=r.last.finish_reason,
                    token_ids=r.token_ids if ids else None,
                    prompt_token_ids=prompt_ids if ids else None,
                    prompt_logprobs=prompt_logprobs_json(texts, prompt_ids, r.prompt_logprobs)
                    if body.prompt_logprobs is not None
                    else None,
                )
            )
        resp = CompletionResponse(id=rid, created=created, model=name, choices=choices, usage=usage).model_dump()
        resp["usage"] = usage.dump()
    for c in resp["choices"]:
        drop_none(c, ("token_ids", "prompt_token_ids", "prompt_logprobs"))
    return resp


def echo_text(texts: TokenTexts, prompt_ids: list[int]) -> str:
    """The prompt as echoed: its tokens' text (special tokens included)."""
    return "".join(texts.text(t) for t in prompt_ids)
