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
                "special_tokens_map.json", "vocab.json", "merges.txt", "README.md")


def _pickle_files(src: Path) -> list[Path]:
    index = src / "pytorch_model.bin.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [src / name for name in names]
    files = sorted(src.glob("pytorch_model*.bin")) or sorted(src.glob("*.bin"))
    if not files:
        raise CheckpointError(f"{src} has no pytorch_model*.bin files to convert")
    return files


def convert_checkpoint(src: str | Path, dst: str | Path, *, max_shard_bytes: int = 2 * 1024**3) -> Path:
    src, dst = Path(src), Path(dst)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a directory")
    dst.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    seen_storages: set[int] = set()
    for file in _pickle_files(src):
        try:
            state = torch.load(file, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError or RuntimeError for refused content
            raise CheckpointError(f"{file}: refused or unreadable with weights_only=True ({exc})") from None
        for name, tensor in state.items():
            if not isinstance(tensor, torch.Tensor):
                continue
            # safetensors refuses shared storage (tied weights): store an independent copy.
            storage = tensor.untyped_storage().data_ptr()
            tensor = tensor.detach().clone().contiguous() if storage in seen_storages else tensor.contiguous()
            seen_storages.add(storage)
            nbytes = tensor.numel() * tensor.element_size()
            if sizes[-1] and sizes[-1] + nbytes > max_shard_bytes:
                shards.append({})
                sizes.append(0)
            shards[-1][name] = tensor
            sizes[-1] += nbytes
    weight_map: dict[str, str] = {}
    for number, shard in enumerate(shards, start=1):
        name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(dst / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    (dst / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map},
                                             indent=2))
    for name in COPIED_FILES:
        if (src / name).is_file() and src.resolve() != dst.resolve():
            shutil.copy2(src / name, dst / name)
    return dst
