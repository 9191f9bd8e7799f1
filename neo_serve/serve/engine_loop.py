"""The replica's continuous-batching loop: one engine, its stages, per-request output streams.

Every engine call that changes its state (`add_request`, `abort_request`, `schedule_step`,
`apply_step`) happens on the replica's event loop, so the engine stays single-threaded; tensor
work runs elsewhere: with one stage on a step thread, with several in stage actors, and the last
stage samples (engine/step_result.py). The loop keeps up to `runner.depth` (= num_stages)
micro-batches in flight:

    fill:  while fewer than S in flight: schedule_step(in_flight=<where each sequence's chunks in
           flight end>, max_seqs=ceil(active / S), prefill_split=S while the last stage is busy
           over 70% of the time, else 1) -> runner.submit(step)   (the stage chain starts at
           once; a split prompt goes in chunks of a 1/S share, the next sent while the one
           before is still in flight)
    drain: await the oldest micro-batch's sampled tokens (or a new request, if the pipe has room)
           -> apply_step -> push outputs to the requests' streams

Each request has a mailbox holding its latest cumulative output (or error); its `generate`
stream turns them into deltas. A cancelled stream (handle cancel, HTTP disconnect) aborts the
request in its `finally`, which frees its KV blocks before the next micro-batch is scheduled.

Faults: when a stage actor dies, its device faults (`device_faults`: a CUDA error that leaves
the process's context unusable), or a step outlives `step_timeout_s` (a stage hangs), the
in-flight micro-batches are dropped, the dead (or all) stages are restarted in their bundles,
reloading their weights, and every running sequence is recomputed from its tokens, so streams
continue where they were and the clients receive complete output. If that cannot finish within
`recovery_timeout_s`, every request ends with an explicit error and the replica reports itself
unhealthy, so Serve replaces it. A fault that comes back whatever is recomputed (a kernel the
GPU cannot run) would restart the stages forever: after `MAX_RECOVERIES_WITHOUT_PROGRESS`
recoveries with no micro-batch completing in between, the replica gives up the same way. One
that comes back with a request (its tokens crash a stage) would take every other request's
time with it: a request one of whose sequences is lost `MAX_STEP_FAULTS_IN_A_ROW` times in a
row on the same tokens (recomputed into the same fault: each lost step held tokens of the one
before, and none got past them) ends with a 500, as do the requests that shared those lost
micro-batches with it, and the others go on. Unrelated faults (a node lost) rarely hit the same
tokens twice. Which comes first: when every step faults, the requests in flight end with that
500 at the second fault (no step tells the two kinds of fault apart), and the next request's
third and fourth faults give the replica up. A 500 rather than a 503 so that a client does not send a request that crashes
stages again (to this replica or, past its replacement, to the next).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import ray

from neo_serve.engine.llm_engine import LLMEngine, PreparedStep, SampledStep
from neo_serve.engine.outputs import RequestOutput
from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.engine.sequence import Sequence
from neo_serve.errors import InvalidRequestError, PipelineFailed
from neo_serve.serve.device_faults import is_device_fault
from neo_serve.serve.metrics import PipelineMetrics, RequestTimer, gauge_refresh_period_s
from neo_serve.serve.outputs import DeltaTracker, GenerationChunk, TokenDecoder
from neo_serve.serve.protocol import APIError, error_name
from neo_serve.serve.stages import StepRunner

logger = logging.getLogger("ray.serve")

_Item = RequestOutput | BaseException
# Bounds on recovering from stage faults (see the module's docstring). For GPT-NeoX-20B one
# recovery reloads ~41 GB (minutes), so a loop is costly. A single fault is always recovered
# from.
MAX_RECOVERIES_WITHOUT_PROGRESS = 3
MAX_STEP_FAULTS_IN_A_ROW = 2
# Prompts are split over the micro-batches in flight only while the last stage is busier than
# this share of the time (see `_fill`). Measured on 2 cores, 64 streams, 2 stages: Pythia-160M's
# stages ran 77-81% busy, and splitting gave 3-4% more tokens/s and halved the ITL p99; the demo
# model's ran 56-63% busy (its millisecond steps wait on Ray's hops), and splitting cost it 8%.
SPLIT_PROMPTS_ABOVE_STAGE_LOAD = 0.7
# Text prompts longer than this are encoded off the event loop; shorter ones take about a
# millisecond at most (2 vCPUs), a stall not worth a hop to a thread and back.
INLINE_TOKENIZE_CHARS = 1024


class _Mailbox:
    """A stream's next item. The engine's outputs are cumulative, so only the latest is kept: a
    stream paused by the chunk budget (up to streams / budget seconds) would otherwise hold a copy
    of its tokens, logprobs and text for every step meanwhile. An error, once put, stays, and so
    does a finished output: a pipeline failing after a request ended must not turn it into an error."""

    def __init__(self) -> None:
        self._item: _Item | None = None
        self._ready = asyncio.Event()

    def put(self, item: _Item) -> None:
        if not isinstance(self._item, BaseException) and not (self._item is not None and self._item.finished):
            self._item = item
        self._ready.set()

    async def get(self) -> _Item:
        await self._ready.wait()
        item, self._item = self._item, None
        self._ready.clear()
        assert item is not None
        return item


class PipelineCore:
    """Continuous batching over an engine and a step runner, with per-request output streams."""

    def __init__(self, engine: LLMEngine, runner: StepRunner, *, metrics: PipelineMetrics | None = None,
                 step_timeout_s: float | None = None, recovery_timeout_s: float = 300.0,
                 stream_interval_s: float = 0.02, max_stream_chunks_per_s: float | None = None,
                 gauge_refresh_s: float | None = None) -> None:
        self.engine = engine
        self.runner = runner
        self.metrics = metrics
        self.gauge_refresh_s = gauge_refresh_s  # None: from Ray's metrics export interval
        self.step_timeout_s = step_timeout_s
        self.recovery_timeout_s = recovery_timeout_s
        # After the first token, a stream yields at most once per interval (the tokens of several
        # steps in one chunk): each yielded chunk costs the replica, router and proxy a Serve
        # streaming round, which on a small model's millisecond steps would cost more than the
        # step, and with many streams takes the cores the model needs. The interval grows with
        # the number of streams so that all of them together send about max_stream_chunks_per_s.
        self.stream_interval_s = stream_interval_s
        self.max_stream_chunks_per_s = max_stream_chunks_per_s
        self.num_recoveries = 0
        self._recoveries_without_progress = 0  # since a micro-batch last completed
        # Sequences whose last micro-batch was lost, until a step gets them past its tokens (weak:
        # a finished request's sequences drop out with it).
        self._fault_marks: weakref.WeakKeyDictionary[Sequence, _FaultMark] = weakref.WeakKeyDictionary()
        self.decode_token = TokenDecoder(engine.tokenizer)
        self.num_steps = 0
        self.peak_in_flight = 0  # most micro-batches in flight at once (pipelining at work)
        self.stage_load = StageLoad()
        self.failure: BaseException | None = None
        self._streams: dict[str, _Mailbox] = {}
        # Streams pausing between chunks (see `_hold`), woken early when their request ends.
        self._holding: dict[str, asyncio.Future[None]] = {}
        self._inflight: deque[tuple[PreparedStep, asyncio.Future[SampledStep]]] = deque()
        self._submitted: deque[float] = deque()  # submit time of each in-flight micro-batch
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._gauge_task: asyncio.Task[None] | None = None

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name="neo-serve-pipeline")
        if self.metrics is not None:
            self._gauge_task = loop.create_task(self._refresh_gauges(), name="neo-serve-gauges")

    def close(self) -> None:
        for task in (self._task, self._gauge_task):
            if task is not None:
                task.cancel()

    async def _refresh_gauges(self) -> None:
        """Re-set the load gauges on a timer, whatever the loop is doing: idle, or waiting on a
        stage that hangs or reloads its weights for minutes. Ray forgets a gauge that is not set
        for two export intervals, and dashboards would show no data for exactly those times."""
        period = self.gauge_refresh_s if self.gauge_refresh_s is not None else gauge_refresh_period_s()
        while True:
            await asyncio.sleep(period)
            self._record_gauges()

    # ---- requests ------------------------------------------------------------------------
    async def generate(self, prompt: str | list[int], params: SamplingParams,
                       request_id: str) -> AsyncIterator[GenerationChunk]:
        """Stream a request's chunks. The first chunk confirms acceptance (prompt token ids);
        invalid requests raise `InvalidRequestError` before it."""
        arrival = time.monotonic()
        prompt_token_ids = None
        if isinstance(prompt, str) and len(prompt) > INLINE_TOKENIZE_CHARS:
            prompt_token_ids = await self.encode(prompt)  # else the engine encodes it, inline
        if self.failure is not None:
            raise PipelineFailed(f"pipeline failed: {self.failure!r}")
        if request_id in self._streams:  # e.g. finished in the engine, its stream not yet closed
            raise InvalidRequestError(f"request id {request_id!r} is still streaming", field="request_id")
        request = self.engine.add_request(prompt, params, request_id=request_id, prompt_token_ids=prompt_token_ids)
        tracker = DeltaTracker(request_id, self.decode_token, skip_special_tokens=params.skip_special_tokens)
        prompt_text = request.prompt
        if prompt_text is None or params.prompt_logprobs is not None:
            # Echoed with its logprobs, the prompt is the text its tokens decode to: their
            # `text_offset`s count those characters, and a normalizing tokenizer (GPT-NeoX's
            # applies NFC) may have changed the text it was given.
            prompt_text = self.engine.tokenizer.decode(request.prompt_ids, skip_special_tokens=False)
        timer = RequestTimer(self.metrics, arrival)
        if self.metrics is not None:
            self.metrics.prompt_tokens.inc(len(request.prompt_ids))
        mailbox = _Mailbox()
        # Also a request finished at once (max_tokens=0): its id stays taken until its stream closes.
        self._streams[request_id] = mailbox
        if not request.finished:
            self._wake.set()
        try:
            yield tracker.first_chunk(request.to_output(), prompt_text)
            if request.finished:  # max_tokens=0 without prompt logprobs: nothing to compute
                timer.completed([seq.finish_reason for seq in request.sequences])
                yield tracker.update(request.to_output())
                return
            last_token_chunk = None  # when the last chunk with tokens was yielded
            while True:
                if last_token_chunk is not None:
                    pause = last_token_chunk + self.stream_interval() - time.monotonic()
                    # A request the engine no longer holds has ended (finished or failed) while
                    # its stream was not pausing, e.g. between yields: its last item is waiting.
                    if pause > 0 and request_id in self.engine.requests:
                        await self._hold(request_id, pause)
                item = await mailbox.get()
                if isinstance(item, BaseException):
                    raise item
                timer.scheduled(request.metrics)
                if item.finished:  # before its chunk is yielded: the caller may not ask for more
                    timer.completed([completion.finish_reason for completion in item.outputs])
                chunk = tracker.update(item)
                if chunk is not None:
                    token_counts = [len(s.token_ids) for s in chunk.sequences]
                    timer.tokens(token_counts)
                    yield chunk
                    if any(token_counts):  # prompt logprobs alone must not hold back the first token
                        last_token_chunk = time.monotonic()
                if item.finished:
                    return
        finally:
            # Reached on completion, on error and on cancellation (CancelledError / GeneratorExit).
            # Only this request's own state: never another's that has taken the id since.
            if self._streams.get(request_id) is mailbox:
                del self._streams[request_id]
            if self.engine.requests.get(request_id) is request:
                self.engine.abort_request(request_id)  # frees its KV blocks now
                self._wake.set()
            timer.ended(request.metrics, [seq.finish_reason for seq in request.sequences])

    async def encode(self, text: str) -> list[int]:
        """`text`'s token ids, as the engine encodes a text prompt. A text far too long for the
        context window is refused without encoding it; a long one is encoded on a worker thread
        (the tokenizer releases the GIL): on the event loop it would stall every stream of the
        replica (1 MiB: over a second)."""
        self.engine.check_prompt_text(text)
        if len(text) > INLINE_TOKENIZE_CHARS:
            return await asyncio.to_thread(self.engine.tokenizer.encode, text)
        return self.engine.tokenizer.encode(text)

    async def _hold(self, request_id: str, seconds: float) -> None:
        """Pause a stream for `seconds`, or until its request finishes or fails: a request's last
        chunk is never held back, since its client's next request waits for it while the
        sequence's batch slot stays empty (at 64 streams the interval is a second)."""
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[None] = loop.create_future()
        timer = loop.call_later(seconds, _wake_up, waiter)
        self._holding[request_id] = waiter
        try:
            await waiter
        finally:
            timer.cancel()
            self._holding.pop(request_id, None)

    def _release(self, request_id: str) -> None:
        """End a stream's pause now (its request finished or failed)."""
        waiter = self._holding.get(request_id)
        if waiter is not None:
            _wake_up(waiter)

    def stream_interval(self) -> float:
        """Least time between two chunks of a stream, at the current number of streams."""
        if self.max_stream_chunks_per_s is None:
            return self.stream_interval_s
        return max(self.stream_interval_s, len(self._streams) / self.max_stream_chunks_per_s)

    def stats(self) -> dict[str, Any]:
        """Scheduler and KV state, for debugging and tests."""
        allocator = self.engine.allocator
        return {
            "running": self.engine.num_running(),
            "waiting": self.engine.num_waiting(),
            "requests": len(self.engine.requests),
            "streams": len(self._streams),
            "in_flight_micro_batches": len(self._inflight),
            "peak_in_flight_micro_batches": self.peak_in_flight,
            "last_stage_load": round(self.stage_load.share(), 3),
            "free_kv_blocks": allocator.num_free_blocks,
            "total_kv_blocks": allocator.num_blocks,
            "kv_block_size": allocator.block_size,
            "kv_cache_usage": self.engine.kv_cache_usage(),
            "num_preemptions": self.engine.scheduler.num_preemptions,
            "num_steps": self.num_steps,
            "num_recoveries": self.num_recoveries,
            "stream_interval_s": self.stream_interval(),
            "failed": repr(self.failure) if self.failure is not None else None,
        }

    # ---- the loop --------------------------------------------------------------------------
    async def _run(self) -> None:
        try:
            while True:
                self._wake.clear()
                self._fill()
                if not self._inflight:
                    # Gauges go out at most every half second while steps run; the last step
                    # before going idle (or the cancellations that emptied the pipe) may have
                    # been skipped: report the idle load now, not at the next refresh.
                    self._record_gauges()
                    await self._wake.wait()
                    continue
                oldest = self._inflight[0][1]
                waiters: set[asyncio.Future] = {oldest}
                waker = None
                if len(self._inflight) < self.runner.depth:
                    # The pipe has room: also wake up for a new request to start its prefill.
                    waker = asyncio.ensure_future(self._wake.wait())
                    waiters.add(waker)
                timeout = None
                if self.step_timeout_s is not None:
                    timeout = max(0.0, self._submitted[0] + self.step_timeout_s - time.monotonic())
                await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if waker is not None:
                    waker.cancel()
                if not oldest.done():
                    if timeout is not None and time.monotonic() >= self._submitted[0] + self.step_timeout_s:
                        # A stage hangs (no error, no result): restart them all.
                        await self._recover(TimeoutError(f"a step took over {self.step_timeout_s} s"),
                                            all_stages=True, lost=self._inflight[0][0])
                    continue
                prepared, future = self._inflight.popleft()
                self._submitted.popleft()
                lost_stage = self._finish_step(prepared, future)
                if lost_stage is not None:
                    # A dead actor is found by probing each stage; one whose device faulted is
                    # alive but unusable, and Ray's error does not say which: replace them all.
                    await self._recover(lost_stage.error, all_stages=lost_stage.device_fault, lost=prepared)
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a bug: fail loudly rather than hang every stream
            logger.exception("neo-serve pipeline loop crashed")
            self._fail_all(exc)

    def _fill(self) -> None:
        """Schedule and submit micro-batches until `depth` are in flight or nothing is left."""
        depth = self.runner.depth
        while len(self._inflight) < depth:
            in_flight: dict[Sequence, int] = {}  # where each sequence's last chunk in flight ends
            for prepared, _ in self._inflight:
                for chunk in prepared.batch.chunks:
                    in_flight[chunk.seq] = chunk.end
            max_seqs, prefill_split = None, 1
            if depth > 1:
                # Split the sequences that can run evenly over the stages' micro-batches. Waiting
                # ones that cannot be admitted (past max_num_seqs, or while the KV cache is full)
                # are not counted: they made the first micro-batch take every running sequence
                # and left the other stages idle.
                max_seqs = max(1, math.ceil(self.engine.num_schedulable() / depth))
                # A prompt whole in one micro-batch makes it several times longer than the next;
                # with the stages busy, the stage that finished the short one then waits for the
                # long one to come round, and split, the two weigh alike. With the stages often
                # idle (a small model's steps waiting on Ray's hops), each micro-batch goes round
                # on its own, a split prompt slows both and its first token waits for the second:
                # it goes whole. Whole too while a lost micro-batch's sequences are recomputed:
                # split, their chunks would share the next micro-batch with other sequences as
                # well, and a request whose tokens crash a stage would end those too (see
                # _end_requests_lost_too_often).
                if not self._fault_marks and self.stage_load.share() > SPLIT_PROMPTS_ABOVE_STAGE_LOAD:
                    prefill_split = depth
            prepared = self.engine.schedule_step(in_flight, max_seqs, prefill_split=prefill_split)
            if prepared is None:
                return
            finish = functools.partial(self.engine.sample_step, prepared)
            self._inflight.append((prepared, self.runner.submit(prepared.step_input, finish)))
            self._submitted.append(time.monotonic())
            self.peak_in_flight = max(self.peak_in_flight, len(self._inflight))

    async def _recover(self, error: BaseException, *, all_stages: bool, lost: PreparedStep) -> None:
        """Restart dead (or all) stages and recompute every running sequence; on failure or past
        the deadline, fail every request explicitly. `lost`: the micro-batch that failed or hung."""
        restart = getattr(self.runner, "restart_stages", None)
        for _, future in self._inflight:  # their results are lost with the stage
            future.cancel()
        self._inflight.clear()
        self._submitted.clear()
        if restart is None:
            self._fail_all(error)
            return
        self._recoveries_without_progress += 1
        if self._recoveries_without_progress > MAX_RECOVERIES_WITHOUT_PROGRESS:
            logger.error("neo-serve pipeline: stage failure again (%r) after %d recoveries with no step completed "
                         "in between; giving up so that Serve replaces the replica", error,
                         MAX_RECOVERIES_WITHOUT_PROGRESS)
            self._fail_all(PipelineFailed(f"stage failure ({error_name(error)}) again after "
                                          f"{MAX_RECOVERIES_WITHOUT_PROGRESS} recoveries with no step completed "
                                          "in between"))
            return
        self._end_requests_lost_too_often(lost, error)
        logger.warning("neo-serve pipeline lost a stage (%r); restarting and recomputing", error)
        try:
            await asyncio.wait_for(restart(all_stages=all_stages), timeout=self.recovery_timeout_s)
        except Exception as exc:  # includes the deadline
            logger.error("neo-serve could not restart its stages: %r", exc)
            # The client is told the errors' classes: their texts may hold a stage's remote traceback.
            self._fail_all(PipelineFailed(f"stage failure ({error_name(error)}) and no recovery within "
                                          f"{self.recovery_timeout_s} s ({error_name(exc)})"))
            return
        recomputed = self.engine.recompute_all()
        self.num_recoveries += 1
        logger.warning("neo-serve pipeline recovered; recomputing %d sequence(s)", recomputed)

    def _end_requests_lost_too_often(self, lost: PreparedStep, error: BaseException) -> None:
        """Count a lost micro-batch against each of its sequences (of requests still in the
        engine as they were: an id may have been reused), remembering the tokens it held; end the
        requests with a sequence lost `MAX_STEP_FAULTS_IN_A_ROW` times in a row with a 500 rather
        than recompute them into the same fault again."""
        ending: dict[str, int] = {}  # request id -> its sequence's count
        for chunk in lost.batch.chunks:
            request = chunk.seq.request
            if self.engine.requests.get(request.request_id) is not request:
                continue
            mark = self._fault_marks.get(chunk.seq)
            # In a row only on the same tokens: a random fault while the sequence is recomputed
            # elsewhere (a long prompt takes many steps) starts a new count.
            count = mark.count + 1 if mark is not None and chunk.start < mark.end and mark.start < chunk.end else 1
            self._fault_marks[chunk.seq] = _FaultMark(count, chunk.start, chunk.end)
            if count >= MAX_STEP_FAULTS_IN_A_ROW:
                ending[request.request_id] = count
        for request_id, count in ending.items():
            logger.error("neo-serve pipeline: request %s was lost to stage faults %d times in a row (last: %r); "
                         "ending it", request_id, count, error)
            self._fail_requests({request_id}, APIError(
                f"this request's computation was lost to a stage failure ({error_name(error)}) {count} times in a "
                "row; it was ended rather than computed again, in case it is what makes the stage fail",
                status=500, type="server_error", code="repeated_stage_failure", retryable=False))

    def _finish_step(self, prepared: PreparedStep, future: asyncio.Future[SampledStep]) -> _LostStage | None:
        """Apply a finished micro-batch. Says so when a stage died or its device faulted
        (recover), else None."""
        try:
            sampled = future.result()
        except ray.exceptions.RayActorError as exc:  # a stage is gone: restart it
            return _LostStage(exc, device_fault=False)
        except Exception as exc:
            if is_device_fault(exc):  # every later step on that device would fail too
                logger.error("neo-serve step hit a device fault, which leaves that GPU unusable: %r", exc)
                return _LostStage(exc, device_fault=True)
            logger.exception("neo-serve step failed; failing its requests")
            # Only requests still in the engine as they were: one aborted while this step ran may
            # have given its id to a new request (a handle caller's own ids).
            self._fail_requests({c.seq.request.request_id for c in prepared.batch.chunks
                                 if self.engine.requests.get(c.seq.request.request_id) is c.seq.request}, exc)
            return None
        if sampled.last_stage_seconds is not None:
            self.stage_load.record(sampled.last_stage_seconds)
        generated_before = self.engine.num_generated_tokens
        outputs = self.engine.apply_step(prepared, sampled)
        self.num_steps += 1
        self._recoveries_without_progress = 0
        for chunk in prepared.batch.chunks:
            mark = self._fault_marks.get(chunk.seq)
            if mark is not None and chunk.end >= mark.end:  # past the lost tokens: a later fault counts anew
                del self._fault_marks[chunk.seq]
        for output in outputs:
            mailbox = self._streams.get(output.request_id)
            if mailbox is not None:
                mailbox.put(output)
                if output.finished:
                    self._release(output.request_id)
        if self.metrics is not None:
            # Only the tokens applied: a sequence aborted while its step ran gets none.
            self._record_gauges(generated=self.engine.num_generated_tokens - generated_before, force=False)
        return None

    def _record_gauges(self, *, generated: int = 0, force: bool = True) -> None:
        if self.metrics is not None:
            self.metrics.record_step(running=self.engine.num_running(), waiting=self.engine.num_waiting(),
                                     kv_usage=self.engine.kv_cache_usage(),
                                     preemptions=self.engine.scheduler.num_preemptions, generated=generated,
                                     force=force)

    def _fail_requests(self, request_ids: set[str], error: BaseException) -> None:
        for request_id in request_ids:
            self.engine.abort_request(request_id)
            mailbox = self._streams.get(request_id)
            if mailbox is not None:
                mailbox.put(error)
                self._release(request_id)

    def _fail_all(self, error: BaseException) -> None:
        self.failure = error
        for _, future in self._inflight:
            future.cancel()
        self._inflight.clear()
        self._submitted.clear()
        self._fail_requests(set(self.engine.requests) | set(self._streams), PipelineFailed(repr(error)))


class StageLoad:
    """The share of the last `window_s` seconds the pipeline's last stage spent on steps, from the
    times it reports with each result."""

    def __init__(self, window_s: float = 2.0) -> None:
        self.window_s = window_s
        self._steps: deque[tuple[float, float]] = deque()  # (when the result came, stage seconds)
        self._total = 0.0

    def record(self, seconds: float) -> None:
        self._steps.append((time.monotonic(), seconds))
        self._total += seconds
        self._forget()

    def share(self) -> float:
        self._forget()
        return self._total / self.window_s

    def _forget(self) -> None:
        while self._steps and self._steps[0][0] < time.monotonic() - self.window_s:
            self._total -= self._steps.popleft()[1]
        if not self._steps:
            self._total = 0.0  # no float residue from the subtractions


@dataclass(frozen=True)
class _FaultMark:
    """A sequence's micro-batches lost in a row on the same tokens, and the positions [start,
    end) the last one held: only a step that gets it to `end` shows the fault was not its own."""

    count: int
    start: int
    end: int


@dataclass(frozen=True)
class _LostStage:
    """A step's error that takes a stage: its actor died, or its device faulted (alive but unusable)."""

    error: BaseException
    device_fault: bool


def _wake_up(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)
