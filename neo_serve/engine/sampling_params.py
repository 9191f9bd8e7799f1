"""Per-request sampling parameters, validated where they are built (vLLM's names and defaults)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from neo_serve.errors import InvalidRequestError

MAX_N = 16
MAX_LOGPROBS = 20
MAX_LOGIT_BIAS = 1024  # entries per request (OpenAI sets none; each costs the sampler a write)
LOGIT_BIAS_RANGE = (-100.0, 100.0)  # OpenAI's: -100 bans a token, 100 all but forces it
MAX_TOP_K = 2**31 - 1  # past any vocabulary; the sampler holds top_k in int64 tensors
SEED_RANGE = (-(2**63), 2**63 - 1)  # a signed 64-bit integer, as vLLM and OpenAI take
# Temperatures below this sample greedily (vLLM instead raises those under 0.01 to 0.01): dividing
# float32 logits by a far smaller temperature overflows to inf, and the softmax of inf is NaN.
GREEDY_BELOW_TEMPERATURE = 1e-5


@dataclass(kw_only=True)
class SamplingParams:
    """How to generate for one request.

    temperature 0 (or below 1e-5) is greedy; `seed` -1 is no seed, as in vLLM. `top_k` 0 or -1
    disables top-k. `logprobs=N` returns, for each generated token, its log-probability and the N
    most likely alternatives; `prompt_logprobs=N` the same for each prompt token (given the
    tokens before it).
    `logit_bias` maps token ids to a number in [-100, 100] added to their logits before
    sampling, as OpenAI's. Log-probabilities are those of the model's distribution, before
    temperature, penalties, logit_bias or truncation (vLLM's default too).
    """

    n: int = 1
    max_tokens: int | None = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    logit_bias: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self._check_int("n", self.n, low=1, high=MAX_N)
        if self.max_tokens is not None:
            self._check_int("max_tokens", self.max_tokens, low=0)
        self._check_number("temperature", self.temperature, low=0.0)
        self._check_number("top_p", self.top_p)
        if not 0.0 < self.top_p <= 1.0:
            raise InvalidRequestError(f"top_p must be in (0, 1], got {self.top_p}", field="top_p")
        self._check_int("top_k", self.top_k, low=-1, high=MAX_TOP_K)
        self._check_number("repetition_penalty", self.repetition_penalty)
        if self.repetition_penalty <= 0.0:
            raise InvalidRequestError(
                f"repetition_penalty must be > 0, got {self.repetition_penalty}", field="repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            self._check_number(name, value)
            if not -2.0 <= value <= 2.0:
                raise InvalidRequestError(f"{name} must be in [-2, 2], got {value}", field=name)
        if type(self.seed) is int and self.seed == -1:
            self.seed = None  # vLLM's "no seed": a client written for vLLM gets fresh samples
        if self.seed is not None:
            self._check_int("seed", self.seed, low=SEED_RANGE[0], high=SEED_RANGE[1])
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None:
                self._check_int(name, value, low=0, high=MAX_LOGPROBS)
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequestError("stop must be non-empty strings", field="stop")
        for token_id in self.stop_token_ids:
            self._check_int("stop_token_ids", token_id, low=0)
        self.logit_bias = self._checked_logit_bias(self.logit_bias)

    @classmethod
    def _checked_logit_bias(cls, bias: object) -> dict[int, float]:
        """{token id: float bias}; the ids are checked against the model's vocabulary where the
        request is added (the engine knows it)."""
        if bias is None:
            return {}
        if not isinstance(bias, dict):
            raise InvalidRequestError(f"logit_bias must map token ids to numbers, got {_short(bias)}",
                                      field="logit_bias")
        if len(bias) > MAX_LOGIT_BIAS:
            raise InvalidRequestError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}",
                                      field="logit_bias")
        low, high = LOGIT_BIAS_RANGE
        checked: dict[int, float] = {}
        for token_id, value in bias.items():
            if isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0:
                raise InvalidRequestError(f"logit_bias keys must be token ids (integers >= 0), got "
                                          f"{_short(token_id)}", field="logit_bias")
            cls._check_number("logit_bias", value)
            if not low <= value <= high:
                raise InvalidRequestError(f"logit_bias of token {token_id} must be in [{low:g}, {high:g}], "
                                          f"got {value}", field="logit_bias")
            checked[token_id] = float(value)
        return checked

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW_TEMPERATURE

    @property
    def argmax_only(self) -> bool:
        """The sample is the most likely token and nothing else of the logits is needed
        (greedy, no penalties, no logit_bias, no logprobs)."""
        return self.greedy and not self.changes_logits and self.logprobs is None

    @property
    def has_penalties(self) -> bool:
        return (self.repetition_penalty != 1.0 or self.presence_penalty != 0.0
                or self.frequency_penalty != 0.0)

    @property
    def changes_logits(self) -> bool:
        """Penalties or a logit_bias: the sampler works on this row's logits before it picks."""
        return self.has_penalties or bool(self.logit_bias)

    @staticmethod
    def _check_int(name: str, value: object, *, low: int | None = None, high: int | None = None) -> None:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InvalidRequestError(f"{name} must be an integer, got {value!r}", field=name)
        if low is not None and value < low:
            raise InvalidRequestError(f"{name} must be >= {low}, got {_short(value)}", field=name)
        if high is not None and value > high:
            raise InvalidRequestError(f"{name} must be <= {high}, got {_short(value)}", field=name)

    @staticmethod
    def _check_number(name: str, value: object, *, low: float | None = None) -> None:
        # Finite, as float: the sampler puts every row's value in one tensor, so an overflow
        # there (10**400, inf) would fail the whole batch instead of this request.
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
            raise InvalidRequestError(f"{name} must be a finite number, got {_short(value)}", field=name)
        if low is not None and value < low:
            raise InvalidRequestError(f"{name} must be >= {low}, got {value}", field=name)


def _finite(value: int | float) -> bool:
    try:
        return math.isfinite(float(value))
    except OverflowError:  # an int past float's range
        return False


def _short(value: object) -> str:
    """A value for an error message (an int of thousands of digits cannot even be printed)."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return f"an integer of about {int(value.bit_length() * math.log10(2)) + 1} digits"
    return repr(value)[:80]
