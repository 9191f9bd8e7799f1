"""The app behind Serve's own Python proxy with Serve's default threading, as the KubeRay
manifests run it (the other serving tests use what `neo-serve up` sets up locally: HAProxy and
one event loop per replica). One cluster for the module: the streaming, cancellation, body-limit
and playground paths that differ between the two front doors."""

from __future__ import annotations

import os

import httpx
import openai
import pytest
import ray
from ray import serve

from checkpoints import build_tokenizer, make_neox
from conftest_serve import kill_router_mid_streams, parse_sse, ray_serve_on_loopback, wait_until
from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.serve.ingress import HAPROXY_FLAG
from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS

APP = "neo-k8s-like"
PROMPTS = ["def hello_world():", "import os\nimport sys\n"]
LONG = {"model": "neox", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
        "stream": True}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    return str(make_neox(tmp_path_factory.mktemp("k8s-like") / "neox", build_tokenizer()))


@pytest.fixture(scope="module")
def base_url():
    with ray_serve_on_loopback(num_cpus=8, as_on_kubernetes=True) as url:
        # What the cluster's processes inherited: Serve's proxy and none of neo-serve's local settings.
        assert os.environ[HAPROXY_FLAG] == "0"
        assert not any(variable in os.environ for variable in LOCAL_SERVE_SETTINGS)
        yield url


@pytest.fixture(scope="module")
def app(base_url, checkpoint):
    handle = serve.run(build_app({
        "models": [{"name": "neox", "checkpoint": checkpoint, "num_stages": 2, "dtype": "float32",
                    "kv_cache_tokens": 4096}],
        "router": {"num_cpus": 0.5, "max_body_bytes": 4096}}), name=APP, route_prefix="/")
    yield handle
    serve.delete(APP)


@pytest.fixture(scope="module")
def offline(checkpoint) -> LLM:
    return LLM(checkpoint, dtype="float32")


def greedy(offline: LLM, prompts: list[str], max_tokens: int) -> list[str]:
    outputs = offline.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return [o.outputs[0].text for o in outputs]


def pipeline_stats() -> dict:
    return serve.get_app_handle(APP).stats.remote().result()["neox"]


def test_the_front_door_is_serves_python_proxy(app):
    # Serve names its front door actor SERVE_PROXY_ACTOR-<node> in both modes; its class tells them
    # apart (HAProxyManager when HAProxy is on).
    proxies = [a for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].startswith("SERVE_PROXY_ACTOR")]
    assert proxies
    for proxy in proxies:
        handle = ray.get_actor(proxy["name"], namespace=proxy["namespace"])
        assert handle._ray_actor_creation_function_descriptor.class_name == "ProxyActor", proxy


def test_through_serves_proxy_outputs_equal_the_offline_engine(base_url, app, offline):
    expected = greedy(offline, PROMPTS, 16)
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    result = api.completions.create(model="neox", prompt=PROMPTS, max_tokens=16, temperature=0)
    assert [c.text for c in result.choices] == expected
    for prompt, text in zip(PROMPTS, expected):
        streamed = "".join(c.text for chunk in api.completions.create(
            model="neox", prompt=prompt, max_tokens=16, temperature=0, stream=True) for c in chunk.choices)
        assert streamed == text


def test_a_client_that_disconnects_has_its_sequence_stopped(base_url, app):
    with httpx.stream("POST", f"{base_url}/v1/completions", json=LONG, timeout=60) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        running = pipeline_stats()
        assert running["running"] == 1
        # Serve's default transport, as on KubeRay: Ray actor tasks, whose cancellation this checks.
        assert running["router_transport"] == "actor tasks"
    stats = wait_until(lambda: (s := pipeline_stats())["requests"] == 0 and s, timeout=10, what="abort")
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"]
    # At most a few steps after the hang-up (in flight, and while the cancel travels); running
    # on to 480 tokens would take ~470.
    assert stats["num_steps"] - running["num_steps"] <= 16, stats["num_steps"] - running["num_steps"]


def test_bodies_over_the_limit_get_413_even_when_sent_in_chunks(base_url, app):
    def chunks():
        yield b'{"model": "neox", "prompt": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    chunked = httpx.post(f"{base_url}/v1/completions", content=chunks(), timeout=30)
    assert chunked.status_code == 413 and chunked.json()["error"]["code"] == "request_too_large"


def test_the_playground_page_and_its_event_stream_come_through(base_url, app, offline):
    page = httpx.get(f"{base_url}/ui/", timeout=60)
    assert page.status_code == 200 and "gradio" in page.text.lower()
    config = httpx.get(f"{base_url}/ui/config", timeout=60).json()
    assert config["root"] == f"{base_url}/ui"
    # A generation through Gradio's queue: join, then read its server-sent events to the end.
    from gradio_client import Client

    client = Client(f"{base_url}/ui/", verbose=False, analytics_enabled=False, download_files=False)
    text, _figures = client.predict(PROMPTS[0], "neox", 8, 0.0, 1.0, 0, 1.0, -1, "", api_name="/generate")
    assert text == greedy(offline, PROMPTS[:1], 8)[0]
    assert pipeline_stats()["requests"] == 0


def test_a_stream_ends_with_done(base_url, app):
    with httpx.stream("POST", f"{base_url}/v1/completions", timeout=60, json={
            **LONG, "max_tokens": 8, "stream_options": {"include_usage": True}}) as response:
        events, done = parse_sse(list(response.iter_lines()))
    assert done and events[-1]["usage"]["completion_tokens"] == 8


def test_streams_of_a_router_that_died_are_stopped_by_the_pipelines_watch(base_url, app, checkpoint):
    """Ray does not cancel a streaming actor task whose caller died: the pipeline pings the
    callers of its streams and stops those of a dead one (`CallerWatch`), here where the router
    calls it as Ray actor tasks, as on KubeRay."""
    before, stopped = kill_router_mid_streams(base_url, checkpoint, name="neo-k8s-orphans", prefix="/orphans")
    assert stopped["streams_of_dead_callers"] == 8, stopped  # stopped by the watch, not run to 480 tokens
    assert stopped["free_kv_blocks"] == stopped["total_kv_blocks"]
