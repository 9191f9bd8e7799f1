"""`neo-serve bench serve`: the served path over HTTP, on this machine, in one run.

For each model (the bundled demo and a random Pythia-160M-shaped checkpoint by default) and each
client count N (1, 8, 32, 64), the same fixed-seed workload (prompts of 32-256 token ids, 64-128
new tokens each, `ignore_eos`, greedy) goes through:

- `offline`: the in-process engine (`neo_serve.LLM`'s `LLMEngine`), N requests in flight at once
  (a new one is added as soon as one finishes), no HTTP: the ceiling of the served path;
- `neo-serve S stage(s)[, R replicas]`: the neo-serve application on Ray Serve with S pipeline
  stages (and R pipeline replicas, `--replicas`), driven over loopback HTTP by N concurrent
  streaming clients (`POST /v1/completions`, `stream: true`);
- `baseline`: a plain Ray Serve deployment wrapping transformers `generate` in
  `@serve.batch(max_batch_size=8)` (baseline_app.py), driven by the same N clients (no streaming:
  its time to first token is the time to the whole response).

Each client sends its next request as soon as the previous one is done, until the point's
requests (`--rounds` x N, at least `--min-requests`) are all sent. Measured per point:
generated tokens/s (all generated tokens / wall time from the first request sent to the last
completed), time to first token (TTFT) and inter-token latency (ITL, the gap between a request's
consecutive tokens; a chunk of k tokens counts as k gaps of 1/k of its delay) p50 / p99, and a
check that every request got exactly its `max_tokens` tokens.

Paired (the default): every served point comes right after an offline point of the same N,
measured in this process (with Ray up, no app deployed), and "vs offline" compares the two. This
machine's speed moves by tens of percent within minutes (CPU steal, and drift that steal does not
show), so an offline run minutes earlier is no reference. The points run one N at a time: each
served system (after its offline point), then the baseline, so "vs baseline" too compares points
minutes apart. `--no-paired` measures the offline engine once per model before Ray starts, and
each system at every N in one deployment.

Ray is started once, one Serve application runs at a time on 127.0.0.1 (a free port) and is
deleted before the next (paired: before each offline point); Serve and Ray are shut down at the
end, also on errors and Ctrl-C. transformers is needed here (the baseline) but never by neo_serve.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import os
import platform
import random
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from neo_serve.bench.engine_bench import REPO_REFERENCE, Sampling, _cpu_name, add_sampling_arguments, build_checkpoint
from neo_serve.bench.machine import STEAL_WARNING, StealMeter, format_steal
from neo_serve.serve.ingress import INGRESS_CHOICES, IngressUnavailable, configure_local_ingress, free_port
from neo_serve.serve.local_cluster import (RayProcessesStopped, configure_local_cluster, run_while_ray_runs,
                                           shut_down_serve)
from neo_serve.serve.launcher import threads_per_stage

DEMO_CHECKPOINT = Path(__file__).resolve().parents[1] / "demo_model"
PYTHIA_DIR = Path.home() / ".cache" / "neo-serve" / "bench-pythia-160m"
NEO_APP = "neo-serve-bench"
BASELINE_APP = "hf-baseline-bench"
# Not the neo-serve app's "/": behind HAProxy a deleted app's router stays reachable for its
# draining period, and the baseline deployed right after it got its first requests (405s; see
# also _http_warmup).
BASELINE_ROUTE = "/baseline"
GREEDY = Sampling()


# ---- workload ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class BenchRequest:
    prompt: list[int]
    max_tokens: int


def make_requests(vocab_size: int, count: int, *, seed: int, prompt_len: tuple[int, int],
                  new_tokens: tuple[int, int]) -> list[BenchRequest]:
    """`count` requests with a fixed seed. Lengths come from their own generator, so every model
    (whatever its vocabulary) gets the same prompt lengths and max_tokens."""
    shapes = random.Random(seed)
    lengths = [(shapes.randint(*prompt_len), shapes.randint(*new_tokens)) for _ in range(count)]
    ids = random.Random(seed + 1)
    return [BenchRequest([ids.randrange(1, vocab_size) for _ in range(n)], m) for n, m in lengths]


def requests_per_point(clients: int, args: argparse.Namespace) -> int:
    return max(args.rounds * clients, args.min_requests)


# ---- measurements -----------------------------------------------------------------------------
@dataclass
class RequestRecord:
    """One request as its client saw it. Times are seconds on `time.perf_counter()`."""

    prompt_tokens: int
    max_tokens: int
    sent: float = 0.0
    done: float | None = None
    first_token: float | None = None
    token_times: list[float] = field(default_factory=list)  # arrival of each token (streams only)
    tokens: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.tokens == self.max_tokens

    def raw(self, origin: float) -> dict[str, Any]:
        """JSON-ready, times relative to `origin` (the point's start), in seconds."""
        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - origin, 6)

        return {"prompt_tokens": self.prompt_tokens, "max_tokens": self.max_tokens, "tokens": self.tokens,
                "sent": rel(self.sent), "first_token": rel(self.first_token), "done": rel(self.done),
                "token_times": [round(t - self.sent, 6) for t in self.token_times], "error": self.error}


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default)."""
    if not values:
        return None
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def inter_token_gaps(record: RequestRecord) -> list[float]:
    """Gaps between a request's consecutive tokens; a chunk of k tokens that arrives `d` after
    the previous one counts as k gaps of d / k (time per output token). The first token's delay
    is TTFT, not a gap. What a client waits between chunks is `chunk_gaps`."""
    gaps: list[float] = []
    times = record.token_times
    i = 1
    while times and i < len(times):
        j = i
        while j + 1 < len(times) and times[j + 1] == times[i]:
            j += 1
        k = j - i + 1
        gaps.extend([(times[i] - times[i - 1]) / k] * k)
        i = j + 1
    return gaps


def chunk_gaps(token_times: list[float]) -> tuple[list[float], int]:
    """The waits a streaming client sees: between consecutive chunks (tokens arriving together),
    from the first token's chunk on; and the number of chunks. Times in any common origin."""
    arrivals = sorted(set(token_times))
    return [later - earlier for earlier, later in zip(arrivals, arrivals[1:])], len(arrivals)


def chunk_stats(point: dict[str, Any]) -> tuple[dict[str, float | None], float | None]:
    """A streamed point's chunk gaps (ms: p50, p99, mean) and mean tokens per chunk, from its
    per-request token arrival times (so also for results saved before these were reported)."""
    gaps: list[float] = []
    chunks = tokens = 0
    for record in point.get("raw") or []:
        times = record.get("token_times") or []
        record_gaps, record_chunks = chunk_gaps(times)
        gaps += record_gaps
        chunks += record_chunks
        tokens += len(times)
    return _stats(gaps, 1e3), (tokens / chunks if chunks else None)


def _stats(values: list[float], scale: float) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None, "mean": None}
    return {"p50": percentile(values, 50) * scale, "p99": percentile(values, 99) * scale,
            "mean": sum(values) / len(values) * scale}


def summarize(records: list[RequestRecord], *, streaming: bool) -> dict[str, Any]:
    """A point's numbers. tokens/s = all generated tokens / (last completion - first send)."""
    start = min(r.sent for r in records)
    end = max((r.done for r in records if r.done is not None), default=start)
    seconds = end - start
    generated = sum(r.tokens for r in records)
    ttfts = [r.first_token - r.sent for r in records if r.first_token is not None]
    gaps = [gap for r in records for gap in inter_token_gaps(r)] if streaming else []
    errors = [r.error or f"got {r.tokens} tokens, expected {r.max_tokens}" for r in records if not r.ok]
    return {
        "requests": len(records), "seconds": seconds, "generated_tokens": generated,
        "expected_tokens": sum(r.max_tokens for r in records), "prompt_tokens": sum(r.prompt_tokens for r in records),
        "tokens_per_s": generated / seconds if seconds > 0 else 0.0,
        "requests_per_s": len(records) / seconds if seconds > 0 else 0.0,
        "ttft_ms": _stats(ttfts, 1e3), "itl_ms": _stats(gaps, 1e3),
        "latency_s": _stats([r.done - r.sent for r in records if r.done is not None], 1.0),
        "complete": not errors, "num_errors": len(errors), "errors": errors[:5],
        "raw": [r.raw(start) for r in records],
    }


# ---- HTTP clients -----------------------------------------------------------------------------
async def drive(send: Callable[[BenchRequest], Awaitable[RequestRecord]], requests: list[BenchRequest], *,
                clients: int, timeout: float) -> list[RequestRecord]:
    """`clients` concurrent clients; each sends its next request when its previous one is done,
    until all `requests` are sent. A request that takes longer than `timeout` fails."""
    pending = iter(requests)
    records: list[RequestRecord] = []

    async def client() -> None:
        for request in pending:  # shared iterator: the next free client takes the next request
            sent = time.perf_counter()
            try:
                record = await asyncio.wait_for(send(request), timeout)
            except asyncio.TimeoutError:
                record = RequestRecord(len(request.prompt), request.max_tokens, sent=sent,
                                       error=f"timed out after {timeout:g} s")
            except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not a crash
                record = RequestRecord(len(request.prompt), request.max_tokens, sent=sent,
                                       error=f"{type(exc).__name__}: {exc}")
            records.append(record)

    await asyncio.gather(*(client() for _ in range(clients)))
    return records


def stream_sender(http: Any, url: str, model: str,
                  sampling: Sampling = GREEDY) -> Callable[[BenchRequest], Awaitable[RequestRecord]]:
    """neo-serve's OpenAI completions, streamed: records each token's arrival."""

    async def send(request: BenchRequest) -> RequestRecord:
        body = {"model": model, "prompt": request.prompt, "max_tokens": request.max_tokens,
                **sampling.request_fields(), "ignore_eos": True, "stream": True, "return_token_ids": True,
                "stream_options": {"include_usage": True}}
        record = RequestRecord(len(request.prompt), request.max_tokens, sent=time.perf_counter())
        finished = usage = None
        ended = False
        async with http.post(url, json=body) as response:
            if response.status != 200:
                record.error = f"HTTP {response.status}: {(await response.read())[:300]!r}"
                record.done = time.perf_counter()
                return record
            async for raw_line in response.content:  # one SSE line at a time
                if not raw_line.startswith(b"data: "):
                    continue
                data = raw_line[len(b"data: "):].strip()
                if data == b"[DONE]":
                    ended = True
                    break
                now = time.perf_counter()
                event = json.loads(data)
                if "error" in event:
                    record.error = f"stream error: {event['error']}"
                    continue
                for choice in event.get("choices", []):
                    new = len(choice.get("token_ids") or [])
                    if new and record.first_token is None:
                        record.first_token = now
                    record.token_times.extend([now] * new)
                    finished = choice.get("finish_reason") or finished
                usage = event.get("usage") or usage
        record.done = time.perf_counter()
        record.tokens = len(record.token_times)
        if record.error is None:
            if not ended:
                record.error = "stream ended without data: [DONE]"
            elif finished != "length":
                record.error = f"finish_reason {finished!r}, expected 'length'"
            elif usage is None or usage.get("completion_tokens") != record.tokens:
                record.error = f"usage {usage} disagrees with {record.tokens} streamed tokens"
        return record

    return send


def full_sender(http: Any, url: str, sampling: Sampling = GREEDY) -> Callable[[BenchRequest], Awaitable[RequestRecord]]:
    """The baseline's route: one JSON response with all tokens (TTFT = time to the response)."""

    async def send(request: BenchRequest) -> RequestRecord:
        record = RequestRecord(len(request.prompt), request.max_tokens, sent=time.perf_counter())
        body = {"prompt": request.prompt, "max_tokens": request.max_tokens, **sampling.request_fields()}
        async with http.post(url, json=body) as response:
            body = await response.read()
        record.done = record.first_token = time.perf_counter()
        if response.status != 200:
            record.error = f"HTTP {response.status}: {body[:300]!r}"
        else:
            record.tokens = len(json.loads(body)["token_ids"])
        return record

    return send


async def http_point(make_send: Callable[[Any], Callable[[BenchRequest], Awaitable[RequestRecord]]],
                     requests: list[BenchRequest], *, clients: int, timeout: float) -> list[RequestRecord]:
    # aiohttp, not httpx: the clients share the machine's cores with the server they measure, and
    # httpx's pure-Python HTTP/1.1 and line parsing cost ~11 ms of CPU per streamed demo request
    # (1.4 CPU-s per 128 requests, 0.11 of the 2 cores at the demo's 2-replica speed), where
    # aiohttp parses in C.
    import aiohttp

    connector = aiohttp.TCPConnector(limit=clients, limit_per_host=clients)
    # The read timeout bounds a silent connection; `drive` bounds each request's total time.
    client_timeout = aiohttp.ClientTimeout(total=None, sock_connect=30.0, sock_read=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as http:
        return await drive(make_send(http), requests, clients=clients, timeout=timeout)


def run_http(make_send: Callable[[Any], Callable[[BenchRequest], Awaitable[RequestRecord]]],
             requests: list[BenchRequest], *, clients: int, timeout: float) -> tuple[list[RequestRecord], dict]:
    """One point over HTTP. Also returns what else the machine did meanwhile: the CPU seconds
    this (client) process used (on a small machine the clients compete with the server for
    cores) and the CPU steal."""
    cpu, steal = time.process_time(), StealMeter()
    records = asyncio.run(http_point(make_send, requests, clients=clients, timeout=timeout))
    return records, {"client_cpu_s": time.process_time() - cpu, "cpu_steal": steal.fraction()}


# ---- the offline engine -----------------------------------------------------------------------
def offline_point(engine: Any, requests: list[BenchRequest], *, clients: int,
                  sampling: Sampling = GREEDY) -> list[RequestRecord]:
    """The engine's own loop with `clients` requests in flight: a finished request is replaced
    by the next one before the next step, as a closed-loop client would do."""
    pending = iter(requests)
    records: dict[str, RequestRecord] = {}

    def add_next() -> bool:
        request = next(pending, None)
        if request is None:
            return False
        record = RequestRecord(len(request.prompt), request.max_tokens, sent=time.perf_counter())
        added = engine.add_request(request.prompt, sampling.params(request.max_tokens))
        records[added.request_id] = record
        return True

    in_flight = sum(add_next() for _ in range(clients))
    done: list[RequestRecord] = []
    while in_flight:
        outputs = engine.step()
        now = time.perf_counter()
        for output in outputs:
            record = records[output.request_id]
            new = len(output.outputs[0].token_ids) - len(record.token_times)
            if new > 0 and record.first_token is None:
                record.first_token = now
            record.token_times.extend([now] * new)
            if output.finished:
                record.done = now
                record.tokens = len(record.token_times)
                if output.outputs[0].finish_reason != "length":
                    record.error = f"finish_reason {output.outputs[0].finish_reason!r}"
                done.append(record)
                in_flight -= 1
                in_flight += add_next()
    return done


def load_offline(model: ModelSpec, requests: list[BenchRequest], args: argparse.Namespace,
                 engine_args: dict[str, Any]) -> Any:
    """The offline engine (an `LLM`), loaded and warmed up, on `--threads` torch threads like
    the served stages and the baseline (the report says each system had that many)."""
    import torch

    from neo_serve import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(str(model.path), dtype=args.dtype, **engine_args)
    llm.generate([requests[0].prompt[:16]] * 2, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    return llm


def measure_offline(llm: Any, model: ModelSpec, requests: list[BenchRequest], clients: int,
                    args: argparse.Namespace, *, paired_with: str | None = None) -> dict[str, Any]:
    """One offline point; `paired_with` names the served system measured right after it."""
    batch = requests[:requests_per_point(clients, args)]
    steal = StealMeter()
    records = offline_point(llm.engine, batch, clients=clients, sampling=args.sampling)
    point = {"system": offline_system(paired_with), "model": model.name, "stages": 1, "clients": clients,
             **summarize(records, streaming=True), "cpu_steal": steal.fraction(), "paired_with": paired_with}
    _print_point(point)
    return point


def offline_system(paired_with: str | None) -> str:
    """The report's name of an offline point: its own system when it is paired with a served one."""
    return "offline" if paired_with is None else f"offline, paired with {paired_with}"


def run_offline(model: ModelSpec, requests: list[BenchRequest], args: argparse.Namespace,
                engine_args: dict[str, Any]) -> list[dict[str, Any]]:
    llm = load_offline(model, requests, args, engine_args)
    points = [measure_offline(llm, model, requests, clients, args) for clients in args.clients]
    del llm
    return points


# ---- Ray Serve --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelSpec:
    name: str
    path: Path
    vocab_size: int
    max_position_embeddings: int


def resolve_models(args: argparse.Namespace) -> list[ModelSpec]:
    from neo_serve.config import load_model_config

    specs = []
    for name in args.models:
        if name == "demo":
            path, served = DEMO_CHECKPOINT, "neo-demo"
        elif name == "pythia-160m":
            config = Path(args.config)
            if not config.is_file():
                raise SystemExit(f"{config} not found: pass --config with a Pythia-160M-like config.json")
            print(f"pythia-160m: random checkpoint at {args.checkpoint_dir} (built once)", flush=True)
            path, served = build_checkpoint(config, Path(args.checkpoint_dir)), "pythia-160m"
        else:
            path = Path(name).expanduser()
            served = path.resolve().name
        config = load_model_config(path)
        specs.append(ModelSpec(served, path, config.vocab_size, config.max_position_embeddings))
    return specs


@contextmanager
def ray_serve(num_cpus: int, ingress: str = "auto") -> Iterator[str]:
    """Local Ray and Serve on 127.0.0.1:<free port>, shut down on exit whatever happens, with the
    front door `neo-serve up` would pick for `ingress` (see neo_serve/serve/ingress.py).
    Yields the HTTP base URL."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray
    from ray import serve

    used = configure_local_cluster(ingress)  # what `neo-serve up` runs with
    port = free_port()
    started = time.perf_counter()
    try:
        # "local": a cluster of the bench's own, as its measurements assume, even where
        # RAY_ADDRESS is set (KubeRay sets it in every Ray pod) or `ray start` runs on this
        # machine: plain ray.init() would join that cluster, refusing `num_cpus`, and the
        # shutdown below would stop Serve there.
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, logging_level="warning")
        # ray.init replaces the SIGTERM handler (its core worker's aborts the process, leaving
        # no chance to write the results): SIGTERM is Ctrl-C again until Ray is down.
        with sigterm_as_interrupt():
            serve.start(http_options={"host": "127.0.0.1", "port": port},
                        logging_config={"log_level": "WARNING", "enable_access_log": False})
            print(f"Ray and Serve up in {time.perf_counter() - started:.1f} s ({num_cpus} logical CPUs, "
                  f"http://127.0.0.1:{port}, ingress: {used})", flush=True)
            yield f"http://127.0.0.1:{port}"
    finally:
        with _uninterruptible():  # a second Ctrl-C must not leave Ray running
            try:
                if ray.is_initialized():
                    run_while_ray_runs(shut_down_serve)
            except RayProcessesStopped:
                pass  # a signal to the whole process group took them: the rest goes down below
            finally:
                ray.shutdown()


@contextmanager
def deployed(app: Any, name: str, *, timeout: float, route_prefix: str = "/") -> Iterator[Any]:
    """One Serve application, running within `timeout` seconds (else TimeoutError), deleted on
    exit (also when deploying fails or on Ctrl-C). Yields the ingress handle."""
    from ray import serve

    try:
        # `serve.run` would wait forever for, e.g., a placement group that never fits.
        handle = serve._run(app, _blocking=False, name=name, route_prefix=route_prefix,
                            logging_config={"log_level": "WARNING", "enable_access_log": False})
        deadline = time.monotonic() + timeout
        while (status := serve.status().applications.get(name)) is None or status.status != "RUNNING":
            if status is not None and status.status == "DEPLOY_FAILED":
                raise RuntimeError(f"Serve app {name!r} {status.status}: {status.message}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Serve app {name!r} not running after {timeout:g} s "
                                   f"({status.status if status else 'unknown'})")
            time.sleep(0.2)
        yield handle
    finally:
        with _uninterruptible():
            try:
                run_while_ray_runs(lambda: serve.delete(name))
            except RayProcessesStopped as gone:  # a signal to the whole process group took them too
                print(f"Ray's {gone} stopped: {name!r} goes down with the rest of Ray", file=sys.stderr)
            except Exception as exc:  # noqa: BLE001 - Serve and Ray are shut down at the end anyway
                print(f"warning: could not delete Serve app {name!r}: {exc!r}", file=sys.stderr)


def bench_app_args(model: ModelSpec, stages: int, replicas: int, args: argparse.Namespace,
                   engine_args: dict[str, Any]) -> dict[str, Any]:
    """The app's args for one measured neo-serve system: the model alone, no playground."""
    from neo_serve.app import AppArgs

    cpus = cpus_per_stage(stages, replicas, args)
    app_args: dict[str, Any] = {"models": [{"name": model.name, "checkpoint": str(model.path), "num_stages": stages,
                                            "dtype": args.dtype, "cpus_per_stage": cpus,
                                            "num_replicas": replicas, **engine_args}]}
    if "playground" in AppArgs.model_fields:  # the Gradio playground is not measured here
        app_args["playground"] = False
    return app_args


def served_system(stages: int, replicas: int) -> str:
    name = f"neo-serve {stages} stage{'s' if stages > 1 else ''}"
    return name if replicas == 1 else f"{name}, {replicas} replicas"


def run_served(model: ModelSpec, stages: int, replicas: int, requests: list[BenchRequest], base_url: str,
               args: argparse.Namespace, engine_args: dict[str, Any], offline: Any = None,
               clients: list[int] | None = None) -> list[dict[str, Any]]:
    """The neo-serve app's points at each N of `clients` (default: --clients). With `offline` (an
    `LLM`), each comes right after an offline point of the same N, measured while no app is
    deployed (an idle app's replica and router still wake up now and then), so the app is
    deployed anew for each point."""
    from neo_serve.app import build_app

    cpus = cpus_per_stage(stages, replicas, args)
    app_args = bench_app_args(model, stages, replicas, args, engine_args)
    url = f"{base_url}/v1/completions"
    system = served_system(stages, replicas)
    points = []
    clients_list = clients or args.clients
    groups = [[n] for n in clients_list] if offline is not None else [clients_list]
    for clients_group in groups:
        if offline is not None:
            points.append(measure_offline(offline, model, requests, clients_group[0], args, paired_with=system))
        started = time.perf_counter()
        with deployed(build_app(app_args), NEO_APP, timeout=args.deploy_timeout):
            print(f"[{model.name}] {system}: deployed in {time.perf_counter() - started:.1f} s "
                  f"({cpus} CPU thread(s) per stage)", flush=True)
            _http_warmup(lambda http: stream_sender(http, url, model.name, args.sampling), requests, args)
            for clients in clients_group:
                batch = requests[:requests_per_point(clients, args)]
                records, beside = run_http(lambda http: stream_sender(http, url, model.name, args.sampling), batch,
                                           clients=clients, timeout=args.request_timeout)
                point = {"system": system, "model": model.name, "stages": stages, "clients": clients,
                         "cpus_per_stage": cpus, "replicas": replicas, **summarize(records, streaming=True),
                         **beside}
                _print_point(point)
                points.append(point)
    return points


def run_baseline(model: ModelSpec, requests: list[BenchRequest], base_url: str,
                 args: argparse.Namespace, clients: list[int] | None = None) -> list[dict[str, Any]]:
    """The `@serve.batch` baseline's points at each N of `clients` (default: --clients), one deployment."""
    from neo_serve.bench.baseline_app import build_baseline_app

    app = build_baseline_app(str(model.path), dtype=args.dtype, num_threads=args.threads,
                             max_batch_size=args.baseline_batch_size)
    url = f"{base_url}{BASELINE_ROUTE}"
    points = []
    started = time.perf_counter()
    with deployed(app, BASELINE_APP, timeout=args.deploy_timeout, route_prefix=BASELINE_ROUTE) as handle:
        print(f"[{model.name}] baseline: deployed in {time.perf_counter() - started:.1f} s", flush=True)
        _http_warmup(lambda http: full_sender(http, url, args.sampling), requests, args)
        for n in clients or args.clients:
            batch = requests[:requests_per_point(n, args)]
            handle.reset_stats.remote().result()
            records, beside = run_http(lambda http: full_sender(http, url, args.sampling), batch, clients=n,
                                       timeout=args.request_timeout)
            point = {"system": "baseline", "model": model.name, "stages": 1, "clients": n,
                     "cpus_per_stage": args.threads, **summarize(records, streaming=False), **beside,
                     "baseline_batches": handle.stats.remote().result()}
            _print_point(point)
            points.append(point)
    return points


def _http_warmup(make_send: Callable[[Any], Callable[[BenchRequest], Awaitable[RequestRecord]]],
                 requests: list[BenchRequest], args: argparse.Namespace) -> None:
    """Two short requests at once: first-call costs (connections, kernels) stay out of the points.

    Serve calls an app RUNNING before HAProxy routes its path to it: meanwhile the path answers
    from an app deleted just before (its router still draining), from the app at "/", or not at
    all. So a failed warm-up is tried again, for up to WARMUP_ROUTE_WAIT_S."""
    warm = [BenchRequest(r.prompt[:16], min(8, r.max_tokens)) for r in requests[:2]]
    deadline = time.monotonic() + WARMUP_ROUTE_WAIT_S
    while True:
        records, _ = run_http(make_send, warm, clients=2, timeout=args.request_timeout)
        failed = [r.error for r in records if not r.ok]
        if not failed:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"warm-up request failed: {failed[0]}")
        time.sleep(0.5)


WARMUP_ROUTE_WAIT_S = 30.0


def _print_point(point: dict[str, Any]) -> None:
    ttft, itl = point["ttft_ms"], point["itl_ms"]
    line = (f"[{point['model']}] {point['system']:<18} N={point['clients']:<3} {point['tokens_per_s']:8.1f} tok/s  "
            f"TTFT p50 {format_ms(ttft['p50'])} p99 {format_ms(ttft['p99'])}  "
            f"ITL p50 {format_ms(itl['p50'])} p99 {format_ms(itl['p99'])}  "
            f"{point['requests']} req in {point['seconds']:.1f} s")
    if "client_cpu_s" in point:
        line += f" (client CPU {point['client_cpu_s']:.1f} s)"
    if point.get("cpu_steal") is not None:
        line += f"  CPU steal {point['cpu_steal']:.0%}"
    if not point["complete"]:
        line += f"  INCOMPLETE: {point['num_errors']} request(s), e.g. {point['errors'][0]}"
    print(line, flush=True)


def format_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


# ---- the run ----------------------------------------------------------------------------------
def machine_info(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import torch

    info = {"cpu": _cpu_name(), "logical_cpus": os.cpu_count(), "torch_threads": args.threads,
            "torch": torch.__version__, "ray": ray.__version__, "python": platform.python_version(),
            "platform": platform.platform(), "load_average_at_start": list(os.getloadavg())}
    for package in ("transformers", "aiohttp"):
        try:
            info[package] = __import__(package).__version__
        except ImportError:
            info[package] = None
    return info


def _int_list(text: str) -> list[int]:
    values = [int(part) for part in text.split(",") if part.strip()]
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    try:
        pair = (int(low), int(high or low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected MIN:MAX, got {text!r}") from None
    if not 1 <= pair[0] <= pair[1]:
        raise argparse.ArgumentTypeError(f"expected 1 <= MIN <= MAX, got {text!r}")
    return pair


def add_serve_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `neo-serve bench serve`'s options to `parser`."""
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["demo", "pythia-160m"],
                        help="comma-separated: demo (the bundled model), pythia-160m (a random Pythia-160M-shaped "
                             "checkpoint, built once), or checkpoint directories (default: demo,pythia-160m)")
    parser.add_argument("--config", default=str(REPO_REFERENCE),
                        help="config.json whose shape the pythia-160m checkpoint takes")
    parser.add_argument("--checkpoint-dir", default=str(PYTHIA_DIR), help="where the pythia-160m checkpoint lives")
    parser.add_argument("--clients", type=_int_list, default=[1, 8, 32, 64],
                        help="concurrent clients N, comma-separated (default 1,8,32,64)")
    parser.add_argument("--stages", type=_int_list, default=[1, 2], help="neo-serve pipeline stages (default 1,2)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per point = rounds x N (default 2: each client sends 2 requests)")
    parser.add_argument("--min-requests", type=int, default=4, help="at least this many requests per point")
    parser.add_argument("--prompt-len", type=_range, default=(32, 256), help="prompt token ids MIN:MAX")
    parser.add_argument("--max-tokens", type=_range, default=(64, 128), help="new tokens per request MIN:MAX")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                        help="weights of every system (default float32)")
    add_sampling_arguments(parser)
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per system (default: torch's, i.e. the physical cores): the offline "
                             "engine, the baseline replica, and a pipeline's stages together")
    parser.add_argument("--cpus-per-stage", type=int, default=None,
                        help="CPUs per neo-serve pipeline stage (default: threads / (stages x replicas))")
    parser.add_argument("--replicas", type=_int_list, default=[1],
                        help="pipeline replicas of the neo-serve app, comma-separated (default 1); each with each "
                             "--stages whose stages x replicas fit the threads, e.g. 1,2 on 2 cores adds two "
                             "single-threaded replicas of 1 stage")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--baseline-batch-size", type=int, default=8, help="@serve.batch max_batch_size (default 8)")
    parser.add_argument("--request-timeout", type=float, default=600.0, help="seconds per request (default 600)")
    parser.add_argument("--deploy-timeout", type=float, default=600.0,
                        help="seconds for an application to load and run (default 600)")
    parser.add_argument("--ingress", choices=INGRESS_CHOICES, default="auto",
                        help="HTTP front door, as for `neo-serve up` (default auto: HAProxy when installed)")
    parser.add_argument("--paired", action=argparse.BooleanOptionalAction, default=True,
                        help="measure an offline point right before each served point of the same N (the app is "
                             "deployed anew for each point) and compare the two, one N at a time with the "
                             "baseline's point of that N right after (default); --no-paired: the offline engine "
                             "once per model, before Ray starts, then each system at every N")
    parser.add_argument("--skip-offline", action="store_true")
    parser.add_argument("--skip-baseline", action="store_true")
    parser.add_argument("--markdown", default=None, help="write the markdown report here")
    parser.add_argument("--json", default=None, help="write all numbers (per request too) here")
    parser.add_argument("--plots-dir", default=None, help="write PNG plots here (needs matplotlib)")
    parser.add_argument("--from-json", default=None, help="measure nothing: print (or with --markdown write) the "
                                                          "report of a saved --json file with the current columns")


def run_serve_bench(args: argparse.Namespace) -> int:
    """Run the benchmark; 0 if every request of every point got exactly its tokens."""
    if args.from_json:
        return render_saved(args.from_json, args.markdown)
    import torch

    args.threads = args.threads or torch.get_num_threads()
    args.sampling = Sampling.from_args(args)
    try:
        ingress = configure_local_ingress(args.ingress)
    except IngressUnavailable as exc:
        print(f"neo-serve bench serve: {exc}", file=sys.stderr)
        return 2
    models = resolve_models(args)
    max_requests = max(requests_per_point(n, args) for n in args.clients)
    workloads = {m.name: make_requests(m.vocab_size, max_requests, seed=args.seed, prompt_len=args.prompt_len,
                                       new_tokens=args.max_tokens) for m in models}
    results: dict[str, Any] = {
        "machine": machine_info(args),
        "workload": {"seed": args.seed, "prompt_len": list(args.prompt_len), "max_tokens": list(args.max_tokens),
                     "sampling": dataclasses.asdict(args.sampling),
                     "rounds": args.rounds, "min_requests": args.min_requests, "clients": args.clients,
                     "dtype": args.dtype, "max_num_batched_tokens": args.max_num_batched_tokens,
                     "baseline_batch_size": args.baseline_batch_size,
                     "ingress": ingress, "paired": args.paired and not args.skip_offline,
                     "baseline_paired": args.paired and not args.skip_offline and not args.skip_baseline,
                     "replicas": args.replicas},
        "points": [], "failures": [], "interrupted": False,
    }
    print(f"machine: {json.dumps(results['machine'])}", flush=True)
    started = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            _run_all(models, workloads, args, results)
        except KeyboardInterrupt:
            results["interrupted"] = True
            print("interrupted: Serve and Ray are shut down; writing what was measured", file=sys.stderr)
        finally:
            results["seconds"] = time.perf_counter() - started
            results["machine"]["load_average_at_end"] = list(os.getloadavg())
            _write_outputs(results, args)
    if results["interrupted"]:
        return 130
    ok = not results["failures"] and all(p["complete"] for p in results["points"])
    return 0 if ok else 1


def cpus_per_stage(stages: int, replicas: int, args: argparse.Namespace) -> int:
    """The app gets the same CPU threads as the offline engine, split over its replicas' stages."""
    return args.cpus_per_stage or threads_per_stage(args.threads, stages, replicas)


def served_configs(args: argparse.Namespace) -> list[tuple[int, int]]:
    """(stages, replicas) of each neo-serve system: every --stages with one replica, and with
    more replicas only where stages x replicas fit the threads one each (more would only share
    cores), unless --cpus-per-stage asks for them."""
    return [(stages, replicas) for stages in args.stages for replicas in args.replicas
            if replicas == 1 or args.cpus_per_stage or stages * replicas <= args.threads]


def ray_cpus(args: argparse.Namespace, configs: list[tuple[int, int]] | None = None) -> int:
    """Logical CPUs for Ray: room for the largest application (one at a time) of `configs`
    ((stages, replicas) of each neo-serve system; default `served_configs`) and the baseline
    replica, so that no placement group waits for CPUs. Only logical: each replica's torch
    threads are its own."""
    from neo_serve.serve.config import AppArgs, ModelArgs

    needed = [float(args.threads)]  # the baseline replica
    for stages, replicas in served_configs(args) if configs is None else configs:
        model = ModelArgs(num_stages=stages, cpus_per_stage=cpus_per_stage(stages, replicas, args),
                          num_replicas=replicas)
        needed.append(AppArgs(models=[model], playground=False, verify_checkpoints=False).cpus_reserved())
    return math.ceil(max(needed)) + 1


def _engine_args(model: ModelSpec, args: argparse.Namespace) -> dict[str, Any]:
    """The same engine limits offline and served; a KV cache that never preempts this workload."""
    needed = max(args.clients) * (args.prompt_len[1] + args.max_tokens[1])
    kv = max(needed, model.max_position_embeddings)
    return {"kv_cache_tokens": -(-kv // 256) * 256, "max_num_batched_tokens": args.max_num_batched_tokens,
            "max_num_seqs": max(256, max(args.clients))}


def client_rounds(clients: list[int], *, paired: bool) -> list[list[int]]:
    """The N of each round of a model's systems (each served system, then the baseline). Paired:
    one N a round, so that every "vs baseline" compares points minutes apart rather than a
    model's whole run apart."""
    return [[n] for n in clients] if paired else [clients]


def _run_all(models: list[ModelSpec], workloads: dict[str, list[BenchRequest]], args: argparse.Namespace,
             results: dict[str, Any]) -> None:
    def attempt(what: str, run: Callable[[], Any]) -> Any:
        """run(), or None when it fails: the failure is reported and the next configuration goes on."""
        try:
            return run()
        except Exception as exc:  # noqa: BLE001
            message = f"{what}: {type(exc).__name__}: {exc}"
            print(f"FAILED {message}", file=sys.stderr, flush=True)
            results["failures"].append(message)
            return None

    def measure(what: str, run: Callable[[], list[dict[str, Any]]]) -> None:
        results["points"].extend(attempt(what, run) or [])

    paired = results["workload"]["paired"]
    if not args.skip_offline and not paired:  # before Ray starts: nothing else runs on the machine
        for model in models:
            measure(f"{model.name} offline", lambda m=model: run_offline(m, workloads[m.name], args,
                                                                         _engine_args(m, args)))
    with ray_serve(ray_cpus(args), args.ingress) as base_url:
        for model in models:
            offline = None
            if paired:  # the engine is loaded once per model and measured beside each served point
                offline = attempt(f"{model.name} offline", lambda m=model: load_offline(
                    m, workloads[m.name], args, _engine_args(m, args)))
            for clients in client_rounds(args.clients, paired=paired):
                at = f" N={clients[0]}" if paired else ""
                for stages, replicas in served_configs(args):
                    measure(f"{model.name} {served_system(stages, replicas)}{at}",
                            lambda m=model, s=stages, r=replicas, o=offline, c=clients: run_served(
                                m, s, r, workloads[m.name], base_url, args, _engine_args(m, args), o, c))
                if not args.skip_baseline:
                    measure(f"{model.name} baseline{at}",
                            lambda m=model, c=clients: run_baseline(m, workloads[m.name], base_url, args, c))
            del offline


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM cleans up like Ctrl-C (only possible from the main thread); nests."""
    if sys.platform == "win32" or not _in_main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(*_: Any) -> None:
    raise KeyboardInterrupt


@contextmanager
def _uninterruptible() -> Iterator[None]:
    """Ignore Ctrl-C and SIGTERM while cleaning up (only possible from the main thread)."""
    if not _in_main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _in_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


# ---- outputs ----------------------------------------------------------------------------------
def _write_outputs(results: dict[str, Any], args: argparse.Namespace) -> None:
    plots: list[Path] = []
    if args.plots_dir and results["points"]:
        try:
            from neo_serve.bench.plots import plot_serve_bench

            plots = plot_serve_bench(results, Path(args.plots_dir))
        except ImportError as exc:
            print(f"no plots: {exc} (pip install matplotlib, or neo-serve[bench])", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - the numbers matter more than the pictures
            print(f"no plots: {type(exc).__name__}: {exc}", file=sys.stderr)
    markdown_dir = Path(args.markdown).parent if args.markdown else Path.cwd()
    table = format_markdown(results, [os.path.relpath(path, markdown_dir) for path in plots])
    print(table, flush=True)
    for path in plots:
        print(f"wrote {path}")
    if args.markdown:
        Path(args.markdown).parent.mkdir(parents=True, exist_ok=True)
        Path(args.markdown).write_text(table)
        print(f"wrote {args.markdown}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")


def _find(points: list[dict[str, Any]], model: str, system: str, clients: int) -> dict[str, Any] | None:
    return next((p for p in points if p["model"] == model and p["system"] == system and p["clients"] == clients),
                None)


def _offline_for(points: list[dict[str, Any]], served: dict[str, Any]) -> dict[str, Any] | None:
    """The offline point a served point is compared with: its pair, else the unpaired one."""
    model, clients = served["model"], served["clients"]
    return (_find(points, model, offline_system(served["system"]), clients)
            or _find(points, model, "offline", clients))


def _ratio(value: float | None, reference: float | None) -> str:
    return f"{value / reference:.2f}x" if value and reference else "-"


def render_saved(path: str, markdown: str | None) -> int:
    """`neo-serve bench serve --from-json F`: the report of a saved run, with the current columns."""
    table = format_markdown(json.loads(Path(path).read_text()))
    if markdown:
        Path(markdown).write_text(table)
        print(f"wrote {markdown}")
    else:
        print(table)
    return 0


def format_markdown(results: dict[str, Any], plots: list[str] | None = None) -> str:
    """The report: machine, workload, one table per model, the issue's targets, plot links."""
    machine, workload, points = results["machine"], results["workload"], results["points"]
    lines = [
        "## Served path: HTTP streaming clients vs the offline engine and a transformers baseline", "",
        f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {machine['torch_threads']} torch "
        f"threads per system; torch {machine['torch']}, ray {machine['ray']}, transformers {machine['transformers']}, "
        f"Python {machine['python']}; load average {_load(machine.get('load_average_at_start'))} at start, "
        f"{_load(machine.get('load_average_at_end'))} at end.", "",
        f"Workload (seed {workload['seed']}): {workload['rounds']} x N requests per point (at least "
        f"{workload['min_requests']}), prompts of {workload['prompt_len'][0]}-{workload['prompt_len'][1]} token ids, "
        f"{workload['max_tokens'][0]}-{workload['max_tokens'][1]} new tokens each (`ignore_eos`, "
        f"{Sampling(**workload.get('sampling', {})).describe()}), "
        f"{workload['dtype']} weights. N clients each send a request as soon as their previous one is done. "
        "tokens/s = generated tokens / wall time from the first request sent to the last completed. "
        "`offline`: the engine in-process, N requests in flight. `neo-serve S stages`: the Ray Serve app over "
        "loopback HTTP, streaming. `baseline`: transformers `generate` under `@serve.batch(max_batch_size="
        f"{workload['baseline_batch_size']})` over HTTP, no streaming (TTFT = time to the whole response). Both "
        f"through {_ingress_name(workload.get('ingress'))}.", "",
        "ITL: a chunk of k tokens arriving d after the previous one counts as k gaps of d / k (time per output "
        "token). Chunk gap: what a streaming client waits between two chunks; a replica sends at most "
        "`max_stream_chunks_per_s` chunks over all its streams (64 on CPU), so at N = 64 each stream gets about "
        "one chunk a second carrying several tokens.", "",
    ]
    if workload.get("paired"):
        lines += ["Paired: each served point ran right after an offline point of the same N (`offline, paired "
                  "with ...`, with Ray up and no app deployed), and its \"vs offline\" compares the two."
                  + (" The points ran one N at a time, the baseline's right after the served points of its N."
                     if workload.get("baseline_paired") else ""), ""]
    if results.get("interrupted"):
        lines += ["**Interrupted: partial results.**", ""]
    stolen = [p for p in points if (p.get("cpu_steal") or 0) > STEAL_WARNING]
    if stolen:
        worst = max(p["cpu_steal"] for p in stolen)
        lines += [f"**CPU steal above {STEAL_WARNING:.0%} in {len(stolen)} of {len(points)} points "
                  f"(up to {worst:.0%}):** the hypervisor gave this machine's vCPUs to other guests meanwhile, "
                  "so those points measured a slower machine than the others; ratios between them do not hold.", ""]
    for failure in results.get("failures", []):
        lines += [f"**Failed:** {failure}", ""]
    for model in dict.fromkeys(p["model"] for p in points):
        lines += [f"### {model}", "",
                  "| system | N | requests | tokens/s | vs offline | vs baseline | TTFT p50 | TTFT p99 | "
                  "ITL p50 | ITL p99 | chunk gap p50 | chunk gap p99 | tokens / chunk | all tokens | CPU steal |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        systems = dict.fromkeys(p["system"] for p in points if p["model"] == model)
        for system in systems:
            for p in (p for p in points if p["model"] == model and p["system"] == system):
                offline = _offline_for(points, p)
                baseline = _find(points, model, "baseline", p["clients"])
                served = system.startswith("neo-serve")
                gap, per_chunk = chunk_stats(p)  # none for the baseline: it records no token arrivals
                lines.append(
                    f"| {system} | {p['clients']} | {p['requests']} | {p['tokens_per_s']:.1f} | "
                    f"{_ratio(p['tokens_per_s'], offline and offline['tokens_per_s']) if served else '-'} | "
                    f"{_ratio(p['tokens_per_s'], baseline and baseline['tokens_per_s']) if served else '-'} | "
                    f"{format_ms(p['ttft_ms']['p50'])} | {format_ms(p['ttft_ms']['p99'])} | "
                    f"{format_ms(p['itl_ms']['p50'])} | "
                    f"{format_ms(p['itl_ms']['p99'])} | {format_ms(gap['p50'])} | {format_ms(gap['p99'])} | "
                    f"{'-' if per_chunk is None else f'{per_chunk:.1f}'} | "
                    f"{'yes' if p['complete'] else 'NO: ' + str(p['num_errors'])} | "
                    f"{format_steal(p.get('cpu_steal'))} |")
        batches = [f"N={p['clients']}: {p['baseline_batches']['mean_batch_size']:.1f}" for p in points
                   if p["model"] == model and p.get("baseline_batches")]
        lines += ["", f"Baseline mean batch size: {', '.join(batches)}." if batches else "", ""]
    lines += _targets(points)
    lines += [f"![{Path(plot).stem}]({plot})" for plot in plots or []]
    return "\n".join(lines).rstrip() + "\n"


def _targets(points: list[dict[str, Any]]) -> list[str]:
    """Issue 3's targets at the largest N: served >= 0.8x offline, >= 3x the baseline, lower p50 TTFT."""
    served = [p for p in points if p["system"].startswith("neo-serve")]
    if not served:
        return []
    top = max(p["clients"] for p in served)
    lines = [f"### Targets at N = {top}", "",
             "The baseline does not stream: its TTFT is its whole response. Request latency (sent to last "
             "token) compares the same thing in both.", "",
             "| model | system | served / offline (>= 0.8x) | served / baseline (>= 3x) | "
             "TTFT p50 served vs baseline | latency p50 served vs baseline |",
             "|---|---|---|---|---|---|"]
    for p in (p for p in served if p["clients"] == top):
        offline = _offline_for(points, p)
        baseline = _find(points, p["model"], "baseline", top)
        vs_off = p["tokens_per_s"] / offline["tokens_per_s"] if offline and offline["tokens_per_s"] else None
        vs_base = p["tokens_per_s"] / baseline["tokens_per_s"] if baseline and baseline["tokens_per_s"] else None
        ttft = "-"
        if baseline and p["ttft_ms"]["p50"] is not None and baseline["ttft_ms"]["p50"] is not None:
            lower = p["ttft_ms"]["p50"] < baseline["ttft_ms"]["p50"]
            ttft = (f"{format_ms(p['ttft_ms']['p50'])} vs {format_ms(baseline['ttft_ms']['p50'])} "
                    f"{'(met)' if lower else '(missed)'}")
        latency = "-"
        if baseline and p["latency_s"]["p50"] is not None and baseline["latency_s"]["p50"] is not None:
            latency = f"{p['latency_s']['p50']:.1f} s vs {baseline['latency_s']['p50']:.1f} s"
        lines.append(f"| {p['model']} | {p['system']} | {_verdict(vs_off, 0.8)} | {_verdict(vs_base, 3.0)} | {ttft} | "
                     f"{latency} |")
    return lines + [""]


def _verdict(ratio: float | None, target: float) -> str:
    if ratio is None:
        return "-"
    met = ratio >= target
    # One more digit where two would round a miss up to the target (0.798 is not "0.80x (missed)").
    shown = f"{ratio:.3f}" if not met and round(ratio, 2) >= target else f"{ratio:.2f}"
    return f"{shown}x {'(met)' if met else '(missed)'}"


def _ingress_name(ingress: str | None) -> str:
    """The report's words for the HTTP front door (runs before `ingress` was recorded: the proxy)."""
    return "Ray Serve's HAProxy ingress" if ingress == "haproxy" else "Ray Serve's Python proxy"


def _load(values: list[float] | None) -> str:
    return "/".join(f"{v:.2f}" for v in values) if values else "?"
