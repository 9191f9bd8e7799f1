"""Application arguments: what `build_app(args)` accepts, validated at build time.

The same pydantic models read a Python dict, the `args:` block of a Serve config YAML, the
`serve run neo_serve.app:build_app key=value` command line and `neo-serve up`. Every field has
a description (they are the reference documentation of the args) and errors name the field.
"""

from __future__ import annotations

import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from neo_serve.engine.config import EngineConfig

# The bundled demo checkpoint (trained by scripts/train_demo_model.py), served when no checkpoint is named.
DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo_model"
DEMO_MODEL_NAME = "neo-demo"
DEFAULT_APP_NAME = "neo-serve"
# How often a stopping pipeline or playground replica checks whether its requests are done. Serve
# sleeps this long (its default: 2 s) before the first check even when none is running, and it
# stops an app's deployments one after another: Ctrl-C on `neo-serve up` took 12 s, idle.
SHUTDOWN_POLL_S = 0.5


class AppConfigError(ValueError):
    """`build_app` args are invalid; the message names the offending field."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_RAY_BUILTIN_RESOURCES = ("CPU", "GPU", "memory", "object_store_memory")


def _custom_resources(value: dict[str, float]) -> dict[str, float]:
    for name, amount in value.items():
        if not name or name in _RAY_BUILTIN_RESOURCES:
            raise ValueError(f"{name!r} is not a custom resource name (CPUs and GPUs have fields of their own)")
        if not 0 < amount < float("inf") or (amount > 1 and amount != int(amount)):
            # Ray's rule: a fraction of one unit, or whole units.
            raise ValueError(f"{name}: the amount must be a fraction in (0, 1] or a whole number, got {amount}")
    return value


# Custom Ray resources a replica needs, e.g. {"neo-serve-ingress": 1}: it is then placed only on
# nodes started with that resource (`ray start --resources`); the manifests give it to the head.
CustomResources = Annotated[dict[str, float], AfterValidator(_custom_resources)]


def ingress_actor_options(num_cpus: float, resources: dict[str, float]) -> dict[str, Any]:
    """`ray_actor_options` of a deployment placed without a placement group."""
    return {"num_cpus": num_cpus, **({"resources": dict(resources)} if resources else {})}


SERVE_LOOK_BACK_PERIOD_S = 30.0  # Serve's default look_back_period_s


class AutoscalingArgs(_Strict):
    """Serve autoscaling bounds of a deployment (passed through as its `autoscaling_config`)."""

    min_replicas: int = Field(1, ge=0, description="Fewest replicas (whole pipelines for a model).")
    max_replicas: int = Field(..., ge=1, description="Most replicas.")
    initial_replicas: int | None = Field(None, ge=0, description="Replicas at deploy time (default: min_replicas).")
    target_ongoing_requests: float = Field(
        16.0, gt=0, description="Ongoing requests per replica the autoscaler aims for. A pipeline batches "
                                "many sequences, so this is much higher than Serve's default of 2.")
    upscale_delay_s: float | None = Field(None, ge=0, description="Seconds of sustained load before scaling up.")
    downscale_delay_s: float | None = Field(None, ge=0, description="Seconds of low load before scaling down.")
    look_back_period_s: float | None = Field(None, gt=0, description="Seconds of ongoing-request counts the "
                                             "autoscaler averages (Serve's default 30).")
    # Serve 2.60 decides on what the callers' handles (for a pipeline: the routers') report, and they
    # report every metrics_interval_s, so a decision comes up to that long after the delays above
    # allow it. Serve marks the field deprecated in favour of environment variables it does not read
    # yet (RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S); it is still the one that counts.
    metrics_interval_s: float | None = Field(
        None, gt=0, description="Seconds between the ongoing-request reports Serve's autoscaler decides on "
                                "(Serve's default 10): a scale-up or -down comes up to this long after the "
                                "delays allow it. Must be below look_back_period_s.")

    @model_validator(mode="after")
    def _bounds(self) -> "AutoscalingArgs":
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        if self.initial_replicas is not None and not self.min_replicas <= self.initial_replicas <= self.max_replicas:
            raise ValueError("initial_replicas must lie between min_replicas and max_replicas")
        if self.metrics_interval_s is not None:
            look_back, whose = ((self.look_back_period_s, "") if self.look_back_period_s is not None
                                else (SERVE_LOOK_BACK_PERIOD_S, ", Serve's default"))
            if self.metrics_interval_s >= look_back:  # Serve only warns, then averages a single report
                raise ValueError(f"metrics_interval_s ({self.metrics_interval_s:g}) must be below "
                                 f"look_back_period_s ({look_back:g}{whose})")
        return self

    def to_serve(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class _Scaling(_Strict):
    num_replicas: int | None = Field(None, ge=1, description="Fixed replica count (exclusive with autoscaling).")
    autoscaling: AutoscalingArgs | None = Field(None, description="Autoscaling bounds (exclusive with num_replicas).")

    # Declared again, with its own description, by each deployment's args.
    max_ongoing_requests: int = Field(1024, ge=1)

    @model_validator(mode="after")
    def _one_scaling_mode(self) -> "_Scaling":
        if self.num_replicas is not None and self.autoscaling is not None:
            raise ValueError("set either num_replicas or autoscaling, not both")
        if self.autoscaling is not None and self.autoscaling.target_ongoing_requests > self.max_ongoing_requests:
            # A replica never holds more than max_ongoing_requests, so Serve would never see the
            # target reached and never add a replica, however long the queue grows.
            raise ValueError(f"autoscaling.target_ongoing_requests ({self.autoscaling.target_ongoing_requests:g}) "
                             f"is above max_ongoing_requests ({self.max_ongoing_requests}): a replica never "
                             f"holds more, so the deployment would never scale up")
        return self

    def max_replicas(self) -> int:
        """The most replicas this deployment can have."""
        return self.autoscaling.max_replicas if self.autoscaling is not None else self.num_replicas or 1

    def starting_replicas(self) -> int:
        """The replicas Serve starts this deployment with (autoscaling: initial, else min)."""
        if self.autoscaling is None:
            return self.num_replicas or 1
        initial = self.autoscaling.initial_replicas
        return initial if initial is not None else self.autoscaling.min_replicas

    def scaling_options(self) -> dict[str, Any]:
        """The Serve deployment options for replica count."""
        if self.autoscaling is not None:
            return {"num_replicas": None, "autoscaling_config": self.autoscaling.to_serve()}
        return {"num_replicas": self.num_replicas or 1}


@dataclass(frozen=True)
class RouteLimits:
    """What the router enforces for one model before it calls the model's pipelines."""

    request_timeout_s: float | None = None  # the model's default deadline; None: none
    max_prompts_per_request: int | None = None  # None: no limit
    max_model_len: int | None = None  # the context window; None: not known to the router


class ModelArgs(_Scaling):
    """One served model: its checkpoint, pipeline shape and engine limits."""

    name: str | None = Field(None, min_length=1, description="Served model name, the `model` of API requests. "
                                                             "Default: the checkpoint directory's name.")
    checkpoint: str | None = Field(None, description="Checkpoint directory in Hugging Face layout (config.json, "
                                                     "*.safetensors, tokenizer). Default: the bundled demo model.")
    num_stages: int = Field(1, ge=1, description="Pipeline stages per replica, one accelerator (bundle) each. "
                                                 "1 runs the model inside the replica's process.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="Weight and KV dtype; "
                                                                     "auto keeps the checkpoint's, except that on a CPU "
                                                                     "float16 (and bfloat16 without oneDNN bfloat16 "
                                                                     "kernels) runs in float32.")
    kv_cache_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="KV cache dtype; auto: the weights' on GPU; on CPU float32, or the weights' "
                           "half-precision dtype where a probe at load finds its attention kernels clearly faster.")
    use_gpu: bool = Field(False, description="Give every stage one GPU (bundles {'CPU': cpus_per_stage, 'GPU': 1}).")
    cpus_per_stage: float = Field(1.0, gt=0, description="CPUs reserved per stage bundle; on a CPU also the "
                                                         "stage's torch threads (at least one).")
    kv_cache_tokens: int = Field(32768, ge=1, description="KV cache slots per stage (tokens of all running "
                                                          "sequences together).")
    max_num_seqs: int = Field(256, ge=1, description="Most sequences running at once per pipeline.")
    max_num_batched_tokens: int = Field(1024, ge=1, description="Most tokens per step (decodes + prefill chunks).")
    max_model_len: int | None = Field(None, ge=1, description="Context window; default: the model's "
                                                               "max_position_embeddings (times a linear "
                                                               "RoPE scaling factor).")
    attention_backend: Literal["auto", "sdpa", "reference", "flash"] = Field(
        "auto", description="Attention kernels (auto: on GPUs each stage takes flash-attn when installed and "
                            "its GPU runs it, for float16/bfloat16 models with the cache in the model's dtype; "
                            "else sdpa).")
    max_ongoing_requests: int = Field(
        1024, ge=1, description="Requests one replica accepts at once; more wait in the caller's queue. "
                                "The engine itself queues sequences beyond max_num_seqs.")
    max_queued_requests: int = Field(
        1024, ge=-1, description="Requests that may wait for a replica (all replicas at max_ongoing_requests) "
                                 "before new ones are refused at once with 429 and Retry-After; -1: no limit. "
                                 "Also the most prompts one request may hold (each is a call that waits here "
                                 "until a replica takes it).")
    seed: int | None = Field(
        None, ge=-(2**63), lt=2**63, description="Seed of unseeded requests' random draws in every replica. None: each "
        "replica draws its own when it starts, so that fresh replicas do not sample alike (a request's own "
        "`seed` reproduces whatever this is).")
    step_timeout_s: float | None = Field(
        None, gt=0, description="A micro-batch taking longer means a stage hangs: the pipeline restarts its "
        "stages and recomputes its sequences. None: no deadline (first steps on a GPU may compile kernels).")
    recovery_timeout_s: float = Field(
        300.0, gt=0, description="Deadline for restarting a dead stage (reloading its weights); past it every "
        "request of the pipeline ends with an error and Serve replaces the replica.")
    request_timeout_s: float | None = Field(
        None, gt=0, description="Deadline of every request to this model, from its arrival at the router: past "
        "it the request ends with a 408 `request_timeout` error and its sequences are stopped (a request's own "
        "`timeout` may shorten it). None: no deadline.")
    stream_interval_s: float = Field(
        0.02, ge=0, description="After its first token, a stream sends at most one chunk per interval (the "
        "tokens of several steps together): each chunk costs the replica, router and proxy CPU time. A "
        "finished request's last chunk goes out at once.")
    max_stream_chunks_per_s: float | Literal["auto"] | None = Field(
        "auto", description="Chunks per second a replica aims to send over all its streams: with many "
        "streams each one's interval grows to streams / this, so serving overhead stays bounded as load "
        "grows. auto: 64 on CPU, where the router, proxy and replica share cores with the model and each "
        "chunk's wake-ups preempt its threads (64 streams: a chunk per second per stream, a few tokens each), "
        "256 with GPUs (64 streams: a chunk per 0.25 s). None: only stream_interval_s.")
    health_check_period_s: float = Field(10.0, gt=0, description="How often Serve checks a replica (a dead "
                                                                 "stage fails the check and the replica is replaced).")
    graceful_shutdown_timeout_s: float = Field(
        300.0, ge=0, description="When autoscaling removes a replica (or a redeploy replaces it), how long its "
        "running requests may still finish before it is stopped; Serve's own default, 20 s, would cut a long "
        "generation of a large model short.")

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_size(cls, value: int) -> int:
        if value == 0:  # Serve's own rule, checked here to name the field at build time
            raise ValueError("must be -1 (no limit) or at least 1 (0 would refuse every request)")
        return value

    @model_validator(mode="after")
    def _flash_needs_gpus(self) -> "ModelArgs":
        # Checked here so a CPU deployment fails at build time, not when each stage loads.
        if self.attention_backend == "flash" and not self.use_gpu:
            raise ValueError("attention_backend 'flash' runs flash-attn on CUDA GPUs only: set use_gpu: true, "
                             "or attention_backend 'auto' or 'sdpa' on CPUs")
        return self

    @field_validator("max_stream_chunks_per_s")
    @classmethod
    def _positive_budget(cls, value: float | str | None) -> float | str | None:
        if isinstance(value, (int, float)) and value <= 0:
            raise ValueError(f"must be > 0, 'auto' or null (got {value})")
        return value

    def stream_chunk_budget(self) -> float | None:
        """Chunks per second over all of a replica's streams (`max_stream_chunks_per_s`, auto resolved)."""
        if self.max_stream_chunks_per_s == "auto":
            # Measured on 2 vCPUs, Pythia-160M, 64 streams: 64 instead of 256 cut the router's
            # and proxy's CPU about 3x and served tok/s rose ~12% (docs/benchmarks.md).
            return 256.0 if self.use_gpu else 64.0
        return self.max_stream_chunks_per_s

    @property
    def checkpoint_path(self) -> str:
        return str(Path(self.checkpoint).expanduser()) if self.checkpoint else str(DEMO_CHECKPOINT)

    @property
    def served_name(self) -> str:
        if self.name:
            return self.name
        if self.checkpoint is None:
            return DEMO_MODEL_NAME
        return Path(self.checkpoint_path).resolve().name or DEMO_MODEL_NAME

    def engine_config(self) -> EngineConfig:
        # The device is explicit: a multi-stage replica has no GPU itself, so "auto" would
        # resolve to cpu there while its stages run on GPUs.
        return EngineConfig(model=self.checkpoint_path, dtype=self.dtype, num_stages=self.num_stages,
                            device="cuda" if self.use_gpu else "cpu", kv_cache_tokens=self.kv_cache_tokens,
                            max_num_seqs=self.max_num_seqs, max_num_batched_tokens=self.max_num_batched_tokens,
                            max_model_len=self.max_model_len, attention_backend=self.attention_backend,
                            kv_cache_dtype=self.kv_cache_dtype,
                            seed=secrets.randbits(63) if self.seed is None else self.seed)

    def route_limits(self, max_model_len: int | None = None) -> RouteLimits:
        """The router's limits for this model. Each prompt of a request is one call to the
        pipelines, sent together; Serve counts each call as queued until a replica takes it and
        refuses calls past max_queued_requests, so a request with more prompts than that could
        never be accepted whole."""
        max_prompts = None if self.max_queued_requests < 0 else self.max_queued_requests
        return RouteLimits(request_timeout_s=self.request_timeout_s, max_prompts_per_request=max_prompts,
                           max_model_len=max_model_len)

    def stage_threads(self) -> int | None:
        """Torch threads of each CPU stage: its CPUs (at least one). None on GPUs: torch's default."""
        return None if self.use_gpu else max(1, int(self.cpus_per_stage))

    def stage_resources(self) -> dict[str, float]:
        """What one stage worker reserves inside its bundle."""
        return {"num_cpus": self.cpus_per_stage, "num_gpus": 1 if self.use_gpu else 0}

    def placement_bundles(self) -> list[dict[str, float]]:
        """One bundle per stage. With several stages, bundle 0 also holds the replica (the
        scheduler: one more CPU, no GPU); with one stage the replica *is* the stage."""
        bundle = {"CPU": self.cpus_per_stage, **({"GPU": 1.0} if self.use_gpu else {})}
        bundles = [dict(bundle) for _ in range(self.num_stages)]
        if self.num_stages > 1:
            bundles[0]["CPU"] += 1
        return bundles

    def replica_actor_options(self) -> dict[str, Any]:
        if self.num_stages == 1:
            return {"num_cpus": self.cpus_per_stage, "num_gpus": 1 if self.use_gpu else 0}
        return {"num_cpus": 1, "num_gpus": 0}


class RouterArgs(_Scaling):
    """The ingress deployment (FastAPI, stateless)."""

    num_cpus: float = Field(1.0, ge=0, description="CPUs per router replica.")
    resources: CustomResources = Field(default_factory=dict, description="Custom Ray resources per router "
                                       "replica, e.g. {'neo-serve-ingress': 1} to keep routers on the nodes "
                                       "started with that resource (the Kubernetes manifests' head), off GPU nodes.")
    max_ongoing_requests: int = Field(1024, ge=1, description="Requests one router replica handles at once.")
    health_timeout_s: float = Field(2.0, gt=0, description="How long /health waits for each model's pipeline.")
    api_keys_env: str | None = Field("NEO_SERVE_API_KEYS", description="Environment variable (in the router's "
                                     "process) with comma-separated API keys; unset or empty: no keys from it.")
    api_keys_file: str | None = Field(None, description="File with one API key per line. With any key configured, "
                                      "every route but /health needs `Authorization: Bearer <key>`.")
    max_body_bytes: int = Field(8 * 2**20, ge=1024, description="Largest request body accepted (413 above it).")
    log_requests: bool = Field(False, description="Log every request's prompts and outputs (router log). Off by "
                                                  "default: prompts and outputs stay out of the logs.")


class PlaygroundArgs(_Strict):
    """The Gradio playground (`/ui`): one replica holding Gradio's queue and sessions, reached
    through the router, calling the pipelines through Serve handles."""

    enabled: bool = Field(True, description="Serve the playground at /ui (false: no playground deployment).")
    num_cpus: float = Field(0.0, ge=0, description="CPUs reserved for the playground replica. It only relays "
                                                   "between the browser and the pipelines, so 0 by default; set "
                                                   "e.g. 0.5 to keep it on a node with CPU room.")
    resources: CustomResources = Field(default_factory=dict, description="Custom Ray resources of the playground "
                                       "replica (as router.resources).")
    concurrency_limit: int = Field(16, ge=1, description="Generations the playground runs at once, over all "
                                                         "users; further clicks wait in Gradio's queue.")
    max_queue_size: int = Field(64, ge=1, description="Generations waiting in Gradio's queue before the "
                                                      "playground answers 'busy'.")
    replica_wait_s: float = Field(5.0, gt=0, description="How long a run waits for a pipeline replica with "
                                                         "room before reporting the model not loaded or busy.")

    @model_validator(mode="before")
    @classmethod
    def _bool_shorthand(cls, data: Any) -> Any:
        # `playground: false` in YAML, `playground=false` on `serve run`'s command line.
        return {"enabled": data} if isinstance(data, (bool, str)) else data


class AppArgs(_Strict):
    """`build_app` arguments. A flat dict of ModelArgs fields is read as one model."""

    models: list[ModelArgs] = Field(default_factory=lambda: [ModelArgs()], min_length=1,
                                    description="Served models (default: the bundled demo model).")
    router: RouterArgs = Field(default_factory=RouterArgs, description="Router (ingress) deployment settings.")
    playground: PlaygroundArgs = Field(default_factory=PlaygroundArgs, description="The Gradio playground at /ui "
                                                                                  "(`false` disables it).")
    verify_checkpoints: bool = Field(True, description="Open each checkpoint's config and tokenizer at build "
                                                       "time so bad paths and shapes fail before deploying.")

    @model_validator(mode="before")
    @classmethod
    def _flat_single_model(cls, data: Any) -> Any:
        if isinstance(data, dict) and "models" not in data:
            model_keys = set(ModelArgs.model_fields) & set(data)
            if model_keys:
                data = dict(data)
                data["models"] = [{key: data.pop(key) for key in model_keys}]
        return data

    def cpus_reserved(self) -> float:
        """Logical CPUs the app reserves from Ray at its largest: every model's pipelines (their
        stage bundles) at max replicas, the router's replicas and the playground's."""
        pipelines = sum(m.max_replicas() * sum(b["CPU"] for b in m.placement_bundles()) for m in self.models)
        playground = self.playground.num_cpus if self.playground.enabled else 0.0
        return pipelines + self.router.max_replicas() * self.router.num_cpus + playground

    @model_validator(mode="after")
    def _unique_names(self) -> "AppArgs":
        names = [m.served_name for m in self.models]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"served model names must be unique; repeated: {', '.join(duplicates)} "
                             f"(set `name` on each model)")
        return self


def parse_app_args(args: dict[str, Any] | AppArgs | None) -> AppArgs:
    """Validate build args; raise AppConfigError naming each bad field."""
    if isinstance(args, AppArgs):
        return args
    try:
        return AppArgs.model_validate(args or {})
    except ValidationError as exc:
        raise AppConfigError(format_validation_error(exc, prefix="invalid neo-serve app args")) from None


def format_validation_error(exc: ValidationError, *, prefix: str) -> str:
    lines = [f"{prefix}:"]
    for error in exc.errors():
        message = error["msg"].removeprefix("Value error, ")
        shown = "" if error["type"] in ("missing", "value_error") else f" (got {error['input']!r})"
        lines.append(f"  {field_path(error['loc']) or '(root)'}: {message}{shown}")
    return "\n".join(lines)


def field_path(loc: tuple[Any, ...]) -> str:
    """('models', 0, 'num_stages') -> 'models[0].num_stages'."""
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-") or "model"  # Serve's alphabet for names


def deployment_name(model: ModelArgs, models: Sequence[ModelArgs]) -> str:
    """Serve deployment name of a model's pipeline: `Pipeline-<served name>`.

    From the served name alone, not the model's place in `models`: when other models are added,
    removed or reordered, Serve then updates this one's replicas in place (a deployment whose
    name changed is deleted and created anew, every replica at once), and a config's
    `deployments:` override keeps naming it. Names that differ only in characters Serve does not
    allow get a digest of the served name, to stay apart."""
    slug = _slug(model.served_name)
    if sum(_slug(other.served_name) == slug for other in models) > 1:
        slug += "-" + hashlib.sha256(model.served_name.encode()).hexdigest()[:8]
    return f"Pipeline-{slug}"
