"""Cutting a model into pipeline stages of contiguous layers, balanced by parameter bytes."""

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


def first_stage_extra_params(config: ModelConfig) -> int:
    """Embeddings (token, and learned positions for GPT-Neo)."""
    extra = config.vocab_size * config.hidden_size
    if isinstance(config, GPTNeoConfig):
        extra += config.max_position_embeddings * config.hidden_size
    return extra


def last_stage_extra_params(config: ModelConfig) -> int:
    """Final norm and the output head (a tied head is still a separate copy on the last stage)."""
    return config.vocab_size * config.hidden_size + 2 * config.hidden_size


def partition_layers(config: ModelConfig, num_stages: int) -> list[StageSpec]:
    """Contiguous layer ranges minimising the largest stage's parameter count."""
    num_layers = config.num_layers
    if not 1 <= num_stages <= num_layers:
        raise ValueError(f"num_stages must be between 1 and the model's {num_layers} layers, got {num_stages}")
    layer = layer_param_count(config)
    first, last = first_stage_extra_params(config), last_stage_extra_params(config)

    def stage_cost(index: int, start: int, end: int) -> int:
        cost = (end - start) * layer
        if index == 0:
            cost += first
        if index == num_stages - 1:
            cost += last
        return cost

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
