"""What a pipeline replica streams back per request: deltas, not the engine's cumulative outputs.

The engine's `RequestOutput` is cumulative (the whole text so far); sending it every step would
cost O(length^2) bytes through the handle. `DeltaTracker` turns it into `GenerationChunk`s that
carry only what is new, with logprobs already as token strings (so the router never needs the
checkpoint's tokenizer).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from neo_serve.engine.outputs import LogprobDict, RequestOutput


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its log-probability and the top alternatives (token text -> logprob).

    `logprob` and `top` are None for the first prompt token, which has no context."""

    token_id: int
    token: str
    logprob: float | None
    top: dict[str, float] | None


@dataclass
class SequenceDelta:
    """What is new for one of the request's `n` sequences."""

    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None  # one per new token, when requested
    finish_reason: str | None = None  # "stop" | "length" | "abort", once, in the last delta
    stop_reason: str | int | None = None


@dataclass
class GenerationChunk:
    """One message of a request's stream. The first one (`prompt_token_ids` set) confirms the
    request was accepted; later ones carry new text, tokens and prompt logprobs."""

    request_id: str
    sequences: list[SequenceDelta] = field(default_factory=list)
    prompt: str | None = None  # first chunk: the prompt text (decoded when given as token ids)
    prompt_token_ids: list[int] | None = None  # first chunk only
    prompt_logprobs: list[TokenLogprob] | None = None  # new prompt positions, when requested
    finished: bool = False


class DeltaTracker:
    """Remembers what a request's stream has sent and makes the next delta."""

    def __init__(self, request_id: str, decode_token: Callable[[int], str]) -> None:
        self.request_id = request_id
        self._decode = decode_token
        self._text_len: dict[int, int] = {}
        self._num_tokens: dict[int, int] = {}
        self._finished: set[int] = set()
        self._prompt_logprobs_sent = 0

    def first_chunk(self, output: RequestOutput, prompt_text: str) -> GenerationChunk:
        return GenerationChunk(self.request_id, prompt=prompt_text, prompt_token_ids=list(output.prompt_token_ids))

    def update(self, output: RequestOutput) -> GenerationChunk | None:
        """The delta since the last call, or None if nothing changed."""
        chunk = GenerationChunk(self.request_id, finished=output.finished)
        if output.prompt_logprobs is not None and len(output.prompt_logprobs) > self._prompt_logprobs_sent:
            start = self._prompt_logprobs_sent
            chunk.prompt_logprobs = [
                self._token_logprob(output.prompt_token_ids[p], entry)
                for p, entry in enumerate(output.prompt_logprobs[start:], start)
            ]
            self._prompt_logprobs_sent = len(output.prompt_logprobs)
        for seq in output.outputs:
            text_sent = self._text_len.get(seq.index, 0)
            tokens_sent = self._num_tokens.get(seq.index, 0)
            finishing = seq.finish_reason is not None and seq.index not in self._finished
            if len(seq.text) <= text_sent and len(seq.token_ids) <= tokens_sent and not finishing:
                continue
            delta = SequenceDelta(seq.index, text=seq.text[text_sent:], token_ids=seq.token_ids[tokens_sent:])
            if seq.logprobs is not None:
                delta.logprobs = [self._token_logprob(token, entry)
                                  for token, entry in zip(delta.token_ids, seq.logprobs[tokens_sent:])]
            if finishing:
                delta.finish_reason, delta.stop_reason = seq.finish_reason, seq.stop_reason
                self._finished.add(seq.index)
            self._text_len[seq.index] = max(text_sent, len(seq.text))
            self._num_tokens[seq.index] = len(seq.token_ids)
            chunk.sequences.append(delta)
        if not chunk.sequences and chunk.prompt_logprobs is None and not output.finished:
            return None
        return chunk

    def _token_logprob(self, token_id: int, entry: LogprobDict | None) -> TokenLogprob:
        if entry is None:
            return TokenLogprob(token_id, self._decode(token_id), None, None)
        # The engine's dict holds the chosen token and the top alternatives, by token id.
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
            top.setdefault(self._decode(t), lp)  # ids decoding to the same text: keep the likeliest
        return TokenLogprob(token_id, self._decode(token_id), entry.get(token_id), top)


class TokenDecoder:
    """Token id -> its text (special tokens kept), cached: logprobs decode the same ids often."""

    def __init__(self, decode: Callable[[list[int]], str], max_entries: int = 65536) -> None:
        self._decode = decode
        self._cache: dict[int, str] = {}
        self._max = max_entries

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self._decode([token_id])
            if len(self._cache) < self._max:
                self._cache[token_id] = text
        return text
