"""Runs a step through the stages. In-process: the stages one after another."""

from __future__ import annotations

from typing import Protocol

import torch

from neo_serve.engine.worker import StageWorker, StageWorkerSpec, StepInput


class Executor(Protocol):
    def execute(self, step: StepInput) -> torch.Tensor:
        """The last stage's output for step.logits_indices: logits [rows, vocab] in the model's
        dtype, or int64 token ids [rows] when step.argmax_only (see StepInput)."""


class LocalPipelineExecutor:
    """All stages in this process, run in order (num_stages > 1 checks the stage split)."""

    def __init__(self, specs: list[StageWorkerSpec]) -> None:
        self.workers = [StageWorker(spec) for spec in specs]

    def execute(self, step: StepInput) -> torch.Tensor:
        hidden = None
        for worker in self.workers:
            hidden = worker.execute(step, hidden)
        return hidden.cpu()
