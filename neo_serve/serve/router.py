"""The router: the application's ingress deployment (FastAPI), stateless, routing by model name.

HTTP: `POST /v1/completions`, `GET /v1/models`, `GET /health`, vLLM's `/tokenize`, `/detokenize`
and `/tokenizer_info`, the API's description at `/openapi.json` and `/docs`; errors as OpenAI
error JSON.
`GET /` sends a browser on to the playground, or lists the routes when there is none.
`/ui` and `/ui/...` (the Gradio playground) are relayed to the one-replica playground deployment
(`neo_serve.ui.bridge`): Gradio's sessions live in one process, this router is autoscaled.
Python: `serve.get_app_handle(app).generate.remote(prompt=..., ...)` returns the same JSON as
HTTP (a dict); `handle.options(stream=True).generate.remote(..., stream=True)` yields the
stream's chunks (dicts).
"""

# No `from __future__ import annotations`: FastAPI must see real annotations on the ingress methods.
import asyncio
import json
import logging
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import ray
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, RedirectResponse, StreamingResponse
from fastapi_offline import FastAPIOffline
from pydantic import BaseModel
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from neo_serve.serve.access import DOCS_ASSETS, OPEN_PATHS, AccessMiddleware, load_api_keys
from neo_serve.serve.completions import CompletionEvents, CompletionService, as_api_error, model_not_found, parse_body
from neo_serve.serve.config import RouteLimits, RouterArgs, ingress_actor_options
from neo_serve.serve.error_logs import log_client_errors_as_one_line, quiet_playground_asset_logs
from neo_serve.serve.protocol import (APIError, CompletionRequest, DetokenizeRequest, ModelCard, ModelList,
                                      TokenizeRequest, error_name)
from neo_serve.serve.transport import transport_name, with_cluster_transport
from neo_serve.ui import bridge

logger = logging.getLogger("ray.serve")

# /docs and /redoc load Swagger UI's and ReDoc's scripts from the router (DOCS_ASSETS), not from
# a CDN as FastAPI's own pages do: offline, or in an air-gapped cluster, those stayed blank.
api = FastAPIOffline(title="neo-serve", description="OpenAI-compatible completions for GPT-NeoX / GPT-Neo models, "
                                                    "served as pipelines on Ray Serve.", static_url=DOCS_ASSETS)


class _AccessSettings:
    """Filled in by the Router when its replica starts (one Router per replica process)."""

    api_keys: tuple[bytes, ...] = ()
    max_body_bytes: int = 8 * 2**20
    playground: bool = True  # whether /ui/login and /ui/logout sign in to anything


_access = _AccessSettings()
api.add_middleware(AccessMiddleware, settings=_access)


def json_body(model: type[BaseModel], example: dict[str, Any]) -> dict[str, Any]:
    """A route's `openapi_extra` for a JSON body that `model` describes. The routes read the raw
    request (a bad body is answered with OpenAI's error JSON, naming the field), so FastAPI cannot
    see the body's model: without this, /openapi.json has no body and /docs nothing to try."""
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node: Any) -> Any:  # "#/$defs/..." would point into the OpenAPI document's root
        if isinstance(node, dict):
            if "$ref" in node:
                return inline(definitions[node["$ref"].rsplit("/", 1)[-1]])
            return {key: inline(value) for key, value in node.items()}
        return [inline(value) for value in node] if isinstance(node, list) else node

    return {"requestBody": {"required": True, "content": {"application/json": {
        "schema": inline(schema), "example": example}}}}


def _openapi_with_api_keys() -> dict[str, Any]:
    """FastAPI's description of the API, with the API keys as a bearer scheme, so that /docs
    offers an Authorize button (the keys are checked by the access middleware, not by FastAPI),
    and none on the paths the middleware leaves open."""
    schema = FastAPI.openapi(api)
    schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {
        "type": "http", "scheme": "bearer",
        "description": "One of the router's API keys, when it has any (api_keys_env / api_keys_file)"}}
    schema["security"] = [{"apiKey": []}]
    for path, operations in schema.get("paths", {}).items():
        if path in OPEN_PATHS:
            for operation in operations.values():
                operation["security"] = []
    return schema


api.openapi = _openapi_with_api_keys  # type: ignore[method-assign]


@api.exception_handler(APIError)
async def _api_error(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(exc.to_dict(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    return JSONResponse(APIError(str(exc)).to_dict(), status_code=400)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    error_type = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    message = str(exc.detail)
    if exc.status_code == 404 and message == "Not Found":  # no such route: say which there are, as OpenAI does
        message = (f"Invalid URL ({request.method} {request.url.path}): this server answers POST /v1/completions, "
                   "GET /v1/models, GET /v1/models/{model}, POST /tokenize, POST /detokenize, GET /tokenizer_info "
                   "and GET /health")
    return JSONResponse(APIError(message, status=exc.status_code, type=error_type).to_dict(),
                        status_code=exc.status_code, headers=exc.headers)  # e.g. a 405's Allow


@api.exception_handler(Exception)
async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    error = _client_error(exc)  # e.g. an invalid prompt or a failed pipeline, raised in a replica
    return JSONResponse(error.to_dict(), status_code=error.status, headers=error.headers)


def _client_error(exc: Exception) -> APIError:
    """What a client gets for `exc` (a JSON answer, a stream's error event, a handle caller's
    exception): its APIError, or a 500 whose details stay in the log (logged here)."""
    error = as_api_error(exc)
    if error is None:
        logger.error("neo-serve router: unhandled error", exc_info=exc)
        error = _internal_api_error(exc)
    return error


def _internal_api_error(exc: BaseException) -> APIError:
    """A 500 for an unexpected error. The details stay in the log: a replica's error carries its
    remote traceback (file paths, pid, node address), which is not the client's business."""
    return APIError(f"internal error ({error_name(exc)}); the server log has the details", status=500,
                    type="server_error")


def not_ready(model: str, exc: BaseException) -> dict[str, Any]:
    """/health's entry for a pipeline whose `ready` call failed. /health needs no API key, so the
    error's text (a replica's traceback: file paths, pid, node address) goes to the log only."""
    logger.warning("neo-serve router: %s is not ready: %r", model, exc)
    return {"model": model, "ready": False,
            "detail": f"not ready ({error_name(exc)}); the router's log has the details"}


# Serve's status message for a replica it cannot place: "... Resources required for each replica:
# [{"CPU": 3.0}, {"CPU": 1.0}], total resources available: {...}. Use `ray status` ..." (JSON).
_UNPLACED = re.compile(r"Resources required for each replica: (?P<required>.*?), total resources available")


def serve_status_detail(message: str) -> str | None:
    """Why Serve has no replica of a pipeline running, for /health, from its deployment status
    message. /health needs no API key: only what the app's own config says (the bundles one
    pipeline needs), never the cluster's resources (node addresses) or a failed start's traceback."""
    if match := _UNPLACED.search(message):
        return (f"Serve cannot place a pipeline yet: each needs {match['required']} "
                "(`ray status` shows what the cluster has; an autoscaling cluster may be adding a node)")
    if "failed to start" in message or "constructor" in message:
        return "Serve could not start a pipeline (`serve status` and the Serve controller's log have the error)"
    return None


def _check_content_type(request: Request) -> None:
    """JSON bodies only, as FastAPI's own body parsing has it: a web page on another site can POST
    text/plain, form or multipart bodies without the browser asking first (no CORS preflight),
    which on a server without API keys would spend the model's compute. A body without a
    Content-Type is read as JSON, unless a browser sent it (an `Origin` header): a page's
    `fetch` of an untyped body sends none, also without a preflight."""
    value = request.headers.get("content-type")
    if value is None and request.headers.get("origin") is None:
        return
    media = (value or "").split(";", 1)[0].strip().lower()
    if media == "application/json" or (media.startswith("application/") and media.endswith("+json")):
        return
    got = media[:100] or ("an empty Content-Type" if value is not None else "none, from a browser")
    raise APIError(f"the request body must be JSON, sent with Content-Type: application/json (got {got})",
                   status=415, code="unsupported_media_type")


async def _json_body(request: Request) -> Any:
    _check_content_type(request)
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise APIError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise APIError("the request body is nested too deeply") from None
    except ValueError as exc:  # e.g. an integer literal beyond Python's digit limit
        raise APIError(f"the request body cannot be read: {exc}") from None


async def _sse(events: AsyncIterator[dict[str, Any]]) -> AsyncIterator[str]:
    """Server-sent events; an error after the stream started becomes an error event."""
    try:
        async for event in events:
            yield f"data: {json.dumps(event, ensure_ascii=False)}\n\n"
    except Exception as exc:  # noqa: BLE001 - the status line is already sent
        logger.warning("neo-serve stream failed: %r", exc)
        error = _client_error(exc)
        yield f"data: {json.dumps(error.to_dict())}\n\n"
    yield "data: [DONE]\n\n"


def share_a_tokenizer(tokenizer_infos: list[dict[str, Any]]) -> bool:
    """Whether models with these /tokenizer_info answers encode and bound a text alike."""
    return len({(info["tokenizer_sha256"], info["model_max_length"]) for info in tokenizer_infos}) == 1


class _EventStreamResponse(StreamingResponse):
    """Server-sent events of a started completion, whose pipeline calls are cancelled when the
    response ends however it ends: also if the client went away before the body began, when
    `_sse` never runs (Starlette cancels it unstarted once it sees the disconnect)."""

    def __init__(self, events: CompletionEvents) -> None:
        super().__init__(_sse(events), media_type="text/event-stream")
        self.events = events

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.events.aclose()


async def _await(response: Any) -> Any:
    return await response


@serve.ingress(api)
class Router:
    """Ingress deployment: OpenAI HTTP API and the `generate` handle method, routing by model."""

    def __init__(self, pipelines: dict[str, DeploymentHandle], cards: list[dict[str, Any]],
                 settings: RouterArgs, playground: DeploymentHandle | None = None,
                 limits: dict[str, RouteLimits] | None = None) -> None:
        log_client_errors_as_one_line()  # a handle caller's bad parameter: a line, not a traceback
        if playground is not None:
            quiet_playground_asset_logs()  # not a line per page asset in the terminal
        pipelines = {name: with_cluster_transport(handle) for name, handle in pipelines.items()}
        if playground is not None:
            playground = with_cluster_transport(playground)
        self.service = CompletionService(pipelines, limits, log_requests=settings.log_requests,
                                         caller=ray.get_runtime_context().current_actor)
        self.cards = [ModelCard(**card) for card in cards]
        self.settings = settings
        self.playground = playground
        # Models whose pipeline has answered `ready` once. They are not asked again while Serve's
        # controller counts a RUNNING pipeline replica of theirs: the question waits in the
        # pipeline's request queue, so under load it would time out or be refused (429), and a
        # readiness probe would take a busy router out of its load balancer. Serve health-checks
        # the pipeline replicas and replaces failed ones itself.
        # Each such model's answer, given again while it stays loaded: a probe that parses
        # /health sees the same fields whether its call asked the pipeline or not.
        self._loaded: dict[str, dict[str, Any]] = {}
        # Models with no pipeline running, as last counted, each with Serve's status message of its
        # deployment (a replica it cannot place, one that fails to start; "" if none), for /health.
        self._without: dict[str, str] = {}
        self._status_at = -float("inf")
        # The model that answers the tokenizer routes without a `model` when several share one
        # tokenizer ("" if they do not; None until asked).
        self._shared_tokenizer: str | None = None
        self._status_call: asyncio.Future[Any] | None = None
        _access.api_keys = load_api_keys(settings.api_keys_env, settings.api_keys_file)
        _access.max_body_bytes = settings.max_body_bytes
        _access.playground = playground is not None

    # ---- HTTP --------------------------------------------------------------------------------
    @api.post("/v1/completions", openapi_extra=json_body(CompletionRequest, {
        "prompt": "def hello_world():", "max_tokens": 32, "temperature": 0}))
    async def completions(self, request: Request):
        """OpenAI completions; `stream: true` answers with server-sent events ending in `[DONE]`."""
        completion_request = self.service.parse(await _json_body(request))
        if completion_request.stream:
            return _EventStreamResponse(await self.service.stream(completion_request))
        return JSONResponse(await self.service.complete(completion_request))

    @api.get("/", include_in_schema=False)
    async def root(self, request: Request):
        """What a browser opening the server's address gets: the playground, else the routes.
        (Answers without a key: it names no model.)"""
        root_path = request.scope.get("root_path", "")
        if self.playground is not None:
            return RedirectResponse(f"{root_path}/ui/", status_code=302)
        return JSONResponse({"service": "neo-serve", "routes": {
            "completions": f"{root_path}/v1/completions", "models": f"{root_path}/v1/models",
            "health": f"{root_path}/health", "api_docs": f"{root_path}/docs"}})

    @api.get("/v1/models")
    async def models(self) -> dict[str, Any]:
        return ModelList(data=self.cards).model_dump()

    @api.get("/v1/models/{model:path}")  # `path`: a served name may hold slashes (EleutherAI/pythia-160m)
    async def model(self, model: str) -> dict[str, Any]:
        """One model's card (OpenAI's `models.retrieve`)."""
        card = next((card for card in self.cards if card.id == model), None)
        if card is None:
            raise model_not_found(model, [card.id for card in self.cards])
        return card.model_dump()

    # ---- tokenizer (vLLM's routes; lm-evaluation-harness's remote tokenizer finds them) ---------
    @api.post("/tokenize", openapi_extra=json_body(TokenizeRequest, {"prompt": "def hello_world():"}))
    async def tokenize(self, request: Request) -> dict[str, Any]:
        """`prompt` as token ids, as /v1/completions encodes it: {"tokens", "count", "max_model_len"}."""
        body = parse_body(TokenizeRequest, await _json_body(request))
        model = await self._tokenizer_model(body.model)
        return await self._pipeline_call(self.service.pipelines[model].tokenize.remote(body.prompt))

    @api.post("/detokenize", openapi_extra=json_body(DetokenizeRequest, {"tokens": [1, 2, 3]}))
    async def detokenize(self, request: Request) -> dict[str, Any]:
        """The text of `tokens`: {"prompt"}."""
        body = parse_body(DetokenizeRequest, await _json_body(request))
        model = await self._tokenizer_model(body.model)
        return {"prompt": await self._pipeline_call(self.service.pipelines[model].detokenize.remote(body.tokens))}

    @api.get("/tokenizer_info")
    async def tokenizer_info(self, model: str | None = None) -> dict[str, Any]:
        """The model's special tokens (`eos_token` ...) and context window (`?model=` with several
        whose tokenizers or windows differ)."""
        name = await self._tokenizer_model(model)
        info = await self._pipeline_call(self.service.pipelines[name].tokenizer_info.remote())
        if model is None and len(self.service.pipelines) > 1:
            info["model"] = None  # the answer of every model served, not only the one that gave it
        return info

    async def _tokenizer_model(self, model: str | None) -> str:
        """The model whose tokenizer answers a tokenizer route: the one named, the only one, or,
        with several served and none named, the first if they all share one tokenizer and context
        window. lm-evaluation-harness's remote tokenizer names no model; without this it fell back
        to a Hub download of the served name, which fails offline."""
        pipelines = self.service.pipelines
        if model is not None or len(pipelines) == 1:
            return self.service.resolve_model(model)
        if self._shared_tokenizer is None:  # asked once: a router lives as long as its app's models
            infos = await asyncio.gather(*(self._pipeline_call(handle.tokenizer_info.remote())
                                           for handle in pipelines.values()))
            self._shared_tokenizer = next(iter(pipelines)) if share_a_tokenizer(infos) else ""
        if not self._shared_tokenizer:
            raise APIError(f"model is required: the served models ({', '.join(pipelines)}) differ in tokenizer or "
                           "context window", param="model")
        return self._shared_tokenizer

    async def _pipeline_call(self, response: Any) -> Any:
        try:
            return await response
        except Exception as exc:  # noqa: BLE001 - an invalid id, no replica: as the completions answer it
            raise _client_error(exc) from None

    @api.post("/v1/chat/completions", include_in_schema=False)
    async def chat_completions(self) -> None:
        """Not served, and said so: the GPT-NeoX and GPT-Neo checkpoints are base models without a
        chat template (vLLM answers such a model's chat request with a 400 too)."""
        raise APIError("chat completions are not supported: the served models are base models without a chat "
                       "template; send the text to continue as `prompt` to POST /v1/completions",
                       code="chat_not_supported")

    @api.get("/health")
    @api.head("/health", include_in_schema=False)  # some load balancers probe with HEAD
    async def health(self) -> JSONResponse:
        """200 once every stage of every model's pipeline is loaded, else 503."""
        # A model whose pipelines are all gone (a lost node, a failed recovery, an override that
        # restarts them) is loading again: asked `ready` again, as at the start, until one answers.
        without = await self._without_pipelines()
        for name in without:
            self._loaded.pop(name, None)
        pending = [name for name in self.service.pipelines if name not in self._loaded]
        states = await asyncio.gather(*(self._ready(name, self.service.pipelines[name]) for name in pending))
        self._loaded.update((name, state) for name, state in zip(pending, states) if state.get("ready"))
        answers = dict(zip(pending, states))
        models = {name: answers.get(name) or self._loaded[name] for name in self.service.pipelines}
        for name, state in models.items():
            # Why a probe has been failing for minutes (no GPU node yet, a checkpoint that fails to load).
            if not state.get("ready") and (reason := serve_status_detail(without.get(name, ""))):
                models[name] = {**state, "detail": f"{state.get('detail', 'loading')}; {reason}"}
        ready = all(state.get("ready") for state in models.values())
        return JSONResponse({"status": "ok" if ready else "loading", "models": models},
                            status_code=200 if ready else 503)

    async def _without_pipelines(self) -> dict[str, str]:
        """Models that Serve's controller counts no RUNNING pipeline replica of while it wants
        some (not HEALTHY: a model scaled to zero on purpose is not loading), each with the
        status message Serve gives its deployment ("" if none). Asked at most once a
        second and for at most health_timeout_s, one question shared by concurrent probes; when
        the controller does not answer, the last answer stands."""
        if time.monotonic() - self._status_at > 1.0:
            if self._status_call is None or self._status_call.done():
                self._status_call = asyncio.ensure_future(asyncio.to_thread(serve.status))
            try:
                status = await asyncio.wait_for(asyncio.shield(self._status_call), self.settings.health_timeout_s)
                deployments = status.applications[serve.get_replica_context().app_name].deployments
                states = {name: deployments[handle.deployment_name] for name, handle in self.service.pipelines.items()}
                self._without = {name: state.message or "" for name, state in states.items()
                                 if not state.replica_states.get("RUNNING") and state.status != "HEALTHY"}
                self._status_at = time.monotonic()
            except Exception as exc:  # noqa: BLE001 - without the controller, trust what `ready` said
                logger.warning("neo-serve router: no deployment status from Serve: %r", exc)
        return self._without

    async def _ready(self, name: str, handle: DeploymentHandle) -> dict[str, Any]:
        # A pipeline replica answers only once constructed, i.e. with all stages loaded; until
        # then the call waits in the handle's queue, so a timeout means "still loading".
        response = handle.ready.remote()
        try:
            return await asyncio.wait_for(_await(response), self.settings.health_timeout_s)
        except asyncio.TimeoutError:
            response.cancel()
            return {"model": name, "ready": False, "detail": "no replica with loaded stages yet"}
        except Exception as exc:  # noqa: BLE001 - a failing pipeline is "not ready"
            return not_ready(name, exc)

    @api.api_route("/ui", methods=bridge.METHODS, include_in_schema=False)
    @api.api_route("/ui/{path:path}", methods=bridge.METHODS, include_in_schema=False)
    async def playground_ui(self, request: Request):
        """The Gradio playground, relayed to its deployment (streams, e.g. Gradio's events)."""
        if self.playground is None:
            raise APIError("the playground is disabled in this application (build arg playground: false)",
                           status=404, type="not_found_error")
        if bridge.refused(request.path_params.get("path", ""), request.headers.get("content-type")):
            raise APIError("the playground takes no file uploads", status=404, type="not_found_error")
        try:
            return await bridge.forward(self.playground, request)
        except Exception as exc:  # noqa: BLE001 - e.g. the playground replica is being replaced
            logger.warning("neo-serve playground unavailable: %r", exc)
            raise APIError(f"the playground is unavailable: {type(exc).__name__}", status=503,
                           type="service_unavailable_error") from None

    # ---- Python handle -----------------------------------------------------------------------
    async def generate(self, request: CompletionRequest | dict[str, Any] | None = None, **params: Any):
        """The completions API for Python callers, with the HTTP parameters as keywords:

            await handle.generate.remote(model="neo-demo", prompt="def f(", max_tokens=16)
            async for chunk in handle.options(stream=True).generate.remote(prompt="...", stream=True): ...

        Returns the response dict (as HTTP's JSON), or with `stream=True` an async iterator of
        chunk dicts. Errors are `APIError`s (with `.status`, `.param`, `.retry_after_s`) as HTTP
        would answer them: an invalid request, a full queue, a pipeline lost mid-request."""
        if isinstance(request, str):
            raise APIError("the request must be keywords (generate.remote(prompt=..., max_tokens=...)) or one dict "
                           "of them, not a bare prompt", param="prompt")
        if request is not None and params:
            raise APIError("pass the request either as one dict or as keywords, not both "
                           f"(got a {type(request).__name__} and {', '.join(sorted(params))})")
        completion_request = self.service.parse(request if request is not None else params)
        if completion_request.stream:
            # Started on the first iteration, not here: a call without `handle.options(stream=True)`
            # gets Serve's "returned a generator" error before any sequence runs, instead of
            # leaving sequences generating for a stream no one will read.
            return self._stream_for_handle(completion_request)
        try:
            return await self.service.complete(completion_request)
        except Exception as exc:  # noqa: BLE001 - as HTTP's answer: 503 + retry hint, or a 500
            raise _client_error(exc) from None

    async def _stream_for_handle(self, completion_request: CompletionRequest) -> AsyncIterator[dict[str, Any]]:
        events = None
        try:
            events = await self.service.stream(completion_request)
            async for event in events:
                yield event
        except Exception as exc:  # noqa: BLE001 - as HTTP's error event
            raise _client_error(exc) from None
        finally:
            if events is not None:
                await events.aclose()  # now, not at garbage collection: it cancels the sequences

    async def list_models(self) -> list[str]:
        return list(self.service.pipelines)

    async def stats(self) -> dict[str, Any]:
        """Each model's pipeline stats (from one of its replicas)."""
        names = list(self.service.pipelines)
        stats = await asyncio.gather(*(self.service.pipelines[n].stats.remote() for n in names))
        # How this router reaches the pipelines (see neo_serve/serve/transport.py).
        return {name: {**model_stats, "router_transport": transport_name(self.service.streaming[name])}
                for name, model_stats in zip(names, stats)}


RouterDeployment = serve.deployment(Router)


# How much longer a router drains than the pipelines whose streams it relays. A redeploy stops the
# old router and the old pipelines in the same controller pass: with equal deadlines both were
# killed together and a stream cut mid-body, where the router should outlive its pipeline long
# enough to send the client the 503 error event and [DONE].
ROUTER_DRAIN_MARGIN_S = 30.0


def router_deployment(settings: RouterArgs, relayed_timeout_s: float) -> serve.Deployment:
    """`relayed_timeout_s`: the pipelines' (and the playground's) longest graceful shutdown. A
    router replica relays their streams, so one that autoscaling or a redeploy removes must not
    cut them sooner (Serve's default: 20 s): it drains for that plus ROUTER_DRAIN_MARGIN_S."""
    return RouterDeployment.options(
        name="Router",
        ray_actor_options=ingress_actor_options(settings.num_cpus, settings.resources),
        max_ongoing_requests=settings.max_ongoing_requests,
        graceful_shutdown_timeout_s=relayed_timeout_s + ROUTER_DRAIN_MARGIN_S,
        **settings.scaling_options(),
    )
