"""Exact against transformers: greedy tokens, prompt logprobs, stage splits, batching."""

from __future__ import annotations

import functools

import pytest
import torch

from checkpoints import reference_greedy, reference_prompt_logprobs
from neo_serve import LLM, SamplingParams

CODE = "def hello_world():\n    print('hello, world')\n    return 42\n\nclass Greeter:\n    pass\n"
NEW_TOKENS = 40


@functools.lru_cache(maxsize=None)
def reference_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def prompts(llm) -> list[list[int]]:
    long = llm.tokenizer.encode(CODE * 2)
    return [long[:6], long[:15], long[:40], long]  # GPT-Neo's test window is 16


CHECKPOINTS = ["neox_checkpoint", "neox_sequential_checkpoint", "neox_sharded_checkpoint",
               "neox_hub_checkpoint", "neo_checkpoint"]


@pytest.mark.parametrize("checkpoint", CHECKPOINTS)
def test_greedy_tokens_and_prompt_logprobs_match_transformers(checkpoint, request):
    path = request.getfixturevalue(checkpoint)
    llm = LLM(str(path), dtype="float32")
    # CPU linears run with oneDNN-packed weights: exactness is checked on that fast path.
    assert llm.engine.executor.workers[0].packed_linears > 0
    ref = reference_model(str(path))
    batch = prompts(llm)
    assert len(batch[-1]) > 2 * 16  # longer than the GPT-Neo local window
    outs = llm.generate(batch, SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0,
                                              ignore_eos=True))
    assert len(outs) == len(batch)  # zip below would hide a missing output
    for prompt, out in zip(batch, outs):
        assert out.prompt_token_ids == prompt
        assert out.outputs[0].token_ids == reference_greedy(ref, prompt, NEW_TOKENS)
        assert out.outputs[0].finish_reason == "length"
        expected = reference_prompt_logprobs(ref, prompt)
        assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(prompt)
        got = [entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4


@pytest.mark.parametrize("checkpoint", ["neox_checkpoint", "neo_checkpoint"])
def test_stage_splits_and_batching_give_identical_outputs(checkpoint, request):
    path = str(request.getfixturevalue(checkpoint))
    params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True, logprobs=2)
    single = LLM(path, dtype="float32", num_stages=1)
    batch = prompts(single)
    alone = [single.generate([p], params)[0].outputs[0] for p in batch]
    for stages in (1, 2, 3):
        llm = single if stages == 1 else LLM(path, dtype="float32", num_stages=stages)
        assert len(llm.engine.executor.workers) == stages
        together = llm.generate(batch, params)
        assert len(together) == len(batch)
        for solo, joint in zip(alone, together):
            assert joint.outputs[0].token_ids == solo.token_ids
            assert len(joint.outputs[0].logprobs) == len(solo.logprobs) == NEW_TOKENS
            for a, b in zip(joint.outputs[0].logprobs, solo.logprobs):
                assert a.keys() == b.keys()
                assert max(abs(a[k] - b[k]) for k in a) < 1e-4


def test_chunked_prefill_and_tiny_kv_cache_preserve_outputs(neo_checkpoint):
    """Prompts cut into chunks of 7 tokens (crossing the local window) and a KV cache so small
    that sequences are preempted and recomputed: outputs stay identical."""
    path = str(neo_checkpoint)
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    roomy = LLM(path, dtype="float32")
    batch = prompts(roomy)
    expected = [o.outputs[0].token_ids for o in roomy.generate(batch, params)]
    # Plain torch linears here, so both linear paths are checked against the same tokens.
    tight = LLM(path, dtype="float32", max_num_batched_tokens=7, kv_cache_tokens=128, max_model_len=128,
                pack_cpu_linears=False)
    got = [o.outputs[0].token_ids for o in tight.generate(batch, params)]
    assert got == expected
    assert tight.engine.scheduler.num_preemptions > 0
    assert tight.engine.allocator.num_free_blocks == tight.engine.allocator.num_blocks


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16"])  # `auto` picks either on CPU
def test_bfloat16_close_to_float32(neox_checkpoint, kv_cache_dtype):
    """bfloat16 keeps 8 mantissa bits (relative rounding 2^-9 ~ 0.2% per op). Through 4 layers and
    a 512-way softmax we allow 0.1 nats mean / 0.5 nats max on prompt logprobs, and require the
    first greedy tokens to agree (where the float32 margin between the top two logits exceeds
    what bf16 rounding can move). A bfloat16 KV cache rounds keys and values once more, as
    transformers' own bfloat16 cache does."""
    path = str(neox_checkpoint)
    params = SamplingParams(max_tokens=8, temperature=0.0, prompt_logprobs=0, ignore_eos=True)
    f32 = LLM(path, dtype="float32")
    bf16 = LLM(path, dtype="bfloat16", kv_cache_dtype=kv_cache_dtype)
    worker = bf16.engine.executor.workers[0]
    assert worker.model.gpt_neox.embed_in.weight.dtype == torch.bfloat16
    assert worker.kv.tensor.dtype == getattr(torch, kv_cache_dtype)
    prompt = prompts(f32)[-1]
    a, b = f32.generate([prompt], params)[0], bf16.generate([prompt], params)[0]
    diffs = [abs(x[t] - y[t]) for x, y, t in zip(a.prompt_logprobs[1:], b.prompt_logprobs[1:], prompt[1:])]
    assert sum(diffs) / len(diffs) < 0.1 and max(diffs) < 0.5
    assert a.outputs[0].token_ids[:3] == b.outputs[0].token_ids[:3]


def test_linear_rope_scaling_matches_transformers(tmp_path, tokenizer):
    # Long-context GPT-NeoX fine-tunes interpolate positions (rope_type "linear", factor 2):
    # every rotary angle is halved, so outputs differ from the unscaled model's, and the context
    # window doubles (max_position_embeddings x factor, as vLLM derives it).
    from checkpoints import make_neox

    rope = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0, "partial_rotary_factor": 0.5}
    scaled = str(make_neox(tmp_path / "scaled", tokenizer, seed=4, rotary_pct=0.5, rope_parameters=rope,
                           max_position_embeddings=96))
    llm = LLM(scaled, dtype="float32")
    assert llm.engine.model_config.rotary_position_scale == 2.0 and llm.engine.max_model_len == 192
    ref = reference_model(scaled)
    past_trained_positions = [5 + (7 * i) % 400 for i in range(100)]
    for prompt in prompts(llm)[1:] + [past_trained_positions]:
        out = llm.generate([prompt], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0, prompt_logprobs=0,
                                                    ignore_eos=True))[0]
        assert out.outputs[0].token_ids == reference_greedy(ref, prompt, NEW_TOKENS)
        got = [entry[token] for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
        expected = reference_prompt_logprobs(ref, prompt)
        assert len(got) == len(expected) == len(prompt) - 1
        assert max(abs(a - b) for a, b in zip(got, expected)) < 1e-4
