"""Sampling parameters behave as users of vLLM / the OpenAI API expect."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch

from neo_serve import LLM, SamplingParams
from neo_serve.engine.sampler import (SamplingRow, apply_logit_bias, apply_penalties, apply_top_k, apply_top_p,
                                      choice_seed, draw, sample, score_rows, seeded_uniform, top_p_keep,
                                      top_p_keep_by_sort)
from neo_serve.errors import InvalidRequestError

PROMPT = "def hello_world():\n"


@pytest.fixture(scope="module")
def llm(neox_checkpoint):
    return LLM(str(neox_checkpoint), dtype="float32")


def with_uniforms(params: SamplingParams, count: int) -> list[SamplingRow]:
    """`count` rows of `params`, each drawing at its own (seeded) uniform number."""
    draws = random.Random(0)
    return [SamplingRow(params, [0], [], draws.random()) for _ in range(count)]


def text_and_ids(llm, prompt, **params):
    out = llm.generate([prompt], SamplingParams(**params))[0].outputs[0]
    return out.text, out.token_ids


@pytest.mark.parametrize("top_k", [0, 40])
def test_seed_reproduces_alone_and_inside_a_batch(llm, top_k):
    seeded = SamplingParams(max_tokens=24, temperature=1.0, top_p=0.95, top_k=top_k, seed=1234, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    # Beside rows with no top-k, the same top-k and another one (the sampler groups rows by top_k).
    noise = [SamplingParams(max_tokens=30, temperature=1.3, top_k=k, ignore_eos=True) for k in (0, 40, 7)]
    batch = llm.generate(["other prompt", PROMPT, "import os\n", "x = 1"], [noise[0], seeded, noise[1], noise[2]])
    assert batch[1].outputs[0].token_ids == alone
    other_seed = dataclasses.replace(seeded, seed=99)
    assert llm.generate([PROMPT], other_seed)[0].outputs[0].token_ids != alone


def test_a_seed_gives_the_same_tokens_on_two_stages_and_after_preemption(llm, neox_checkpoint):
    """A seeded sequence's draws depend on its seed and positions alone: not on which stage
    samples, nor on a step thrown away (preempted while it ran) and computed again."""
    seeded = SamplingParams(max_tokens=16, temperature=1.0, top_p=0.9, seed=31, ignore_eos=True)
    alone = llm.generate([PROMPT], seeded)[0].outputs[0].token_ids
    two_stages = LLM(str(neox_checkpoint), dtype="float32", num_stages=2)
    assert two_stages.generate([PROMPT], seeded)[0].outputs[0].token_ids == alone
    engine = llm.engine
    engine.add_request(PROMPT, seeded, request_id="preempted")
    [seq] = engine.requests["preempted"].sequences
    while len(seq.output_ids) < 5:
        engine.step()
    prepared = engine.schedule_step()
    result = engine.executor.execute(prepared.step_input)
    assert engine.recompute_all() == 1  # preempted while its step ran: that step's token is dropped
    assert engine.process_step(prepared, result) == [] and len(seq.output_ids) == 5
    while engine.has_unfinished_requests():
        engine.step()
    assert seq.output_ids == alone


def test_seeded_uniforms_are_uniform_and_a_function_of_seed_and_position():
    first = [seeded_uniform(7, position) for position in range(20000)]
    assert first == [seeded_uniform(7, position) for position in range(20000)]
    assert all(0.0 <= u < 1.0 for u in first)
    deciles = torch.bincount((torch.tensor(first) * 10).long(), minlength=10)
    assert (deciles - 2000).abs().max() < 200, deciles.tolist()  # 2000 +- 4.7 standard deviations
    # Neighbouring seeds are not the same stream shifted.
    second = [seeded_uniform(8, position) for position in range(20000)]
    assert not set(first[:1000]) & set(second)
    for seed in (-(2**63), -1, 2**63 - 1, 2**63 + 5):  # the range's ends, and past it
        assert 0.0 <= seeded_uniform(seed, 0) < 1.0


def test_n_completions_differ_and_reproduce_with_seed(llm):
    params = SamplingParams(n=4, max_tokens=16, temperature=1.5, seed=7, ignore_eos=True)
    first = [o.token_ids for o in llm.generate([PROMPT], params)[0].outputs]
    assert len(first) == 4 and len({tuple(t) for t in first}) > 1
    again = [o.token_ids for o in llm.generate([PROMPT], params)[0].outputs]
    assert again == first
    assert [o.index for o in llm.generate([PROMPT], params)[0].outputs] == [0, 1, 2, 3]


def test_consecutive_seeds_with_n_choices_draw_apart(llm):
    """Seeds 0..3 with n = 3 each: twelve samples, none the same stream as another (with vLLM v1's
    `seed + index`, choice 1 of seed s was choice 0 of seed s + 1); choice 0 keeps the request's
    seed, so n = 1 and the first of n choices agree."""
    def samples(seed: int, n: int) -> list[tuple[int, ...]]:
        params = SamplingParams(n=n, max_tokens=12, temperature=1.5, seed=seed, ignore_eos=True)
        return [tuple(o.token_ids) for o in llm.generate([PROMPT], params)[0].outputs]

    drawn = [sample for seed in range(4) for sample in samples(seed, 3)]
    assert len(set(drawn)) == 12, drawn
    assert samples(2, 1)[0] == drawn[2 * 3]
    assert [choice_seed(9, i) for i in range(3)][0] == 9 and len({choice_seed(s, i) for s in range(50)
                                                                  for i in range(8)}) == 400


def test_seed_minus_one_is_no_seed_as_in_vllm(llm):
    # A client written for vLLM passes -1 for "no seed"; a fixed seed would give it the same
    # sample on every call.
    params = SamplingParams(max_tokens=24, temperature=1.5, seed=-1, ignore_eos=True)
    assert params.seed is None
    samples = {tuple(llm.generate([PROMPT], params)[0].outputs[0].token_ids) for _ in range(3)}
    assert len(samples) > 1


def test_top_k_one_and_tiny_top_p_are_greedy(llm):
    greedy = text_and_ids(llm, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True)
    assert text_and_ids(llm, PROMPT, max_tokens=20, temperature=1.0, top_k=1, ignore_eos=True) == greedy
    assert text_and_ids(llm, PROMPT, max_tokens=20, temperature=1.0, top_p=1e-6, ignore_eos=True) == greedy


def test_top_k_and_top_p_masks():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0], [0.0, 0.0, 5.0, 4.9]])
    kept = apply_top_k(logits.clone(), torch.tensor([2, 0]))
    assert torch.isinf(kept[0]).tolist() == [True, False, False, True] and not torch.isinf(kept[1]).any()
    # probabilities of row 0: [0.09, 0.67, 0.24, 0.03]; top_p 0.7 keeps the two most likely.
    kept = apply_top_p(logits.softmax(dim=-1), torch.tensor([0.7, 1.0]))
    assert (kept[0] == 0).tolist() == [True, False, False, True] and (kept[1] > 0).all()


def test_top_p_of_one_keeps_every_token_beside_rows_that_cut():
    # Over a 50k vocabulary a row's float32 probabilities may add up to a little more than 1.0,
    # enough to drop its least likely tokens; a top_p=1 row beside rows that cut keeps them all.
    logits = torch.randn(8, 50304, generator=torch.Generator().manual_seed(0)) * 3
    top_p = torch.tensor([0.5, 1.0] * 4)
    kept = apply_top_p(logits.softmax(dim=-1), top_p)
    assert (kept[1::2] > 0).all()
    assert (kept[0::2] > 0).any(dim=1).all() and (kept[0::2] == 0).any(dim=1).all()


def top_p_by_sorting(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """The rule top_p_keep follows, the slow way: sort, keep the most likely tokens until their
    mass (summed in float64) reaches top_p, and every token as likely as the last one kept."""
    ordered, order = probs.sort(dim=-1, descending=True)
    mass_before = ordered.double().cumsum(dim=-1) - ordered.double()
    keep_sorted = mass_before < top_p.double().unsqueeze(1)
    keep_sorted[:, 0] = True
    kept = torch.zeros_like(keep_sorted).scatter(1, order, keep_sorted)
    least_kept = torch.where(kept, probs, torch.full_like(probs, 2.0)).min(dim=1, keepdim=True).values
    return probs >= least_kept


@pytest.mark.parametrize("keep", [top_p_keep, top_p_keep_by_sort], ids=["radix-cpu", "sort-gpu"])
@pytest.mark.parametrize("vocab", [3, 100, 4096, 50432])
def test_top_p_keeps_what_sorting_the_vocabulary_keeps(vocab, keep):
    # The radix select over probability bits (the CPU's way) and the sort a GPU takes, against a
    # plain sort, on flat, peaked, masked (top-k's -inf) and tied (rounded logits) rows, with
    # top_p from tiny to nearly 1.
    generator = torch.Generator().manual_seed(vocab)
    for scale in (0.05, 1.0, 4.0, 12.0):
        for shape in ("plain", "masked", "tied"):
            logits = torch.randn(16, vocab, generator=generator) * scale
            if shape == "masked":
                logits[:, 1::3] = float("-inf")
            if shape == "tied":
                logits = logits.round()
            top_p = torch.rand(16, generator=generator).clamp(min=1e-6)
            top_p[:3] = torch.tensor([1e-6, 0.5, 0.999999])
            probs = logits.softmax(dim=-1)
            kept = keep(probs, top_p)
            assert torch.equal(kept, top_p_by_sorting(probs, top_p)), (scale, shape)
            assert kept.any(dim=1).all()


def test_top_p_keeps_every_token_as_likely_as_the_last_one_kept():
    # probabilities [0.576, 0.212, 0.212, 0.078]: 0.7 is reached by the first two tokens, and the
    # third is as likely as the second, so it stays too (a sort keeps whichever of the two it put first).
    logits = torch.tensor([[2.0, 1.0, 1.0, 0.0], [1.0, 2.0, 0.0, 1.0]])
    kept = apply_top_p(logits.softmax(dim=-1), torch.tensor([0.7, 0.7]))
    assert (kept == 0).tolist() == [[False, False, False, True], [False, False, True, False]]


def test_a_draw_lands_on_tokens_of_nonzero_probability_at_either_end():
    probs = torch.tensor([[0.0, 0.5, 0.5, 0.0],
                          [0.0, 0.5, 0.5, 0.0],
                          [0.25, 0.0, 0.75, 0.0],
                          [0.0, 2.0, 0.0, 6.0]])  # unnormalised: the draw scales by the row's total
    uniforms = torch.tensor([0.0, 1.0 - 2.0**-53, 0.25, 0.5], dtype=torch.float64)  # 1 - 2**-53: the largest below 1
    assert draw(probs, uniforms).tolist() == [1, 2, 2, 3]


@pytest.mark.parametrize("head_dtype", [torch.float32, torch.bfloat16])
def test_a_top_k_row_draws_the_token_a_draw_over_the_whole_vocabulary_would(head_dtype):
    # Rows with top_k draw among the tokens top-k keeps only; seeded, each must land where the
    # long way (mask all but those, softmax over the vocabulary, top-p, draw) lands with the same
    # number. A bfloat16 head's logits tie often, so top-k keeps more than k tokens there.
    logits = (torch.randn(24, 50304, generator=torch.Generator().manual_seed(3)) * 4).to(head_dtype).float()
    params = [SamplingParams(temperature=0.7, top_k=k, top_p=p, seed=seed)
              for seed, (k, p) in enumerate([(1, 1.0), (5, 1.0), (50, 0.9), (50, 1.0), (400, 0.5), (400, 0.95)] * 4)]
    rows = [SamplingRow(p, [0], [], seeded_uniform(p.seed, 0)) for p in params]
    drawn = [s.token_id for s in sample(logits, rows)]
    tempered = logits / torch.full((24, 1), 0.7)
    masked = apply_top_k(tempered, torch.tensor([p.top_k for p in params]))
    probs = apply_top_p(masked.softmax(dim=-1), torch.tensor([p.top_p for p in params], dtype=torch.float64))
    uniforms = torch.tensor([seeded_uniform(p.seed, 0) for p in params], dtype=torch.float64)
    assert drawn == draw(probs, uniforms).tolist()


def test_a_row_of_nan_or_infinite_logits_gets_a_real_token_and_spoils_no_other_row():
    logits = torch.randn(4, 10, generator=torch.Generator().manual_seed(0))
    logits[0] = float("nan")  # e.g. a float16 head that overflowed
    logits[1] = float("-inf")
    logits[2, 3] = float("-inf")  # divided by a temperature that overflows float32: NaN
    seeded = SamplingParams(temperature=0.9, top_k=4, top_p=0.9, seed=5)
    params = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=1.0, top_p=0.5),
              SamplingParams(temperature=1e39, top_k=1), seeded]
    rows = [SamplingRow(p, [0], [], 0.3 * i) for i, p in enumerate(params)]
    drawn = [s.token_id for s in sample(logits, rows)]
    assert all(0 <= token < 10 for token in drawn), drawn
    alone = sample(logits[3:], [rows[3]])
    assert drawn[3] == alone[0].token_id


def test_a_degenerate_penalty_spoils_only_its_own_request(llm):
    # repetition_penalty 5e-324 (valid: > 0) divides a seen logit into inf, and the row's
    # probabilities into NaN; its draw once gave an id past the vocabulary, which failed the
    # next step for every request in it (found by tests/test_fuzz_http.py).
    normal = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    alone = llm.generate([PROMPT], normal)[0].outputs[0].token_ids
    odd = SamplingParams(max_tokens=8, temperature=0.7, repetition_penalty=5e-324, ignore_eos=True)
    together = llm.generate([PROMPT, "import os"], [normal, odd])
    assert together[0].outputs[0].token_ids == alone
    assert len(together[1].outputs[0].token_ids) == 8


@pytest.mark.parametrize("temperature", [0.0, 1e-5, 0.7, 1e39])
def test_a_tiny_repetition_penalty_favours_the_seen_tokens_rather_than_an_arbitrary_one(temperature):
    # 1e-38 divides a seen token's positive logit past float32: the seen tokens tie at the top,
    # as the penalty asks, where inf logits made the row NaN and its draw the vocabulary's last
    # token (an HTTP client got "nodesnodes..." with a 200).
    logits = torch.tensor([[0.1, -2.0, 1.0, 3.0, -1.0, 0.5, 2.5, 9.0, 0.0, 4.0]])
    seen = [2, 4, 5]  # 2 and 5 positive: the ones a tiny penalty favours; 4 negative: ~0
    drawn = {sample(logits, [SamplingRow(SamplingParams(temperature=temperature, repetition_penalty=1e-38),
                                         seen[:2], seen[2:], uniform)])[0].token_id
             for uniform in (0.01, 0.3, 0.6, 0.99)}
    if temperature < 1e39:
        assert drawn <= {2, 5} and (temperature < 1e-5 or drawn == {2, 5}), drawn
    else:  # all but flattened: any token, but a real one
        assert all(0 <= token < 10 for token in drawn)


def test_top_k_keeps_tokens_tied_with_the_kth():
    # top_k 2 over [3, 2, 2, 2, 0] keeps the three tied 2s as well: each is drawn about as often.
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 0.0]]).expand(3000, 5).contiguous()
    rows = with_uniforms(SamplingParams(temperature=1.0, top_k=2), len(logits))
    drawn = torch.tensor([s.token_id for s in sample(logits, rows)])
    counts = torch.bincount(drawn, minlength=5).tolist()
    assert counts[4] == 0 and min(counts[1:4]) > 400, counts  # each tie: e**2 / (e**3 + 3 e**2) = 0.17


def test_penalties_follow_their_definitions():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0]])
    params = SamplingParams(repetition_penalty=2.0)
    out = apply_penalties(logits.clone(), [SamplingRow(params, [0], [1])])
    assert out.tolist() == [[1.0, -4.0, 1.0, 0.5, 0.0]]  # seen tokens 0, 1: divide positive, multiply negative
    params = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits.clone(), [SamplingRow(params, [3], [2, 2, 4])])
    # output counts: token 2 twice, token 4 once; the prompt's token 3 is not penalised
    assert out.tolist() == [[2.0, -2.0, 1.0 - 0.5 - 0.5, 0.5, 0.0 - 0.5 - 0.25]]


def test_penalties_and_biases_land_on_their_own_rows_in_one_write():
    """All rows' penalties and biases go to the device as one index each: every (row, token) must
    get what the per-row definitions give, bit for bit."""
    logits = torch.randn(5, 40, generator=torch.Generator().manual_seed(2)) * 3
    rows = [
        SamplingRow(SamplingParams(repetition_penalty=1.5, logit_bias={3: 2.0, 39: -1.5}), [1, 2, 2], [5, 1]),
        SamplingRow(SamplingParams(), [1, 2], [3]),  # none: untouched
        SamplingRow(SamplingParams(presence_penalty=0.3, frequency_penalty=0.7), [9], [4, 4, 4, 6]),
        SamplingRow(SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5, frequency_penalty=0.1,
                                   logit_bias={4: 1.0}), [7, 8], [4, 8, 8]),
        SamplingRow(SamplingParams(logit_bias={0: -100.0}), [], []),
    ]
    expected = logits.clone()
    for i, row in enumerate(rows):  # the definitions, row by row
        params = row.params
        for token, bias in params.logit_bias.items():
            expected[i, token] += torch.tensor(bias)
        if params.repetition_penalty != 1.0:
            for token in set(row.prompt_ids) | set(row.output_ids):
                value = expected[i, token]
                penalty = params.repetition_penalty
                expected[i, token] = value / penalty if value > 0 else value * penalty
        for token in set(row.output_ids):
            expected[i, token] -= params.frequency_penalty * torch.tensor(float(row.output_ids.count(token)))
            expected[i, token] -= torch.tensor(params.presence_penalty)
    got = apply_penalties(apply_logit_bias(logits.clone(), rows), rows)
    assert torch.equal(got, expected)
    assert torch.equal(got[1], logits[1])


def test_sample_picks_the_first_best_token_and_leaves_the_logits_alone():
    # The engine passes a decode step's logits themselves (no copy): sampling must not write them.
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [3.0, 2.0, 3.0, -1.0]])
    before = logits.clone()
    greedy = SamplingRow(SamplingParams(temperature=0.0), [0], [])
    penalised = SamplingRow(SamplingParams(temperature=0.0, repetition_penalty=2.0, presence_penalty=1.0),
                            [0], [2], None)
    samples = sample(logits, [greedy, penalised])
    assert samples[0].token_id == 1  # a tie: the lowest token id, as argmax and transformers pick
    assert samples[1].token_id == 1  # penalties: 0 -> 1.5, 2 -> 0.5 (repetition, then presence)
    assert torch.equal(logits, before)


def test_a_vanishing_temperature_is_greedy():
    # logits / 1e-40 overflow float32 to inf, and a softmax over inf is NaN: such a row must
    # still get the most likely token, as temperature 0 gives.
    logits = torch.tensor([[1.0, 5.0, 3.0, -2.0]])
    row = SamplingRow(SamplingParams(temperature=1e-40, seed=0), [0], [], seeded_uniform(0, 0))
    assert [s.token_id for s in sample(logits, [row])] == [1]


def test_repetition_penalty_stops_repeats(llm):
    prompt = llm.tokenizer.encode("a a a a a a a a")
    _, plain = text_and_ids(llm, prompt, max_tokens=24, temperature=0.0, ignore_eos=True)
    _, penalised = text_and_ids(llm, prompt, max_tokens=24, temperature=0.0, ignore_eos=True,
                                repetition_penalty=1e6)
    assert len(set(plain)) < len(plain)  # the tiny model repeats itself without a penalty
    assert len(set(penalised)) == len(penalised) and not set(penalised) & set(prompt)


def test_stop_strings_are_cut_and_reported(llm):
    text, _ = text_and_ids(llm, PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True)
    stop = text[10:13]
    assert stop and text.find(stop) >= 10 - 2
    out = llm.generate([PROMPT], SamplingParams(max_tokens=40, temperature=0.0, stop=[stop, "never-there"],
                                                ignore_eos=True))[0].outputs[0]
    assert out.text == text[:text.find(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop


def test_streamed_text_never_shows_what_a_long_stop_string_takes_back(llm):
    # Streams build their text from what each step shows, and never take a piece back, so every
    # step's text must be a prefix of the final one, also while the text is still shorter than
    # the longest stop string.
    text, _ = text_and_ids(llm, PROMPT, max_tokens=40, temperature=0.0, ignore_eos=True)
    stop = text[2:26]
    assert len(stop) == 24 and text.find(stop) == 2
    engine = llm.engine
    request = engine.add_request(PROMPT, SamplingParams(max_tokens=40, temperature=0.0, stop=[stop],
                                                        ignore_eos=True))
    shown = []
    while not request.finished:
        shown += [out.outputs[0].text for out in engine.step() if out.request_id == request.request_id]
    assert shown[-1] == text[:2] and len(shown) > 3
    assert all(text[:2].startswith(piece) for piece in shown), shown


def test_stop_token_ids_and_eos(llm):
    _, ids = text_and_ids(llm, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True)
    stop_token = ids[5]
    first = ids.index(stop_token)
    out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.0, stop_token_ids=[stop_token],
                                                ignore_eos=True))[0].outputs[0]
    assert out.token_ids == ids[:first + 1] and out.finish_reason == "stop" and out.stop_reason == stop_token
    # The stop token is in token_ids but not in the text, as in vLLM.
    before_stop = llm.tokenizer.decode(ids[:first])
    assert llm.tokenizer.decode(ids[:first + 1]) != before_stop and out.text == before_stop
    engine = llm.engine
    original = engine.model_config
    engine.model_config = dataclasses.replace(original, eos_token_id=stop_token)
    try:
        eos_out = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.0,
                                                        skip_special_tokens=False))[0].outputs[0]
        ignored = llm.generate([PROMPT], SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True))[0].outputs[0]
    finally:
        engine.model_config = original
    assert eos_out.token_ids == ids[:first + 1] and eos_out.finish_reason == "stop" and eos_out.text == before_stop
    assert ignored.token_ids == ids and ignored.finish_reason == "length"


def test_every_eos_id_a_config_names_ends_generation(llm, neox_checkpoint, tmp_path):
    # Chat fine-tunes list several end tokens (`"eos_token_id": [0, 50277]`); transformers stops
    # at any of them, and so must the engine, not only at the first.
    import json
    import shutil

    _, ids = text_and_ids(llm, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True)
    end = ids[5]
    checkpoint = tmp_path / "several-eos"
    shutil.copytree(neox_checkpoint, checkpoint)
    config = json.loads((checkpoint / "config.json").read_text())
    first_eos = config["eos_token_id"] if isinstance(config["eos_token_id"], int) else config["eos_token_id"][0]
    assert end != first_eos
    config["eos_token_id"] = [first_eos, end]
    (checkpoint / "config.json").write_text(json.dumps(config))
    out = LLM(str(checkpoint), dtype="float32").generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=0.0))[0].outputs[0]
    assert out.token_ids == ids[:ids.index(end) + 1] and out.finish_reason == "stop"


def test_logprobs_of_generated_tokens_match_transformers(llm, neox_checkpoint):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(neox_checkpoint, dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode(PROMPT)
    out = llm.generate([prompt], SamplingParams(max_tokens=12, temperature=0.0, logprobs=3, ignore_eos=True))[0]
    completion = out.outputs[0]
    with torch.no_grad():
        logits = ref(torch.tensor([prompt + completion.token_ids])).logits[0].float()
    expected = torch.log_softmax(logits, dim=-1)
    for step, (token, entry) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = expected[len(prompt) - 1 + step]
        top3 = torch.topk(row, 3).indices.tolist()
        assert set(entry) == set(top3) | {token}
        for candidate, value in entry.items():
            assert abs(value - float(row[candidate])) < 1e-4
    assert abs(completion.cumulative_logprob - sum(e[t] for e, t in zip(completion.logprobs, completion.token_ids))) < 1e-4


def test_logit_bias_moves_picks_as_the_bias_added_to_transformers_logits(llm, neox_checkpoint):
    """OpenAI's logit_bias: added to the logits before the pick; the logprobs stay the model's."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(neox_checkpoint, dtype=torch.float32).eval()
    prompt = llm.tokenizer.encode(PROMPT)
    _, plain = text_and_ids(llm, prompt, max_tokens=6, temperature=0, ignore_eos=True)
    bias = {plain[0]: -100.0, plain[2]: 4.0}  # ban the first greedy pick, favour another
    # Without logprobs a greedy step may skip the logits (the last stage picks): not with a bias.
    picked, out = (llm.generate([prompt], SamplingParams(max_tokens=6, temperature=0, ignore_eos=True,
                                                         logprobs=logprobs, logit_bias=bias))[0].outputs[0]
                   for logprobs in (None, 0))
    ids, expected = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            logits = ref(torch.tensor([ids])).logits[0, -1].float()
            raw = torch.log_softmax(logits, dim=-1)
            for token, value in bias.items():
                logits[token] += value
            expected.append(int(logits.argmax()))
            assert abs(out.logprobs[len(expected) - 1][expected[-1]] - float(raw[expected[-1]])) < 1e-4
            ids.append(expected[-1])
    assert picked.token_ids == out.token_ids == expected and expected[0] != plain[0]
    # +100 all but forces a token, also when sampling; the bias belongs to its request alone.
    forced, free = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=4, temperature=1.0, seed=3, logit_bias={42: 100}),
        SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)])
    assert forced.outputs[0].token_ids == [42] * 4 and free.outputs[0].token_ids == plain[:4]
    with pytest.raises(InvalidRequestError) as outside:
        llm.generate([prompt], SamplingParams(logit_bias={llm.engine.model_config.vocab_size: 1.0}))
    assert outside.value.field == "logit_bias" and "outside the vocabulary" in str(outside.value)
    with pytest.raises(InvalidRequestError) as never_stops:
        llm.generate([prompt], SamplingParams(stop_token_ids=[llm.engine.model_config.vocab_size]))
    assert never_stops.value.field == "stop_token_ids" and "outside the vocabulary" in str(never_stops.value)


def test_logit_bias_comes_before_the_repetition_penalty():
    """As vLLM and transformers order them: the bias, then the penalty on the biased logit."""
    logits = torch.tensor([[2.0, 6.0, 0.0]])
    row = SamplingRow(SamplingParams(temperature=0, repetition_penalty=1.3, logit_bias={0: 5.0}), [0], [])
    # (2 + 5) / 1.3 = 5.38 < 6: token 1 (penalty first: 2 / 1.3 + 5 = 6.54 would pick token 0).
    assert sample(logits, [row])[0].token_id == 1


def test_prompt_scoring_without_generation(llm):
    prompt = llm.tokenizer.encode("import os\nimport sys\n")
    out = llm.generate([prompt], SamplingParams(max_tokens=0, prompt_logprobs=2))[0]
    assert out.outputs[0].token_ids == [] and out.outputs[0].finish_reason == "length"
    assert len(out.prompt_logprobs) == len(prompt) and out.prompt_logprobs[0] is None
    assert all(prompt[i] in out.prompt_logprobs[i] and len(out.prompt_logprobs[i]) <= 3 for i in range(1, len(prompt)))
    assert not llm.engine.has_unfinished_requests()


@pytest.mark.parametrize("kwargs,field", [
    (dict(temperature=-0.1), "temperature"), (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(max_tokens=-1), "max_tokens"), (dict(n=0), "n"), (dict(n=1000), "n"), (dict(top_k=-5), "top_k"),
    (dict(logprobs=100), "logprobs"), (dict(presence_penalty=3.0), "presence_penalty"),
    (dict(temperature="hot"), "temperature"), (dict(stop=[""]), "stop"),
    (dict(logit_bias={5: 100.5}), "logit_bias"), (dict(logit_bias={-1: 1.0}), "logit_bias"),
    (dict(logit_bias={"5": 1.0}), "logit_bias"), (dict(logit_bias={5: float("nan")}), "logit_bias"),
    (dict(logit_bias=[5]), "logit_bias"), (dict(logit_bias=dict.fromkeys(range(1025), 1.0)), "logit_bias"),
])
def test_invalid_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(InvalidRequestError) as info:
        SamplingParams(**kwargs)
    assert info.value.field == field and field in str(info.value)


def test_end_tokens_of_generation_config_also_end_generation(llm, neox_checkpoint, tmp_path):
    # transformers' `generate` reads its end tokens from generation_config.json, and a fine-tune
    # may name its chat end token only there: the engine stops at those too (as vLLM does).
    import json
    import shutil

    _, ids = text_and_ids(llm, PROMPT, max_tokens=20, temperature=0.0, ignore_eos=True)
    end = ids[4]
    checkpoint = tmp_path / "generation-eos"
    shutil.copytree(neox_checkpoint, checkpoint)
    first_eos = json.loads((checkpoint / "config.json").read_text())["eos_token_id"]
    assert end != first_eos
    (checkpoint / "generation_config.json").write_text(json.dumps({"eos_token_id": [first_eos, end]}))
    out = LLM(str(checkpoint), dtype="float32").generate(
        [PROMPT], SamplingParams(max_tokens=20, temperature=0.0))[0].outputs[0]
    assert out.token_ids == ids[:ids.index(end) + 1] and out.finish_reason == "stop"


def test_a_stop_string_in_the_text_released_at_the_finish_is_cut(tmp_path):
    """A token can end in the first byte of a character ("na" + the first byte of "é"): the
    detokenizer holds its text back until the character completes. When the sequence ends first,
    that text comes out at the finish, and a stop string in it must still end the text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from checkpoints import SPECIAL, make_neox
    from neo_serve.engine.config import EngineConfig
    from neo_serve.engine.llm_engine import LLMEngine
    from test_scheduler_stress import step_output

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {symbol: index for index, symbol in enumerate(alphabet)}
    vocab.update({"na": len(vocab), "naÃ": len(vocab) + 1})  # Ã: byte 0xC3, the first of "é"
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[("n", "a"), ("na", "Ã")]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([SPECIAL])
    assert tokenizer.encode("naé").tokens == ["naÃ", "©"]
    checkpoint = make_neox(tmp_path / "ck", tokenizer)
    # "hi " + "na" and half a character, then "!"
    script = [vocab["h"], vocab["i"], vocab["Ġ"], vocab["naÃ"], vocab["!"]]

    class Scripted:
        """Answers every sampling row with the script's next token."""

        def __init__(self) -> None:
            self.emitted = 0

        def execute(self, step):
            tokens = []
            for _ in step.logits_indices.tolist():
                tokens.append(script[self.emitted])
                self.emitted += 1
            return step_output(step, tokens, tokenizer.get_vocab_size())

    # The sequence ends at max_tokens right after that token, or at a stop token after it.
    for max_tokens, stop_token_ids in [(4, []), (5, [vocab["!"]])]:
        engine = LLMEngine(EngineConfig(model=str(checkpoint), device="cpu", kv_cache_tokens=1024),
                           executor=Scripted())
        engine.add_request([vocab["x"]], SamplingParams(max_tokens=max_tokens, temperature=0.0, stop=["na"],
                                                        stop_token_ids=stop_token_ids, ignore_eos=True),
                           request_id="r")
        outputs = []
        while engine.has_unfinished_requests():
            outputs += engine.step()
        [out] = outputs[-1].outputs
        assert (out.text, out.finish_reason, out.stop_reason) == ("hi ", "stop", "na"), out
        assert out.token_ids == script[:max_tokens]


@pytest.mark.parametrize("params, expected", [
    # softmax(logits / T) for logits [2, 1, 0, -1]
    (dict(temperature=0.5), [0.8650, 0.1171, 0.0158, 0.0021]),
    (dict(temperature=1.0), [0.6439, 0.2369, 0.0871, 0.0321]),
    (dict(temperature=2.0), [0.4551, 0.2760, 0.1674, 0.1015]),
    # top-k and top-p cut first, then the rest is renormalised
    (dict(temperature=1.0, top_k=2), [0.7311, 0.2689, 0.0, 0.0]),
    (dict(temperature=1.0, top_p=0.85), [0.7311, 0.2689, 0.0, 0.0]),
])
def test_draws_follow_the_tempered_distribution(params, expected):
    # 8000 draws (one per row, seeded): each token's frequency within 0.02 of its probability
    # (4 standard deviations at most); temperature 1 and 0.5 differ by 0.22 on the first token.
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]]).expand(8000, 4).contiguous()
    rows = with_uniforms(SamplingParams(**params), len(logits))
    drawn = torch.tensor([s.token_id for s in sample(logits, rows)])
    frequencies = torch.bincount(drawn, minlength=4).float() / len(drawn)
    assert torch.allclose(frequencies, torch.tensor(expected), atol=0.02), frequencies.tolist()


def test_a_step_scores_every_prompt_with_its_own_count_of_top_tokens():
    """The last stage scores all of a step's prompt positions in one pass (beside a sampled row
    between them): each position gets its target's logprob and its request's number of top
    tokens, as a log-softmax of its own row gives them."""
    from neo_serve.engine.step_result import PromptScoring, SamplingPlan, step_result

    logits = (torch.randn(7, 30, generator=torch.Generator().manual_seed(4)) * 2).to(torch.bfloat16)
    plan = SamplingPlan(sample_rows=[3], rows=[SamplingRow(SamplingParams(temperature=0.0, logprobs=1), [], [])],
                        prompt_scoring=[PromptScoring(0, [5, 6, 7], 0), PromptScoring(4, [1, 2, 3], 2)])
    result = step_result(logits, plan)
    reference = torch.log_softmax(logits.float(), dim=-1)
    for scoring, scored in zip(plan.prompt_scoring, result.prompt_logprobs):
        assert len(scored) == len(scoring.targets)
        for offset, (target, entry) in enumerate(zip(scoring.targets, scored)):
            row = reference[scoring.first_row + offset]
            top = row.topk(scoring.top).indices.tolist() if scoring.top else []
            assert entry == {token: float(row[token]) for token in [target] + top}
    [picked] = result.samples
    assert picked.token_id == int(logits[3].float().argmax()) and picked.logprob == float(reference[3, picked.token_id])


def test_a_rows_top_logprobs_do_not_depend_on_what_other_rows_ask_for():
    # A bfloat16 head's logits tie often; a topk of 20 cut to 2 may order tied tokens otherwise
    # than a topk of 2, so a request's alternatives changed with a neighbour asking for 20.
    logits = (torch.randn(64, 512, generator=torch.Generator().manual_seed(0)) * 4).to(torch.bfloat16).float()
    logprobs = torch.log_softmax(logits, dim=-1)
    alone = score_rows(logprobs, [0] * 64, [2] * 64)
    beside = score_rows(torch.cat([logprobs, logprobs[:1]]), [0] * 65, [2] * 64 + [20])
    assert beside[:64] == alone
    assert len(beside[64]) == 21  # token 0 (chosen) and the 20 most likely, of which it is not one
