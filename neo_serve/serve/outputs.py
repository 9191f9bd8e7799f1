"""What a pipeline replica streams back per request: deltas, not the engine's cumulative outputs.

The engine's `RequestOutput` is cumulative (the whole text so far); sending it every step would
cost O(length^2) bytes through the handle. `DeltaTracker` turns it into `GenerationChunk`s that
carry only what is new, with logprobs already as token strings (so the router never needs the
checkpoint's tokenizer).
"""

from __future__ import annotations

import codecs
from dataclasses import dataclass, field
from typing import Protocol

from neo_serve.engine.outputs import LogprobDict, RequestOutput
from neo_serve.tokenizer import IncrementalDetokenizer


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token, its log-probability and the top alternatives (token text -> logprob).

    `logprob` and `top` are None for the first prompt token, which has no context. A token that
    holds only part of a character's UTF-8 bytes shows as `bytes:\\xe4\\xb8` (OpenAI's form), so
    such tokens stay apart as keys of `top`."""

    token_id: int
    token: str
    logprob: float | None
    top: dict[str, float] | None
    # Characters of the text this token completes: 0 for the leading bytes of a character split
    # over tokens, 1 for the token that ends it; the prompt's last token also counts the U+FFFD of
    # a character the prompt ends inside. Text offsets add these up.
    text_len: int
    # How many of those stand for earlier tokens' bytes: the U+FFFD that an unfinished character
    # becomes when this token does not continue it. The token's own text starts after them.
    earlier_chars: int = 0


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
    replica: str | None = None  # first chunk only: the pipeline replica that accepted the request
    prompt_logprobs: list[TokenLogprob] | None = None  # new prompt positions, when requested
    finished: bool = False


class DeltaTracker:
    """Remembers what a request's stream has sent and makes the next delta."""

    PROMPT = -1  # `_utf8` key of the prompt's tokens; the sequences use their index

    def __init__(self, request_id: str, decode_token: "TokenDecoder", *, skip_special_tokens: bool = True) -> None:
        self.request_id = request_id
        self._decode = decode_token
        # The generated text leaves special tokens out (the request's `skip_special_tokens`): they
        # then take no characters of it. The echoed prompt always shows them.
        self._skip_special = skip_special_tokens
        # Per stream of tokens (prompt, each sequence): UTF-8 bytes of a character not yet whole.
        self._utf8: dict[int, codecs.IncrementalDecoder] = {}
        self._text_len: dict[int, int] = {}
        self._num_tokens: dict[int, int] = {}
        self._finished: set[int] = set()
        self._prompt_logprobs_sent = 0
        # Bytes of a character that a token-id prompt ends inside: the first generated token may
        # complete it, and that character is then that token's text (the prompt's text shows U+FFFD).
        self._prompt_tail = b""
        self._holding_prompt_bytes: set[int] = set()  # sequences whose undecoded bytes include those

    def first_chunk(self, output: RequestOutput, prompt_text: str) -> GenerationChunk:
        """The stream's first chunk; call it before `update` (it notes how the prompt ends)."""
        self._prompt_tail = self._unfinished_character(output.prompt_token_ids)
        return GenerationChunk(self.request_id, prompt=prompt_text, prompt_token_ids=list(output.prompt_token_ids))

    def _unfinished_character(self, token_ids: list[int]) -> bytes:
        """The bytes of an unfinished character at the end of `token_ids`, as the generated text
        continues them (special tokens left out of it are passed over), from the same last
        tokens as the engine's detokenizer decodes the generated text after."""
        utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        context = IncrementalDetokenizer.prompt_context(self._decode.tokenizer, token_ids,
                                                        skip_special_tokens=self._skip_special)
        for token in context:
            raw = self._decode.token_bytes(token)
            if raw is not None:
                utf8.decode(raw)
            elif not (self._skip_special and self._decode.is_special(token)):
                utf8.reset()
        return utf8.getstate()[0]

    def update(self, output: RequestOutput) -> GenerationChunk | None:
        """The delta since the last call, or None if nothing changed."""
        chunk = GenerationChunk(self.request_id, finished=output.finished)
        if output.prompt_logprobs is not None and len(output.prompt_logprobs) > self._prompt_logprobs_sent:
            start = self._prompt_logprobs_sent
            last = len(output.prompt_token_ids) - 1
            chunk.prompt_logprobs = [
                self._token_logprob(self.PROMPT, output.prompt_token_ids[p], entry, ends_stream=p == last)
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
                delta.logprobs = [self._token_logprob(seq.index, token, entry)
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

    def _token_logprob(self, stream: int, token_id: int, entry: LogprobDict | None, *,
                       ends_stream: bool = False) -> TokenLogprob:
        text_len, earlier = self._chars_completed(stream, token_id)
        if ends_stream:  # the prompt's text shows an unfinished character at its end as U+FFFD
            text_len += len(self._utf8[stream].decode(b"", final=True))
        if entry is None:
            return TokenLogprob(token_id, self._decode(token_id), None, None, text_len, earlier)
        # The engine's dict holds the chosen token and the top alternatives, by token id.
        top: dict[str, float] = {}
        for t, lp in sorted(entry.items(), key=lambda kv: -kv[1]):
            top.setdefault(self._decode(t), lp)  # ids decoding to the same text: keep the likeliest
        return TokenLogprob(token_id, self._decode(token_id), entry.get(token_id), top, text_len, earlier)

    def _chars_completed(self, stream: int, token_id: int) -> tuple[int, int]:
        """How many characters of its stream's text `token_id` completes, given the tokens before
        it (the bytes of a character split over tokens count once, at the token that ends it),
        and how many of those stand for earlier tokens' bytes (see `TokenLogprob.earlier_chars`)."""
        if stream != self.PROMPT and self._skip_special and self._decode.is_special(token_id):
            return 0, 0  # absent from the text; bytes of a character before it join those after it
        utf8 = self._utf8.get(stream)
        if utf8 is None:
            utf8 = self._utf8[stream] = codecs.getincrementaldecoder("utf-8")("replace")
            if stream != self.PROMPT and self._prompt_tail:
                utf8.setstate((self._prompt_tail, 0))
                self._holding_prompt_bytes.add(stream)
        raw = self._decode.token_bytes(token_id)
        if raw is not None:
            cut_off, shared = _cut_off(utf8, raw)
            chars = len(utf8.decode(raw))
        else:
            # An added token (e.g. <|endoftext|>): bytes left over decode on their own, as U+FFFD.
            cut_off, shared = len(utf8.decode(b"", final=True)), False
            utf8.reset()
            chars = cut_off + len(self._decode.decoded(token_id))
        if stream in self._holding_prompt_bytes and (chars or not utf8.getstate()[0]):
            # The prompt's unfinished character is settled: completed here (its character is this
            # token's text), or cut off, and then its U+FFFD is the prompt's text, not this one's.
            self._holding_prompt_bytes.discard(stream)
            return chars - cut_off, 0
        # A U+FFFD that also holds some of this token's bytes starts the token's own text.
        return chars, 0 if shared else cut_off


def _cut_off(utf8: codecs.IncrementalDecoder, raw: bytes) -> tuple[int, bool]:
    """The characters (U+FFFD) that the bytes pending in `utf8` become when `raw` follows without
    finishing their character (0 if it continues it, or nothing is pending; 1 otherwise, as
    Python's "replace" decodes an unfinished character), and whether that U+FFFD also holds
    some of `raw`'s first bytes (a lead byte and a continuation, then a byte that ends neither)."""
    pending = utf8.getstate()[0]
    if not pending:
        return 0, False
    try:
        codecs.getincrementaldecoder("utf-8")("strict").decode(pending + raw)
    except UnicodeDecodeError as error:
        if error.start == 0:
            return len(pending.decode("utf-8", "replace")), error.end > len(pending)
    return 0, False


class TokenSource(Protocol):
    """What `TokenDecoder` needs of a tokenizer (neo_serve.tokenizer.Tokenizer)."""

    special_ids: frozenset[int]

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str: ...

    def token_bytes(self, token_id: int) -> bytes | None: ...


@dataclass(frozen=True)
class _TokenText:
    shown: str  # what logprobs show
    decoded: str  # the token decoded alone (special tokens kept)
    raw: bytes | None  # its bytes, for a byte-level BPE token


class TokenDecoder:
    """Token id -> its text in logprobs (special tokens kept), cached: logprobs decode the same
    ids often. A token whose bytes are not whole UTF-8 characters (byte-level BPE splits
    multi-byte characters) shows as `bytes:` and its bytes, printable ASCII as itself and the
    others escaped (`bytes: \\xe2\\x80`), as OpenAI's API shows them:
    decoded alone each would be U+FFFD, and different tokens would look the same."""

    def __init__(self, tokenizer: TokenSource, max_entries: int = 65536) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, _TokenText] = {}
        self._max = max_entries

    @property
    def tokenizer(self) -> TokenSource:
        return self._tokenizer

    def __call__(self, token_id: int) -> str:
        return self._lookup(token_id).shown

    def decoded(self, token_id: int) -> str:
        return self._lookup(token_id).decoded

    def token_bytes(self, token_id: int) -> bytes | None:
        return self._lookup(token_id).raw

    def is_special(self, token_id: int) -> bool:
        return token_id in self._tokenizer.special_ids

    def _lookup(self, token_id: int) -> _TokenText:
        entry = self._cache.get(token_id)
        if entry is None:
            decoded = self._tokenizer.decode([token_id], skip_special_tokens=False)
            raw = self._tokenizer.token_bytes(token_id)
            shown = decoded
            if raw is not None and "\ufffd" in decoded:
                try:
                    raw.decode("utf-8")
                except UnicodeDecodeError:
                    shown = "bytes:" + "".join(
                        chr(byte) if 0x20 <= byte < 0x7f and byte != 0x5c else f"\\x{byte:02x}" for byte in raw)
            entry = _TokenText(shown, decoded, raw)
            if len(self._cache) < self._max:
                self._cache[token_id] = entry
        return entry
