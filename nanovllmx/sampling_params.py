"""Per-request sampling and stopping parameters (the offline API's and the HTTP API's contract)."""

from __future__ import annotations

from dataclasses import dataclass, field

from nanovllmx.structured.spec import GrammarSpec


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
        if not isinstance(self.ignore_eos, bool):
            bad(f"ignore_eos must be a boolean, got {self.ignore_eos!r}")
        if self.seed is not None and (not isinstance(self.seed, int) or isinstance(self.seed, bool)):
            bad(f"seed must be an integer or None, got {self.seed!r}")
        if self.structured is not None and not isinstance(self.structured, GrammarSpec):
            bad(f"structured must be a GrammarSpec or None, got {type(self.structured).__name__}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


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
