"""The playground deployment: exactly one replica running the Gradio app (queue, sessions).

The router forwards `/ui` and `/ui/...` to it over a handle (`bridge.py`); it calls the
pipeline deployments through their handles (`backend.py`). One replica because Gradio keeps
its queue and sessions in process memory: a session's requests (join the queue, the event
stream, cancel) must all reach the same process, which an autoscaled router cannot promise.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import ray
from ray import serve
from ray.serve.handle import DeploymentHandle

from neo_serve.serve.config import SHUTDOWN_POLL_S, PlaygroundArgs, ingress_actor_options
from neo_serve.serve.transport import with_cluster_transport
from neo_serve.ui.backend import PlaygroundBackend, PlaygroundModel
from neo_serve.ui.bridge import LifespanManager, serve_asgi

logger = logging.getLogger("ray.serve")

DEPLOYMENT_NAME = "Playground"


class PlaygroundServer:
    """Serve deployment hosting the Gradio playground; called only by the router's bridge:

        handle.options(stream=True).asgi.remote(scope, body)  ->  ASGI response messages
    """

    async def __init__(self, pipelines: dict[str, DeploymentHandle], models: list[dict[str, Any]],
                     settings: PlaygroundArgs) -> None:
        from neo_serve.ui.blocks import build_asgi_app  # Gradio: imported in the replica only

        pipelines = {name: with_cluster_transport(handle) for name, handle in pipelines.items()}
        backend = PlaygroundBackend(pipelines, [PlaygroundModel(**model) for model in models],
                                    app_name=serve.get_replica_context().app_name,
                                    replica_wait_s=settings.replica_wait_s,
                                    caller=ray.get_runtime_context().current_actor)
        self.app = build_asgi_app(backend, settings)
        self.lifespan = LifespanManager(self.app)
        await self.lifespan.startup()  # starts Gradio's queue
        logger.info("neo-serve playground ready for %s", ", ".join(backend.models))

    async def asgi(self, scope: dict[str, Any], body: bytes) -> AsyncIterator[dict[str, Any]]:
        """One HTTP request (the router's scope and body) through the playground's app; yields the
        response's ASGI messages as they are sent (server-sent events stream)."""
        async for message in serve_asgi(self.app, scope, body, state=self.lifespan.state):
            yield message


PlaygroundDeployment = serve.deployment(PlaygroundServer)


def playground_deployment(settings: PlaygroundArgs, runs_timeout_s: float) -> serve.Deployment:
    """Exactly one replica, whatever the router's scaling (see the module docstring).
    `runs_timeout_s`: the pipelines' longest graceful shutdown, which a run in progress may take."""
    return PlaygroundDeployment.options(
        name=DEPLOYMENT_NAME,
        num_replicas=1,
        ray_actor_options=ingress_actor_options(settings.num_cpus, settings.resources),
        # Every open page holds an event stream; static files and API calls come on top.
        max_ongoing_requests=1024,
        # Its open requests are runs in progress (an idle page holds no event stream: the blocks
        # need no heartbeat, a test checks), which may last as long as the pipelines drain. Cut
        # at 5 s, as before, a redeploy showed "Connection errored out" in every running page.
        graceful_shutdown_timeout_s=runs_timeout_s,
        graceful_shutdown_wait_loop_s=SHUTDOWN_POLL_S,
        # Each request already has the router's access-log line (a page load is ~65 of them);
        # this replica's "CALL asgi OK" twin only doubled them. Its errors are still logged.
        logging_config={"enable_access_log": False},
    )
