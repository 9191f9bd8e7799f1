"""`neo-serve bench load`: a bounded load test of the served path on loopback.

Starts a local Ray + Serve (HTTP on 127.0.0.1, a free port), deploys `neo_serve.app.build_app`
(the bundled demo model by default, no playground) and fires `--concurrency` (200) streaming
`POST /v1/completions` requests at once, `--rounds` (3) times. Every request asks for
`--max-tokens` (32) greedy tokens with `ignore_eos`, so its answer is known: before the first
round, each distinct prompt is sent alone once (the unloaded reference). Each request under load
ends as exactly one of:

- completed: 200, an event stream of JSON events ending in `data: [DONE]`, finish_reason
  "length", exactly max_tokens token ids (and usage saying so);
- wrong: completed, but its text or token ids differ from the unloaded reference;
- refused: refused cleanly, i.e. 429 or 503 with an OpenAI error JSON body (and, for 429, a
  Retry-After header): the client knows to retry;
- lost: anything else (another status, a malformed or truncated stream, an error event after
  the 200, a stream without [DONE], a connection error, or no answer within `--timeout-s` of
  the round's start).

After each round, once the service is idle, the pipeline's stats (through the router's handle)
must show no running, waiting or tracked request and every KV block free, and the resident
memory of the pipeline replica, its stage actors (with --stages 2), the router replica and
Serve's HTTP proxy is read. The run fails (exit code 1) on any lost or wrong request, on any
leftover sequence or KV block, or when a process's RSS grows more than `--max-rss-growth-mib`
from round 1 to the last round. Serve and Ray are shut down at the end, whatever happens.

The library functions (`load_app_args`, `run_load_rounds`, ...) are what tests call against an
application they deployed themselves.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from neo_serve.bench.serve_bench import deployed, format_ms, percentile, ray_serve, sigterm_as_interrupt

LOAD_APP = "neo-serve-load"
MIB = 2**20
# Distinct prompts, cycled over a round's requests: each has an unloaded reference answer.
PROMPTS = [
    "def hello_world():",
    "import os\nimport sys\n\n",
    "class Foo(object):\n    def __init__(self",
    "for i in range(10):\n",
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "with open(path) as f:\n",
    "try:\n    import json\nexcept ImportError:\n",
    "if __name__ == \"__main__\":\n",
]


# ---- one request ------------------------------------------------------------------------------
@dataclass
class LoadResult:
    """One request as its client saw it. Times are seconds after the request was sent."""

    prompt_index: int
    outcome: str = "lost"  # completed | wrong | refused | lost
    status: int | None = None
    reason: str | None = None  # why it is refused, lost or wrong
    ttft_s: float | None = None
    latency_s: float | None = None
    tokens: int = 0
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    retry_after: str | None = None

    def raw(self) -> dict[str, Any]:
        """JSON-ready, without the generated text and ids (the references hold those)."""
        out = asdict(self)
        del out["text"], out["token_ids"]
        return out


def request_body(model: str, prompt: str, max_tokens: int) -> dict[str, Any]:
    return {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}, "return_token_ids": True}


async def stream_completion(http: Any, url: str, model: str, prompt_index: int, prompt: str,
                            max_tokens: int) -> LoadResult:
    """Send one streaming request and classify its answer (completed / refused / lost; `wrong`
    is decided later against the reference)."""
    result = LoadResult(prompt_index)
    sent = time.perf_counter()
    try:
        async with http.stream("POST", url, json=request_body(model, prompt, max_tokens)) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = await response.aread()
                result.latency_s = time.perf_counter() - sent
                _classify_refusal(result, response.status_code, response.headers, body)
                return result
            await _read_stream(response, result, sent, max_tokens)
    except Exception as exc:  # noqa: BLE001 - connection errors etc. are a measurement: lost
        result.outcome, result.reason = "lost", f"{type(exc).__name__}: {exc}"[:300]
    result.latency_s = time.perf_counter() - sent
    return result


def _classify_refusal(result: LoadResult, status: int, headers: Any, body: bytes) -> None:
    """A clean refusal is 429/503 with OpenAI's error JSON (429: and Retry-After); else lost."""
    result.retry_after = headers.get("retry-after")
    try:
        error = json.loads(body)["error"]
        message_ok = isinstance(error["message"], str) and isinstance(error["type"], str)
    except (ValueError, KeyError, TypeError):
        message_ok = False
    if status not in (429, 503):
        result.outcome, result.reason = "lost", f"HTTP {status}: {body[:300]!r}"
    elif not message_ok:
        result.outcome, result.reason = "lost", f"HTTP {status} without an OpenAI error body: {body[:300]!r}"
    elif status == 429 and not (result.retry_after or "").isdigit():
        result.outcome, result.reason = "lost", f"HTTP 429 without a Retry-After header: {body[:300]!r}"
    else:
        result.outcome, result.reason = "refused", f"HTTP {status}: {json.loads(body)['error']['message'][:200]}"


async def _read_stream(response: Any, result: LoadResult, sent: float, max_tokens: int) -> None:
    """Parse server-sent events; decide completed or lost."""
    ended = False
    finish = usage = None
    texts: list[str] = []
    async for line in response.aiter_lines():
        if not line:
            continue
        if ended:
            result.reason = f"data after [DONE]: {line[:200]!r}"
            return
        if not line.startswith("data: "):
            result.reason = f"malformed SSE line {line[:200]!r}"
            return
        data = line[len("data: "):]
        if data == "[DONE]":
            ended = True
            continue
        try:
            event = json.loads(data)
        except ValueError:
            result.reason = f"malformed event {data[:200]!r}"
            return
        if "error" in event:  # after the 200: the client gets a partial answer
            result.reason = f"error event mid-stream: {event['error']}"[:300]
            return
        for choice in event.get("choices", []):
            ids = choice.get("token_ids") or []
            if ids and result.ttft_s is None:
                result.ttft_s = time.perf_counter() - sent
            result.token_ids.extend(ids)
            texts.append(choice.get("text") or "")
            finish = choice.get("finish_reason") or finish
        usage = event.get("usage") or usage
    result.text = "".join(texts)
    result.tokens = len(result.token_ids)
    if not ended:
        result.reason = "stream ended without data: [DONE]"
    elif finish != "length":
        result.reason = f"finish_reason {finish!r}, expected 'length'"
    elif result.tokens != max_tokens:
        result.reason = f"{result.tokens} tokens streamed, expected {max_tokens}"
    elif usage is None or usage.get("completion_tokens") != max_tokens:
        result.reason = f"usage {usage} disagrees with {max_tokens} tokens"
    else:
        result.outcome = "completed"


# ---- a round ----------------------------------------------------------------------------------
async def fire(url: str, model: str, prompts: list[str], *, concurrency: int, max_tokens: int,
               timeout_s: float) -> tuple[list[LoadResult], float]:
    """`concurrency` streaming requests sent at once (prompts cycled). A request without its
    whole answer `timeout_s` after the round started is lost. Returns the results (in sending
    order) and the round's wall time."""
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 60.0), pool=timeout_s)
    started = time.perf_counter()
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:
        async def one(index: int) -> LoadResult:
            prompt_index = index % len(prompts)
            remaining = max(0.0, started + timeout_s - time.perf_counter())
            try:
                return await asyncio.wait_for(
                    stream_completion(http, url, model, prompt_index, prompts[prompt_index], max_tokens), remaining)
            except asyncio.TimeoutError:
                return LoadResult(prompt_index, reason=f"no complete answer within {timeout_s:g} s of the round's "
                                                       "start", latency_s=time.perf_counter() - started)

        results = await asyncio.gather(*(one(i) for i in range(concurrency)))
    return list(results), time.perf_counter() - started


def fetch_references(url: str, model: str, prompts: list[str], *, max_tokens: int,
                     timeout_s: float) -> list[dict[str, Any]]:
    """Each prompt sent alone (nothing else running): its greedy text and token ids."""
    references = []
    for prompt in prompts:
        [result], _ = asyncio.run(fire(url, model, [prompt], concurrency=1, max_tokens=max_tokens,
                                       timeout_s=timeout_s))
        if result.outcome != "completed":
            raise RuntimeError(f"the unloaded reference request for {prompt!r} failed: {result.reason}")
        references.append({"prompt": prompt, "text": result.text, "token_ids": result.token_ids})
    return references


def check_against_references(results: list[LoadResult], references: list[dict[str, Any]]) -> None:
    """A completed request whose text or ids differ from its prompt's unloaded answer is wrong."""
    for result in results:
        if result.outcome != "completed":
            continue
        expected = references[result.prompt_index]
        if result.token_ids != expected["token_ids"] or result.text != expected["text"]:
            first = next((i for i, (a, b) in enumerate(zip(result.token_ids, expected["token_ids"])) if a != b),
                         min(len(result.token_ids), len(expected["token_ids"])))
            result.outcome = "wrong"
            result.reason = (f"differs from the unloaded reference from token {first}: got {result.text!r}, "
                             f"expected {expected['text']!r}")[:400]


# ---- the service's state ----------------------------------------------------------------------
IDLE_KEYS = ("running", "waiting", "requests", "streams")


def leftovers(stats: dict[str, Any]) -> list[str]:
    """What an idle pipeline should not have: sequences, requests, streams, used KV blocks."""
    found = [f"{key}={stats[key]}" for key in IDLE_KEYS if stats.get(key)]
    if stats.get("free_kv_blocks") != stats.get("total_kv_blocks"):
        found.append(f"free_kv_blocks={stats.get('free_kv_blocks')} of {stats.get('total_kv_blocks')}")
    return found


def pipeline_stats(app_name: str, model: str) -> dict[str, Any]:
    from ray import serve

    return serve.get_app_handle(app_name).stats.remote().result(timeout_s=60)[model]


def wait_idle(app_name: str, model: str, *, timeout_s: float) -> tuple[dict[str, Any], float]:
    """Poll the pipeline's stats until nothing is left over (aborted streams are cleaned up a
    moment after their client is gone), at most `timeout_s`. Returns the last stats and how long
    it took."""
    started = time.monotonic()
    while True:
        stats = pipeline_stats(app_name, model)
        if not leftovers(stats) or time.monotonic() - started > timeout_s:
            return stats, time.monotonic() - started
        time.sleep(0.1)


def _actor_table() -> list[dict[str, Any]]:
    """Alive actors from Ray's GCS (the state API would need the dashboard)."""
    try:
        from ray._private.state import actors

        return [a for a in actors().values() if a.get("State") == "ALIVE"]
    except Exception:  # noqa: BLE001 - memory of the other processes is a bonus, not essential
        return []


def _rss(pid: int | None) -> int | None:
    import psutil

    try:
        return psutil.Process(pid).memory_info().rss if pid else None
    except (psutil.Error, ValueError):
        return None


def memory_snapshot(app_name: str, stats: dict[str, Any]) -> dict[str, int | None]:
    """RSS in bytes of the pipeline replica (from its stats), each of its stage actors
    ("stage0", ...; with --stages 2), the router replica and Serve's HTTP proxy (found in Ray's
    actor table, read with psutil: the cluster is local). None where unknown."""
    actors = _actor_table()

    def pids(match: Any) -> list[int]:
        return [a["Pid"] for a in actors if a.get("Pid") and match(a)]

    def one(found: list[int]) -> int | None:
        return _rss(found[0]) if len(found) == 1 else None  # several replicas: not this test's shape

    snapshot: dict[str, int | None] = {"pipeline": stats.get("rss_bytes")}
    if snapshot["pipeline"] is None:  # stats without memory: find the replica's process
        snapshot["pipeline"] = one(pids(lambda a: a.get("ActorClassName", "").startswith(
            f"ServeReplica:{app_name}:Pipeline-")))
    prefix = f"neo-serve-stage:{app_name}:"
    stages = sorted((a["Name"].rsplit(":", 1)[-1], a["Pid"]) for a in actors
                    if (a.get("Name") or "").startswith(prefix) and a.get("Pid"))
    for index, pid in stages:
        snapshot[f"stage{index}"] = _rss(pid)
    snapshot["router"] = one(pids(lambda a: a.get("ActorClassName") == f"ServeReplica:{app_name}:Router"))
    snapshot["proxy"] = one(pids(lambda a: a.get("ActorClassName") == "ProxyActor"))
    return snapshot


# ---- rounds -----------------------------------------------------------------------------------
def summarize_round(index: int, results: list[LoadResult], seconds: float) -> dict[str, Any]:
    counts = {outcome: sum(r.outcome == outcome for r in results)
              for outcome in ("completed", "wrong", "refused", "lost")}
    done = [r for r in results if r.outcome in ("completed", "wrong")]
    ttfts = [r.ttft_s for r in done if r.ttft_s is not None]
    refusals = [r.latency_s for r in results if r.outcome == "refused" and r.latency_s is not None]
    latencies = [r.latency_s for r in done if r.latency_s is not None]
    tokens = sum(r.tokens for r in done)
    return {
        "round": index, "requests": len(results), **counts, "seconds": seconds, "generated_tokens": tokens,
        "tokens_per_s": tokens / seconds if seconds > 0 else 0.0,
        "ttft_s": {"p50": percentile(ttfts, 50), "p99": percentile(ttfts, 99)},
        "latency_s": {"p50": percentile(latencies, 50), "max": max(latencies, default=None)},
        "refusal_latency_s": {"p50": percentile(refusals, 50), "max": max(refusals, default=None)},
        # HTTP statuses (0: no response at all)
        "statuses": {str(s): sum((r.status or 0) == s for r in results)
                     for s in sorted({r.status or 0 for r in results})},
        "problems": [f"request {i} ({r.outcome}): {r.reason}" for i, r in enumerate(results)
                     if r.outcome in ("lost", "wrong")][:20],
        "raw": [r.raw() for r in results],
    }


def run_load_rounds(base_url: str, app_name: str, model: str, *, concurrency: int = 200, rounds: int = 3,
                    max_tokens: int = 32, timeout_s: float = 300.0, settle_timeout_s: float = 30.0,
                    prompts: list[str] | None = None, verbose: bool = True,
                    results: dict[str, Any] | None = None) -> dict[str, Any]:
    """The load test against a deployed application (`base_url` + its route prefix): references
    first, then `rounds` rounds of `concurrency` requests, each followed by the idle check and
    the memory snapshot. Fills and returns `results` ("references", "rounds"; judge them with
    `judge`), so that an error part-way keeps what was measured."""
    prompts = list(prompts or PROMPTS)
    url = f"{base_url.rstrip('/')}/v1/completions"
    results = {} if results is None else results
    results.setdefault("rounds", [])
    results["references"] = fetch_references(url, model, prompts, max_tokens=max_tokens, timeout_s=timeout_s)
    references = results["references"]
    for index in range(1, rounds + 1):
        outcomes, seconds = asyncio.run(fire(url, model, prompts, concurrency=concurrency, max_tokens=max_tokens,
                                             timeout_s=timeout_s))
        check_against_references(outcomes, references)
        summary = summarize_round(index, outcomes, seconds)
        stats, settle = wait_idle(app_name, model, timeout_s=settle_timeout_s)
        summary["idle_after_s"] = settle
        summary["pipeline"] = {key: stats.get(key) for key in
                               (*IDLE_KEYS, "free_kv_blocks", "total_kv_blocks", "num_preemptions", "num_steps",
                                "num_recoveries", "failed", "replica", "pid")}
        summary["leftovers"] = leftovers(stats)
        summary["rss_bytes"] = memory_snapshot(app_name, stats)
        results["rounds"].append(summary)
        if verbose:
            print(format_round(summary), flush=True)
    return results


def judge(results: dict[str, Any], *, max_rss_growth_mib: float) -> list[str]:
    """Every reason to fail the run: lost or wrong requests, leftovers after a round, RSS growth
    from the first round to the last above the bound."""
    problems = []
    for summary in results["rounds"]:
        if summary["lost"] or summary["wrong"]:
            problems.append(f"round {summary['round']}: {summary['lost']} lost, {summary['wrong']} wrong; e.g. "
                            f"{summary['problems'][0]}")
        if summary["leftovers"]:
            problems.append(f"round {summary['round']}: still {', '.join(summary['leftovers'])} "
                            f"{summary['idle_after_s']:.0f} s after the round")
    if not results["rounds"]:
        return problems + ["no round was run"]
    first, last = results["rounds"][0], results["rounds"][-1]
    for process in first["rss_bytes"]:  # each process on its own
        before, after = first["rss_bytes"][process], last["rss_bytes"].get(process)
        if before is not None and after is not None and (after - before) / MIB > max_rss_growth_mib:
            problems.append(f"{process} RSS grew {(after - before) / MIB:.0f} MiB from round {first['round']} "
                            f"to round {last['round']} (bound {max_rss_growth_mib:g} MiB)")
    return problems


# ---- output -----------------------------------------------------------------------------------
HEADER = ("| round | sent | completed | refused | lost | wrong | tokens/s | TTFT p50 | TTFT p99 | refused in (max) | "
          "pipeline RSS MiB | stages RSS MiB | router RSS MiB | proxy RSS MiB | KV blocks free/total | "
          "left over |\n" + "|---" * 16 + "|")


def _mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.0f}"


def _stages_mib(rss: dict[str, int | None]) -> str:
    return " + ".join(_mib(value) for key, value in rss.items() if key.startswith("stage")) or "-"


def _s_as_ms(value: float | None) -> str:
    return format_ms(None if value is None else value * 1e3)


def format_round(summary: dict[str, Any]) -> str:
    rss, stats = summary["rss_bytes"], summary["pipeline"]
    return (f"| {summary['round']} | {summary['requests']} | {summary['completed']} | {summary['refused']} | "
            f"{summary['lost']} | {summary['wrong']} | {summary['tokens_per_s']:.0f} | "
            f"{_s_as_ms(summary['ttft_s']['p50'])} | {_s_as_ms(summary['ttft_s']['p99'])} | "
            f"{_s_as_ms(summary['refusal_latency_s']['max'])} | {_mib(rss['pipeline'])} | {_stages_mib(rss)} | "
            f"{_mib(rss['router'])} | {_mib(rss['proxy'])} | {stats['free_kv_blocks']}/{stats['total_kv_blocks']} | "
            f"{', '.join(summary['leftovers']) or 'nothing'} |")


def format_report(results: dict[str, Any]) -> str:
    config = results["config"]
    lines = [f"## Load: {config['concurrency']} concurrent streaming requests x {config['rounds']} rounds", "",
             f"Model {config['model']} ({config['stages']} stage(s), {config['dtype']}), {config['max_tokens']} "
             f"greedy tokens per request (ignore_eos), {len(results.get('references', []))} distinct prompts; "
             f"max_ongoing_requests {config['max_ongoing_requests']}, max_queued_requests "
             f"{config['max_queued_requests']}, kv_cache_tokens {config['kv_cache_tokens']}, max_num_seqs "
             f"{config['max_num_seqs']}. Machine: {results['machine']['logical_cpus']} logical CPUs, load average "
             f"{results['machine'].get('load_average_at_start')} at start.", "",
             "Command: `" + results["command"] + "`", "", HEADER]
    lines += [format_round(summary) for summary in results.get("rounds", [])]
    lines.append("")
    for problem in results.get("problems", []):
        lines.append(f"**Problem:** {problem}")
    verdict = "PASS" if results.get("ok") else "FAIL"
    lines.append(f"Result: {'INTERRUPTED (partial results)' if results.get('interrupted') else verdict}")
    return "\n".join(lines) + "\n"


# ---- the command ------------------------------------------------------------------------------
def load_app_args(args: argparse.Namespace) -> dict[str, Any]:
    """The `build_app` args of the load test's application (one model, no playground)."""
    model: dict[str, Any] = {"num_stages": args.stages, "dtype": args.dtype, "cpus_per_stage": args.cpus_per_stage,
                             "max_ongoing_requests": args.max_ongoing_requests,
                             "max_queued_requests": args.max_queued_requests}
    if args.checkpoint:
        model["checkpoint"] = args.checkpoint
    for option in ("kv_cache_tokens", "max_num_seqs"):
        if getattr(args, option) is not None:
            model[option] = getattr(args, option)
    return {"models": [model], "playground": False}


def ray_cpus_for(app_args: dict[str, Any]) -> int:
    """Logical CPUs for a local Ray: what the app reserves (`AppArgs.cpus_reserved`), one spare."""
    from neo_serve.serve.config import parse_app_args

    return math.ceil(parse_app_args(app_args).cpus_reserved()) + 1


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """Add `neo-serve bench load`'s options to `parser`."""
    parser.add_argument("--checkpoint", default=None, help="checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--stages", type=int, default=1, choices=[1, 2], help="pipeline stages (default 1)")
    parser.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"],
                        help="weights (default float32)")
    parser.add_argument("--cpus-per-stage", type=float, default=1.0, help="CPUs reserved per stage (default 1)")
    parser.add_argument("--concurrency", type=_positive, default=200,
                        help="streaming requests sent at once per round (default 200)")
    parser.add_argument("--rounds", type=_positive, default=3, help="rounds (default 3)")
    parser.add_argument("--max-tokens", type=_positive, default=32, help="greedy tokens per request (default 32)")
    parser.add_argument("--timeout-s", type=float, default=300.0,
                        help="a request without its whole answer this long after its round started is lost "
                             "(default 300)")
    parser.add_argument("--max-ongoing-requests", type=_positive, default=1024,
                        help="the pipeline's max_ongoing_requests (default 1024)")
    parser.add_argument("--max-queued-requests", type=int, default=1024,
                        help="the pipeline's max_queued_requests: past it requests are refused with 429 "
                             "(default 1024; -1: no limit)")
    parser.add_argument("--kv-cache-tokens", type=_positive, default=None,
                        help="KV cache slots per stage (default: the app's, 32768)")
    parser.add_argument("--max-num-seqs", type=_positive, default=None,
                        help="most sequences running at once (default: the app's, 256)")
    parser.add_argument("--max-rss-growth-mib", type=float, default=200.0,
                        help="fail when a process's RSS grows more than this from round 1 to the last (default 200)")
    parser.add_argument("--settle-timeout-s", type=float, default=30.0,
                        help="how long after a round the pipeline may take to become idle (default 30)")
    parser.add_argument("--deploy-timeout-s", type=float, default=600.0,
                        help="seconds for the application to load and run (default 600)")
    parser.add_argument("--json", default=None, help="write all numbers (per request too) here")


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def run_load_test(args: argparse.Namespace) -> int:
    """Run the load test on a local Ray; 0 if nothing was lost, wrong, left over or leaking,
    1 otherwise, 2 for invalid arguments, 130 when interrupted."""
    from neo_serve.app import build_app
    from neo_serve.serve.config import AppConfigError, parse_app_args

    app_args = load_app_args(args)
    try:
        model = parse_app_args(app_args).models[0]
        app = build_app(app_args)
    except AppConfigError as exc:
        print(f"neo-serve bench load: {exc}", file=sys.stderr)
        return 2
    results: dict[str, Any] = {
        "command": " ".join(["neo-serve", "bench", "load", *sys.argv[3:]]) if sys.argv[1:3] == ["bench", "load"]
        else " ".join(sys.argv),
        "machine": {"logical_cpus": os.cpu_count(), "python": platform.python_version(),
                    "platform": platform.platform(), "load_average_at_start": [round(v, 2) for v in os.getloadavg()]},
        "config": {"model": model.served_name, "checkpoint": model.checkpoint_path, "stages": model.num_stages,
                   "dtype": model.dtype, "concurrency": args.concurrency, "rounds": args.rounds,
                   "max_tokens": args.max_tokens, "timeout_s": args.timeout_s,
                   "max_ongoing_requests": model.max_ongoing_requests,
                   "max_queued_requests": model.max_queued_requests, "kv_cache_tokens": model.kv_cache_tokens,
                   "max_num_seqs": model.max_num_seqs, "max_rss_growth_mib": args.max_rss_growth_mib},
        "rounds": [], "problems": [], "ok": False, "interrupted": False,
    }
    print(f"load test: {json.dumps(results['config'])}", flush=True)
    started = time.perf_counter()
    with sigterm_as_interrupt():
        try:
            with ray_serve(ray_cpus_for(app_args)) as base_url:
                with deployed(app, LOAD_APP, timeout=args.deploy_timeout_s):
                    print(f"deployed in {time.perf_counter() - started:.1f} s; sending the unloaded references, "
                          "then the rounds", flush=True)
                    print(HEADER, flush=True)
                    run_load_rounds(base_url, LOAD_APP, model.served_name, concurrency=args.concurrency,
                                    rounds=args.rounds, max_tokens=args.max_tokens, timeout_s=args.timeout_s,
                                    settle_timeout_s=args.settle_timeout_s, results=results)
            results["problems"] = judge(results, max_rss_growth_mib=args.max_rss_growth_mib)
        except KeyboardInterrupt:
            results["interrupted"] = True
            print("interrupted: Serve and Ray are shut down", file=sys.stderr)
        except Exception as exc:  # noqa: BLE001 - report it (Serve and Ray are already down)
            measured = judge(results, max_rss_growth_mib=args.max_rss_growth_mib) if results["rounds"] else []
            results["problems"] = [*measured, f"{type(exc).__name__}: {exc}"]
        finally:
            results["seconds"] = time.perf_counter() - started
            results["ok"] = bool(results["rounds"]) and not results["problems"] and not results["interrupted"]
            print(format_report(results), flush=True)
            if args.json:
                Path(args.json).parent.mkdir(parents=True, exist_ok=True)
                Path(args.json).write_text(json.dumps(results, indent=1))
                print(f"wrote {args.json}")
    if results["interrupted"]:
        return 130
    return 0 if results["ok"] else 1
