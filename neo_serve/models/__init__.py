"""Model families: own PyTorch modules with Hugging Face parameter names."""

from __future__ import annotations

from torch import nn

from neo_serve.config import GPTNeoConfig, GPTNeoXConfig, ModelConfig
from neo_serve.models.attention import AttentionBackend
from neo_serve.models.stages import StageSpec, partition_layers

__all__ = ["build_stage_model", "partition_layers", "StageSpec"]


def build_stage_model(config: ModelConfig, stage: StageSpec, backend: AttentionBackend) -> nn.Module:
    """The module for one pipeline stage (parameters wherever the caller's device context puts them)."""
    from neo_serve.models.gpt_neo import GPTNeoForCausalLM
    from neo_serve.models.gpt_neox import GPTNeoXForCausalLM

    if isinstance(config, GPTNeoXConfig):
        return GPTNeoXForCausalLM(config, stage, backend)
    if isinstance(config, GPTNeoConfig):
        return GPTNeoForCausalLM(config, stage, backend)
    raise TypeError(f"no model for config {type(config).__name__}")
