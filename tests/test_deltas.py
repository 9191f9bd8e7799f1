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


def _echoed(tokenizer: Tokenizer, prompt: list[int], generated: list[int]) -> tuple[str, str, list[int]]:
    """The prompt's text, the completion's text (the engine's detokenizer) and the echoed text
    offsets of `prompt` + `generated`, as the router puts them together from a replica's chunks."""
    from neo_serve.serve.completions import _logprobs_delta
    from neo_serve.tokenizer import IncrementalDetokenizer

    detokenizer = IncrementalDetokenizer(tokenizer, prompt)
    text = "".join(detokenizer.add(token) for token in generated) + detokenizer.flush()
    tracker = DeltaTracker("r", TokenDecoder(tokenizer))
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


def test_text_offsets_and_text_where_characters_are_cut_between_tokens():
    """Token-id prompts (lm-eval truncates them by tokens) and generations can hold bytes of a
    character that the next token does not continue, and a prompt can end inside a character
    that the first generated token completes. The completion's text is then what the whole token
    list's text adds to the prompt's (as vLLM: the completed character, not a U+FFFD the prompt's
    text already shows), and a token's offset counts the characters whose bytes all come before
    it, in the prompt's text or in the completion's."""
    tokenizer = Tokenizer.from_dir(DEMO)
    byte_token = {tokenizer.token_bytes(t)[0]: t for t in range(tokenizer.vocab_size)
                  if tokenizer.token_bytes(t) is not None and len(tokenizer.token_bytes(t)) == 1}
    # ASCII, é's and 中's and 🙂's bytes, a stray continuation byte; U+FFFD's own bytes left out
    # (a real U+FFFD and a cut-off character look alike).
    alphabet = [byte_token[b] for b in b"ab\xc3\xa9\xe4\xb8\xad\xf0\x9f\x99\x82\x80"]
    alphabet += tokenizer.encode(" \u00e9t\u00e9 \u4e2d")[:4]
    c3, a9 = byte_token[0xC3], byte_token[0xA9]
    a, b = byte_token[ord("a")], byte_token[ord("b")]
    # The QA report's cases: a cut-off byte in a prompt, a prompt's é completed by the first
    # generated token, a prompt's cut-off byte followed by ASCII, six cut-off bytes generated.
    cases = [([a, c3, a, b], []), ([a, c3], [a9, a9]), ([a, c3], [a, b]), ([a, b], [c3] * 6)]
    rng = random.Random(0)
    cases += [([rng.choice(alphabet) for _ in range(rng.randint(1, 6))],
               [rng.choice(alphabet) for _ in range(rng.randint(1, 6))]) for _ in range(400)]
    for prompt, generated in cases:
        prompt_text, text, offsets = _echoed(tokenizer, prompt, generated)
        whole = tokenizer.decode(prompt + generated)
        kept = len(os.path.commonprefix((prompt_text, whole)))  # the prompt's text that stays as it is
        assert text == whole[kept:], (prompt, generated)
        prompt_bytes = [tokenizer.token_bytes(t) for t in prompt]
        all_bytes = prompt_bytes + [tokenizer.token_bytes(t) for t in generated]
        prompt_ends, all_ends = _character_ends(b"".join(prompt_bytes)), _character_ends(b"".join(all_bytes))
        starts = [len(b"".join(all_bytes[:i])) for i in range(len(all_bytes))]
        expected = [sum(end <= start for end in prompt_ends) for start in starts[:len(prompt)]]
        expected += [len(prompt_text) + max(0, sum(end <= start for end in all_ends) - kept)
                     for start in starts[len(prompt):]]
        assert offsets == expected, (prompt, generated)
