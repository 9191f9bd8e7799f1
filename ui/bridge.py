"""HTTP over a Serve handle: the router forwards `/ui` requests to the playground replica.

Gradio keeps its queue and sessions in one process, and the router is autoscaled, so the
playground runs in a deployment of its own (one replica) and the router relays each request
to it through a streaming handle call:

    router                                              playground replica
    forward(handle, request) ── asgi.remote(scope, body) ──▶ serve_asgi(app, scope, body)
    StreamingResponse ◀── http.response.start, then http.response.body chunks ── the ASGI app

The scope goes over as the router received it (method, path with the route prefix, root_path,
query string, headers, client), so the playground's app routes and builds URLs exactly as if it
had received the request itself. Body chunks stream back as the app sends them (Gradio's
server-sent events included). A client that hangs up cancels the router's request, which cancels
the handle call, which the app sees as `http.disconnect`.

This module imports no Gradio: the router imports it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from typing import Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

logger = logging.getLogger("ray.serve")

Message = dict[str, Any]
ASGIApp = Callable[[MutableMapping[str, Any], Receive, Send], Awaitable[None]]

# What the router forwards of its request scope; the rest (app, router, route, state, ...) is
# the router's own.
FORWARDED_SCOPE_KEYS = ("type", "http_version", "method", "scheme", "path", "raw_path", "query_string",
                        "root_path", "headers", "client", "server")
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Gradio serves routes that write multipart bodies to temporary files on every app (its upload
# route, process_recording). The playground has no file inputs, and such files would stay on the
# playground node's disk (nothing deletes them): the router refuses these paths and any
# multipart body below /ui before they reach the playground.
REFUSED_PATH_PREFIXES = ("gradio_api/upload",)
# After a client hangs up, how long the app gets to notice `http.disconnect` and return.
DISCONNECT_GRACE_S = 2.0


def refused(path: str, content_type: str | None) -> bool:
    """Whether the router refuses a request to `path` (below /ui) instead of forwarding it."""
    multipart = (content_type or "").strip().lower().startswith("multipart/")
    return multipart or path.lstrip("/").startswith(REFUSED_PATH_PREFIXES)


def forwarded_scope(scope: Scope) -> dict[str, Any]:
    """The picklable part of an HTTP request scope."""
    return {key: scope[key] for key in FORWARDED_SCOPE_KEYS if key in scope}


# ---- playground side ---------------------------------------------------------------------------
_DONE = object()
_background: set[asyncio.Task[None]] = set()  # apps still running after their response (background tasks)


async def serve_asgi(app: ASGIApp, scope: dict[str, Any], body: bytes, *,
                     state: dict[str, Any] | None = None) -> AsyncIterator[Message]:
    """Run one HTTP request through `app`; yield its `http.response.start` and `http.response.body`
    messages as the app sends them. Closing or cancelling the generator (the caller hung up) is
    the app's `http.disconnect`."""
    scope = {**scope, "asgi": {"version": "3.0", "spec_version": "2.3"}, "extensions": {}}
    if state is not None:
        scope["state"] = dict(state)  # a shallow copy per request, as ASGI servers do
    messages: asyncio.Queue[Any] = asyncio.Queue()
    disconnected = asyncio.Event()
    request_read = False

    async def receive() -> Message:
        nonlocal request_read
        if not request_read:
            request_read = True
            return {"type": "http.request", "body": body, "more_body": False}
        await disconnected.wait()  # a streaming response listens for the client hanging up
        return {"type": "http.disconnect"}

    async def send(message: Message) -> None:
        # After the hang-up, drop what the app still sends, as ASGI servers before spec 2.4 do
        # (the scope says 2.3). Raising here (2.4's OSError) ends a Starlette streaming response
        # without cancelling its body iterator: Gradio's event stream is then finalized with
        # GeneratorExit, which skips its `clean_events`, and the run goes on to its last token
        # for nobody. Dropped, the stream's next `is_disconnected()` (or Starlette's disconnect
        # listener) ends it through the path that stops the run.
        if not disconnected.is_set():
            messages.put_nowait(message)

    async def run() -> None:
        try:
            await app(scope, receive, send)
        except Exception as exc:  # the consumer answers 500 if nothing was sent yet
            if disconnected.is_set():  # failed after the hang-up (e.g. reading a body): the client left
                logger.debug("neo-serve playground: %s %s ended, the client left (%r)", scope.get("method"),
                             scope.get("path"), exc)
            else:
                logger.error("neo-serve playground: %s %s failed", scope.get("method"), scope.get("path"),
                             exc_info=exc)
            messages.put_nowait(exc)
        finally:
            messages.put_nowait(_DONE)

    task = asyncio.create_task(run(), name=f"asgi {scope.get('method')} {scope.get('path')}")
    started = completed = False
    try:
        while True:
            item = await messages.get()
            if item is _DONE:
                break
            if isinstance(item, Exception):
                if not started:  # answer 500 rather than leave the router without a response
                    yield {"type": "http.response.start", "status": 500,
                           "headers": [(b"content-type", b"text/plain; charset=utf-8")]}
                    yield {"type": "http.response.body", "body": b"internal error in the playground"}
                break
            if item["type"] == "http.response.start":
                started = True
            yield item
            if item["type"] == "http.response.body" and not item.get("more_body", False):
                completed = True
                break
    finally:
        if not task.done():
            if not completed:
                disconnected.set()  # the caller hung up: let the app see it, then stop it
                task.get_loop().call_later(DISCONNECT_GRACE_S, task.cancel)
            _background.add(task)  # keep a reference until it ends (background tasks may still run)
            task.add_done_callback(_background.discard)


class LifespanManager:
    """Runs an ASGI app's lifespan (what an ASGI server does at start-up and shutdown): Gradio's
    queue starts in its app's lifespan."""

    def __init__(self, app: Any) -> None:
        self._context = app.router.lifespan_context(app)
        self.state: dict[str, Any] = {}

    async def startup(self) -> None:
        self.state = dict(await self._context.__aenter__() or {})

    async def shutdown(self) -> None:
        await self._context.__aexit__(None, None, None)


# ---- router side ------------------------------------------------------------------------------
class BridgedResponse(Response):
    """Relays the playground's messages; headers exactly as the playground's app sent them."""

    def __init__(self, start: Message, messages: Any) -> None:
        self.status_code = start["status"]
        self.raw_headers = [(bytes(k), bytes(v)) for k, v in start.get("headers", [])]
        self.background = None
        self._first = start
        self._messages = messages  # the handle's response generator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        relay = asyncio.ensure_future(self._relay(send))
        hung_up = asyncio.ensure_future(_disconnected(receive))
        try:
            await asyncio.wait({relay, hung_up}, return_when=asyncio.FIRST_COMPLETED)
            if not relay.done():  # the client left (servers that do not cancel the request)
                relay.cancel()
            await asyncio.gather(relay, return_exceptions=True)
            if not hung_up.done() and relay.exception() is not None:
                raise relay.exception()
        finally:
            # Normal end: a no-op. Client gone (here, or Serve cancelling this request): stops the
            # playground's side, which its app sees as http.disconnect.
            relay.cancel()
            hung_up.cancel()
            self._messages.cancel()

    async def _relay(self, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
        async for message in self._messages:
            if message["type"] == "http.response.body":
                await send({"type": "http.response.body", "body": message.get("body", b""),
                            "more_body": message.get("more_body", False)})


async def _disconnected(receive: Receive) -> None:
    """Returns once the client has hung up (the request body is already read)."""
    while (await receive())["type"] != "http.disconnect":
        pass


async def forward(handle: Any, request: Request) -> Response:
    """Send `request` to the deployment behind `handle` (its `asgi(scope, body)` streaming method)
    and relay its response."""
    body = await request.body()
    messages = handle.options(stream=True).asgi.remote(forwarded_scope(request.scope), body)
    try:
        start = await messages.__anext__()
    except BaseException:
        messages.cancel()
        raise
    if start.get("type") != "http.response.start":
        messages.cancel()
        raise RuntimeError(f"the playground answered {start.get('type')!r} before http.response.start")
    return BridgedResponse(start, messages)
