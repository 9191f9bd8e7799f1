"""`neo-serve bench score`: scoring prompts as lm-evaluation-harness does it, served and offline.

lm-evaluation-harness scores a model through an OpenAI-compatible server with completions
requests that echo the prompt, ask for logprobs and generate nothing (`echo: true, logprobs: 1,
max_tokens: 0`); a loglikelihood task sends thousands. Every prompt token's logprob comes from
the logits of the position before it, so this is the workload with the most logits per token.

For each model, the offline engine (an `LLM`, in this process) scores `--prompts` random
prompts of `--prompt-len` token ids (`prompt_logprobs`), and so does the baseline: transformers'
forward over batches of `--baseline-batch-size` prompts and a float32 log-softmax, as
lm-evaluation-harness's own `hf` model scores them. Then for each `--stages` the app is
deployed on a local Ray cluster and `--clients` HTTP clients send the same prompts as
lm-evaluation-harness would. Reported per system: prompt tokens scored per second (wall time
from the first request sent to the last answer), the served / offline ratio, and the largest
difference between a served logprob and the offline one: above `--tolerance` the run fails
(exit 1), as it does on any failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neo_serve.bench.engine_bench import REPO_REFERENCE
from neo_serve.bench.machine import StealMeter
from neo_serve.bench.serve_bench import (PYTHIA_DIR, ModelSpec, _int_list, bench_app_args, deployed, machine_info,
                                         ray_cpus, ray_serve, resolve_models, served_system, sigterm_as_interrupt)
from neo_serve.serve.ingress import INGRESS_CHOICES, IngressUnavailable, configure_local_ingress

SCORE_APP = "neo-serve-score-bench"

# One prompt's logprobs: None for the first token (no context), then one per token.
Scores = list[float | None]


@dataclass
class ScorePoint:
    system: str
    model: str
    stages: int
    prompts: int
    prompt_tokens: int
    seconds: float
    errors: list[str] = field(default_factory=list)
    max_abs_diff: float | None = None  # served vs offline logprobs (None: offline itself)
    cpu_steal: float | None = None

    @property
    def tokens_per_s(self) -> float:
        return self.prompt_tokens / self.seconds if self.seconds > 0 else 0.0


def make_prompts(vocab_size: int, count: int, length: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, vocab_size) for _ in range(length)] for _ in range(count)]


def score_offline(model: ModelSpec, prompts: list[list[int]],
                  args: argparse.Namespace) -> tuple[ScorePoint, list[Scores]]:
    """The offline engine scores every prompt at once (it batches them by its token budget)."""
    import torch

    from neo_serve import LLM, SamplingParams

    torch.set_num_threads(args.threads)
    llm = LLM(str(model.path), dtype=args.dtype, **_engine_args(args))
    params = SamplingParams(max_tokens=0, prompt_logprobs=args.logprobs)
    llm.generate([prompts[0][:16]], params)  # warm-up
    steal = StealMeter()
    started = time.perf_counter()
    outputs = llm.generate(prompts, params)
    seconds = time.perf_counter() - started
    scores = [[None] + [entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
              for out, prompt in zip(outputs, prompts)]
    point = ScorePoint("offline", model.name, 1, len(prompts), sum(map(len, prompts)), seconds,
                       cpu_steal=steal.fraction())
    return point, scores


def score_transformers(model: ModelSpec, prompts: list[list[int]], reference: list[Scores],
                       args: argparse.Namespace) -> ScorePoint:
    """The baseline: transformers' forward over batches of prompts (all of one length: no
    padding), every position's log-softmax in float32, each prompt token's logprob."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    hf = AutoModelForCausalLM.from_pretrained(str(model.path), dtype=getattr(torch, args.dtype)).eval()
    scores: list[Scores] = []
    with torch.inference_mode():
        hf(torch.tensor([prompts[0][:16]]))  # warm-up
        steal = StealMeter()
        started = time.perf_counter()
        for start in range(0, len(prompts), args.baseline_batch_size):
            batch = torch.tensor(prompts[start:start + args.baseline_batch_size])  # [batch, length]
            logprobs = torch.log_softmax(hf(batch).logits.float(), dim=-1)  # [batch, length, vocab]
            picked = logprobs[:, :-1].gather(2, batch[:, 1:].unsqueeze(2)).squeeze(2)  # [batch, length - 1]
            scores += [[None, *row] for row in picked.tolist()]
        seconds = time.perf_counter() - started
    point = ScorePoint("transformers", model.name, 1, len(prompts), sum(map(len, prompts)), seconds,
                       cpu_steal=steal.fraction())
    point.max_abs_diff = max(abs(a - b) for got, want in zip(scores, reference) for a, b in zip(got[1:], want[1:]))
    return point


async def _score_over_http(url: str, model: str, prompts: list[list[int]], *, clients: int, logprobs: int,
                           timeout: float) -> tuple[float, list[Scores | None], list[str]]:
    import aiohttp

    results: list[Scores | None] = [None] * len(prompts)
    errors: list[str] = []
    pending = iter(range(len(prompts)))

    async def client(http: aiohttp.ClientSession) -> None:
        for index in pending:
            body = {"model": model, "prompt": prompts[index], "max_tokens": 0, "echo": True,
                    "logprobs": logprobs, "temperature": 0}
            try:
                async with http.post(url, json=body) as response:
                    data = await response.json(content_type=None)
                if response.status != 200:
                    errors.append(f"prompt {index}: HTTP {response.status}: {str(data)[:200]}")
                    continue
                results[index] = data["choices"][0]["logprobs"]["token_logprobs"]
            except Exception as exc:  # noqa: BLE001 - a failed request is a measurement, not a crash
                errors.append(f"prompt {index}: {type(exc).__name__}: {exc}")

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout)) as http:
        started = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - started, results, errors


def score_served(model: ModelSpec, stages: int, prompts: list[list[int]], reference: list[Scores], base_url: str,
                 args: argparse.Namespace) -> ScorePoint:
    from neo_serve.app import build_app

    app_args = bench_app_args(model, stages, 1, args, _engine_args(args))
    url = f"{base_url}/v1/completions"
    with deployed(build_app(app_args), SCORE_APP, timeout=args.deploy_timeout):
        warm = asyncio.run(_score_over_http(url, model.name, [p[:16] for p in prompts[:2]], clients=2,
                                            logprobs=args.logprobs, timeout=args.request_timeout))
        if warm[2]:
            raise RuntimeError(f"warm-up request failed: {warm[2][0]}")
        steal = StealMeter()
        seconds, served, errors = asyncio.run(_score_over_http(
            url, model.name, prompts, clients=args.clients, logprobs=args.logprobs, timeout=args.request_timeout))
        cpu_steal = steal.fraction()  # over the requests, not the app's deletion
    point = ScorePoint(served_system(stages, 1), model.name, stages, len(prompts), sum(map(len, prompts)), seconds,
                       errors=errors, cpu_steal=cpu_steal)
    diffs = [abs(a - b) for got, want in zip(served, reference) if got is not None
             for a, b in zip(got[1:], want[1:])]
    if any(got is not None and len(got) != len(want) for got, want in zip(served, reference)):
        point.errors.append("a served answer has another number of logprobs than its prompt has tokens")
    point.max_abs_diff = max(diffs, default=None)
    return point


def _engine_args(args: argparse.Namespace) -> dict[str, Any]:
    """The same engine limits offline and served; a KV cache that holds every client's prompt."""
    kv = max(args.clients * args.prompt_len, 2048)
    return {"kv_cache_tokens": -(-kv // 256) * 256, "max_num_batched_tokens": args.max_num_batched_tokens}


def add_score_bench_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--models", type=lambda s: [m for m in s.split(",") if m], default=["pythia-160m"],
                        help="comma-separated: demo, pythia-160m (a random Pythia-160M-shaped checkpoint, built "
                             "once) or checkpoint directories (default: pythia-160m)")
    parser.add_argument("--config", default=str(REPO_REFERENCE),
                        help="config.json whose shape the pythia-160m checkpoint takes")
    parser.add_argument("--checkpoint-dir", default=str(PYTHIA_DIR), help="where the pythia-160m checkpoint lives")
    parser.add_argument("--stages", type=_int_list, default=[1, 2],
                        help="neo-serve pipeline stages, comma-separated (default 1,2)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts scored per system (default 16)")
    parser.add_argument("--prompt-len", type=int, default=512, help="token ids per prompt (default 512)")
    parser.add_argument("--clients", type=int, default=4, help="concurrent HTTP clients (default 4)")
    parser.add_argument("--logprobs", type=int, default=1, help="top logprobs per position (default 1)")
    parser.add_argument("--baseline-batch-size", type=int, default=8,
                        help="prompts per transformers forward in the baseline (default 8)")
    parser.add_argument("--skip-baseline", action="store_true", help="no transformers baseline")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per system (default: torch's): the offline engine, and a pipeline's "
                             "stages together")
    parser.add_argument("--cpus-per-stage", type=int, default=None,
                        help="CPUs per pipeline stage (default: threads / stages)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=1024)
    parser.add_argument("--tolerance", type=float, default=1e-4,
                        help="largest served-vs-offline logprob difference accepted (default 1e-4)")
    parser.add_argument("--request-timeout", type=float, default=600.0)
    parser.add_argument("--deploy-timeout", type=float, default=600.0)
    parser.add_argument("--ingress", choices=INGRESS_CHOICES, default="auto",
                        help="HTTP front door, as for `neo-serve up` (default auto: HAProxy when installed)")
    parser.add_argument("--json", default=None, help="also write the results here")


def run_score_bench(args: argparse.Namespace) -> int:
    """Run it; 0 if every request was answered with the offline engine's logprobs."""
    import torch

    for name in ("prompts", "prompt_len", "clients", "baseline_batch_size"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1")
    if args.prompt_len < 2:
        raise ValueError("--prompt-len must be at least 2 (the first token has no logprob)")
    args.threads = args.threads or torch.get_num_threads()
    try:
        ingress = configure_local_ingress(args.ingress)
    except IngressUnavailable as exc:
        print(f"neo-serve bench score: {exc}", file=sys.stderr)
        return 2
    # Checks each --stages' app config before anything is measured.
    num_cpus = ray_cpus(args, [(stages, 1) for stages in args.stages])
    machine = machine_info(args)
    models = resolve_models(args)
    points: list[ScorePoint] = []
    failures: list[str] = []
    for model in models:
        if args.prompt_len > model.max_position_embeddings:
            raise ValueError(f"--prompt-len {args.prompt_len} is past {model.name}'s context window of "
                             f"{model.max_position_embeddings} positions")
    references = {}
    prompts_of = {model.name: make_prompts(model.vocab_size, args.prompts, args.prompt_len, args.seed)
                  for model in models}
    for model in models:  # before Ray starts: nothing else runs on the machine
        prompts = prompts_of[model.name]
        point, references[model.name] = score_offline(model, prompts, args)
        points.append(point)
        _print_point(point)
        if not args.skip_baseline:
            points.append(score_transformers(model, prompts, references[model.name], args))
            _print_point(points[-1])
    with sigterm_as_interrupt(), ray_serve(num_cpus, ingress) as base_url:
        for model in models:
            for stages in args.stages:
                try:
                    point = score_served(model, stages, prompts_of[model.name], references[model.name], base_url, args)
                except Exception as exc:  # noqa: BLE001 - reported; the next system goes on
                    failures.append(f"{model.name}, {stages} stage(s): {type(exc).__name__}: {exc}")
                    print(f"FAILED {failures[-1]}", file=sys.stderr, flush=True)
                    continue
                points.append(point)
                _print_point(point)
    machine["load_average_at_end"] = list(os.getloadavg())
    print(format_report(points, args, machine))
    if args.json:
        Path(args.json).write_text(json.dumps({
            "machine": machine, "workload": {"prompts": args.prompts, "prompt_len": args.prompt_len,
                                             "clients": args.clients, "logprobs": args.logprobs,
                                             "seed": args.seed, "dtype": args.dtype},
            "points": [{**asdict(p), "tokens_per_s": p.tokens_per_s} for p in points],
            "failures": failures}, indent=1))
    # Served logprobs must be the offline engine's; the baseline's other kernels round otherwise
    # (its difference is reported, not held to the tolerance).
    bad = [p for p in points if p.errors or (p.system != "transformers" and p.max_abs_diff is not None
                                             and p.max_abs_diff > args.tolerance)]
    for point in bad:
        print(f"FAILED {point.model}, {point.system}: {point.errors[:1] or ''} max |logprob difference| "
              f"{point.max_abs_diff}", file=sys.stderr)
    return 1 if failures or bad else 0


def _print_point(point: ScorePoint) -> None:
    print(f"[{point.model}] {point.system:<18} {point.prompt_tokens} prompt tokens in {point.seconds:.2f} s: "
          f"{point.tokens_per_s:.0f} tok/s" + (f", {len(point.errors)} error(s)" if point.errors else ""), flush=True)


def format_report(points: list[ScorePoint], args: argparse.Namespace, machine: dict[str, Any]) -> str:
    lines = [f"Machine: {machine['cpu']}, {machine['logical_cpus']} logical CPUs, {args.threads} torch threads per "
             f"system; torch {machine['torch']}, ray {machine['ray']}.",
             f"Workload (seed {args.seed}): {args.prompts} prompts of {args.prompt_len} token ids, scored with "
             f"`echo`, `logprobs: {args.logprobs}`, `max_tokens: 0` ({args.clients} HTTP clients), {args.dtype}; "
             f"transformers: forward passes over {args.baseline_batch_size} prompts at a time.",
             "",
             "| model | system | prompt tokens/s | vs offline | max abs logprob diff vs offline | errors | CPU steal |",
             "|---|---|---|---|---|---|---|"]
    offline = {p.model: p for p in points if p.system == "offline"}
    for point in points:
        base = offline.get(point.model)
        ratio = f"{point.tokens_per_s / base.tokens_per_s:.2f}x" if base and point is not base else "-"
        diff = "-" if point.max_abs_diff is None else f"{point.max_abs_diff:.1e}"
        steal = "-" if point.cpu_steal is None else f"{point.cpu_steal:.0%}"
        lines.append(f"| {point.model} | {point.system} | {point.tokens_per_s:.0f} | {ratio} | {diff} | "
                     f"{len(point.errors)} | {steal} |")
    return "\n".join(lines)
