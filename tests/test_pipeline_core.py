"""The replica's continuous-batching loop (`PipelineCore`) with its in-process step runner, no Ray:
where the step's tensor work runs, and how streams pace their chunks under load."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import threading
import time
from collections.abc import AsyncIterator

import pytest
import torch

from neo_serve import LLM, SamplingParams
from neo_serve.engine.config import EngineConfig
from neo_serve.engine.llm_engine import LLMEngine
from neo_serve.errors import InvalidRequestError
from neo_serve.serve.engine_loop import PipelineCore
from neo_serve.serve.stages import LocalStepRunner, UnloadedExecutor
from test_scheduler_stress import step_output

GREEDY = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
PROMPTS = ["def hello_world():", "import os\nimport sys\n", "class Stack:", "for i in range(10):"]


async def start_core(checkpoint, engine_options=None, **core_options) -> PipelineCore:
    options = {"kv_cache_tokens": 4096, **(engine_options or {})}
    engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", **options), executor=UnloadedExecutor())
    runner = await LocalStepRunner.load(engine.stage_specs)
    engine.executor = runner
    core = PipelineCore(engine, runner, **core_options)
    core.start()
    return core


@contextlib.asynccontextmanager
async def started_core(checkpoint, engine_options=None, **core_options) -> AsyncIterator[PipelineCore]:
    """A running core on the in-process runner, closed with its runner on the way out."""
    core = await start_core(checkpoint, engine_options, **core_options)
    try:
        yield core
    finally:
        core.close()
        core.runner.close()


async def collect(core: PipelineCore, prompt: str, params: SamplingParams, request_id: str) -> list:
    return [chunk async for chunk in core.generate(prompt, params, request_id)]


def token_ids(chunks) -> list[int]:
    return [t for chunk in chunks[1:] for t in chunk.sequences[0].token_ids]


@pytest.fixture(scope="module")
def offline_tokens(neox_checkpoint) -> list[list[int]]:
    outputs = LLM(str(neox_checkpoint), device="cpu", kv_cache_tokens=4096).generate(PROMPTS, GREEDY)
    return [o.outputs[0].token_ids for o in outputs]


def run_prompts(checkpoint, instrument=None, **core_options) -> list[list]:
    """Stream PROMPTS at once through a fresh PipelineCore; each prompt's chunks.
    `instrument(core)` runs before the requests are sent."""
    async def main():
        async with started_core(checkpoint, **core_options) as core:
            if instrument is not None:
                instrument(core)
            return await asyncio.gather(*(collect(core, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
    return asyncio.run(main())


def test_sampling_runs_on_the_step_thread_and_gives_the_offline_tokens(neox_checkpoint, offline_tokens):
    # All of a replica's parallel torch work must start from one thread: a second OpenMP team
    # (the event loop sampling) made the steps ~1.3x slower on 2 cores.
    sampled_on: set[threading.Thread] = set()

    def record_sampling_threads(core: PipelineCore) -> None:
        sample_step = core.engine.sample_step

        def recording_sample_step(prepared, logits):
            sampled_on.add(threading.current_thread())
            return sample_step(prepared, logits)

        core.engine.sample_step = recording_sample_step

    results = run_prompts(neox_checkpoint, record_sampling_threads)
    assert [token_ids(chunks) for chunks in results] == offline_tokens
    assert sampled_on and threading.main_thread() not in sampled_on  # asyncio.run's loop: this thread
    assert all(thread.name.startswith("neo-serve-step") for thread in sampled_on)


@pytest.mark.parametrize("budget", [None, 1000.0])
def test_streams_send_a_chunk_per_step_when_the_budget_allows(neox_checkpoint, offline_tokens, budget):
    results = run_prompts(neox_checkpoint, stream_interval_s=0.0, max_stream_chunks_per_s=budget)
    assert [token_ids(chunks) for chunks in results] == offline_tokens
    for chunks in results:
        # Chunks after the acceptance chunk. Not exactly one per token: a step may finish before
        # the stream's consumer runs, and then its chunk carries both steps' tokens.
        assert len(chunks) - 1 >= GREEDY.max_tokens // 3


def test_many_streams_share_the_chunk_budget(neox_checkpoint, offline_tokens):
    # 4 streams, 4 chunks/s over all of them: each stream sends at most one chunk a second after
    # its first token, so the tiny model's 24 tokens arrive in at most 3 chunks, all of them.
    results = run_prompts(neox_checkpoint, stream_interval_s=0.0, max_stream_chunks_per_s=4.0)
    assert [token_ids(chunks) for chunks in results] == offline_tokens
    for chunks in results:
        assert len(chunks) - 1 <= 3


def test_a_finished_request_is_not_held_back_by_the_chunk_budget(neox_checkpoint, offline_tokens):
    # 4 streams at 0.5 chunks/s over all of them: 8 s between two chunks of a stream. The tiny
    # model finishes its 24 tokens within a second, and each stream's last chunk must go out then,
    # not at the end of its pause: its client's next request waits for it (at 64 streams the
    # pause is a second, several percent of a short request's life).
    seen: dict = {}

    def start_clock(core: PipelineCore) -> None:
        seen.update(core=core, started=time.monotonic())

    results = run_prompts(neox_checkpoint, start_clock, stream_interval_s=0.0, max_stream_chunks_per_s=0.5)
    elapsed = time.monotonic() - seen["started"]  # past every stream's end
    assert [token_ids(chunks) for chunks in results] == offline_tokens
    for chunks in results:
        assert len(chunks) - 1 <= 2  # the first token, then the rest at the finish
    assert elapsed < 6.0, f"the last chunks waited for the streams' 8 s pause ({elapsed:.1f} s)"
    stats = seen["core"].stats()
    assert stats["streams"] == 0 and stats["requests"] == 0


def test_a_sequence_that_evicts_itself_is_readmitted(neox_checkpoint):
    # A 128-token cache (8 blocks of 16). B takes block 0 and finishes after 8 tokens; A, admitted
    # meanwhile, takes the blocks after it and grows in place up to the arena's end. A's last block then fits neither in place
    # nor anywhere else, so A evicts itself, leaving the cache empty. Nothing is in flight and no
    # request arrives: the loop must still admit A again, not wait for a wake-up that never comes.
    params_a = SamplingParams(max_tokens=118, temperature=0.0, ignore_eos=True)
    params_b = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompt_a = list(range(5, 15))
    expected = LLM(str(neox_checkpoint), device="cpu", kv_cache_tokens=4096).generate([prompt_a], params_a)

    async def main():
        async with started_core(neox_checkpoint, {"kv_cache_tokens": 128, "max_model_len": 128}) as core:
            short = asyncio.ensure_future(collect(core, [3, 4, 5, 6], params_b, "b"))
            await asyncio.sleep(0)
            chunks = await asyncio.wait_for(collect(core, prompt_a, params_a, "a"), timeout=120)
            await short
            return chunks, core.engine.scheduler.num_preemptions

    chunks, preemptions = asyncio.run(main())
    assert preemptions >= 1  # the eviction happened
    assert token_ids(chunks) == expected[0].outputs[0].token_ids


def test_a_request_that_ends_while_its_consumer_is_away_is_not_paused(neox_checkpoint, offline_tokens):
    # Serve pulls a stream's next chunk when its previous one went out; if the request finishes
    # meanwhile (no pause in progress to cut short), the stream must not then start an 8 s pause
    # (4 streams at 0.5 chunks/s) with its last chunk already queued.
    async def slow_consumer(core, prompt, request_id):
        chunks, stream = [], core.generate(prompt, GREEDY, request_id)
        async for chunk in stream:
            chunks.append(chunk)
            if len(chunks) == 2:  # the first token: away while the tiny model finishes
                await asyncio.sleep(2.0)
        return chunks

    async def main():
        async with started_core(neox_checkpoint, stream_interval_s=0.0, max_stream_chunks_per_s=0.5) as core:
            started = time.monotonic()
            results = await asyncio.gather(*(slow_consumer(core, p, f"r{i}") for i, p in enumerate(PROMPTS)))
            return results, time.monotonic() - started

    results, elapsed = asyncio.run(main())
    assert [token_ids(chunks) for chunks in results] == offline_tokens
    assert elapsed < 6.0, f"a stream paused with its last chunk queued ({elapsed:.1f} s)"


def test_a_paused_stream_holds_only_its_latest_output(neox_checkpoint, offline_tokens):
    """The chunk budget pauses a stream for seconds under load (streams / budget); meanwhile it
    must not keep a copy of its output (tokens, logprobs, text) for every step."""
    import gc

    from neo_serve.engine.outputs import RequestOutput

    LONG = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True)

    def held(request_id: str) -> int:
        return sum(1 for o in gc.get_objects() if type(o) is RequestOutput and o.request_id == request_id)

    async def main():
        async with started_core(neox_checkpoint, stream_interval_s=0.0, max_stream_chunks_per_s=0.25) as core:
            stream = core.generate(PROMPTS[0], LONG, "paused")
            chunks = [await stream.__anext__(), await stream.__anext__()]  # accepted; the first token
            steps = core.num_steps
            # The consumer is back for more: the stream pauses (1 stream at 0.25 chunks/s: 4 s)
            # while the engine steps on.
            following = asyncio.ensure_future(stream.__anext__())
            await asyncio.sleep(0.3)
            stepped, count = core.num_steps - steps, held("paused")
            assert not following.done()  # still paused
            chunks.append(await following)
            chunks += [chunk async for chunk in stream]
            return chunks, stepped, count

    chunks, stepped, count = asyncio.run(main())
    tokens = token_ids(chunks)
    assert len(tokens) == 400 and tokens[:len(offline_tokens[0])] == offline_tokens[0]
    assert stepped >= 5, stepped  # the request kept generating while its stream paused
    assert count <= 2, f"a paused stream held {count} outputs after {stepped} steps"


def test_a_long_text_prompt_does_not_stall_the_other_streams(neox_checkpoint):
    # Encoding a few MiB of text takes seconds; on the event loop it would stop every stream of
    # the replica (and its health checks) until the prompt is refused as too long.
    long_prompt = "def hello_world():\n    print('hello, world')\n" * 60_000  # 2.6 MB, ~700k tokens

    async def main():
        async with started_core(neox_checkpoint) as core:
            gaps: list[float] = []

            async def tick() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.01)
                    now = time.monotonic()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            await asyncio.sleep(0.05)  # the ticker runs
            try:
                # Past max_prompt_chars the prompt is refused before it is encoded at all.
                started = time.monotonic()
                with pytest.raises(InvalidRequestError, match="characters, more than a context window"):
                    await collect(core, long_prompt, GREEDY, "refused")
                refused_in = time.monotonic() - started
                # Without that bound (a tokenizer with long tokens allows long texts), it is encoded
                # off the loop and refused for its token count.
                core.engine.max_prompt_chars = len(long_prompt)
                started = time.monotonic()
                with pytest.raises(InvalidRequestError, match="tokens; the context window"):
                    await collect(core, long_prompt, GREEDY, "long")
                took = time.monotonic() - started
                chunks = await collect(core, PROMPTS[0], GREEDY, "short")  # the replica still serves
            finally:
                ticker.cancel()
        return refused_in, took, max(gaps), chunks

    refused_in, took, longest_gap, chunks = asyncio.run(main())
    assert refused_in < 0.2, f"refusing an over-long prompt took {refused_in:.2f} s"
    assert took > 0.5, f"encoding took only {took:.2f} s: the prompt is too short to show a stall"
    # The real stall is the whole encoding (4 s here); a loaded CI machine may add a few tenths.
    assert longest_gap < 1.0, f"the event loop stalled for {longest_gap:.2f} s while a prompt was encoded"
    assert len(token_ids(chunks)) == GREEDY.max_tokens


def test_a_cancelled_stream_leaves_the_engine_at_once(neox_checkpoint):
    # A client that hangs up (the stream is closed): its sequence leaves the engine and frees its
    # KV blocks before the next micro-batch is scheduled, not when it would have finished.
    async def main():
        async with started_core(neox_checkpoint) as core:
            stream = core.generate(PROMPTS[0], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True),
                                   "gone")
            for _ in range(4):
                await stream.__anext__()
            steps_at_cancel = core.num_steps
            await stream.aclose()
            assert "gone" not in core.engine.requests
            assert core.engine.allocator.num_free_blocks == core.engine.allocator.num_blocks
            await asyncio.sleep(0.3)
            return core.num_steps - steps_at_cancel

    assert asyncio.run(main()) <= 1  # at most the micro-batch already in flight (one stage)


def test_a_request_id_is_not_reused_while_its_stream_is_open(neox_checkpoint, offline_tokens):
    """A handle caller's own request id, reused after the engine finished the request but before
    its stream closed: that stream's cleanup would have removed the new request's mailbox and
    aborted it by id, leaving the new stream waiting forever. The reuse is refused instead."""
    async def main():
        async with started_core(neox_checkpoint) as core:
            first = core.generate(PROMPTS[0], GREEDY, "mine")
            chunks = [await first.__anext__()]  # accepted; the consumer then looks away
            for _ in range(200):
                if "mine" not in core.engine.requests:
                    break
                await asyncio.sleep(0.01)
            assert "mine" not in core.engine.requests  # finished in the engine, stream still open
            with pytest.raises(InvalidRequestError, match="still streaming") as refused:
                await collect(core, PROMPTS[1], GREEDY, "mine")
            chunks += [chunk async for chunk in first]
            again = await asyncio.wait_for(collect(core, PROMPTS[1], GREEDY, "mine"), 30)  # closed: free
            return refused.value.field, chunks, again

    field, chunks, again = asyncio.run(main())
    assert field == "request_id"
    assert token_ids(chunks) == offline_tokens[0] and token_ids(again) == offline_tokens[1]


def test_a_request_finished_at_once_keeps_its_id_until_its_stream_closes(neox_checkpoint, offline_tokens):
    """max_tokens=0 finishes a request as it is added, so it was never among the open streams:
    a second request could take its id, and the first stream's cleanup then aborted the second
    by id and removed its mailbox, leaving it waiting forever (review, reproduced)."""
    async def main():
        async with started_core(neox_checkpoint) as core:
            scored = core.generate(PROMPTS[0], SamplingParams(max_tokens=0), "mine")
            await scored.__anext__()  # accepted and finished; the consumer has not closed it yet
            with pytest.raises(InvalidRequestError, match="still streaming"):
                await collect(core, PROMPTS[1], GREEDY, "mine")
            await scored.aclose()
            return await asyncio.wait_for(collect(core, PROMPTS[1], GREEDY, "mine"), 30)  # closed: free

    assert token_ids(asyncio.run(main())) == offline_tokens[1]


def test_prompt_logprobs_streamed_first_do_not_hold_back_the_first_token(neox_checkpoint):
    # A prompt scored over several steps (longer than the step budget) streams its logprobs as
    # they come; the pause between a stream's chunks starts at its first token, not at them.
    prompt = [5 + (7 * i) % 400 for i in range(60)]
    params = SamplingParams(max_tokens=400, temperature=0.0, ignore_eos=True, prompt_logprobs=1)

    async def main():
        async with started_core(neox_checkpoint, {"max_num_batched_tokens": 16}, stream_interval_s=30.0) as core:
            return await collect(core, prompt, params, "scored")

    chunks = asyncio.run(main())
    with_tokens = [chunk for chunk in chunks if chunk.sequences and chunk.sequences[0].token_ids]
    assert any(chunk.prompt_logprobs for chunk in chunks[1:chunks.index(with_tokens[0])])  # scored first
    assert len(with_tokens) == 2 and len(with_tokens[0].sequences[0].token_ids) < 10  # then the rest at the end
    assert sum(len(chunk.sequences[0].token_ids) for chunk in with_tokens) == 400


class Recorded:
    """Stands in for one Ray counter or histogram: every value given, with its tags."""

    def __init__(self) -> None:
        self.values: list[tuple[float, dict]] = []

    def inc(self, value: float = 1, tags: dict | None = None) -> None:
        self.values.append((value, tags or {}))

    observe = inc


class RecordedGauges:
    """Stands in for PipelineMetrics: every record_step call, in order, and every value of its
    per-request counters and histograms."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        (self.prompt_tokens, self.time_to_first_token, self.inter_token_latency, self.request_latency,
         self.queue_time, self.finished_sequences) = (Recorded() for _ in range(6))

    def record_step(self, **values) -> None:
        self.steps.append(values)


def test_an_idle_replica_keeps_setting_its_gauges(neox_checkpoint):
    # Ray exports a gauge only if it was set since its last export and forgets it two exports
    # later: an idle replica must keep setting its load gauges, or they vanish instead of reading 0.
    gauges = RecordedGauges()

    async def main():
        async with started_core(neox_checkpoint, metrics=gauges, gauge_refresh_s=0.05):
            await asyncio.sleep(0.6)

    asyncio.run(main())
    assert len(gauges.steps) >= 6 and all(step["running"] == step["waiting"] == 0 for step in gauges.steps)


def test_a_replica_waiting_on_a_stuck_step_keeps_setting_its_gauges(neox_checkpoint):
    # A stage that hangs or reloads its weights holds the loop on one step for minutes; the load
    # gauges must keep reading that load meanwhile, not vanish from the dashboards.
    gauges = RecordedGauges()

    def stall_first_step(core: PipelineCore) -> None:
        sample_step, calls = core.engine.sample_step, []

        def slow_sample_step(prepared, logits):
            if not calls:
                calls.append(1)
                time.sleep(1.0)  # on the step thread: the event loop stays free
            return sample_step(prepared, logits)

        core.engine.sample_step = slow_sample_step

    async def main():
        async with started_core(neox_checkpoint, metrics=gauges, gauge_refresh_s=0.05) as core:
            stall_first_step(core)
            await collect(core, PROMPTS[0], SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True), "stuck")

    asyncio.run(main())
    while_running = [step for step in gauges.steps if step["running"] == 1]
    assert len(while_running) >= 10, gauges.steps  # ~20 refreshes during the stalled second


@pytest.mark.parametrize("engine_options", [
    # max_num_seqs 8 while 16 more wait: each micro-batch takes 4, not the first one all 8
    # (which left the second stage idle under load).
    {"max_num_seqs": 8},
    # Room for 64 sequences but KV for 8 (16 blocks of 16 slots; each sequence of 8 + 12 tokens
    # takes 2): each micro-batch takes 4 of the 8 running, not the first one all 8 because 16
    # more wait that the cache cannot admit.
    {"max_num_seqs": 64, "kv_cache_tokens": 256, "max_model_len": 64},
], ids=["max_num_seqs", "kv_cache_full"])
def test_micro_batches_split_the_sequences_that_can_run_even_while_more_wait(neox_checkpoint, engine_options):
    # 2 micro-batches in flight (the depth of a 2-stage pipeline; here on the in-process runner),
    # 24 requests, 8 of which can run at once.
    sizes: list[tuple[int, int]] = []  # (sequences waiting, sequences in the micro-batch)
    prompts = [[5 + (7 * i + j) % 400 for j in range(8)] for i in range(24)]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)

    async def main():
        async with started_core(neox_checkpoint, engine_options) as core:
            core.runner.depth = 2
            schedule_step = core.engine.schedule_step

            def recording_schedule_step(in_flight, *args, **kwargs):
                prepared = schedule_step(in_flight, *args, **kwargs)
                if prepared is not None:
                    # A prompt's next chunk, sent while its first is in flight, counts in the first's micro-batch.
                    sizes.append((core.engine.num_waiting(),
                                  len({c.seq for c in prepared.batch.chunks if c.seq not in in_flight})))
                return prepared

            core.engine.schedule_step = recording_schedule_step
            return await asyncio.gather(*(collect(core, p, params, f"r{i}") for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    assert all(len(token_ids(chunks)) == 12 for chunks in results)
    while_waiting = [size for waiting, size in sizes if waiting > 0]
    assert while_waiting and max(while_waiting) <= 4, sizes
    assert max(size for _, size in sizes) <= 4, sizes


class ManualRunner:
    """A 2-stage pipeline's steps, each finished when the test says, oldest first; the last stage
    reports `stage_seconds` per step."""

    depth = 2

    def __init__(self, vocab: int, stage_seconds: float | None = None) -> None:
        self.vocab, self.stage_seconds = vocab, stage_seconds
        self.submitted: list = []

    def submit(self, step, finish):
        future = asyncio.get_running_loop().create_future()
        self.submitted.append((future, step, finish))
        return future

    async def finish_oldest(self) -> None:
        running = [item for item in self.submitted if not item[0].done()]
        if running:
            future, step, finish = running[0]
            result = step_output(step, [42] * len(step.logits_indices), self.vocab)
            future.set_result(finish(dataclasses.replace(result, last_stage_seconds=self.stage_seconds)))
        for _ in range(5):
            await asyncio.sleep(0)

    def chunks_of(self, request_id: str) -> list[tuple[int, int]]:
        # `finish` is the engine's sample_step bound to the step's PreparedStep.
        return [(chunk.start, chunk.end) for _, _, finish in self.submitted for chunk in finish.args[0].batch.chunks
                if chunk.seq.request.request_id == request_id]


def test_a_failed_micro_batch_spares_a_new_request_that_took_an_aborted_ones_id(neox_checkpoint):
    # "x" is cancelled while its micro-batch is in flight and a new "x" starts (a handle caller's
    # own ids). The old micro-batch then fails: the error is the old request's, not the new one's.
    async def settle():
        for _ in range(5):
            await asyncio.sleep(0)

    async def main():
        engine = LLMEngine(EngineConfig(model=str(neox_checkpoint), device="cpu", kv_cache_tokens=1024,
                                        num_stages=2), executor=UnloadedExecutor())
        runner = ManualRunner(engine.model_config.vocab_size)
        core = PipelineCore(engine, runner, stream_interval_s=0.0)
        core.start()
        params = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
        try:
            old = asyncio.ensure_future(collect(core, [5, 6, 7], params, "x"))
            await settle()
            old.cancel()
            await settle()
            new = asyncio.ensure_future(collect(core, [5, 6, 7], params, "x"))
            await settle()
            assert len(runner.submitted) == 2
            runner.submitted[0][0].set_exception(RuntimeError("a stage raised in micro-batch 1"))
            await settle()
            while not new.done():
                await runner.finish_oldest()
            return token_ids(await new)
        finally:
            core.close()

    assert asyncio.run(main()) == [42] * 4


@pytest.mark.parametrize("stage_seconds,expected_chunks", [
    (0.9, [(0, 20), (20, 40)]),  # busy: each micro-batch in flight carries half of the prompt
    (0.1, [(0, 40)]),  # mostly idle: the prompt goes whole
], ids=["busy_stages", "idle_stages"])
def test_prompts_are_split_over_the_micro_batches_in_flight_while_the_stages_are_busy(
        neox_checkpoint, stage_seconds, expected_chunks):
    async def main():
        engine = LLMEngine(EngineConfig(model=str(neox_checkpoint), device="cpu", kv_cache_tokens=1024,
                                        num_stages=2), executor=UnloadedExecutor())
        runner = ManualRunner(engine.model_config.vocab_size, stage_seconds)
        core = PipelineCore(engine, runner, stream_interval_s=0.0)
        core.start()
        params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
        try:
            decoding = [asyncio.ensure_future(collect(core, [5 + i, 6, 7], params, f"d{i}")) for i in range(2)]
            while core.num_steps < 4:  # two steps each: the stage's load over the last 2 s is known
                await runner.finish_oldest()
            load = core.stats()["last_stage_load"]
            prompt = asyncio.ensure_future(collect(core, list(range(10, 50)), params, "prompt"))
            while not all(stream.done() for stream in [prompt, *decoding]):
                await runner.finish_oldest()
            assert token_ids(await prompt) == [42] * 12
            return runner.chunks_of("prompt"), load
        finally:
            core.close()

    chunks, load = asyncio.run(main())
    assert load == pytest.approx(stage_seconds * 4 / 2.0)  # 4 steps within the last 2 s
    assert chunks[:len(expected_chunks)] == expected_chunks


def test_an_echoed_prompt_is_the_text_its_logprob_offsets_count(neox_checkpoint, tmp_path):
    # GPT-NeoX's tokenizer (Pythia, GPT-NeoX-20B) normalizes to NFC: "e" + a combining accent is
    # encoded as "é". The prompt echoed with its logprobs must be that text, or `text_offset`
    # (which counts the characters the tokens decode to) points short of each token from the first
    # accent on. Without logprobs the echo is the text as given.
    import json
    import shutil
    import unicodedata

    checkpoint = tmp_path / "nfc"
    shutil.copytree(neox_checkpoint, checkpoint)
    spec = json.loads((checkpoint / "tokenizer.json").read_text())
    (checkpoint / "tokenizer.json").write_text(json.dumps({**spec, "normalizer": {"type": "NFC"}}))
    prompt = "Cafe\u0301 nai\u0308ve, Gru\u0308\u00dfe"  # NFD: 20 characters, 17 in NFC

    async def main():
        async with started_core(checkpoint) as core:
            scored = await collect(core, prompt, SamplingParams(max_tokens=0, prompt_logprobs=1), "scored")
            plain = await collect(core, prompt, SamplingParams(max_tokens=0), "plain")
            return scored, plain

    scored, plain = asyncio.run(main())
    entries = [entry for chunk in scored for entry in chunk.prompt_logprobs or []]
    assert scored[0].prompt == unicodedata.normalize("NFC", prompt) != prompt
    assert sum(entry.text_len for entry in entries) == len(scored[0].prompt)
    assert plain[0].prompt == prompt


class FaultingRunner:
    """The in-process runner whose step number `fault_at` fails with `error` before it runs, as a
    stage's fault reaches the replica (or each step for which `faults(call_number, prepared)`
    says so, given the core's prepared micro-batch). With `restartable`, it offers
    `restart_stages` (as the stage actors' runner does) and records what each restart was asked
    to replace. `depth`: micro-batches the core keeps in flight (they run one after another)."""

    def __init__(self, inner: LocalStepRunner, fault_at: int, error: BaseException, restartable: bool,
                 faults=None, depth: int | None = None) -> None:
        self.inner, self.depth = inner, depth or inner.depth
        self.fault_at, self.error, self.calls = fault_at, error, 0
        self.faults = faults or (lambda call, prepared: call == self.fault_at)
        self.restarts: list[bool] = []
        if restartable:
            self.restart_stages = self._restart_stages

    def submit(self, step, finish):
        self.calls += 1
        prepared = finish.args[0]  # the core's finish is `functools.partial(engine.sample_step, prepared)`
        if self.faults(self.calls, prepared):
            future = asyncio.get_running_loop().create_future()
            future.set_exception(self.error)
            return future
        return self.inner.submit(step, finish)

    async def _restart_stages(self, *, all_stages: bool = False) -> list[int]:
        self.restarts.append(all_stages)
        return []


async def start_faulting_core(checkpoint, error: BaseException, restartable: bool) -> PipelineCore:
    core = await start_core(checkpoint, stream_interval_s=0.0)
    core.runner = FaultingRunner(core.runner, fault_at=3, error=error, restartable=restartable)
    return core


def request_ids(prepared) -> set[str]:
    return {chunk.seq.request.request_id for chunk in prepared.batch.chunks}


def run_with_faults(checkpoint, faults, request_ids, *, depth=None, after=None, timeout_s=120.0, prompts=PROMPTS,
                    engine_options=None):
    """Stream `prompts` (one per id) through a core whose restartable runner fails each step that
    `faults(call, prepared)` picks with a CUDA fault; then, if given, one more request `after`.
    Each request's token ids or its exception, the runner and the core (bounded: a recovery loop
    fails the test instead of hanging it)."""
    fault = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    async def tokens_or_error(core, prompt, request_id):
        try:
            return token_ids(await collect(core, prompt, GREEDY, request_id))
        except Exception as exc:  # noqa: BLE001 - what the request ended with
            return exc

    async def main():
        core = await start_core(checkpoint, engine_options, stream_interval_s=0.0)
        core.runner = FaultingRunner(core.runner, 0, fault, restartable=True, faults=faults, depth=depth)
        try:
            results = await asyncio.gather(*(tokens_or_error(core, p, i) for p, i in zip(prompts, request_ids)))
            if after is not None:
                results.append(await tokens_or_error(core, PROMPTS[0], after))
            return results, core
        finally:
            core.close()
            core.runner.inner.close()

    return asyncio.run(asyncio.wait_for(main(), timeout_s))


def test_a_fault_that_comes_back_with_every_recompute_gives_up_the_replica(neox_checkpoint):
    # A fault no recompute avoids (a kernel this GPU cannot run) would restart the stages forever,
    # reloading the weights each time (minutes for GPT-NeoX-20B) while no request progresses.
    from neo_serve.errors import PipelineFailed
    from neo_serve.serve.protocol import APIError

    results, core = run_with_faults(neox_checkpoint, lambda call, prepared: call >= 3,
                                    [f"r{i}" for i in range(len(PROMPTS))], after="after")
    # The requests in flight were in both lost micro-batches: each ends at the second fault, as
    # a request that faults its stage would (no step tells the two apart).
    assert all(isinstance(r, APIError) and r.code == "repeated_stage_failure" for r in results[:-1]), results
    assert isinstance(results[-1], PipelineFailed), results[-1]  # then the replica fails its health check
    assert isinstance(core.failure, PipelineFailed) and "no step completed" in str(core.failure)
    assert len(core.runner.restarts) == 3  # MAX_RECOVERIES_WITHOUT_PROGRESS, as docs/reliability.md says


def test_a_request_that_faults_its_stage_again_ends_alone_and_the_others_complete(neox_checkpoint, offline_tokens):
    # A request whose tokens crash a stage (a device-side assert) would crash it again at every
    # recompute, taking every other request's time. Its second lost micro-batch ends it with a
    # 500; requests that were not in both of its lost micro-batches complete exactly.
    from neo_serve.serve.protocol import APIError

    ids = ["r0", "r1", "poison", "r3"]
    results, core = run_with_faults(neox_checkpoint, lambda call, prepared: "poison" in request_ids(prepared), ids,
                                    depth=2, after="after")
    poisoned = results[ids.index("poison")]
    assert isinstance(poisoned, APIError) and poisoned.status == 500 and poisoned.code == "repeated_stage_failure"
    assert poisoned.headers == {"x-should-retry": "false"}  # OpenAI's clients would send it again
    completed = [i for i, r in enumerate(results[:-1]) if isinstance(r, list)]
    assert len(completed) >= 2, results  # two micro-batches in flight: the poison shares at most one
    for i, result in enumerate(results[:-1]):
        assert result == offline_tokens[i] if i in completed else isinstance(result, APIError), (i, result)
    assert results[-1] == offline_tokens[0] and core.failure is None
    assert len(core.runner.restarts) == 2


def test_a_request_that_faults_past_its_first_prefill_chunk_ends_too(neox_checkpoint):
    # Recomputed after a fault, such a request's first chunk completes before the faulting one
    # runs again: that must not count as getting past the fault, or it is recomputed forever.
    from neo_serve.serve.protocol import APIError

    def faults(call, prepared):  # the poison's tokens from 24 on crash the stage
        return any(c.seq.request.request_id == "poison" and c.end > 24 for c in prepared.batch.chunks)

    long_prompt = "def poisoned(x):\n" + "    x = x + 1\n" * 12  # well over 24 tokens: chunks of 16
    results, core = run_with_faults(neox_checkpoint, faults, ["r0", "poison"], prompts=[PROMPTS[0], long_prompt],
                                    depth=2, after="after", engine_options={"max_num_batched_tokens": 16})
    assert isinstance(results[1], APIError) and results[1].code == "repeated_stage_failure", results[1]
    assert isinstance(results[0], list) and isinstance(results[2], list) and core.failure is None, results
    assert len(core.runner.restarts) == 2


def test_a_stage_whose_gpu_faulted_is_replaced_and_the_streams_complete(neox_checkpoint, offline_tokens):
    # A CUDA fault (illegal address, device-side assert, ECC) leaves the stage's CUDA context
    # unusable while its actor lives on: every later step there would fail too. It is handled as
    # a lost stage: the stages are replaced and the running sequences recomputed.
    import ray.exceptions

    fault = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
    as_ray_raises_it = ray.exceptions.RayTaskError("StageActor.execute", "Traceback ...", fault).as_instanceof_cause()

    async def main():
        core = await start_faulting_core(neox_checkpoint, as_ray_raises_it, restartable=True)
        try:
            chunks = await asyncio.gather(*(collect(core, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
            return [token_ids(c) for c in chunks], core
        finally:
            core.close()
            core.runner.inner.close()

    tokens, core = asyncio.run(main())
    assert tokens == offline_tokens
    assert core.runner.restarts == [True]  # every stage: Ray's error does not say which one faulted
    assert core.num_recoveries == 1 and core.failure is None


@pytest.mark.parametrize("error,device_fault", [
    (RuntimeError("CUDA error: device-side assert triggered"), True),  # torch before 2.8
    (torch.AcceleratorError("CUDA error: an illegal memory access was encountered"), True),
    (RuntimeError("a step's own error"), False),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),  # CUDA recovers
    # Allocations outside the caching allocator (pinned host memory, cuBLAS's workspace) fail as
    # a CUDA error in torch 2.8+, and CUDA recovers from them too.
    (torch.AcceleratorError("CUDA error: out of memory"), False),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"), False),
])
def test_a_gpu_fault_in_the_replicas_own_process_takes_the_replica_out(neox_checkpoint, error, device_fault):
    # One stage runs in the replica's process, which cannot replace its CUDA context: after a
    # device fault the replica reports itself failed (its health check raises, so Serve replaces
    # it). Any other step error fails that step's requests only, and the next request is served.
    from neo_serve.errors import PipelineFailed

    async def main():
        core = await start_faulting_core(neox_checkpoint, error, restartable=False)
        try:
            first = await asyncio.gather(*(collect(core, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)),
                                         return_exceptions=True)
            try:
                after = token_ids(await collect(core, PROMPTS[0], GREEDY, "after"))
            except PipelineFailed as exc:
                after = exc
            return first, after, core.failure
        finally:
            core.close()
            core.runner.inner.close()

    first, after, failure = asyncio.run(main())
    assert all(isinstance(result, Exception) for result in first), first  # the faulted step had them all
    if device_fault:
        assert failure is error and isinstance(after, PipelineFailed), (failure, after)
    else:
        assert failure is None and isinstance(after, list) and len(after) == GREEDY.max_tokens, (failure, after)


def test_a_request_that_finished_before_the_pipeline_failed_still_gets_its_output():
    # The loop fails every open stream when the pipeline is lost; a stream whose request already
    # finished, its last output not yet read, keeps that output.
    from neo_serve.engine.outputs import CompletionOutput, RequestOutput
    from neo_serve.errors import PipelineFailed
    from neo_serve.serve.engine_loop import _Mailbox

    async def main():
        mailbox = _Mailbox()
        done = RequestOutput("r", "p", [1], [CompletionOutput(0, "ab", [2, 3], finish_reason="length")], finished=True)
        mailbox.put(done)
        mailbox.put(PipelineFailed("a stage died"))
        return await mailbox.get()

    assert asyncio.run(main()).finished


def test_gauges_are_refreshed_within_rays_export_interval():
    # Ray's metrics agent forgets a gauge two export intervals (at least 1 s each) after it was
    # last set; a cluster started with RAY_metrics_report_interval_ms=1000 forgets in 2 s.
    import os
    import subprocess
    import sys

    from neo_serve.serve.metrics import gauge_refresh_period_s

    if "RAY_metrics_report_interval_ms" not in os.environ:
        assert gauge_refresh_period_s() == 5.0  # Ray's default 10 s interval: at most every 5 s
    env = {**os.environ, "RAY_metrics_report_interval_ms": "1000"}
    out = subprocess.run([sys.executable, "-c", "from neo_serve.serve.metrics import gauge_refresh_period_s as f; "
                          "print(f())"], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    assert float(out) == 0.5


def test_preemptions_reach_the_metrics(neox_checkpoint, offline_tokens):
    # A KV cache too small for the four sequences at once: some are preempted and recomputed, the
    # count reaches the metrics (neo_serve_preemptions), and the streams still give the offline tokens.
    gauges = RecordedGauges()
    options = {"kv_cache_tokens": 64, "max_model_len": 64, "max_num_batched_tokens": 16}

    async def main():
        async with started_core(neox_checkpoint, options, metrics=gauges) as core:
            chunks = await asyncio.gather(*(collect(core, p, GREEDY, f"r{i}") for i, p in enumerate(PROMPTS)))
            return chunks, core.engine.scheduler.num_preemptions

    chunks, preemptions = asyncio.run(main())
    assert preemptions > 0 and max(step["preemptions"] for step in gauges.steps) == preemptions
    assert [token_ids(c) for c in chunks] == offline_tokens


def test_each_request_reports_its_queue_time_latency_and_how_it_ended(neox_checkpoint, offline_tokens):
    # What a dashboard reads besides the tokens: how long requests waited for a batch slot
    # (neo_serve_request_queue_time_seconds), how long finished ones took
    # (neo_serve_e2e_request_latency_seconds) and how each sequence ended (neo_serve_finished_sequences,
    # by finished_reason), a hang-up included.
    recorded = RecordedGauges()
    options = {"max_num_seqs": 1}  # one at a time: the second request waits for the first

    async def main():
        async with started_core(neox_checkpoint, options, metrics=recorded) as core:
            first = asyncio.ensure_future(collect(core, PROMPTS[0], SamplingParams(max_tokens=16, temperature=0.0,
                                                                                    ignore_eos=True), "first"))
            await asyncio.sleep(0)  # admitted first
            second = asyncio.ensure_future(collect(core, PROMPTS[1], SamplingParams(
                max_tokens=4, n=2, temperature=0.8, seed=1, ignore_eos=True), "second"))
            started = time.monotonic()
            await asyncio.gather(first, second)
            whole = time.monotonic() - started
            await collect(core, PROMPTS[2], SamplingParams(max_tokens=16, temperature=0.0,
                                                           stop_token_ids=[offline_tokens[2][2]]), "stopped")
            gone = core.generate(PROMPTS[3], SamplingParams(max_tokens=200, temperature=0.0, ignore_eos=True), "gone")
            for _ in range(3):
                await gone.__anext__()
            await gone.aclose()
            return whole

    whole = asyncio.run(main())
    reasons = sorted(tags["finished_reason"] for value, tags in recorded.finished_sequences.values
                     for _ in range(int(value)))
    assert reasons == ["abort", "length", "length", "length", "stop"]  # n=2 counts two sequences
    latencies = [value for value, _ in recorded.request_latency.values]
    assert len(latencies) == 3 and all(value > 0 for value in latencies)  # not the hung-up one
    assert max(latencies[:2]) <= whole
    queued = [value for value, _ in recorded.queue_time.values]
    assert len(queued) == 4 and all(value >= 0 for value in queued)
    assert max(queued) > 0.5 * min(latencies[:2])  # the second waited for the first's 16 steps


def test_a_hang_up_counts_only_the_sequences_it_cut_off():
    # n > 1: a sequence that had ended (its client saw "stop") stays a stop when the client then
    # hangs up on the others; a request that never had a step has no queue time.
    from neo_serve.engine.outputs import RequestMetrics
    from neo_serve.serve.metrics import RequestTimer

    recorded = RecordedGauges()
    RequestTimer(recorded, arrival=time.monotonic()).ended(RequestMetrics(arrival_time=time.monotonic()),
                                                          ["stop", None, "abort"])
    assert sorted((tags["finished_reason"], value) for value, tags in recorded.finished_sequences.values) == [
        ("abort", 2), ("stop", 1)]
    assert recorded.queue_time.values == [] and recorded.request_latency.values == []
