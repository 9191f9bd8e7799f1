"""`neo-serve drain`: move the serving off a Ray node before it goes (a Kubernetes preStop hook).

A Pod that Kubernetes deletes (a node upgrade, `kubectl drain`, `kubectl delete`) kills its Ray
node at once: the pipeline replica on it, and every stream it was generating, end with a 503.
Told first that the node is draining, Ray stops placing work there and Serve's controller
moves each replica on it: it starts a replacement elsewhere, then stops the old replica
gracefully, which finishes its streams (up to its graceful_shutdown_timeout_s) before it exits;
the replica's stage actors go with its placement group. Once no replica is left, Serve drains
the node's HTTP proxy too: it fails KubeRay's readiness check (so the Pod leaves the Service)
and stops once no request passes through it any more (after at least 30 s).

    neo-serve drain --deadline-s 900        # in the Pod's preStop hook: drain this node, wait

The command tells Ray's GCS that this node will be gone in `deadline_s` (as Ray's own
`ray drain-node` does, reason "preemption", which the GCS always accepts), then waits until no
Serve replica, stage actor or Serve proxy is alive on the node, or until the deadline. It talks
to the GCS alone, with no Ray driver: the node's own raylet may already be shutting down. Exit
code 0: drained (or the node was already gone); 1: deadline reached or the cluster stopped
answering; 2: bad arguments or no cluster. Ray's client retries an unreachable GCS for minutes,
and when a whole cluster is deleted (a `NewCluster` upgrade) its head goes down with the
workers, so the command gives up after `CLUSTER_SILENCE_S` without an answer rather than hold a
GPU Pod for its whole grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

# Actors that hold serving work on a node: Serve's replicas (ServeReplica:<app>:<deployment>),
# neo-serve's stage actors, and Serve's HTTP proxy, through which clients' streams may still pass:
# its Python proxy, or with RAY_SERVE_ENABLE_HA_PROXY=1 the HAProxy manager in its place (Serve
# drains either the same way; the HAProxy case has not been tried on a cluster).
SERVING_ACTOR_PREFIXES = ("ServeReplica:", "StageActor", "ProxyActor", "HAProxyManager")
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
CLUSTER_SILENCE_S = 30.0  # no answer from the cluster for this long: it is going down too
GCS_CALL_TIMEOUT_S = 10.0


class Watchdog:
    """Ends the process (exit code `code`) unless `kick()`ed every `timeout_s`: a call to an
    unreachable GCS can block for minutes, in a Pod that Kubernetes waits for."""

    def __init__(self, timeout_s: float, code: int, message: str) -> None:
        self.timeout_s, self.code, self.message = timeout_s, code, message
        self._timer: threading.Timer | None = None
        self.kick()

    def kick(self, message: str | None = None, code: int | None = None) -> None:
        self.message = message or self.message
        self.code = self.code if code is None else code
        self.stop()
        self._timer = threading.Timer(self.timeout_s, self._expire)
        self._timer.daemon = True
        self._timer.start()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()

    def _expire(self) -> None:
        print(f"neo-serve drain: {self.message} (no answer for {self.timeout_s:g} s)", file=sys.stderr, flush=True)
        os._exit(self.code)


@dataclass(frozen=True)
class DrainResult:
    node_id: str
    drained: bool                # no serving actor left on the node before the deadline
    waited_s: float
    left: tuple[str, ...]        # the serving actors still alive when it stopped waiting


class ClusterState:
    """The GCS's view of nodes and actors, through Ray's GCS client (no driver, no raylet)."""

    def __init__(self, gcs_address: str) -> None:
        import ray._raylet

        self.gcs_address = gcs_address
        self.client = ray._raylet.GcsClient(address=gcs_address)

    def nodes(self) -> dict[str, dict[str, Any]]:
        """Node ID (hex) -> {"ip", "alive"} of every node the GCS knows."""
        from ray.core.generated import gcs_pb2

        alive = gcs_pb2.GcsNodeInfo.GcsNodeState.Value("ALIVE")
        return {info.node_id.hex(): {"ip": info.node_manager_address, "alive": info.state == alive}
                for info in self.client.get_all_node_info(timeout=GCS_CALL_TIMEOUT_S).values()}

    def serving_actors_on(self, node_id: str) -> list[str]:
        """Class names of the live serving actors on `node_id`."""
        async def alive_actors() -> dict[Any, Any]:  # the client binds its future to the running loop
            return await self.client.async_get_all_actor_info(actor_state_name="ALIVE", timeout=GCS_CALL_TIMEOUT_S)

        actors = asyncio.run(alive_actors())
        return sorted(info.class_name for info in actors.values()
                      if info.address.node_id.hex() == node_id and info.class_name.startswith(SERVING_ACTOR_PREFIXES))

    def request_drain(self, node_id: str, deadline_s: float, message: str) -> None:
        """Tell the GCS that `node_id` goes in `deadline_s` (raises RuntimeError if refused)."""
        from ray.core.generated import autoscaler_pb2

        deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
        accepted, refusal = self.client.drain_node(node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON),
                                                   message, deadline_ms, timeout=GCS_CALL_TIMEOUT_S)
        if not accepted:
            raise RuntimeError(f"Ray refused to drain node {node_id}: {refusal}")


def local_node(nodes: dict[str, dict[str, Any]], ip: str) -> str | None:
    """The one live node at `ip` (a Pod's own node); None if there is none. Several (Ray nodes
    sharing one machine) need `--node-id`."""
    here = [node_id for node_id, node in nodes.items() if node["alive"] and node["ip"] == ip]
    if len(here) > 1:
        raise ValueError(f"{len(here)} live Ray nodes at {ip}: name the one to drain with --node-id")
    return here[0] if here else None


def wait_until_drained(state: ClusterState, node_id: str, deadline_s: float, poll_s: float = 2.0,
                       report: Callable[[str], None] = lambda line: None,
                       answered: Callable[[], None] = lambda: None) -> DrainResult:
    """Poll the node's serving actors until there are none or `deadline_s` has passed;
    `answered()` after each answer from the cluster."""
    from ray.exceptions import RayError

    started = time.monotonic()
    last: list[str] = []
    while True:
        try:
            left = state.serving_actors_on(node_id)
            answered()
        except (RayError, TimeoutError, ConnectionError) as exc:  # a GCS that is busy or restarting:
            report(f"no answer from the cluster ({type(exc).__name__}); asking again")  # the watchdog decides
            left = last or ["(unknown)"]
        waited = time.monotonic() - started
        if not left:
            return DrainResult(node_id, True, waited, ())
        if waited >= deadline_s:
            return DrainResult(node_id, False, waited, tuple(left))
        if left != last:
            report(f"waiting for {len(left)} serving actor(s) on this node: {', '.join(left)}")
            last = left
        time.sleep(min(poll_s, max(0.0, deadline_s - waited)))


def add_drain_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--deadline-s", type=float, default=600.0, metavar="S",
                        help="seconds until the node is killed (keep the Pod's terminationGracePeriodSeconds "
                             "at least 60 s longer); Serve stops the replicas here at the latest graceful_shutdown_"
                             "timeout_s before it, even if their replacements have not started (default 600)")
    parser.add_argument("--node-id", default=None,
                        help="hex ID of the Ray node to drain (default: the live node at this machine's IP)")
    parser.add_argument("--address", default="auto",
                        help="the cluster's GCS, host:port (default auto: the cluster this machine's Ray node "
                             "belongs to, or $RAY_ADDRESS)")
    parser.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--silence-s", type=float, default=CLUSTER_SILENCE_S, help=argparse.SUPPRESS)


def run_drain(args: argparse.Namespace) -> int:
    if args.deadline_s <= 0:
        print("neo-serve drain: --deadline-s must be above 0", file=sys.stderr)
        return 2
    from ray._private import services

    def say(line: str) -> None:
        print(f"neo-serve drain: {line}", flush=True)

    def fail(line: str) -> int:
        print(f"neo-serve drain: {line}", file=sys.stderr, flush=True)
        return 2

    from ray.exceptions import RayError

    watchdog = Watchdog(args.silence_s, 2, f"no Ray cluster answers at {args.address!r}")
    try:
        try:
            gcs_address = services.canonicalize_bootstrap_address_or_die(args.address)
            state = ClusterState(gcs_address)
            nodes = state.nodes()
        except (ConnectionError, RuntimeError, ValueError, TimeoutError, RayError) as exc:
            return fail(f"no Ray cluster at {args.address!r}: {exc}")
        watchdog.kick(f"the Ray cluster at {gcs_address} stopped answering", code=1)
        node_id = args.node_id.lower() if args.node_id else None
        if node_id is None:
            ip = services.get_node_ip_address()
            try:
                node_id = local_node(nodes, ip)
            except ValueError as exc:
                return fail(str(exc))
            if node_id is None:  # e.g. the autoscaler drained this idle node and its raylet exited
                say(f"no live Ray node at {ip}: nothing to drain")
                return 0
        elif node_id not in nodes:
            return fail(f"no Ray node {node_id!r} in the cluster at {gcs_address}")
        elif not nodes[node_id]["alive"]:
            say(f"node {node_id} is gone already: nothing to drain")
            return 0
        try:
            state.request_drain(node_id, args.deadline_s, "neo-serve drain: the node is being stopped")
            say(f"node {node_id} is draining; Serve moves its replicas (deadline {args.deadline_s:g} s)")
        except (RuntimeError, TimeoutError, RayError) as exc:  # e.g. Ray drains it already: still wait
            say(f"{exc}; waiting for its serving actors all the same")
        watchdog.kick()
        result = wait_until_drained(state, node_id, args.deadline_s, args.poll_s, report=say, answered=watchdog.kick)
        if result.drained:
            say(f"no serving actor left on the node after {result.waited_s:.0f} s")
            return 0
        say(f"deadline reached after {result.waited_s:.0f} s with {', '.join(result.left)} still alive")
        return 1
    finally:
        watchdog.stop()
