"""Token ids equal transformers' tokenizer; streaming never shows a broken character."""

from __future__ import annotations

import pytest

from neo_serve.errors import CheckpointError
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


def test_a_gpt_neox_tokenizer_without_tokenizer_json_normalizes_like_transformers(neox_checkpoint, tokenizer,
                                                                                  tmp_path):
    # A GPT-NeoX checkpoint may ship vocab.json + merges.txt with tokenizer_class GPTNeoXTokenizer
    # instead of tokenizer.json: that tokenizer applies NFC, so "e" + a combining accent is "é".
    import json
    import shutil

    from transformers import AutoTokenizer

    plain = tmp_path / "vocab-merges"
    shutil.copytree(neox_checkpoint, plain)
    (plain / "tokenizer.json").unlink()
    tokenizer.model.save(str(plain))
    config_path = plain / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    config_path.write_text(json.dumps({**config, "tokenizer_class": "GPTNeoXTokenizer"}))
    theirs = AutoTokenizer.from_pretrained(plain)
    assert type(theirs).__name__ == "GPTNeoXTokenizer"
    for text in ("cafe\u0301 na\u0308ive", "def f():\n    return 1"):
        assert Tokenizer.from_dir(plain).encode(text) == theirs.encode(text, add_special_tokens=False), text


def test_a_gpt2_style_tokenizer_keeps_the_tokens_a_fine_tune_adds(neo_checkpoint, tmp_path):
    # GPT-Neo fine-tunes with a pad or chat tokens ship vocab.json + merges.txt + added_tokens.json:
    # the added tokens must encode to their own ids (the model's embedding rows), not to BPE pieces.
    import json
    import shutil

    from transformers import AutoTokenizer

    tuned = tmp_path / "tuned"
    shutil.copytree(neo_checkpoint, tuned)
    size = len(json.loads((tuned / "vocab.json").read_text()))
    (tuned / "added_tokens.json").write_text(json.dumps({"<|pad|>": size, "<|user|>": size + 1}))
    special_map = json.loads((tuned / "special_tokens_map.json").read_text())
    special_map["pad_token"] = "<|pad|>"
    (tuned / "special_tokens_map.json").write_text(json.dumps(special_map))
    ours = Tokenizer.from_dir(tuned)
    theirs = AutoTokenizer.from_pretrained(tuned)
    text = "<|user|>hello there<|pad|><|pad|> and <|endoftext|>"
    ids = ours.encode(text)
    assert ids == theirs.encode(text, add_special_tokens=False)
    assert ids[0] == size + 1 and ids.count(size) == 2
    assert ours.decode(ids, skip_special_tokens=False) == text
    assert size in ours.special_ids and size + 1 not in ours.special_ids  # the pad is special, <|user|> not
    (tuned / "added_tokens.json").write_text(json.dumps({"<|user|>": size + 5}))
    with pytest.raises(CheckpointError, match="must follow on"):
        Tokenizer.from_dir(tuned)

    # An added token that vocab.json already holds is still matched whole, at its id.
    (tuned / "added_tokens.json").unlink()
    vocab = json.loads((tuned / "vocab.json").read_text())
    vocab["<|sys|>"] = size
    (tuned / "vocab.json").write_text(json.dumps(vocab))
    config_path = tuned / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    tokenizer_config["added_tokens_decoder"] = {str(size): {"content": "<|sys|>", "special": False}}
    config_path.write_text(json.dumps(tokenizer_config))
    text = "<|sys|>hello there"
    assert Tokenizer.from_dir(tuned).encode(text) == AutoTokenizer.from_pretrained(tuned).encode(
        text, add_special_tokens=False)
    assert Tokenizer.from_dir(tuned).encode(text)[0] == size


@pytest.mark.parametrize("tokenizer_class", ["GPTNeoXTokenizer", "GPT2Tokenizer", "PreTrainedTokenizerFast"])
def test_add_prefix_space_in_tokenizer_config_applies_as_in_transformers(neox_checkpoint, tmp_path, tokenizer_class):
    # tokenizer.json's pre-tokenizer adds no prefix space; tokenizer_config.json asks for one.
    # transformers' GPT-NeoX and GPT-2 tokenizers follow the config (a space before the text and
    # after each added token), its generic fast tokenizer the file: each id after it moves.
    import json
    import shutil

    from transformers import AutoTokenizer

    checkpoint = tmp_path / "prefix-space"
    shutil.copytree(neox_checkpoint, checkpoint)
    config_path = checkpoint / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "tokenizer_class": tokenizer_class, "add_prefix_space": True}))
    theirs = AutoTokenizer.from_pretrained(checkpoint)
    ours = Tokenizer.from_dir(checkpoint)
    for text in ("Hello world", "x <|endoftext|> y"):
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
    assert (ours.encode("Hello") != Tokenizer.from_dir(neox_checkpoint).encode("Hello")) == (
        tokenizer_class != "PreTrainedTokenizerFast")
