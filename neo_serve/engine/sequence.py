"""Request and sequence state. The scheduler and engine own these; stages never see them."""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field

from neo_serve.engine.kv_cache import Extent
from neo_serve.engine.outputs import CompletionOutput, LogprobDict, RequestMetrics, RequestOutput
from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.tokenizer import IncrementalDetokenizer

_arrival_counter = itertools.count()


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    """One of a request's `n` completions: its tokens, KV extent and sampling state."""

    request: "Request"
    index: int
    detokenizer: IncrementalDetokenizer
    seed: int | None  # from the request's seed and this sequence's index (sampler.choice_seed): its draws
    output_ids: list[int] = field(default_factory=list)
    output_text: str = ""
    logprobs: list[LogprobDict] = field(default_factory=list)
    cumulative_logprob: float = 0.0
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed: int = 0  # tokens whose K/V are in the cache
    extent: Extent | None = None
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    arrival: int = field(default_factory=lambda: next(_arrival_counter))

    @property
    def prompt_ids(self) -> list[int]:
        return self.request.prompt_ids

    @property
    def total_len(self) -> int:
        return len(self.request.prompt_ids) + len(self.output_ids)

    def token_at(self, position: int) -> int:
        prompt = self.request.prompt_ids
        return prompt[position] if position < len(prompt) else self.output_ids[position - len(prompt)]

    def tokens(self, start: int, end: int) -> list[int]:
        prompt = self.request.prompt_ids
        if end <= len(prompt):
            return prompt[start:end]
        return (prompt + self.output_ids)[start:end]

    @property
    def finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def visible_text(self) -> str:
        """Text safe to show: while running, hold back a tail that may still become a stop string."""
        if self.finished:
            return self.output_text
        hold = self.request.stop_holdback
        # max(0, ...): a text shorter than the hold shows nothing yet (a negative end would count
        # from the end and show text a stop string may still take back).
        return self.output_text[:max(0, len(self.output_text) - hold)] if hold else self.output_text

    def to_output(self) -> CompletionOutput:
        wants_logprobs = self.request.params.logprobs is not None
        return CompletionOutput(
            index=self.index,
            text=self.visible_text(),
            token_ids=list(self.output_ids),
            finish_reason=self.finish_reason,
            stop_reason=self.stop_reason,
            logprobs=list(self.logprobs) if wants_logprobs else None,
            cumulative_logprob=self.cumulative_logprob if wants_logprobs else None,
        )


@dataclass(eq=False)
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    max_tokens: int  # resolved: params.max_tokens, or what the context window leaves
    sequences: list[Sequence] = field(default_factory=list)
    prompt_logprobs: list[LogprobDict | None] | None = None
    metrics: RequestMetrics = field(default_factory=lambda: RequestMetrics(arrival_time=time.monotonic()))

    @property
    def stop_holdback(self) -> int:
        return max((len(s) for s in self.params.stop), default=1) - 1

    @property
    def needs_prompt_logprobs(self) -> bool:
        return (self.params.prompt_logprobs is not None and self.prompt_logprobs is not None
                and len(self.prompt_logprobs) < len(self.prompt_ids))

    @property
    def finished(self) -> bool:
        return all(seq.finished for seq in self.sequences)

    def to_output(self) -> RequestOutput:
        return RequestOutput(
            request_id=self.request_id,
            prompt=self.prompt,
            prompt_token_ids=self.prompt_ids,
            outputs=[seq.to_output() for seq in self.sequences],
            finished=self.finished,
            prompt_logprobs=list(self.prompt_logprobs) if self.prompt_logprobs is not None else None,
            metrics=self.metrics,
        )
