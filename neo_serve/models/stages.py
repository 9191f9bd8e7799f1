"""Cutting a model into pipeline stages of contiguous layers, balanced by the work per token.

Stages run at the pace of the slowest, so the split balances what each stage computes, not
what it stores: every token passes through every layer, the output head runs only for tokens
that are sampled, and the embeddings are a row lookup per token. For the large models that
need stages (GPT-NeoX-20B: 44 layers of 453M parameters, a 310M head) this is the same split
as by parameter bytes; for small ones with a large vocabulary it is not (Pythia-160M: the head
holds 5.5 layers' worth of parameters, and on 2 stages the head's stage gets 5 layers, not 6).
"""

from __future__ import annotations

from dataclasses import dataclass

from neo_serve.config import GPTNeoConfig, GPTNeoXConfig, ModelConfig


@dataclass(frozen=True)
class StageSpec:
    """Stage `index` of `num_stages` holds layers [layer_start, layer_end)."""

    index: int
    num_stages: int
    layer_start: int
    layer_end: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.num_stages:
            raise ValueError(f"stage index {self.index} outside 0..{self.num_stages - 1}")
        if self.layer_start >= self.layer_end:
            raise ValueError(f"stage {self.index} has no layers ({self.layer_start}..{self.layer_end})")

    @property
    def is_first(self) -> bool:
        return self.index == 0

    @property
    def is_last(self) -> bool:
        return self.index == self.num_stages - 1

    @property
    def layer_indices(self) -> range:
        return range(self.layer_start, self.layer_end)

    @property
    def num_layers(self) -> int:
        return self.layer_end - self.layer_start


def layer_param_count(config: ModelConfig) -> int:
    e, i = config.hidden_size, config.intermediate_size
    if isinstance(config, GPTNeoXConfig):
        bias = 4 * e if config.attention_bias else 0
        return 4 * e * e + bias + 2 * e * i + i + e + 4 * e
    if isinstance(config, GPTNeoConfig):
        return 4 * e * e + e + 2 * e * i + i + e + 4 * e
    raise TypeError(type(config).__name__)


def head_param_count(config: ModelConfig) -> int:
    """Final norm and the output head (a tied head is still a separate copy on the last stage)."""
    return config.vocab_size * config.hidden_size + 2 * config.hidden_size


# The share of the tokens through the layers that the output head also computes: it runs on
# generated tokens (and a prompt's last position), so with prompts as long as their
# completions, on half of them. Measured on CPU with Pythia-160M's shapes (one thread): a
# 32-row decode step's head costs 2.9 layers and a prompt token costs a layer 0.45x what a
# decode token does, so over the benchmark's requests the head costs 1.8 layers, a third of
# what its parameters suggest. On a GPU, where decode steps read every weight and prompts
# batch well, it weighs more. A half gives Pythia-160M 7 + 5 layers on 2 stages (a third too)
# and GPT-NeoX-20B the even splits (22 + 22, 4 x 11).
HEAD_TOKEN_SHARE = 0.5


def partition_layers(config: ModelConfig, num_stages: int) -> list[StageSpec]:
    """Contiguous layer ranges minimising the largest stage's work per token: its layers'
    parameters, plus on the last stage the head's times HEAD_TOKEN_SHARE (multiply-adds per token
    through the stage)."""
    num_layers = config.num_layers
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be between 1 and the model's {num_layers} layers, got {num_stages}")
    layer = layer_param_count(config)
    head = HEAD_TOKEN_SHARE * head_param_count(config)

    def stage_cost(index: int, start: int, end: int) -> float:
        return (end - start) * layer + (head if index == num_stages - 1 else 0.0)

    # best[s][n]: the smallest max-cost splitting the first n layers into s stages, and its cut.
    inf = float("inf")
    best = [[(inf, -1)] * (num_layers + 1) for _ in range(num_stages + 1)]
    best[0][0] = (0, -1)
    for s in range(1, num_stages + 1):
        for n in range(s, num_layers + 1):
            for cut in range(s - 1, n):
                prev = best[s - 1][cut][0]
                if prev == inf:
                    continue
                cost = max(prev, stage_cost(s - 1, cut, n))
                if cost < best[s][n][0]:
                    best[s][n] = (cost, cut)
    bounds = [num_layers]
    for s in range(num_stages, 0, -1):
        bounds.append(best[s][bounds[-1]][1])
    bounds.reverse()
    return [StageSpec(i, num_stages, bounds[i], bounds[i + 1]) for i in range(num_stages)]
