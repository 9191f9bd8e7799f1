"""What the last stage makes of a step's logits: sampled tokens and logprobs, not the logits.

A step's logits are [rows, vocab]: for a 50k vocabulary, 12.9 MB for 64 float32 rows, and one row
per prompt token when prompt logprobs are asked for (lm-evaluation-harness scores whole prompts).
The last stage samples and scores where it computed them, on its own device, and sends back a
few numbers per row: on a GPU the logits never cross to the host and the host's CPU does no
sampling; under Ray they never go through the object store.

The engine says what to do with a `SamplingPlan` (built when it packs the step, carried by the
`StepInput` to the last stage only); `step_result` does it and gives a `StepResult`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neo_serve.engine.outputs import LogprobDict
from neo_serve.engine.sampler import Sample, SamplingRow, sample, score_rows, select_rows


@dataclass(frozen=True)
class PromptScoring:
    """Prompt logprobs from consecutive logits rows: row `first_row + j` scores `targets[j]`
    (the prompt token after its position), with the `top` most likely tokens."""

    first_row: int
    targets: list[int]
    top: int


@dataclass(frozen=True)
class SamplingPlan:
    """What the last stage does with a step's logits (a step whose rows all take their argmax
    has none: `StepInput.argmax_only`)."""

    sample_rows: list[int]  # the logits row of each sampled row, in the order of `rows`
    rows: list[SamplingRow]
    prompt_scoring: list[PromptScoring]


@dataclass(frozen=True)
class StepResult:
    """A step's output, from the last stage."""

    samples: list[Sample]  # one per plan row (argmax_only: one per logits row, logprob NaN)
    prompt_logprobs: list[list[LogprobDict]]  # one list per PromptScoring, one entry per target
    # Seconds the last stage spent on the step, when a stage actor ran it: how busy the
    # pipeline's stages are, which decides whether prompts are split (serve/engine_loop.py).
    last_stage_seconds: float | None = None


def argmax_result(logits: torch.Tensor) -> StepResult:
    """Each row's most likely token (the first maximal one, as `sample` picks), logits [rows, vocab]."""
    nan = float("nan")
    return StepResult([Sample(token, nan, None) for token in logits.max(dim=-1).indices.tolist()], [])


# Scored prompt positions per log-softmax: bounds the float32 temporaries of a long prompt's step
# (1024 rows of a 50k vocabulary: 206 MB each) whatever the step's token budget.
SCORING_BLOCK_ROWS = 1024


def step_result(logits: torch.Tensor, plan: SamplingPlan) -> StepResult:
    """Sample and score logits [rows, vocab] (the head's dtype, on its device) as `plan` says.
    Both in float32 (widening is exact, so they are the numbers a float32 head output gives),
    on the rows each needs: scored positions in blocks of SCORING_BLOCK_ROWS, sampled rows
    together."""
    prompt_logprobs: list[list[LogprobDict]] = []
    if plan.prompt_scoring:
        rows = [row for scoring in plan.prompt_scoring
                for row in range(scoring.first_row, scoring.first_row + len(scoring.targets))]
        targets = [token for scoring in plan.prompt_scoring for token in scoring.targets]
        counts = [scoring.top for scoring in plan.prompt_scoring for _ in scoring.targets]
        scored: list[LogprobDict] = []
        for start in range(0, len(rows), SCORING_BLOCK_ROWS):
            # Several prompts' positions per block: on a GPU, each call waits for the device.
            block = slice(start, start + SCORING_BLOCK_ROWS)
            logprobs = torch.log_softmax(select_rows(logits, rows[block]).float(), dim=-1)  # [block rows, vocab]
            scored += score_rows(logprobs, targets[block], counts[block])
            del logprobs
        start = 0
        for scoring in plan.prompt_scoring:
            prompt_logprobs.append(scored[start:start + len(scoring.targets)])
            start += len(scoring.targets)
    samples: list[Sample] = []
    if plan.rows:
        samples = sample(select_rows(logits, plan.sample_rows).float(), plan.rows)
    return StepResult(samples, prompt_logprobs)

