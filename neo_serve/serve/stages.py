"""Step runners: how a replica executes one packed (micro-)batch through its stages.

- `LocalStepRunner` (num_stages == 1): the model lives in the replica's process and a step runs
  on one worker thread, so the replica's event loop keeps accepting and streaming requests.
- `RayStageRunner` (num_stages > 1): one `StageActor` per placement-group bundle. A step is a
  chain of actor calls where stage k+1 receives stage k's result *as an ObjectRef*: activations
  move from stage to stage through the object store and never pass through the scheduler; only
  the last stage's result comes back (tokens and logprobs, never logits). Each actor
  runs its calls in submission order, so several micro-batches can be in flight: stage k works
  on micro-batch i while stage k+1 works on i-1.

`submit(step, finish)` hands back an asyncio future of `finish(result)`, where result is the
last stage's `StepResult` (sampled tokens and logprobs: the last stage samples, see
engine/step_result.py). The local runner runs the whole step, sampling included, on its step
thread: every parallel torch op of the replica then starts from that one thread. A second
thread doing parallel ops (as the event loop did when it sampled) gives OpenMP a second thread
team; with more OpenMP threads than cores libgomp stops spinning at barriers and every op of a
step pays a sleep and wake-up (measured on 2 cores: the offline engine at 64 Pythia-160M
streams runs 1.3x slower once another thread has run one parallel op).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from collections.abc import Callable
from typing import Any, Protocol, TypeVar

import ray
import torch
from ray.util.placement_group import get_current_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from neo_serve.engine.executor import LocalPipelineExecutor
from neo_serve.engine.step_result import StepResult
from neo_serve.engine.worker import StageWorker, StageWorkerSpec, StepInput

logger = logging.getLogger("ray.serve")

T = TypeVar("T")


class StepRunner(Protocol):
    depth: int  # micro-batches worth keeping in flight (the number of stages)

    def submit(self, step: StepInput, finish: Callable[[StepResult], T]) -> asyncio.Future[T]:
        """Start a step; the future resolves to `finish(result)`, the last stage's `StepResult`.
        `finish` must not touch state the event loop owns."""

    def execute(self, step: StepInput) -> StepResult:
        """Blocking form (the engine's `Executor` protocol)."""

    def stage_info(self) -> list[dict[str, Any]]: ...

    def close(self) -> None: ...


def set_stage_threads(num_threads: int | None) -> None:
    """Run this thread's torch ops on `num_threads` threads; None leaves torch's default. Called
    on the thread that will compute, before it loads the stage: Ray derives OMP_NUM_THREADS from
    a worker's CPUs only where the environment does not set it already (some container images set
    it to 1), so a stage's CPUs are its threads only if set here."""
    if num_threads is not None:
        torch.set_num_threads(num_threads)


def describe_stage(worker: StageWorker) -> dict[str, Any]:
    """What a loaded stage runs, including what `auto` resolved to (e.g. the CPU KV dtype probe)
    and its torch threads (call it on the thread that runs the stage's steps)."""
    spec, stage = worker.spec, worker.spec.stage
    return {"stage": stage.index, "layers": [stage.layer_start, stage.layer_end],
            "dtype": str(worker.dtype).removeprefix("torch."), "device": spec.device,
            "attention_backend": worker.backend.name,
            "kv_slots": spec.num_kv_slots, "kv_cache_dtype": str(worker.kv.tensor.dtype).removeprefix("torch."),
            "threads": torch.get_num_threads()}


class UnloadedExecutor:
    """The engine's executor until the stages are loaded (the engine builds its scheduler first)."""

    def execute(self, step: StepInput) -> StepResult:
        raise RuntimeError("the pipeline's stages are not loaded yet")


class LocalStepRunner:
    """All stages in this process; steps on a single thread (torch releases the GIL in kernels)."""

    depth = 1

    def __init__(self, executor: LocalPipelineExecutor, pool: ThreadPoolExecutor,
                 infos: list[dict[str, Any]]) -> None:
        self.executor = executor
        self._pool = pool
        self._infos = infos

    @classmethod
    async def load(cls, specs: list[StageWorkerSpec], *, num_threads: int | None = None) -> "LocalStepRunner":
        """Load the stages on the step thread, which runs its torch ops on `num_threads` threads."""
        pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="neo-serve-step",
                                  initializer=set_stage_threads, initargs=(num_threads,))
        loop = asyncio.get_running_loop()
        executor = await loop.run_in_executor(pool, LocalPipelineExecutor, specs)
        infos = await loop.run_in_executor(pool, lambda: [describe_stage(w) for w in executor.workers])
        return cls(executor, pool, infos)

    def submit(self, step: StepInput, finish: Callable[[StepResult], T]) -> asyncio.Future[T]:
        return asyncio.get_running_loop().run_in_executor(self._pool, self._run, step, finish)

    def _run(self, step: StepInput, finish: Callable[[StepResult], T]) -> T:
        return finish(self.executor.execute(step))

    def execute(self, step: StepInput) -> StepResult:
        return self.executor.execute(step)

    def stage_info(self) -> list[dict[str, Any]]:
        return list(self._infos)

    def close(self) -> None:
        self._pool.shutdown(wait=False)


@ray.remote(max_restarts=0, concurrency_groups={"probe": 1})
class StageActor:
    """One pipeline stage in its own placement-group bundle: its layers and their KV cache.

    `ping` runs in its own concurrency group, so it answers while steps run or wait. With a
    concurrency group Ray runs the constructor on another thread than the default group's calls
    (always one same thread), so the stage loads at its first default-group call: torch's
    threads are set, and its OpenMP team is made, on the thread that computes the steps.
    """

    def __init__(self, spec: StageWorkerSpec, num_threads: int | None = None) -> None:
        self._spec, self._num_threads = spec, num_threads
        self._worker: StageWorker | None = None
        self._info: dict[str, Any] = {}

    def _loaded(self) -> StageWorker:
        if self._worker is None:
            set_stage_threads(self._num_threads)
            self._worker = StageWorker(self._spec)
            self._info = describe_stage(self._worker)
        return self._worker

    def info(self) -> dict[str, Any]:
        """Loads the stage (the runner's first call) and describes it."""
        self._loaded()
        return self._info

    @ray.method(concurrency_group="probe")
    def ping(self) -> bool:
        """Whether the process lives, answered at once rather than behind queued steps."""
        return True

    def execute(self, step: StepInput, hidden: torch.Tensor | None) -> torch.Tensor | StepResult:
        # Ray resolved `hidden` from the previous stage's ObjectRef before this call.
        started = time.perf_counter()
        out = self._loaded().execute(step, hidden)  # hidden states [tokens, hidden], or the last stage's result
        if isinstance(out, torch.Tensor):
            return out.cpu()  # the object store holds host memory; the next stage moves it back to its device
        # The result's tokens are on the host: on a GPU the step's kernels have run.
        return dataclasses.replace(out, last_stage_seconds=time.perf_counter() - started)


class RayStageRunner:
    """A chain of stage actors, one per bundle of the replica's placement group."""

    def __init__(self, specs: list[StageWorkerSpec], actors: list[Any], infos: list[dict[str, Any]], *,
                 num_cpus: float, num_gpus: float, name_prefix: str | None, num_threads: int | None = None) -> None:
        self.specs = specs
        self.actors = actors
        self.depth = len(actors)
        self._infos = infos
        self._num_cpus, self._num_gpus, self._name_prefix = num_cpus, num_gpus, name_prefix
        self._num_threads = num_threads
        self.generation = 0  # how many times stages were restarted (part of new actors' names)

    @classmethod
    async def start(cls, specs: list[StageWorkerSpec], *, num_cpus: float, num_gpus: float,
                    name_prefix: str | None = None, num_threads: int | None = None) -> "RayStageRunner":
        """Start one actor per stage in bundle `stage` of this replica's placement group (when it
        runs in one: a Serve replica with `placement_group_bundles`), each running its torch ops
        on `num_threads` threads, and wait until all loaded."""
        runner = cls(specs, [], [], num_cpus=num_cpus, num_gpus=num_gpus, name_prefix=name_prefix,
                     num_threads=num_threads)
        runner.actors = [runner._spawn(index) for index in range(len(specs))]
        runner.depth = len(specs)
        try:
            runner._infos = list(await asyncio.gather(*(cls._wait_loaded(actor) for actor in runner.actors)))
        except BaseException:
            runner.close()
            raise
        return runner

    def _spawn(self, index: int) -> Any:
        options: dict[str, Any] = {"num_cpus": self._num_cpus, "num_gpus": self._num_gpus}
        if self._name_prefix is not None:
            suffix = f"{index}" if self.generation == 0 else f"{index}.{self.generation}"
            options["name"] = f"{self._name_prefix}{suffix}"
        group = get_current_placement_group()
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=index)
        return StageActor.options(**options).remote(self.specs[index], self._num_threads)

    async def restart_stages(self, *, all_stages: bool = False, probe_timeout_s: float = 5.0) -> list[int]:
        """Replace dead stage actors (or every one, e.g. after a hung step) in their own bundles,
        reloading their weights; returns the restarted stage indices. The new stages' KV caches
        are empty: the caller has the engine recompute its sequences."""
        dead = list(range(self.depth)) if all_stages else [
            index for index, alive in enumerate(await asyncio.gather(
                *(self._alive(actor, probe_timeout_s) for actor in self.actors))) if not alive]
        if not dead:
            return []
        self.generation += 1
        for index in dead:
            try:
                ray.kill(self.actors[index])  # frees its bundle's resources if it merely hung
            except Exception:  # already dead
                pass
            self.actors[index] = self._spawn(index)
        infos = await asyncio.gather(*(self._wait_loaded(self.actors[index]) for index in dead))
        for index, info in zip(dead, infos):
            self._infos[index] = info
        logger.warning("neo-serve restarted stage(s) %s (generation %d)", dead, self.generation)
        return dead

    @staticmethod
    async def _alive(actor: Any, timeout_s: float) -> bool:
        # `ping`, not a default-group call: that one would wait behind the steps a live stage still
        # has queued (the micro-batches in flight when another stage died), and a stage busy past
        # the timeout would be taken for dead and reload its weights for nothing.
        try:
            await asyncio.wait_for(actor.ping.remote(), timeout=timeout_s)
            return True
        except (ray.exceptions.RayActorError, asyncio.TimeoutError):
            return False

    @staticmethod
    async def _wait_loaded(actor: Any) -> dict[str, Any]:
        info = await actor.info.remote()
        logger.info("neo-serve stage %d loaded: %s", info["stage"], info)
        return info

    def _chain(self, step: StepInput) -> ray.ObjectRef:
        # The step goes by value in each stage's call, not through `ray.put`: it is a few KB,
        # which Ray inlines in the task itself, while a put object costs the object store a
        # create, a seal and a fetch per stage. With the demo model's millisecond micro-batches
        # that was a fifth of the served 2-stage throughput (paired runs, 64 streams: 959 and
        # 942 tok/s by value, 755 and 718 with `ray.put`). Ray still moves a step above its
        # inline limit (100 KB) through the object store by itself.
        # Only the last stage samples: the others get the step without its sampling plan.
        hidden: ray.ObjectRef | None = None
        without_plan = dataclasses.replace(step, sampling=None) if step.sampling is not None else step
        for index, actor in enumerate(self.actors):
            hidden = actor.execute.remote(step if index == self.depth - 1 else without_plan, hidden)
        return hidden

    def submit(self, step: StepInput, finish: Callable[[StepResult], T]) -> asyncio.Future[T]:
        # The model and the sampling run in the stage actors' processes; `finish` (bookkeeping,
        # no torch work) runs on the event loop once the last stage's result arrives.
        return asyncio.ensure_future(self._finish(self._chain(step), finish))

    @staticmethod
    async def _finish(result: ray.ObjectRef, finish: Callable[[StepResult], T]) -> T:
        return finish(await result)

    def execute(self, step: StepInput) -> StepResult:
        return ray.get(self._chain(step))

    def stage_info(self) -> list[dict[str, Any]]:
        return list(self._infos)

    def close(self) -> None:
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # already gone, or Ray is shutting down
                pass
