"""What a replica streams per request (`DeltaTracker`): text offsets of logprobs, checked against
the text the engine's detokenizer produces, with the bundled demo model's tokenizer."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from neo_serve.engine.outputs import CompletionOutput, RequestOutput
from neo_serve.serve.outputs import DeltaTracker, TokenDecoder
from neo_serve.tokenizer import Tokenizer

DEMO = Path(__file__).resolve().parents[1] / "neo_serve" / "demo_model"


@pytest.mark.parametrize("skip_special_tokens", [True, False])
def test_text_offsets_follow_the_text_around_a_special_token(skip_special_tokens):
    # With ignore_eos, an <|endoftext|> mid-generation is in the tokens but, by default, not in
    # the text: the offsets of the tokens after it must not count its 13 characters.
    tokenizer = Tokenizer.from_dir(DEMO)
    [eos] = [t for t in tokenizer.special_ids if tokenizer.decode([t], skip_special_tokens=False) == "<|endoftext|>"]
    tokens = tokenizer.encode("x = 1") + [eos] + tokenizer.encode("y = \u00e9t\u00e9")
    text = tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)
    output = RequestOutput("r", "p", [1, 2], [CompletionOutput(0, text, tokens, logprobs=[{t: -1.0} for t in tokens])],
                           finished=False)
    tracker = DeltaTracker("r", TokenDecoder(tokenizer), skip_special_tokens=skip_special_tokens)
    [delta] = tracker.update(output).sequences
    offsets = [sum(entry.text_len for entry in delta.logprobs[:i]) for i in range(len(tokens))]
    expected = [len(tokenizer.decode(tokens[:i], skip_special_tokens=skip_special_tokens).rstrip("\ufffd"))
                for i in range(len(tokens))]
    assert offsets == expected and sum(entry.text_len for entry in delta.logprobs) == len(text)


def _character_ends(data: bytes) -> list[int]:
    """Where each character of `data.decode("utf-8", "replace")` ends, in bytes: a valid
    character's bytes, or the bytes that "replace" turns into one U+FFFD."""
    ends, start = [], 0
    while start < len(data):
        try:
            valid, broken = data[start:].decode(), None
        except UnicodeDecodeError as error:
            valid, broken = data[start:start + error.start].decode(), error.end - error.start
        for char in valid:
            start += len(char.encode())
            ends.append(start)
        if broken is not None:
            start += broken
            ends.append(start)
    return ends


def _offsets(tokenizer, tokens: list[int], *, show_special: bool) -> tuple[list[int], int]:
    """For each token, how many characters of the tokens' text end before it starts: each byte
    of a byte-level token and each special token shown is a unit, and a character ends after the
    last unit it holds (bytes decoded as "replace" does; a special token's text ends with it).
    Also the text's length, to check this reference against the tokenizer's decode."""
    starts, units = [], []
    for token in tokens:
        starts.append(len(units))
        raw = tokenizer.token_bytes(token)
        if raw is not None:
            units.extend(raw[i:i + 1] for i in range(len(raw)))
        elif show_special:
            units.append(tokenizer.decode([token], skip_special_tokens=False))
    ends, run, run_start = [], b"", 0
    for index, unit in enumerate(units + [""]):
        if isinstance(unit, bytes):
            run_start, run = (index, unit) if not run else (run_start, run + unit)
            continue
        ends += [run_start + end for end in _character_ends(run)] + [index + 1] * len(unit)
        run = b""
    return [sum(end <= start for end in ends) for start in starts], len(ends)


def _echoed(tokenizer, prompt: list[int], generated: list[int], skip: bool) -> tuple[str, str, list[int]]:
    """The prompt's text, the completion's text (the engine's detokenizer) and the echoed text
    offsets of `prompt` + `generated`, as the router puts them together from a replica's chunks."""
    from neo_serve.serve.completions import _logprobs_delta
    from neo_serve.tokenizer import IncrementalDetokenizer

    detokenizer = IncrementalDetokenizer(tokenizer, prompt, skip_special_tokens=skip)
    text = "".join(detokenizer.add(token) for token in generated) + detokenizer.flush()
    tracker = DeltaTracker("r", TokenDecoder(tokenizer), skip_special_tokens=skip)
    prompt_text = tokenizer.decode(prompt, skip_special_tokens=False)
    output = RequestOutput("r", None, prompt, [CompletionOutput(0, text, generated, "length",
                                                                logprobs=[{t: -1.0} for t in generated])],
                           finished=True, prompt_logprobs=[None] + [{t: -1.0} for t in prompt[1:]])
    tracker.first_chunk(output, prompt_text)
    chunk = tracker.update(output)
    echoed, offset = _logprobs_delta(chunk.prompt_logprobs, 0)
    completion, _ = _logprobs_delta(chunk.sequences[0].logprobs, offset)
    assert chunk.sequences[0].text == text and offset == len(prompt_text)
    return prompt_text, text, echoed.text_offset + completion.text_offset


class _ByteTokens:
    """A byte-level vocabulary whose tokens hold several bytes, parts of characters among them
    (b"\x80A": a character's last byte and an ASCII letter), as real GPT-NeoX vocabularies have
    and the demo's does not; token 0 is a special token. Decodes as `tokenizers`' byte-level
    decoder does: the tokens' bytes (a special token's as its text) joined, then "replace"."""

    PIECES = [b"a", b"b", b"\xc3", b"\xa9", b"\x80A", b"\xe2\x82", b"\xac\xf0", b"\x9f\x99", b"\x82",
              b"\xe4\xb8\xad", b"\xb8", b"A\xe4"]
    EOS = "<|endoftext|>"
    special_ids = frozenset({0})
    vocab_size = len(PIECES) + 1

    def token_bytes(self, token: int) -> bytes | None:
        return None if token == 0 else self.PIECES[token - 1]

    def decode(self, tokens: list[int], *, skip_special_tokens: bool = True) -> str:
        return b"".join(self.EOS.encode() if token == 0 else self.PIECES[token - 1] for token in tokens
                        if not (token == 0 and skip_special_tokens)).decode("utf-8", "replace")


@pytest.mark.parametrize("vocabulary", ["demo", "multi-byte pieces"])
@pytest.mark.parametrize("skip", [True, False], ids=["skip-special", "keep-special"])
def test_text_offsets_and_text_where_characters_are_cut_between_tokens(vocabulary, skip):
    """Token-id prompts (lm-eval truncates them by tokens) and generations can hold bytes of a
    character that the next token does not continue, and a prompt can end inside a character
    that a generated token completes, also past special tokens left out of the text. The
    completion's text is then what the whole token list's text adds to the prompt's (as vLLM:
    the completed character, not a U+FFFD the prompt's text already shows), and a token's offset
    counts the characters whose bytes all come before it, in the prompt's text or the completion's."""
    if vocabulary == "demo":
        tokenizer = Tokenizer.from_dir(DEMO)
        byte_token = {tokenizer.token_bytes(t)[0]: t for t in range(tokenizer.vocab_size)
                      if tokenizer.token_bytes(t) is not None and len(tokenizer.token_bytes(t)) == 1}
        [eos] = [t for t in tokenizer.special_ids if tokenizer.decode([t], skip_special_tokens=False) == "<|endoftext|>"]
        # ASCII, é's and 中's and 🙂's bytes, a stray continuation byte; U+FFFD's own bytes left
        # out (a real U+FFFD and a cut-off character look alike).
        alphabet = [byte_token[b] for b in b"ab\xc3\xa9\xe4\xb8\xad\xf0\x9f\x99\x82\x80"] + [eos]
        alphabet += tokenizer.encode(" \u00e9t\u00e9 \u4e2d")[:4]
        c3, a9, a, b = (byte_token[x] for x in (0xC3, 0xA9, ord("a"), ord("b")))
        # The QA report's cases: a cut-off byte in a prompt, a prompt's é completed by the first
        # generated token, a prompt's cut-off byte followed by ASCII, six cut-off bytes generated;
        # and 🙂's bytes with special tokens between them, at the end of a prompt.
        cases = [([a, c3, a, b], []), ([a, c3], [a9, a9]), ([a, c3], [a, b]), ([a, b], [c3] * 6),
                 ([byte_token[0xF0], eos, eos, byte_token[0x9F], eos],
                  [byte_token[0x99], byte_token[0x82], a, b])]
    else:
        tokenizer = _ByteTokens()
        alphabet, cases = list(range(tokenizer.vocab_size)), []
    rng = random.Random(0)
    cases += [([rng.choice(alphabet) for _ in range(rng.randint(1, 7))],
               [rng.choice(alphabet) for _ in range(rng.randint(1, 7))]) for _ in range(600)]
    for prompt, generated in cases:
        prompt_text, text, offsets = _echoed(tokenizer, prompt, generated, skip)
        whole = tokenizer.decode(prompt + generated, skip_special_tokens=skip)
        # The prompt's text as the completion continues it (special tokens left out or not) and
        # how much of it stays as it is.
        kept = len(os.path.commonprefix((tokenizer.decode(prompt, skip_special_tokens=skip), whole)))
        assert text == whole[kept:], (prompt, generated)
        prompt_offsets, prompt_chars = _offsets(tokenizer, prompt, show_special=True)
        all_offsets, all_chars = _offsets(tokenizer, prompt + generated, show_special=not skip)
        assert (prompt_chars, all_chars) == (len(prompt_text), len(whole))  # the reference itself
        expected = prompt_offsets + [len(prompt_text) + max(0, offset - kept) for offset in all_offsets[len(prompt):]]
        # A special token left out of the text has no text of its own: after bytes of a character
        # not yet whole, where it stands depends on tokens still to come (they may complete the
        # character around it). Anywhere from the token before it to `expected` will do.
        for index in range(len(prompt), len(offsets)):
            if skip and offsets[index] != expected[index] and offsets[index - 1] <= offsets[index] <= expected[index]:
                assert tokenizer.token_bytes((prompt + generated)[index]) is None
                expected[index] = offsets[index]
        assert offsets == expected, (prompt, generated)
