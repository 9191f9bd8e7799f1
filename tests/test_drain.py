"""`neo-serve drain`, the Kubernetes preStop hook, on a real multi-node Ray cluster (three Ray
nodes on this machine, as three Pods): the pipeline moves to another node and no request of a
steady load fails, neither while it moves nor when the drained node is then killed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import httpx
import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.serve.drain import serving_actors_on
from neo_serve.serve.ingress import configure_local_ingress
from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS
from tests.checkpoints import build_tokenizer, make_neox
from tests.conftest_serve import _environment_restored, free_port, wait_until

INGRESS = "neo-serve-ingress"
PROMPT = "def drain(node):"
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def cluster():
    """A head with room for the router only, and one node with room for one 2-stage pipeline
    (2 stages x 1 CPU + 1 for its scheduler), as a GPU Pod holds exactly one pipeline."""
    with _environment_restored():
        # As the KubeRay manifests run Serve: its Python proxy, its own settings.
        for variable in LOCAL_SERVE_SETTINGS:
            os.environ.pop(variable, None)
        configure_local_ingress("proxy")
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {INGRESS: 4}})
        first = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        try:
            yield cluster, first
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def test_drain_moves_the_pipeline_and_finishes_its_streams(cluster, tmp_path):
    cluster, first = cluster
    checkpoint = make_neox(tmp_path / "neox", build_tokenizer())
    expected = LLM(str(checkpoint), dtype="float32").generate(
        [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0].outputs[0].text
    port = free_port()
    serve.start(proxy_location="HeadOnly", http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app({
        "models": [{"name": "neox", "checkpoint": str(checkpoint), "num_stages": 2, "dtype": "float32",
                    "cpus_per_stage": 1, "kv_cache_tokens": 2048}],
        "router": {"num_cpus": 0.5, "resources": {INGRESS: 1}}, "playground": False}), name="drain", route_prefix="/")
    on_first = serving_actors_on(first.node_id)
    assert on_first == ["ServeReplica:drain:Pipeline-neox", "StageActor", "StageActor"], on_first

    # A steady load: three clients, each sending its next request when the last one is done.
    body = {"model": "neox", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True}
    stop, completed, failures = threading.Event(), [], []

    def client() -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            while not stop.is_set():
                try:
                    response = http.post("/v1/completions", json=body)
                    if response.status_code != 200 or response.json()["choices"][0]["text"] != expected:
                        failures.append((response.status_code, response.text[:300]))
                    else:
                        completed.append(time.monotonic())
                except Exception as exc:  # noqa: BLE001 - every failure is counted
                    failures.append(repr(exc))

    clients = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    for thread in clients:
        thread.start()
    try:
        wait_until(lambda: len(completed) >= 6, timeout=60, what="requests served by the first node")
        # The Pod that will take over (on Kubernetes the autoscaler adds it for the replacement).
        second = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        # What the preStop hook runs, for the first node.
        started = time.monotonic()
        drained = subprocess.run(
            [sys.executable, "-m", "neo_serve.cli", "drain", "--address", cluster.address,
             "--node-id", first.node_id, "--deadline-s", "120", "--poll-s", "0.5"],
            capture_output=True, text=True, timeout=180)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "no serving actor left on the node" in drained.stdout, drained.stdout
        assert time.monotonic() - started < 120
        assert serving_actors_on(first.node_id) == []
        assert "ServeReplica:drain:Pipeline-neox" in serving_actors_on(second.node_id)
        served_before_kill = len(completed)
        # Kubernetes kills the Pod once its preStop hook returns: nothing of the service is there.
        # (Killed without the drain, the same node took 3 requests in flight down with it.)
        cluster.remove_node(first, allow_graceful=False)
        wait_until(lambda: len(completed) >= served_before_kill + 6, timeout=60,
                   what="requests served after the drained node was killed")
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    assert failures == [], failures[:5]


def test_drain_names_a_node_that_is_not_there(cluster):
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "drain", "--address", cluster[0].address,
                          "--node-id", "ab" * 28], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "no live Ray node" in ran.stderr, ran.stdout + ran.stderr


def test_drain_gives_up_on_a_cluster_that_does_not_answer():
    """A deleted cluster's head goes first; Ray's client would retry it for minutes while the GPU
    Pod waits for its preStop hook."""
    started = time.monotonic()
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "drain", "--address", f"127.0.0.1:{free_port()}",
                          "--silence-s", "5"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "no Ray cluster answers" in ran.stderr, ran.stdout + ran.stderr
    assert time.monotonic() - started < 60
