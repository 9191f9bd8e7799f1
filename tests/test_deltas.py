"""What a replica streams per request (`DeltaTracker`): text offsets of logprobs, checked against
the text the engine's detokenizer produces, with the bundled demo model's tokenizer."""

from __future__ import annotations

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
