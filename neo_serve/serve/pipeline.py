"""The pipeline deployment: one replica = one complete pipeline (scheduler + its stages).

The replica reserves one placement-group bundle per stage (`ModelArgs.placement_bundles`, PACK),
starts the stages (`stages.py`) and runs the continuous-batching loop over them
(`engine_loop.py`). Serve's autoscaler adds and removes whole pipelines; a sequence's KV cache
never leaves the replica that admitted it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import psutil
from ray import serve
from ray.actor import ActorHandle
from ray.serve.config import BackpressureConfig

from neo_serve.engine.llm_engine import LLMEngine
from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.errors import InvalidRequestError, PipelineFailed
from neo_serve.serve.caller_watch import CallerWatch
from neo_serve.serve.config import SHUTDOWN_POLL_S, ModelArgs
from neo_serve.serve.engine_loop import PipelineCore
from neo_serve.serve.error_logs import log_client_errors_as_one_line
from neo_serve.serve.metrics import PipelineMetrics
from neo_serve.serve.outputs import GenerationChunk
from neo_serve.serve.stages import LocalStepRunner, RayStageRunner, StepRunner, UnloadedExecutor

logger = logging.getLogger("ray.serve")


class PipelineServer:
    """Serve deployment hosting one model as complete pipelines, one per replica.

    The replica reserves one placement-group bundle per stage (see `ModelArgs.placement_bundles`);
    with num_stages > 1 it starts one stage actor per bundle, with num_stages == 1 it runs the
    model itself. Serve routes to a replica only once its constructor returns, i.e. once every
    stage is loaded. Call it through the router, or directly:

        handle.options(stream=True).generate.remote(prompt, SamplingParams(...), request_id)
    """

    async def __init__(self, model: ModelArgs) -> None:  # Serve awaits async constructors
        self.model = model
        log_client_errors_as_one_line()  # e.g. a prompt past the context window: a line, not a traceback
        engine = LLMEngine(model.engine_config(), executor=UnloadedExecutor())  # config, tokenizer, scheduler
        runner: StepRunner
        if model.num_stages == 1:
            runner = await LocalStepRunner.load(engine.stage_specs, num_threads=model.stage_threads())
        else:
            context = serve.get_replica_context()
            resources = model.stage_resources()
            runner = await RayStageRunner.start(
                engine.stage_specs, num_cpus=resources["num_cpus"], num_gpus=resources["num_gpus"],
                name_prefix=stage_actor_prefix(context.app_name, context.deployment, context.replica_id.unique_id),
                num_threads=model.stage_threads())
        engine.executor = runner
        self.core = PipelineCore(engine, runner, metrics=PipelineMetrics(model.served_name, model.num_stages),
                                 step_timeout_s=model.step_timeout_s, recovery_timeout_s=model.recovery_timeout_s,
                                 stream_interval_s=model.stream_interval_s,
                                 max_stream_chunks_per_s=model.stream_chunk_budget())
        self.core.start()
        self.callers = CallerWatch()
        logger.info("neo-serve pipeline for %s ready: %s", model.served_name, runner.stage_info())

    async def generate(self, prompt: str | list[int], params: SamplingParams, request_id: str,
                       caller: ActorHandle | None = None) -> AsyncIterator[GenerationChunk]:
        """Stream `GenerationChunk`s for one prompt (call with `handle.options(stream=True)`). The
        first one, sent on acceptance, names this replica (the playground shows who served a run).
        `caller`: the calling replica's own actor handle; if that actor dies, the stream stops
        (`CallerWatch`), since Ray would let it run to max_tokens."""
        replica = serve.get_replica_context().replica_id.unique_id
        with self.callers.watching(caller):
            async for chunk in self.core.generate(prompt, params, request_id):
                if chunk.prompt_token_ids is not None:
                    chunk.replica = replica
                yield chunk

    async def ready(self) -> dict[str, Any]:
        """Answers only once constructed, i.e. with every stage loaded."""
        return {"model": self.model.served_name, "ready": self.core.failure is None,
                "stages_loaded": len(self.core.runner.stage_info()), "num_stages": self.model.num_stages}

    async def stats(self) -> dict[str, Any]:
        """Debug view: running / waiting sequences, free KV blocks, steps, stages."""
        return {"model": self.model.served_name, **self.core.stats(), "stages": self.core.runner.stage_info(),
                "streams_of_dead_callers": self.callers.num_cancelled,
                "replica": serve.get_replica_context().replica_id.unique_id, "pid": os.getpid(),
                "rss_bytes": psutil.Process().memory_info().rss}

    async def model_info(self) -> dict[str, Any]:
        engine = self.core.engine
        return {"model": self.model.served_name, "max_model_len": engine.max_model_len,
                "vocab_size": engine.model_config.vocab_size, "num_stages": self.model.num_stages,
                "architecture": engine.model_config.architecture}

    async def tokenize(self, text: str) -> dict[str, Any]:
        """`text`'s token ids as the engine encodes a text prompt: {"tokens", "count",
        "max_model_len"}, vLLM's /tokenize answer."""
        tokens = await self.core.encode(text)
        return {"tokens": tokens, "count": len(tokens), "max_model_len": self.core.engine.max_model_len}

    async def detokenize(self, token_ids: list[int]) -> str:
        """The text of `token_ids` (special tokens included), each id checked against the vocabulary."""
        tokenizer = self.core.engine.tokenizer
        vocab = max(tokenizer.vocab_size, self.core.engine.model_config.vocab_size)
        outside = next((token for token in token_ids if not 0 <= token < vocab), None)
        if outside is not None:
            raise InvalidRequestError(f"token id {outside} is outside the vocabulary [0, {vocab})", field="tokens")
        return tokenizer.decode(token_ids, skip_special_tokens=False)

    async def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's special tokens and limits (vLLM's /tokenizer_info fields that apply)."""
        engine = self.core.engine
        config, tokenizer = engine.model_config, engine.tokenizer

        def token(token_id: int | None) -> str | None:
            return tokenizer.id_to_token(token_id) if token_id is not None else None

        return {"model": self.model.served_name, "eos_token": token(config.eos_token_id),
                "eos_token_id": config.eos_token_id, "bos_token": token(config.bos_token_id),
                "bos_token_id": config.bos_token_id, "pad_token": None, "model_max_length": engine.max_model_len,
                "vocab_size": tokenizer.vocab_size, "add_bos_token": False, "add_eos_token": False,
                "tokenizer_sha256": tokenizer.digest}

    async def check_health(self) -> None:
        """Serve's periodic health check: a dead stage makes the replica unhealthy (replaced)."""
        if self.core.failure is not None:
            raise PipelineFailed(f"pipeline failed: {self.core.failure!r}")

    def __del__(self) -> None:
        # Serve calls this on graceful shutdown; stage actors would also die with their owner.
        core = getattr(self, "core", None)
        callers = getattr(self, "callers", None)
        if callers is not None:
            callers.close()
        if core is not None:
            core.close()
            core.runner.close()


PipelineDeployment = serve.deployment(PipelineServer)


def pipeline_deployment(model: ModelArgs, name: str) -> serve.Deployment:
    """The model's pipeline deployment `name` with its placement group, scaling and limits."""
    return PipelineDeployment.options(
        name=name,
        placement_group_bundles=model.placement_bundles(),
        placement_group_strategy="PACK",
        ray_actor_options=model.replica_actor_options(),
        max_ongoing_requests=model.max_ongoing_requests,
        max_queued_requests=model.max_queued_requests,
        # Past the queue: 429 with Retry-After at once (Serve answers for the router's handle call).
        backpressure_config=BackpressureConfig(status_code=429, retry_after_s=1),
        health_check_period_s=model.health_check_period_s,
        graceful_shutdown_timeout_s=model.graceful_shutdown_timeout_s,
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        **model.scaling_options(),
    )


def stage_actor_prefix(app: str, deployment: str, replica: str) -> str:
    """Stage actors are named `<prefix><stage>` (in the replica's namespace) for the dashboard and
    for `ray.get_actor`."""
    return f"neo-serve-stage:{app}:{deployment}:{replica}:"
