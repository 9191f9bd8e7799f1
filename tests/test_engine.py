"""Continuous batching, KV admission and preemption, aborts, and bad input."""

from __future__ import annotations

import pytest
import torch

from neo_serve import LLM, SamplingParams
from neo_serve.engine.kv_cache import Extent, ExtentAllocator
from neo_serve.errors import ConfigError, InvalidRequestError

GREEDY = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def llm(neox_checkpoint):
    return LLM(str(neox_checkpoint), dtype="float32", max_model_len=128, kv_cache_tokens=1024)


def solo(llm, prompt, params=GREEDY):
    return llm.generate([prompt], params)[0].outputs[0].token_ids


def test_requests_join_and_leave_the_running_batch(llm):
    engine = llm.engine
    prompts = [list(range(5, 5 + n)) for n in (4, 30, 11, 57)]
    expected = [solo(llm, p) for p in prompts]
    short = SamplingParams(max_tokens=5, temperature=0.0, ignore_eos=True)
    expected_short = solo(llm, prompts[1], short)
    engine.add_request(prompts[0], GREEDY, request_id="a")
    engine.add_request(prompts[1], short, request_id="short")
    finished, batch_sizes = {}, []
    for step in range(200):
        if step == 3:
            engine.add_request(prompts[2], GREEDY, request_id="c")  # joins mid-flight
        if step == 7:
            engine.add_request(prompts[3], GREEDY, request_id="d")
        outputs = engine.step()
        batch_sizes.append(engine.num_running())
        for out in outputs:
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
        if len(finished) == 4:
            break
    assert finished == {"a": expected[0], "short": expected_short, "c": expected[2], "d": expected[3]}
    assert max(batch_sizes) >= 3  # they really ran together
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_abort_frees_the_kv_at_once(llm):
    engine = llm.engine
    engine.add_request(list(range(1, 40)), SamplingParams(max_tokens=60, ignore_eos=True), request_id="gone")
    engine.add_request(list(range(1, 10)), GREEDY, request_id="stays")
    for _ in range(3):
        engine.step()
    assert engine.allocator.num_free_blocks < engine.allocator.num_blocks
    free_before = engine.allocator.num_free_blocks
    [gone] = engine.requests["gone"].sequences
    held = gone.extent.length
    assert held > 0
    assert engine.abort_request("gone")
    # Freed at once, not at some later step: its blocks are back before anything else runs.
    assert engine.allocator.num_free_blocks == free_before + held
    assert all(seq.request.request_id != "gone" for seq in engine.scheduler.running)
    prepared = engine.schedule_step()  # the next micro-batch has only the other request
    assert prepared is not None and {c.seq.request.request_id for c in prepared.batch.chunks} == {"stays"}
    engine.apply_step(prepared, engine.sample_step(prepared, engine.executor.execute(prepared.step_input)))
    while engine.has_unfinished_requests():
        engine.step()
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    assert not engine.abort_request("gone")


def test_an_interrupted_generate_leaves_nothing_behind(llm, monkeypatch):
    """Ctrl-C in a notebook mid-generate: the next call neither runs those requests nor lacks their KV."""
    engine = llm.engine
    expected = solo(llm, [7, 8, 9])
    execute, steps = engine.executor.execute, []

    def interrupted_at_the_third_step(step):
        steps.append(step)
        if len(steps) == 3:
            raise KeyboardInterrupt
        return execute(step)

    monkeypatch.setattr(engine.executor, "execute", interrupted_at_the_third_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate([[1, 2, 3], [4, 5, 6]], SamplingParams(max_tokens=40, ignore_eos=True))
    assert not engine.has_unfinished_requests() and not engine.scheduler.running
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    monkeypatch.setattr(engine.executor, "execute", execute)
    assert solo(llm, [7, 8, 9]) == expected and not engine.has_unfinished_requests()


def test_a_sequence_aborted_while_its_step_runs_generates_nothing(llm):
    """The pipeline's generation_tokens metric counts what a step applied: a request cancelled
    while its micro-batch ran gets no token from it, so none is counted."""
    engine = llm.engine
    engine.add_request([1, 2, 3], GREEDY, request_id="stays")
    engine.add_request([4, 5, 6], GREEDY, request_id="goes")
    engine.step()
    before = engine.num_generated_tokens
    prepared = engine.schedule_step()
    sampled = engine.sample_step(prepared, engine.executor.execute(prepared.step_input))
    assert engine.abort_request("goes")
    [output] = engine.apply_step(prepared, sampled)
    assert output.request_id == "stays" and engine.num_generated_tokens == before + 1
    while engine.has_unfinished_requests():
        engine.step()


def test_a_prefill_is_split_over_the_micro_batches_in_flight_and_gives_the_offline_tokens(llm, neox_checkpoint):
    """Two micro-batches in flight, as a 2-stage pipeline keeps them: a new prompt's second half is
    sent while its first half is still on its way (each stage runs them in order), beside the
    other micro-batch's decodes, so that both micro-batches carry half of it."""
    prompts = {"a": [3, 4, 5], "b": [6, 7, 8], "p": list(range(10, 50))}
    expected = {name: solo(llm, prompt) for name, prompt in prompts.items()}
    engine = LLM(str(neox_checkpoint), dtype="float32", max_model_len=128, kv_cache_tokens=1024).engine
    for name in "ab":
        engine.add_request(prompts[name], GREEDY, request_id=name)
    tokens: dict[str, list[int]] = {name: [] for name in prompts}

    def run(prepared):
        for output in engine.process_step(prepared, engine.executor.execute(prepared.step_input)):
            tokens[output.request_id] = list(output.outputs[0].token_ids)

    run(engine.schedule_step())  # a and b prefilled: both decode from now on
    engine.add_request(prompts["p"], GREEDY, request_id="p")

    def chunks(prepared):
        return {(c.seq.request.request_id, c.start, c.end) for c in prepared.batch.chunks}

    def in_flight(*prepared_steps):
        return {c.seq: c.end for prepared in prepared_steps for c in prepared.batch.chunks}

    first = engine.schedule_step({}, max_seqs=2, prefill_split=2)
    assert chunks(first) == {("a", 3, 4), ("b", 3, 4)}
    second = engine.schedule_step(in_flight(first), max_seqs=2, prefill_split=2)
    assert chunks(second) == {("p", 0, 20)}  # a and b wait for their tokens
    run(first)
    # p's second half goes while its first is in flight, and does not count against max_seqs: it
    # counts in the micro-batch that holds its first half.
    third = engine.schedule_step(in_flight(second), max_seqs=2, prefill_split=2)
    assert chunks(third) == {("a", 4, 5), ("b", 4, 5), ("p", 20, 40)} and not third.batch.kv_copies
    assert engine.schedule_step(in_flight(second, third), max_seqs=2, prefill_split=2) is None
    run(second)
    run(third)
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens[output.request_id] = list(output.outputs[0].token_ids)
    assert tokens == expected
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks


def test_kv_admission_makes_requests_wait(neox_checkpoint):
    llm = LLM(str(neox_checkpoint), dtype="float32", max_model_len=64, kv_cache_tokens=64)
    prompts = [list(range(1, 41)), list(range(2, 42)), list(range(3, 43))]
    params = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    engine = llm.engine
    for p in prompts:
        engine.add_request(p, params)
    engine.step()
    assert engine.num_running() == 1 and engine.num_waiting() == 2  # 64 slots hold one 60-token sequence
    outs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                outs[out.request_id] = out.outputs[0].token_ids
    assert list(outs.values()) == [solo(llm, p, params) for p in prompts]


@pytest.mark.parametrize("prompt,params,field", [
    ("", GREEDY, "prompt"),
    ([], GREEDY, "prompt"),
    ([1, 2, 10**6], GREEDY, "prompt"),
    ([1, -3], GREEDY, "prompt"),
    (list(range(1, 120)), SamplingParams(max_tokens=20), "max_tokens"),
    (list(range(1, 200)), SamplingParams(max_tokens=1), "prompt"),
])
def test_bad_requests_raise_and_others_keep_running(llm, prompt, params, field):
    engine = llm.engine
    engine.add_request([7, 8, 9], GREEDY, request_id="innocent")
    engine.step()
    with pytest.raises(InvalidRequestError) as info:
        engine.add_request(prompt, params)
    assert info.value.field == field
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert outputs["innocent"].outputs[0].token_ids == solo(llm, [7, 8, 9])


@pytest.mark.parametrize("bad,field", [
    ({"top_k": 2**63}, "top_k"),  # past int64: the sampler's shared top_k tensor overflowed
    ({"temperature": 10**400}, "temperature"),  # past float: the shared temperature tensor
    ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"seed": 2**64}, "seed"),  # past a signed 64-bit integer
    ({"max_tokens": -10**5000}, "max_tokens"),  # named, not a ValueError from printing it
])
def test_sampling_values_a_batch_cannot_hold_are_refused_for_that_request(llm, bad, field):
    """Checked where the request is made: in a step every row's values share tensors, so one
    overflow there failed every request of the micro-batch (through the offline LLM or the
    pipeline deployment's handle, which the HTTP schema's bounds do not cover)."""
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**{"max_tokens": 4, **bad})
    assert info.value.field == field and len(str(info.value)) < 200


def test_kv_cache_smaller_than_context_is_a_config_error(neox_checkpoint):
    with pytest.raises(ConfigError, match="kv_cache_tokens"):
        LLM(str(neox_checkpoint), kv_cache_tokens=100, max_model_len=512)


def test_extent_allocator_extends_moves_and_coalesces():
    alloc = ExtentAllocator(num_blocks=10, block_size=16)
    a, b = alloc.allocate(3), alloc.allocate(3)
    assert (a.start, b.start) == (0, 3)
    assert not alloc.try_extend(a, 1)  # b sits right after a
    assert alloc.try_extend(b, 4) and b.length == 7 and alloc.num_free_blocks == 0
    assert alloc.allocate(1) is None
    alloc.free(a)
    alloc.free(b)
    assert alloc.num_free_blocks == 10 and alloc.allocate(10) == Extent(0, 10)


def running_sequence(scheduler, name: str, extent: Extent, computed: int):
    """A decoding sequence holding `extent`, with `computed` tokens in its cache and one new token."""
    from neo_serve.engine.sequence import Request, Sequence, SequenceStatus

    request = Request(name, None, [1] * computed, SamplingParams(), max_tokens=320 - computed)
    seq = Sequence(request, 0, None, None, output_ids=[2], status=SequenceStatus.RUNNING,
                   num_computed=computed, extent=extent)
    request.sequences.append(seq)
    scheduler.running.append(seq)
    return seq


def test_an_outgrown_extent_moves_to_a_free_run_that_holds_it_before_preempting_anyone():
    from neo_serve.engine.scheduler import Scheduler, SchedulerConfig

    alloc = ExtentAllocator(num_blocks=20, block_size=16)
    scheduler = Scheduler(SchedulerConfig(), alloc)
    # Blocks: a 0-7 (full: 128 tokens and a new one), b 8, free 9-17, c 18-19. a needs a 9th
    # block; its wish (growth of a quarter: 10 blocks) fits nowhere, but the 9 it needs fit 9-17.
    a = running_sequence(scheduler, "a", alloc.allocate(8), 128)
    b = running_sequence(scheduler, "b", alloc.allocate(1), 10)
    gap = alloc.allocate(9)
    c = running_sequence(scheduler, "c", alloc.allocate(2), 20)
    alloc.free(gap)
    batch = scheduler.schedule()
    assert batch.preempted == [] and scheduler.num_preemptions == 0
    assert a.extent == Extent(9, 9) and [(k.src, k.dst, k.num_slots) for k in batch.kv_copies] == [(0, 9 * 16, 128)]
    assert {chunk.seq for chunk in batch.chunks} == {a, b, c}


def test_only_later_arrivals_whose_blocks_make_room_are_preempted():
    from neo_serve.engine.scheduler import Scheduler, SchedulerConfig

    def arena(arrivals: str):
        # Blocks: p 0-4, b 5-6, free 7-9, a 10-14 (full: 80 tokens and a new one), d 15-19,
        # c 20-21, free 22-23. a needs a 6th block.
        alloc = ExtentAllocator(num_blocks=24, block_size=16)
        scheduler = Scheduler(SchedulerConfig(), alloc)
        extents = {name: alloc.allocate(length) for name, length in
                   (("p", 5), ("b", 2), ("gap", 3), ("a", 5), ("d", 5), ("c", 2))}
        alloc.free(extents.pop("gap"))
        computed = {"p": 70, "d": 70, "a": 80, "b": 20, "c": 20}
        return scheduler, {name: running_sequence(scheduler, name, extents[name], computed[name])
                           for name in arrivals}

    # Arrivals p, d, a, b, c: b's and c's blocks, freed, make no run a can use (none after a, none
    # of 6 blocks), so evicting them would cost their work for nothing: a gives way itself.
    scheduler, seqs = arena("pdabc")
    batch = scheduler.schedule()
    assert batch.preempted == [seqs["a"]] and scheduler.num_preemptions == 1
    assert {chunk.seq for chunk in batch.chunks} == {seqs[n] for n in "pdbc"}
    # Arrivals p, a, d, b, c: d (after a) makes room once c's blocks join it; b and c, latest,
    # would not. Only d is preempted, and a grows in place.
    scheduler, seqs = arena("padbc")
    batch = scheduler.schedule()
    assert batch.preempted == [seqs["d"]] and scheduler.num_preemptions == 1
    assert seqs["a"].extent.start == 10 and seqs["a"].extent.length > 5 and not batch.kv_copies
    assert {chunk.seq for chunk in batch.chunks} == {seqs[n] for n in "pabc"}


@pytest.mark.parametrize("token_major", [True, False])
def test_kv_moves_apply_in_order_and_may_overlap(token_major):
    from neo_serve.engine.kv_cache import KVArena, KVCopy

    arena = KVArena(num_layers=2, num_slots=12, num_heads=2, head_dim=3, dtype=torch.float32,
                    device="cpu", token_major=token_major)
    slots = torch.arange(12, dtype=torch.float32)  # slot i holds the value i everywhere
    shape = [1, 1, 12, 1, 1] if token_major else [1, 1, 1, 12, 1]
    arena.tensor.copy_(slots.view(shape).expand_as(arena.tensor))
    # 0-3 -> 8-11, then 4-7 into the freed 0-3, then a sliding (overlapping) move 1-4 -> 2-5.
    arena.apply_copies((KVCopy(0, 8, 4), KVCopy(4, 0, 4), KVCopy(1, 2, 4)))
    expected = [4, 5, 5, 6, 7, 4, 6, 7, 0, 1, 2, 3]
    per_slot = arena.tensor.narrow(arena.slot_dim, 0, 12).movedim(arena.slot_dim, 0).reshape(12, -1)
    assert (per_slot == torch.tensor(expected, dtype=torch.float32).unsqueeze(1)).all()


def test_recompute_all_after_a_lost_cache_gives_the_same_tokens(llm):
    """What a pipeline does when a stage restarts: its KV is gone, sequences are recomputed."""
    engine = llm.engine
    prompts = [list(range(3, 20)), list(range(40, 47))]
    expected = [solo(llm, p) for p in prompts]
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, GREEDY, request_id=f"r{index}")
    for _ in range(6):
        engine.step()
    worker = engine.executor.workers[0]
    worker.kv.tensor.normal_()  # the cache is garbage now, as after a stage restart
    preemptions = engine.scheduler.num_preemptions
    assert engine.recompute_all() == 2
    assert engine.scheduler.num_preemptions == preemptions  # not for want of KV: not a preemption
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    finished = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].token_ids
    assert [finished["r0"], finished["r1"]] == expected


def test_a_prompt_recomputed_halfway_is_scored_once(neox_checkpoint):
    """Preemption or a stage restart recomputes a prompt from its first token, also one whose
    prefill was cut into chunks and stopped halfway; its prompt logprobs (lm-evaluation-harness's
    scores) must still be one entry per prompt token."""
    llm = LLM(str(neox_checkpoint), dtype="float32", max_model_len=128, kv_cache_tokens=1024,
              max_num_batched_tokens=16)
    prompt = list(range(3, 60))
    params = SamplingParams(max_tokens=3, temperature=0.0, prompt_logprobs=1, ignore_eos=True)
    expected = llm.generate([prompt], params)[0]
    engine = llm.engine
    request = engine.add_request(prompt, params, request_id="scored")
    engine.step()
    engine.step()  # two 16-token chunks of the 57-token prompt are scored
    assert len(request.prompt_logprobs) == 33
    assert engine.recompute_all() == 1
    while not request.finished:
        engine.step()
    got = request.to_output()
    assert len(got.prompt_logprobs) == len(prompt) and got.prompt_logprobs[0] is None
    for entry, reference, token in zip(got.prompt_logprobs[1:], expected.prompt_logprobs[1:], prompt[1:]):
        assert entry[token] == pytest.approx(reference[token], abs=1e-5)
    assert got.outputs[0].token_ids == expected.outputs[0].token_ids


def test_a_step_pickles_as_plain_lists_and_round_trips(llm):
    """A 2-stage replica pickles each micro-batch once per stage call on its event loop: the
    step must arrive whole, without torch's tensor serializer on that path."""
    import pickle

    from neo_serve.engine.kv_cache import KVCopy

    engine = llm.engine
    engine.add_request(list(range(3, 20)), GREEDY, request_id="p0")
    engine.add_request(list(range(40, 47)), GREEDY, request_id="p1")
    prepared = engine.schedule_step()
    try:
        step = prepared.step_input
        assert step.argmax_only  # plain greedy rows
        step = type(step)(step.input_ids, step.positions + 5, step.sequences, step.logits_indices,
                          (KVCopy(src=32, dst=64, num_slots=16),), argmax_only=False)  # as given, not derived
        data = pickle.dumps(step)
        assert b"_rebuild_tensor" not in data and b"SequenceSlice" not in data
        back = pickle.loads(data)
        assert back.sequences == step.sequences and back.kv_copies == step.kv_copies
        assert back.argmax_only is False
        for name in ("input_ids", "positions", "logits_indices"):
            assert getattr(back, name).dtype == getattr(step, name).dtype
            assert getattr(back, name).tolist() == getattr(step, name).tolist()
    finally:
        for request_id in ("p0", "p1"):
            engine.abort_request(request_id)


@pytest.mark.parametrize("other", [
    SamplingParams(max_tokens=4, temperature=0.8, seed=1),
    SamplingParams(max_tokens=4, temperature=0.0, logprobs=2),
    SamplingParams(max_tokens=4, temperature=0.0, repetition_penalty=1.3),
    SamplingParams(max_tokens=0, temperature=0.0, prompt_logprobs=1),
], ids=["sampled", "logprobs", "penalty", "prompt-logprobs"])
def test_a_plain_greedy_step_carries_no_sampling_plan(llm, other):
    """Under Ray every stage call pickles its step on the replica's event loop: when every row
    is a plain greedy pick the step carries no sampling plan, and the last stage's argmax gives
    the tokens the sampler would take."""
    import dataclasses

    from neo_serve.engine.sampler import SamplingRow
    from neo_serve.engine.step_result import SamplingPlan

    engine = llm.engine
    engine.add_request(list(range(3, 20)), GREEDY, request_id="g0")
    engine.add_request(list(range(40, 47)), GREEDY, request_id="g1")
    try:
        prepared = engine.schedule_step()
        assert prepared.step_input.argmax_only and prepared.step_input.sampling is None
        picked = engine.executor.execute(prepared.step_input)
        plan = SamplingPlan([0, 1], [SamplingRow(GREEDY, [], [])] * 2, [])
        sampled = engine.executor.execute(dataclasses.replace(prepared.step_input, argmax_only=False, sampling=plan))
        token_ids = [s.token_id for s in picked.samples]
        assert len(token_ids) == 2 and token_ids == [s.token_id for s in sampled.samples]
        outputs = engine.process_step(prepared, picked)
        assert sorted(o.outputs[0].token_ids for o in outputs) == sorted([t] for t in token_ids)
    finally:
        for request_id in ("g0", "g1"):
            engine.abort_request(request_id)
    # One row that needs more than the most likely token gives the whole step a plan.
    engine.add_request(list(range(3, 20)), GREEDY, request_id="g2")
    engine.add_request(list(range(50, 60)), other, request_id="o")
    try:
        step = engine.schedule_step().step_input
        assert not step.argmax_only and step.sampling is not None
    finally:
        for request_id in ("g2", "o"):
            engine.abort_request(request_id)


def test_the_last_stage_returns_tokens_and_logprobs_not_logits(llm):
    """The last stage samples and scores where its logits are: what comes back of a step with
    sampled rows, logprobs and a scored prompt is a few numbers per row (under Ray through the
    object store, on a GPU across to the host), not [rows, vocab] logits."""
    import pickle

    engine = llm.engine
    engine.add_request(list(range(3, 40)), SamplingParams(max_tokens=0, prompt_logprobs=2), request_id="scored")
    engine.add_request(list(range(40, 47)), SamplingParams(max_tokens=3, temperature=0.8, top_p=0.9, logprobs=2,
                                                           repetition_penalty=1.2), request_id="sampled")
    try:
        prepared = engine.schedule_step()
        plan = prepared.step_input.sampling
        assert [len(s.targets) for s in plan.prompt_scoring] == [36] and len(plan.rows) == 1
        result = engine.executor.execute(prepared.step_input)
        rows = prepared.step_input.logits_indices.shape[0]
        assert rows == 37
        logits_bytes = rows * engine.model_config.vocab_size * 4
        assert len(pickle.dumps(result)) < logits_bytes / 10
        assert len(result.prompt_logprobs[0]) == 36 and len(result.samples) == 1
        [sample] = result.samples
        assert sample.top_logprobs[sample.token_id] == sample.logprob <= 0.0
    finally:
        for request_id in ("scored", "sampled"):
            engine.abort_request(request_id)


def test_stages_that_resolved_different_dtypes_still_run_together(neox_checkpoint):
    # `dtype: auto` resolves on each stage's node: a bfloat16 checkpoint runs bfloat16 where the
    # CPU has bfloat16 kernels and float32 elsewhere, so a pipeline over mixed nodes passes
    # bfloat16 hidden states into float32 layers (a dtype error in the first matmul).
    import dataclasses

    from neo_serve.engine.worker import StageWorker

    llm = LLM(str(neox_checkpoint), dtype="float32", num_stages=2, max_model_len=128, kv_cache_tokens=1024)
    first, second = llm.engine.executor.workers
    llm.engine.executor.workers[0] = StageWorker(dataclasses.replace(first.spec, dtype="bfloat16"))
    assert (llm.engine.executor.workers[0].dtype, second.dtype) == (torch.bfloat16, torch.float32)
    [output] = llm.generate([list(range(5, 30))], GREEDY)
    assert len(output.outputs[0].token_ids) == GREEDY.max_tokens


def test_a_prompt_that_fills_the_window_is_refused_unless_only_scored(llm):
    full = [7] * llm.engine.max_model_len
    with pytest.raises(InvalidRequestError) as excinfo:
        llm.engine.add_request(full, SamplingParams(max_tokens=1))
    assert excinfo.value.field == "prompt" and str(excinfo.value) == (
        "prompt has 128 tokens, the whole context window of 128: no room for a generated token (with max_tokens 0 "
        "it is only scored)")
    [scored] = llm.generate([full], SamplingParams(max_tokens=0, prompt_logprobs=0))
    assert scored.outputs[0].token_ids == [] and len(scored.prompt_logprobs) == 128
    with pytest.raises(InvalidRequestError, match="prompt has 129 tokens; the context window is 128"):
        llm.engine.add_request(full + [7], SamplingParams(max_tokens=0))


def test_a_text_prompt_too_long_for_any_tokenization_is_refused_before_encoding(llm, monkeypatch):
    engine = llm.engine
    assert engine.max_prompt_chars == 4 * engine.max_model_len * engine.tokenizer.max_token_chars
    encoded: list[int] = []
    monkeypatch.setattr(engine.tokenizer, "encode", lambda text: encoded.append(len(text)) or [1])
    with pytest.raises(InvalidRequestError, match="characters, more than a context window of 128 tokens") as excinfo:
        engine.add_request("x" * (engine.max_prompt_chars + 1), GREEDY)
    assert excinfo.value.field == "prompt" and encoded == []


def test_a_text_prompt_with_a_token_the_model_lacks_is_refused_for_that_request_alone(neo_checkpoint, tmp_path):
    # A fine-tune that added <|pad|> to its tokenizer without resizing the embedding: a text prompt
    # holding it encodes past the model's vocabulary, which would fail every sequence of the step.
    import json
    import shutil

    tuned = tmp_path / "tuned"
    shutil.copytree(neo_checkpoint, tuned)
    vocab_size = json.loads((tuned / "config.json").read_text())["vocab_size"]
    assert len(json.loads((tuned / "vocab.json").read_text())) == vocab_size
    (tuned / "added_tokens.json").write_text(json.dumps({"<|pad|>": vocab_size}))
    engine = LLM(str(tuned), dtype="float32", max_model_len=128, kv_cache_tokens=1024).engine
    engine.add_request("hello there", GREEDY, request_id="innocent")
    engine.step()
    with pytest.raises(InvalidRequestError, match=rf"'<\|pad\|>' \(token {vocab_size}\).* vocabulary of {vocab_size}") as info:
        engine.add_request("hi<|pad|>", GREEDY)
    assert info.value.field == "prompt"
    outputs = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            outputs[out.request_id] = out
    assert len(outputs["innocent"].outputs[0].token_ids) == GREEDY.max_tokens


def test_a_half_precision_head_samples_and_scores_in_float32(neox_checkpoint):
    """The head computes in the model's dtype; the last stage widens its logits before it samples
    and scores them, so tokens and logprobs are those of the float32 widening."""
    from neo_serve.engine.step_result import step_result

    engine = LLM(str(neox_checkpoint), dtype="bfloat16", max_model_len=64, kv_cache_tokens=256).engine
    engine.add_request(list(range(3, 20)), SamplingParams(max_tokens=0, prompt_logprobs=1), request_id="scored")
    engine.add_request(list(range(30, 41)), SamplingParams(max_tokens=2, temperature=0.0, logprobs=3),
                       request_id="greedy")
    prepared = engine.schedule_step()
    assert not prepared.step_input.argmax_only
    [worker] = engine.executor.workers
    head, heads = worker.model.compute_logits, []
    worker.model.compute_logits = lambda hidden: heads.append(head(hidden)) or heads[-1]
    try:
        result = engine.executor.execute(prepared.step_input)
    finally:
        del worker.model.compute_logits
    [logits] = heads
    assert logits.dtype == torch.bfloat16 and logits.shape[1] == engine.model_config.vocab_size
    assert result == step_result(logits.float(), prepared.step_input.sampling)
    # Scored without widening, the prompt's logprobs would be bfloat16 numbers.
    targets = torch.arange(4, 20).unsqueeze(1)
    in_bfloat16 = torch.log_softmax(logits[:16], dim=-1).gather(1, targets).squeeze(1).tolist()
    scored = [entry[token] for entry, token in zip(result.prompt_logprobs[0], range(4, 20))]
    assert scored != in_bfloat16
    assert isinstance(result.samples[0].logprob, float) and result.samples[0].logprob <= 0.0


def test_offline_stages_are_spread_over_the_gpus_the_machine_has(monkeypatch):
    """An offline `LLM(num_stages=N)` on a machine with several GPUs puts its stages on all of
    them (neighbours together when there are more stages than GPUs), not every stage on cuda:0."""
    from neo_serve.engine import executor
    from neo_serve.engine.executor import spread_over_gpus
    from neo_serve.engine.worker import StageWorkerSpec
    from neo_serve.models.stages import StageSpec

    def specs(count, device="cuda"):
        return [StageWorkerSpec(checkpoint="x", stage=StageSpec(k, count, k, k + 1), dtype="float16", device=device,
                                num_kv_slots=256, block_size=16, attention_backend="auto")
                for k in range(count)]

    def devices(stages, gpus, device="cuda"):
        return [spec.device for spec in spread_over_gpus(specs(stages, device), gpus)]

    assert devices(2, 2) == ["cuda:0", "cuda:1"]
    assert devices(4, 2) == ["cuda:0", "cuda:0", "cuda:1", "cuda:1"]
    assert devices(2, 8) == ["cuda:0", "cuda:1"]
    assert devices(3, 1) == ["cuda", "cuda", "cuda"]  # one GPU: all of them on it
    assert devices(2, 2, "cuda:1") == ["cuda:1", "cuda:1"]  # the device the user named
    assert devices(2, 2, "cpu") == ["cpu", "cpu"]
    # The offline executor does it with the GPUs torch sees (the workers' loads stubbed: no GPU here).
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(executor, "StageWorker", lambda spec: spec.device)
    assert executor.LocalPipelineExecutor(specs(2)).workers == ["cuda:0", "cuda:1"]
