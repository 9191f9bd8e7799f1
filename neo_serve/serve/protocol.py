"""OpenAI completions protocol: request and response models, and the error type.

Field names, defaults and response shapes follow OpenAI's legacy `/v1/completions`; `top_k`,
`repetition_penalty`, `stop_token_ids`, `ignore_eos` and `skip_special_tokens` are the
extensions vLLM users know.
"""

from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationInfo, field_validator,
                      model_validator)

from neo_serve.engine.sampling_params import MAX_LOGPROBS, MAX_N


MAX_INT32 = 2**31 - 1  # bound of integer counts: larger values are certainly mistakes
# OpenAI takes at most 4 stop strings, vLLM any number; lm-evaluation-harness adds the EOS text to
# a task's own (often 4), so a cap of 4 would refuse its requests. Each string is searched for
# after every token, hence a bound.
MAX_STOP_STRINGS = 64
MAX_STOP_TOKEN_IDS = 1024


def is_encodable(text: str) -> bool:
    """Whether `text` can be sent as UTF-8 (JSON lets lone surrogates through as \\udXXX escapes)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _unicode_text(text: str) -> str:
    if not is_encodable(text):
        raise ValueError("must be valid Unicode text (it contains a lone surrogate)")
    return text


UnicodeText = Annotated[str, AfterValidator(_unicode_text)]  # JSON lets lone surrogates through


def _printable(text: str) -> str:
    """`text` with lone surrogates as backslash escapes, so that it can be encoded as UTF-8."""
    return text if is_encodable(text) else text.encode("utf-8", "backslashreplace").decode("utf-8")


class APIError(Exception):
    """An error with its HTTP status, rendered as OpenAI's error JSON."""

    def __init__(self, message: str, *, status: int = 400, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, retry_after_s: int | None = None,
                 retryable: bool | None = None) -> None:
        # A lone surrogate (a JSON escape like "\ud800" in a field name or value) written into an
        # exception's text is fatal: Ray fails to encode it as UTF-8 and the replica's actor exits.
        message, param = _printable(message), _printable(param) if param is not None else None
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code
        self.retry_after_s = retry_after_s  # sent as a Retry-After header (429 / 503)
        # False: the same request would fail the same way again. OpenAI's clients retry a 408 and
        # every 5xx by default (twice, each time from the start) unless `x-should-retry` says no.
        self.retryable = retryable

    @property
    def headers(self) -> dict[str, str] | None:
        headers = {}
        if self.retry_after_s is not None:
            headers["Retry-After"] = str(self.retry_after_s)
        if self.retryable is not None:
            headers["x-should-retry"] = "true" if self.retryable else "false"
        return headers or None

    def to_dict(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def error_name(exc: BaseException) -> str:
    """The error's class, or the class of the error a Ray task raised (not `RayTaskError(...)`):
    what a client may be told of an internal error, whose text (a replica's traceback: file
    paths, pid, node address) stays in the log."""
    cause = getattr(exc, "cause", None)
    return type(cause if isinstance(cause, BaseException) else exc).__name__


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt option must not be silently ignored

    include_usage: bool = Field(False, description="Send a last chunk with the usage of the whole request.")


Prompt = str | list[int]


def prompt_kind(value: Any) -> str:
    """Which form a raw prompt takes, told by its first element. A plain union would try every
    form and, for a list of 100,000 ids, build 100,000 errors for each form it is not."""
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and isinstance(value[0], (str, list)):
        return "texts" if isinstance(value[0], str) else "id_lists"
    return "ids"


PromptField = Annotated[
    Annotated[str, Tag("text")] | Annotated[list[str], Tag("texts")] | Annotated[list[int], Tag("ids")]
    | Annotated[list[list[int]], Tag("id_lists")],
    Discriminator(prompt_kind)]


def _id_lists(value: Any) -> list[list[int]]:
    """The token id lists of a validated `prompt` or `stop_token_ids` (none for text)."""
    if not isinstance(value, list) or not value:
        return []
    if isinstance(value[0], list):
        return value
    return [value] if isinstance(value[0], int) else []

# Fields whose null is read as "not given" (their defaults are not null). max_tokens keeps its own
# meaning of null (up to the context window).
NULL_MEANS_DEFAULT = frozenset({"temperature", "top_p", "n", "presence_penalty", "frequency_penalty",
                                "repetition_penalty", "echo", "stream", "ignore_eos", "skip_special_tokens",
                                "return_token_ids"})


class TokenizeRequest(BaseModel):
    """POST /tokenize body (vLLM's route and fields; lm-evaluation-harness's remote tokenizer)."""

    model_config = ConfigDict(extra="forbid")

    model: UnicodeText | None = Field(None, description="Served model name; may be omitted when one model is served.")
    prompt: UnicodeText = Field(..., description="Text to encode as the completions endpoint encodes a prompt.")
    add_special_tokens: bool = Field(True, description="Accepted for vLLM's clients; GPT-NeoX and GPT-Neo "
                                                       "tokenizers add no special tokens either way.")


# Bounds the ids pydantic reads on the router's event loop, which every stream of the replica shares.
MAX_DETOKENIZE_IDS = 2**20


class DetokenizeRequest(BaseModel):
    """POST /detokenize body (vLLM's route and fields)."""

    model_config = ConfigDict(extra="forbid")

    model: UnicodeText | None = Field(None, description="Served model name; may be omitted when one model is served.")
    tokens: list[Annotated[int, Field(ge=0, le=MAX_INT32)]] = Field(..., max_length=MAX_DETOKENIZE_IDS,
                                                                    description="Token ids to decode.")


class CompletionRequest(BaseModel):
    """POST /v1/completions body (and the keyword arguments of the handle's `generate`)."""

    # Unknown fields are refused (400 naming the field), as OpenAI does: a misspelt parameter
    # must not silently fall back to its default.
    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(None, description="Served model name; may be omitted when one model is served.")
    prompt: PromptField = Field(
        ..., description="A string, a list of strings, a list of token ids or a list of token id lists.")
    max_tokens: int | None = Field(16, ge=0, le=MAX_INT32, description="Tokens to generate per choice; null: up to the "
                                                         "context window.")
    temperature: float = Field(1.0, ge=0.0, description="0 (or below 1e-5) is greedy.")
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int | None = Field(None, ge=-1, le=MAX_INT32, description="Extension: keep the k most likely tokens (0/-1: off).")
    n: int = Field(1, ge=1, le=MAX_N, description="Choices per prompt.")
    best_of: int | None = Field(None, description="Only best_of == n is supported.")
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP_STRINGS} stop strings (not included in the text).")
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS,
                                             description="Extension: token ids that end a choice.")
    seed: int | None = Field(None, ge=-(2**63), le=2**63 - 1)  # signed 64-bit; see sampler.choice_seed
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    repetition_penalty: float = Field(1.0, gt=0.0, description="Extension: CTRL-style repetition penalty.")
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS, description="Return the log-probability of each "
                                                                         "token and the top N alternatives.")
    echo: bool = Field(False, description="Prepend the prompt (and its logprobs, with `logprobs`) to each choice.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    skip_special_tokens: bool = True
    return_token_ids: bool = Field(False, description="Extension: add `prompt_token_ids` and `token_ids` to "
                                                      "each choice.")
    suffix: str | None = None
    logit_bias: dict[int, float] | None = None  # token id -> bias (JSON keys: decimal strings)
    user: str | None = None
    timeout: float | None = Field(None, gt=0, allow_inf_nan=False, description=(
        "Extension: seconds this request may take, from its arrival at the router; past it the request ends "
        "with a 408 `request_timeout` error (or that error event in a stream) and its sequences are stopped. "
        "Can only shorten the model's `request_timeout_s`."))

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        # OpenAI's schema makes these nullable and its Python client sends null for a parameter
        # passed as None (e.g. temperature=args.temperature): null takes the default, as in vLLM.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None or k not in NULL_MEANS_DEFAULT}
        return data

    @field_validator("prompt")
    @classmethod
    def _non_empty(cls, value: Any) -> Any:
        if isinstance(value, list) and not value:
            raise ValueError("prompt must not be an empty list")
        return value

    @field_validator("prompt", "stop_token_ids")
    @classmethod
    def _token_ids_in_range(cls, value: Any) -> Any:
        # Bounded before anything formats them: a 5,000-digit int cannot even be printed. Checked
        # with min/max (C loops): a prompt of token ids may hold hundreds of thousands.
        for ids in _id_lists(value):
            if ids and (min(ids) < 0 or max(ids) > MAX_INT32):
                raise ValueError(f"token ids must be between 0 and {MAX_INT32}")
        return value

    @field_validator("model", "prompt", "stop", "user", "suffix")
    @classmethod
    def _valid_unicode(cls, value: Any) -> Any:
        # JSON lets a lone surrogate through ("\ud800"); no tokenizer or response can encode it.
        texts = value if isinstance(value, list) else [value]
        if texts and not isinstance(texts[0], str):
            return value  # token ids (the prompt's union is validated: a list holds one kind)
        for text in texts:
            if isinstance(text, str) and not is_encodable(text):
                raise ValueError("must be valid Unicode text (it contains a lone surrogate)")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_when_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        # As OpenAI and vLLM: options of a stream that will not be sent are a mistake to name.
        if value is not None and not info.data.get("stream"):
            raise ValueError("only allowed with stream: true")
        return value

    @field_validator("logit_bias", mode="before")
    @classmethod
    def _token_id_keys(cls, value: Any) -> Any:
        """Keys as token ids: JSON's decimal strings, or ints from a Python caller (the handle).
        Stricter than pydantic's own: no signs, spaces or other digits, no id given twice."""
        if not isinstance(value, dict):
            return value
        bias: dict[Any, Any] = {}
        for key, entry in value.items():
            if isinstance(key, str):
                if not (key.isascii() and key.isdigit()):
                    raise ValueError(f"keys must be token ids, got {key[:40]!r}")
                if len(key.lstrip("0")) > 12:  # past any vocabulary (and int() of thousands of digits is slow)
                    raise ValueError(f"token {key[:20]}... is outside the vocabulary")
                key = int(key)
            elif isinstance(key, bool) or not isinstance(key, int):
                raise ValueError(f"keys must be token ids, got {key!r}")
            if key in bias:
                raise ValueError(f"names token {key} twice")
            bias[key] = entry
        return bias

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value: Any) -> Any:
        if isinstance(value, list) and len(value) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences, got {len(value)}")
        return value

    def prompts(self) -> list[Prompt]:
        """The prompt field as a list of prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if all(isinstance(p, int) for p in prompt):
            return [list(prompt)]  # type: ignore[arg-type]
        return list(prompt)  # type: ignore[arg-type]

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionLogprobs(BaseModel):
    tokens: list[str] = Field(default_factory=list)
    token_logprobs: list[float | None] = Field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = Field(default_factory=list)
    text_offset: list[int] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length", "abort"] | None = None
    stop_reason: str | int | None = Field(None, description="Extension: the stop string or token that ended it.")
    prompt_token_ids: list[int] | None = Field(None, description="Extension (return_token_ids).")
    token_ids: list[int] | None = Field(None, description="Extension (return_token_ids): generated token ids.")


TOKEN_ID_FIELDS = {"prompt_token_ids", "token_ids"}


def dump_exclude(request: "CompletionRequest", *, stream: bool) -> dict[str, Any] | None:
    """Fields to leave out of a response: unrequested extensions, and usage on stream events
    unless `stream_options.include_usage`."""
    exclude: dict[str, Any] = {}
    if not request.return_token_ids:
        exclude["choices"] = {"__all__": TOKEN_ID_FIELDS}
    if stream and not request.include_usage:
        exclude["usage"] = True
    return exclude or None


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


def new_completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


class CompletionResponse(BaseModel):
    id: str = Field(default_factory=new_completion_id)
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo


class CompletionStreamResponse(BaseModel):
    """One server-sent event of a streamed completion."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "neo-serve"
    root: str | None = Field(None, description="The checkpoint path.")
    max_model_len: int | None = None
    num_stages: int = 1


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
