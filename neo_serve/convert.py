"""`neo-serve convert SRC DST`: pickle `.bin` weights -> sharded safetensors, once, offline.

The server never unpickles: this is the one place `.bin` files are read, and only with
`torch.load(weights_only=True)`, which refuses arbitrary Python objects.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from neo_serve.errors import CheckpointError
from neo_serve.loader import INDEX_FILE

COPIED_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt", "README.md")


def _pickle_files(src: Path) -> list[Path]:
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / name for name in names]
    files = sorted(src.glob("pytorch_model*.bin")) or sorted(src.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{src} has no pytorch_model*.bin files to convert")
    return files


def _load_weights(file: Path) -> dict[str, object]:
    """One pickle file's tensors, memory-mapped where the file's format allows it (torch's zip
    format), so that a 10 GB `.bin` is not read into memory whole."""
    try:
        try:
            return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(file, map_location="cpu", weights_only=True)  # the legacy format
    except Exception as exc:  # torch raises UnpicklingError or RuntimeError for refused content
        raise CheckpointError(f"{file}: refused or unreadable with weights_only=True ({exc})") from None


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
        """Name the shards `model-i-of-n` (n is known only now) and write the index."""
        if self.current or not self.written:
            self._flush()
        weight_map: dict[str, str] = {}
        for number, (partial, names) in enumerate(self.written, start=1):
            name = f"model-{number:05d}-of-{len(self.written):05d}.safetensors"
            partial.replace(self.dst / name)
            weight_map.update(dict.fromkeys(names, name))
        index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
        (self.dst / INDEX_FILE).write_text(json.dumps(index, indent=2))


def convert_checkpoint(src: str | Path, dst: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    dst.mkdir(parents=True, exist_ok=True)
    writer = _ShardWriter(dst, max_shard_bytes)
    seen_storages: set[int] = set()
    for file in _pickle_files(src):
        state = _load_weights(file)
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            # safetensors refuses shared storage (tied weights): store an independent copy.
            storage = tensor.untyped_storage().data_ptr()
            tensor = tensor.detach().clone().contiguous() if storage in seen_storages else tensor.contiguous()
            seen_storages.add(storage)
            writer.add(name, tensor)
        del state
    writer.finish()
    for name in COPIED_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
    return dst
