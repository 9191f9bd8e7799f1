"""Bounded load on loopback: 200 concurrent streaming requests against the demo app.

One Ray cluster for the module and the same library code as `neo-serve bench load`
(`neo_serve.bench.load_test`): every request completes with exactly its tokens, and greedy text
equal to the same prompt's answer when sent alone, or is refused cleanly (429/503, OpenAI error
JSON, Retry-After); none is lost. After each round the pipeline holds no sequence and every KV
block is free, and its memory does not grow past the bound. Speed is not asserted: the CPU is
shared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import threading

import httpx
import pytest
from ray import serve

from conftest_serve import apps_removed_afterwards
from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.bench.load_test import (LoadResult, _classify_refusal, _read_stream, add_load_arguments,
                                       check_against_references, judge, load_app_args, run_load_rounds)
from neo_serve.serve.config import DEMO_CHECKPOINT

pytestmark = pytest.mark.timeout(300)

CONCURRENCY = 200
MAX_TOKENS = 32
RSS_BOUND_MIB = 200.0


def load_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    return parser.parse_args(["--checkpoint", str(DEMO_CHECKPOINT), "--concurrency", str(CONCURRENCY),
                              "--max-tokens", str(MAX_TOKENS), "--timeout-s", "180", *argv])


def deploy(args: argparse.Namespace, name: str, prefix: str, base_url: str) -> str:
    """The load test's application, as `neo-serve bench load` builds it; returns its URL."""
    serve.run(build_app(load_app_args(args)), name=name, route_prefix=prefix)
    return f"{base_url}{prefix}"


@pytest.fixture(scope="module")
def base_url(shared_serve):
    with apps_removed_afterwards():
        yield shared_serve.url


def assert_round_clean(summary: dict) -> None:
    """Nothing lost or wrong; the pipeline idle and its KV cache empty afterwards."""
    assert summary["lost"] == 0 and summary["wrong"] == 0, summary["problems"]
    assert summary["completed"] + summary["refused"] == summary["requests"] == CONCURRENCY
    assert summary["leftovers"] == [], summary["pipeline"]
    stats = summary["pipeline"]
    assert stats["running"] == stats["waiting"] == stats["requests"] == stats["streams"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"] > 0
    assert stats["failed"] is None and stats["num_recoveries"] == 0
    for raw in summary["raw"]:
        if raw["outcome"] == "completed":
            assert raw["status"] == 200 and raw["tokens"] == MAX_TOKENS and raw["ttft_s"] is not None


# ---- the classifier and the verdict, without a cluster ---------------------------------------
class FakeStream:
    def __init__(self, lines: list[str]) -> None:
        self.lines = lines

    async def aiter_lines(self):
        for line in self.lines:
            yield line


def classify_stream(lines: list[str], max_tokens: int = 2) -> LoadResult:
    result = LoadResult(0)
    asyncio.run(_read_stream(FakeStream(lines), result, 0.0, max_tokens))
    return result


def event(token_ids: list[int], finish: str | None = None, usage: dict | None = None) -> str:
    choices = [{"index": 0, "text": "x" * len(token_ids), "token_ids": token_ids, "finish_reason": finish}]
    return "data: " + json.dumps({"choices": choices if usage is None else [], "usage": usage})


def test_stream_classification():
    usage = {"completion_tokens": 2}
    done = [event([1]), "", event([2], "length"), "", event([], usage=usage), "", "data: [DONE]", ""]
    assert classify_stream(done).outcome == "completed"
    assert classify_stream(done).token_ids == [1, 2] and classify_stream(done).text == "xx"
    for lines, reason in [
        (done[:-2], "without data: [DONE]"),
        ([event([1]), 'data: {"error": {"message": "boom"}}', "data: [DONE]"], "error event"),
        ([event([1]), "data: {not json", "data: [DONE]"], "malformed event"),
        ([event([1]), "event: ping", "data: [DONE]"], "malformed SSE line"),
        ([event([1], "length"), event([], usage={"completion_tokens": 1}), "data: [DONE]"], "1 tokens streamed"),
        ([event([1]), event([2], "stop"), event([], usage=usage), "data: [DONE]"], "finish_reason 'stop'"),
        ([event([1]), event([2], "length"), "data: [DONE]"], "usage None"),
    ]:
        result = classify_stream(lines)
        assert result.outcome == "lost" and reason in result.reason, (lines, result.reason)


def test_a_completion_that_differs_from_its_reference_is_wrong():
    references = [{"prompt": "a", "text": " b c", "token_ids": [1, 2]}, {"prompt": "d", "text": " e", "token_ids": [3]}]
    right, wrong_ids, wrong_text, refused = (LoadResult(0), LoadResult(1), LoadResult(0), LoadResult(1))
    for result, text, ids in ((right, " b c", [1, 2]), (wrong_ids, " e", [4]), (wrong_text, " b x", [1, 2])):
        result.outcome, result.text, result.token_ids = "completed", text, ids
    refused.outcome = "refused"
    check_against_references([right, wrong_ids, wrong_text, refused], references)
    assert [r.outcome for r in (right, wrong_ids, wrong_text, refused)] == ["completed", "wrong", "wrong", "refused"]
    assert "from token 0" in wrong_ids.reason and "from token 2" in wrong_text.reason


def test_refusal_classification():
    error = json.dumps({"error": {"message": "busy", "type": "rate_limit_error", "param": None, "code": None}})
    cases = [(429, {"retry-after": "1"}, error, "refused"), (503, {}, error, "refused"),
             (429, {}, error, "lost"), (503, {}, "upstream connect error", "lost"),
             (500, {}, error, "lost"), (400, {"retry-after": "1"}, error, "lost")]
    for status, headers, body, outcome in cases:
        result = LoadResult(0)
        _classify_refusal(result, status, headers, body.encode())
        assert result.outcome == outcome, (status, headers, body, result.reason)


def test_verdict():
    def round_(index: int, *, lost: int = 0, leftovers: tuple[str, ...] = (), rss_mib: int = 500) -> dict:
        return {"round": index, "lost": lost, "wrong": 0, "problems": ["request 3 (lost): HTTP 500"] if lost else [],
                "leftovers": list(leftovers), "idle_after_s": 30.0,
                "rss_bytes": {"pipeline": rss_mib * 2**20, "router": 300 * 2**20, "proxy": None}}

    assert judge({"rounds": [round_(1), round_(2, rss_mib=690)]}, max_rss_growth_mib=200) == []
    [problem] = judge({"rounds": [round_(1), round_(2, rss_mib=710)]}, max_rss_growth_mib=200)
    assert "pipeline RSS grew 210 MiB" in problem
    [problem] = judge({"rounds": [round_(1, lost=1), round_(2)]}, max_rss_growth_mib=200)
    assert "round 1: 1 lost" in problem
    [problem] = judge({"rounds": [round_(1), round_(2, leftovers=("running=3",))]}, max_rss_growth_mib=200)
    assert "round 2: still running=3" in problem
    assert judge({"rounds": []}, max_rss_growth_mib=200) == ["no round was run"]


# ---- 200 concurrent streams on Ray Serve ------------------------------------------------------
def test_200_concurrent_streams_complete_exactly_and_memory_stays_bounded(base_url):
    # A small KV cache (2048 slots: about 40 of the 200 sequences at once), so that most
    # requests wait for KV and sequences are admitted as others finish.
    args = load_args("--kv-cache-tokens", "2048", "--rounds", "2")
    url = deploy(args, "neo-load", "/load", base_url)
    try:
        results = run_load_rounds(url, "neo-load", "demo_model", concurrency=CONCURRENCY, rounds=args.rounds,
                                  max_tokens=MAX_TOKENS, timeout_s=args.timeout_s, verbose=False)
        references = results["references"]
        assert len(references) >= 4 and all(len(r["token_ids"]) == MAX_TOKENS for r in references)
        assert len({r["text"] for r in references}) > 1  # distinct prompts, distinct answers
        # The run marks a completed request "wrong" unless it equals its prompt's unloaded answer
        # from the server; that answer is the offline engine's (itself checked against transformers).
        offline = LLM(str(DEMO_CHECKPOINT), dtype=args.dtype).generate(
            [r["prompt"] for r in references], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True))
        assert [r["token_ids"] for r in references] == [o.outputs[0].token_ids for o in offline]
        assert [r["text"] for r in references] == [o.outputs[0].text for o in offline]
        for summary in results["rounds"]:
            assert_round_clean(summary)
            # Nothing refuses below the queue limits: every request completes.
            assert summary["completed"] == CONCURRENCY, summary["statuses"]
            assert summary["generated_tokens"] == CONCURRENCY * MAX_TOKENS
        first, last = (r["rss_bytes"] for r in (results["rounds"][0], results["rounds"][-1]))
        assert first["pipeline"] is not None and first["router"] is not None
        assert last["pipeline"] - first["pipeline"] <= RSS_BOUND_MIB * 2**20, (first, last)
        assert judge(results, max_rss_growth_mib=RSS_BOUND_MIB) == []
    finally:
        serve.delete("neo-load")


def test_past_the_queue_limit_requests_are_refused_at_once(base_url):
    """4 running + 4 queued per pipeline: most of the 200 are refused with 429 and Retry-After
    without waiting for a slot; the admitted ones complete; nothing is lost."""
    args = load_args("--max-ongoing-requests", "4", "--max-queued-requests", "4", "--max-tokens", "128",
                     "--rounds", "1")
    url = deploy(args, "neo-load-busy", "/busy", base_url)
    assert httpx.get(f"{url}/health", timeout=30).status_code == 200
    # A readiness probe (Kubernetes') meanwhile: a full queue must not make the router unready.
    health: list[int] = []
    probing = threading.Event()

    def probe() -> None:
        while not probing.is_set():
            health.append(httpx.get(f"{url}/health", timeout=30).status_code)
            probing.wait(0.25)

    prober = threading.Thread(target=probe, daemon=True)
    prober.start()
    try:
        results = run_load_rounds(url, "neo-load-busy", "demo_model", concurrency=CONCURRENCY, rounds=1,
                                  max_tokens=args.max_tokens, timeout_s=args.timeout_s, verbose=False)
        probing.set()
        prober.join(timeout=60)
        assert len(health) >= 4 and set(health) == {200}, health
        [summary] = results["rounds"]
        assert summary["lost"] == 0 and summary["wrong"] == 0, summary["problems"]
        assert summary["completed"] + summary["refused"] == CONCURRENCY
        assert summary["completed"] >= 8 and summary["refused"] >= CONCURRENCY // 2, summary["statuses"]
        assert summary["leftovers"] == [], summary["pipeline"]
        refused = [r for r in summary["raw"] if r["outcome"] == "refused"]
        completed = [r for r in summary["raw"] if r["outcome"] == "completed"]
        assert all(r["status"] == 429 and r["retry_after"] == "1" for r in refused)
        assert all("capacity" in r["reason"] for r in refused)
        assert all(r["tokens"] == 128 for r in completed)
        # At once: a refusal does not wait for a slot. The admitted requests queued behind the
        # first 4 take at least two generations of 128 tokens; no refusal takes that long.
        assert max(r["latency_s"] for r in refused) < max(r["latency_s"] for r in completed)
        assert judge(results, max_rss_growth_mib=RSS_BOUND_MIB) == []
    finally:
        probing.set()
        serve.delete("neo-load-busy")
