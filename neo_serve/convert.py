"""`neo-serve convert SRC DST`: pickle `.bin` weights -> sharded safetensors, once, offline.

The server never unpickles: this is the one place `.bin` files are read, and only with
`torch.load(weights_only=True)`, which refuses arbitrary Python objects. The result is checked
as a server would open it (config, shard headers, tensor names, tokenizer) before success is
reported.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from neo_serve.errors import CheckpointError, NeoServeError
from neo_serve.loader import INDEX_FILE, verify_checkpoint

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "README.md")
PICKLE_INDEX = "pytorch_model.bin.index.json"
# What a Trainer's output folder holds besides the model: never weights to convert.
TRAINING_STATE = re.compile(r"^(training_args|optimizer|scheduler|scaler|rng_state)")
# The shards this command writes (and the Hub's safetensors shards): superseded by a new index.
SHARD_NAME = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")


def _pickle_files(src: Path) -> list[Path]:
    index = src / PICKLE_INDEX
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise CheckpointError(f"{index}: not a pickle index with a weight_map ({exc!r})") from None
        missing = [name for name in names if not (src / name).is_file()]
        if missing:
            raise CheckpointError(f"{index} names file(s) missing from {src}: {', '.join(missing)}")
        return [src / name for name in names]
    files = sorted(src.glob("pytorch_model*.bin")) or sorted(
        path for path in src.glob("*.bin") if not TRAINING_STATE.match(path.name))
    if files:
        return files
    if any(src.glob("*.safetensors")):
        raise CheckpointError(f"{src} already holds safetensors weights and no pytorch_model*.bin: "
                              f"serve it as it is, no conversion needed")
    raise CheckpointError(f"{src} has no pytorch_model*.bin files to convert")


def _load_weights(file: Path) -> dict[str, torch.Tensor]:
    """One pickle file's tensors, memory-mapped where the file's format allows it (torch's zip
    format), so that a 10 GB `.bin` is not read into memory whole."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            state = torch.load(file, map_location="cpu", weights_only=True)  # the legacy format
    except OSError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc})") from None
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError for refused content
        raise CheckpointError(f"{file}: refused or unreadable with weights_only=True ({exc})") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{file} holds a {type(state).__name__}, not a dict of tensors")
    tensors = _tensors_in(state)
    if not tensors:
        # A training checkpoint nests the weights, e.g. {"state_dict": {...}, "step": ...}.
        nested = [found for value in state.values() if isinstance(value, dict) and (found := _tensors_in(value))]
        if len(nested) == 1:
            [tensors] = nested
        else:
            keys = ", ".join(map(repr, list(state)[:8])) or "none"
            raise CheckpointError(f"{file} holds no tensors at its top level (keys: {keys}); save the "
                                  f"model's state_dict() alone and convert that")
    return tensors


def _tensors_in(mapping: dict) -> dict[str, torch.Tensor]:
    return {name: value for name, value in mapping.items() if isinstance(value, torch.Tensor)}


class _ShardWriter:
    """Writes tensors into safetensors shards of at most `max_shard_bytes` as they fill, so a
    conversion holds one shard in memory, not the whole checkpoint (an init container converting
    GPT-NeoX-20B has far less memory than its 41 GB)."""

    def __init__(self, dst: Path, max_shard_bytes: int) -> None:
        self.dst = dst
        self.max_shard_bytes = max_shard_bytes
        self.current: dict[str, torch.Tensor] = {}
        self.current_bytes = 0
        self.written: list[tuple[Path, list[str]]] = []  # partial file, its tensor names
        self.total_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.current and self.current_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.current[name] = tensor
        self.current_bytes += nbytes
        self.total_bytes += nbytes

    def _flush(self) -> None:
        partial = self.dst / f"model-{len(self.written) + 1:05d}.safetensors.partial"
        save_file(self.current, str(partial), metadata={"format": "pt"})
        self.written.append((partial, list(self.current)))
        self.current, self.current_bytes = {}, 0

    def finish(self) -> None:
        """Name the shards `model-i-of-n` (n is known only now), write the index, and remove the
        shards of an earlier conversion into this directory that the new index does not name."""
        if self.current or not self.written:
            self._flush()
        weight_map: dict[str, str] = {}
        for number, (partial, names) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{len(self.written):05d}.safetensors"
            partial.replace(self.dst / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dst / INDEX_FILE).write_text(json.dumps(index, indent=2))
        current = set(weight_map.values())
        for path in self.dst.iterdir():
            if SHARD_NAME.match(path.name) and path.name not in current:
                path.unlink()

    def discard(self) -> None:
        """Remove the partial shards of a conversion that failed."""
        for partial, _ in self.written:
            partial.unlink(missing_ok=True)


def convert_checkpoint(src: str | Path, dst: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    """Convert the pickle weights in `src` into safetensors shards in `dst` (which may be `src`),
    copy the config and tokenizer files, and check that `dst` can be served."""
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    pickles = _pickle_files(src)  # before anything is written: a bad source leaves no output behind
    if dst.exists() and not dst.is_dir():
        raise CheckpointError(f"{dst} exists and is not a directory")
    created = not dst.exists()
    dst.mkdir(parents=True, exist_ok=True)
    for stale in dst.glob("model-*.safetensors.partial"):  # left by a conversion that was killed
        stale.unlink()
    writer = _ShardWriter(dst, max_shard_bytes)
    try:
        for file in pickles:
            # safetensors refuses shared storage (tied weights): store an independent copy.
            seen_storages: set[int] = set()
            for name, tensor in _load_weights(file).items():
                storage = tensor.untyped_storage().data_ptr()
                tensor = tensor.detach().clone().contiguous() if storage in seen_storages else tensor.contiguous()
                seen_storages.add(storage)
                writer.add(name, tensor)
        writer.finish()
    except BaseException:
        writer.discard()
        if created and not any(dst.iterdir()):
            dst.rmdir()
        raise
    for name in COPIED_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
    try:
        verify_checkpoint(dst)
    except NeoServeError as exc:
        raise CheckpointError(f"the weights are converted into {dst}, but it cannot be served: {exc}") from None
    return dst
