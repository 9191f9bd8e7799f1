"""Capacity planning on the meta device: what each pipeline stage needs before a GPU is rented."""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from accelerate import init_empty_weights

from neo_serve.config import ModelConfig
from neo_serve.engine.kv_cache import KVArena
from neo_serve.loader import DTYPES
from neo_serve.models import build_stage_model, partition_layers
from neo_serve.models.attention import SdpaBackend

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "ki": 2**10, "kib": 2**10, "mi": 2**20, "mib": 2**20,
          "gi": 2**30, "gib": 2**30, "ti": 2**40, "tib": 2**40}


_SIZE = re.compile(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*")  # a number, then its unit


def parse_bytes(text: str | int) -> int:
    """'24GiB', '80G', '512Mi', 1024 -> bytes."""
    if isinstance(text, int):
        return text
    match = _SIZE.fullmatch(str(text))
    if not match or match.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot read a memory size from {text!r} (use e.g. 24GiB, 80GB, 512MiB)")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def parse_gpu_memory(text: str | int) -> int:
    """One GPU's memory in bytes, from a size with its unit ('24GiB'). A bare number is refused
    rather than read as bytes: `--gpu-memory 24` planned for 24 bytes and said nothing fits."""
    if isinstance(text, str) and (match := _SIZE.fullmatch(text)) and not match.group(2):
        raise ValueError(f"GPU memory {text.strip()!r} has no unit: write e.g. {text.strip()}GiB or {text.strip()}GB")
    total = parse_bytes(text)
    if total <= 0:
        raise ValueError(f"GPU memory must be more than 0, got {text!r} (use e.g. 24GiB, 80GB)")
    return total


@dataclass(frozen=True)
class StagePlan:
    index: int
    layer_start: int
    layer_end: int
    weight_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int  # KV slots that fit beside the weights (0 when the weights do not fit)

    @property
    def fits(self) -> bool:
        return self.kv_tokens > 0


@dataclass(frozen=True)
class PipelinePlan:
    stages: list[StagePlan]
    gpu_memory_bytes: int
    usable_bytes: int  # per GPU, after the utilisation cap and the activation reserve
    context_tokens: int  # the model's context window: the engine needs KV room for one
    dtype: str  # of the weights and the KV cache

    @property
    def weights_fit(self) -> bool:
        return all(stage.fits for stage in self.stages)

    @property
    def kv_tokens(self) -> int:
        """KV capacity of the pipeline: every stage holds every token, so the smallest stage bounds it."""
        return min(stage.kv_tokens for stage in self.stages)

    @property
    def fits(self) -> bool:
        """The engine starts: every stage's weights fit, and beside them KV for one full context
        (it refuses a kv_cache_tokens below max_model_len)."""
        return self.weights_fit and self.kv_tokens >= self.context_tokens


def planned_dtype(config: ModelConfig, dtype: str = "auto") -> str:
    """The dtype a GPU serves the model in: `auto` is the checkpoint's own, as the config names it,
    else float32 (GPT-Neo's configs name none, and its published weights are float32)."""
    if dtype != "auto":
        return dtype
    return config.checkpoint_dtype or "float32"


def _stored_elements(module: torch.nn.Module) -> int:
    """Weight elements a loaded stage holds: tied embedding and head on the same stage are one
    tensor (the loader ties them), counted once."""
    params = dict(module.named_parameters())
    pairs = {frozenset(pair) for pair in module.tied_weights().items() if all(name in params for name in pair)}
    return sum(p.numel() for p in params.values()) - sum(params[min(pair)].numel() for pair in pairs)


def plan_pipeline(config: ModelConfig, *, num_stages: int, gpu_memory: str | int, dtype: str = "auto",
                  memory_utilization: float = 0.90, activation_reserve: str | int = "1GiB") -> PipelinePlan:
    dtype = planned_dtype(config, dtype)
    torch_dtype = DTYPES[dtype]
    element = torch.empty((), dtype=torch_dtype).element_size()
    total = parse_gpu_memory(gpu_memory)
    usable = int(total * memory_utilization) - parse_bytes(activation_reserve)
    stages = []
    for spec in partition_layers(config, num_stages):
        with init_empty_weights():
            module = build_stage_model(config, spec, SdpaBackend())
        weights = _stored_elements(module) * element
        per_token = KVArena.bytes_per_token(spec.num_layers, config.num_heads, config.head_dim, torch_dtype)
        kv_tokens = max(0, (usable - weights) // per_token)
        stages.append(StagePlan(spec.index, spec.layer_start, spec.layer_end, weights, per_token, kv_tokens))
    return PipelinePlan(stages, total, usable, config.context_window, dtype)


def format_plan(plan: PipelinePlan, name: str) -> str:
    gib = 2**30
    lines = [f"{name}: {len(plan.stages)} stage(s) in {plan.dtype}, {plan.gpu_memory_bytes / gib:.1f} GiB per GPU "
             f"({plan.usable_bytes / gib:.1f} GiB usable after the utilisation cap and activation reserve)",
             f"{'stage':>5}  {'layers':>9}  {'weights GiB':>11}  {'KV MiB/token':>12}  {'KV tokens':>10}"]
    for stage in plan.stages:
        lines.append(f"{stage.index:>5}  {stage.layer_start:>4}-{stage.layer_end - 1:<4}  "
                     f"{stage.weight_bytes / gib:>11.2f}  {stage.kv_bytes_per_token / 2**20:>12.3f}  "
                     f"{stage.kv_tokens:>10}")
    if plan.fits:
        lines.append(f"pipeline KV capacity: {plan.kv_tokens} tokens (set kv_cache_tokens <= this)")
    elif plan.weights_fit:
        # Whole KV blocks: 256 tokens with flash-attn, 16 without; 256 suits both.
        shorter = plan.kv_tokens // 256 * 256
        lines.append(f"DOES NOT FIT: room for {plan.kv_tokens} KV tokens, less than one full context of "
                     f"{plan.context_tokens} (kv_cache_tokens must be >= max_model_len); use more stages or "
                     f"bigger GPUs" + (f", or serve a shorter context: max_model_len <= {shorter}" if shorter else ""))
    else:
        lines.append("DOES NOT FIT: a stage's weights exceed its GPU; use more stages or bigger GPUs")
    return "\n".join(lines)
