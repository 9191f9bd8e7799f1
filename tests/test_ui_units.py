"""The playground's parts without a cluster: the replica side of the HTTP-over-handle bridge,
the figures, the settings and the error messages people see."""

from __future__ import annotations

import asyncio
import html
import logging
import re

import pytest
from fastapi import FastAPI, Request
from starlette.responses import PlainTextResponse, StreamingResponse

from neo_serve.errors import InvalidRequestError, PipelineFailed
from neo_serve.serve.outputs import GenerationChunk, SequenceDelta
from neo_serve.ui import bridge
from neo_serve.ui.backend import (PlaygroundBackend, PlaygroundError, PlaygroundModel, Run, describe_error, parse_seed,
                                  parse_stop, sampling_params)

MODEL = PlaygroundModel("neo-demo", "Pipeline-neo-demo", num_stages=2, max_model_len=512)


# ---- bridge -----------------------------------------------------------------------------------
# The replica side of the HTTP-over-handle bridge, called as the Playground replica calls it. The
# whole chain (router -> Serve handle -> replica -> Gradio, and a client hanging up) runs for real
# in test_ui_playground.py.
def playground_app(events: list[str]) -> FastAPI:
    inner = FastAPI()

    @inner.post("/ui/echo")
    async def echo(request: Request):
        body = await request.body()
        return PlainTextResponse(f"{request.method} {request.url.path} {request.url.query} "
                                 f"{request.scope['root_path']!r} {body.decode()}",
                                 headers={"x-extra": "1"})

    @inner.get("/ui/events")
    async def events_stream(request: Request):
        async def tick():
            try:
                for i in range(1000):
                    yield f"data: {i}\n\n"
                    await asyncio.sleep(0.01)
            finally:
                events.append("stream closed")
        return StreamingResponse(tick(), media_type="text/event-stream")

    @inner.get("/ui/boom")
    async def boom():
        raise RuntimeError("secret internals")

    return inner


def http_scope(method: str, path: str, query: bytes = b"") -> dict:
    """An HTTP request's ASGI scope, as the router forwards it."""
    return {"type": "http", "method": method, "path": path, "raw_path": path.encode(), "root_path": "",
            "query_string": query, "headers": [(b"host", b"testserver")], "scheme": "http",
            "server": ("testserver", 80), "client": ("127.0.0.1", 1234), "http_version": "1.1"}


def asgi_messages(app, method: str, path: str, body: bytes = b"", query: bytes = b"") -> list[dict]:
    async def collect():
        return [message async for message in bridge.serve_asgi(app, http_scope(method, path, query), body)]

    return asyncio.run(collect())


def test_the_replica_side_answers_with_the_apps_response():
    app = playground_app([])
    [start, *bodies] = asgi_messages(app, "POST", "/ui/echo", b"hello", b"x=1")
    assert start["status"] == 200 and (b"x-extra", b"1") in start["headers"]
    assert b"".join(m.get("body", b"") for m in bodies) == b"POST /ui/echo x=1 '' hello"
    assert asgi_messages(app, "GET", "/ui/missing")[0]["status"] == 404
    failed = asgi_messages(app, "GET", "/ui/boom")
    assert failed[0]["status"] == 500 and b"secret" not in b"".join(m.get("body", b"") for m in failed[1:])


def test_closing_the_replica_side_mid_stream_ends_the_apps_stream():
    # What a client hanging up becomes on the replica: the router cancels its handle call, which
    # closes this generator; the app sees http.disconnect and its stream ends.
    events: list[str] = []

    async def three_chunks_then_hang_up():
        messages = bridge.serve_asgi(playground_app(events), http_scope("GET", "/ui/events"), b"")
        chunks = [await messages.__anext__() for _ in range(4)]  # start + 3 bodies, as the app sends them
        await messages.aclose()
        for _ in range(200):
            if events:
                break
            await asyncio.sleep(0.02)
        return chunks

    chunks = asyncio.run(three_chunks_then_hang_up())
    assert [c.get("body") for c in chunks[1:]] == [b"data: 0\n\n", b"data: 1\n\n", b"data: 2\n\n"]
    assert events == ["stream closed"]


def test_an_app_that_sends_after_the_hang_up_ends_quietly(caplog):
    # An app still sending after the client left (Gradio's event streams do) is the client
    # leaving, not a failure of the playground, which logged an ERROR with a traceback for every
    # tab closed during a run. Its sends are dropped, as an ASGI 2.3 server drops them: raising
    # there is what let a Gradio run go on for nobody (next test).
    ended: list[str] = []

    async def app(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: 0\n\n", "more_body": True})
        await asyncio.sleep(0.05)  # the client hangs up meanwhile
        await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
        while (await receive())["type"] != "http.disconnect":  # the request's body first
            pass
        ended.append("returned")

    async def hang_up_after_the_first_chunk():
        messages = bridge.serve_asgi(app, {"type": "http", "method": "GET", "path": "/ui/events"}, b"")
        assert (await messages.__anext__())["type"] == "http.response.start"
        assert (await messages.__anext__())["body"] == b"data: 0\n\n"
        await messages.aclose()
        while bridge._background:
            await asyncio.sleep(0.01)

    serve_logger = logging.getLogger("ray.serve")  # Ray's logger may not propagate to the root
    serve_logger.addHandler(caplog.handler)
    try:
        with caplog.at_level(logging.DEBUG, logger="ray.serve"):
            asyncio.run(hang_up_after_the_first_chunk())
    finally:
        serve_logger.removeHandler(caplog.handler)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert not errors, errors
    assert ended == ["returned"]


def test_a_hang_up_stops_a_gradio_run_that_is_sending():
    """A real Gradio app behind the bridge, its event handler streaming as fast as the loop turns
    (as the playground does under load): every hang-up must stop the run. With the bridge raising
    in `send` after the hang-up, Gradio's event stream ended through GeneratorExit, which skips
    its `clean_events`, and about two runs in three went on to their last step (20 of 30 in a
    probe; the playground's hang-up test saw it once in four CI runs)."""
    import json
    import uuid

    import gradio as gr

    hang_ups = 6
    steps = {"taken": 0, "running": 0}

    async def count(prompt: str):
        steps["running"] += 1
        try:
            for i in range(20_000):
                steps["taken"] += 1
                await asyncio.sleep(0)  # a step: the next update is ready in the same loop turn
                yield f"{prompt} {i}"
        finally:
            steps["running"] -= 1

    with gr.Blocks() as blocks:
        prompt, output = gr.Textbox(), gr.Textbox()
        prompt.submit(count, prompt, output, api_name="count")
    app = gr.mount_gradio_app(FastAPI(), blocks, path="/ui")

    async def body_of(method: str, path: str, body: bytes, state: dict) -> bytes:
        scope = {**http_scope(method, path), "headers": [(b"host", b"testserver"), (b"content-type", b"application/json")]}
        return b"".join([m.get("body", b"") async for m in bridge.serve_asgi(app, scope, body, state=state)])

    async def run_and_hang_up(state: dict, fn_index: int) -> int:
        """Join the queue, read the event stream until the run has sent 5 updates, hang up; the
        steps the run takes after the hang-up."""
        session = uuid.uuid4().hex
        await body_of("POST", "/ui/gradio_api/queue/join", json.dumps(
            {"data": ["x"], "event_data": None, "fn_index": fn_index, "trigger_id": None,
             "session_hash": session}).encode(), state)
        events = bridge.serve_asgi(app, http_scope("GET", "/ui/gradio_api/queue/data", f"session_hash={session}".encode()),
                                   b"", state=state)
        updates = 0
        async for message in events:
            updates += b'"process_generating"' in message.get("body", b"")
            if updates == 5:
                break
        await asyncio.sleep(0.001)  # the hang-up reaches the replica while the run goes on sending
        await events.aclose()  # what the router's cancelled handle call does
        at_hang_up = steps["taken"]
        for _ in range(500):  # 5 s
            if not steps["running"]:
                break
            await asyncio.sleep(0.01)
        return steps["taken"] - at_hang_up

    async def main() -> list[int]:
        lifespan = bridge.LifespanManager(app)
        await lifespan.startup()  # Gradio's queue
        try:
            config = json.loads(await body_of("GET", "/ui/config", b"", lifespan.state))
            [fn_index] = [d["id"] for d in config["dependencies"] if d.get("api_name") == "count"]
            return [await run_and_hang_up(lifespan.state, fn_index) for _ in range(hang_ups)]
        finally:
            await lifespan.shutdown()

    after_hang_up = asyncio.run(main())
    assert steps["running"] == 0, f"runs still going after their client hung up; steps after each hang-up: {after_hang_up}"
    assert max(after_hang_up) < 5_000, after_hang_up


def test_forwarded_scope_is_picklable_and_complete():
    import pickle

    scope = {"type": "http", "method": "GET", "path": "/app/ui/", "root_path": "/app", "query_string": b"a=1",
             "headers": [(b"host", b"x")], "app": object(), "state": {"lock": asyncio.Lock()},
             "client": ("1.2.3.4", 5), "server": ("h", 80), "scheme": "http", "http_version": "1.1"}
    forwarded = bridge.forwarded_scope(scope)
    assert "app" not in forwarded and "state" not in forwarded
    assert pickle.loads(pickle.dumps(forwarded))["root_path"] == "/app"


# ---- settings ---------------------------------------------------------------------------------
def test_stop_strings_and_seed():
    assert parse_stop("") == [] and parse_stop(None) == []
    assert parse_stop("###\n\\n\\n\n  \nfoo\\tbar") == ["###", "\n\n", "foo\tbar"]
    with pytest.raises(PlaygroundError, match="At most 4 stop strings"):
        parse_stop("a\nb\nc\nd\ne")
    assert parse_seed(-1) is None and parse_seed(None) is None and parse_seed("") is None
    assert parse_seed(42.0) == 42 and parse_seed("42") == 42
    with pytest.raises(PlaygroundError, match="Seed must be a whole number, got 42.7"):
        parse_seed(42.7)  # was run as 43 while the page showed 42.7
    assert parse_seed(2.0**53 - 1) == 2**53 - 1
    # Above what a browser's number holds exactly the page would send a rounded seed, and past
    # 2**64 torch's generator raised inside the engine ("Internal error").
    for too_large in (2.0**53, 2.0**64):
        with pytest.raises(PlaygroundError, match="Seed must be at most 9007199254740991"):
            parse_seed(too_large)


def test_sampling_params_from_controls():
    params = sampling_params(max_new_tokens=64.0, temperature=0.0, top_p=1.0, top_k=0.0, repetition_penalty=1.1,
                             seed=7.0, stop="\\n\\n")
    assert (params.max_tokens, params.greedy, params.top_k, params.seed, params.stop) == (64, True, 0, 7, ["\n\n"])
    with pytest.raises(PlaygroundError, match="Top-k must be a whole number, got 10.5"):
        sampling_params(max_new_tokens=8, temperature=1, top_p=1, top_k=10.5, repetition_penalty=1, seed=-1, stop="")
    with pytest.raises(PlaygroundError, match="Top-p must be in"):
        sampling_params(max_new_tokens=8, temperature=1, top_p=0, top_k=0, repetition_penalty=1, seed=-1, stop="")
    # The /generate API takes any JSON number, NaN and Infinity included: refused naming the control.
    controls = dict(max_new_tokens=8, temperature=1, top_p=1, top_k=0, repetition_penalty=1, seed=-1, stop="")
    for name, label, bad in [("max_new_tokens", "Max new tokens", float("nan")), ("top_k", "Top-k", float("inf")),
                             ("temperature", "Temperature", float("nan")), ("seed", "Seed", float("nan")),
                             ("repetition_penalty", "Repetition penalty", "high")]:
        with pytest.raises(PlaygroundError, match=f"^{label} must be a (finite )?number, got") as excinfo:
            sampling_params(**{**controls, name: bad})
        assert excinfo.value.title == "Invalid setting"


# ---- errors -------------------------------------------------------------------------------------
def replica_error(cause: BaseException):
    from ray.exceptions import RayTaskError

    return RayTaskError("generate", "Traceback (most recent call last):\n  ...", cause)


@pytest.mark.parametrize("exc, title, words", [
    (replica_error(InvalidRequestError("prompt has 700 tokens; the context window is 512", field="prompt")),
     "Prompt too long", ["700 tokens", "context window is 512", "Shorten the prompt"]),
    (replica_error(InvalidRequestError("prompt (90 tokens) + max_tokens (500) exceeds the context window of 512 "
                                       "tokens", field="max_tokens")),
     "Prompt too long", ["max new tokens (500)", "Lower max new tokens"]),
    (replica_error(PipelineFailed("stage 1 died")), "Pipeline restarting", ["being restarted", "Try again"]),
    (PlaygroundError("Model not loaded", "neo-demo is not loaded yet"), "Model not loaded", ["not loaded yet"]),
    (ZeroDivisionError("internal detail"), "Internal error", ["ZeroDivisionError", "server log"]),
])
def test_errors_read_as_sentences(exc, title, words):
    error = describe_error(exc, MODEL)
    assert error.title == title
    assert all(word in error.message for word in words), error.message
    assert "Traceback" not in error.message and "internal detail" not in error.message


def test_busy_and_unavailable_errors():
    from ray.serve._private.common import DeploymentID
    from ray.exceptions import RayActorError
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

    busy = describe_error(BackPressureError(num_queued_requests=10, max_queued_requests=10), MODEL)
    assert busy.title == "Server busy" and "request queue is full" in busy.message
    gone = describe_error(DeploymentUnavailableError(DeploymentID("Pipeline-neo-demo", "neo-serve")), MODEL)
    assert gone.title == "Model not loaded" and "failed to deploy" in gone.message
    for died in (RayActorError(), ReplicaUnavailableError("ab12cd34")):
        error = describe_error(died, MODEL)
        assert error.title == "Pipeline unavailable", error
        assert error.message == ("The neo-demo pipeline replica serving this run went away (it is being "
                                 "replaced). Try again."), error.message


def test_a_prompt_that_is_not_unicode_text_is_refused_before_any_call():
    # JSON lets a lone surrogate through ("\ud800"); the tokenizer raised TypeError ("Internal error").
    backend = PlaygroundBackend({}, [MODEL], app_name=None)
    run = Run(MODEL)

    async def first_update():
        params = sampling_params(max_new_tokens=4, temperature=0, top_p=1, top_k=0, repetition_penalty=1, seed=-1,
                                 stop="")
        async for update in backend.generate(run, "a\ud800b", params):
            return update

    with pytest.raises(PlaygroundError) as excinfo:
        asyncio.run(first_update())
    assert excinfo.value.title == "Invalid prompt" and "lone surrogate" in excinfo.value.message


# ---- a run and its figures ----------------------------------------------------------------------
def test_run_timing_and_figures(monkeypatch):
    from neo_serve.ui import backend
    from neo_serve.ui.blocks import render_figures

    clock = iter([10.0, 10.25, 10.5, 11.5, 12.0])
    monkeypatch.setattr(backend.time, "monotonic", lambda: next(clock))
    run = Run(MODEL)  # submitted at 10.0
    run.replica = "ab12cd34"
    run.feed(GenerationChunk("r", prompt="def f(", prompt_token_ids=[1, 2, 3]))  # 10.25
    run.feed(GenerationChunk("r", [SequenceDelta(0, "x", [5])]))  # 10.5: first token
    run.feed(GenerationChunk("r", [SequenceDelta(0, "yz", [6, 7], finish_reason="length")], finished=True))  # 11.5
    run.end()  # 12.0
    assert (run.prompt_tokens, run.generated_tokens, run.text) == (3, 3, "xyz")
    assert run.time_to_first_token == pytest.approx(0.5) and run.tokens_per_second == pytest.approx(2.0)
    shown = render_figures(run)
    cards = dict(re.findall(r'data-figure="([\w-]+)"><b>(.*?)</b>', shown))
    assert cards == {"prompt-tokens": "3", "generated-tokens": "3", "time-to-first-token": "500 ms",
                     "tokens-per-second": "2.0", "finish-reason": "length"}
    assert 'class="run-status done"' in shown and "Finished</b> in 2.00 s" in shown
    assert "Served by <code>Pipeline-neo-demo</code> replica" in shown and "(2 pipeline stages)" in shown


def test_error_figures_are_escaped():
    from neo_serve.ui.blocks import render_figures

    run = Run(MODEL)
    run.end(error=PlaygroundError("Invalid request", "<script>alert(1)</script> is not a prompt"))
    shown = render_figures(run)
    assert "<script>" not in shown and html.escape("<script>") in shown
    assert 'class="run-status error"' in shown and "<b>Invalid request:</b>" in shown
    stopped = Run(MODEL)
    stopped.end(stopped=True)
    assert 'data-figure="finish-reason"><b>stopped</b>' in render_figures(stopped)


# ---- build args -----------------------------------------------------------------------------
def test_playground_build_args_and_graph():
    import argparse

    from ray.serve._private.build_app import build_app as build_graph

    from neo_serve.app import build_app
    from neo_serve.serve.config import AppConfigError, parse_app_args
    from neo_serve.serve.launcher import add_up_arguments, app_args_from_namespace

    def deployments(args):
        return sorted(d.name for d in build_graph(build_app(args), name="x").deployments)

    assert deployments({}) == ["Pipeline-neo-demo", "Playground", "Router"]
    assert deployments({"playground": False}) == ["Pipeline-neo-demo", "Router"]
    assert parse_app_args({"playground": "false"}).playground.enabled is False  # serve run ... playground=false
    assert parse_app_args({"playground": {"num_cpus": 0.5}}).playground.num_cpus == 0.5
    with pytest.raises(AppConfigError, match="playground.replica_wait_s"):
        parse_app_args({"playground": {"replica_wait_s": 0}})
    parser = argparse.ArgumentParser()
    add_up_arguments(parser)
    assert app_args_from_namespace(parser.parse_args(["--no-playground"]))["playground"] == {"enabled": False}
    assert "playground" not in app_args_from_namespace(parser.parse_args([]))


def test_an_idle_page_holds_no_event_stream():
    # The playground deployment drains for as long as a run may take (the pipelines' graceful
    # shutdown): that is right only while its open requests are runs. A page whose blocks need
    # Gradio's heartbeat holds an event stream open for as long as it is open, and would hold
    # every redeploy for the whole timeout.
    from neo_serve.serve.config import PlaygroundArgs
    from neo_serve.ui.blocks import build_blocks

    blocks = build_blocks(PlaygroundBackend({}, [MODEL], app_name=None), PlaygroundArgs())
    assert blocks.get_config_file()["connect_heartbeat"] is False


def test_an_idle_playground_queue_looks_for_events_every_10_ms_not_every_1(monkeypatch):
    """Gradio's queue polls for events every 1 ms on Linux even with nothing to do, which kept an
    idle playground replica at 11% of a core; the playground's queue looks every 10 ms."""
    import time

    import gradio.queueing

    from neo_serve.serve.config import PlaygroundArgs
    from neo_serve.ui.blocks import build_asgi_app

    looks = {"count": 0}
    queue_length = gradio.queueing.Queue.__len__

    def counted_length(queue) -> int:  # the queue's loop asks its length on every look
        looks["count"] += 1
        return queue_length(queue)

    monkeypatch.setattr(gradio.queueing.Queue, "__len__", counted_length)
    app = build_asgi_app(PlaygroundBackend({}, [MODEL], app_name=None), PlaygroundArgs())

    async def idle_for(seconds: float) -> tuple[int, float]:
        lifespan = bridge.LifespanManager(app)
        await lifespan.startup()  # Gradio's queue starts polling
        try:
            await asyncio.sleep(0.1)
            before, started = looks["count"], time.monotonic()
            await asyncio.sleep(seconds)
            return looks["count"] - before, time.monotonic() - started
        finally:
            await lifespan.shutdown()

    count, elapsed = asyncio.run(idle_for(1.0))
    assert 0 < count <= elapsed / 0.01 + 5, f"{count} looks in {elapsed:.2f} s"


def test_the_routers_access_log_leaves_out_the_playgrounds_page_assets():
    """A page load fetches ~65 files through the router: each was an INFO line in the `neo-serve up`
    terminal. Successful GETs under /ui go; a run's POST, failures and the API keep their lines."""
    from neo_serve.serve.error_logs import QuietPlaygroundAssets

    def access(message: str, route: str) -> logging.LogRecord:
        record = logging.LogRecord("ray.serve", logging.INFO, __file__, 1, message, None, None)
        record.serve_access_log, record.route = True, route
        return record

    quiet = QuietPlaygroundAssets()
    assert not quiet.filter(access("GET /ui/{path:path} 200 29.0ms", "/ui/{path:path}"))
    assert not quiet.filter(access("127.0.0.1:5000 GET /ui 307 1.0ms", "/ui"))  # with the client's address
    assert quiet.filter(access("POST /ui/{path:path} 200 12.0ms", "/ui/{path:path}"))  # a run starts
    assert quiet.filter(access("GET /ui/{path:path} 401 1.0ms", "/ui/{path:path}"))  # refused
    assert quiet.filter(access("GET /ui/{path:path} 500 3.0ms", "/ui/{path:path}"))
    assert quiet.filter(access("POST /v1/completions 200 95.0ms", "/v1/completions"))
    assert quiet.filter(access("GET /uix 200 1.0ms", "/uix"))  # not the playground's prefix
    assert quiet.filter(logging.LogRecord("ray.serve", logging.INFO, __file__, 1, "GET /ui/x 200", None, None))
