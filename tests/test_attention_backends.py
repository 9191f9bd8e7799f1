"""Every attention backend gives the same tokens; flash-attn's glue runs against a stand-in."""

from __future__ import annotations

import sys

import pytest
import torch

import flash_attn_standin
from neo_serve import LLM, SamplingParams

PROMPTS = [list(range(3, 9)), list(range(10, 60)), list(range(100, 121))]  # 6, 50 (> window 16), 21 tokens


def outputs(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True, logprobs=1)
    return [o.outputs[0] for o in llm.generate(PROMPTS, params)]


@pytest.fixture
def flash_standin(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn", flash_attn_standin)
    flash_attn_standin.calls.update(varlen=0, kvcache=0)
    return flash_attn_standin


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
def test_backends_agree(checkpoint, request, flash_standin):
    path = str(request.getfixturevalue(checkpoint))
    sdpa = outputs(LLM(path, dtype="float32", attention_backend="sdpa"))
    reference = outputs(LLM(path, dtype="float32", attention_backend="reference"))
    # Chunked prefill (chunks of 20 tokens) exercises flash's kv-cache path with query_len > 1.
    flash_llm = LLM(path, dtype="float32", attention_backend="flash", kv_cache_tokens=2048,
                    max_num_batched_tokens=20)
    assert flash_llm.engine.allocator.block_size == 256  # flash-attn's page size rule
    flash = outputs(flash_llm)
    assert flash_standin.calls["varlen"] > 0 and flash_standin.calls["kvcache"] > 0
    for a, b, c in zip(sdpa, reference, flash):
        assert a.token_ids == b.token_ids == c.token_ids
        for x, y, z in zip(a.logprobs, b.logprobs, c.logprobs):
            assert abs(x[next(iter(x))] - y[next(iter(y))]) < 1e-4
            assert abs(x[next(iter(x))] - z[next(iter(z))]) < 1e-4


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
@pytest.mark.parametrize("budget", [None, 1], ids=["one-group", "a-row-per-group"])
def test_decodes_batched_as_on_a_gpu_give_the_same_tokens(checkpoint, budget, request, monkeypatch):
    """On a GPU the SDPA backend attends a step's decoding sequences in a few padded calls instead
    of one per sequence; run here on the CPU, that path must give the per-sequence tokens."""
    from neo_serve.models.attention import make_backend

    assert make_backend("sdpa", "cuda").batch_decodes and not make_backend("sdpa", "cpu").batch_decodes
    path = str(request.getfixturevalue(checkpoint))
    calls = {"n": 0, "grouped": 0}
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        mask = kwargs.get("attn_mask")
        calls["n"] += 1
        calls["grouped"] += mask is not None and mask.dim() == 4  # a group's [rows, 1, 1, keys] padding mask
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counted)
    per_sequence = outputs(LLM(path, dtype="float32", attention_backend="sdpa"))
    per_sequence_calls, calls["n"] = calls["n"], 0
    assert calls["grouped"] == 0
    batched_llm = LLM(path, dtype="float32", attention_backend="sdpa")
    backend = batched_llm.engine.executor.workers[0].backend
    backend.batch_decodes = True  # what make_backend sets for a CUDA device
    if budget is not None:
        backend.gather_budget_bytes = budget  # each decoding sequence its own group
    batched = outputs(batched_llm)
    assert calls["grouped"] > 0
    if budget is None:
        assert calls["n"] < per_sequence_calls / 2  # three decoding sequences, one call per layer
    else:
        assert calls["n"] == per_sequence_calls
    for a, b in zip(per_sequence, batched):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x[next(iter(x))] - y[next(iter(y))]) < 1e-5


def test_auto_backend_is_sdpa_without_cuda(neox_checkpoint, flash_standin):
    llm = LLM(str(neox_checkpoint))
    assert llm.engine.executor.workers[0].backend.name == "sdpa"


@pytest.mark.parametrize("capability, usable", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((9, 0), True)],
                         ids=["V100", "T4", "A100", "H100"])
def test_flash_attn_only_on_gpus_that_run_it(flash_standin, monkeypatch, capability, usable):
    # No GPU here: the CUDA queries answer as a GPU of that generation would.
    from neo_serve.models.attention import flash_attn_available

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert flash_attn_available() is usable


def test_flash_attn_setups_that_cannot_run_are_caught_at_construction(neox_checkpoint, flash_standin, monkeypatch):
    # No GPU here: the engine is built for "cuda" without loading stages (nothing touches CUDA).
    from neo_serve.engine.config import EngineConfig
    from neo_serve.engine.llm_engine import LLMEngine
    from neo_serve.errors import ConfigError
    from neo_serve.serve.stages import UnloadedExecutor

    def stage_setup(**options) -> tuple[str, int]:
        engine = LLMEngine(EngineConfig(model=str(neox_checkpoint), device="cuda", **options),
                           executor=UnloadedExecutor())
        return engine.stage_specs[0].attention_backend, engine.allocator.block_size

    # `auto` in half precision is left to each stage of a pipeline (flash-attn if its GPU runs
    # it), with flash-attn's pages, whether or not the engine's own process sees a GPU: a
    # multi-stage replica's scheduler has none, and took SDPA for every stage.
    for visible in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: visible)
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
        assert stage_setup(dtype="float16", num_stages=2) == ("auto", 256)
    # One stage runs in the engine's process, on its GPU: flash-attn's pages only where that GPU
    # runs flash-attn. On a T4 they made each sequence hold 256 slots, so 16384 cache tokens ran
    # at most 64 sequences of deploy/gpt-neo-2.7b-1gpu.yaml's 128.
    for capability, chosen in (((8, 0), ("auto", 256)), ((7, 5), ("sdpa", 16))):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
        assert stage_setup(dtype="float16") == chosen
    # A config checked where no GPU is visible (a CPU head node at build time) cannot know the
    # replica's GPU: the stricter pages, or a cache limit passed there fails in an A100 replica.
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert stage_setup(dtype="float16") == ("auto", 256)
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        stage_setup(dtype="float16", kv_cache_tokens=500, max_model_len=300)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    # flash-attn computes in float16 or bfloat16, reading the cache in the model's dtype: auto
    # takes SDPA (and its smaller blocks) for anything else...
    assert stage_setup(dtype="float32") == ("sdpa", 16)
    assert stage_setup(dtype="float16", kv_cache_dtype="float32") == ("sdpa", 16)
    assert stage_setup(dtype="bfloat16", kv_cache_dtype="float16") == ("sdpa", 16)
    assert stage_setup(dtype="float16", block_size=16) == ("sdpa", 16)
    # ...and an explicit flash that cannot run is refused with what to change.
    with pytest.raises(ConfigError, match="float16 or bfloat16"):
        stage_setup(dtype="float32", attention_backend="flash")
    with pytest.raises(ConfigError, match="reads the KV cache in the model's dtype"):
        stage_setup(dtype="bfloat16", kv_cache_dtype="float16", attention_backend="flash")
    with pytest.raises(ConfigError, match="multiple of 256"):
        stage_setup(dtype="float16", attention_backend="flash", block_size=16)
    assert stage_setup(dtype="bfloat16", attention_backend="flash") == ("flash", 256)
    # One stage on a GPU flash-attn does not run on (a T4) fails at construction, not at the
    # first forward; a pipeline's stages are each checked on their own GPU (below).
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    with pytest.raises(ConfigError, match="Ampere or newer"):
        stage_setup(dtype="bfloat16", attention_backend="flash")


@pytest.mark.parametrize("device, capability, chosen", [("cuda", (8, 0), "flash"), ("cuda", (7, 5), "sdpa"),
                                                        ("cpu", (8, 0), "sdpa")], ids=["A100", "T4", "cpu-stage"])
def test_each_stage_picks_its_backend_for_its_own_device(flash_standin, monkeypatch, device, capability, chosen):
    from neo_serve.models.attention import make_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert make_backend("auto", device).name == chosen


def test_an_explicit_flash_stage_on_a_gpu_that_cannot_run_it_is_refused(flash_standin, monkeypatch):
    # The stage actor's load (make_backend on its own GPU) names what is missing, instead of
    # flash-attn's "only supports Ampere GPUs or newer" at the first forward of every request.
    from neo_serve.errors import ConfigError
    from neo_serve.models.attention import make_backend

    asked: list = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (7, 5))
    with pytest.raises(ConfigError, match="attention_backend flash cannot run on cuda:1"):
        make_backend("flash", "cuda:1")
    assert asked == ["cuda:1"]  # that GPU's capability, not the current device's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert make_backend("flash", "cuda:1").name == "flash"
    assert make_backend("flash", "cpu").name == "flash"  # the CPU stand-in the tests use
