"""`neo-serve drain`: move the serving off a Ray node before it goes (a Kubernetes preStop hook).

A Pod that Kubernetes deletes (a node upgrade, a spot reclaim, `kubectl delete`) kills its Ray
node at once: the pipeline replica on it, and every stream it was generating, end with a 503.
Told first that the node is draining, Ray stops placing work there and Serve's controller
moves each replica on it: it starts a replacement elsewhere, then stops the old replica
gracefully, which finishes its streams (up to its graceful_shutdown_timeout_s) before it exits;
the replica's stage actors go with its placement group.

    neo-serve drain --deadline-s 600        # in the Pod's preStop hook: drain this node, wait

The command tells Ray's GCS that this node will be gone in `deadline_s` (as Ray's own
`ray drain-node` does, reason "preemption", which the GCS always accepts), then waits until no
Serve replica and no stage actor is alive on the node, or until the deadline. Its exit code
says which (0: drained, 1: deadline reached or the cluster stopped answering, 2: bad arguments
or no cluster). Ray's client retries an unreachable GCS for minutes; when a whole cluster is
deleted (a `NewCluster` upgrade) its head goes first, so the command gives up after
`CLUSTER_SILENCE_S` without an answer rather than hold a GPU Pod until its grace period ends.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# Actors that hold serving work: Serve's replicas (ServeReplica:<app>:<deployment>) and
# neo-serve's stage actors. Serve's proxy stays on a draining node until the node goes.
SERVING_ACTOR_PREFIXES = ("ServeReplica:", "StageActor")
DRAIN_REASON = "DRAIN_NODE_REASON_PREEMPTION"
CLUSTER_SILENCE_S = 30.0  # no answer from the cluster for this long: it is going down too


class Watchdog:
    """Ends the process (exit code `code`) unless `kick()`ed every `timeout_s`: Ray's calls to
    an unreachable GCS block for minutes, in a Pod Kubernetes waits for."""

    def __init__(self, timeout_s: float, code: int, message: str) -> None:
        self.timeout_s, self.code, self.message = timeout_s, code, message
        self._timer: threading.Timer | None = None
        self.kick()

    def kick(self, message: str | None = None) -> None:
        self.message = message or self.message
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


def serving_actors_on(node_id: str) -> list[str]:
    """Class names of the live serving actors on `node_id`."""
    # Ray's private GCS view: the public state API (ray.util.state) needs the dashboard, which a
    # cluster may run without, and this runs in a Pod that is about to be killed.
    import ray._private.state as ray_state

    return sorted(info["ActorClassName"] for info in ray_state.actors().values()
                  if info.get("State") == "ALIVE" and info.get("Address", {}).get("NodeID") == node_id
                  and info.get("ActorClassName", "").startswith(SERVING_ACTOR_PREFIXES))


def request_drain(gcs_address: str, node_id: str, deadline_s: float, message: str) -> None:
    """Tell the GCS that `node_id` goes in `deadline_s` (raises RuntimeError if refused)."""
    import ray
    from ray.core.generated import autoscaler_pb2

    deadline_ms = int(time.time() * 1000 + deadline_s * 1000)
    accepted, refusal = ray._raylet.GcsClient(address=gcs_address).drain_node(
        node_id, autoscaler_pb2.DrainNodeReason.Value(DRAIN_REASON), message, deadline_ms)
    if not accepted:
        raise RuntimeError(f"Ray refused to drain node {node_id}: {refusal}")


def wait_until_drained(node_id: str, deadline_s: float, poll_s: float = 2.0,
                       clock: Callable[[], float] = time.monotonic,
                       report: Callable[[str], None] = lambda line: None,
                       answered: Callable[[], None] = lambda: None) -> DrainResult:
    """Poll the node's serving actors until there are none or `deadline_s` has passed;
    `answered()` after each answer from the cluster."""
    started = clock()
    last: list[str] = []
    while True:
        left = serving_actors_on(node_id)
        answered()
        waited = clock() - started
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
                             "a little longer); Serve stops the replicas here at the latest graceful_shutdown_"
                             "timeout_s before it, even if their replacements have not started (default 600)")
    parser.add_argument("--node-id", default=None,
                        help="hex ID of the Ray node to drain (default: the node this runs on)")
    parser.add_argument("--address", default="auto",
                        help="the Ray cluster (default auto: the one this machine's Ray node belongs to)")
    parser.add_argument("--poll-s", type=float, default=2.0, help=argparse.SUPPRESS)
    parser.add_argument("--silence-s", type=float, default=CLUSTER_SILENCE_S, help=argparse.SUPPRESS)


def run_drain(args: argparse.Namespace) -> int:
    if args.deadline_s <= 0:
        print("neo-serve drain: --deadline-s must be above 0", file=sys.stderr)
        return 2
    import ray

    def say(line: str) -> None:
        print(f"neo-serve drain: {line}", flush=True)

    watchdog = Watchdog(args.silence_s, 2, f"no Ray cluster answers at {args.address!r}")
    try:
        ray.init(address=args.address, logging_level="WARNING", log_to_driver=False)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        watchdog.stop()
        print(f"neo-serve drain: no Ray cluster at {args.address!r}: {exc}", file=sys.stderr)
        return 2
    watchdog.kick()
    try:
        node_id = args.node_id or ray.get_runtime_context().get_node_id()
        if node_id not in {node["NodeID"] for node in ray.nodes() if node.get("Alive")}:
            print(f"neo-serve drain: no live Ray node {node_id!r} in this cluster", file=sys.stderr)
            return 2
        gcs_address = ray.get_runtime_context().gcs_address
        try:
            request_drain(gcs_address, node_id, args.deadline_s, "neo-serve drain: the node is being stopped")
            say(f"node {node_id} is draining; Serve moves its replicas (deadline {args.deadline_s:g} s)")
        except RuntimeError as exc:  # e.g. the autoscaler drains this idle node already: still wait
            say(f"{exc}; waiting for its serving actors all the same")
        watchdog.code, watchdog.message = 1, "stopped waiting: the cluster stopped answering"
        result = wait_until_drained(node_id, args.deadline_s, args.poll_s, report=say, answered=watchdog.kick)
        if result.drained:
            say(f"no serving actor left on the node after {result.waited_s:.0f} s")
            return 0
        say(f"deadline reached after {result.waited_s:.0f} s with {', '.join(result.left)} still alive")
        return 1
    finally:
        watchdog.kick("leaving the cluster")  # a disconnect may block as long as a call
        ray.shutdown()
        watchdog.stop()
