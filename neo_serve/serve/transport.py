"""How a replica's deployment handles reach other replicas: Serve's gRPC or Ray actor tasks.

Serve picks a handle's transport when the handle is made, from `RAY_SERVE_USE_GRPC_BY_DEFAULT`
as the making process read it when it imported Serve. The handles the router and the playground
get as arguments (the app's bound pipelines) are made in the driver that built the app, and
`neo-serve up` or a test imports Serve before it sets the variable for the cluster it starts
(`local_cluster.py`), so they would keep Ray actor tasks whatever the cluster asks for. Each
replica therefore sets its handles to its own process's choice, which is the cluster's: local
clusters neo-serve starts use gRPC, a KubeRay cluster whatever its containers' environment says.
"""

from __future__ import annotations

from typing import TypeVar

from ray.serve._private.constants import RAY_SERVE_USE_GRPC_BY_DEFAULT  # read once, at import, as Serve does

H = TypeVar("H")


def uses_grpc() -> bool:
    """Whether this process's Serve sends handle calls over gRPC by default."""
    return RAY_SERVE_USE_GRPC_BY_DEFAULT


def with_cluster_transport(handle: H) -> H:
    """`handle` (a DeploymentHandle) on this process's transport."""
    return handle.options(_by_reference=not uses_grpc())  # type: ignore[attr-defined]


def transport_name(handle: object) -> str:
    """How `handle` (a DeploymentHandle) reaches its replicas."""
    return "actor tasks" if handle.handle_options._by_reference else "grpc"  # type: ignore[attr-defined]
