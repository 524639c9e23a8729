"""Per-request sampling and stopping parameters (the offline API's and the HTTP API's contract)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllmx.structured.spec import GrammarSpec

MAX_LOGPROBS = 20  # most top logprobs per token (OpenAI's top_logprobs bound)
MAX_LOGIT_BIAS = 300  # most logit_bias entries per request (OpenAI's bound)


@dataclass
class SamplingParams:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1  # -1 (or 0): no top-k
    min_p: float = 0.0
    max_tokens: int = 16
    stop: list[str] | str = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    # constrained decoding: every sampled token keeps the output a prefix of the grammar's language
    # (nanovllmx/structured/); compiled, and refused if invalid, when the request is submitted
    structured: GrammarSpec | None = None
    # penalties and biases (vLLM's semantics; nanovllmx/worker/logits_processing.py applies them)
    presence_penalty: float = 0.0  # [-2, 2], subtracted once from every token the output holds
    frequency_penalty: float = 0.0  # [-2, 2], subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # > 0, tokens of the prompt or output: positive logits / p, negative * p
    logit_bias: dict[int, float] | None = None  # token id -> bias in [-100, 100], added to the logit
    min_tokens: int = 0  # EOS and stop_token_ids are masked until this many tokens were generated
    # logprobs (of the model's log-softmax, before any of the adjustments above or temperature)
    logprobs: int | None = None  # None: none; k: the sampled token's and the k most likely (0..20)
    prompt_logprobs: int | None = None  # None: none; k: each prompt token's and the k most likely (0..20)
    # text
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, limits: RequestLimits | None = None) -> None:
        """Normalise `stop` (a string is one stop string) and raise ValueError for a bad value; the
        message starts with the field's name. With `limits`, also the engine's per-request bounds."""
        if isinstance(self.stop, str):  # also when set after construction: never a list of characters
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        if limits is not None:  # counts first: a huge list is refused before anything walks it
            limits.check(self)

        def bad(msg: str) -> None:
            raise ValueError(msg)

        def is_num(x: object) -> bool:
            return isinstance(x, (int, float)) and not isinstance(x, bool)

        if not is_num(self.temperature) or not (0.0 <= self.temperature < float("inf")):
            bad(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not is_num(self.top_p) or not (0.0 < self.top_p <= 1.0):
            bad(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < -1:
            bad(f"top_k must be an integer >= 1, or -1/0 to disable, got {self.top_k!r}")
        if not is_num(self.min_p) or not (0.0 <= self.min_p <= 1.0):
            bad(f"min_p must be in [0, 1], got {self.min_p!r}")
        if not isinstance(self.max_tokens, int) or isinstance(self.max_tokens, bool) or self.max_tokens < 1:
            bad(f"max_tokens must be an integer >= 1, got {self.max_tokens!r}")
        if not all(isinstance(s, str) and s for s in self.stop):
            bad(f"stop must be a non-empty string or a list of non-empty strings, got {self.stop!r}")
        if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in self.stop_token_ids):
            bad(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        for name in ("ignore_eos", "skip_special_tokens", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name} must be a boolean, got {getattr(self, name)!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.structured is not None and not isinstance(self.structured, GrammarSpec):
            bad(f"structured must be a GrammarSpec or None, got {type(self.structured).__name__}")
        for name in ("presence_penalty", "frequency_penalty"):
            v = getattr(self, name)
            if not is_num(v) or not -2.0 <= v <= 2.0:
                bad(f"{name} must be in [-2, 2], got {v!r}")
        if not is_num(self.repetition_penalty) or not 0.0 < self.repetition_penalty < float("inf"):
            bad(f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty!r}")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                bad(f"logit_bias must be a mapping of token ids to numbers, got {self.logit_bias!r}")
            for t, b in self.logit_bias.items():
                if not isinstance(t, int) or isinstance(t, bool) or t < 0:
                    bad(f"logit_bias keys must be token ids (non-negative integers), got {t!r}")
                if not is_num(b) or not -100.0 <= b <= 100.0:
                    bad(f"logit_bias values must be in [-100, 100], got {b!r} for token {t}")
        if not isinstance(self.min_tokens, int) or isinstance(self.min_tokens, bool) or self.min_tokens < 0:
            bad(f"min_tokens must be an integer >= 0, got {self.min_tokens!r}")
        if isinstance(self.max_tokens, int) and self.min_tokens > self.max_tokens:
            bad(f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= MAX_LOGPROBS):
                bad(f"{name} must be an integer in [0, {MAX_LOGPROBS}] or None, got {v!r}")
        if self.structured is not None:
            # a constrained row is resampled from its raw logits under the grammar's mask after the
            # batch's sampling (worker/model_runner.py), so these would silently not apply
            for name in _UNCONSTRAINED_ONLY:
                if getattr(self, name) not in (getattr(_NEUTRAL, name), {}):
                    bad(f"{name} cannot be combined with structured outputs (a grammar) yet")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_history(self) -> bool:
        """The sampler needs the request's token ids so far (penalties)."""
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @property
    def adjusts_logits(self) -> bool:
        """Any logits processing before sampling (penalties, logit_bias, min_tokens)."""
        return self.needs_history or bool(self.logit_bias) or self.min_tokens > 0


_NEUTRAL = SamplingParams()
# the fields a request under a grammar must leave at their defaults
_UNCONSTRAINED_ONLY = (
    "logprobs",
    "prompt_logprobs",
    "min_tokens",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "logit_bias",
)


@dataclass(frozen=True)
class RequestLimits:
    """Bounds on the work one request may ask for, checked before any is done (each a 400 over
    HTTP). From `EngineConfig` (max_stop_strings, max_stop_str_len, max_stop_token_ids); the stop
    strings are matched against the text at every token, so their number and length bound that cost."""

    vocab_size: int
    max_stop_strings: int
    max_stop_str_len: int
    max_stop_token_ids: int

    def check(self, p: SamplingParams) -> None:
        stop, ids = p.stop, p.stop_token_ids
        if len(stop) > self.max_stop_strings:
            raise ValueError(f"stop has {len(stop)} strings; this server accepts at most {self.max_stop_strings}")
        longest = max((len(s) for s in stop if isinstance(s, str)), default=0)
        if longest > self.max_stop_str_len:
            raise ValueError(
                f"stop has a string of {longest} characters; this server accepts at most {self.max_stop_str_len}"
            )
        if len(ids) > self.max_stop_token_ids:
            raise ValueError(
                f"stop_token_ids has {len(ids)} ids; this server accepts at most {self.max_stop_token_ids}"
            )
        if any(isinstance(t, int) and not isinstance(t, bool) and t >= self.vocab_size for t in ids):
            raise ValueError(f"stop_token_ids must be token ids of this model, in [0, {self.vocab_size})")
        bias = p.logit_bias if isinstance(p.logit_bias, dict) else {}
        if len(bias) > MAX_LOGIT_BIAS:
            raise ValueError(f"logit_bias has {len(bias)} entries; this server accepts at most {MAX_LOGIT_BIAS}")
        if any(isinstance(t, int) and not isinstance(t, bool) and t >= self.vocab_size for t in bias):
            raise ValueError(f"logit_bias keys must be token ids of this model, in [0, {self.vocab_size})")
