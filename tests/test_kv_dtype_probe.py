"""`kv_cache_dtype: auto` on CPU: the model's half-precision dtype only where this CPU's kernels
for it are clearly faster than float32's, as measured when the stage loads."""

from __future__ import annotations

import pytest
import torch

from neo_serve import LLM, SamplingParams
from neo_serve.models import kv_dtype_probe
from neo_serve.models.kv_dtype_probe import choose, decode_call_seconds
from neo_serve.serve.stages import describe_stage


def test_probe_times_real_decode_calls_in_each_dtype():
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        seconds = decode_call_seconds(dtype, 4, 16)
        assert 0 < seconds < 1, (dtype, seconds)


@pytest.mark.parametrize("narrow_us, float32_us, expected", [
    (22, 30, torch.bfloat16),  # Intel with AMX: bfloat16 kernels faster
    (28, 30, torch.float32),  # near a tie: noise must not flip the choice from start to start
    (1500, 30, torch.float32),  # AMD EPYC: bfloat16 kernels ~50x slower
])
def test_half_precision_cache_needs_a_clear_speedup(narrow_us, float32_us, expected):
    assert choose(torch.bfloat16, narrow_seconds=narrow_us * 1e-6, float32_seconds=float32_us * 1e-6) == expected


@pytest.mark.parametrize("bfloat16_faster", [True, False])
def test_auto_kv_cache_follows_the_probe(neox_checkpoint, monkeypatch, bfloat16_faster):
    timings = {torch.bfloat16: 10e-6 if bfloat16_faster else 1e-3, torch.float32: 30e-6}
    monkeypatch.setattr(kv_dtype_probe, "decode_call_seconds", lambda dtype, heads, dim: timings[dtype])
    expected = torch.bfloat16 if bfloat16_faster else torch.float32
    llm = LLM(str(neox_checkpoint), dtype="bfloat16")
    assert llm.engine.executor.workers[0].kv.tensor.dtype == expected
    # Operators see the choice in the pipeline's stats (`stages`) and its "ready" log line.
    assert describe_stage(llm.engine.executor.workers[0])["kv_cache_dtype"] == str(expected).removeprefix("torch.")
    output = llm.generate(["def hello"], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))[0]
    assert len(output.outputs[0].token_ids) == 4
    # A float32 model keeps a float32 cache whatever the probe says: no rounding below the model's.
    assert LLM(str(neox_checkpoint), dtype="float32").engine.executor.workers[0].kv.tensor.dtype == torch.float32
