"""OpenAI completions on top of pipeline deployments: one code path for HTTP and handles.

A request with P prompts and n choices per prompt makes P streaming calls to the model's
pipeline (each computes its n sequences together); choice `p * n + i` is sequence i of
prompt p. Every call's first chunk is awaited before answering, so an invalid prompt is a
400 response rather than an error in the middle of a 200 event stream.
"""

from __future__ import annotations

import asyncio
import logging
import sys
import time
import unicodedata
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from neo_serve.engine.sampling_params import MAX_LOGIT_BIAS, SamplingParams
from neo_serve.errors import InvalidRequestError, PipelineFailed
from neo_serve.serve.config import RouteLimits
from neo_serve.serve.outputs import GenerationChunk, SequenceDelta, TokenLogprob
from neo_serve.serve.protocol import (MAX_STOP_STRINGS, MAX_STOP_TOKEN_IDS, APIError, CompletionChoice,
                                      CompletionLogprobs, CompletionRequest, CompletionResponse,
                                      CompletionStreamResponse, UsageInfo, dump_exclude, is_encodable,
                                      new_completion_id, prompt_kind)

logger = logging.getLogger("ray.serve")


Body = TypeVar("Body", bound=BaseModel)


def parse_request(body: Any) -> CompletionRequest:
    """Validate a request body (dict) into a CompletionRequest, or raise a 400 APIError."""
    return parse_body(CompletionRequest, body)


def parse_body(model: type[Body], body: Any) -> Body:
    """Validate a request body (dict) into `model`, or raise a 400 APIError naming the field."""
    if isinstance(body, model):
        return body
    if not isinstance(body, Mapping):
        raise APIError("the request body must be a JSON object")
    try:
        return model.model_validate(body)
    except ValidationError as exc:
        raise _validation_error(exc, prompt_union=model is CompletionRequest) from None


def _validation_error(exc: ValidationError, *, prompt_union: bool) -> APIError:
    error = exc.errors()[0]
    param = str(error["loc"][0]) if error["loc"] else None
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":  # name the whole path: stream_options.include_usge
        return APIError(f"{'.'.join(map(str, error['loc']))}: unknown parameter", param=param)
    if prompt_union and param == "prompt" and error["type"] != "value_error":
        # A union's errors list every alternative; name them instead.
        message = "must be a string, a list of strings, a list of token ids or a list of token id lists"
    return APIError(f"{param}: {message}" if param else message, param=param)


def sampling_params(request: CompletionRequest) -> SamplingParams:
    """Map OpenAI parameters onto the engine's SamplingParams (validated there too)."""
    if request.best_of is not None and request.best_of != request.n:
        raise APIError("best_of is only supported equal to n", param="best_of")
    if request.suffix:
        raise APIError("suffix is not supported", param="suffix")
    stop = [request.stop] if isinstance(request.stop, str) else list(request.stop or [])
    try:
        return SamplingParams(
            n=request.n, max_tokens=request.max_tokens, temperature=request.temperature, top_p=request.top_p,
            top_k=request.top_k or 0, repetition_penalty=request.repetition_penalty,
            presence_penalty=request.presence_penalty, frequency_penalty=request.frequency_penalty,
            seed=request.seed, stop=stop, stop_token_ids=list(request.stop_token_ids or []),
            ignore_eos=request.ignore_eos, logprobs=request.logprobs,
            # echo + logprobs scores the prompt too: what lm-evaluation-harness asks for.
            prompt_logprobs=request.logprobs if request.echo else None,
            skip_special_tokens=request.skip_special_tokens, logit_bias=request.logit_bias)
    except InvalidRequestError as exc:
        raise APIError(str(exc), param=exc.field) from None


def model_not_found(name: str, served: list[str]) -> APIError:
    return APIError(f"The model `{name}` does not exist. Served models: {', '.join(served)}",
                    status=404, param="model", code="model_not_found")  # OpenAI's type for it


RETRY_AFTER_UNAVAILABLE_S = 5  # a replaced pipeline replica reloads its stages: seconds, not one


def as_api_error(exc: BaseException) -> APIError | None:
    """The client-facing error behind an exception raised in a replica, if it is one."""
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, APIError):
        return cause
    if isinstance(cause, InvalidRequestError):
        return APIError(cause.args[0] if cause.args else "invalid request", param=cause.field)
    if isinstance(cause, BackPressureError):  # every replica busy and the queue full: refuse at once
        retry = int(cause.retry_after_s) if cause.retry_after_s is not None else None
        return APIError("the model's pipelines are at capacity and their queue is full; retry shortly",
                        status=cause.status_code, type="rate_limit_error", code="server_busy", retry_after_s=retry)
    if isinstance(cause, PipelineFailed):  # Serve is replacing the replica: retry later
        return APIError(f"the model's pipeline failed and is being restarted: {cause}", status=503,
                        type="service_unavailable_error", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
    if isinstance(cause, (RayActorError, DeploymentUnavailableError, ReplicaUnavailableError)):
        # The pipeline replica died with the request in it (a node lost, a scale-down past its
        # graceful shutdown), or Serve has none to route to yet: the request may succeed if retried.
        return APIError(f"the model's pipeline replica is unavailable ({type(cause).__name__}); retry shortly",
                        status=503, type="service_unavailable_error", retry_after_s=RETRY_AFTER_UNAVAILABLE_S)
    return None


def _logprobs_delta(entries: list[TokenLogprob], offset: int) -> tuple[CompletionLogprobs, int]:
    """OpenAI logprobs for `entries`, text offsets starting at `offset`; returns the next offset."""
    out = CompletionLogprobs()
    for entry in entries:
        out.tokens.append(entry.token)
        out.token_logprobs.append(entry.logprob)
        out.top_logprobs.append(entry.top)
        out.text_offset.append(offset + entry.earlier_chars)  # where the token's own text starts
        offset += entry.text_len
    return out, offset


@dataclass
class _Delta:
    """What one pipeline chunk adds to one choice (echoed prompt first, then generated)."""

    text: str = ""
    entries: list[TokenLogprob] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None


@dataclass
class _Choice:
    """One choice's state: accumulates for the full response, emits deltas for streaming."""

    index: int
    want_logprobs: bool
    prompt_token_ids: list[int] = field(default_factory=list)
    text: list[str] = field(default_factory=list)
    logprobs: CompletionLogprobs | None = None
    offset: int = 0  # text offset of the next token, in this choice's text
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: str | int | None = None

    def __post_init__(self) -> None:
        if self.want_logprobs:
            self.logprobs = CompletionLogprobs()

    def feed(self, text: str, entries: list[TokenLogprob] | None, token_ids: list[int],
             finish_reason: str | None = None, stop_reason: str | int | None = None) -> CompletionChoice:
        # As vLLM streams them: the prompt's ids once, in the choice's first delta.
        prompt_token_ids = None if self.text else self.prompt_token_ids
        self.text.append(text)
        self.token_ids.extend(token_ids)
        delta_logprobs = None
        if self.logprobs is not None:
            delta_logprobs, self.offset = _logprobs_delta(entries or [], self.offset)
            for name in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
                getattr(self.logprobs, name).extend(getattr(delta_logprobs, name))
        if finish_reason is not None:
            self.finish_reason, self.stop_reason = finish_reason, stop_reason
        return CompletionChoice(index=self.index, text=text, logprobs=delta_logprobs, finish_reason=finish_reason,
                                stop_reason=stop_reason, prompt_token_ids=prompt_token_ids, token_ids=token_ids)

    def final(self) -> CompletionChoice:
        return CompletionChoice(index=self.index, text="".join(self.text), logprobs=self.logprobs,
                                finish_reason=self.finish_reason, stop_reason=self.stop_reason,
                                prompt_token_ids=self.prompt_token_ids, token_ids=self.token_ids)


class _PromptState:
    """The choices of one prompt, fed by its pipeline stream."""

    def __init__(self, prompt_index: int, first: GenerationChunk, request: CompletionRequest) -> None:
        self.prompt_text = first.prompt or ""
        self.prompt_token_ids = list(first.prompt_token_ids or [])
        self.num_prompt_tokens = len(self.prompt_token_ids)
        self.echo_pending = request.echo
        self.want_prompt_logprobs = request.echo and request.logprobs is not None
        self.prompt_logprobs: list[TokenLogprob] = []
        # Sequence deltas that came while the echo waited for the prompt's scoring to finish.
        self.held: list[SequenceDelta] = []
        self.choices = [_Choice(prompt_index * request.n + i, request.logprobs is not None, self.prompt_token_ids)
                        for i in range(request.n)]

    def feed(self, chunk: GenerationChunk) -> list[CompletionChoice]:
        """The choice deltas of one pipeline chunk, at most one per choice."""
        if chunk.prompt_logprobs:
            self.prompt_logprobs.extend(chunk.prompt_logprobs)
        deltas: dict[int, _Delta] = {}
        sequences = chunk.sequences
        if self.echo_pending:
            prompt_scored = not self.want_prompt_logprobs or len(self.prompt_logprobs) >= self.num_prompt_tokens
            if not (prompt_scored or chunk.finished):
                # The echo leads each choice and carries every prompt logprob, and a prompt longer
                # than a step's token budget is scored over several steps: hold what the choices
                # sent meanwhile (other choices sampling, or max_tokens=0's "length" mark).
                self.held.extend(sequences)
                return []
            self.echo_pending = False
            entries = self.prompt_logprobs if self.want_prompt_logprobs else []
            deltas = {i: _Delta(self.prompt_text, list(entries)) for i in range(len(self.choices))}
            sequences, self.held = [*self.held, *sequences], []
        for seq in sequences:
            delta = deltas.setdefault(seq.index, _Delta())
            delta.text += seq.text
            delta.entries.extend(seq.logprobs or [])
            delta.token_ids.extend(seq.token_ids)
            if seq.finish_reason is not None:
                delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
        return [self.choices[i].feed(d.text, d.entries, d.token_ids, d.finish_reason, d.stop_reason)
                for i, d in sorted(deltas.items())]

    @property
    def num_completion_tokens(self) -> int:
        return sum(len(choice.token_ids) for choice in self.choices)


def request_timed_out(timeout_s: float) -> APIError:
    return APIError(f"the request did not finish within its deadline of {timeout_s:g} s (request field `timeout` "
                    "or the model's request_timeout_s); its sequences were stopped", status=408,
                    type="timeout_error", param="timeout", code="request_timeout", retryable=False)


# The most log-probability entries (a position's chosen token plus its top alternatives; without
# logprobs, an echoed or listed token) a non-streamed response may carry. The router builds such a
# response whole, at about 120 bytes of its memory an entry (measured: 5.4M entries, 145 MB of
# JSON, +650 MB), so this is about a GB; an lm-evaluation-harness batch (echo, logprobs=1, 64
# prompts of 2048 tokens) needs 262k.
MAX_RESPONSE_LOGPROB_ENTRIES = 8_000_000


class RequestBounds:
    """The per-model limits the router enforces on a request's size, before calling a pipeline.

    `check_raw` runs on the raw body, before pydantic: a body under the size limit can still hold
    a million prompts, token ids or keys, which take seconds to validate on the router's event
    loop, which every other stream of the replica shares. Counted with len(), they are refused in
    microseconds, with the message the full checks would give."""

    def __init__(self, limits: Mapping[str, RouteLimits]) -> None:
        self.limits = dict(limits)  # served name -> its RouteLimits

    def check_raw(self, body: Any) -> None:
        if not isinstance(body, Mapping):
            return  # parse_request names the problem
        unknown = next((key for key in body if key not in CompletionRequest.model_fields), None)
        if unknown is not None:
            if not is_encodable(str(unknown)):  # as pydantic answers it: no name to give back
                raise APIError("a field name is not valid Unicode text (it contains a lone surrogate)")
            raise APIError(f"{unknown}: unknown parameter", param=str(unknown))
        bias = body.get("logit_bias")
        if isinstance(bias, Mapping) and len(bias) > MAX_LOGIT_BIAS:  # before pydantic reads every entry
            raise APIError(f"logit_bias has {len(bias)} entries; at most {MAX_LOGIT_BIAS}", param="logit_bias")
        stop, stop_ids = body.get("stop"), body.get("stop_token_ids")
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:  # as the full checks say it
            raise APIError(f"stop: at most {MAX_STOP_STRINGS} stop sequences, got {len(stop)}", param="stop")
        if isinstance(stop_ids, list) and len(stop_ids) > MAX_STOP_TOKEN_IDS:
            raise APIError(f"stop_token_ids: List should have at most {MAX_STOP_TOKEN_IDS} items after validation, "
                           f"not {len(stop_ids)}", param="stop_token_ids")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt:
            return
        model = body.get("model")
        known = model if isinstance(model, str) and model in self.limits else None
        if known is None and model is None and len(self.limits) == 1:
            known = next(iter(self.limits))
        batch = prompt_kind(prompt) in ("texts", "id_lists")
        if batch:
            self.check_prompt_count(known, len(prompt))
        for index, ids in enumerate(prompt if batch else [prompt]):
            if isinstance(ids, list):
                # Named by its place in a batch, as the pipeline names the prompts it refuses.
                self.check_prompt_len(known, len(ids), label=f"prompt {index}: prompt" if batch else "prompt")

    def _largest(self, model: str | None, name: str) -> int | None:
        """`model`'s limit `name`, or with no model the largest of the served models' (None: no
        limit, or one not known to the router)."""
        values = [getattr(self.limits[m], name) for m in ([model] if model is not None else self.limits)]
        if not values or None in values:
            return None
        return max(values)

    def check_prompt_len(self, model: str | None, num_ids: int, label: str = "prompt") -> None:
        """Refuse a token-id prompt longer than the context window. The pipeline checks every
        prompt exactly (text too); this bounds the router's work on ids."""
        window = self._largest(model, "max_model_len")
        if window is not None and num_ids > window:
            raise APIError(f"{label} has {num_ids} tokens; the context window is {window}", param="prompt")

    @staticmethod
    def _response_size_bounded(request: CompletionRequest) -> bool:
        """Whether `check_response_size` bounds `request`: a response built whole (not streamed)
        with per-position output (logprobs, an echoed prompt or token ids)."""
        return not request.stream and (request.logprobs is not None or request.echo or request.return_token_ids)

    def needs_window(self, model: str, request: CompletionRequest) -> bool:
        """Whether `check_response_size` needs `model`'s context window, which the router does not
        know: a bounded request without max_tokens."""
        return (self._response_size_bounded(request) and request.max_tokens is None
                and self.limits[model].max_model_len is None)

    def learn_window(self, model: str, max_model_len: int) -> None:
        self.limits[model] = replace(self.limits[model], max_model_len=max_model_len)

    def check_response_size(self, model: str, request: CompletionRequest, prompts: list[str | list[int]]) -> None:
        """Refuse a non-streamed request whose per-position output could outgrow the router's
        memory (a response is built whole; a stream sends each choice's as they come): its
        logprobs, or an echoed prompt's text and token ids, copied into each of its `n` choices.
        Bounded from above: a prompt's tokens by its ids, or by the UTF-8 bytes of its NFC form
        (the tokenizers normalize to NFC first, which can triple the bytes; a token is at least
        one byte), and every sequence by the context window."""
        if not self._response_size_bounded(request):
            return
        window = self._largest(model, "max_model_len")
        generated = request.max_tokens if request.max_tokens is not None else window
        if generated is None:
            return  # no bound known (the caller asks a pipeline for the window first, see needs_window)
        positions = 0
        for prompt in prompts:
            scored = 0
            if request.echo:
                scored = len(prompt) if isinstance(prompt, list) else \
                    len(unicodedata.normalize("NFC", prompt).encode("utf-8", "surrogatepass"))
            positions += scored + generated if window is None else min(window, scored + generated)
        per_position = request.logprobs + 1 if request.logprobs is not None else 1
        entries = positions * request.n * per_position
        if entries > MAX_RESPONSE_LOGPROB_ENTRIES:
            raise APIError(
                f"this request's logprobs could reach {entries:,} entries ({len(prompts)} prompt(s), "
                f"n={request.n}, up to {positions:,} positions, {per_position} entries each), more than one "
                f"response may carry ({MAX_RESPONSE_LOGPROB_ENTRIES:,}): stream it (stream=true), or send fewer "
                "prompts per request, or lower logprobs, n or max_tokens", param="logprobs", code="response_too_large")

    def check_prompt_count(self, model: str | None, num_prompts: int) -> None:
        """Refuse a request with more prompts than the model's pipelines can ever take at once:
        each prompt is one call, and calls past the queue are refused, so such a request would get
        a 429 on every retry, even on an idle server."""
        limit = self._largest(model, "max_prompts_per_request")
        if limit is not None and num_prompts > limit:
            whose = f"model `{model}` takes at most {limit} per request (its" if model is not None else \
                f"the served models take at most {limit} per request (their"
            raise APIError(f"the request has {num_prompts} prompts; {whose} max_queued_requests): split the list "
                           "into several requests", param="prompt", code="too_many_prompts")


class CompletionService:
    """Runs completion requests against the models' pipeline deployment handles.

    `limits` gives each model's `RouteLimits`; a request's own `timeout` can only shorten the
    model's deadline. `log_requests` logs each request's prompts and outputs (off by default:
    prompts and outputs stay out of the logs)."""

    def __init__(self, pipelines: Mapping[str, Any], limits: Mapping[str, RouteLimits] | None = None,
                 log_requests: bool = False, caller: Any | None = None) -> None:
        self.pipelines = dict(pipelines)  # served name -> DeploymentHandle of its pipeline
        self.caller = caller  # this replica's own actor handle, sent with each call (see CallerWatch)
        self.streaming = {name: handle.options(stream=True) for name, handle in self.pipelines.items()}
        limits = limits or {}
        self.bounds = RequestBounds({name: limits.get(name, RouteLimits()) for name in self.pipelines})
        self._window_lookups: dict[str, asyncio.Future[dict[str, Any]]] = {}  # see learn_window
        self.log_requests = log_requests

    def timeout_for(self, model: str, request: CompletionRequest) -> float | None:
        model_timeout = self.bounds.limits[model].request_timeout_s
        limits = [t for t in (model_timeout, request.timeout) if t is not None]
        return min(limits) if limits else None

    def parse(self, body: Any) -> CompletionRequest:
        """Validate a request body: its bounds first (cheap, on the raw body), then its fields."""
        self.bounds.check_raw(body)
        return parse_request(body)

    async def learn_window(self, model: str, deadline: Deadline) -> None:
        """Ask one of `model`'s pipeline replicas for its context window: the app was built
        without reading the checkpoint (`verify_checkpoints: false`) or a `max_model_len`. One
        question per model at a time: each takes a place in the pipelines' request queue."""
        lookup = self._window_lookups.get(model)
        if lookup is None or (lookup.done() and (lookup.cancelled() or lookup.exception() is not None)):
            lookup = asyncio.ensure_future(self.pipelines[model].model_info.remote())
            self._window_lookups[model] = lookup
        try:
            info = await deadline.run(asyncio.shield(lookup))  # a caller's deadline ends only its wait
        except Exception as exc:  # noqa: BLE001 - no replica yet, the deadline: as a pipeline call's failure
            error = as_api_error(exc)
            if error is None:
                raise
            raise error from None
        self.bounds.learn_window(model, int(info["max_model_len"]))

    def resolve_model(self, name: str | None) -> str:
        if name is None:
            if len(self.pipelines) == 1:
                return next(iter(self.pipelines))
            raise APIError(f"model is required; served models: {', '.join(self.pipelines)}", param="model")
        if name not in self.pipelines:
            raise model_not_found(name, list(self.pipelines))
        return name

    async def complete(self, request: CompletionRequest) -> dict[str, Any]:
        """The whole completion (non-streaming), as the response's JSON-ready dict."""
        run = await _Run.start(self, request)
        async for _ in run.chunks():
            pass
        choices = [c.final() for state in run.states for c in state.choices]
        response = CompletionResponse(id=run.id, created=run.created, model=run.model, choices=choices,
                                      usage=run.usage())
        return response.model_dump(exclude=dump_exclude(request, stream=False))

    async def stream(self, request: CompletionRequest) -> "CompletionEvents":
        """Start a streamed completion. Awaiting this raises for invalid requests; the returned
        iterator yields the events (then a usage event with `stream_options.include_usage`), and
        its `aclose()` must be awaited when the caller is done with it, read or not."""
        return CompletionEvents(await _Run.start(self, request))


class CompletionEvents:
    """A started streamed completion's events. Its pipeline calls run from the start, so `aclose`
    cancels them, also when no event was read: an async generator that never started runs no
    `finally` (a client gone between the response's headers and its body)."""

    def __init__(self, run: "_Run") -> None:
        self._run = run
        self._events = run.events()

    def __aiter__(self) -> "CompletionEvents":
        return self

    async def __anext__(self) -> dict[str, Any]:
        return await self._events.__anext__()

    async def aclose(self) -> None:
        await self._events.aclose()
        _cancel(self._run.streams)  # a no-op for finished calls


class _Run:
    """One completion request in progress: its pipeline streams and choice states."""

    def __init__(self, model: str, request: CompletionRequest, streams: list[Any],
                 states: list[_PromptState], deadline: Deadline, log_requests: bool) -> None:
        self.id = new_completion_id()
        self.created = int(time.time())
        self.model = model
        self.request = request
        self.streams = streams
        self.states = states
        self.deadline = deadline
        self.log_requests = log_requests

    @classmethod
    async def start(cls, service: CompletionService, request: CompletionRequest) -> "_Run":
        model = service.resolve_model(request.model)
        prompts = request.prompts()
        service.bounds.check_prompt_count(model, len(prompts))
        deadline = Deadline(service.timeout_for(model, request))
        if service.bounds.needs_window(model, request):
            await service.learn_window(model, deadline)
        service.bounds.check_response_size(model, request, prompts)
        params = sampling_params(request)
        handle = service.streaming[model]
        base = uuid.uuid4().hex
        streams = [handle.generate.remote(prompt, params, f"{base}-{i}", caller=service.caller)
                   for i, prompt in enumerate(prompts)]
        try:
            firsts = await deadline.run(asyncio.gather(*(stream.__anext__() for stream in streams),
                                                       return_exceptions=True))
        except BaseException:  # cancelled or past the deadline while starting
            _cancel(streams)
            raise
        for index, first in enumerate(firsts):
            if isinstance(first, BaseException):
                _cancel(streams)
                error = as_api_error(first)
                if error is None:
                    raise first
                if len(prompts) > 1:
                    error = APIError(f"prompt {index}: {error.message}", status=error.status, type=error.type,
                                     param=error.param, code=error.code, retry_after_s=error.retry_after_s,
                                     retryable=error.retryable)
                raise error from None
        return cls(model, request, streams, [_PromptState(i, first, request) for i, first in enumerate(firsts)],
                   deadline, service.log_requests)

    def usage(self) -> UsageInfo:
        prompt = sum(s.num_prompt_tokens for s in self.states)
        completion = sum(s.num_completion_tokens for s in self.states)
        return UsageInfo(prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion)

    async def chunks(self) -> AsyncIterator[list[CompletionChoice]]:
        """Choice deltas as the pipelines' chunks arrive (prompts interleaved)."""
        merged = _merge(self.streams)
        try:
            while True:
                try:
                    index, chunk = await self.deadline.run(merged.__anext__())
                except StopAsyncIteration:
                    break
                deltas = self.states[index].feed(chunk)
                if deltas:
                    yield deltas
            if self.log_requests:
                self._log()
        finally:
            await merged.aclose()
            _cancel(self.streams)  # no-op for finished streams; aborts the rest (disconnects, deadline)

    def _log(self) -> None:
        """Only with `router.log_requests`: the request's prompts and outputs."""
        for state in self.states:
            for choice in state.choices:
                logger.info("neo-serve request %s model=%s choice=%d prompt=%r output=%r finish_reason=%s",
                            self.id, self.model, choice.index, state.prompt_text, "".join(choice.text),
                            choice.finish_reason)

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """The stream's events as JSON-ready dicts. With `include_usage`, every event has
        `usage: null` and a last event with no choices carries the request's usage (OpenAI)."""
        exclude = dump_exclude(self.request, stream=True)
        async for deltas in self.chunks():
            event = CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=deltas)
            yield event.model_dump(exclude=exclude)
        if self.request.include_usage:
            yield CompletionStreamResponse(id=self.id, created=self.created, model=self.model, choices=[],
                                           usage=self.usage()).model_dump(exclude=exclude)



class Deadline:
    """A request's deadline on this process's clock (None: none); `run` awaits within it and
    raises the 408 `request_timeout` APIError past it. The playground holds its runs to it too."""

    def __init__(self, timeout_s: float | None) -> None:
        self.timeout_s = timeout_s
        self.at = time.monotonic() + timeout_s if timeout_s is not None else None

    async def run(self, awaitable: Any) -> Any:
        if self.at is None:
            return await awaitable
        remaining = max(0.0, self.at - time.monotonic())
        try:
            if sys.version_info >= (3, 11):
                # Not wait_for: until Python 3.12 it returns the result instead of raising when
                # this task is cancelled (a client disconnect) as the awaited chunk arrives, and
                # Serve cancels only once, so the request's sequences would run on.
                async with asyncio.timeout(remaining):
                    return await awaitable
            return await asyncio.wait_for(awaitable, remaining)  # 3.10 has no asyncio.timeout
        except (asyncio.TimeoutError, TimeoutError):
            raise request_timed_out(self.timeout_s) from None


def _cancel(streams: list[Any]) -> None:
    for stream in streams:
        try:
            stream.cancel()
        except Exception:  # noqa: BLE001 - best effort: Serve's cancel re-raises a call's own
            pass           # failure (e.g. BackPressureError), which the caller already handles


async def _merge(streams: list[Any]) -> AsyncIterator[tuple[int, GenerationChunk]]:
    """Interleave several async streams, tagging each item with its stream's index."""
    if len(streams) == 1:
        async for chunk in streams[0]:
            yield 0, chunk
        return
    queue: asyncio.Queue[tuple[int, Any]] = asyncio.Queue()
    done = object()

    async def pump(index: int, stream: Any) -> None:
        try:
            async for chunk in stream:
                queue.put_nowait((index, chunk))
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((index, exc))
        else:
            queue.put_nowait((index, done))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield index, item
    finally:
        for task in tasks:
            task.cancel()
