"""What the playground does with a prompt: pick a pipeline replica, stream its tokens, time them.

No Gradio here: `PlaygroundBackend.generate` takes a `Run` and updates it as the pipeline's
`GenerationChunk`s arrive; `blocks.py` renders it. Errors become `PlaygroundError`s (a title and
one readable sentence, never a traceback).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.serve.outputs import GenerationChunk
from neo_serve.serve.protocol import APIError, is_encodable

logger = logging.getLogger("ray.serve")


@dataclass(frozen=True)
class PlaygroundModel:
    """A served model as the playground lists it."""

    name: str
    deployment: str  # the Serve deployment of its pipelines, e.g. Pipeline-neo-demo
    num_stages: int
    max_model_len: int | None = None
    request_timeout_s: float | None = None  # the model's deadline for a run, as the router's for a request


class PlaygroundError(Exception):
    """A failed run, said for people: `title` (e.g. "Prompt too long") and a sentence."""

    def __init__(self, title: str, message: str) -> None:
        super().__init__(message)
        self.title = title
        self.message = message


@dataclass
class Run:
    """One generation as the playground shows it; times are `time.monotonic()` seconds."""

    model: PlaygroundModel
    submitted: float = field(default_factory=lambda: time.monotonic())
    replica: str | None = None  # the pipeline replica serving it
    prompt_tokens: int | None = None
    text: str = ""
    generated_tokens: int = 0
    first_token_at: float | None = None
    last_token_at: float | None = None
    ended_at: float | None = None
    finish_reason: str | None = None  # the engine's: stop | length | abort
    stop_reason: str | int | None = None
    stopped: bool = False  # by the user (Stop button, a cancelled API call)
    error: PlaygroundError | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event, repr=False)

    def feed(self, chunk: GenerationChunk) -> None:
        now = time.monotonic()
        if chunk.prompt_token_ids is not None:
            self.prompt_tokens = len(chunk.prompt_token_ids)
        for delta in chunk.sequences:  # n = 1: one sequence
            if delta.token_ids:
                self.first_token_at = self.first_token_at or now
                self.last_token_at = now
                self.generated_tokens += len(delta.token_ids)
            self.text += delta.text
            if delta.finish_reason is not None:
                self.finish_reason, self.stop_reason = delta.finish_reason, delta.stop_reason

    def end(self, *, stopped: bool = False, error: PlaygroundError | None = None) -> None:
        self.ended_at = self.ended_at or time.monotonic()
        self.stopped = self.stopped or stopped
        self.error = self.error or error
        self.done.set()

    @property
    def time_to_first_token(self) -> float | None:
        """Seconds from the click to the first generated token (queueing and prefill included)."""
        return None if self.first_token_at is None else self.first_token_at - self.submitted

    @property
    def tokens_per_second(self) -> float | None:
        """Decode speed: tokens after the first one, over the time they took."""
        if self.generated_tokens < 2 or self.first_token_at is None or self.last_token_at is None:
            return None
        elapsed = self.last_token_at - self.first_token_at
        return (self.generated_tokens - 1) / elapsed if elapsed > 0 else None

    @property
    def elapsed(self) -> float:
        return (self.ended_at or time.monotonic()) - self.submitted

    @property
    def status(self) -> str:
        """running | stopped | error | done."""
        if self.error is not None:
            return "error"
        if self.stopped:
            return "stopped"
        return "done" if self.ended_at is not None else "running"


def sampling_params(*, max_new_tokens: float | None, temperature: float, top_p: float, top_k: float,
                    repetition_penalty: float, seed: float | None, stop: str | None) -> SamplingParams:
    """The engine's SamplingParams from the playground's controls (numbers come as floats;
    max_new_tokens None: up to the context window). Raises PlaygroundError for values the engine
    refuses."""
    from neo_serve.errors import InvalidRequestError

    try:
        max_tokens = None if max_new_tokens is None else control_number("Max new tokens", max_new_tokens, whole=True)
        return SamplingParams(max_tokens=max_tokens,
                              temperature=control_number("Temperature", temperature),
                              top_p=control_number("Top-p", top_p),
                              top_k=control_number("Top-k", top_k or 0, whole=True),
                              repetition_penalty=control_number("Repetition penalty", repetition_penalty),
                              seed=parse_seed(seed), stop=parse_stop(stop))
    except InvalidRequestError as exc:
        raise PlaygroundError("Invalid setting", f"{_control_names(str(exc))}.") from None
    except (TypeError, ValueError) as exc:  # e.g. stop strings that are not text, through the API
        raise PlaygroundError("Invalid setting", str(exc)) from None


def control_number(label: str, value: Any, *, whole: bool = False) -> float | int:
    """A control's number as the engine takes it. The page's controls send finite numbers; the
    `/generate` API may send anything, which is refused naming the control (`int(nan)` would
    say "cannot convert float NaN to integer")."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise PlaygroundError("Invalid setting", f"{label} must be a number, got {value!r}.") from None
    if not math.isfinite(number):
        raise PlaygroundError("Invalid setting", f"{label} must be a finite number, got {value!r}.")
    if not whole:
        return number
    if not number.is_integer():  # refused, not rounded: a run must use the value the page shows
        raise PlaygroundError("Invalid setting", f"{label} must be a whole number, got {value!r}.")
    return int(number)


# The largest seed a browser's number field holds exactly (JavaScript's Number.MAX_SAFE_INTEGER;
# above it the page would send a rounded seed), well inside the API's 64-bit range.
MAX_SEED = 2**53 - 1


def parse_seed(seed: float | str | None) -> int | None:
    """None, "" or a negative number: a random seed."""
    if seed is None or seed == "":
        return None
    number = control_number("Seed", seed)
    if number < 0:
        return None
    if number > MAX_SEED:
        raise PlaygroundError("Invalid setting", f"Seed must be at most {MAX_SEED}, got {number:.0f}.")
    return control_number("Seed", number, whole=True)


MAX_STOP_STRINGS = 4  # as the OpenAI API


def parse_stop(text: str | None) -> list[str]:
    r"""Stop strings, one per line; `\n` and `\t` stand for a newline and a tab (so a stop string
    can be a blank line: `\n\n`)."""
    stops = [line.replace("\\n", "\n").replace("\\t", "\t") for line in (text or "").splitlines() if line.strip()]
    if len(stops) > MAX_STOP_STRINGS:
        raise PlaygroundError("Invalid setting", f"At most {MAX_STOP_STRINGS} stop strings (one per line), "
                                                 f"got {len(stops)}.")
    return stops


def _control_names(message: str) -> str:
    """The engine's parameter names as the playground's controls are labelled."""
    for name, label in (("max_tokens", "max new tokens"), ("top_p", "top-p"), ("top_k", "top-k"),
                        ("repetition_penalty", "repetition penalty")):
        message = message.replace(name, label)
    return message[:1].upper() + message[1:]


class PlaygroundBackend:
    """Runs the playground's generations on the models' pipeline deployments, through Serve
    handles: the same replicas, batches and KV caches as the router's requests."""

    def __init__(self, pipelines: Mapping[str, Any], models: list[PlaygroundModel], *, app_name: str | None,
                 replica_wait_s: float = 5.0, caller: Any | None = None) -> None:
        self.models = {model.name: model for model in models}
        self.caller = caller  # the playground replica's own actor handle, sent with each call (CallerWatch)
        self.pipelines = {name: handle.options(stream=True).generate for name, handle in pipelines.items()}
        self.app_name = app_name
        self.replica_wait_s = replica_wait_s

    def model(self, name: str | None) -> PlaygroundModel:
        if name not in self.models:
            raise PlaygroundError("Model not served", f"This app serves {', '.join(self.models)}, not {name!r}.")
        return self.models[name]

    async def generate(self, run: Run, prompt: str, params: SamplingParams) -> AsyncIterator[Run]:
        """Stream `prompt` through one of the model's pipeline replicas, updating `run` with every
        chunk (and yielding it). Cancelling the iteration (Stop) cancels the pipeline's request:
        the sequence leaves its batch and frees its KV blocks."""
        if not prompt:
            raise PlaygroundError("Empty prompt", "Type a prompt, or pick one of the examples.")
        if not is_encodable(prompt):  # only through the API: JSON lets a lone surrogate through
            raise PlaygroundError("Invalid prompt", "The prompt is not valid Unicode text (it contains a lone "
                                                    "surrogate).")
        from neo_serve.serve.completions import Deadline

        request_id = f"playground-{uuid.uuid4().hex}"
        deadline = Deadline(run.model.request_timeout_s)
        # A plain call, cancelled like any request. Not `choose_replica` (to learn the replica
        # before dispatching): Ray shields its routing from the caller's cancellation, so the
        # routing of a run that timed out waiting or was stopped could go on. The first chunk
        # names the replica instead.
        stream = self.pipelines[run.model.name].remote(prompt, params, request_id, caller=self.caller)
        try:
            first = await self._accepted(stream, run.model)
            run.replica = first.replica
            run.feed(first)
            yield run
            while True:
                try:
                    chunk = await deadline.run(stream.__anext__())
                except StopAsyncIteration:
                    break
                run.feed(chunk)
                yield run
        except APIError as exc:
            if exc.code != "request_timeout":  # only the deadline raises one here
                raise describe_error(exc, run.model) from None
            raise PlaygroundError("Timed out", f"The run did not finish within {run.model.name}'s deadline of "
                                               f"{run.model.request_timeout_s:g} s (request_timeout_s); it was "
                                               "stopped.") from None
        except Exception as exc:  # not CancelledError / GeneratorExit: a Stop is no error
            raise describe_error(exc, run.model) from None
        finally:
            try:  # a no-op once finished; on Stop, past the deadline or still unrouted: the request goes
                stream.cancel()
            except Exception:  # noqa: BLE001 - Serve's cancel re-raises the call's own failure, handled above
                pass

    async def _accepted(self, stream: Any, model: PlaygroundModel) -> GenerationChunk:
        """The pipeline's first chunk, sent as a replica accepts the request (before its prefill);
        a model with no replica taking it in time is reported, not waited on."""
        from neo_serve.serve.completions import Deadline

        try:
            return await Deadline(self.replica_wait_s).run(stream.__anext__())
        except APIError as exc:
            if exc.code != "request_timeout":
                raise
            raise await self._no_replica(model) from None

    async def _no_replica(self, model: PlaygroundModel) -> PlaygroundError:
        """Why no replica took the request: none running yet (loading), or all at capacity."""
        from ray import serve

        state = None
        try:
            status = await asyncio.to_thread(serve.status)
            deployment = status.applications[self.app_name].deployments[model.deployment]
            state = getattr(deployment.status, "value", deployment.status)  # "UPDATING", not the enum's repr
            running = deployment.replica_states.get("RUNNING", 0)
        except Exception:  # noqa: BLE001 - the status is only for the message
            running = 0
        if running:
            return busy_error(f"{model.name}'s {running} pipeline replica(s) took no new request "
                              f"within {self.replica_wait_s:g} s")
        return PlaygroundError("Model not loaded", f"{model.name} is not loaded yet: no pipeline replica is running"
                               + (f" (deployment {model.deployment}: {state})" if state else "")
                               + ". Its stages may still be loading or waiting for resources; try again shortly.")


def busy_error(detail: str) -> PlaygroundError:
    return PlaygroundError("Server busy", f"The server is busy: {detail}. Try again in a moment.")


def describe_error(exc: BaseException, model: PlaygroundModel) -> PlaygroundError:
    """A readable PlaygroundError for anything a run can raise (the traceback goes to the log)."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    from neo_serve.serve.completions import as_api_error

    if isinstance(exc, PlaygroundError):
        return exc
    cause = exc.cause if isinstance(exc, RayTaskError) and exc.cause is not None else exc
    if isinstance(cause, PlaygroundError):
        return cause
    if isinstance(cause, BackPressureError):
        return busy_error(f"{model.name}'s request queue is full")
    if isinstance(cause, DeploymentUnavailableError):
        return PlaygroundError("Model not loaded", f"{model.name} is not available: its pipeline deployment "
                                                   f"{model.deployment} failed to deploy.")
    if isinstance(cause, RayActorError) or type(cause).__name__ == "ReplicaUnavailableError":
        return PlaygroundError("Pipeline unavailable", f"The {model.name} pipeline replica serving this run went "
                                                       f"away (it is being replaced). Try again.")
    error = as_api_error(exc)
    if error is not None:
        message = _control_names(error.message)
        if error.status == 503:
            return PlaygroundError("Pipeline restarting", f"{message}. Try again in a moment.")
        if "context window" in error.message:
            hint = " Lower max new tokens or shorten the prompt." if error.param == "max_tokens" else \
                " Shorten the prompt."
            return PlaygroundError("Prompt too long", f"{message} ({model.name}).{hint}")
        return PlaygroundError("Invalid request", f"{message}.")
    logger.error("neo-serve playground: run on %s failed", model.name, exc_info=exc)
    return PlaygroundError("Internal error", f"The run failed ({type(cause).__name__}); the server log has the "
                                             f"details.")
