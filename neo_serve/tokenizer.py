"""Tokenizer wrapper (Hugging Face `tokenizers`) and the incremental detokenizer for streaming."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer as HFTokenizer, decoders, models, normalizers, pre_tokenizers

from neo_serve.errors import CheckpointError

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>",)


class Tokenizer:
    """`tokenizer.json` (GPT-NeoX) or `vocab.json` + `merges.txt` (GPT-2 BPE, as GPT-Neo ships)."""

    def __init__(self, backend: HFTokenizer) -> None:
        self.backend = backend
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        added = backend.get_added_tokens_decoder()
        self.special_ids = frozenset(token_id for token_id, token in added.items() if token.special)
        self._added_ids = frozenset(added)
        self._byte_alphabet = _BYTE_LEVEL_ALPHABET if isinstance(backend.decoder, decoders.ByteLevel) else None
        # The most characters one token stands for: a byte-level entry has one character per
        # byte, at least as many as its decoded text; an added token is its own text.
        self.max_token_chars = max((len(token) for token in backend.get_vocab(with_added_tokens=True)), default=1)

    @functools.cached_property
    def digest(self) -> str:
        """SHA-256 of the tokenizer as it encodes (its full serialization, settings applied): two
        models with the same digest give the same ids for every text."""
        return hashlib.sha256(self.backend.to_str().encode()).hexdigest()

    @classmethod
    def from_dir(cls, directory: str | Path) -> "Tokenizer":
        directory = Path(directory)
        if (directory / "tokenizer.json").is_file():
            backend = HFTokenizer.from_file(str(directory / "tokenizer.json"))
            _apply_prefix_space_setting(backend, _json_object(directory / "tokenizer_config.json"))
            return cls(backend)
        vocab, merges = directory / "vocab.json", directory / "merges.txt"
        if vocab.is_file() and merges.is_file():
            return cls(_gpt2_bpe(directory))
        raise CheckpointError(f"{directory} has no tokenizer.json and no vocab.json + merges.txt")

    def encode(self, text: str) -> list[int]:
        # No BOS/EOS is added: GPT-NeoX and GPT-Neo tokenizers add none. `encode_batch` gives the
        # same ids as `encode` but releases the GIL while it works, so a long text encoded on a
        # worker thread does not stall the event loop (a 4 MiB text takes seconds).
        return self.backend.encode_batch([text], add_special_tokens=False)[0].ids

    def decode(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.backend.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(token_id)

    def token_bytes(self, token_id: int) -> bytes | None:
        """The bytes a byte-level BPE token stands for (a multi-byte character may be split over
        several tokens); None for added tokens and for vocabularies that are not byte-level."""
        if self._byte_alphabet is None or token_id in self._added_ids:
            return None
        piece = self.backend.id_to_token(token_id)
        try:
            return bytes(self._byte_alphabet[char] for char in piece) if piece is not None else None
        except KeyError:  # not a byte-level piece after all
            return None


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE (GPT-NeoX's and GPT-Neo's) writes every byte as a printable
    character: printable Latin-1 bytes as themselves, the other 68 as U+0100 onwards, in byte
    order. Character -> byte."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    alphabet: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL_ALPHABET = _byte_level_alphabet()


def _json_object(path: Path) -> dict[str, Any]:
    """A tokenizer file's JSON object; {} when the checkpoint does not ship it."""
    return json.loads(path.read_text()) if path.is_file() else {}


def _special_tokens(*configs: dict[str, Any]) -> list[str]:
    """Special tokens named by special_tokens_map.json / tokenizer_config.json, else <|endoftext|>."""
    tokens: list[str] = []
    for data in configs:
        named = [data.get(key) for key in ("bos_token", "eos_token", "unk_token", "pad_token")]
        for value in [*named, *(data.get("additional_special_tokens") or [])]:
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and value not in tokens:
                tokens.append(value)
        for entry in (data.get("added_tokens_decoder") or {}).values():
            if entry.get("special") and entry.get("content") not in tokens:
                tokens.append(entry["content"])
    return tokens or list(DEFAULT_SPECIAL_TOKENS)


def _added_tokens(added_tokens: dict[str, Any], tokenizer_config: dict[str, Any]) -> dict[int, dict[str, Any]]:
    """Tokens a GPT-2 style checkpoint adds beyond its BPE vocabulary (added_tokens.json and
    tokenizer_config.json's added_tokens_decoder): id -> {"content", "special", ...}."""
    added: dict[int, dict[str, Any]] = {int(token_id): {"content": content}
                                        for content, token_id in added_tokens.items()}
    for token_id, entry in (tokenizer_config.get("added_tokens_decoder") or {}).items():
        added[int(token_id)] = entry
    return added


def _apply_prefix_space_setting(backend: HFTokenizer, tokenizer_config: dict[str, Any]) -> None:
    """transformers' GPTNeoXTokenizer and GPT2Tokenizer take `add_prefix_space` from
    tokenizer_config.json over the one in tokenizer.json's byte-level pre-tokenizer (a space before
    the text changes every id after it): so does this."""
    tokenizer_class = str(tokenizer_config.get("tokenizer_class", ""))
    wanted = tokenizer_config.get("add_prefix_space")
    if not isinstance(wanted, bool) or not tokenizer_class.startswith(("GPTNeoXTokenizer", "GPT2Tokenizer")):
        return
    pre_tokenizer = backend.pre_tokenizer
    if isinstance(pre_tokenizer, pre_tokenizers.ByteLevel) and pre_tokenizer.add_prefix_space != wanted:
        pre_tokenizer.add_prefix_space = wanted
        backend.pre_tokenizer = pre_tokenizer


def _gpt2_bpe(directory: Path) -> HFTokenizer:
    """vocab.json + merges.txt, with the tokens the checkpoint adds at the ids it gives them (a
    fine-tune's pad or chat tokens): the model's embedding rows are indexed by those ids."""
    tokenizer_config = _json_object(directory / "tokenizer_config.json")
    special_tokens = _special_tokens(_json_object(directory / "special_tokens_map.json"), tokenizer_config)
    tokenizer = HFTokenizer(models.BPE.from_file(str(directory / "vocab.json"), str(directory / "merges.txt")))
    # GPT-2's byte-level BPE: GPT-2's split regex, byte-level decoding, no prefix space unless asked.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(
        add_prefix_space=bool(tokenizer_config.get("add_prefix_space", False)))
    tokenizer.decoder = decoders.ByteLevel()
    if str(tokenizer_config.get("tokenizer_class", "")).startswith("GPTNeoXTokenizer"):
        # GPT-NeoX's tokenizer (Pythia, GPT-NeoX-20B) normalizes text to NFC first; GPT-2's does not.
        tokenizer.normalizer = normalizers.NFC()
    specials = set(special_tokens)
    known = [t for t in special_tokens if tokenizer.token_to_id(t) is not None]
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in known])
    added = _added_tokens(_json_object(directory / "added_tokens.json"), tokenizer_config)
    for token_id, entry in sorted(added.items()):
        content = entry["content"]
        special = bool(entry.get("special")) or content in specials
        existing = tokenizer.token_to_id(content)
        if existing is not None and existing != token_id:
            raise CheckpointError(f"{directory}: added token {content!r} has id {token_id} there, but the "
                                  f"vocabulary gives it {existing}")
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        # Already in vocab.json: registered all the same (it keeps its id) so that it is matched
        # whole, before the byte-level split; new tokens take the next id.
        if existing is None and token_id != size:
            raise CheckpointError(f"{directory}: added token {content!r} has id {token_id}, but the vocabulary "
                                  f"before it has {size} tokens (added ids must follow on from the vocabulary)")
        token = AddedToken(content, special=special, normalized=not special, lstrip=bool(entry.get("lstrip")),
                           rstrip=bool(entry.get("rstrip")), single_word=bool(entry.get("single_word")))
        (tokenizer.add_special_tokens if special else tokenizer.add_tokens)([token])
    return tokenizer


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas that are always whole characters.

    Byte-level BPE splits multi-byte characters across tokens; decoding a partial character
    gives U+FFFD. We decode a small window of recent tokens and hold back text that ends in
    U+FFFD until the next token completes it.
    """

    CONTEXT_TOKENS = 5

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids = self.prompt_context(tokenizer, prompt_ids, skip_special_tokens=skip_special_tokens)
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    @classmethod
    def prompt_context(cls, tokenizer: Tokenizer, prompt_ids: list[int], *, skip_special_tokens: bool) -> list[int]:
        """The prompt's last tokens that the generated text is decoded after: `CONTEXT_TOKENS` of
        those the text shows, and the special tokens it leaves out between them (counted, they
        could push a character's first bytes out of the window: U+FFFD for a whole character)."""
        start, shown = len(prompt_ids), 0
        while start > 0 and shown < cls.CONTEXT_TOKENS:
            start -= 1
            shown += not (skip_special_tokens and prompt_ids[start] in tokenizer.special_ids)
        return list(prompt_ids[start:])

    def add(self, token_id: int) -> str:
        """Append one token; return the newly completed text (possibly empty)."""
        self.ids.append(token_id)
        return self._delta(final=False)

    def flush(self) -> str:
        """Text still held back (an incomplete character at the very end), as it decodes."""
        return self._delta(final=True)

    def _delta(self, *, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip_special_tokens)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip_special_tokens)
        if full.endswith("\ufffd") and not final:
            return ""
        # The new text starts where `prefix` ends, except after a prompt (token ids) cut inside a
        # character: the prompt's text shows its bytes as U+FFFD, and the token that completes
        # the character brings it, e.g. prefix "a\ufffd" (bytes 61 c3), full "a\u00e9" (+ a9).
        start = len(prefix) if full.startswith(prefix) else len(os.path.commonprefix((prefix, full)))
        if len(full) <= start:
            return ""
        # Keep a short window: drop ids before the read offset once they are decoded.
        self.prefix_offset = self.read_offset
        self.read_offset = len(self.ids)
        if self.prefix_offset > self.CONTEXT_TOKENS:
            drop = self.prefix_offset - self.CONTEXT_TOKENS
            del self.ids[:drop]
            self.prefix_offset -= drop
            self.read_offset -= drop
        return full[start:]
