"""The served application end to end: real Ray, real Serve, real HTTP, the official openai client.

One Ray cluster and one application for the module: a 2-stage pipeline of a tiny GPT-NeoX
("neox") and a 1-stage tiny GPT-Neo ("neo") behind one router. Every greedy or seeded output is
compared token for token with the offline engine (`neo_serve.LLM`) on the same checkpoint.
"""

from __future__ import annotations

import asyncio
import codecs
import collections
import concurrent.futures
import contextlib
import json
import os
import re
import threading
import time
import traceback

import httpx
import openai
import pytest
import ray
import torch
from ray import serve

from checkpoints import build_tokenizer, make_neo, make_neox
from conftest_serve import (INGRESS_RESOURCE, apps_removed_afterwards, join_stream, kill,
                            kill_router_mid_streams, parse_sse, replica_actor, wait_until)
from neo_serve import LLM, SamplingParams
from neo_serve.app import build_app
from neo_serve.config import load_model_config
from neo_serve.engine.worker import StageWorkerSpec, StepInput
from neo_serve.models import partition_layers
from neo_serve.models.attention import SequenceSlice
from neo_serve.serve.stages import RayStageRunner
from neo_serve.serve.protocol import APIError

pytestmark = pytest.mark.timeout(300)

APP = "neo-serve"
PROMPTS = ["def hello_world():", "import os\nimport sys\n\n", "class Foo(object):\n    def __init__(self",
           "Grüße, naïve café 🙂", "for i in range(10):\n"]
TOKEN_PROMPTS = [[5, 17, 42, 99, 3], [200, 201, 202]]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve-ckpts")
    tokenizer = build_tokenizer()
    return {"neox": str(make_neox(root / "neox", tokenizer)),
            "neo": str(make_neo(root / "neo", tokenizer, seed=1))}


@pytest.fixture(scope="module")
def metrics_port(shared_serve):
    return shared_serve.metrics_port


@pytest.fixture(scope="module")
def base_url(shared_serve):
    # Its Ray processes have OMP_NUM_THREADS=1 (conftest_serve.shared_cluster): test_health_and_models
    # checks that stages still run as many torch threads as they have CPUs.
    with apps_removed_afterwards():
        yield shared_serve.url


@pytest.fixture(scope="module")
def app(base_url, checkpoints):
    """The application; returns the router's handle."""
    handle = serve.run(build_app({"models": [
        {"name": "neox", "checkpoint": checkpoints["neox"], "num_stages": 2, "dtype": "float32",
         "kv_cache_tokens": 8192, "max_num_seqs": 64},
        # A small step budget: prompts past 64 tokens are scored over several steps.
        {"name": "neo", "checkpoint": checkpoints["neo"], "num_stages": 1, "dtype": "float32",
         "kv_cache_tokens": 4096, "cpus_per_stage": 2, "max_num_batched_tokens": 64},
    ]}), name=APP, route_prefix="/")
    return handle


@pytest.fixture(scope="module")
def offline(checkpoints):
    """Offline engines on the same checkpoints: the reference outputs."""
    return {name: LLM(path, dtype="float32") for name, path in checkpoints.items()}


@pytest.fixture()
def client(base_url, app):
    with httpx.Client(base_url=base_url, timeout=60) as http:
        yield http


def pipeline_stats(model: str = "neox") -> dict:
    return serve.get_app_handle(APP).stats.remote().result()[model]


def reference(llm: LLM, prompts, **params):
    outputs = llm.generate(prompts, SamplingParams(**params))
    return [[(c.text, c.token_ids) for c in out.outputs] for out in outputs]


# ---- readiness and discovery ------------------------------------------------------------------
def test_health_and_models(client):
    health = client.get("/health")
    assert health.status_code == 200
    probe = client.head("/health")  # as some load balancers ask
    assert probe.status_code == 200 and probe.content == b""
    assert health.json()["models"]["neox"] == {"model": "neox", "ready": True, "stages_loaded": 2, "num_stages": 2}
    # Asked again (the pipeline is not, while it stays loaded): the same fields, not another shape.
    assert client.get("/health").json() == health.json()
    models = client.get("/v1/models").json()
    assert models["object"] == "list"
    cards = {card["id"]: card for card in models["data"]}
    assert set(cards) == {"neox", "neo"}
    assert cards["neox"]["max_model_len"] == 512 and cards["neox"]["num_stages"] == 2
    stats = pipeline_stats()
    # The router reaches the pipelines over Serve's gRPC, as the local cluster asks, though the
    # handles it was given were made in this process, whose Serve was imported before that.
    assert stats["router_transport"] == "grpc"
    assert [s["layers"] for s in stats["stages"]] == [[0, 2], [2, 4]]
    assert [s["kv_cache_dtype"] for s in stats["stages"]] == ["float32", "float32"]  # a float32 model
    # A stage's CPUs are its torch threads, whatever OMP_NUM_THREADS says: in its stage actor, and in
    # the replica itself with one stage.
    assert [s["threads"] for s in stats["stages"]] == [1, 1]
    assert [s["attention_backend"] for s in stats["stages"]] == ["sdpa", "sdpa"]  # what each stage runs
    assert [s["threads"] for s in pipeline_stats("neo")["stages"]] == [2]


def test_the_root_address_leads_to_the_playground(client):
    """A browser opening the server's address lands on the playground, not on a 404."""
    root = client.get("/", follow_redirects=False)
    assert root.status_code == 302 and root.headers["location"] == "/ui/"
    page = client.get("/", follow_redirects=True, headers={"accept": "text/html"})
    assert page.status_code == 200 and str(page.url).endswith("/ui/") and "<html" in page.text.lower()


# ---- exactness against the offline engine ------------------------------------------------------
def test_http_greedy_matches_offline(client, offline):
    prompts = PROMPTS + TOKEN_PROMPTS
    expected = reference(offline["neox"], prompts, max_tokens=24, temperature=0.0)
    for prompt, [(text, token_ids)] in zip(prompts, expected):
        body = client.post("/v1/completions", json={"model": "neox", "prompt": prompt, "max_tokens": 24,
                                                    "temperature": 0, "return_token_ids": True}).json()
        choice = body["choices"][0]
        assert choice["token_ids"] == token_ids
        assert choice["text"] == text
        assert choice["finish_reason"] == "length"
        prompt_len = len(prompt) if isinstance(prompt, list) else len(offline["neox"].tokenizer.encode(prompt))
        assert body["usage"] == {"prompt_tokens": prompt_len, "completion_tokens": len(token_ids),
                                 "total_tokens": prompt_len + len(token_ids)}
    # A list of prompts in one request: choices in prompt order.
    body = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[:3], "max_tokens": 24,
                                                "temperature": 0}).json()
    assert [c["text"] for c in body["choices"]] == [e[0][0] for e in expected[:3]]
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]


def test_http_stream_matches_offline(client, offline):
    [[(text, token_ids)]] = reference(offline["neox"], [PROMPTS[0]], max_tokens=32, temperature=0.0)
    with client.stream("POST", "/v1/completions", json={
            "model": "neox", "prompt": PROMPTS[0], "max_tokens": 32, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}, "return_token_ids": True}) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events, done = parse_sse(response.iter_lines())
    assert done
    assert len(events) > 3  # streamed, not one blob
    assert join_stream(events) == {0: text}
    assert [t for e in events for c in e["choices"] for t in c["token_ids"]] == token_ids
    # The prompt's ids once, in the choice's first event (as vLLM streams them).
    prompt_ids = [c["prompt_token_ids"] for e in events for c in e["choices"]]
    assert prompt_ids[0] == offline["neox"].tokenizer.encode(PROMPTS[0]) and not any(prompt_ids[1:])
    assert all(e["usage"] is None for e in events[:-1])
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == 32
    assert [c["finish_reason"] for e in events for c in e["choices"]][-1] == "length"


def test_sampling_with_seed_matches_offline(client, offline):
    """Seeded sampling is batch-invariant in the engine, so it must match too (n > 1, penalties)."""
    params = dict(max_tokens=20, temperature=0.9, top_p=0.95, top_k=50, seed=1234, n=3,
                  presence_penalty=0.5, frequency_penalty=0.3, repetition_penalty=1.1)
    [choices] = reference(offline["neox"], [PROMPTS[1]], **params)
    body = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[1],
                                                "return_token_ids": True, **params}).json()
    assert [(c["text"], c["token_ids"]) for c in body["choices"]] == choices
    assert [c["index"] for c in body["choices"]] == [0, 1, 2]
    # Several prompts with n > 1: choice p * n + i is prompt p's i-th sample, plain and streamed.
    params = {**params, "n": 2}
    expected = [choice for choices in reference(offline["neox"], PROMPTS[:2], **params) for choice in choices]
    body = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[:2], "return_token_ids": True,
                                                **params}).json()
    assert [(c["text"], c["token_ids"]) for c in body["choices"]] == expected
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    with client.stream("POST", "/v1/completions", json={"model": "neox", "prompt": PROMPTS[:2], "stream": True,
                                                        **params}) as response:
        events, done = parse_sse(response.iter_lines())
    assert done and join_stream(events) == {index: text for index, (text, _) in enumerate(expected)}


def test_logit_bias_matches_offline(client, offline):
    """OpenAI's logit_bias through HTTP, on the 2-stage model whose last stage picks greedy
    tokens itself when nothing else of the logits is needed."""
    [[(_, plain)]] = reference(offline["neox"], [PROMPTS[0]], max_tokens=8, temperature=0, ignore_eos=True)
    bias = {plain[0]: -100.0, plain[3]: 3.5}
    [[(text, ids)]] = reference(offline["neox"], [PROMPTS[0]], max_tokens=8, temperature=0, ignore_eos=True,
                                logit_bias=bias)
    assert ids[0] != plain[0]
    body = client.post("/v1/completions", json={
        "model": "neox", "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "ignore_eos": True,
        "return_token_ids": True, "logit_bias": {str(token): value for token, value in bias.items()}}).json()
    assert body["choices"][0]["token_ids"] == ids and body["choices"][0]["text"] == text
    # Through a handle, token ids are ints, as a Python caller has them.
    result = serve.get_app_handle(APP).generate.remote(
        model="neox", prompt=PROMPTS[0], max_tokens=8, temperature=0, ignore_eos=True, logit_bias=bias).result()
    assert result["choices"][0]["text"] == text


def test_stop_strings(client, offline):
    [[(full, _)]] = reference(offline["neox"], [PROMPTS[2]], max_tokens=32, temperature=0.0)
    stop = full[5:8]
    # Five, as lm-evaluation-harness sends for a task with four: it adds the EOS text.
    stops = ["\n\nQuestion:", "never-there", "</s>", stop, "<|endoftext|>"]
    [[(text, token_ids)]] = reference(offline["neox"], [PROMPTS[2]], max_tokens=32, temperature=0.0, stop=stops)
    assert text == full[:full.find(stop)]
    for stream in (False, True):
        request = {"model": "neox", "prompt": PROMPTS[2], "max_tokens": 32, "temperature": 0, "stop": stops,
                   "stream": stream}
        if stream:
            with client.stream("POST", "/v1/completions", json=request) as response:
                events, _ = parse_sse(response.iter_lines())
            got = join_stream(events)[0]
            reasons = [c["finish_reason"] for e in events for c in e["choices"] if c["finish_reason"]]
        else:
            choice = client.post("/v1/completions", json=request).json()["choices"][0]
            got, reasons = choice["text"], [choice["finish_reason"]]
        assert got == text and stop not in got
        assert reasons == ["stop"]


def test_openai_client_matches_offline(base_url, app, offline):
    expected = reference(offline["neox"], PROMPTS[:2], max_tokens=16, temperature=0.0)
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused")
    result = api.completions.create(model="neox", prompt=PROMPTS[:2], max_tokens=16, temperature=0)
    assert [c.text for c in result.choices] == [e[0][0] for e in expected]
    assert result.usage.completion_tokens == 32
    text = ""
    for chunk in api.completions.create(model="neox", prompt=PROMPTS[0], max_tokens=16, temperature=0,
                                        stream=True, stream_options={"include_usage": True}):
        text += "".join(c.text for c in chunk.choices)
    assert text == expected[0][0][0]
    assert [m.id for m in api.models.list().data] == ["neox", "neo"]
    card = api.models.retrieve("neo")
    assert card.id == "neo" and card.object == "model" and card.model_extra["num_stages"] == 1
    with pytest.raises(openai.NotFoundError) as excinfo:
        api.models.retrieve("gpt-4")
    assert excinfo.value.body["code"] == "model_not_found"
    # Base models, no chat template: a 400 that says so (as vLLM), not a bare 404 read as a wrong model.
    with pytest.raises(openai.BadRequestError) as excinfo:
        api.chat.completions.create(model="neox", messages=[{"role": "user", "content": "hi"}])
    assert excinfo.value.body["code"] == "chat_not_supported" and "/v1/completions" in excinfo.value.message
    # A parameter passed as None goes out as null (e.g. temperature=args.temperature left unset):
    # the default, as vLLM reads it, not a 400. Seeded, so the sampled text is the offline one.
    [[(sampled, _)]] = reference(offline["neox"], [PROMPTS[0]], max_tokens=8, seed=5)
    result = api.completions.create(model="neox", prompt=PROMPTS[0], max_tokens=8, seed=5, temperature=None,
                                    top_p=None, presence_penalty=None, frequency_penalty=None, n=None, echo=None,
                                    stream=None)
    assert result.choices[0].text == sampled
    with pytest.raises(openai.NotFoundError):
        api.completions.create(model="missing", prompt="x", max_tokens=1)
    with pytest.raises(openai.BadRequestError) as excinfo:
        api.completions.create(model="neox", prompt="x", max_tokens=1, temperature=-1)
    assert excinfo.value.body["param"] == "temperature"


def test_tokenizer_routes_give_the_ids_completions_use(client, offline):
    """vLLM's /tokenize, /detokenize and /tokenizer_info: lm-evaluation-harness's `local-completions`
    checks for /tokenizer_info (with `eos_token`) and /tokenize, and then tokenizes through the
    server, so a checkpoint whose tokenizer is not on the Hub (the demo's) can be evaluated."""
    tokenizer = offline["neox"].tokenizer
    info = client.get("/tokenizer_info", params={"model": "neox"}).json()
    assert info["eos_token"] == "<|endoftext|>" and info["eos_token_id"] == 0 and info["model_max_length"] == 512
    for text in (PROMPTS[0], PROMPTS[3]):  # ASCII, and accents and an emoji over several tokens
        body = client.post("/tokenize", json={"model": "neox", "prompt": text, "add_special_tokens": False}).json()
        assert body == {"tokens": tokenizer.encode(text), "count": len(tokenizer.encode(text)), "max_model_len": 512}
        # The ids a completion of that text starts from, and back to the text.
        echoed = client.post("/v1/completions", json={"model": "neox", "prompt": text, "max_tokens": 0, "echo": True,
                                                      "return_token_ids": True}).json()
        assert echoed["choices"][0]["prompt_token_ids"] == body["tokens"]
        assert client.post("/detokenize", json={"model": "neox", "tokens": body["tokens"]}).json() == {"prompt": text}
    # lm-eval reads the end token's id by encoding its text; special tokens are decoded too.
    assert client.post("/tokenize", json={"model": "neox", "prompt": "<|endoftext|>"}).json()["tokens"] == [0]
    assert client.post("/detokenize", json={"model": "neox", "tokens": [0]}).json() == {"prompt": "<|endoftext|>"}
    # The other model's tokenizer is asked by name. Both models here share one tokenizer and window,
    # so the routes also answer without a name, as lm-eval asks them (it sends none): with two
    # served that was a 400, and lm-eval then tried to download a tokenizer named after the model.
    assert client.get("/tokenizer_info", params={"model": "neo"}).json()["model"] == "neo"
    unnamed = client.get("/tokenizer_info")
    assert unnamed.status_code == 200 and unnamed.json() == {**info, "model": None}, unnamed.text
    assert client.post("/tokenize", json={"prompt": PROMPTS[3]}).json()["tokens"] == tokenizer.encode(PROMPTS[3])
    assert client.post("/detokenize", json={"tokens": [0]}).json() == {"prompt": "<|endoftext|>"}
    for response, status, param in [
            (client.get("/tokenizer_info", params={"model": "gpt-4"}), 404, "model"),
            (client.post("/tokenize", json={"model": "neox"}), 400, "prompt"),
            (client.post("/tokenize", json={"model": "neox", "prompt": [1, 2]}), 400, "prompt"),
            (client.post("/detokenize", json={"model": "neox", "tokens": [5, 999999]}), 400, "tokens"),
            (client.post("/detokenize", json={"model": "neox", "tokens": [-1]}), 400, "tokens")]:
        assert response.status_code == status, response.text
        assert response.json()["error"]["param"] == param, response.text


def test_models_share_a_tokenizer_only_with_the_same_ids_and_window():
    from neo_serve.serve.router import share_a_tokenizer

    info = {"model": "a", "eos_token": "<|endoftext|>", "tokenizer_sha256": "1f" * 32, "model_max_length": 2048}
    assert share_a_tokenizer([info, {**info, "model": "b"}])
    assert not share_a_tokenizer([info, {**info, "tokenizer_sha256": "2e" * 32}])  # other ids for a text
    assert not share_a_tokenizer([info, {**info, "model_max_length": 512}])  # lm-eval's truncation differs


def test_handle_generate_matches_offline(app, offline):
    [[(text, token_ids)]] = reference(offline["neox"], [PROMPTS[3]], max_tokens=20, temperature=0.0)
    handle = serve.get_app_handle(APP)
    result = handle.generate.remote(model="neox", prompt=PROMPTS[3], max_tokens=20, temperature=0,
                                    return_token_ids=True).result()
    assert result["object"] == "text_completion"
    assert result["choices"][0]["text"] == text and result["choices"][0]["token_ids"] == token_ids
    # The same parameters as a request dict, streamed.
    chunks = list(handle.options(stream=True).generate.remote(
        {"model": "neox", "prompt": PROMPTS[3], "max_tokens": 20, "temperature": 0, "stream": True}))
    assert len(chunks) > 3
    assert join_stream(chunks) == {0: text}
    with pytest.raises(APIError) as excinfo:
        handle.generate.remote(model="neox", prompt=PROMPTS[3], top_p=0).result()
    assert excinfo.value.status == 400 and excinfo.value.param == "top_p"


def test_prompt_logprobs_for_lm_eval(client, offline):
    """echo + logprobs + max_tokens=0: the prompt's scores, as lm-evaluation-harness requests them."""
    prompt = PROMPTS[2]
    [out] = offline["neox"].generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    body = client.post("/v1/completions", json={"model": "neox", "prompt": prompt, "max_tokens": 0,
                                                "logprobs": 1, "echo": True, "temperature": 0}).json()
    choice = body["choices"][0]
    assert choice["text"] == prompt
    logprobs = choice["logprobs"]
    ids = out.prompt_token_ids
    decode = offline["neox"].tokenizer.decode
    assert logprobs["tokens"] == [decode([t], skip_special_tokens=False) for t in ids]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    expected = [entry[token] for entry, token in zip(out.prompt_logprobs[1:], ids[1:])]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-5)
    assert all(len(top) >= 1 for top in logprobs["top_logprobs"][1:])
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    assert body["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)}


def test_prompt_logprobs_of_a_prompt_scored_over_several_steps(client, offline):
    """A prompt longer than the step's token budget (64 for "neo") is scored in pieces: the echo
    must still carry every prompt token's logprob, with max_tokens=0 (whose choice is marked
    finished from the start) and with a second choice that samples before the prompt is scored."""
    prompt = [(7 * i + 3) % 500 + 10 for i in range(300)]
    [out] = offline["neo"].generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    expected = [None] + [entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    for extra in ({"max_tokens": 0}, {"max_tokens": 1, "n": 2, "temperature": 0}):
        body = client.post("/v1/completions", json={"model": "neo", "prompt": prompt, "logprobs": 1, "echo": True,
                                                    **extra}).json()
        for choice in body["choices"]:
            scored = choice["logprobs"]["token_logprobs"][:len(prompt)]
            assert len(choice["logprobs"]["tokens"]) == len(prompt) + extra["max_tokens"], extra
            assert scored[0] is None and scored[1:] == pytest.approx(expected[1:], abs=1e-4), extra
        assert body["usage"]["prompt_tokens"] == len(prompt)


def test_logprobs_of_characters_split_over_tokens(client):
    """Byte-level BPE splits ü, ß, ï, é and 🙂 over several tokens. Each piece shows its bytes
    (OpenAI's `bytes:` form, so different pieces stay apart among the alternatives), and text
    offsets count the whole characters before a token, as they stand in the text."""
    prompt = PROMPTS[3]
    body = client.post("/v1/completions", json={"model": "neox", "prompt": prompt, "max_tokens": 0,
                                                "logprobs": 5, "echo": True}).json()
    choice = body["choices"][0]
    logprobs, text = choice["logprobs"], choice["text"]
    assert text == prompt
    pieces = [codecs.escape_decode(token[len("bytes:"):])[0] if token.startswith("bytes:")
              else token.encode() for token in logprobs["tokens"]]
    assert any(token.startswith("bytes:") for token in logprobs["tokens"])
    assert b"".join(pieces).decode() == prompt
    expected_offsets = [len(b"".join(pieces[:i]).decode("utf-8", "ignore")) for i in range(len(pieces))]
    assert logprobs["text_offset"] == expected_offsets
    assert all(len(top) >= 5 for top in logprobs["top_logprobs"][1:])


def test_generated_logprobs(client, offline):
    [out] = offline["neox"].generate([PROMPTS[0]], SamplingParams(max_tokens=8, temperature=0.0, logprobs=3))
    choice = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[0], "max_tokens": 8,
                                                  "temperature": 0, "logprobs": 3}).json()["choices"][0]
    got = choice["logprobs"]
    completion = out.outputs[0]
    assert len(got["tokens"]) == 8
    assert got["token_logprobs"] == pytest.approx(
        [entry[token] for entry, token in zip(completion.logprobs, completion.token_ids)], abs=1e-5)
    tokenizer = offline["neox"].tokenizer

    def shown(token: int) -> str:  # a piece of a character as its bytes, as OpenAI shows it
        text = tokenizer.decode([token], skip_special_tokens=False)
        raw = tokenizer.token_bytes(token)
        if "\ufffd" not in text or raw is None:
            return text
        return "bytes:" + "".join(chr(b) if 32 <= b < 127 and b != 92 else f"\\x{b:02x}" for b in raw)

    for top, entry in zip(got["top_logprobs"], completion.logprobs):
        expected = {shown(token): logprob for token, logprob in entry.items()}
        assert top == pytest.approx(expected, abs=1e-5)
        assert len(entry) in (3, 4)  # the top 3, plus the chosen token when it is not among them


# ---- load ----------------------------------------------------------------------------------------
def test_32_concurrent_streams(base_url, app, offline):
    prompts = [f"def function_{i}(x, y):\n    return" for i in range(32)]
    expected = [e[0][0] for e in reference(offline["neox"], prompts, max_tokens=24, temperature=0.0)]

    async def one(http: httpx.AsyncClient, prompt: str) -> tuple[str, bool]:
        async with http.stream("POST", "/v1/completions", json={
                "model": "neox", "prompt": prompt, "max_tokens": 24, "temperature": 0, "stream": True}) as response:
            assert response.status_code == 200
            events, done = parse_sse([line async for line in response.aiter_lines()])
        return join_stream(events)[0], done

    async def run_all():
        async with httpx.AsyncClient(base_url=base_url, timeout=120) as http:
            return await asyncio.gather(*(one(http, p) for p in prompts))

    # Micro-batches in flight, sampled while the streams run (the replica's peak is over its
    # lifetime, which earlier tests already took to 2).
    in_flight: list[int] = []
    sampling = threading.Event()

    def sample() -> None:
        while not sampling.is_set():
            in_flight.append(pipeline_stats()["in_flight_micro_batches"])
            sampling.wait(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    started = time.monotonic()
    try:
        results = asyncio.run(run_all())
    finally:
        sampling.set()
        sampler.join(timeout=30)
    elapsed = time.monotonic() - started
    assert [text for text, _ in results] == expected
    assert all(done for _, done in results)
    stats = pipeline_stats()
    assert stats["running"] == 0 and stats["free_kv_blocks"] == stats["total_kv_blocks"]
    # Both stages had a micro-batch at once, during this load (not only once, by chance).
    assert max(in_flight) == 2 and in_flight.count(2) >= 3, in_flight
    print(f"32 concurrent streams x 24 tokens in {elapsed:.2f}s")


# ---- routing -------------------------------------------------------------------------------------
def test_the_router_and_playground_replicas_run_without_torch(client):
    """They run no model: without torch a router replica imports in 3.8 s, not 5.4 (a 2 GHz core), and
    holds 180 MB less, and routers scale with the request rate. Checked on the replicas'
    processes once they have answered completions, streams, tokenizer calls and the playground."""
    import psutil

    body = {"model": "neox", "prompt": PROMPTS[0], "max_tokens": 4, "temperature": 0, "logprobs": 2, "echo": True}
    assert client.post("/v1/completions", json=body).status_code == 200
    assert client.post("/v1/completions", json={**body, "stream": True}).status_code == 200
    assert client.post("/tokenize", json={"model": "neox", "prompt": PROMPTS[0]}).status_code == 200
    assert client.get("/ui/", follow_redirects=True).status_code == 200

    def program(process: psutil.Process) -> str:
        with contextlib.suppress(psutil.Error):
            return (process.cmdline() or [""])[0]
        return ""  # gone meanwhile

    def loads_torch(deployment: str) -> bool:
        title = f"ray::ServeReplica:{APP}:{deployment}"  # the replica process's title (its argv[0])
        # Among this cluster's processes (this test process started its raylet, which started them):
        # the suite's other tests run `neo-serve up` side by side, with an app of the same name.
        [process] = [p for p in psutil.Process().children(recursive=True)
                     if re.fullmatch(re.escape(title) + r"(\..*)?", program(p))]
        return any("libtorch" in os.path.basename(m.path) for m in process.memory_maps())

    assert not loads_torch("Router") and not loads_torch("Playground")
    assert loads_torch("Pipeline-neo")  # what the check looks for is there where a model runs


def test_two_models_routed_by_name(client, offline):
    prompt = PROMPTS[0]
    for name in ("neox", "neo"):
        [[(text, token_ids)]] = reference(offline[name], [prompt], max_tokens=12, temperature=0.0)
        body = client.post("/v1/completions", json={"model": name, "prompt": prompt, "max_tokens": 12,
                                                    "temperature": 0, "return_token_ids": True}).json()
        assert body["model"] == name
        assert body["choices"][0]["token_ids"] == token_ids
    # Different random weights: the routing is visible in the output.
    texts = {name: reference(offline[name], [prompt], max_tokens=12, temperature=0.0)[0][0][0] for name in offline}
    assert texts["neox"] != texts["neo"]
    missing = client.post("/v1/completions", json={"model": "gpt-4", "prompt": "x"})
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found" and missing.json()["error"]["param"] == "model"
    # With two models served, the model must be named.
    unnamed = client.post("/v1/completions", json={"prompt": "x"})
    assert unnamed.status_code == 400 and unnamed.json()["error"]["param"] == "model"


# ---- errors ------------------------------------------------------------------------------------
@pytest.mark.parametrize("body, param", [
    ({"model": "neox", "prompt": "x", "temperature": -1}, "temperature"),
    ({"model": "neox", "prompt": "x", "n": 0}, "n"),
    ({"model": "neox", "prompt": "x", "top_p": 1.5}, "top_p"),
    ({"model": "neox", "prompt": "x", "logprobs": 50}, "logprobs"),
    ({"model": "neox", "prompt": []}, "prompt"),
    ({"model": "neox", "prompt": ["a", 3]}, "prompt"),
    ({"model": "neox"}, "prompt"),
    ({"model": "neox", "prompt": [999999]}, "prompt"),
    ({"model": "neox", "prompt": [1] * 600}, "prompt"),
    ({"model": "neox", "prompt": "x", "max_tokens": 100000}, "max_tokens"),
    ({"model": "neox", "prompt": "x", "logit_bias": {"x": 1.0}}, "logit_bias"),
    ({"model": "neox", "prompt": "x", "logit_bias": {"999999": 1.0}}, "logit_bias"),  # outside the vocabulary
    ({"model": "neox", "prompt": "x", "stop_token_ids": [2, 999999]}, "stop_token_ids"),  # could never stop
    ({"model": "neox", "prompt": "x", "logit_bias": {"5": -101}}, "logit_bias"),
    ({"model": "neox", "prompt": "x", "logit_bias": {"5": 1.0, "05": -100}}, "logit_bias"),  # token 5 twice
    ({"model": "neox", "prompt": "x", "best_of": 3}, "best_of"),
    ({"model": "neox", "prompt": ["fine", [999999]]}, "prompt"),
    ({"model": "neox", "prompt": [999999], "stream": True}, "prompt"),
    ({"model": "neox", "prompt": ""}, "prompt"),
    ({"model": "neox", "prompt": "x", "max_tokens": -1}, "max_tokens"),
    ({"model": "neox", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    ({"model": "neox", "prompt": "x", "frobnicate": True}, "frobnicate"),  # unknown (misspelt) parameter
    ({"model": "neox", "prompt": "x", "timeout": 0}, "timeout"),
])
def test_bad_requests_are_400(client, body, param):
    response = client.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param and error["message"]


def test_model_names_never_reach_the_filesystem(client, checkpoints):
    """A request's `model` is looked up among the served names only: the path of a checkpoint on
    this very machine, or a relative path, is an unknown model."""
    for name in (checkpoints["neox"], "../neox", "neox/../neo", "/etc/passwd", "neox\x00"):
        response = client.post("/v1/completions", json={"model": name, "prompt": "x", "max_tokens": 1})
        assert response.status_code == 404, response.text
        assert response.json()["error"]["code"] == "model_not_found"


def test_malformed_bodies_and_routes(client):
    for content in (b"{not json", b"[1, 2]", b'{"model": "neox", "prompt": "\xff\xfe"}'):
        response = client.post("/v1/completions", content=content, headers={"content-type": "application/json"})
        assert response.status_code == 400 and "error" in response.json()
    response = client.get("/v2/nothing")
    assert response.status_code == 404 and response.json()["error"]["type"] == "not_found_error"
    assert "GET /v2/nothing" in response.json()["error"]["message"]  # and the routes there are
    # A wrong method says which ones the route takes (RFC 9110: a 405 carries Allow).
    response = client.get("/v1/completions")
    assert response.status_code == 405 and response.headers["allow"] == "POST", response.headers


def test_an_unexpected_error_answers_500_without_the_replicas_traceback():
    """What a pipeline replica raises reaches the router as a RayTaskError, whose text is the
    remote traceback: file paths, pid and the node's address stay in the log."""
    from ray.exceptions import RayTaskError

    from neo_serve.serve.router import _internal_error, not_ready

    try:
        {}["secret_key"]
    except KeyError as exc:
        remote = RayTaskError("PipelineServer.generate", traceback.format_exc(), exc)
    response = asyncio.run(_internal_error(None, remote.as_instanceof_cause()))
    body = json.loads(response.body)
    assert response.status_code == 500 and body["error"]["type"] == "server_error"
    assert body["error"]["message"] == "internal error (KeyError); the server log has the details"
    # /health, which needs no key, says as little of a pipeline whose `ready` call failed.
    assert not_ready("neox", remote.as_instanceof_cause()) == {
        "model": "neox", "ready": False, "detail": "not ready (KeyError); the router's log has the details"}


def test_only_json_bodies_are_read(client):
    # A page on another site can POST text/plain or a form without a CORS preflight; with no API
    # key that would spend the model's compute. JSON only, as FastAPI's own parsing has it.
    body = json.dumps({"model": "neox", "prompt": "def f(", "max_tokens": 2})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", ""):
        refused = client.post("/v1/completions", content=body, headers={"content-type": content_type})
        assert refused.status_code == 415, (content_type, refused.text)
        error = refused.json()["error"]
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    # A browser's fetch of an untyped body (an ArrayBuffer) sends no Content-Type, but an Origin.
    untyped = client.post("/v1/completions", content=body, headers={"origin": "https://elsewhere.example"})
    assert untyped.status_code == 415, untyped.text
    for content_type in ("application/json; charset=utf-8", "application/vnd.api+json", None):
        headers = {} if content_type is None else {"content-type": content_type}
        answered = client.post("/v1/completions", content=body, headers=headers)
        assert answered.status_code == 200, (content_type, answered.text)
    assert pipeline_stats()["requests"] == 0


def test_replica_keeps_serving_after_errors(client, offline):
    for _ in range(3):
        assert client.post("/v1/completions", json={"model": "neox", "prompt": [999999]}).status_code == 400
    # A response too large for the router to build (up to 200 x 16 x 403 x 21 logprob entries) is
    # refused before any pipeline call.
    huge = client.post("/v1/completions", json={"model": "neox", "prompt": [[5, 17, 42]] * 200, "n": 16,
                                                "echo": True, "logprobs": 20, "max_tokens": 400})
    assert huge.status_code == 400 and huge.json()["error"]["code"] == "response_too_large", huge.text
    [[(text, _)]] = reference(offline["neox"], [PROMPTS[4]], max_tokens=8, temperature=0.0)
    body = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[4], "max_tokens": 8,
                                                "temperature": 0}).json()
    assert body["choices"][0]["text"] == text
    stats = pipeline_stats()
    assert stats["requests"] == 0 and stats["failed"] is None


# ---- cancellation and deadlines --------------------------------------------------------------------
LONG = {"model": "neox", "prompt": PROMPTS[0], "max_tokens": 480, "temperature": 0, "ignore_eos": True,
        "stream": True}


# Steps a cancelled sequence may still take part in: the micro-batches already in flight, and the
# steps run while the cancel travels from the client through the router to the replica (tens of
# milliseconds; a step of the tiny model takes a few). Running on to 480 tokens would take ~470.
STEPS_AFTER_CANCEL = 16


def _assert_freed_soon(steps_at_cancel: int) -> None:
    """The aborted sequence is gone within a few steps: no running sequence, every KV block free,
    and no step taken since. (A micro-batch submitted before the abort may still finish: the
    check waits for the pipe to drain too.)"""
    stats = wait_until(lambda: (s := pipeline_stats())["requests"] == 0 and s["in_flight_micro_batches"] == 0
                       and s, timeout=10, what="abort")
    assert stats["running"] == 0 and stats["waiting"] == 0
    assert stats["free_kv_blocks"] == stats["total_kv_blocks"]
    print(f"steps after cancel: {stats['num_steps'] - steps_at_cancel}")
    assert stats["num_steps"] - steps_at_cancel <= STEPS_AFTER_CANCEL, \
        f"the sequence ran {stats['num_steps'] - steps_at_cancel} more steps after it was cancelled"
    time.sleep(0.3)
    assert pipeline_stats()["num_steps"] == stats["num_steps"]  # nothing is stepped any more


def test_handle_cancel_frees_the_sequence(app):
    handle = serve.get_app_handle(APP)
    stream = handle.options(stream=True).generate.remote(LONG)
    for _ in range(3):
        next(stream)
    running = pipeline_stats()
    assert running["running"] == 1 and running["free_kv_blocks"] < running["total_kv_blocks"]
    steps_at_cancel = running["num_steps"]
    stream.cancel()
    _assert_freed_soon(steps_at_cancel)


def test_a_handle_stream_without_stream_options_starts_nothing(app):
    """`generate.remote(..., stream=True)` without `handle.options(stream=True)` is Serve's "returned
    a generator" error; the stream starts on its first read, so no sequence runs for a reader
    that will never come (it ran to max_tokens)."""
    handle = serve.get_app_handle(APP)
    steps_before = pipeline_stats()["num_steps"]
    with pytest.raises(Exception, match="generator"):
        handle.generate.remote(**LONG).result()
    time.sleep(0.5)
    stats = pipeline_stats()
    assert stats["running"] == 0 and stats["num_steps"] == steps_before, stats


def test_a_handle_call_is_keywords_or_one_dict(app):
    handle = serve.get_app_handle(APP)
    with pytest.raises(APIError, match="either as one dict or as keywords, not both") as both:
        handle.generate.remote({"model": "neox", "prompt": "x"}, max_tokens=100).result()
    assert both.value.status == 400  # max_tokens was silently dropped before
    with pytest.raises(APIError, match="not a bare prompt") as bare:
        handle.generate.remote("def f(").result()
    assert bare.value.param == "prompt"


def test_http_disconnect_frees_the_sequence(client):
    with client.stream("POST", "/v1/completions", json=LONG) as response:
        lines = response.iter_lines()
        for _ in range(6):
            next(lines)
        running = pipeline_stats()
        assert running["running"] == 1
    # Leaving the block closed the connection mid-stream.
    _assert_freed_soon(running["num_steps"])


def test_a_client_gone_before_the_stream_body_began_cancels_the_pipeline_calls():
    """A streamed completion's pipeline calls start before its response does. A client that hangs
    up before the body begins: Starlette cancels the body's generator unstarted, so no `finally`
    in it ran and the sequences generated to max_tokens for no one (review). The response itself
    closes the events, which cancels the calls. Starlette's real response, fed an ASGI disconnect."""
    from neo_serve.serve.completions import CompletionEvents
    from neo_serve.serve.router import _EventStreamResponse

    class Call:  # a pipeline call as the run holds it: it can be cancelled
        cancelled = False

        def cancel(self) -> None:
            self.cancelled = True

    class Run:  # a started run: its calls, and its events (whose body records that it started)
        streams = [Call(), Call()]
        began = False

        async def events(self):
            Run.began = True
            yield {"choices": []}

    async def hang_up_at_once(scope):
        async def receive():
            return {"type": "http.disconnect"}

        sent = []

        async def send(message):
            await asyncio.sleep(0.05)  # a slow client: the disconnect is seen first
            sent.append(message)

        run = Run()
        await _EventStreamResponse(CompletionEvents(run))(scope, receive, send)
        return run, sent

    scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "method": "POST", "path": "/"}
    run, sent = asyncio.run(hang_up_at_once(scope))
    assert not run.began and not any(message.get("body") for message in sent), sent
    assert all(call.cancelled for call in run.streams)


# ---- metrics -----------------------------------------------------------------------------------
def test_request_deadline_ends_the_request_and_frees_it(client, base_url):
    """Past its `timeout`, a request ends with a 408 `request_timeout` error (an error event after
    the text so far, when streaming) and its sequence is stopped, not left to run to 480 tokens."""
    started = time.monotonic()
    response = client.post("/v1/completions", json={**LONG, "stream": False, "timeout": 0.3})
    assert response.status_code == 408, response.text
    error = response.json()["error"]
    assert error["code"] == "request_timeout" and error["type"] == "timeout_error" and error["param"] == "timeout"
    assert time.monotonic() - started < 5
    _assert_freed_soon(pipeline_stats()["num_steps"])
    # OpenAI's client retries a 408 twice by default, each running into the same deadline: the
    # response tells it not to (`x-should-retry`), and it sends the request once.
    assert response.headers["x-should-retry"] == "false"
    sent = []
    http = httpx.Client(event_hooks={"request": [sent.append]})
    api = openai.OpenAI(base_url=f"{base_url}/v1", api_key="unused", http_client=http)
    with pytest.raises(openai.APIStatusError) as excinfo:
        api.completions.create(model="neox", prompt=PROMPTS[0], max_tokens=480, extra_body={"timeout": 0.3,
                               "ignore_eos": True})
    assert excinfo.value.status_code == 408 and len(sent) == 1
    http.close()

    with client.stream("POST", "/v1/completions", json={**LONG, "timeout": 0.5}) as streamed:
        assert streamed.status_code == 200
        events, done = parse_sse(list(streamed.iter_lines()))
        steps_at_deadline = pipeline_stats()["num_steps"]
    assert done and events[-1]["error"]["code"] == "request_timeout"
    assert join_stream(events[:-1])[0]  # the text generated before the deadline arrived
    _assert_freed_soon(steps_at_deadline)


def test_metrics_on_prometheus_endpoint(client, metrics_port):
    client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[0], "max_tokens": 8})
    names = ["ray_neo_serve_time_to_first_token_seconds_bucket", "ray_neo_serve_inter_token_latency_seconds_bucket",
             "ray_neo_serve_prompt_tokens", "ray_neo_serve_generation_tokens", "ray_neo_serve_num_running_seqs",
             "ray_neo_serve_num_waiting_seqs", "ray_neo_serve_kv_cache_usage",
             "ray_neo_serve_e2e_request_latency_seconds_bucket", "ray_neo_serve_request_queue_time_seconds_bucket",
             "ray_neo_serve_finished_sequences"]

    def scrape():
        try:
            text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
        except httpx.HTTPError:
            return None
        return text if all(name in text for name in names) else None

    text = wait_until(scrape, timeout=60, interval=1, what="neo-serve metrics on the Prometheus endpoint")
    kv_lines = [line for line in text.splitlines() if line.startswith("ray_neo_serve_kv_cache_usage{")]
    assert any('stage="1"' in line and 'model="neox"' in line for line in kv_lines)
    # Counters of what has not happened yet (no preemption in this module: its KV caches hold
    # every request) are exported at 0 from the replica's start, so rate() reads 0, not "no data".
    for model in ("neox", "neo"):
        preemptions = [line for line in text.splitlines() if line.startswith("ray_neo_serve_preemptions")
                       and f'model="{model}"' in line]
        assert preemptions and all(line.endswith(" 0.0") for line in preemptions), preemptions
        for reason in ("stop", "length", "abort"):
            assert any(line.startswith("ray_neo_serve_finished_sequences") and f'model="{model}"' in line
                       and f'finished_reason="{reason}"' in line for line in text.splitlines()), (model, reason)

    counted = ("ray_neo_serve_generation_tokens", "ray_neo_serve_prompt_tokens",
               "ray_neo_serve_time_to_first_token_seconds_count", "ray_neo_serve_inter_token_latency_seconds_count",
               "ray_neo_serve_e2e_request_latency_seconds_count", "ray_neo_serve_request_queue_time_seconds_count",
               'ray_neo_serve_finished_sequences{finished_reason="length"}')

    def total(text: str, name: str) -> float:  # summed over replicas; counters may carry `_total`
        name, _, label = name.partition("{")
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.split("{", 1)[0] in (name, name + "_total") and 'model="neox"' in line
                   and label.rstrip("}") in line)

    def totals(text: str) -> dict[str, float]:
        return {name: total(text, name) for name in counted}

    # The module's earlier requests are all exported once two scrapes, 2.5 export periods apart, agree.
    def settled():
        first = totals(scrape() or "")
        time.sleep(2.5)
        return first if first == totals(scrape() or "") else None

    before = wait_until(settled, timeout=60, interval=0, what="settled neo-serve counters")
    body = client.post("/v1/completions", json={"model": "neox", "prompt": PROMPTS[1], "max_tokens": 8,
                                                "temperature": 0, "ignore_eos": True}).json()
    prompt_tokens = body["usage"]["prompt_tokens"]
    assert body["usage"]["completion_tokens"] == 8 and prompt_tokens > 1

    def grown():
        now = totals(scrape() or "")
        return {name: now[name] - before[name] for name in counted}

    expected = {"ray_neo_serve_generation_tokens": 8, "ray_neo_serve_prompt_tokens": prompt_tokens,
                "ray_neo_serve_time_to_first_token_seconds_count": 1,
                "ray_neo_serve_e2e_request_latency_seconds_count": 1, "ray_neo_serve_request_queue_time_seconds_count": 1,
                'ray_neo_serve_finished_sequences{finished_reason="length"}': 1}
    growth = wait_until(lambda: (g := grown()) and all(g[k] >= v for k, v in expected.items()) and g,
                        timeout=30, interval=0.5, what="this request's tokens in the counters")
    assert {k: growth[k] for k in expected} == expected  # exactly this request's, no more
    assert 1 <= growth["ray_neo_serve_inter_token_latency_seconds_count"] <= 7  # one per chunk after the first

    # Idle now: the load gauges fall back to nothing, whatever the last step reported.
    def idle():
        text = scrape()
        if text is None:
            return None
        load = [float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.split("{", 1)[0] in ("ray_neo_serve_num_running_seqs", "ray_neo_serve_kv_cache_usage")
                and 'model="neox"' in line]
        return load if load and not any(load) else None

    wait_until(idle, timeout=30, interval=1, what="idle neox gauges at 0")


# ---- deployment config ---------------------------------------------------------------------------
def test_autoscaling_config_reaches_serve(app, checkpoints):
    name = "neo-autoscale"
    serve.run(build_app({"models": [{"name": "scaled", "checkpoint": checkpoints["neo"], "dtype": "float32",
                                     "autoscaling": {"min_replicas": 2, "max_replicas": 3,
                                                     "target_ongoing_requests": 4, "look_back_period_s": 5,
                                                     "metrics_interval_s": 2}}],
                         "router": {"num_cpus": 0.5, "autoscaling": {"min_replicas": 1, "max_replicas": 2},
                                    "resources": {INGRESS_RESOURCE: 1}},
                         "playground": {"resources": {INGRESS_RESOURCE: 2}}}),
              name=name, route_prefix="/scaled")
    try:
        from ray.serve.context import _get_global_client
        from ray.serve.schema import ServeInstanceDetails

        details = ServeInstanceDetails(**_get_global_client().get_serve_details())
        deployments = details.applications[name].deployments
        config = deployments["Pipeline-scaled"].deployment_config.autoscaling_config
        assert (config["min_replicas"], config["max_replicas"], config["target_ongoing_requests"],
                config["look_back_period_s"], config["metrics_interval_s"]) == (2, 3, 4, 5, 2)
        # Scaling down lets a long generation finish (Serve's own default would stop it at 20 s).
        assert deployments["Pipeline-scaled"].deployment_config.graceful_shutdown_timeout_s == 300
        # Nor may a router replica that relays it, or the playground whose run it is: the router
        # outlives the pipeline (a redeploy stops both at once) to send the error event and [DONE].
        assert deployments["Router"].deployment_config.graceful_shutdown_timeout_s == 330
        assert deployments["Playground"].deployment_config.graceful_shutdown_timeout_s == 300
        assert deployments["Router"].deployment_config.autoscaling_config["max_replicas"] == 2
        # And Serve acts on it: min_replicas pipelines are running.
        status = serve.status().applications[name].deployments["Pipeline-scaled"]
        assert status.replica_states.get("RUNNING") == 2
        # The router and the playground hold the custom resource that pins them to the nodes
        # offering it (on Kubernetes: the head): 1 router x 1 + the playground's 2 of 8.
        assert deployments["Router"].deployment_config.ray_actor_options.resources == {INGRESS_RESOURCE: 1}
        wait_until(lambda: ray.available_resources().get(INGRESS_RESOURCE) == 5, timeout=30,
                   what=f"router and playground holding {INGRESS_RESOURCE}")
    finally:
        serve.delete(name)


def test_autoscaling_adds_and_removes_whole_pipelines_under_load(base_url, app, checkpoints, offline):
    """Under load Serve adds a pipeline replica, with its own stage actors; once the load stops it
    removes one again, stages included. Every request, while the second one starts and runs,
    completes with the offline engine's tokens."""
    name, deployment = "neo-elastic", "Pipeline-elastic"
    serve.run(build_app({"models": [{"name": "elastic", "checkpoint": checkpoints["neo"], "num_stages": 2,
                                     "dtype": "float32", "cpus_per_stage": 0.5, "kv_cache_tokens": 2048,
                                     "autoscaling": {"min_replicas": 1, "max_replicas": 2,
                                                     "target_ongoing_requests": 1, "upscale_delay_s": 0,
                                                     "downscale_delay_s": 2, "look_back_period_s": 2,
                                                     "metrics_interval_s": 0.5}}],
                         "router": {"num_cpus": 0.5}, "playground": {"enabled": False}}),
              name=name, route_prefix="/elastic")

    def running() -> int:
        return serve.status().applications[name].deployments[deployment].replica_states.get("RUNNING", 0)

    def stage_actors() -> dict[str, set[str]]:
        """Live stage actors of the app, by pipeline replica: {replica id: {stage index}}."""
        found: dict[str, set[str]] = {}
        for actor in ray.util.list_named_actors(all_namespaces=True):
            if actor["name"].startswith(f"neo-serve-stage:{name}:{deployment}:"):
                replica, stage = actor["name"].rsplit(":", 2)[1:]
                found.setdefault(replica, set()).add(stage.split(".")[0])
        return found

    expected = {prompt: reference(offline["neo"], [prompt], max_tokens=48, temperature=0.0, ignore_eos=True)[0][0][0]
                for prompt in PROMPTS}
    stop, answered, wrong = threading.Event(), collections.Counter(), []

    def client(index: int) -> None:
        with httpx.Client(base_url=f"{base_url}/elastic", timeout=60) as http:
            while not stop.is_set():
                prompt = PROMPTS[index % len(PROMPTS)]
                body = http.post("/v1/completions", json={"prompt": prompt, "max_tokens": 48, "temperature": 0,
                                                          "ignore_eos": True}).json()
                text = body.get("choices", [{}])[0].get("text")
                if text != expected[prompt]:
                    wrong.append(body)
                answered[index] += 1

    try:
        assert running() == 1 and len(stage_actors()) == 1
        # Two clients keep two requests in flight (target 1 a replica: two pipelines wanted);
        # more only slowed the second pipeline's start on a 2-core machine.
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            clients = [pool.submit(client, index) for index in range(2)]
            try:
                # The router's handle reports to the autoscaler every 0.5 s (metrics_interval_s; at
                # Serve's 10 s the decision alone took up to 10 s), and a 2 GHz Zen 2 core took over a
                # minute to decide, start the replica and load its two stages (a CI failure at 60 s).
                wait_until(lambda: running() == 2, timeout=180, what="a second pipeline replica under load")
                pipelines = stage_actors()
                assert len(pipelines) == 2 and all(stages == {"0", "1"} for stages in pipelines.values()), pipelines
                time.sleep(2)  # requests on both pipelines
            finally:
                stop.set()
            for done in clients:
                done.result()
        wait_until(lambda: running() == 1 and len(stage_actors()) == 1, timeout=120,
                   what="back to one pipeline, its stages included, once the load stopped")
        assert not wrong, wrong[:2]
        assert sum(answered.values()) >= 8 and len(answered) == 2
    finally:
        stop.set()
        serve.delete(name)


def stage_actor(replica: str, stage: int) -> dict:
    [actor] = [a for a in ray.util.list_named_actors(all_namespaces=True)
               if a["name"].startswith("neo-serve-stage:") and f":{replica}:" in a["name"]
               and a["name"].rsplit(":", 1)[1].split(".")[0] == str(stage)]
    return actor


def test_health_is_503_until_stages_load(base_url, app, checkpoints, tmp_path):
    """Hold back the pipeline's placement group (a real resource shortage) and watch /health."""
    import shutil

    from ray.util.placement_group import placement_group, remove_placement_group

    name = "neo-health"
    checkpoint, hidden = tmp_path / "late", tmp_path / "hidden"
    shutil.copytree(checkpoints["neox"], checkpoint)
    router_cpus = 0.5
    free = ray.available_resources().get("CPU", 0)
    # The late pipeline needs 2 x 0.5 CPU for its stages + 1 for its scheduler.
    assert free >= router_cpus + 2, ray.available_resources()
    blocker = placement_group([{"CPU": free - router_cpus}])  # the router fits, the pipeline does not
    ray.get(blocker.ready(), timeout=30)
    try:
        serve.run_many([serve.RunTarget(build_app({
            "models": [{"name": "late", "checkpoint": str(checkpoint), "num_stages": 2, "dtype": "float32",
                        "cpus_per_stage": 0.5}],
            "router": {"num_cpus": router_cpus}, "playground": False}), name=name, route_prefix="/late")],
            wait_for_applications_running=False)

        def loading():
            # Until its route is in place, /late/... may reach the "/" app (a JSON 404) or, behind
            # HAProxy, hang while HAProxy reloads; the late router answers with its health schema.
            try:
                response = httpx.get(f"{base_url}/late/health", timeout=5)
            except httpx.TimeoutException:
                return None
            is_health = response.headers.get("content-type") == "application/json" and "status" in response.json()
            return response if is_health else None

        response = wait_until(loading, timeout=60, interval=0.2, what="the late router")
        assert response.status_code == 503
        assert response.json()["status"] == "loading" and response.json()["models"]["late"]["ready"] is False
        # Why it is not loading: Serve's own words, the resources it needs against those there are.
        response = wait_until(lambda: (r := httpx.get(f"{base_url}/late/health", timeout=30)).status_code == 503
                              and "Serve cannot place" in r.json()["models"]["late"]["detail"]
                              and r, timeout=60, interval=0.5, what="Serve's placement message in /health")
        detail = response.json()["models"]["late"]["detail"]
        assert 'Serve cannot place a pipeline yet: each needs [{"CPU": 1.5}, {"CPU": 0.5}]' in detail, detail
        assert "node:" not in detail  # not the cluster's resources (node addresses): /health needs no key
        remove_placement_group(blocker)
        blocker = None
        response = wait_until(lambda: (r := httpx.get(f"{base_url}/late/health", timeout=30)).status_code == 200 and r,
                              timeout=120, interval=0.2, what="/health 200")
        assert response.json()["models"]["late"] == {"model": "late", "ready": True, "stages_loaded": 2,
                                                     "num_stages": 2}
        ok = httpx.post(f"{base_url}/late/v1/completions", json={"prompt": "def f(", "max_tokens": 4}, timeout=60)
        assert ok.status_code == 200

        # The model's only pipeline is lost and its successors cannot load (their checkpoint is
        # gone): /health is 503 again (it stayed 200 for good once a pipeline had answered), and
        # 200 once one runs.
        replica = replica_actor(name, "Pipeline-late")
        checkpoint.rename(hidden)
        kill(replica, no_restart=True)
        response = wait_until(lambda: (r := httpx.get(f"{base_url}/late/health", timeout=30)).status_code == 503 and r,
                              timeout=60, interval=0.5, what="/health 503 with the pipeline gone")
        assert response.json()["models"]["late"]["ready"] is False
        response = wait_until(lambda: (r := httpx.get(f"{base_url}/late/health", timeout=30)).status_code == 503
                              and "Serve could not start" in r.json()["models"]["late"]["detail"] and r,
                              timeout=90, interval=0.5, what="Serve's start failure in /health")
        assert "Traceback" not in response.text and "hidden" not in response.text  # no paths, no traceback
        hidden.rename(checkpoint)
        wait_until(lambda: httpx.get(f"{base_url}/late/health", timeout=30).status_code == 200, timeout=120,
                   interval=0.5, what="/health 200 with a new pipeline")
    finally:
        if blocker is not None:
            remove_placement_group(blocker)
        if hidden.exists():
            hidden.rename(checkpoint)
        serve.delete(name)


def test_streams_of_a_router_that_died_are_stopped(base_url, app, checkpoints):
    """A router replica killed mid-stream must not leave its sequences running on to max_tokens,
    holding KV blocks and batch slots. Over gRPC (this cluster's transport) the replica's server
    cancels the calls as the router's connection closes; test_proxy_ingress checks the pipeline's
    own watch of its callers, which Ray's actor tasks need."""
    before, stopped = kill_router_mid_streams(base_url, checkpoints["neox"], name="neo-orphans", prefix="/orphans")
    assert stopped["free_kv_blocks"] == stopped["total_kv_blocks"]
    # Stopped as the connection closed, not run on to 480 tokens.
    assert stopped["num_steps"] - before["num_steps"] <= 240, (before["num_steps"], stopped["num_steps"])
    assert stopped["streams_of_dead_callers"] == 0, stopped


@pytest.fixture(scope="module")
def fragile_app(base_url, app, checkpoints):
    """Two 2-stage pipelines of the neox checkpoint: one that recovers from a dead stage and one
    whose recovery deadline is too short to ever make it."""
    name = "neo-recover"
    handle = serve.run(build_app({
        "models": [{"name": "fragile", "checkpoint": checkpoints["neox"], "num_stages": 2, "dtype": "float32",
                    "cpus_per_stage": 0.5, "health_check_period_s": 1},
                   {"name": "doomed", "checkpoint": checkpoints["neox"], "num_stages": 2, "dtype": "float32",
                    "cpus_per_stage": 0.5, "health_check_period_s": 1, "recovery_timeout_s": 0.05}],
        "router": {"num_cpus": 0.5}, "playground": False}), name=name, route_prefix="/recover")
    yield handle, f"{base_url}/recover/v1/completions"
    serve.delete(name)


def test_dead_stage_is_restarted_and_streams_complete(fragile_app, offline):
    """Kill a stage actor while generations stream: the pipeline restarts the stage (reloading its
    weights), recomputes the in-flight sequences from their tokens, and every client receives the
    complete greedy text it would have got without the fault, from the same replica."""
    handle, url = fragile_app
    prompts = ["def hello_world():", "import os\n", "class Greeter:\n    def"]
    expected = [e[0][0] for e in reference(offline["neox"], prompts, max_tokens=60, temperature=0.0,
                                           ignore_eos=True)]
    replica = handle.stats.remote().result()["fragile"]["replica"]
    received = [0] * len(prompts)

    async def one(http: httpx.AsyncClient, index: int) -> tuple[str, bool]:
        body = {"model": "fragile", "prompt": prompts[index], "max_tokens": 60, "temperature": 0,
                "ignore_eos": True, "stream": True}
        lines = []
        async with http.stream("POST", url, json=body) as response:
            assert response.status_code == 200
            async for line in response.aiter_lines():
                lines.append(line)
                received[index] += line.startswith("data: ")
        events, done = parse_sse(lines)
        return join_stream(events)[0], done

    async def kill_when_streaming():
        deadline = time.monotonic() + 60
        while min(received) < 3:  # every stream is under way
            assert time.monotonic() < deadline, "streams did not start"
            await asyncio.sleep(0.02)
        kill(stage_actor(replica, 1))

    async def run_all():
        async with httpx.AsyncClient(timeout=180) as http:
            results = asyncio.gather(*(one(http, i) for i in range(len(prompts))))
            await kill_when_streaming()
            return await results

    results = asyncio.run(run_all())
    assert [text for text, _ in results] == expected
    assert all(done for _, done in results)
    stats = handle.stats.remote().result()["fragile"]
    assert stats["num_recoveries"] == 1 and stats["replica"] == replica
    assert stats["running"] == 0 and stats["free_kv_blocks"] == stats["total_kv_blocks"]
    assert any(a["name"].endswith(":1.1") for a in ray.util.list_named_actors(all_namespaces=True)
               if f":{replica}:" in a["name"])  # the restarted stage


def test_a_busy_stage_is_not_taken_for_dead(base_url, checkpoints):
    """When a stage dies, the others may still be working through the micro-batches in flight:
    the liveness probe must not queue behind them, or a stage busy past its timeout is killed
    and reloads its weights (on a large model, minutes) although it was fine."""
    config = load_model_config(checkpoints["neox"])
    specs = [StageWorkerSpec(checkpoint=checkpoints["neox"], stage=stage, dtype="float32", device="cpu",
                             num_kv_slots=4096, block_size=16) for stage in partition_layers(config, 2)]
    # A prefill of 8 x 256 tokens, queued 400 times on stage 0: seconds of work.
    sequences = tuple(SequenceSlice(i * 256, 256, 0, i * 512) for i in range(8))
    step = StepInput(input_ids=torch.randint(0, 200, (8 * 256,)), positions=torch.arange(256).repeat(8),
                     sequences=sequences, logits_indices=torch.tensor([255]), kv_copies=())

    async def scenario() -> None:
        runner = await RayStageRunner.start(specs, num_cpus=0, num_gpus=0, num_threads=1)
        try:
            first, second = runner.actors
            queued = [first.execute.remote(step, None) for _ in range(400)]
            ray.kill(second)
            # ray.kill returns before the actor is gone: a ping sent at once may still be answered
            # (it was, once, on a loaded machine). The pipeline restarts stages only after a step
            # failed on a dead one, so wait until the death shows, as it would have then.
            deadline = time.monotonic() + 30
            while True:
                try:
                    await asyncio.wait_for(second.ping.remote(), timeout=5)
                except ray.exceptions.RayActorError:
                    break
                except asyncio.TimeoutError:
                    pass
                assert time.monotonic() < deadline, "the killed stage still answers"
                await asyncio.sleep(0.1)
            started = time.monotonic()
            assert await runner.restart_stages(probe_timeout_s=0.5) == [1]
            # Stage 0 was still busy past the probe's timeout, and kept its actor.
            _, pending = ray.wait(queued, num_returns=len(queued), timeout=0)
            assert pending and time.monotonic() - started > 0.5
            assert runner.actors[0] is first and runner.generation == 1
        finally:
            runner.close()  # kills stage 0 too, with what it still has queued

    asyncio.run(scenario())


def test_unrecoverable_stage_fails_requests_and_serve_replaces_the_pipeline(fragile_app):
    """When the stage cannot be restarted within the deadline, requests end with an explicit 503
    (never a hang), the replica fails its health check and Serve replaces the whole pipeline."""
    handle, url = fragile_app
    request = {"model": "doomed", "prompt": "def f(", "max_tokens": 4, "temperature": 0}
    first = handle.stats.remote().result()["doomed"]["replica"]
    kill(stage_actor(first, 1))
    # The idle pipeline finds its stage dead at this request's first step, so this request is
    # the one that fails: explicitly, retryable, and soon (the recovery deadline is 0.05 s).
    started = time.monotonic()
    failed = httpx.post(url, json=request, timeout=60)
    assert failed.status_code == 503, failed.text
    assert failed.json()["error"]["type"] == "service_unavailable_error"
    assert failed.headers["retry-after"] == "5"
    assert time.monotonic() - started < 20

    def replaced():
        stats = handle.stats.remote().result()["doomed"]
        return stats["replica"] != first and stats

    second = wait_until(replaced, timeout=120, interval=0.5, what="a new pipeline replica")["replica"]
    response = httpx.post(url, json=request, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 4

    # A handle's stream that fails after its first chunks gets the same answer as HTTP: an
    # APIError with status 503 and the retry hint, not the replica's RayTaskError.
    stream = handle.options(stream=True).generate.remote(
        model="doomed", prompt="def f(", max_tokens=400, temperature=0, ignore_eos=True, stream=True)
    for _ in range(3):
        next(stream)
    kill(stage_actor(second, 1))
    with pytest.raises(APIError) as failed_stream:
        for _ in stream:
            pass
    error = failed_stream.value
    assert error.status == 503 and error.type == "service_unavailable_error" and error.retry_after_s == 5


# ---- who may call --------------------------------------------------------------------------------
def test_api_keys_and_body_limit(base_url, app, checkpoints, tmp_path):
    """With keys configured, every route but /health and the API's docs needs `Authorization:
    Bearer <key>`; bodies over the limit get 413 before they are parsed; errors are OpenAI JSON."""
    keys = tmp_path / "keys"
    keys.write_text("first-key\nsecond-key\n")
    name = "neo-secure"
    serve.run(build_app({
        "models": [{"name": "neo", "checkpoint": checkpoints["neo"], "num_stages": 1, "dtype": "float32",
                    "cpus_per_stage": 0.5, "kv_cache_tokens": 1024}],
        "router": {"num_cpus": 0.5, "api_keys_file": str(keys), "max_body_bytes": 4096},
        "playground": False}), name=name, route_prefix="/secure")
    url = f"{base_url}/secure"
    body = {"model": "neo", "prompt": "def f(", "max_tokens": 3, "temperature": 0}
    try:
        assert httpx.get(f"{url}/health", timeout=30).status_code == 200  # probes need no key
        # The root names no model, so it needs no key; without a playground it lists the routes.
        for root in (f"{url}/", url):  # with or without the prefix's trailing slash
            index = httpx.get(root, timeout=30, follow_redirects=True)
            assert index.status_code == 200 and index.json()["routes"]["completions"] == "/secure/v1/completions"
        for headers in ({}, {"Authorization": "Bearer wrong-key"}, {"Authorization": "first-key"}):
            refused = httpx.post(f"{url}/v1/completions", json=body, headers=headers, timeout=30)
            assert refused.status_code == 401 and refused.json()["error"]["type"] == "authentication_error"
        assert httpx.get(f"{url}/v1/models", timeout=30).status_code == 401
        # The API's description and its page are open (as vLLM's), and offer the key as a bearer
        # token: /docs' Authorize button, which then sends it with each call tried there.
        page = httpx.get(f"{url}/docs", timeout=30)
        assert page.status_code == 200 and "swagger-ui" in page.text and "/secure/openapi.json" in page.text
        spec = httpx.get(f"{url}/openapi.json", timeout=30).json()
        assert spec["components"]["securitySchemes"]["apiKey"] == {**spec["components"]["securitySchemes"]["apiKey"],
                                                                   "type": "http", "scheme": "bearer"}
        assert spec["security"] == [{"apiKey": []}] and spec["paths"]["/health"]["get"]["security"] == []
        # No playground, so no sign-in: a key posted to its form gets no session cookie, and a
        # browser opening /ui is not sent round to a sign-in page that itself needs a key.
        login = httpx.post(f"{url}/ui/login", data={"api_key": "first-key", "next": "/secure/ui/"}, timeout=30)
        assert login.status_code == 401 and "set-cookie" not in login.headers, login.headers
        browser = httpx.get(f"{url}/ui/", headers={"accept": "text/html"}, timeout=30)
        assert browser.status_code == 401, (browser.status_code, browser.headers)
        for key in ("first-key", "second-key"):
            ok = httpx.post(f"{url}/v1/completions", json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)
            assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 3
        auth = {"Authorization": "Bearer first-key"}
        big = httpx.post(f"{url}/v1/completions", json={**body, "prompt": "x" * 5000}, headers=auth, timeout=30)
        assert big.status_code == 413 and big.json()["error"]["code"] == "request_too_large"

        def chunks():
            yield b'{"model": "neo", "prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        chunked = httpx.post(f"{url}/v1/completions", content=chunks(), headers=auth, timeout=30)
        assert chunked.status_code == 413
    finally:
        serve.delete(name)


def test_backpressure_refuses_at_once_with_retry_after(base_url, app, checkpoints):
    """Past the queue depth (one running request per replica, one waiting), new requests are
    refused at once with 429 and Retry-After instead of piling up; the admitted ones complete."""
    name = "neo-busy"
    serve.run(build_app({
        "models": [{"name": "neo", "checkpoint": checkpoints["neo"], "num_stages": 1, "dtype": "float32",
                    "cpus_per_stage": 0.5, "kv_cache_tokens": 4096, "max_ongoing_requests": 1,
                    "max_queued_requests": 1}],
        "router": {"num_cpus": 0.5}, "playground": False}), name=name, route_prefix="/busy")
    url = f"{base_url}/busy/v1/completions"
    body = {"model": "neo", "prompt": "def f(", "max_tokens": 300, "temperature": 0, "ignore_eos": True}

    async def one(http: httpx.AsyncClient) -> tuple[int, float, httpx.Response]:
        started = time.monotonic()
        response = await http.post(url, json=body)
        return response.status_code, time.monotonic() - started, response

    async def burst():
        # The first request runs before the others arrive: a request counts as queued in Serve's
        # handle until a replica takes it, so six at once may find the one queue place taken by
        # the first and refuse all five others. Its response headers come once the pipeline has
        # accepted it (the router waits for the first chunk), so it is running then.
        async with httpx.AsyncClient(timeout=120) as http:
            stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
            async with http.stream("POST", url, json=stream_body) as first:
                others = asyncio.gather(*(one(http) for _ in range(5)))
                events, done = parse_sse([line async for line in first.aiter_lines()])
                return (first.status_code, events, done), await others

    try:
        (first_status, events, done), results = asyncio.run(burst())
        assert first_status == 200 and done and events[-1]["usage"]["completion_tokens"] == 300
        statuses = sorted([first_status] + [status for status, _, _ in results])
        assert statuses.count(200) >= 2 and statuses.count(429) >= 1, [(s, r.text[:300]) for s, _, r in results]
        for status, elapsed, response in results:
            if status == 429:
                assert response.headers["retry-after"] == "1"
                error = response.json()["error"]  # OpenAI's error JSON, as every other error
                assert error["type"] == "rate_limit_error" and error["code"] == "server_busy", response.text
                assert elapsed < 5  # refused at once, not after waiting
            else:
                assert status == 200 and response.json()["usage"]["completion_tokens"] == 300

        # A request's prompts are calls sent together, each counted as queued until a replica takes
        # it: past max_queued_requests (1) they could never all be accepted, so 2 prompts are a 400
        # naming the limit (they were a 429 on every retry, on an idle server).
        short = {**body, "max_tokens": 4}
        too_many = httpx.post(url, json={**short, "prompt": ["def f(", "def g("]}, timeout=60)
        assert too_many.status_code == 400, too_many.text
        error = too_many.json()["error"]
        assert error["param"] == "prompt" and error["code"] == "too_many_prompts"
        assert "2 prompts" in error["message"] and "at most 1" in error["message"]
        fits = httpx.post(url, json={**short, "prompt": ["def f("], "n": 2}, timeout=60)
        assert fits.status_code == 200, fits.text
        assert [c["index"] for c in fits.json()["choices"]] == [0, 1]
    finally:
        serve.delete(name)


# ---- an app built without reading its checkpoint, with a long context window ---------------------
LONG_WINDOW = 32768


@pytest.fixture(scope="module")
def long_window(base_url, tmp_path_factory):
    """A tiny GPT-NeoX with a 32k window, served by an app that does not read its checkpoint at
    build time (`verify_checkpoints: false`, as when checkpoints live only on the GPU nodes), so
    the router does not know the window. Yields (its base URL, the offline engine)."""
    path = make_neox(tmp_path_factory.mktemp("long-window") / "long", build_tokenizer(),
                     max_position_embeddings=LONG_WINDOW)
    name = "neo-long"
    serve.run(build_app({
        "models": [{"name": "long", "checkpoint": str(path), "num_stages": 1, "dtype": "float32",
                    "cpus_per_stage": 0.5, "kv_cache_tokens": LONG_WINDOW, "max_num_batched_tokens": LONG_WINDOW}],
        "router": {"num_cpus": 0.5}, "playground": False, "verify_checkpoints": False}),
        name=name, route_prefix="/long")
    try:
        yield f"{base_url}/long", LLM(str(path), dtype="float32")
    finally:
        serve.delete(name)


def test_a_router_without_the_window_asks_the_pipeline_before_bounding_a_response(long_window):
    url, _ = long_window
    # Without max_tokens each of 16 x 16 sequences may run to the 32k window with 21 logprob
    # entries a token (176M): refused before any generation, as when the router read the checkpoint.
    huge = {"model": "long", "prompt": ["hi"] * 16, "n": 16, "logprobs": 20, "max_tokens": None}
    refused = httpx.post(f"{url}/v1/completions", json=huge, timeout=60)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert error["code"] == "response_too_large" and "176,160,768 entries" in error["message"], error
    small = httpx.post(f"{url}/v1/completions", json={**huge, "prompt": "hi", "n": 1, "logprobs": 1, "max_tokens": 4,
                                                      "temperature": 0}, timeout=60)
    assert small.status_code == 200 and len(small.json()["choices"][0]["logprobs"]["tokens"]) == 4, small.text


def test_a_pipeline_chunk_past_grpcs_default_message_size_reaches_the_client(long_window):
    """The pipeline streams a scored prompt's logprobs to the router in one chunk per step: 20k
    positions with their top 20 make a chunk of 5.9 MB pickled (measured; 4.7 MB at 16k), past the
    4 MiB gRPC message limit that Serve keeps for handle calls unless raised
    (neo_serve/serve/local_cluster.py)."""
    url, offline = long_window
    prompt = [(7 * i + 3) % 500 + 10 for i in range(20000)]
    body = httpx.post(f"{url}/v1/completions", json={"model": "long", "prompt": prompt, "max_tokens": 0,
                                                     "echo": True, "logprobs": 20}, timeout=240)
    assert body.status_code == 200, body.text[:500]
    logprobs = body.json()["choices"][0]["logprobs"]
    assert len(logprobs["token_logprobs"]) == len(prompt)
    # The top 20 of each position and the prompt's own token when not among them, keyed by token
    # text (two tokens of one text are one key).
    sizes = [len(top) for top in logprobs["top_logprobs"][1:]]
    assert max(sizes) == 21 and sum(sizes) > 19 * len(sizes), sorted(sizes)[:10]
    [out] = offline.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=1))
    expected = [entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    assert logprobs["token_logprobs"][1:] == pytest.approx(expected, abs=1e-4)
