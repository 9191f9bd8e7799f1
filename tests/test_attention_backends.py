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
def test_backends_agree(checkpoint, request):
    path = str(request.getfixturevalue(checkpoint))
    sdpa = outputs(LLM(path, dtype="float32", attention_backend="sdpa"))
    reference = outputs(LLM(path, dtype="float32", attention_backend="reference"))
    for a, b in zip(sdpa, reference):
        assert a.token_ids == b.token_ids
        for x, y in zip(a.logprobs, b.logprobs):
            assert abs(x[next(iter(x))] - y[next(iter(y))]) < 1e-4


def scores(llm) -> list[tuple[list, list]]:
    """Each prompt's logprobs of its own tokens and of its first generated token (both fixed by
    the prompt, so comparable across backends whose bfloat16 roundings differ), after 3 more
    tokens decoded (flash-attn's kv-cache path with one query)."""
    params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    results = []
    for output in llm.generate(PROMPTS, params):
        prompt = [next(iter(entry.values())) for entry in output.prompt_logprobs[1:]]
        first = output.outputs[0].logprobs[0]
        results.append((prompt, [first[output.outputs[0].token_ids[0]]]))
    return results


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
def test_flash_glue_scores_as_the_reference_in_bfloat16(checkpoint, request, flash_standin):
    # flash-attn runs float16 and bfloat16 only (the stand-in refuses float32, as the kernels do),
    # so its glue is checked in bfloat16, against the reference backend with a bfloat16 cache.
    path = str(request.getfixturevalue(checkpoint))
    reference = scores(LLM(path, dtype="bfloat16", kv_cache_dtype="bfloat16", attention_backend="reference"))
    # Chunked prefill (chunks of 20 tokens) exercises flash's kv-cache path with query_len > 1.
    flash_llm = LLM(path, dtype="bfloat16", attention_backend="flash", kv_cache_tokens=2048,
                    max_num_batched_tokens=20)
    assert flash_llm.engine.allocator.block_size == 256  # flash-attn's page size rule
    assert flash_llm.engine.executor.workers[0].kv.tensor.dtype == torch.bfloat16
    flash = scores(flash_llm)
    assert flash_standin.calls["varlen"] > 0 and flash_standin.calls["kvcache"] > 0
    for (ref_prompt, ref_first), (flash_prompt, flash_first) in zip(reference, flash):
        assert len(ref_prompt) == len(flash_prompt) > 0
        assert torch.allclose(torch.tensor(flash_prompt + flash_first), torch.tensor(ref_prompt + ref_first),
                              atol=0.05), (flash_prompt, ref_prompt)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_flash_backend_matches_the_reference_op_by_op(dtype, flash_standin):
    """One attention call over a fresh prefill, a decode, a continued prefill and a decode past a
    window, in the dtypes flash-attn runs: the flash backend (stand-in kernels) against the
    float32 textbook reference."""
    from neo_serve.models.attention import AttentionMetadata, FlashAttentionBackend, ReferenceBackend, SequenceSlice

    heads, dim, block = 4, 32, 256
    generator = torch.Generator().manual_seed(0)
    slices = (SequenceSlice(query_start=0, query_len=20, context_len=0, kv_start=0),       # fresh prefill
              SequenceSlice(query_start=20, query_len=1, context_len=37, kv_start=256),    # decode
              SequenceSlice(query_start=21, query_len=5, context_len=30, kv_start=512),    # continued prefill
              SequenceSlice(query_start=26, query_len=1, context_len=300, kv_start=768))   # decode, 2 pages
    tokens, slots = 27, 5 * block  # the last sequence spans two pages
    q, k, v = (torch.randn(tokens, heads, dim, generator=generator).to(dtype) for _ in range(3))
    context_k, context_v = (torch.randn(slots, heads, dim, generator=generator).to(dtype) for _ in range(2))
    for window in (None, 16):
        meta = AttentionMetadata.build(slices, block)
        flash_k, flash_v = context_k.clone(), context_v.clone()  # token-major [slots, heads, dim]
        flash_out = FlashAttentionBackend(flash_standin)(q, k, v, flash_k, flash_v, meta, scale=dim ** -0.5,
                                                        window=window)
        ref_k, ref_v = context_k.transpose(0, 1).clone(), context_v.transpose(0, 1).clone()  # [heads, slots, dim]
        ref_out = ReferenceBackend()(q, k, v, ref_k, ref_v, AttentionMetadata.build(slices, block),
                                     scale=dim ** -0.5, window=window)
        assert flash_out.dtype == dtype
        assert torch.allclose(flash_out.float(), ref_out.float(), atol=1e-2), (window, (flash_out - ref_out).abs().max())
        assert torch.equal(flash_k.transpose(0, 1), ref_k)  # the new keys written to the same slots


@pytest.fixture(scope="module")
def neo_checkpoint_past_float16(neo_checkpoint, tmp_path_factory):
    """The GPT-Neo checkpoint with q_proj and k_proj scaled by 60: its unscaled attention logits
    reach ~9e4, past float16's largest value (65504), as real GPT-Neo checkpoints' do."""
    import shutil

    from safetensors.torch import load_file, save_file

    directory = tmp_path_factory.mktemp("neo-past-float16")
    shutil.copytree(neo_checkpoint, directory, dirs_exist_ok=True)
    weights = load_file(directory / "model.safetensors")
    for name in weights:
        if name.endswith(("q_proj.weight", "k_proj.weight")):
            weights[name] = weights[name] * 60.0
    save_file(weights, directory / "model.safetensors", metadata={"format": "pt"})
    return directory


def test_gpt_neo_in_float16_scores_attention_logits_past_its_range(neo_checkpoint_past_float16):
    """GPT-Neo does not scale q.k; in float16 its logits overflow unless attention reduces in
    float32 (transformers upcasts). The SDPA backend, per sequence and with decodes batched as on a
    GPU, must score prompts and decode as the float32 reference backend does on the same model."""
    path = str(neo_checkpoint_past_float16)
    prompts = [list(range(10, 60)), list(range(100, 121))]  # past the local layers' window of 16
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True, logprobs=0, prompt_logprobs=0)

    def scored(llm) -> list[tuple[list[int], torch.Tensor]]:
        """Per prompt: the tokens decoded, and the logprobs of the prompt's and decoded tokens."""
        results = []
        for output in llm.generate(prompts, params):
            completion = output.outputs[0]
            chosen = [next(iter(entry.values())) for entry in output.prompt_logprobs[1:] + completion.logprobs]
            results.append((completion.token_ids, torch.tensor(chosen)))
        return results

    # A float16 cache, so that attention's inputs are float16 (a CPU may otherwise keep it in float32).
    reference = scored(LLM(path, dtype="float16", kv_cache_dtype="float16", attention_backend="reference"))
    batched_llm = LLM(path, dtype="float16", kv_cache_dtype="float16", attention_backend="sdpa")
    batched_llm.engine.executor.workers[0].backend.batch_decodes = True  # what make_backend sets for CUDA
    for llm in (LLM(path, dtype="float16", kv_cache_dtype="float16", attention_backend="sdpa"), batched_llm):
        assert llm.engine.executor.workers[0].kv.tensor.dtype == torch.float16
        for (tokens, logprobs), (reference_tokens, reference_logprobs) in zip(scored(llm), reference):
            assert reference_logprobs.isfinite().all()
            assert tokens == reference_tokens
            assert torch.allclose(logprobs, reference_logprobs, atol=1e-2), logprobs - reference_logprobs


def test_the_flash_standin_refuses_float32_as_the_kernels_do(flash_standin):
    q = torch.randn(4, 2, 8)
    cu_seqlens = torch.tensor([0, 4], dtype=torch.int32)
    with pytest.raises(AssertionError, match="fp16 and bf16"):
        flash_standin.flash_attn_varlen_func(q, q, q, cu_seqlens, cu_seqlens, 4, 4, causal=True)


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


def answer_as_a_gpu(monkeypatch, capability, kernels_run=True) -> None:
    """No GPU here: the CUDA queries, and flash-attn's one-call check, answer as a GPU would."""
    from neo_serve.models import attention

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(attention, "flash_kernels_run", lambda module, device: kernels_run)


@pytest.mark.parametrize("capability, kernels_run, usable", [
    ((7, 0), True, False), ((7, 5), True, False), ((8, 0), True, True), ((9, 0), True, True),
    ((10, 0), False, False)], ids=["V100", "T4", "A100", "H100", "B200-with-a-build-that-refuses-it"])
def test_flash_attn_only_on_gpus_that_run_it(flash_standin, monkeypatch, capability, kernels_run, usable):
    from neo_serve.models.attention import flash_attn_available

    answer_as_a_gpu(monkeypatch, capability, kernels_run)
    assert flash_attn_available() is usable


def test_flash_attn_setups_that_cannot_run_are_caught_at_construction(neox_checkpoint, flash_standin, monkeypatch):
    # No GPU here: the engine is built for "cuda" without loading stages (nothing touches CUDA).
    from neo_serve.engine.config import EngineConfig
    from neo_serve.engine.llm_engine import LLMEngine
    from neo_serve.errors import ConfigError
    from neo_serve.models import attention
    from neo_serve.serve.stages import UnloadedExecutor

    monkeypatch.setattr(attention, "flash_kernels_run", lambda module, device: True)  # as on a GPU it runs on

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
    # A newer GPU that this flash-attn build refuses (its one-call check fails). The engine reads
    # the capability only, as an app's build on a GPU host must not make a CUDA context (the
    # check allocates and runs a kernel); the stage's load makes the call, and refuses or falls back.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 0))
    checks: list = []
    monkeypatch.setattr(attention, "flash_kernels_run", lambda module, device: checks.append(device) or False)
    assert stage_setup(dtype="bfloat16", attention_backend="flash") == ("flash", 256)
    assert stage_setup(dtype="bfloat16") == ("auto", 256)
    assert checks == []
    with pytest.raises(ConfigError, match="one-call check"):
        attention.make_backend("flash", "cuda")
    assert attention.make_backend("auto", "cuda").name == "sdpa" and checks == ["cuda", "cuda"]


@pytest.mark.parametrize("device, capability, chosen", [("cuda", (8, 0), "flash"), ("cuda", (7, 5), "sdpa"),
                                                        ("cpu", (8, 0), "sdpa")], ids=["A100", "T4", "cpu-stage"])
def test_each_stage_picks_its_backend_for_its_own_device(flash_standin, monkeypatch, device, capability, chosen):
    from neo_serve.models.attention import make_backend

    answer_as_a_gpu(monkeypatch, capability)
    assert make_backend("auto", device).name == chosen


def test_an_explicit_flash_stage_on_a_gpu_that_cannot_run_it_is_refused(flash_standin, monkeypatch):
    # The stage actor's load (make_backend on its own GPU) names what is missing, instead of
    # flash-attn's "only supports Ampere GPUs or newer" at the first forward of every request.
    from neo_serve.errors import ConfigError
    from neo_serve.models.attention import make_backend

    asked: list = []
    answer_as_a_gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or (7, 5))
    with pytest.raises(ConfigError, match="attention_backend flash cannot run on cuda:1"):
        make_backend("flash", "cuda:1")
    assert asked == ["cuda:1"]  # that GPU's capability, not the current device's
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    assert make_backend("flash", "cuda:1").name == "flash"
    assert make_backend("flash", "cpu").name == "flash"  # the CPU stand-in the tests use


def test_auto_checks_that_flash_attn_runs_rather_than_trusting_the_capability(flash_standin, monkeypatch):
    # flash-attn 2 builds refuse GPUs other than sm8x and sm90 in their C++, so a newer GPU passes
    # the capability check; `auto` would then pick flash and every request would fail.
    from neo_serve.models.attention import flash_kernels_run

    assert flash_kernels_run(flash_standin, "cpu")
    assert flash_standin.calls["varlen"] == 1

    def refuses(*args, **kwargs):
        raise RuntimeError("FlashAttention only supports Ampere GPUs or newer.")

    monkeypatch.setattr(flash_standin, "flash_attn_varlen_func", refuses)
    assert not flash_kernels_run(flash_standin, "cpu")
