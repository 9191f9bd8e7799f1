"""Reliability under faults and abuse, on a real Ray cluster: a hung stage, a thousand abandoned
requests, and what reaches the logs.

One Ray cluster for the module: the bundled demo model as a 2-stage pipeline with a step
deadline ("rel"), and the same model behind a router that logs requests ("/logged").
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from conftest_serve import apps_removed_afterwards, join_stream, parse_sse, wait_until
from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.serve.config import DEMO_CHECKPOINT

pytestmark = pytest.mark.timeout(400)

APP = "rel"
MODEL = "neo-demo"
STEP_TIMEOUT_S = 3.0


@pytest.fixture(scope="module")
def base_url(shared_serve):
    with apps_removed_afterwards():
        yield shared_serve.url


@pytest.fixture(scope="module")
def app(base_url):
    serve.run(build_app({
        "models": [{"num_stages": 2, "dtype": "float32", "cpus_per_stage": 0.5, "kv_cache_tokens": 8192,
                    "max_num_seqs": 128, "step_timeout_s": STEP_TIMEOUT_S, "health_check_period_s": 1}],
        "router": {"num_cpus": 0.5}, "playground": False}), name=APP, route_prefix="/")
    return serve.get_app_handle(APP)


@pytest.fixture(scope="module")
def offline():
    return LLM(str(DEMO_CHECKPOINT), dtype="float32")


def stats() -> dict:
    return serve.get_app_handle(APP).stats.remote().result()[MODEL]


def assert_nothing_left(timeout: float = 30) -> dict:
    """No request, sequence, stream or KV block is left in the pipeline."""
    def clean():
        s = stats()
        return (s["requests"] == 0 and s["running"] == 0 and s["waiting"] == 0 and s["streams"] == 0
                and s["free_kv_blocks"] == s["total_kv_blocks"]) and s
    try:
        return wait_until(clean, timeout=timeout, interval=0.2, what="a clean pipeline")
    except AssertionError:
        raise AssertionError(f"left behind: {stats()}") from None


def greedy(offline: LLM, prompts: list[str], max_tokens: int) -> list[str]:
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    return [out.outputs[0].text for out in offline.generate(prompts, params)]


# ---- a hung stage ------------------------------------------------------------------------------------
def stage_pid(replica: str, stage: int) -> int:
    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("neo-serve-stage:") and f":{replica}:" in a["name"]
               and a["name"].rsplit(":", 1)[1].split(".")[0] == str(stage)]
    handle = ray.get_actor(actor["name"], namespace=actor["namespace"])
    return ray.get(handle.__ray_call__.remote(lambda _self: os.getpid()), timeout=30)


def test_hung_stage_is_caught_by_the_step_deadline(base_url, app, offline):
    """Freeze a stage's process (SIGSTOP: alive, silent) while generations stream: past
    step_timeout_s the pipeline restarts its stages, recomputes the sequences, and every client
    receives the complete greedy text it would have got without the fault."""
    prompts = ["def hello_world():", "import os\n", "class Greeter:\n    def"]
    expected = greedy(offline, prompts, 60)
    before = stats()
    pid = stage_pid(before["replica"], 1)
    received = [0] * len(prompts)

    async def one(http: httpx.AsyncClient, index: int) -> tuple[str, bool]:
        body = {"prompt": prompts[index], "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True}
        lines = []
        async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
                received[index] += line.startswith("data: ")
        events, done = parse_sse(lines)
        assert all("error" not in event for event in events), events
        return join_stream(events)[0], done

    async def freeze_when_streaming() -> float:
        deadline = time.monotonic() + 60
        while min(received) < 2:
            assert time.monotonic() < deadline, "streams did not start"
            await asyncio.sleep(0.01)
        os.kill(pid, signal.SIGSTOP)
        return time.monotonic()

    async def run_all():
        async with httpx.AsyncClient(timeout=180) as http:
            results = asyncio.gather(*(one(http, i) for i in range(len(prompts))))
            frozen_at = await freeze_when_streaming()
            return await results, time.monotonic() - frozen_at

    try:
        results, took = asyncio.run(run_all())
    finally:
        try:
            os.kill(pid, signal.SIGCONT)  # if the pipeline never killed it
        except ProcessLookupError:
            pass
    assert [text for text, _ in results] == expected
    assert all(done for _, done in results)
    assert took >= STEP_TIMEOUT_S - 0.5  # the streams waited out the deadline, then resumed
    print(f"\nFIGURE hung stage: {len(prompts)} streams complete and exact, {took:.1f} s from freeze to last token "
          f"(step deadline {STEP_TIMEOUT_S} s)")
    after = assert_nothing_left()
    assert after["num_recoveries"] == before["num_recoveries"] + 1 and after["replica"] == before["replica"]
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)  # the frozen process was killed, its bundle reused


# ---- abandoned requests --------------------------------------------------------------------------------
def test_a_thousand_cancelled_or_disconnected_requests_leave_nothing_behind(base_url, app, offline):
    """800 handle streams cancelled before or after their first tokens, 150 HTTP streams whose
    clients disconnect, and 50 requests past their deadline: afterwards no request, sequence or KV
    block is left, and the pipeline still answers exactly."""
    handle = serve.get_app_handle(APP).options(stream=True)
    body = {"prompt": "def hello_world():", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
    ended = {"cancelled": 0, "disconnected": 0, "timed_out": 0}

    async def cancel_handle_stream(index: int) -> None:
        stream = handle.generate.remote(**{**body, "prompt": f"x = {index}\n"})
        for _ in range(index % 4):  # cancel before any chunk, or after 1-3 chunks
            await stream.__anext__()
        stream.cancel()
        ended["cancelled"] += 1

    async def disconnect_http(http: httpx.AsyncClient, index: int) -> None:
        async with http.stream("POST", f"{base_url}/v1/completions", json=body) as response:
            assert response.status_code == 200
            lines = response.aiter_lines()
            for _ in range(1 + index % 3):
                await lines.__anext__()
        ended["disconnected"] += 1  # leaving the block closed the connection mid-stream

    async def time_out(http: httpx.AsyncClient) -> None:
        response = await http.post(f"{base_url}/v1/completions", json={**body, "stream": False, "timeout": 0.2})
        assert response.status_code == 408, response.text
        ended["timed_out"] += 1

    async def run_all():
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=200)) as http:
            for wave in range(10):  # 100 at a time
                jobs = [cancel_handle_stream(wave * 80 + i) for i in range(80)]
                jobs += [disconnect_http(http, i) for i in range(15)]
                jobs += [time_out(http) for _ in range(5)]
                await asyncio.gather(*jobs)

    started = time.monotonic()
    asyncio.run(run_all())
    assert ended == {"cancelled": 800, "disconnected": 150, "timed_out": 50}
    left = assert_nothing_left()
    print(f"\nFIGURE abandoned requests: {ended} in {time.monotonic() - started:.1f} s; left behind: "
          f"{left['requests']} requests, {left['running'] + left['waiting']} sequences, "
          f"{left['total_kv_blocks'] - left['free_kv_blocks']} KV blocks")
    response = httpx.post(f"{base_url}/v1/completions", json={**body, "stream": False, "max_tokens": 24}, timeout=60)
    assert response.json()["choices"][0]["text"] == greedy(offline, [body["prompt"]], 24)[0]


# ---- a dead replica ----------------------------------------------------------------------------------
def test_killed_pipeline_replica_is_replaced_and_serves_again(base_url, app, offline):
    """Kill the pipeline's replica process (its stage actors die with it): the request inside it
    gets a 503 to retry, Serve starts a new pipeline and requests succeed again, exactly, within
    a bounded time."""
    before = stats()["replica"]
    [replica] = [a for a in ray.util.list_named_actors(all_namespaces=True)
                 if a["name"].startswith(f"SERVE_REPLICA::{APP}#Pipeline") and a["name"].endswith(before)]
    in_flight: list[httpx.Response] = []
    long_request = threading.Thread(target=lambda: in_flight.append(httpx.post(
        f"{base_url}/v1/completions", json={"prompt": "import os", "max_tokens": 480, "ignore_eos": True},
        timeout=120)))
    long_request.start()
    wait_until(lambda: stats()["running"] > 0, timeout=30, interval=0.05, what="the long request running")
    ray.kill(ray.get_actor(replica["name"], namespace=replica["namespace"]), no_restart=True)
    killed_at = time.monotonic()
    long_request.join(timeout=120)
    [lost] = in_flight
    assert lost.status_code == 503 and lost.headers.get("retry-after"), (lost.status_code, lost.text)
    assert lost.json()["error"]["type"] == "service_unavailable_error"
    body = {"prompt": "def hello_world():", "max_tokens": 16, "temperature": 0}
    expected = greedy(offline, [body["prompt"]], 16)[0]
    statuses: list[int] = []

    def answered():
        # Serve may hold a request until the new pipeline is up (a minute, with the suite's other
        # half on the same two cores).
        response = httpx.post(f"{base_url}/v1/completions", json={**body, "ignore_eos": True}, timeout=90)
        statuses.append(response.status_code)
        return response.status_code == 200 and response

    response = wait_until(answered, timeout=180, interval=0.5, what="a replacement pipeline")
    took = time.monotonic() - killed_at
    assert response.json()["choices"][0]["text"] == expected
    assert stats()["replica"] != before
    assert set(statuses) <= {200, 503}, statuses  # unavailable while replaced: an explicit 503, never a 500
    print(f"\nFIGURE killed replica: serving again after {took:.1f} s; answers meanwhile: {sorted(set(statuses))}")


# ---- logs --------------------------------------------------------------------------------------------
def log_files() -> list[Path]:
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    return [path for path in logs.rglob("*") if path.is_file()]


def logs_containing(marker: str) -> list[str]:
    return [str(path) for path in log_files() if marker.encode() in path.read_bytes()]


def serve_log_lines(kind: str, text: str) -> list[str]:
    """Lines holding `text` in the Serve log files of replicas of `kind` (Router, Pipeline)."""
    logs = Path(ray._private.worker._global_node.get_logs_dir_path()) / "serve"
    return [line for path in logs.glob(f"replica_{APP}_{kind}*.log")
            for line in path.read_text(errors="replace").splitlines() if text in line]


def test_a_clients_mistake_is_one_line_in_the_replicas_logs(base_url, app):
    """Serve logs what a replica's method raises at ERROR with a traceback: every prompt past the
    context window flooded the pipeline's log. A client's 4xx is now one INFO line naming the
    status, type and field (not the message, which may quote the request); the client still
    gets its 400."""
    from neo_serve.serve.protocol import APIError

    marker = f"refused-{uuid.uuid4().hex}"
    too_long = httpx.post(f"{base_url}/v1/completions", json={"prompt": "def " * 3000, "max_tokens": 1},
                          headers={"x-request-id": marker}, timeout=60)
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "prompt"
    # Serve's access line ("CALL generate ERROR") is written after the failure's own line.
    wait_until(lambda: any("CALL generate" in line for line in serve_log_lines("Pipeline", marker)), timeout=30,
               what="the refused request in the pipeline's log")
    marked = serve_log_lines("Pipeline", marker)
    assert any("INFO" in line and "Request refused: 400 invalid_request_error (prompt)" in line for line in marked), marked
    assert not any("Request failed" in line for line in marked), marked

    # Through a handle the router itself refuses a bad parameter.
    refused_before = len(serve_log_lines("Router", "Request refused: 400 invalid_request_error (temperature)"))
    failed_before = len(serve_log_lines("Router", "Request failed"))
    with pytest.raises(APIError) as refused:
        app.generate.remote(prompt="def f(", temperature=-1).result()
    assert refused.value.status == 400
    wait_until(lambda: len(serve_log_lines("Router", "Request refused: 400 invalid_request_error (temperature)"))
               > refused_before, timeout=30, what="the handle's refusal in the router's log")
    assert len(serve_log_lines("Router", "Request failed")) == failed_before


def test_prompts_and_outputs_stay_out_of_the_logs_unless_enabled(base_url, app):
    """Prompts and generated text reach no log file (router, pipeline, stages, proxy, Ray) unless
    the router's `log_requests` is on; then the router logs both."""
    secret = f"secret-{uuid.uuid4().hex}"
    prompt = f"# {secret}\ndef hello_world():"
    ok = httpx.post(f"{base_url}/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0},
                    timeout=60)
    output = ok.json()["choices"][0]["text"]
    assert ok.status_code == 200 and len(output) >= 20
    streamed = httpx.post(f"{base_url}/v1/completions", json={"prompt": prompt, "max_tokens": 8, "stream": True},
                          timeout=60)
    assert streamed.status_code == 200
    for bad in ({"prompt": prompt, "temperature": -1}, {"prompt": prompt * 2000, "max_tokens": 1},
                {"prompt": prompt, "unknown_field": 1}):
        assert httpx.post(f"{base_url}/v1/completions", json=bad, timeout=60).status_code == 400
    router = serve.get_app_handle(APP)
    assert router.generate.remote(prompt=prompt, max_tokens=4).result()["usage"]["completion_tokens"] == 4
    with pytest.raises(Exception):
        router.generate.remote(prompt=prompt, top_p=2.0).result()
    # Serve logs each request under its id, so a last request with a known id is in the log files
    # once the ones before it are: wait for it rather than for a fixed time.
    marker = f"flushed-{uuid.uuid4().hex}"
    assert httpx.post(f"{base_url}/v1/completions", json={"prompt": "def f(", "max_tokens": 2},
                      headers={"x-request-id": marker}, timeout=60).status_code == 200
    wait_until(lambda: {"Router", "Pipeline"} <= {kind for path in logs_containing(marker)
                                                   for kind in ("Router", "Pipeline") if kind in Path(path).name},
               timeout=30, what="the marked request in the router's and the pipeline's logs")
    assert logs_containing(secret) == []
    assert logs_containing(output) == []

    serve.run(build_app({"models": [{"num_stages": 1, "dtype": "float32", "cpus_per_stage": 0.5,
                                     "kv_cache_tokens": 1024}],
                         "router": {"num_cpus": 0.5, "log_requests": True}, "playground": False}),
              name="logged", route_prefix="/logged")
    try:
        logged = httpx.post(f"{base_url}/logged/v1/completions",
                            json={"prompt": prompt, "max_tokens": 24, "temperature": 0}, timeout=60)
        assert logged.status_code == 200
        # This app has no playground (playground: false): /ui answers 404, naming the build arg.
        no_ui = httpx.get(f"{base_url}/logged/ui/", timeout=30)
        assert no_ui.status_code == 404 and "playground: false" in no_ui.json()["error"]["message"]
        files = wait_until(lambda: logs_containing(secret), timeout=20, what="the logged request")
        assert any(Path(f).name.startswith("replica_logged_Router") for f in files), files
        logged_output = repr(logged.json()["choices"][0]["text"])[1:-1]  # logged with %r
        assert logs_containing(logged_output)
    finally:
        serve.delete("logged")


def test_only_serves_request_failures_of_client_mistakes_become_one_line():
    """The log filter alone: which records it rewrites, and what the line may name."""
    import logging

    from neo_serve.errors import InvalidRequestError
    from neo_serve.serve.error_logs import ClientErrorsAsOneLine
    from neo_serve.serve.protocol import APIError

    def logged(error: BaseException, msg: str = "Request failed.") -> logging.LogRecord:
        try:
            raise error
        except BaseException:
            record = logging.LogRecord("ray.serve", logging.ERROR, __file__, 1, msg, None, sys.exc_info())
        assert ClientErrorsAsOneLine().filter(record)
        return record

    refused = logged(InvalidRequestError("prompt has 3001 tokens; the context window is 512", field="prompt"))
    assert refused.levelno == logging.INFO and refused.exc_info is None
    assert refused.getMessage() == "Request refused: 400 invalid_request_error (prompt)"
    nested = logged(APIError("bad", param="stream_options.include_usage"))
    assert nested.getMessage() == "Request refused: 400 invalid_request_error (stream_options.include_usage)"
    # An unknown field's name is whatever the client sent: not written (a newline would forge a line).
    forged = logged(APIError("unknown field", param="x\nERROR forged line"))
    assert forged.getMessage() == "Request refused: 400 invalid_request_error (unknown field)"
    # Server errors, a full queue, a missed deadline and neo-serve's own records keep their tracebacks.
    for error, msg in ((APIError("pipeline failed", status=503, type="service_unavailable_error"), "Request failed."),
                       (APIError("busy", status=429, type="rate_limit_error", code="server_busy"), "Request failed."),
                       (APIError("late", status=408, type="timeout_error", code="request_timeout"), "Request failed."),
                       (RuntimeError("a bug"), "Request failed."),
                       (InvalidRequestError("raised by a bug in the loop"), "neo-serve pipeline loop crashed")):
        kept = logged(error, msg)
        assert kept.levelno == logging.ERROR and kept.exc_info is not None and kept.getMessage() == msg, error
