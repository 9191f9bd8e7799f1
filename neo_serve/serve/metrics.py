"""Ray Serve custom metrics of a pipeline replica (exported on Ray's Prometheus endpoint).

Serve adds the deployment, replica and application tags; we add `model` (and `stage` for KV use).
Ray prefixes every name with `ray_`, so Prometheus shows e.g. `ray_neo_serve_time_to_first_token_seconds`.
"""

from __future__ import annotations

import collections
import logging
import time

import ray
from ray.serve import metrics

from neo_serve.engine.outputs import RequestMetrics

logger = logging.getLogger("ray.serve")

# Bucket bounds wide enough for a tiny model on a CPU and GPT-NeoX-20B under load alike:
# histogram_quantile reports anything past the last bound as that bound, and everything under
# the first as a fraction of it. A first token can wait minutes in a full queue; a token of a
# small model on a GPU comes within a millisecond or two.
TTFT_BOUNDARIES_S = [0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5,
                     10.0, 15.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0]
# A whole request: a few tokens of a small model, or thousands of GPT-NeoX-20B's behind a queue.
E2E_BOUNDARIES_S = [0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0,
                    600.0, 1200.0, 1800.0, 3600.0]
RAN_TO_END = ("stop", "length")  # finish reasons of a sequence that was not cut off
FINISH_REASONS = (*RAN_TO_END, "abort")
ITL_BOUNDARIES_S = [0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2,
                    0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0]
GAUGE_PERIOD_S = 0.5  # gauges are sampled, not set on every step
# Ray (2.60, OpenTelemetry) exports a gauge's value only if it was set since the last export
# (every metrics_report_interval_ms, 10 s by default, at least 1 s), and its agent forgets a value
# after two intervals: a replica re-sets its gauges on a timer, so that an idle one reads 0 and
# one waiting on a hung or restarting stage keeps its load, rather than "no data". (Measured: the
# agent applies its own interval, so with `_system_config` alone a gauge set once lasted 20 s;
# RAY_metrics_report_interval_ms in every process's environment shortens it.)
MAX_GAUGE_REFRESH_S = 5.0


def gauge_refresh_period_s() -> float:
    """How often a replica re-sets its gauges: half of Ray's export interval, at most 5 s."""
    try:
        export_interval_s = max(ray._config.metrics_report_interval_ms(), 1000) / 1000
    except AttributeError:  # a Ray without this (private) accessor: refresh as often as steps may
        return GAUGE_PERIOD_S
    return min(MAX_GAUGE_REFRESH_S, export_interval_s / 2)


def start_at_zero(counter: metrics.Counter, tags: dict[str, str] | None = None) -> None:
    """Export `counter` (with `tags`) at 0 from the start, as vLLM's labelled counters are, so that
    `rate()`, `increase()` and alerts over preemptions or aborts read 0 rather than "no data" until
    the first one. Ray's `Counter.inc` refuses 0; `_record` is the path it takes after that check
    (ray[serve] is pinned to 2.60.x), skipped if a Ray lacks it."""
    record = getattr(counter, "_record", None)
    if record is None:
        return
    try:
        record(0, tags=tags)
    except (TypeError, ValueError) as exc:  # a cosmetic zero must not keep a replica from starting
        logger.warning("neo-serve metrics: cannot export %s at 0: %r", getattr(counter, "_name", "a counter"), exc)


class PipelineMetrics:
    def __init__(self, model: str, num_stages: int) -> None:
        tags = {"model": model}
        self.time_to_first_token = metrics.Histogram(
            "neo_serve_time_to_first_token_seconds", "Seconds from a request's arrival at its pipeline to its "
            "first generated token.", boundaries=TTFT_BOUNDARIES_S, tag_keys=("model",))
        self.inter_token_latency = metrics.Histogram(
            "neo_serve_inter_token_latency_seconds", "Seconds between consecutive generated tokens of a sequence, "
            "observed once per streamed chunk as the chunk's wait over its tokens (a chunk carries every token "
            "since the previous one, so _count counts chunks, not tokens).",
            boundaries=ITL_BOUNDARIES_S, tag_keys=("model",))
        self.request_latency = metrics.Histogram(
            "neo_serve_e2e_request_latency_seconds", "Seconds from a request's arrival at its pipeline to its "
            "last token, for requests that finished (not cancelled or failed).",
            boundaries=E2E_BOUNDARIES_S, tag_keys=("model",))
        self.queue_time = metrics.Histogram(
            "neo_serve_request_queue_time_seconds", "Seconds from a request's admission by its pipeline (after "
            "tokenization) to its first step, i.e. waiting for a batch slot and KV cache; requests that ended "
            "before their first step are not observed.", boundaries=TTFT_BOUNDARIES_S,
            tag_keys=("model",))
        self.finished_sequences = metrics.Counter(
            "neo_serve_finished_sequences", "Sequences ended, by finished_reason: stop (end of text, a stop "
            "string or token), length (max_tokens or the context window), abort (the client cancelled or hung "
            "up, its deadline passed, or the pipeline failed).", tag_keys=("model", "finished_reason"))
        self.prompt_tokens = metrics.Counter("neo_serve_prompt_tokens", "Prompt tokens of accepted requests.",
                                             tag_keys=("model",))
        self.generation_tokens = metrics.Counter("neo_serve_generation_tokens", "Generated tokens.",
                                                 tag_keys=("model",))
        self.running = metrics.Gauge("neo_serve_num_running_seqs", "Sequences holding KV cache (running).",
                                     tag_keys=("model",))
        self.waiting = metrics.Gauge("neo_serve_num_waiting_seqs", "Sequences queued for admission.",
                                     tag_keys=("model",))
        self.kv_cache_usage = metrics.Gauge(
            "neo_serve_kv_cache_usage", "Fraction of a stage's KV cache blocks reserved: whole blocks of the "
            "pipeline's block size (16 slots on CPU; 256 on GPUs, where flash-attn may page them), including each "
            "sequence's room to grow, so it reads above the tokens cached (stages share the block numbering: "
            "every stage of a pipeline reports the same value).",
            tag_keys=("model", "stage"))
        self.preemptions = metrics.Counter("neo_serve_preemptions", "Sequences preempted (KV freed, recomputed "
                                           "later) because the KV cache was full.", tag_keys=("model",))
        for metric in (self.time_to_first_token, self.inter_token_latency, self.request_latency, self.queue_time,
                       self.finished_sequences, self.prompt_tokens, self.generation_tokens, self.running,
                       self.waiting, self.preemptions):
            metric.set_default_tags(dict(tags))  # Serve adds its tags into the dict it is given
        for counter, counter_tags in [(self.preemptions, None), (self.prompt_tokens, None),
                                      (self.generation_tokens, None),
                                      *((self.finished_sequences, {"finished_reason": reason})
                                        for reason in FINISH_REASONS)]:
            start_at_zero(counter, counter_tags)
        self._stage_tags = [{"model": model, "stage": str(stage)} for stage in range(num_stages)]
        self._last_gauges = 0.0
        self._preemptions_seen = 0

    def record_step(self, *, running: int, waiting: int, kv_usage: float, preemptions: int,
                    generated: int = 0, force: bool = False) -> None:
        """After each step: its generated tokens and the preemption count now, gauges at most
        every GAUGE_PERIOD_S."""
        if generated > 0:
            self.generation_tokens.inc(generated)
        if preemptions > self._preemptions_seen:
            self.preemptions.inc(preemptions - self._preemptions_seen)
            self._preemptions_seen = preemptions
        now = time.monotonic()
        if not force and now - self._last_gauges < GAUGE_PERIOD_S:
            return
        self._last_gauges = now
        self.running.set(running)
        self.waiting.set(waiting)
        for tags in self._stage_tags:
            self.kv_cache_usage.set(kv_usage, tags=dict(tags))


class RequestTimer:
    """Per-request latency bookkeeping: time in the queue, to the first token, then per token,
    and how the request ended.

    Called once per streamed chunk, on the replica's event loop. A chunk carries every token its
    sequences made since the previous one (see `PipelineCore.stream_interval`), so the
    inter-token latency is observed once per chunk, as the chunk's interval over its tokens:
    one Ray metric call per token took a tenth of a 2-stage replica's event loop (py-spy, 64
    streams). Generated tokens are counted per step (`PipelineMetrics.record_step`)."""

    def __init__(self, metrics_: PipelineMetrics | None, arrival: float) -> None:
        self._metrics = metrics_
        self._arrival = arrival  # before tokenization: part of the time to first token
        self._last: float | None = None
        self._queue_observed = False
        self._completed = False

    def scheduled(self, request: RequestMetrics) -> None:
        """Observe the request's queue time once it has had a step: from its admission by the
        engine (after tokenization) to that first step."""
        if self._metrics is None or self._queue_observed or request.first_scheduled_time is None:
            return
        self._queue_observed = True
        self._metrics.queue_time.observe(max(0.0, request.first_scheduled_time - request.arrival_time))

    def completed(self, finish_reasons: list[str | None]) -> None:
        """The request's last chunk is ready: its latency, if every sequence ran to its end."""
        if self._metrics is None or self._completed:
            return
        self._completed = True
        if all(reason in RAN_TO_END for reason in finish_reasons):
            self._metrics.request_latency.observe(time.monotonic() - self._arrival)

    def ended(self, request: RequestMetrics, finish_reasons: list[str | None]) -> None:
        """The stream is over, whichever way (call once): the queue time if the request had a step
        but no chunk since, and how each sequence ended (None: it was cut off, an abort)."""
        if self._metrics is None:
            return
        self.scheduled(request)
        reasons = collections.Counter(reason if reason in FINISH_REASONS else "abort" for reason in finish_reasons)
        for reason, count in reasons.items():  # one Ray call per reason, not per sequence
            self._metrics.finished_sequences.inc(count, tags={"finished_reason": reason})

    def tokens(self, per_sequence: list[int]) -> None:
        """New tokens arrived: `per_sequence[i]` for the request's i-th sequence with news."""
        if self._metrics is None:
            return
        # Sequences of one request (n > 1) advance together: a chunk's gap is per step.
        count = max(per_sequence, default=0)
        if count <= 0:
            return
        now = time.monotonic()
        if self._last is None:
            self._metrics.time_to_first_token.observe(now - self._arrival)
        else:
            self._metrics.inter_token_latency.observe((now - self._last) / count)
        self._last = now
