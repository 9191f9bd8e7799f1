"""The router's checks on a request body's size, made on the raw body before validation, and the
request model's own checks of what it cannot bound that way (no Ray: pure functions)."""

from __future__ import annotations

import pytest

from neo_serve.serve.completions import RequestBounds, parse_request
from neo_serve.serve.config import RouteLimits
from neo_serve.serve.protocol import APIError

BOUNDS = RequestBounds({"small": RouteLimits(max_prompts_per_request=8, max_model_len=64),
                        "large": RouteLimits(max_prompts_per_request=32, max_model_len=2048)})


def refusal(bounds: RequestBounds, body: dict) -> APIError:
    with pytest.raises(APIError) as caught:
        bounds.check_raw(body)
    assert caught.value.status == 400
    return caught.value


def test_a_million_token_ids_are_refused_by_the_named_models_window():
    error = refusal(BOUNDS, {"model": "small", "prompt": [1] * 1_000_000})
    assert str(error) == "prompt has 1000000 tokens; the context window is 64" and error.param == "prompt"
    # Each prompt of a batch is bounded too, and named by its place, as the pipeline names them.
    error = refusal(BOUNDS, {"model": "small", "prompt": [[1, 2], [1] * 65]})
    assert str(error) == "prompt 1: prompt has 65 tokens; the context window is 64"
    BOUNDS.check_raw({"model": "small", "prompt": [[1] * 64] * 8})  # at the limits: the full checks decide


def test_a_million_prompts_are_refused_by_the_named_models_queue():
    for prompt in ([[1]] * 1_000_000, ["x"] * 1_000_000):
        error = refusal(BOUNDS, {"model": "small", "prompt": prompt})
        assert error.code == "too_many_prompts" and error.param == "prompt"
        assert str(error).startswith("the request has 1000000 prompts; model `small` takes at most 8 per request")


def test_without_a_known_model_the_largest_bounds_apply():
    # An unknown or missing model is answered (404, or "model is required") by the full checks;
    # the raw check still bounds the work by the largest limits served.
    for model in (None, "gpt-4", 42):
        body = {"prompt": [1] * 2048} if model is None else {"model": model, "prompt": [1] * 2048}
        BOUNDS.check_raw(body)
        error = refusal(BOUNDS, {**body, "prompt": [1] * 2049})
        assert str(error) == "prompt has 2049 tokens; the context window is 2048"
        error = refusal(BOUNDS, {**body, "prompt": ["x"] * 33})
        assert "the served models take at most 32 per request" in str(error)
    # One model served: it is the one a request without `model` goes to.
    single = RequestBounds({"small": RouteLimits(max_prompts_per_request=8, max_model_len=64)})
    assert str(refusal(single, {"prompt": [1] * 65})) == "prompt has 65 tokens; the context window is 64"


def test_limits_unknown_to_the_router_are_left_to_the_pipeline():
    # A window the router does not know (checkpoints not verified at build), or no queue limit:
    # nothing is refused here, the pipeline checks every prompt exactly.
    unknown = RequestBounds({"m": RouteLimits(max_prompts_per_request=None, max_model_len=None)})
    unknown.check_raw({"model": "m", "prompt": [[1] * 5000] * 2000})


@pytest.mark.parametrize("field, item, limit", [("stop", "a", 64), ("stop_token_ids", 1, 1024)])
def test_a_million_stop_entries_are_refused_before_validation(field, item, limit):
    # pydantic validated 2.6 million stop_token_ids on the router's event loop before refusing
    # them; counted on the raw body, they are refused at once, with the full checks' message.
    error = refusal(BOUNDS, {"prompt": "x", field: [item] * 1_000_000})
    assert error.param == field and "1000000" in str(error)
    with pytest.raises(APIError) as full:
        parse_request({"prompt": "x", field: [item] * (limit + 1)})
    assert str(full.value) == str(error).replace("1000000", str(limit + 1))
    BOUNDS.check_raw({"prompt": "x", field: [item] * limit})  # at the limit: the full checks decide


def test_unknown_keys_are_named_before_the_rest_is_validated():
    body = {"prompt": "x", **{f"k{i}": 0 for i in range(100_000)}}
    error = refusal(BOUNDS, body)
    assert str(error) == "k0: unknown parameter" and error.param == "k0"


@pytest.mark.parametrize("option", ["include_usge", "continuous_usage_stats"])
def test_a_misspelt_or_unsupported_stream_option_is_refused(option):
    with pytest.raises(APIError) as caught:
        parse_request({"prompt": "x", "stream": True, "stream_options": {option: True}})
    assert str(caught.value) == f"stream_options.{option}: unknown parameter"
    assert caught.value.param == "stream_options"


@pytest.mark.parametrize("prompt, prompts", [
    ("def f(", ["def f("]),
    (["a", "b"], ["a", "b"]),
    ([5, 17, 42], [[5, 17, 42]]),
    ([[5], [17, 42]], [[5], [17, 42]]),
])
def test_each_prompt_form_is_read(prompt, prompts):
    assert parse_request({"prompt": prompt}).prompts() == prompts


@pytest.mark.parametrize("prompt", [[1, "a"], ["a", 1], [[1], "a"], ["a", [1]], 5, None, [[1.5]], {"a": 1}])
def test_mixed_or_wrong_prompt_forms_are_refused(prompt):
    with pytest.raises(APIError) as caught:
        parse_request({"prompt": prompt})
    assert caught.value.param == "prompt"
    assert "must be a string, a list of strings, a list of token ids or a list of token id lists" in str(caught.value)


@pytest.mark.parametrize("prompt", [[-1], [2**31], [[1], [2**40]]])
def test_token_ids_out_of_range_are_refused(prompt):
    with pytest.raises(APIError, match="token ids must be between 0 and 2147483647"):
        parse_request({"prompt": prompt})
    with pytest.raises(APIError, match="token ids must be between 0 and 2147483647"):
        parse_request({"prompt": "x", "stop_token_ids": prompt if isinstance(prompt[0], int) else [2**40]})


def test_a_field_name_that_is_not_unicode_is_refused_without_echoing_it():
    error = refusal(BOUNDS, {"prompt": "x", "\ud800": 1})
    assert error.param is None and "lone surrogate" in str(error)
    # No APIError carries a lone surrogate: Ray cannot encode such an exception's text, and the
    # replica that raised it exits (the handle's caller got ActorUnavailableError).
    error = APIError("model `\ud800x` is unknown", param="\udfff")
    assert str(error).encode("utf-8") == b"model `\\ud800x` is unknown" and error.param == "\\udfff"


def test_a_non_streamed_response_too_large_for_the_router_is_refused():
    # The router builds a non-streamed response whole: echo + logprobs=20 + n=16 over many long
    # prompts made 145 MB of JSON from an 80 KB request (+650 MB of router memory), and the
    # 1024 prompts the queue allows would have taken about 20 GB.
    bounds = RequestBounds({"m": RouteLimits(max_prompts_per_request=1024, max_model_len=2048)})

    def check(**fields):
        request = parse_request({"model": "m", **fields})
        bounds.check_response_size("m", request, request.prompts())

    huge = {"prompt": [[1] * 500] * 64, "n": 16, "echo": True, "logprobs": 20, "max_tokens": 1}
    with pytest.raises(APIError) as caught:
        check(**huge)
    error = caught.value
    assert error.status == 400 and error.param == "logprobs" and error.code == "response_too_large"
    assert str(error).startswith("this request's logprobs could reach 10,773,504 entries (64 prompt(s), n=16")
    check(**huge, stream=True)  # streamed, choice by choice: allowed
    check(**{**huge, "logprobs": 1})  # 1.0M entries
    check(**{**huge, "logprobs": None})
    # What lm-evaluation-harness sends to score: echo, logprobs=1, max_tokens=0, a batch of prompts.
    check(prompt=[[1] * 2048] * 64, echo=True, logprobs=1, max_tokens=0)
    # An echoed prompt's text and token ids are copied into each choice, logprobs or not.
    with pytest.raises(APIError):
        check(prompt=[[1] * 2048] * 256, n=16, echo=True, max_tokens=0)  # 8.4M
    with pytest.raises(APIError):
        check(prompt=[[1]] * 300, n=16, return_token_ids=True, max_tokens=2047)  # 9.8M
    check(prompt=[[1] * 2048] * 64, n=16, echo=True, max_tokens=0)  # 2.1M
    check(prompt=[[1]] * 300, n=16, max_tokens=2047)  # text only: bounded by the work, not here
    # A text prompt counts the UTF-8 bytes of its NFC form (a token is at least one byte, and the
    # tokenizers normalize first: U+1D160 is 4 bytes, and 12 in NFC).
    with pytest.raises(APIError):
        check(prompt=["\U0001D160" * 50] * 64, n=16, echo=True, logprobs=20, max_tokens=0)  # 600 bytes: 12.9M
    texts = {"n": 16, "echo": True, "logprobs": 20, "max_tokens": 0}
    check(prompt=["e" * 200] * 64, **texts)  # 4.3M entries
    with pytest.raises(APIError):
        check(prompt=["é" * 200] * 64, **texts)  # 400 bytes each: 8.6M
    # Without max_tokens a sequence may run to the window, which also caps a long echo.
    with pytest.raises(APIError):
        check(prompt=["hi"] * 16, n=16, logprobs=20, max_tokens=None)  # 16 x 16 x 2048 x 21
    check(prompt=[[1] * 2000] * 8, n=16, echo=True, logprobs=20, max_tokens=100_000)  # 8 x 16 x 2048 x 21


def test_a_window_unknown_to_the_router_is_asked_for_only_when_the_bound_needs_it():
    # Built without reading the checkpoint (verify_checkpoints: false, no max_model_len), the
    # router does not know the window that bounds a request without max_tokens.
    bounds = RequestBounds({"m": RouteLimits(max_prompts_per_request=1024)})

    def needs(**fields) -> bool:
        body = {"model": "m", "prompt": "hi", "max_tokens": None, **fields}  # null: up to the window
        return bounds.needs_window("m", parse_request(body))

    assert needs(logprobs=20) and needs(echo=True) and needs(return_token_ids=True)
    assert not needs(logprobs=20, max_tokens=16)  # bounded by its max_tokens
    assert not needs(logprobs=20, stream=True)  # sent choice by choice
    assert not needs()  # text only
    unbounded = parse_request({"model": "m", "prompt": ["hi"] * 16, "n": 16, "logprobs": 20, "max_tokens": None})
    bounds.check_response_size("m", unbounded, unbounded.prompts())  # nothing to bound it by yet
    bounds.learn_window("m", 2048)
    assert not bounds.needs_window("m", unbounded) and bounds.limits["m"].max_prompts_per_request == 1024
    with pytest.raises(APIError) as caught:
        bounds.check_response_size("m", unbounded, unbounded.prompts())  # 16 x 16 x 2048 x 21
    assert caught.value.code == "response_too_large"
