"""The playground page (Gradio Blocks) and the ASGI app that serves it under `/ui`.

    prompt + examples | model picker, sampling controls
    Generate / Stop
    generated text (streams in), then the run's figures

The `generate` event is the playground's API (`gradio_client`: `api_name="/generate"`); Stop
cancels it, which cancels the pipeline request (see `backend.py`).
"""

from __future__ import annotations

import asyncio
import contextlib
import html
from collections import OrderedDict

import gradio as gr
from fastapi import FastAPI

from neo_serve.serve.config import PlaygroundArgs
from neo_serve.ui.backend import PlaygroundBackend, PlaygroundError, Run, describe_error, sampling_params

MOUNT_PATH = "/ui"

# The two prompts of the GPT-Neo / GPT-NeoX model cards, then two for the bundled demo model
# (trained on Python source).
EXAMPLES = [
    "In a shocking finding, scientists discovered a herd of unicorns living in a remote, previously unexplored "
    "valley, in the Andes Mountains. Even more surprising to the researchers was the fact that the unicorns spoke "
    "perfect English.",
    "def hello_world():",
    "import os\nimport sys\n\n\ndef main(argv):\n",
    "class Stack:\n    \"\"\"A last-in, first-out stack.\"\"\"\n\n    def __init__(self):\n",
]


class Defaults:
    """Sampling defaults: a playground's usual creative-but-coherent settings."""

    max_new_tokens = 128
    temperature = 0.8
    top_p = 0.95
    top_k = 50
    repetition_penalty = 1.1
    seed = -1  # random


# Local fonts only: the page must not fetch web fonts (air-gapped clusters, offline tests).
THEME = gr.themes.Soft(primary_hue="indigo", secondary_hue="slate",
                       font=["ui-sans-serif", "system-ui", "Segoe UI", "Helvetica", "Arial", "sans-serif"],
                       font_mono=["ui-monospace", "SFMono-Regular", "Menlo", "Consolas", "monospace"])
CSS = """
#prompt textarea, #output textarea { font-family: var(--font-mono); }
#stop { color: var(--error-text-color, #b91c1c); }
.run-status { margin: 0 0 8px; font-size: var(--text-md); }
.run-status.done b { color: #15803d; }
.run-status.stopped b { color: #b45309; }
.run-status.error b { color: #b91c1c; }
.run-figures { display: grid; grid-template-columns: repeat(5, minmax(0, 1fr)); gap: 8px; }
.run-figure { border: 1px solid var(--border-color-primary); border-radius: var(--radius-lg);
              padding: 8px 10px; background: var(--block-background-fill); }
.run-figure b { display: block; font-size: var(--text-xl); font-weight: 600; line-height: 1.3; }
.run-figure span { color: var(--body-text-color-subdued); font-size: var(--text-sm); }
.run-served { margin-top: 8px; color: var(--body-text-color-subdued); font-size: var(--text-sm); }
.run-served code { font-size: var(--text-sm); }
/* Gradio's red "Error" badge sits on the middle of an output whose event failed: on the figures it
   covered the status line that says what failed, on the output the text generated before. The
   toast and the status line say it. */
#figures span.error, #output span.error { display: none; }
"""

# With API keys on, a page whose sign-in ended (signed out in another tab, the server restarted
# with other keys) got 401s from Gradio's queue, which Gradio shows as a bare "Error" badge and
# nothing else: Generate and Stop seemed dead. Any 401 from the playground's own routes sends the
# browser to the sign-in page, which brings it back here. (No 401 can come without keys.)
HEAD = """<script>
(() => {
  const mount = (location.pathname.match(/^(.*?\\/ui)(\\/|$)/) || [])[1];
  if (!mount) return;
  const fetchFirst = window.fetch.bind(window);
  window.fetch = async (...args) => {
    const response = await fetchFirst(...args);
    if (response.status === 401) {
      const url = new URL(response.url || String(args[0] && args[0].url || args[0]), location.href);
      if (url.origin === location.origin && url.pathname.startsWith(mount + "/")) {
        location.assign(mount + "/login?next=" + encodeURIComponent(location.pathname + location.search));
      }
    }
    return response;
  };
})();
</script>"""


def render_figures(run: Run | None) -> str:
    """The run's status line and figures, as HTML (every figure in a `data-figure` card)."""
    if run is None:
        return '<p class="run-status idle">Pick an example or type a prompt, then <b>Generate</b>.</p>'
    status = {
        "running": f"<b>Generating…</b> {run.generated_tokens} tokens, {run.elapsed:.1f} s",
        "done": f"<b>Finished</b> in {run.elapsed:.2f} s",
        "stopped": f"<b>Stopped</b> after {run.generated_tokens} tokens ({run.elapsed:.2f} s)",
        "error": f"<b>{_e(run.error.title)}:</b> {_e(run.error.message)}" if run.error else "",
    }[run.status]
    ttft, speed = run.time_to_first_token, run.tokens_per_second
    figures = [
        ("prompt-tokens", "–" if run.prompt_tokens is None else str(run.prompt_tokens), "prompt tokens"),
        ("generated-tokens", str(run.generated_tokens), "generated tokens"),
        ("time-to-first-token", "–" if ttft is None else f"{ttft * 1000:.0f} ms", "time to first token"),
        ("tokens-per-second", "–" if speed is None else f"{speed:.1f}", "tokens/s"),
        ("finish-reason", finish_reason(run), "finish reason"),
    ]
    cards = "".join(f'<div class="run-figure" data-figure="{key}"><b>{_e(value)}</b><span>{label}</span></div>'
                    for key, value, label in figures)
    stages = f"{run.model.num_stages} pipeline stage{'s' if run.model.num_stages != 1 else ''}"
    replica = f' replica <code data-figure="replica">{_e(run.replica)}</code>' if run.replica else ""
    served = (f'<p class="run-served" data-figure="served-by">Served by <code>{_e(run.model.deployment)}</code>'
              f'{replica} ({stages})</p>')
    return f'<p class="run-status {run.status}">{status}</p><div class="run-figures">{cards}</div>{served}'


def _e(text: object) -> str:
    return html.escape(str(text))


def finish_reason(run: Run) -> str:
    if run.status == "stopped":
        return "stopped"
    if run.status == "error":
        return "error"
    if run.finish_reason == "length":  # max new tokens: a run that would pass the context is refused
        return "length"
    if run.finish_reason == "stop":
        if isinstance(run.stop_reason, str):
            return f"stop string {run.stop_reason!r}"
        return "end of text" if run.stop_reason is None else f"stop token {run.stop_reason}"
    if run.finish_reason == "abort":
        return "aborted"
    return "–"


ERROR_POPUP_S = 10  # the figures keep saying what failed; pop-ups kept for good piled up over the controls


def shown(error: PlaygroundError) -> gr.Error:
    """The pop-up for a failed run: its title and sentence, for ERROR_POPUP_S."""
    return gr.Error(error.message, title=error.title, duration=ERROR_POPUP_S, print_exception=False)


class RunLog:
    """Each session's latest run, so Stop can show the figures of the run it stopped."""

    def __init__(self, max_sessions: int = 1024) -> None:
        self._runs: OrderedDict[str, Run] = OrderedDict()
        self._max = max_sessions

    def start(self, session: str, run: Run) -> None:
        self._runs[session] = run
        self._runs.move_to_end(session)
        while len(self._runs) > self._max:
            self._runs.popitem(last=False)

    def get(self, session: str) -> Run | None:
        return self._runs.get(session)


def build_blocks(backend: PlaygroundBackend, settings: PlaygroundArgs) -> gr.Blocks:
    """The playground page; `generate` is exposed as the `/generate` API."""
    models = list(backend.models.values())
    runs = RunLog()

    def window(name: str) -> int:
        """The most new tokens the slider offers for a model: its context window (2048 when
        the model did not say)."""
        model = backend.models.get(name)
        return (model.max_model_len if model is not None else None) or 2048

    async def generate(prompt: str, model: str, max_new_tokens: float, temperature: float, top_p: float,
                       top_k: float, repetition_penalty: float, seed: float | None, stop: str,
                       request: gr.Request):
        """Generate a completion of `prompt`, streaming (text so far, figures HTML)."""
        try:
            run = Run(backend.model(model))
        except PlaygroundError as error:  # only through the API: the page offers served models only
            raise shown(error) from None
        runs.start(request.session_hash or "", run)
        if isinstance(max_new_tokens, (int, float)) and max_new_tokens >= window(model):
            # The slider's end, the window itself, can never fit beside a prompt: it means as many
            # tokens as fit (the API's max_tokens null), not an error on every run.
            max_new_tokens = None
        try:
            params = sampling_params(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, repetition_penalty=repetition_penalty, seed=seed, stop=stop)
            yield "", render_figures(run)
            # aclosing: a Stop that lands while this generator waits at a `yield` closes it
            # (GeneratorExit); the backend's stream must then be cancelled now, not at GC.
            async with contextlib.aclosing(backend.generate(run, prompt, params)) as updates:
                async for update in updates:
                    yield update.text, render_figures(update)
            run.end()
            yield run.text, render_figures(run)
        except (asyncio.CancelledError, GeneratorExit):  # Stop: the pipeline request is cancelled
            run.end(stopped=True)
            raise
        except Exception as exc:  # noqa: BLE001 - shown as a sentence, never as a traceback
            error = describe_error(exc, run.model)
            run.end(error=error)
            yield run.text, render_figures(run)
            raise shown(error) from None
        finally:
            run.end()

    async def stop(request: gr.Request):
        """Stop's own figures: the stopped run's, once its cancellation went through."""
        run = runs.get(request.session_hash or "")
        if run is None:
            return gr.skip()
        try:
            await asyncio.wait_for(run.done.wait(), timeout=5)
        except asyncio.TimeoutError:
            return gr.skip()
        return render_figures(run) if run.stopped else gr.skip()

    def describe_model(name: str) -> str:
        model = backend.models.get(name)
        if model is None:
            return ""
        context = f" · context window {model.max_model_len} tokens" if model.max_model_len else ""
        return f"`{model.deployment}` · {model.num_stages} pipeline stage{'s' if model.num_stages != 1 else ''}" \
               f"{context}"

    def pick_model(name: str, max_new: float) -> tuple[str, gr.Slider]:
        """A newly picked model's description, and the slider up to its own context window
        (a value past it comes down to it, since a run past the window is refused)."""
        limit = window(name)
        return describe_model(name), gr.Slider(maximum=limit, value=min(int(max_new), limit))

    with gr.Blocks(title="neo-serve playground", analytics_enabled=False) as demo:
        gr.Markdown("# neo-serve playground\nGPT-NeoX / GPT-Neo models served as pipelines on Ray Serve. "
                    "Tokens stream in as the pipeline generates them; **Stop** cancels the request on the server.")
        with gr.Row(equal_height=False):
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=20, elem_id="prompt",
                                    placeholder="Type a prompt, or pick an example below")
                with gr.Row():
                    run_button = gr.Button("Generate", variant="primary", elem_id="generate")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                gr.Examples([[example] for example in EXAMPLES], inputs=[prompt], label="Examples",
                            examples_per_page=len(EXAMPLES))
                output = gr.Textbox(label="Generated text", lines=12, max_lines=30, interactive=False,
                                    autoscroll=True, buttons=["copy"], elem_id="output")
                figures = gr.HTML(render_figures(None), elem_id="figures", js_on_load=None)
            with gr.Column(scale=2):
                model = gr.Dropdown([m.name for m in models], value=models[0].name, label="Model",
                                    elem_id="model", filterable=False)
                model_info = gr.Markdown(describe_model(models[0].name), elem_id="model-info")
                with gr.Group():
                    first_window = window(models[0].name)
                    max_new_tokens = gr.Slider(1, first_window, value=min(Defaults.max_new_tokens, first_window),
                                               step=1, label="Max new tokens", elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=Defaults.temperature, step=0.05, label="Temperature",
                                            info="0 = greedy", elem_id="temperature")
                    top_p = gr.Slider(0.05, 1.0, value=Defaults.top_p, step=0.01, label="Top-p", elem_id="top-p")
                    top_k = gr.Slider(0, 200, value=Defaults.top_k, step=1, label="Top-k", info="0 = off",
                                      elem_id="top-k")
                    repetition_penalty = gr.Slider(1.0, 2.0, value=Defaults.repetition_penalty, step=0.01,
                                                   label="Repetition penalty", info="1 = off",
                                                   elem_id="repetition-penalty")
                    # No minimum / maximum here: Gradio would refuse such a value before the run
                    # starts, and the last run's figures would stay as if they were this one's;
                    # `parse_seed` takes any negative as random and says what is too large or
                    # not whole (no `precision=0` either: Gradio would run 42.7 as 43 while the
                    # field still shows 42.7).
                    seed = gr.Number(Defaults.seed, label="Seed", elem_id="seed",
                                     info="-1 = random; any other value repeats a sampled run")
                    stop_strings = gr.Textbox(label="Stop strings", lines=2, elem_id="stop-strings",
                                              info=r"one per line (at most 4); \n is a newline",
                                              placeholder=r"e.g. \n\n")
        model.change(pick_model, [model, max_new_tokens], [model_info, max_new_tokens], queue=False,
                     api_visibility="private")
        inputs = [prompt, model, max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed, stop_strings]
        generating = run_button.click(generate, inputs, [output, figures], api_name="generate",
                                      concurrency_limit=settings.concurrency_limit, concurrency_id="generate",
                                      show_progress="minimal")
        # The cancel must not wait behind a handler: Stop cancels first, then shows the figures.
        stop_button.click(None, None, None, cancels=[generating], queue=False, api_visibility="private").then(
            stop, None, figures, queue=False, api_visibility="private")
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=settings.max_queue_size)
    poll_queue_gently(demo)
    return demo


# Gradio's queue looks for new events every 1 ms on Linux (and for progress every 10 ms) even
# when idle: 1,500 event-loop wake-ups a second, which kept an idle playground replica at 11% of a
# 2 GHz core, taken from the model on a laptop. 10 ms between looks is still far below what a
# click can tell (Gradio itself uses 50 ms on Windows); the playground reports no progress bars.
QUEUE_POLL_S = 0.01
PROGRESS_POLL_S = 0.1


def poll_queue_gently(demo: gr.Blocks) -> None:
    """Slow the idle polling of `demo`'s queue (made by `demo.queue()`) to `QUEUE_POLL_S`."""
    queue = demo._queue  # no public setting in Gradio 6
    queue.sleep_when_free = QUEUE_POLL_S
    queue.progress_update_sleep_when_free = PROGRESS_POLL_S


def build_asgi_app(backend: PlaygroundBackend, settings: PlaygroundArgs) -> FastAPI:
    """A FastAPI app with the playground mounted at /ui (the router forwards /ui/... to it)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    return gr.mount_gradio_app(app, build_blocks(backend, settings), path=MOUNT_PATH, theme=THEME, css=CSS, head=HEAD,
                               footer_links=["api", "settings"], run_history=False, show_error=True)
