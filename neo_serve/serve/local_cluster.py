"""Ray Serve settings for the single-machine clusters neo-serve starts itself.

`neo-serve up`, `neo-serve bench serve` and the tests start Ray on the machine they run on,
where Serve's control plane shares the cores with the model. Serve reads these environment
variables when its controller, routers and replicas start, so they are set in this process
before `ray.init` (Ray's processes inherit its environment). A value the user has set wins. A
cluster that neo-serve joins (KubeRay, `--address`) keeps its own settings.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, MutableMapping

from neo_serve.serve.ingress import configure_local_ingress

LOCAL_SERVE_SETTINGS: dict[str, str] = {
    # Serve's controller reconciles every 0.1 s by default, and each round reads from Ray's GCS.
    # On a 2-vCPU machine an idle demo app's controller took 0.065 cores and the GCS 0.031; every
    # 0.5 s, 0.026 and 0.013. Under 64 streams the controller went from 0.04-0.05 cores to about
    # 0.01, which the model's replica got back. Deployments and scaling react up to 0.4 s later.
    "RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5",
    # Each router and replica flushes Serve's own request metrics to Ray's metrics every 0.1 s by
    # default; Ray exports them no more often than once a second anyway.
    "RAY_SERVE_METRICS_EXPORT_INTERVAL_MS": "1000",
    # Serve runs a replica's own code (the router's FastAPI app, the pipeline's engine loop) on an
    # event loop in a thread of its own, and each deployment handle's request router on another,
    # so every request and every streamed chunk crosses between loops: a thread-safe hand-off and
    # a wake-up each, on cores the model shares. These two put all of it on the replica's main
    # loop, as Serve's throughput-optimized mode does. Demo model, 1 stage, 64 streaming clients,
    # alternating runs: 971, 825 and 902 tok/s against 786, 640 and 786 with separate loops.
    "RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD": "0",
    "RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP": "0",
    # Deployment handles call replicas over gRPC (each replica's own server) instead of as Ray
    # actor tasks whose streamed chunks go through the object store's generator protocol. The
    # router's CPU per request fell from 3.2-3.6 ms to 2.0-2.3 ms (demo, 4-token streams, 16
    # clients), and the demo at 64 streaming clients served 11% more tokens per second, ahead in
    # each of four alternating pairs (docs/benchmarks.md).
    "RAY_SERVE_USE_GRPC_BY_DEFAULT": "1",
    # gRPC's 4 MiB message limit, which Serve keeps, would refuse a chunk of a long echoed prompt's
    # logprobs: with the top 20, 250-400 bytes a position, so past 10-16k positions (a 2048-token
    # window is well under it; a long-context checkpoint is not).
    "RAY_SERVE_REPLICA_GRPC_MAX_MESSAGE_LENGTH": str(512 * 1024 * 1024),
}


def apply_local_serve_settings(environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set `LOCAL_SERVE_SETTINGS` in `environ` (default: this process's) where unset; returns
    the settings that are now in effect."""
    env = os.environ if environ is None else environ
    for variable, value in LOCAL_SERVE_SETTINGS.items():
        env.setdefault(variable, value)
    return {variable: env[variable] for variable in LOCAL_SERVE_SETTINGS}


def configure_local_cluster(ingress: str) -> str:
    """Prepare this process's environment for a Ray cluster it is about to start: the HTTP
    front door `ingress` asks for (see neo_serve/serve/ingress.py) and `LOCAL_SERVE_SETTINGS`.
    Returns the front door that will be used; raises `IngressUnavailable` like
    `configure_local_ingress`."""
    used = configure_local_ingress(ingress)
    apply_local_serve_settings()
    return used


def stopped_ray_processes() -> list[str]:
    """Which Ray processes ("raylet", "gcs_server", "log_monitor", ...) that this process started
    for its own local cluster have exited since: [] while they run, and for a process that joined
    a cluster (it started none). A signal to the whole process group (`timeout`, `kill -TERM
    -<pgid>`, systemd stopping a service) reaches them as well as this process; Serve's calls then
    wait for ever on a controller whose raylet is gone."""
    try:
        import ray._private.worker as ray_worker

        return sorted({kind for kind, _ in ray_worker.global_worker.node.dead_processes()})
    except Exception:  # noqa: BLE001 - Ray not started here, or a private API gone: no check
        return []


class RayProcessesStopped(Exception):
    """Ray processes this process started for its own cluster stopped (the message names them)."""


def run_while_ray_runs(call: Callable[[], object], *, stop: threading.Event | None = None,
                       poll_s: float = 0.5) -> bool:
    """Run `call()` on a thread of its own and wait until it returns (True), or `stop` is set
    (False: `call` is left to Ray's shutdown), or any of this process's own Ray processes stops
    (raises RayProcessesStopped): Serve's calls wait on its controller without a timeout, for ever
    once a signal to the whole process group has taken its raylet. Raises what `call()` raised."""
    if gone := stopped_ray_processes():  # already: no Serve call at all
        raise RayProcessesStopped(", ".join(gone))
    done = threading.Event()
    failures: list[BaseException] = []

    def run() -> None:
        try:
            call()
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failures.append(exc)
        finally:
            done.set()

    threading.Thread(target=run, name="neo-serve-serve-call", daemon=True).start()
    while not done.wait(poll_s):
        if stop is not None and stop.is_set():
            return False
        if gone := stopped_ray_processes():
            raise RayProcessesStopped(", ".join(gone))
    if failures:
        raise failures[0]
    return True


def shut_down_serve(timeout_s: float = 30.0) -> None:
    """`serve.shutdown()` without Ray's "Task ServeController.graceful_shutdown failed ... killed
    by `ray.kill`" on the console at every stop: Serve's own call waits on its controller until
    the controller kills itself, and Ray reports that open call as a failed task. Here the
    controller is asked to shut down (its applications, proxies and HAProxy) by a call that
    returns at once, and watched until it is gone (at most `timeout_s`); `serve.shutdown()` then
    drops this process's handles, its call to the gone controller failing at once, unreported."""
    import time

    import ray
    from ray import serve
    from ray.serve._private.constants import SERVE_CONTROLLER_NAME, SERVE_NAMESPACE

    def controller():
        try:
            return ray.get_actor(SERVE_CONTROLLER_NAME, namespace=SERVE_NAMESPACE)
        except ValueError:  # no Serve here, or its controller is gone
            return None

    if (running := controller()) is not None:
        deadline = time.monotonic() + timeout_s
        try:
            ray.get(running.graceful_shutdown.remote(wait=False), timeout=timeout_s)
            while controller() is not None and time.monotonic() < deadline:
                time.sleep(0.1)
        except (ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            pass  # gone meanwhile, or stuck: serve.shutdown() below says so
    serve.shutdown()
