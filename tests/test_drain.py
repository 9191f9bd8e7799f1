"""`neo-serve drain`, the Kubernetes preStop hook, on a real multi-node Ray cluster (three Ray
nodes on this machine, as three Pods): Serve starts the replacement pipeline on another node
before it stops the old one, the hook returns once nothing serves on the drained node (its
pipeline, stage actors and HTTP proxy), and no stream of a steady load fails, neither while
the pipeline moves nor when the drained node is then killed."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import ray
from ray import serve
from ray.cluster_utils import Cluster

from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.serve.drain import ClusterState
from neo_serve.serve.ingress import configure_local_ingress
from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS
from tests.checkpoints import build_tokenizer, make_neox
from tests.conftest_serve import INGRESS_RESOURCE, _environment_restored, free_port, join_stream, wait_until

PIPELINE = "ServeReplica:drain:Pipeline-neox"
PROMPT = "def drain(node):"
MAX_TOKENS = 48


@pytest.fixture(scope="module")
def cluster():
    """A head with room for the router only, and one node with room for one 2-stage pipeline
    (2 stages x 1 CPU + 1 for its scheduler), as a GPU Pod holds exactly one pipeline."""
    with _environment_restored():
        # As the KubeRay manifests run Serve: its Python proxy on every node, its own settings;
        # but a draining proxy waits 5 s for new requests instead of 30.
        for variable in LOCAL_SERVE_SETTINGS:
            os.environ.pop(variable, None)
        configure_local_ingress("proxy")
        os.environ["RAY_SERVE_PROXY_MIN_DRAINING_PERIOD_S"] = "5"
        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "resources": {INGRESS_RESOURCE: 4}})
        first = cluster.add_node(num_cpus=3)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        state = ClusterState(cluster.address)
        try:
            yield cluster, first, state
        finally:
            serve.shutdown()
            ray.shutdown()
            cluster.shutdown()


def test_drain_moves_the_pipeline_and_finishes_its_streams(cluster, tmp_path):
    cluster, first, state = cluster
    checkpoint = make_neox(tmp_path / "neox", build_tokenizer())
    expected = LLM(str(checkpoint), dtype="float32").generate(
        [PROMPT], SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True))[0].outputs[0].text
    # The proxies share the port (SO_REUSEPORT); the load goes through the router's handle.
    serve.start(proxy_location="EveryNode", http_options={"host": "127.0.0.1", "port": free_port()})
    # A short graceful_shutdown_timeout_s: Serve stops a draining replica at the latest that long
    # before the deadline, and the hand-over (replacement first) needs time before that.
    router = serve.run(build_app({
        "models": [{"name": "neox", "checkpoint": str(checkpoint), "num_stages": 2, "dtype": "float32",
                    "cpus_per_stage": 1, "kv_cache_tokens": 2048, "graceful_shutdown_timeout_s": 20}],
        "router": {"num_cpus": 0.5, "resources": {INGRESS_RESOURCE: 1}}, "playground": False}),
        name="drain", route_prefix="/")
    on_first = wait_until(lambda: (a := state.serving_actors_on(first.node_id)) and "ProxyActor" in a and a,
                          timeout=30, what="the first node's proxy")
    assert on_first == ["ProxyActor", PIPELINE, "StageActor", "StageActor"], on_first

    # A steady load: three clients, each streaming its next request when the last one is done.
    request = {"model": "neox", "prompt": PROMPT, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
               "stream": True}
    stop, completed, failures = threading.Event(), [], []

    def client() -> None:
        while not stop.is_set():
            try:
                text = join_stream(list(router.options(stream=True).generate.remote(request))).get(0)
                (completed.append(time.monotonic()) if text == expected else failures.append(text))
            except Exception as exc:  # noqa: BLE001 - every failure is counted
                failures.append(repr(exc))

    # Where the pipeline runs, sampled while it moves: the replacement must start before the old
    # replica stops, not after.
    both_seen = threading.Event()
    second_holder: list = []

    def watch() -> None:
        while not stop.is_set():
            if second_holder and PIPELINE in state.serving_actors_on(first.node_id) \
                    and PIPELINE in state.serving_actors_on(second_holder[0].node_id):
                both_seen.set()
            time.sleep(0.2)

    threads = [threading.Thread(target=client, daemon=True) for _ in range(3)]
    threads.append(threading.Thread(target=watch, daemon=True))
    for thread in threads:
        thread.start()
    try:
        wait_until(lambda: len(completed) >= 6, timeout=60, what="requests served by the first node")
        # The Pod that will take over (on Kubernetes the autoscaler adds it for the replacement).
        second_holder.append(cluster.add_node(num_cpus=3))
        cluster.wait_for_nodes()
        second = second_holder[0]
        # What the preStop hook runs, for the first node.
        drained = subprocess.run(
            [sys.executable, "-m", "neo_serve.cli", "drain", "--address", cluster.address,
             "--node-id", first.node_id, "--deadline-s", "120", "--poll-s", "0.5"],
            capture_output=True, text=True, timeout=180)
        assert drained.returncode == 0, drained.stdout + drained.stderr
        assert "no serving actor left on the node" in drained.stdout, drained.stdout
        assert "ProxyActor" in drained.stdout, drained.stdout  # it waited for the proxy too
        assert state.serving_actors_on(first.node_id) == []
        assert both_seen.is_set(), "the old pipeline stopped before its replacement ran"
        assert PIPELINE in state.serving_actors_on(second.node_id)
        served_before_kill = len(completed)
        # Kubernetes kills the Pod once its preStop hook returns: nothing of the service is there.
        # (Killed without the drain, in a manual run, the node failed its 3 requests in flight.)
        cluster.remove_node(first, allow_graceful=False)
        wait_until(lambda: len(completed) >= served_before_kill + 6, timeout=60,
                   what="requests served after the drained node was killed")
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=60)
    assert failures == [], failures[:5]


def test_drain_names_a_node_that_is_not_there(cluster):
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "drain", "--address", cluster[0].address,
                          "--node-id", "ab" * 28], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "no Ray node" in ran.stderr, ran.stdout + ran.stderr


def test_drain_without_a_node_id_wants_one_among_several_at_one_address(cluster):
    """In a Pod the node is the one at the Pod's IP; here three nodes share this machine's."""
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "drain", "--address", cluster[0].address],
                         capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "name the one to drain with --node-id" in ran.stderr, ran.stdout + ran.stderr


def test_drain_gives_up_on_a_cluster_that_does_not_answer():
    """When a whole cluster is deleted its head goes down with the workers; Ray's client would
    retry it for minutes while the GPU Pod waits for its preStop hook."""
    started = time.monotonic()
    ran = subprocess.run([sys.executable, "-m", "neo_serve.cli", "drain", "--address", f"127.0.0.1:{free_port()}",
                          "--silence-s", "5"], capture_output=True, text=True, timeout=120)
    assert ran.returncode == 2 and "no Ray cluster" in ran.stderr, ran.stdout + ran.stderr
    assert time.monotonic() - started < 60


def test_a_pods_node_is_the_live_one_at_its_ip():
    from neo_serve.serve.drain import local_node

    nodes = {"a": {"ip": "10.0.0.5", "alive": False},   # the Pod's earlier Ray node (restarted)
             "b": {"ip": "10.0.0.5", "alive": True}, "c": {"ip": "10.0.0.6", "alive": True}}
    assert local_node(nodes, "10.0.0.5") == "b"
    assert local_node(nodes, "10.0.0.7") is None  # Ray on this Pod has stopped already
