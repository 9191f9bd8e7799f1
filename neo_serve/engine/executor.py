"""Runs a step through the stages. In-process: the stages one after another."""

from __future__ import annotations

import dataclasses
from typing import Protocol

import torch

from neo_serve.engine.step_result import StepResult
from neo_serve.engine.worker import StageWorker, StageWorkerSpec, StepInput


class Executor(Protocol):
    def execute(self, step: StepInput) -> StepResult:
        """The last stage's result for step.logits_indices: sampled tokens and logprobs (see
        step_result.py)."""


def spread_over_gpus(specs: list[StageWorkerSpec], device_count: int) -> list[StageWorkerSpec]:
    """Stages asked for on "cuda" (no index) laid over this process's `device_count` visible GPUs
    in order: stage k on cuda:k, or with more stages than GPUs neighbouring stages on the same
    GPU (cuda:k * count // stages), so that an offline pipeline uses the GPUs the machine has. An
    indexed device ("cuda:1") or a CPU is kept. (Stage actors each see only their own GPU.)"""
    gpus = min(device_count, len(specs))
    if gpus < 2:
        return specs
    return [dataclasses.replace(spec, device=f"cuda:{index * gpus // len(specs)}") if spec.device == "cuda"
            else spec for index, spec in enumerate(specs)]


class LocalPipelineExecutor:
    """All stages in this process, run in order (num_stages > 1 checks the stage split, or on a
    machine with several GPUs spreads the model over them)."""

    def __init__(self, specs: list[StageWorkerSpec]) -> None:
        device_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        self.workers = [StageWorker(spec) for spec in spread_over_gpus(specs, device_count)]

    def execute(self, step: StepInput) -> StepResult:
        hidden = None
        for worker in self.workers:
            hidden = worker.execute(step, hidden)
        return hidden
