"""The scheduler under KV pressure, against a shadow of the KV cache.

A history-keyed executor stands in for the model (through the engine's executor seam, as the
pipeline's Ray executor does): it keeps the token written at every KV slot, applying each
step's extent moves first, and "predicts" each row's next token from the whole history cached
for that row. A sequence whose cached history is wrong in any slot (a lost or misdirected
move, an extent freed while in use, two sequences sharing a slot, a recompute that skips a
token) continues differently from then on. So random workloads with tight caches (preemptions,
moves, chunked prefills, n > 1, aborts) must give every request exactly the tokens its prompt
alone determines, and leave every block free. test_exactness checks the real model.
"""

from __future__ import annotations

import random
import zlib
from array import array

import pytest
import torch

from neo_serve import SamplingParams
from neo_serve.engine.config import EngineConfig
from neo_serve.engine.llm_engine import LLMEngine
from neo_serve.engine.step_result import StepResult, argmax_result, step_result
from neo_serve.engine.worker import StepInput

MAX_MODEL_LEN = 96


def next_token(history: list[int], vocab: int) -> int:
    """The shadow model: a token decided by the whole history (never 0)."""
    return zlib.crc32(array("q", history).tobytes()) % (vocab - 1) + 1


class ShadowExecutor:
    """Keeps the token id at every KV slot; answers each logits row from its cached history."""

    def __init__(self, num_slots: int, vocab: int) -> None:
        self.slots: list[int | None] = [None] * num_slots
        self.vocab = vocab

    def execute(self, step: StepInput) -> torch.Tensor:
        self.write(step)
        rows = step.logits_indices.tolist()
        return step_output(step, [next_token(self.history(step, row), self.vocab) for row in rows], self.vocab)

    def write(self, step: StepInput) -> None:
        """The step's extent moves, then its new tokens' KV."""
        for move in step.kv_copies:  # in order: a later move may reuse a freed source
            self.slots[move.dst:move.dst + move.num_slots] = self.slots[move.src:move.src + move.num_slots]
        ids = step.input_ids.tolist()
        for s in step.sequences:
            for j in range(s.query_len):
                self.slots[s.kv_start + s.context_len + j] = ids[s.query_start + j]

    def history(self, step: StepInput, row: int) -> list[int | None]:
        """The cached tokens that packed position `row` of the step attends to."""
        [s] = [s for s in step.sequences if s.query_start <= row < s.query_start + s.query_len]
        return self.slots[s.kv_start:s.kv_start + s.context_len + (row - s.query_start) + 1]


def step_output(step: StepInput, tokens: list[int], vocab: int) -> StepResult:
    """What the last stage returns for logits that pick these tokens (one per logits row): the
    stage's own sampling and scoring run on them."""
    logits = torch.zeros(len(tokens), vocab)
    logits[torch.arange(len(tokens)), torch.tensor(tokens, dtype=torch.long)] = 10.0
    return argmax_result(logits) if step.argmax_only else step_result(logits, step.sampling)


def expected_tokens(prompt: list[int], max_tokens: int, vocab: int) -> list[int]:
    history, out = list(prompt), []
    for _ in range(max_tokens):
        out.append(next_token(history, vocab))
        history.append(out[-1])
    return out


def random_request(rng: random.Random, vocab: int) -> tuple[list[int], SamplingParams]:
    """A prompt of 1 to MAX_MODEL_LEN - 1 tokens, greedy, up to the rest of the window, n of 1-3."""
    prompt = [rng.randrange(1, vocab) for _ in range(rng.randint(1, MAX_MODEL_LEN - 1))]
    return prompt, SamplingParams(max_tokens=rng.randint(0, MAX_MODEL_LEN - len(prompt)), temperature=0.0,
                                  ignore_eos=True, n=rng.choice([1, 1, 2, 3]))


def check_cache(engine: LLMEngine, *shadows: ShadowExecutor) -> None:
    """Every running sequence's computed tokens sit in its extent (in every shadow: one per
    pipeline stage); extents and free runs tile the arena without overlap."""
    allocator, block = engine.allocator, engine.allocator.block_size
    spans = [(start, start + length) for start, length in allocator.free_runs().items()]
    for seq in engine.scheduler.running:
        assert seq.extent is not None and seq.extent.length * block >= seq.num_computed
        start = seq.extent.start * block
        tokens = [seq.token_at(i) for i in range(seq.num_computed)]
        for shadow in shadows:
            assert shadow.slots[start:start + seq.num_computed] == tokens, seq.request.request_id
        spans.append((seq.extent.start, seq.extent.end))
    assert all(seq.extent is None for seq in engine.scheduler.waiting)
    position = 0
    for start, end in sorted(spans):
        assert start == position, sorted(spans)
        position = end
    assert position == allocator.num_blocks


@pytest.mark.parametrize("seed", range(12))
def test_random_workloads_under_kv_pressure_give_each_prompt_its_own_tokens(neox_checkpoint, seed):
    rng = random.Random(seed)
    block_size = rng.choice([1, 4, 16])
    kv_tokens = rng.choice([MAX_MODEL_LEN, 128, 192, 384])
    config = EngineConfig(model=str(neox_checkpoint), dtype="float32", kv_cache_tokens=kv_tokens,
                          max_model_len=MAX_MODEL_LEN, block_size=block_size,
                          max_num_seqs=rng.choice([2, 4, 16, 64]),
                          max_num_batched_tokens=rng.choice([1, 7, 64, 512]))
    vocab = 512
    shadow = ShadowExecutor((kv_tokens // block_size) * block_size, vocab)
    engine = LLMEngine(config, executor=shadow)
    requests: dict[str, tuple[list[int], int]] = {}
    aborted: set[str] = set()
    done: dict[str, list[list[int]]] = {}

    def collect(outputs) -> None:
        for output in outputs:
            if output.finished:
                done[output.request_id] = [list(c.token_ids) for c in output.outputs]

    for step in range(300):
        if step < 200 and rng.random() < 0.3:
            prompt, params = random_request(rng, vocab)
            request = engine.add_request(prompt, params)
            requests[request.request_id] = (prompt, params.max_tokens)
            if request.finished:
                done[request.request_id] = [[] for _ in range(params.n)]
        if requests and rng.random() < 0.03:
            victim = rng.choice(list(requests))
            if engine.abort_request(victim):
                aborted.add(victim)
        collect(engine.step())
        check_cache(engine, shadow)
    for _ in range(20_000):
        if not engine.has_unfinished_requests():
            break
        collect(engine.step())
        check_cache(engine, shadow)
    assert not engine.has_unfinished_requests(), "the engine stopped making progress"
    assert engine.allocator.num_free_blocks == engine.allocator.num_blocks
    for request_id, (prompt, max_tokens) in requests.items():
        if request_id in aborted:
            continue
        expected = expected_tokens(prompt, max_tokens, vocab)
        assert done[request_id] and all(tokens == expected for tokens in done[request_id]), request_id
