"""A checkpoint directory -> the modules of one pipeline stage.

Only safetensors are loaded (pickle `.bin` weights are refused: `neo-serve convert` turns them
into safetensors). The stage is built on the meta device first and only its own tensors are
read, so one stage of GPT-NeoX-20B never allocates the whole model.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import SafetensorError, safe_open
from torch import nn

from neo_serve.config import ModelConfig, load_model_config
from neo_serve.engine.config import DTYPE_NAMES
from neo_serve.errors import CheckpointError
from neo_serve.models import build_stage_model
from neo_serve.models.attention import AttentionBackend, SdpaBackend
from neo_serve.models.packed_linear import cpu_has_bfloat16_kernels
from neo_serve.models.stages import StageSpec
from neo_serve.tokenizer import Tokenizer

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the names engine configs accept
# Buffers old checkpoints carry that the model recomputes (rotary tables, causal masks).
LEGACY_TENSOR = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attention\.bias|attention\.masked_bias)$")
# Other names a tensor is saved under, per architecture: transformers 5 calls GPT-NeoX's output
# head `lm_head` in memory (it renames `embed_out` on load), so a checkpoint written from its
# state_dict (accelerate's save_model, safetensors.save_file) holds `lm_head.weight`.
TENSOR_ALIASES: dict[str, dict[str, str]] = {"GPTNeoXForCausalLM": {"embed_out.weight": "lm_head.weight"}}


@dataclass(frozen=True)
class CheckpointFiles:
    """Which safetensors file holds each tensor."""

    directory: Path
    tensor_files: dict[str, Path]
    dtype: torch.dtype  # the dtype of the stored floating-point tensors

    @classmethod
    def open(cls, directory: str | Path) -> "CheckpointFiles":
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        tensor_files = _index_tensors(directory)
        if not tensor_files:
            raise CheckpointError(f"{directory}: its safetensors weights hold no tensors (an empty index "
                                  f"weight_map or an empty file)")
        dtype = _stored_dtype(next(iter(tensor_files.items())))
        return cls(directory, tensor_files, dtype)


def _index_tensors(directory: Path) -> dict[str, Path]:
    index = directory / INDEX_FILE
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{index}: not a safetensors index with a weight_map ({exc})") from None
        files = {name: directory / file for name, file in weight_map.items()}
        missing = sorted({str(path.name) for path in files.values() if not path.is_file()})
        if missing:
            raise CheckpointError(f"{index} names shard(s) that are missing from {directory}: {', '.join(missing)}")
        return files
    single = directory / SINGLE_FILE
    # Not an adapter saved beside pickle weights (a LoRA's adapter_model.safetensors).
    candidates = [single] if single.is_file() else sorted(
        path for path in directory.glob("*.safetensors") if not path.name.startswith("adapter_"))
    if len(candidates) == 1:
        return {name: candidates[0] for name in _tensor_names(candidates[0])}
    if len(candidates) > 1:
        raise CheckpointError(f"{directory} has several .safetensors files but no {INDEX_FILE}")
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights ({', '.join(pickles[:3])}); neo-serve loads only "
            f"safetensors. Convert once with: neo-serve convert {directory} <new-dir>")
    raise CheckpointError(f"{directory} has no {SINGLE_FILE} and no {INDEX_FILE}")


def _tensor_names(file: Path) -> list[str]:
    try:
        with safe_open(file, framework="pt") as reader:
            return list(reader.keys())
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from None


def _stored_dtype(first: tuple[str, Path]) -> torch.dtype:
    name, file = first
    try:
        with safe_open(file, framework="pt") as reader:
            for key in reader.keys():
                dtype = reader.get_slice(key).get_dtype()
                if dtype in ("F32", "BF16", "F16"):
                    return {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}[dtype]
    except (SafetensorError, OSError) as exc:
        raise CheckpointError(f"{file}: cannot read safetensors header ({exc})") from None
    return torch.float32


def resolve_dtype(dtype: str | torch.dtype, config: ModelConfig, files: CheckpointFiles | None,
                  device: torch.device | str) -> torch.dtype:
    """`auto` means the checkpoint's own dtype (config's, else the stored tensors'), except on a CPU.

    CPUs have no fast float16 matrix kernels, so there a float16 checkpoint (the demo, Pythia,
    GPT-NeoX-20B) runs in float32: the demo at 64 streams made 730 tok/s in float16 against
    1900-2100 in float32 on a 2-core EPYC. A bfloat16 checkpoint keeps bfloat16 where oneDNN
    has bfloat16 kernels (see models/packed_linear.py), float32 elsewhere.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in ("auto", *DTYPES):
        raise ValueError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
    if dtype != "auto":
        return DTYPES[dtype]
    if config.checkpoint_dtype:
        stored = DTYPES[config.checkpoint_dtype]
    else:
        stored = files.dtype if files is not None else torch.float32
    if torch.device(device).type == "cpu":
        if stored == torch.float16 or (stored == torch.bfloat16 and not cpu_has_bfloat16_kernels()):
            return torch.float32
    return stored


def expected_tensors(config: ModelConfig) -> tuple[set[str], dict[str, str]]:
    """Every tensor a complete checkpoint of this config holds, and which of them may be
    omitted because they are tied to another (built on the meta device: no memory)."""
    with init_empty_weights():
        full = build_stage_model(config, StageSpec(0, 1, 0, config.num_layers), SdpaBackend())
    return set(full.state_dict().keys()), full.tied_weights()


def load_stage(directory: str | Path, config: ModelConfig, stage: StageSpec, *, dtype: torch.dtype,
               device: torch.device | str = "cpu", backend: AttentionBackend | None = None,
               files: CheckpointFiles | None = None) -> nn.Module:
    """Build stage `stage` of the model in `directory` and fill it from the checkpoint."""
    files = files or CheckpointFiles.open(directory)
    _check_tensor_names(files, config)
    with init_empty_weights():
        model = build_stage_model(config, stage, backend or SdpaBackend())
    tied = model.tied_weights()
    stored = _stored_names(files, config)
    param_names = list(model.state_dict().keys())
    params = set(param_names)
    shared: dict[str, str] = {}  # parameter -> the parameter of this stage whose tensor it is
    by_file: dict[Path, list[tuple[str, str]]] = {}
    for param_name in param_names:
        source = param_name
        if source not in stored and param_name in tied:
            source = tied[param_name]
            if source in params:
                # Both ends of a tie on this stage (one stage, or embeddings and head together):
                # one tensor, as transformers keeps it. Loaded twice, each cast to `dtype` made
                # its own copy: 257 MB more for GPT-Neo-2.7B in float16.
                shared[param_name] = source
                continue
        source = stored[source]
        by_file.setdefault(files.tensor_files[source], []).append((param_name, source))
    for file, names in by_file.items():
        try:
            with safe_open(file, framework="pt", device="cpu") as reader:
                for param_name, source in names:
                    value = reader.get_tensor(source)
                    _set_tensor(model, param_name, value, dtype, device, file)
        except SafetensorError as exc:
            raise CheckpointError(f"{file}: cannot read tensors ({exc})") from None
    for param_name, partner in tied.items():
        # Both ends stored, as a converted pickle checkpoint writes a tie (one tensor under two
        # names): equal values are the tie, one tensor too; different ones are untied weights.
        handled = param_name in shared or partner in shared
        if not handled and param_name in params and partner in params and torch.equal(
                model.get_parameter(param_name), model.get_parameter(partner)):
            shared[param_name] = partner
    for param_name, source in shared.items():
        module_name, _, attr = param_name.rpartition(".")
        setattr(model.get_submodule(module_name), attr, model.get_parameter(source))
    model.to(device)  # the non-persistent buffers (rotary tables) were built on the CPU
    return model.eval().requires_grad_(False)


def _stored_names(files: CheckpointFiles, config: ModelConfig) -> dict[str, str]:
    """The model's name of each stored tensor -> its name in the checkpoint (see TENSOR_ALIASES)."""
    names = {name: name for name in files.tensor_files if not LEGACY_TENSOR.search(name)}
    for canonical, alias in TENSOR_ALIASES.get(config.architecture, {}).items():
        if canonical not in names and alias in names:
            names[canonical] = names.pop(alias)
    return names


def _check_tensor_names(files: CheckpointFiles, config: ModelConfig) -> None:
    expected, tied = expected_tensors(config)
    stored = set(_stored_names(files, config))
    missing = sorted(name for name in expected - stored if tied.get(name) not in stored)
    unexpected = sorted(stored - expected)
    problems = []
    if missing:
        problems.append(f"missing tensors: {', '.join(missing[:8])}" + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        problems.append(f"unexpected tensors: {', '.join(unexpected[:8])}" + (" ..." if len(unexpected) > 8 else ""))
    if problems:
        raise CheckpointError(f"{files.directory} does not match its config.json ({config.architecture}): "
                              + "; ".join(problems))


@dataclass(frozen=True)
class CheckpointSummary:
    """What `verify_checkpoint` found."""

    directory: Path
    architecture: str
    num_files: int  # safetensors files
    num_tensors: int


def verify_checkpoint(directory: str | Path) -> CheckpointSummary:
    """Everything a server needs of a checkpoint short of reading its weights: config.json, every
    safetensors file's header against the index, the tensor names against the config, and the
    tokenizer. Raises ConfigError or CheckpointError naming the file. Used after a conversion and
    by the Kubernetes manifests' download init container."""
    directory = Path(directory)
    config = load_model_config(directory)
    files = CheckpointFiles.open(directory)
    by_file: dict[Path, set[str]] = {}
    for name, file in files.tensor_files.items():
        by_file.setdefault(file, set()).add(name)
    for file, names in sorted(by_file.items()):
        absent = names - set(_tensor_names(file))  # reads the header: fails on a truncated file
        if absent:
            raise CheckpointError(f"{file} lacks tensors its index names: {', '.join(sorted(absent)[:5])}")
    _check_tensor_names(files, config)
    try:
        Tokenizer.from_dir(directory)
    except CheckpointError:
        raise
    except Exception as exc:  # the tokenizers library's own parse errors
        raise CheckpointError(f"{directory}: cannot read its tokenizer ({exc})") from None
    return CheckpointSummary(directory, config.architecture, len(by_file), len(files.tensor_files))


def _set_tensor(model: nn.Module, name: str, value: torch.Tensor, dtype: torch.dtype,
                device: torch.device | str, file: Path) -> None:
    module_name, _, attr = name.rpartition(".")
    current = getattr(model.get_submodule(module_name), attr)
    if tuple(current.shape) != tuple(value.shape):
        raise CheckpointError(f"{file}: tensor {name} has shape {tuple(value.shape)}, "
                              f"config.json implies {tuple(current.shape)}")
    if dtype == torch.float16 and value.dtype in (torch.float32, torch.bfloat16) and value.numel():
        # A value past float16's range would become inf, and every logit after it NaN.
        # aminmax, not abs().max(): no temporary copy of each (up to GB-sized) tensor at load.
        lowest, highest = torch.aminmax(value)
        largest = max(-lowest.item(), highest.item())
        if largest > torch.finfo(torch.float16).max:
            raise CheckpointError(f"{file}: tensor {name} holds {largest:.4g}, beyond float16's range "
                                  f"(65504): serve this {str(value.dtype).removeprefix('torch.')} checkpoint "
                                  f"with dtype bfloat16 or float32")
    set_module_tensor_to_device(model, name, device, value=value, dtype=dtype)
