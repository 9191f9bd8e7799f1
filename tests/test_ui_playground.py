"""The Gradio playground end to end: real Ray + Serve, the router's /ui bridge to the one-replica
playground deployment, `gradio_client` on its API, and a real headless Chromium on its page.

One Ray cluster and one application for the module: the bundled demo model as a 2-stage
pipeline ("neo-demo") and a tiny random GPT-Neo in one stage ("tiny-neo"), behind one router.
Every playground output is compared with what the router's handle returns for the same settings.
"""

from __future__ import annotations

import html
import json
import os
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import ray
from ray import serve

from checkpoints import build_tokenizer, make_neo
from conftest_serve import apps_removed_afterwards, wait_until
from neo_serve.app import build_app
from neo_serve.serve.config import DEMO_CHECKPOINT
from neo_serve.ui.backend import parse_stop
from neo_serve.ui.blocks import ERROR_POPUP_S, EXAMPLES

pytestmark = pytest.mark.timeout(300)

APP = "neo-serve"
DEMO = "neo-demo"
TINY = "tiny-neo"
SCREENSHOT = Path(__file__).resolve().parents[1] / "docs" / "playground.png"
CHROMIUM = os.environ.get("NEO_SERVE_CHROMIUM", "/usr/bin/chromium")  # Debian's package
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--no-first-run"]
# The playground API's inputs, in order (api_name="/generate").
GREEDY = dict(max_new_tokens=48, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0, seed=-1, stop="")
API_PARAMS = ["prompt", "model", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty", "seed",
              "stop"]


@pytest.fixture(scope="module")
def metrics_port(shared_serve) -> int:
    return shared_serve.metrics_port


@pytest.fixture(scope="module")
def base_url(shared_serve):
    with apps_removed_afterwards():
        yield shared_serve.url


@pytest.fixture(scope="module")
def app(base_url, tmp_path_factory):
    """The application (router, two pipelines, the playground); returns the router's handle."""
    assert (DEMO_CHECKPOINT / "config.json").is_file(), "the bundled demo model is missing"
    tiny = make_neo(tmp_path_factory.mktemp("ui-ckpt") / "tiny-neo", build_tokenizer(), seed=1)
    return serve.run(build_app({"models": [
        {"name": DEMO, "num_stages": 2, "dtype": "float32", "kv_cache_tokens": 8192, "max_num_seqs": 32},
        # A smaller window than the demo's 512, for the max-new-tokens slider to follow.
        {"name": TINY, "checkpoint": str(tiny), "dtype": "float32", "kv_cache_tokens": 4096, "max_model_len": 256},
    ], "router": {"num_cpus": 0.5}}), name=APP, route_prefix="/")


@pytest.fixture(scope="module")
def ui_url(base_url, app) -> str:
    return f"{base_url}/ui/"


@pytest.fixture(scope="module")
def client(ui_url):
    from gradio_client import Client

    return Client(ui_url, verbose=False, analytics_enabled=False, download_files=False)


def off_loop(call):
    """Run a blocking Serve handle call in a thread: Playwright's sync API runs an asyncio loop in
    the test's thread, where Serve refuses `.result()`."""
    with ThreadPoolExecutor(1) as pool:
        return pool.submit(call).result()


def pipeline_stats(model: str = DEMO) -> dict:
    return off_loop(lambda: serve.get_app_handle(APP).stats.remote().result()[model])


def router_completion(prompt: str, model: str, settings: dict) -> dict:
    """What the router's handle answers for the playground's settings."""
    stop = parse_stop(settings["stop"]) or None  # the playground's own reading of the box
    return off_loop(lambda: serve.get_app_handle(APP).generate.remote(
        model=model, prompt=prompt, max_tokens=settings["max_new_tokens"], temperature=settings["temperature"],
        top_p=settings["top_p"], top_k=settings["top_k"], repetition_penalty=settings["repetition_penalty"],
        seed=None if settings["seed"] < 0 else settings["seed"], stop=stop).result())


def figures(shown: str) -> dict[str, str]:
    """The run's figures from the playground's figures HTML: {"status": ..., "prompt-tokens": ..., ...}."""
    found = {key: html.unescape(value) for key, value in re.findall(r'data-figure="([\w-]+)"><b>(.*?)</b>', shown)}
    found["status"] = re.search(r'class="run-status (\w+)"', shown).group(1)
    replica = re.search(r'data-figure="replica">(.*?)</code>', shown)
    found["replica"] = replica.group(1) if replica else None
    found["served-by"] = re.sub(r"<[^>]+>", "", re.search(r'data-figure="served-by">(.*?)</p>', shown).group(1))
    return found


# Steps the pipeline may still run after a stop, counted from just before it: 5-6 measured on 2
# vCPUs (the cancel goes browser -> Gradio -> the pipeline's handle call); a run that the stop
# did not cancel on the server goes on to its 480 tokens, some 450 steps more.
STEPS_AFTER_STOP = 48


def assert_freed(model: str = DEMO) -> dict:
    """The stopped sequence left the batch: no request, every KV block free, no more steps."""
    stats = wait_until(lambda: (s := pipeline_stats(model))["requests"] == 0 and s["in_flight_micro_batches"] == 0
                       and s, timeout=10, what="the stopped request to leave the pipeline")
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"]
    time.sleep(0.5)
    assert pipeline_stats(model)["num_steps"] == stats["num_steps"], "the pipeline is still stepping"
    return stats


# ---- the deployment graph and the bridge -----------------------------------------------------
def test_playground_is_one_replica_behind_the_router(base_url, app):
    status = serve.status().applications[APP]
    assert set(status.deployments) == {"Router", "Playground", f"Pipeline-{DEMO}", f"Pipeline-{TINY}"}
    assert status.deployments["Playground"].replica_states == {"RUNNING": 1}
    redirect = httpx.get(f"{base_url}/ui")
    assert redirect.status_code == 307 and redirect.headers["location"] == f"{base_url}/ui/"
    page = httpx.get(f"{base_url}/ui/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "neo-serve playground" in page.text  # the title, in the config Gradio embeds
    config = httpx.get(f"{base_url}/ui/config").json()
    assert config["root"] == f"{base_url}/ui"  # Gradio's URLs point under /ui
    assert httpx.get(f"{base_url}/ui/no/such/thing").status_code == 404
    # Gradio's routes that keep multipart bodies as temporary files are refused: such files would
    # stay on the playground's disk.
    for path in ("gradio_api/upload", "/gradio_api/upload?upload_id=x", "gradio_api/process_recording"):
        upload = httpx.post(f"{base_url}/ui/{path}", files={"files": ("a.txt", b"x" * 1024, "text/plain")})
        assert upload.status_code == 404 and "no file uploads" in upload.json()["error"]["message"], upload.text
    # The router's own API is untouched.
    assert [m["id"] for m in httpx.get(f"{base_url}/v1/models").json()["data"]] == [DEMO, TINY]


def test_api_is_documented(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert list(endpoints) == ["/generate"]
    assert [p["parameter_name"] for p in endpoints["/generate"]["parameters"]] == API_PARAMS


# ---- gradio_client: the playground's API ------------------------------------------------------
@pytest.mark.parametrize("model", [DEMO, TINY])
def test_streamed_text_equals_router_greedy(client, app, model):
    prompt = EXAMPLES[1]  # def hello_world():
    job = client.submit(prompt, model, *GREEDY.values(), api_name="/generate")
    updates = list(job)
    texts = [text for text, _ in updates]
    expected = router_completion(prompt, model, GREEDY)
    assert texts[-1] == expected["choices"][0]["text"]
    # It streamed: many growing intermediate texts, each extending the one before.
    assert len(set(texts)) >= 3
    assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
    shown = figures(updates[-1][1])
    assert shown["status"] == "done"
    assert shown["prompt-tokens"] == str(expected["usage"]["prompt_tokens"])
    assert shown["generated-tokens"] == "48" and shown["finish-reason"] == "length"
    assert re.fullmatch(r"\d+ ms", shown["time-to-first-token"]) and float(shown["tokens-per-second"]) > 0
    # Which pipeline served it: the deployment, the replica (as its stats() name it), its stages.
    assert shown["replica"] == pipeline_stats(model)["replica"]
    stages = "2 pipeline stages" if model == DEMO else "1 pipeline stage"
    deployment = f"Pipeline-{DEMO}" if model == DEMO else f"Pipeline-{TINY}"
    assert shown["served-by"] == f"Served by {deployment} replica {shown['replica']} ({stages})"


def test_the_sliders_end_fills_the_window(client, app):
    """The max-new-tokens slider ends at the model's window, which never fits beside a prompt:
    there it means as many tokens as fit (it was a "Prompt too long" error on every run)."""
    prompt = EXAMPLES[1]
    text, shown = client.predict(prompt, TINY, *{**GREEDY, "max_new_tokens": 256}.values(), api_name="/generate")
    expected = router_completion(prompt, TINY, {**GREEDY, "max_new_tokens": None})
    assert text == expected["choices"][0]["text"]
    done = figures(shown)
    assert done["generated-tokens"] == str(expected["usage"]["completion_tokens"])
    if done["finish-reason"] == "length":  # else the model's end token came first, as for the router
        assert int(done["prompt-tokens"]) + int(done["generated-tokens"]) == 256


def test_sampling_settings_and_stop_strings_match_router(client, app):
    """Seeded sampling with the playground's default penalties, and stop strings."""
    prompt = EXAMPLES[2]
    sampled = dict(max_new_tokens=40, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=7, stop="")
    expected = router_completion(prompt, DEMO, sampled)["choices"][0]["text"]
    text, _ = client.predict(prompt, DEMO, *sampled.values(), api_name="/generate")
    assert text == expected
    stop = expected[10:13]
    with_stop = {**sampled, "stop": stop.replace("\n", "\\n")}
    expected_stop = router_completion(prompt, DEMO, with_stop)["choices"][0]
    text, shown = client.predict(prompt, DEMO, *with_stop.values(), api_name="/generate")
    assert text == expected_stop["text"] and stop not in text
    assert figures(shown)["finish-reason"] == f"stop string {stop!r}"


def test_cancelling_a_run_frees_its_sequence(client, app):
    """A cancelled API call (what Stop does) cancels the pipeline request: the sequence leaves
    the batch long before its 480 tokens."""
    job = client.submit(EXAMPLES[1], DEMO, 480, 0.0, 1.0, 0, 1.0, -1, "", api_name="/generate")
    wait_until(lambda: len(job.outputs()) > 5, timeout=60, what="tokens to stream")
    running = pipeline_stats()
    assert running["running"] == 1 and running["free_kv_blocks"] < running["total_kv_blocks"]
    assert job.cancel()
    stats = assert_freed()
    text = job.outputs()[-1][0]
    assert stats["num_steps"] - running["num_steps"] <= STEPS_AFTER_STOP and len(text) > 0


def test_a_client_that_hangs_up_mid_run_frees_its_sequence(ui_url, app):
    """Closing the tab during a run closes Gradio's event stream (no Stop click): the playground's
    run ends and the pipeline drops the sequence, rather than generating its 480 tokens for nobody."""
    ui_url = ui_url.rstrip("/")
    config = httpx.get(f"{ui_url}/config", timeout=30).json()
    [generate] = [d for d in config["dependencies"] if d.get("api_name") == "generate"]
    session = uuid.uuid4().hex
    inputs = [EXAMPLES[1], DEMO, 480, 0.0, 1.0, 0, 1.0, -1, ""]
    joined = httpx.post(f"{ui_url}/gradio_api/queue/join", timeout=30, json={
        "data": inputs, "event_data": None, "fn_index": generate["id"], "trigger_id": None, "session_hash": session})
    assert joined.status_code == 200, joined.text
    generating = 0
    with httpx.stream("GET", f"{ui_url}/gradio_api/queue/data", params={"session_hash": session}, timeout=60) as events:
        for line in events.iter_lines():
            if '"process_generating"' in line:
                generating += 1
            if generating == 5:
                running = pipeline_stats()
                assert running["running"] == 1
                break  # the client hangs up: the connection closes with the stream
    stats = assert_freed()
    assert stats["num_steps"] - running["num_steps"] <= STEPS_AFTER_STOP


# ---- readable errors ----------------------------------------------------------------------
@pytest.mark.parametrize("args, title, words", [
    (("word " * 700, DEMO, 16), "Prompt too long", ["context window is 512"]),
    ((EXAMPLES[0], DEMO, 500), "Prompt too long", ["max new tokens (500)", "Lower max new tokens"]),
    (("", DEMO, 16), "Empty prompt", ["pick one of the examples"]),
    (("x", DEMO, 16, 0.8, 1.0, 0, 1.0, -1, "a\nb\nc\nd\ne"), "Invalid setting", ["At most 4 stop strings"]),
    # Gradio's own checks of the inputs, before the playground runs: readable too.
    (("x", "gpt-4", 16), None, ["gpt-4 is not in the list of choices: ['neo-demo', 'tiny-neo']"]),
    (("x", DEMO, 16, 0.8, 0.0), None, ["Value 0.0 is less than minimum value 0.05"]),
])
def test_errors_are_readable(client, app, args, title, words):
    from gradio_client.exceptions import AppError

    inputs = list(args) + list(GREEDY.values())[len(args) - 2:]
    job = client.submit(*inputs, api_name="/generate")
    with pytest.raises(AppError) as excinfo:
        job.result(timeout=60)
    message = str(excinfo.value)
    assert all(word in message for word in words), message
    assert "Traceback" not in message and "Error(" not in message
    if title is not None:  # the figures say it too
        shown = job.outputs()[-1][1]
        assert figures(shown)["status"] == "error" and f"<b>{title}:</b>" in shown
    assert pipeline_stats()["requests"] == 0


def test_a_number_that_is_not_finite_is_refused_naming_the_control(ui_url, app):
    """JSON has no NaN, but Python's and JavaScript's parsers take one: the `/generate` API got it
    through to `int()` and answered "cannot convert float NaN to integer"."""
    values = ["x", DEMO] + list(GREEDY.values())
    body = '{"data": [' + ", ".join("NaN" if index == 2 else json.dumps(value) for index, value
                                     in enumerate(values)) + "]}"
    call = httpx.post(f"{ui_url}gradio_api/call/generate", content=body,
                      headers={"content-type": "application/json"}, timeout=30)
    assert call.status_code == 200, call.text
    events = httpx.get(f"{ui_url}gradio_api/call/generate/{call.json()['event_id']}", timeout=60).text
    assert "event: error" in events, events
    assert "Max new tokens must be a finite number, got nan" in events, events
    assert "convert" not in events and "Traceback" not in events
    assert pipeline_stats()["requests"] == 0


def queued_requests(metrics_port: int, application: str, deployment: str) -> float | None:
    """Serve's `serve_deployment_queued_queries` for `deployment` of `application` on Ray's
    Prometheus endpoint: requests its callers' handles hold, not yet given to a replica (None: not
    exported yet). The cluster is shared: other modules' apps may have had a deployment so named."""
    try:
        text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    except httpx.HTTPError:
        return None
    values = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
              if line.startswith("ray_serve_deployment_queued_queries{") and f'deployment="{deployment}"' in line
              and f'application="{application}"' in line]
    return sum(values) if values else None


def test_model_not_loaded_is_reported(base_url, app, metrics_port):
    """An app whose pipeline cannot be placed (its CPUs are held): the playground, served under a
    route prefix, says the model is not loaded instead of waiting forever, and leaves no request
    queued for it (which its autoscaler would count, and a replica would serve once up)."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError
    from ray.util.placement_group import placement_group, remove_placement_group

    name = "neo-late"
    free = ray.available_resources().get("CPU", 0)
    blocker = placement_group([{"CPU": free - 0.5}])  # room for the router (0.5), not the pipeline (1)
    ray.get(blocker.ready(), timeout=30)
    try:
        serve.run_many([serve.RunTarget(build_app({
            "models": [{"name": "late", "checkpoint": str(DEMO_CHECKPOINT), "dtype": "float32"}],
            "router": {"num_cpus": 0.5}, "playground": {"replica_wait_s": 1}}), name=name, route_prefix="/late")],
            wait_for_applications_running=False)

        def page_up():
            try:
                return httpx.get(f"{base_url}/late/ui/config", timeout=30).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(page_up, timeout=90, interval=0.5, what="the late app's playground")
        assert httpx.get(f"{base_url}/late/ui/config").json()["root"] == f"{base_url}/late/ui"
        late = Client(f"{base_url}/late/ui/", verbose=False, analytics_enabled=False, download_files=False)
        with pytest.raises(AppError, match="late is not loaded yet: no pipeline replica is running"):
            late.predict("def f():", "late", *GREEDY.values(), api_name="/generate")

        def none_queued():  # in two exports (1 s apart) three seconds apart
            first = queued_requests(metrics_port, name, "Pipeline-late")
            time.sleep(3)
            return first == 0 and queued_requests(metrics_port, name, "Pipeline-late") == 0

        wait_until(none_queued, timeout=30, interval=0, what="no playground request left queued for `late`")
    finally:
        remove_placement_group(blocker)
        serve.delete(name)


def test_a_run_past_the_models_deadline_is_stopped(base_url, app):
    """The model's request_timeout_s holds for the playground's runs as for the router's
    requests: past it the run ends with a readable error and its sequence is stopped."""
    from gradio_client import Client
    from gradio_client.exceptions import AppError

    name = "neo-deadline"
    serve.run(build_app({
        "models": [{"name": "timed", "checkpoint": str(DEMO_CHECKPOINT), "dtype": "float32", "cpus_per_stage": 0.5,
                    "request_timeout_s": 0.3}],
        "router": {"num_cpus": 0.5}}), name=name, route_prefix="/deadline")
    try:
        timed = Client(f"{base_url}/deadline/ui/", verbose=False, analytics_enabled=False, download_files=False)
        settings = {**GREEDY, "max_new_tokens": 480}  # seconds of generation on the demo model
        started = time.monotonic()
        with pytest.raises(AppError, match="did not finish within timed's deadline of 0.3 s"):
            timed.predict("def f():", "timed", *settings.values(), api_name="/generate")
        assert time.monotonic() - started < 30

        def stats():
            return serve.get_app_handle(name).stats.remote().result()["timed"]

        steps_at_error = stats()["num_steps"]
        freed = wait_until(lambda: (s := stats())["requests"] == 0 and s["in_flight_micro_batches"] == 0 and s,
                           timeout=10, what="the timed-out sequence stopped")
        # Stopped when the deadline passed, not run on to its 480 tokens.
        assert freed["num_steps"] - steps_at_error <= 16 and steps_at_error < 470
    finally:
        serve.delete(name)


# ---- a real browser ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser():
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"no Chromium at {CHROMIUM} for the browser tests; install Debian's package "
                    f"(apt-get install -y chromium; scripts/test.sh does it when run as root) "
                    f"or point NEO_SERVE_CHROMIUM at a Chromium binary")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as exc:
        pytest.fail(f"the browser tests need the playwright Python package ({exc}); "
                    f"pip install -e '.[test]'")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


def app_only_context(browser, base_url: str):
    """A fresh browser context whose requests outside the app are refused (as offline, or in an
    air-gapped cluster) and listed: returns (context, the list)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    outside: list[str] = []

    def only_the_app(route):
        if route.request.url.startswith(base_url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_app)
    return context, outside


@pytest.fixture()
def page(browser, base_url, ui_url):
    """The playground in a fresh browser context; the page may load nothing from outside the app
    (no CDN, no web fonts: clusters are often air-gapped)."""
    context, outside = app_only_context(browser, base_url)
    page = context.new_page()
    page.goto(ui_url, wait_until="networkidle")  # loaded and connected: clicks now reach the app
    page.wait_for_selector("#generate", timeout=60_000)
    yield page
    context.close()
    assert outside == [], f"the page requested URLs outside the app: {outside}"


def output_text(page) -> str:
    return page.locator("#output textarea").input_value()


def pick_example(page, example: str) -> None:
    page.get_by_role("button", name=example).click()
    page.wait_for_function(f"document.querySelector('#prompt textarea').value === {example!r}", timeout=10_000)


def set_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    page.locator("#prompt textarea").click()  # blur: Gradio commits the value


def sample_while_generating(page, *, timeout_s: float = 60, interval_s: float = 0.05) -> list[str]:
    """Read the output box repeatedly until the run's figures say it finished; returns the
    distinct values seen, in order."""
    seen: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = output_text(page)
        if not seen or text != seen[-1]:
            seen.append(text)
        if "Finished in" in page.locator("#figures").inner_text():
            seen.append(output_text(page))
            return seen
        time.sleep(interval_s)
    raise AssertionError(f"the run did not finish in {timeout_s}s; seen {seen[-1:]}")


def test_browser_example_generate_streams(browser, page, app, tmp_path):
    options = page.locator("#model input")
    options.click()
    listed = page.locator("ul[role=listbox] li").all_inner_texts()
    assert [item.replace("✓", "").strip() for item in listed] == [DEMO, TINY]
    page.keyboard.press("Escape")
    pick_example(page, "def hello_world():")
    set_number(page, "seed", 42)
    page.locator("#generate").click()
    seen = sample_while_generating(page)
    final = output_text(page)
    # The text grew while it streamed: several partial texts, each extending the previous one.
    growing = [text for text in seen if text]
    assert len(growing) >= 4, seen
    assert all(later.startswith(earlier) for earlier, later in zip(growing, growing[1:]))
    assert growing[-1] == final and len(final) > 0
    shown = figures(page.locator("#figures").inner_html())
    assert shown["status"] == "done" and shown["generated-tokens"] == "128" and shown["finish-reason"] == "length"
    assert "(2 pipeline stages)" in shown["served-by"]
    # Seeded sampling with the page's defaults is reproducible through the router.
    defaults = dict(max_new_tokens=128, temperature=0.8, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=42,
                    stop="")
    assert final == router_completion("def hello_world():", DEMO, defaults)["choices"][0]["text"]
    # For the docs: the completion from its start, no hover effect on the buttons.
    page.locator("#output textarea").evaluate("element => { element.scrollTop = 0; }")
    page.mouse.move(0, 0)
    # The picture in the docs is refreshed on request only, so a test run leaves the tree clean.
    target = SCREENSHOT if os.environ.get("NEO_SERVE_UPDATE_SCREENSHOT") else tmp_path / "playground.png"
    page.screenshot(path=str(target), full_page=True)
    assert target.stat().st_size > 10_000


def test_browser_stop_halts_a_long_generation(browser, page, app):
    pick_example(page, "def hello_world():")
    set_number(page, "max-new-tokens", 480)
    set_number(page, "temperature", 0)
    page.locator("#generate").click()
    wait_until(lambda: len(output_text(page)) > 20, timeout=60, what="text to stream in")
    running = pipeline_stats()
    assert running["running"] == 1
    page.locator("#stop").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('Stopped')", timeout=30_000)
    stats = assert_freed()
    # The output stopped growing.
    stopped_at = output_text(page)
    time.sleep(1.5)
    assert output_text(page) == stopped_at
    shown = figures(page.locator("#figures").inner_html())
    assert shown["status"] == "stopped" and shown["finish-reason"] == "stopped"
    assert 0 < int(shown["generated-tokens"]) < 480 and stats["num_steps"] - running["num_steps"] <= STEPS_AFTER_STOP


def slider_range(page, elem_id: str) -> tuple[str, str]:
    """(maximum, value) of a Gradio slider, as its range input holds them."""
    handle = page.locator(f"#{elem_id} input[type=range]")
    return handle.get_attribute("max"), handle.input_value()


def pick_model(page, name: str) -> None:
    page.locator("#model input").click()
    page.locator("ul[role=listbox] li", has_text=name).click()
    page.wait_for_function(f"document.querySelector('#model input').value === {name!r}", timeout=10_000)


def test_browser_max_new_tokens_follows_the_picked_models_window(browser, page, app):
    assert slider_range(page, "max-new-tokens") == ("512", "128")
    set_number(page, "max-new-tokens", 400)
    pick_model(page, TINY)
    # The tiny model's window is 256: the slider ends there, and 400 came down to it.
    wait_until(lambda: slider_range(page, "max-new-tokens") == ("256", "256"), timeout=10,
               what=f"the slider to end at {TINY}'s window")
    assert "context window 256 tokens" in page.locator("#model-info").inner_text()
    pick_model(page, DEMO)
    wait_until(lambda: slider_range(page, "max-new-tokens") == ("512", "256"), timeout=10,
               what=f"the slider to end at {DEMO}'s window again")


def test_browser_too_long_prompt_shows_a_readable_error(browser, page, app):
    page.locator("#prompt textarea").fill("word " * 700)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('Prompt too long')",
                           timeout=30_000)
    toast = page.locator('[data-testid="toast-body"]').filter(has_text="context window is 512")
    toast.wait_for(timeout=10_000)
    body = page.locator("body").inner_text()
    assert "Traceback" not in body and "InvalidRequestError" not in body
    # Gradio's "Error" badge is not drawn over the line that says what failed: it is there (the
    # selector still finds Gradio's badge) and hidden.
    assert page.locator("#figures").get_by_text("Prompt too long").is_visible()
    assert page.locator("#figures span.error").count() == 1
    assert not page.locator("#figures span.error").is_visible()
    assert not page.locator("#output span.error").is_visible()  # nor over the output's text
    # The pop-up goes by itself (kept for good, a few failed runs piled up over the controls);
    # the figures keep saying what failed.
    toast.wait_for(state="hidden", timeout=(ERROR_POPUP_S + 15) * 1000)
    assert page.locator("#figures").get_by_text("Prompt too long").is_visible()


def test_browser_a_refused_setting_replaces_the_last_runs_figures(browser, page, app):
    """A seed past what the page can send exactly, or not whole, is refused by the playground
    itself, which says so in the figures: Gradio's own range check left the previous run's figures standing
    under its error, as if that run had failed."""
    pick_example(page, "def hello_world():")
    set_number(page, "max-new-tokens", 8)
    set_number(page, "seed", 7)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('Finished in')", timeout=30_000)
    set_number(page, "seed", 99999999999999999999)
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('Invalid setting')",
                           timeout=30_000)
    shown = page.locator("#figures").inner_text()
    assert "Seed must be at most 9007199254740991" in shown and "Finished in" not in shown, shown
    set_number(page, "seed", 42.7)  # refused, not run as 43 under a field that shows 42.7
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('whole number')", timeout=30_000)
    assert page.locator("#seed input[type=number]").input_value() == "42.7"
    set_number(page, "seed", -5)  # any negative seed: a random one, as the field's note says
    page.locator("#generate").click()
    page.wait_for_function("document.querySelector('#figures').innerText.includes('Finished in')", timeout=30_000)


# ---- API keys: the playground signs a browser in -------------------------------------------------
@pytest.fixture(scope="module")
def secure_ui(base_url, app, tmp_path_factory):
    """The demo behind API keys (from a file), at a route prefix; yields the playground's URL."""
    keys = tmp_path_factory.mktemp("keys") / "api-keys"
    keys.write_text("ui-key-1\nui-key-2\n")
    name = "neo-secure-ui"
    serve.run(build_app({"models": [{"num_stages": 1, "dtype": "float32", "cpus_per_stage": 0.5,
                                     "kv_cache_tokens": 2048}],
                         "router": {"num_cpus": 0.5, "api_keys_file": str(keys)}}),
              name=name, route_prefix="/secure")
    yield f"{base_url}/secure/ui/"
    off_loop(lambda: serve.delete(name))


def test_playground_behind_api_keys_asks_for_one(browser, base_url, secure_ui):
    """With API keys on, a browser opening the playground is sent to a sign-in page; a wrong key is
    refused there; a right one opens the playground, which then generates. The session cookie
    opens only the playground, never the API."""
    assert httpx.get(secure_ui, timeout=30).status_code == 401  # no key, not a browser: OpenAI JSON
    assert httpx.get(secure_ui, headers={"Authorization": "Bearer ui-key-2"}, timeout=30).status_code == 200
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(secure_ui)
        assert "/secure/ui/login" in page.url
        page.fill("#api_key", "not-a-key")
        page.click("#sign-in")
        page.locator("#login-error").wait_for(timeout=10_000)
        page.fill("#api_key", "ui-key-1")
        page.click("#sign-in")
        page.wait_for_selector("#generate", timeout=60_000)
        assert page.url.rstrip("/") == secure_ui.rstrip("/")
        cookies = {c["name"]: c for c in context.cookies()}
        session = cookies["neo_serve_ui"]
        assert session["httpOnly"] and session["sameSite"] == "Strict" and session["path"] == "/secure/ui"
        assert "ui-key-1" not in session["value"]
        pick_example(page, "def hello_world():")
        set_number(page, "max-new-tokens", 12)
        page.locator("#generate").click()
        page.wait_for_function("document.querySelector('#figures').innerText.includes('Finished in')",
                               timeout=60_000)
        assert figures(page.locator("#figures").inner_html())["generated-tokens"] == "12"
        # The cookie is no API key: the completions API still wants the Bearer header.
        api = httpx.post(f"{base_url}/secure/v1/completions", json={"prompt": "x", "max_tokens": 2},
                         cookies={"neo_serve_ui": session["value"]}, timeout=30)
        assert api.status_code == 401
        # Signed out in another tab: Generate on this page goes to the sign-in page (Gradio alone
        # showed a bare "Error" badge, and the buttons seemed dead), and back after signing in.
        other = context.new_page()
        other.goto(secure_ui.rstrip("/") + "/logout")
        other.close()
        page.locator("#generate").click()
        page.wait_for_url("**/secure/ui/login?next=*", timeout=30_000)
        page.fill("#api_key", "ui-key-2")
        page.click("#sign-in")
        page.wait_for_selector("#generate", timeout=60_000)
        assert page.url.rstrip("/") == secure_ui.rstrip("/")
        page.goto(secure_ui.rstrip("/") + "/logout")
        assert "/secure/ui/login" in page.url
        page.goto(secure_ui)
        assert "/secure/ui/login" in page.url
    finally:
        context.close()
    # Where the sign-in goes next comes from the form: it is sent percent-encoded (a raw "✓" made
    # the redirect fail with a 500, and CR/LF went into the Location header as they came).
    for next_url, location in [("/secure/ui/✓", "/secure/ui/%E2%9C%93"),
                               ("/secure/ui/x\r\nSet-Cookie: evil=1", "/secure/ui/x%0D%0ASet-Cookie:%20evil=1")]:
        signed_in = httpx.post(f"{secure_ui}login", data={"api_key": "ui-key-1", "next": next_url}, timeout=30)
        assert signed_in.status_code == 303 and signed_in.headers["location"] == location, signed_in.headers
        assert "evil" not in signed_in.headers["set-cookie"]


@pytest.mark.parametrize("prefix", ["", "/secure"], ids=["open", "api-keys-and-prefix"])
def test_the_api_pages_draw_the_api_from_the_app_alone(browser, base_url, app, secure_ui, prefix):
    """The banner's "API docs": /docs (Swagger UI) and /redoc draw the API with nothing from outside
    the app. FastAPI's own pages fetch their scripts from a CDN, and stayed blank on an offline
    laptop or in an air-gapped cluster. Behind API keys (the pages and their assets are open, the
    API is not) and under a route prefix, too."""
    context, outside = app_only_context(browser, base_url)
    try:
        page = context.new_page()
        page.goto(f"{base_url}{prefix}/docs")
        page.locator(".opblock-summary-path", has_text="/v1/completions").first.wait_for(timeout=30_000)
        page.goto(f"{base_url}{prefix}/redoc")
        page.locator("h1", has_text="neo-serve").first.wait_for(timeout=30_000)
        page.get_by_text("/v1/completions").first.wait_for(state="attached", timeout=30_000)
    finally:
        context.close()
    # But for ReDoc's "API docs by Redocly" logo, hard-coded in its script: offline it is not drawn.
    assert set(outside) <= {"https://cdn.redoc.ly/redoc/logo-mini.svg"}, f"requests outside the app: {outside}"
    if prefix:
        assert httpx.get(f"{base_url}{prefix}/docs/assets/swagger-ui.css", timeout=30).status_code == 200
        assert httpx.get(f"{base_url}{prefix}/v1/models", timeout=30).status_code == 401  # (tests/test_access.py)
