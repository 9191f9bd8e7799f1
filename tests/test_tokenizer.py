"""Token ids equal transformers' tokenizer; streaming never shows a broken character."""

from __future__ import annotations

import pytest

from neo_serve.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["def hello_world():\n    return 'hi'\n", "Grüße, naïve café — 日本語 🙂🚀 <|endoftext|> after the end",
         "  leading spaces and\ttabs\n\n", "In a shocking finding, scientists discovered a herd of unicorns"]


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
def test_ids_equal_transformers(checkpoint, request):
    from transformers import AutoTokenizer

    path = request.getfixturevalue(checkpoint)
    if checkpoint == "neo_checkpoint":
        assert not (path / "tokenizer.json").exists() and (path / "merges.txt").exists()
    ours = Tokenizer.from_dir(path)
    theirs = AutoTokenizer.from_pretrained(path)
    for text in TEXTS:
        ids = ours.encode(text)
        assert ids == theirs.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.encode("<|endoftext|>") == [theirs.convert_tokens_to_ids("<|endoftext|>")]


def test_incremental_detokenizer_never_emits_broken_characters(neox_checkpoint):
    tokenizer = Tokenizer.from_dir(neox_checkpoint)
    text = "emoji 🙂🚀 and 日本語のテキスト, Grüße"
    ids = tokenizer.encode(text)
    # The tiny BPE splits the multi-byte characters across several tokens.
    pieces = [tokenizer.decode([i]) for i in ids]
    assert any("\ufffd" in piece for piece in pieces)
    prompt = tokenizer.encode("say: ")
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(token) for token in ids]
    deltas.append(detok.flush())
    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == text


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
def test_token_bytes_are_the_texts_utf8_bytes(checkpoint, request):
    """Logprobs show a piece of a split character by its bytes: the pieces' bytes must add up
    to the text's UTF-8, whole characters and split ones alike."""
    tokenizer = Tokenizer.from_dir(request.getfixturevalue(checkpoint))
    for text in TEXTS:
        text = text.replace("<|endoftext|>", "")
        ids = tokenizer.encode(text)
        assert b"".join(tokenizer.token_bytes(i) for i in ids) == text.encode("utf-8"), text
    assert tokenizer.token_bytes(tokenizer.encode("<|endoftext|>")[0]) is None  # an added token
