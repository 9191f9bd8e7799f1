"""`neo-serve bench serve` end to end at tiny sizes: real Ray, real HTTP, the real baseline.

One run (the demo model, N = 2, a few tokens per request) through the offline engine, the
neo-serve app (one stage: the quickest to deploy; test_serve_app covers pipelines) and the
transformers `@serve.batch` baseline; every request must come back with exactly its max_tokens,
the numbers must be real, each served point must follow its own offline point and precede the
baseline's point of its N (paired), and Ray must be gone afterwards.
"""

from __future__ import annotations

import argparse
import json

import pytest
import ray

from neo_serve.bench.machine import StealMeter
from neo_serve.bench.serve_bench import (BenchRequest, RequestRecord, add_serve_bench_arguments, chunk_gaps,
                                         chunk_stats, client_rounds, cpus_per_stage, format_markdown, inter_token_gaps,
                                         make_requests, percentile, ray_cpus, requests_per_point, run_serve_bench,
                                         served_configs, served_system)
from conftest_serve import session_processes, user_environ
from neo_serve.cli import main as cli_main

ARGV = ["--models", "demo", "--clients", "1,2", "--stages", "1", "--prompt-len", "8:24", "--max-tokens", "3:6",
        "--min-requests", "3", "--request-timeout", "60"]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_bench_arguments(parser)
    return parser.parse_args(argv)


def test_workload_is_fixed_and_shaped_alike_across_vocabularies():
    small = make_requests(4096, 20, seed=3, prompt_len=(32, 256), new_tokens=(64, 128))
    large = make_requests(50304, 20, seed=3, prompt_len=(32, 256), new_tokens=(64, 128))
    assert small == make_requests(4096, 20, seed=3, prompt_len=(32, 256), new_tokens=(64, 128))
    assert [(len(r.prompt), r.max_tokens) for r in small] == [(len(r.prompt), r.max_tokens) for r in large]
    assert all(32 <= len(r.prompt) <= 256 and 64 <= r.max_tokens <= 128 for r in small)
    assert all(0 < t < 4096 for r in small for t in r.prompt)
    assert len({tuple(r.prompt) for r in small}) == 20


def test_paired_runs_take_one_n_at_a_time():
    assert client_rounds([1, 8, 32, 64], paired=True) == [[1], [8], [32], [64]]
    assert client_rounds([1, 8], paired=False) == [[1, 8]]


def test_statistics():
    assert percentile([3.0, 1.0, 2.0, 4.0], 50) == 2.5
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([], 50) is None
    # A chunk of 2 tokens arriving 0.4 s after the previous one counts as two gaps of 0.2 s.
    record = RequestRecord(prompt_tokens=4, max_tokens=4, sent=0.0, token_times=[1.0, 1.1, 1.5, 1.5])
    assert inter_token_gaps(record) == pytest.approx([0.1, 0.2, 0.2])
    assert requests_per_point(64, parse([])) == 128 and requests_per_point(1, parse([])) == 4


@pytest.mark.timeout(180)
def test_tiny_run_measures_every_system(tmp_path):
    out_json, out_md = tmp_path / "serve.json", tmp_path / "serve.md"
    # Sampled, as the playground's requests are: every system samples alike.
    # One N: each N deploys and deletes both apps again (~25 s); client_rounds' test covers the rounds.
    args = parse(ARGV + ["--clients", "2", "--json", str(out_json), "--markdown", str(out_md),
                         "--plots-dir", str(tmp_path), "--temperature", "0.8", "--top-p", "0.9"])
    assert run_serve_bench(args) == 0
    assert not ray.is_initialized()  # Ray is shut down at the end

    results = json.loads(out_json.read_text())
    assert results["failures"] == [] and not results["interrupted"]
    assert results["machine"]["cpu"] and results["machine"]["torch"] and results["machine"]["ray"]
    vocab = 4096  # the demo model's
    workload = make_requests(vocab, requests_per_point(2, args), seed=0, prompt_len=(8, 24), new_tokens=(3, 6))
    points = {(p["system"], p["clients"]): p for p in results["points"]}
    offline = "offline, paired with neo-serve 1 stage"
    # Paired: the served point right after the offline point of its N, and compared with it; the
    # baseline's point of that N right after the served ones.
    order = [(p["system"], p["clients"]) for p in results["points"]]
    assert order == [(offline, 2), ("neo-serve 1 stage", 2), ("baseline", 2)]
    assert results["workload"]["paired"] is True and results["workload"]["baseline_paired"] is True
    for (system, clients), point in points.items():
        expected: list[BenchRequest] = workload[:requests_per_point(clients, args)]
        assert point["model"] == "neo-demo"
        assert point["complete"], point["errors"]
        assert point["requests"] == len(expected) == len(point["raw"])
        assert point["generated_tokens"] == point["expected_tokens"] == sum(r.max_tokens for r in expected)
        assert sorted((r["prompt_tokens"], r["max_tokens"]) for r in point["raw"]) == \
            sorted((len(r.prompt), r.max_tokens) for r in expected)
        assert all(r["tokens"] == r["max_tokens"] and r["error"] is None for r in point["raw"])
        assert point["seconds"] > 0 and point["tokens_per_s"] > 0
        assert 0 <= point["cpu_steal"] <= 1  # /proc/stat's steal over the point
        assert point["tokens_per_s"] == pytest.approx(point["generated_tokens"] / point["seconds"])
        # The window is the requests' own: first sent to last done (no warm-up or deploy time).
        assert point["seconds"] == pytest.approx(max(r["done"] for r in point["raw"])
                                                 - min(r["sent"] for r in point["raw"]), abs=1e-5)
        if clients == 2:  # N clients really have N requests in flight at once
            first, second = sorted(point["raw"], key=lambda r: r["sent"])[:2]
            assert second["sent"] < first["done"], (system, first, second)
        assert 0 < point["ttft_ms"]["p50"] <= point["ttft_ms"]["p99"]
        assert point["latency_s"]["p50"] > 0
        if system == "baseline":  # not streamed: TTFT is the whole response, no inter-token latency
            assert point["itl_ms"]["p50"] is None
            assert point["baseline_batches"]["batches"] >= 1
        else:
            assert 0 < point["itl_ms"]["p50"] <= point["itl_ms"]["p99"]
            assert all(len(r["token_times"]) == r["tokens"] for r in point["raw"])

    report = out_md.read_text()
    assert results["workload"]["sampling"] == {"temperature": 0.8, "top_p": 0.9, "top_k": 0, "repetition_penalty": 1.0}
    assert "(`ignore_eos`, temperature 0.8, top_p 0.9, top_k 0, repetition_penalty 1)" in report
    assert "| chunk gap p50 | chunk gap p99 | tokens / chunk | all tokens | CPU steal |" in report
    # --from-json renders the same report from the saved numbers, measuring nothing.
    again = out_md.with_suffix(".again")
    assert cli_main(["bench", "serve", "--from-json", str(out_json), "--markdown", str(again)]) == 0
    without_plots = "\n".join(line for line in report.splitlines() if not line.startswith("![")).rstrip()
    assert again.read_text().rstrip() == without_plots
    assert "| neo-serve 1 stage | 2 |" in report and "| baseline | 2 |" in report and "Targets at N = 2" in report
    assert "| TTFT p50 served vs baseline | latency p50 served vs baseline |" in report
    assert "the baseline's right after the served points of its N" in report
    served, paired = points[("neo-serve 1 stage", 2)], points[(offline, 2)]
    vs_offline = f"{served['tokens_per_s'] / paired['tokens_per_s']:.2f}x"
    assert f"| neo-serve 1 stage | 2 | {served['requests']} | {served['tokens_per_s']:.1f} | {vs_offline} |" in report
    assert results["machine"]["cpu"] in report
    # matplotlib is in the test extra: the plots are always checked (a silent return skipped them).
    for name in ("serve_bench_tokens_per_s.png", "serve_bench_ttft_p50.png"):
        assert (tmp_path / name).read_bytes().startswith(b"\x89PNG")


def report_point(system: str, tokens_per_s: float, **extra) -> dict:
    """A point as the bench records it, at N = 64, for the report's tests."""
    ms = {"p50": 10.0, "p99": 20.0}
    return {"system": system, "model": "m", "clients": 64, "requests": 4, "tokens_per_s": tokens_per_s,
            "ttft_ms": ms, "itl_ms": ms, "complete": True, "cpu_steal": 0.0, **extra}


def report_input(points: list[dict], **workload) -> dict:
    """What format_markdown reads: the run's machine and workload, and `points`."""
    machine = {"cpu": "cpu", "logical_cpus": 2, "torch_threads": 2, "torch": "t", "ray": "r", "transformers": "x",
               "python": "3"}
    return {"machine": machine, "points": points,
            "workload": {"seed": 0, "rounds": 2, "min_requests": 4, "prompt_len": [1, 2], "max_tokens": [1, 2],
                         "dtype": "float32", "baseline_batch_size": 8, "ingress": "haproxy", **workload}}


@pytest.mark.timeout(180)
def test_a_signal_to_the_whole_process_group_ends_the_run_with_what_was_measured(tmp_path):
    """A CI job's time limit (`timeout`) signals Ray's processes along with the bench: Serve's
    calls then waited on a gone raylet until Ray ended the process 60 s later, writing nothing
    and leaving HAProxy running."""
    import os
    import signal
    import subprocess
    import sys
    import time

    out = tmp_path / "serve.json"
    bench = subprocess.Popen([sys.executable, "-m", "neo_serve.cli", "bench", "serve", *ARGV, "--skip-baseline",
                              "--json", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             start_new_session=True, env=user_environ())
    try:
        output = []
        for line in bench.stdout:  # until the app is deployed, mid-run
            output.append(line)
            if "neo-serve 1 stage: deployed in" in line:
                break
        os.killpg(bench.pid, signal.SIGTERM)
        output.append(bench.communicate(timeout=60)[0])
        said = "".join(output)
        assert bench.returncode == 130 and "interrupted: Serve and Ray are shut down" in said, said
        assert json.loads(out.read_text())["interrupted"] is True
        deadline = time.monotonic() + 15  # Ray and HAProxy went with it
        while left := session_processes(bench.pid):
            assert time.monotonic() < deadline, left
            time.sleep(0.5)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
            bench.wait()


def test_cpu_steal_is_read_from_proc_stat_and_flagged_in_the_report():
    meter = StealMeter()
    sum(range(2_000_000))  # some CPU time, so /proc/stat moves on
    steal = meter.fraction()
    assert steal is not None and 0 <= steal <= 1

    quiet = report_input([report_point("offline", 100.0, cpu_steal=0.01),
                          report_point("neo-serve 1 stage", 80.0, cpu_steal=0.02)])
    assert "CPU steal above" not in format_markdown(quiet)
    assert "| neo-serve 1 stage | 64 | 4 | 80.0 | 0.80x | - |" in format_markdown(quiet)
    assert "HAProxy ingress" in format_markdown(quiet)
    noisy = report_input([report_point("offline", 100.0, cpu_steal=0.01),
                          report_point("neo-serve 1 stage", 40.0, cpu_steal=0.62)])
    assert "**CPU steal above 10% in 1 of 2 points (up to 62%):**" in format_markdown(noisy)


def test_served_points_are_compared_with_their_paired_offline_point():
    one, two = served_system(1, 1), served_system(1, 2)
    assert (one, two) == ("neo-serve 1 stage", "neo-serve 1 stage, 2 replicas")
    report = format_markdown(report_input([
        report_point(f"offline, paired with {one}", 200.0, paired_with=one), report_point(one, 120.0),
        report_point(f"offline, paired with {two}", 100.0, paired_with=two), report_point(two, 90.0)], paired=True))
    assert f"| {one} | 64 | 4 | 120.0 | 0.60x |" in report
    assert f"| {two} | 64 | 4 | 90.0 | 0.90x |" in report
    assert f"| m | {one} | 0.60x (missed) |" in report and f"| m | {two} | 0.90x (met) |" in report
    assert "Paired: each served point ran right after an offline point" in report


def test_ray_has_room_for_every_replica():
    def cpus(*argv: str) -> int:
        args = parse(["--stages", "1,2", "--cpus-per-stage", "1", *argv])
        args.threads = 2
        return ray_cpus(args)

    # The 2-stage app: per replica 2 stages x 1 CPU + the replica's own CPU; + the router, + 1 spare.
    assert cpus() == 3 + 1 + 1
    assert cpus("--replicas", "3") == 3 * 3 + 1 + 1  # with --cpus-per-stage, as many replicas as asked
    # Without --cpus-per-stage the offline engine's threads are split over replicas and stages,
    # and only replicas whose stages get a thread each are measured.
    args = parse(["--replicas", "1,2"])
    args.threads = 2
    assert served_configs(args) == [(1, 1), (1, 2), (2, 1)]
    assert [cpus_per_stage(s, r, args) for s, r in served_configs(args)] == [2, 1, 1]


def test_chunk_gaps_are_the_waits_between_chunks():
    # Three chunks: 1 token at 0.1 s, 4 tokens at 1.1 s, 2 tokens at 2.1 s (seconds after sending).
    times = [0.1, 1.1, 1.1, 1.1, 1.1, 2.1, 2.1]
    gaps, chunks = chunk_gaps(times)
    assert gaps == pytest.approx([1.0, 1.0]) and chunks == 3
    stats, per_chunk = chunk_stats({"raw": [{"token_times": times}, {"token_times": [0.5]}]})
    assert stats["p50"] == pytest.approx(1000.0) and per_chunk == pytest.approx(8 / 4)
    # ITL spreads a chunk's wait over its tokens: that is 250 ms for the 4-token chunk, not 1 s.
    record = RequestRecord(8, 7, sent=0.0, token_times=times)
    assert inter_token_gaps(record) == pytest.approx([0.25] * 4 + [0.5] * 2)


def test_a_ratio_just_short_of_its_target_is_not_shown_as_the_target():
    from neo_serve.bench.serve_bench import _verdict

    assert _verdict(0.798, 0.8) == "0.798x (missed)"
    assert _verdict(0.8, 0.8) == "0.80x (met)" and _verdict(2.74, 3.0) == "2.74x (missed)"


def test_the_baseline_samples_as_its_requests_ask():
    """The baseline's `generate` samples when the benchmark's requests do, and refuses what a
    completions request could not ask."""
    import asyncio

    import torch
    from starlette.requests import Request

    from neo_serve.bench.baseline_app import HFGenerateServer
    from neo_serve.bench.engine_bench import Sampling

    from neo_serve.bench.serve_bench import DEMO_CHECKPOINT

    threads = torch.get_num_threads()
    try:
        server = HFGenerateServer(str(DEMO_CHECKPOINT))  # sets its torch threads: 1, in this process
    finally:
        torch.set_num_threads(threads)  # later tests read this process's default (the launcher's)
    prompts, lengths = [[5, 6, 7, 8], [9, 10]], [6, 4]
    greedy = server._generate(prompts, lengths)
    assert greedy == server._generate(prompts, lengths) and [len(t) for t in greedy] == lengths
    sampled = []
    for seed in range(3):
        torch.manual_seed(seed)
        sampled.append(server._generate(prompts, lengths, Sampling(temperature=1.0, top_p=0.95)))
    assert all(s != greedy for s in sampled) and len({str(s) for s in sampled}) > 1
    # top_k -1 is "off" in a completions request (and `--top-k -1`); transformers refuses it as is.
    assert [len(t) for t in server._generate(prompts, lengths, Sampling(temperature=1.0, top_k=-1))] == lengths

    async def post(body: dict) -> int:
        payload = json.dumps(body).encode()

        async def receive():
            return {"type": "http.request", "body": payload, "more_body": False}

        return (await server(Request({"type": "http", "method": "POST", "headers": []}, receive))).status_code

    assert asyncio.run(post({"prompt": [1, 2], "max_tokens": 2, "temperature": -1.0})) == 400
