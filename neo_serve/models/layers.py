"""Building blocks shared by the model files: activations, embeddings and rotary embeddings."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn


def _quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    # gelu_new / gelu_fast are both 0.5x(1 + tanh(sqrt(2/pi)(x + 0.044715x^3))); torch fuses it.
    return F.gelu(x, approximate="tanh")


# The `hidden_act` names transformers accepts for these models (its ACT2FN), as it computes them.
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu": F.gelu,
    "gelu_python": F.gelu,  # the same exact (erf) gelu, written out in Python
    "gelu_new": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "gelu_accurate": _gelu_tanh,
    "gelu_pytorch_tanh": _gelu_tanh,
    "relu": F.relu,
    "relu6": F.relu6,
    "silu": F.silu,
    "swish": F.silu,
    "tanh": torch.tanh,
    "quick_gelu": _quick_gelu,
}


class Embedding(nn.Embedding):
    """`nn.Embedding` that leaves a weight on the meta device uninitialised.

    Models are built on the meta device and filled from the checkpoint, so initial values are
    never used; but torch's `normal_` on a meta tensor runs a Python decomposition whose first
    call imports `torch._dynamo`: 2-3 s of CPU in every stage and pipeline process, the most
    expensive step of loading a small stage (Linear's and LayerNorm's initialisers have native
    meta kernels)."""

    def reset_parameters(self) -> None:
        if self.weight.is_meta:
            return
        super().reset_parameters()


class RotaryEmbedding(nn.Module):
    """GPT-NeoX rotary embedding over the first `rotary_dim` dims of each head.

    NOTE: NeoX rotates halves (rotate_half), not interleaved pairs, and only the first
    `rotary_pct * head_dim` dims; the rest of each head passes through unchanged.
    """

    def __init__(self, rotary_dim: int, max_positions: int, base: float, position_scale: float = 1.0) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
        # Linear RoPE scaling divides the frequencies (transformers' "linear" rope_type).
        freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq / position_scale)
        angles = torch.cat((freqs, freqs), dim=-1)  # [positions, rotary_dim]
        # Computed in float32 and kept there: the tables are tiny and bf16 angles lose positions.
        self.register_buffer("cos_table", angles.cos(), persistent=False)
        self.register_buffer("sin_table", angles.sin(), persistent=False)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q, k: [tokens, heads, head_dim]; positions: [tokens]."""
        cos = self.cos_table[positions].unsqueeze(1)  # [tokens, 1, rotary_dim]
        sin = self.sin_table[positions].unsqueeze(1)
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        dim = self.rotary_dim
        x_rot, x_pass = x[..., :dim], x[..., dim:]
        half = dim // 2
        rotated_half = torch.cat((-x_rot[..., half:], x_rot[..., :half]), dim=-1)
        x_rot = (x_rot.float() * cos + rotated_half.float() * sin).to(x.dtype)
        return torch.cat((x_rot, x_pass), dim=-1) if x_pass.shape[-1] else x_rot


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)
