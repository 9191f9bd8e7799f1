"""Sampling: a handful of pure functions over float32 logits [rows, vocab].

Order (as in vLLM and transformers): logit bias -> penalties -> greedy argmax, or temperature ->
top-k -> top-p -> draw.
Draws use the exponential race (argmax of p / E with E ~ Exp(1)), with each seeded sequence's
own generator, so a seeded request gives the same tokens whatever else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neo_serve.engine.outputs import LogprobDict
from neo_serve.engine.sampling_params import SamplingParams


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    prompt_ids: list[int]
    output_ids: list[int]
    generator: torch.Generator | None


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float  # of the sampled token under the model's distribution
    top_logprobs: LogprobDict | None  # sampled token + the `logprobs` most likely, when asked


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (over prompt and output, Hugging Face's rule), presence and frequency (over
    the output, OpenAI's rule) penalties, in place on the rows that ask for them."""
    vocab = logits.shape[-1]
    for i, row in enumerate(rows):
        params = row.params
        if not params.has_penalties:
            continue
        if params.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(row.prompt_ids) | set(row.output_ids)), dtype=torch.long)
            seen = seen[seen < vocab]
            values = logits[i, seen]
            logits[i, seen] = torch.where(values > 0, values / params.repetition_penalty,
                                          values * params.repetition_penalty)
        if row.output_ids and (params.presence_penalty or params.frequency_penalty):
            counts = torch.bincount(torch.tensor(row.output_ids, dtype=torch.long), minlength=vocab)[:vocab]
            logits[i] -= params.frequency_penalty * counts.to(logits.dtype)
            logits[i] -= params.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its logits, in place."""
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            ids = torch.tensor(list(bias), dtype=torch.long)
            logits[i, ids] += torch.tensor(list(bias.values()), dtype=logits.dtype)
    return logits


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (0 = keep all)."""
    vocab = logits.shape[-1]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k >= vocab).all()):
        return logits
    top_values = torch.topk(logits, int(k.max()), dim=-1).values  # [rows, k_max], descending
    threshold = top_values.gather(1, (k - 1).unsqueeze(1))  # [rows, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


def apply_top_p(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability reaches top_p[i]."""
    if bool((top_p >= 1.0).all()):
        return logits
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of strictly more likely tokens
    drop_sorted = mass_before >= top_p.unsqueeze(1)
    # A row with top_p 1 keeps everything, even beside rows that cut: the float32 cumsum of its
    # probabilities can reach 1.0 before the last tokens, which would drop them (and make a
    # seeded request's tokens depend on its batch).
    drop_sorted &= (top_p < 1.0).unsqueeze(1)
    drop_sorted[:, 0] = False  # always keep the most likely token
    drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def exponential_noise(shape: tuple[int, int], rows: list[SamplingRow], default: torch.Generator) -> torch.Tensor:
    noise = torch.empty(shape)
    unseeded = [i for i, row in enumerate(rows) if row.generator is None]
    if unseeded:
        noise[unseeded] = torch.empty(len(unseeded), shape[1]).exponential_(generator=default)
    for i, row in enumerate(rows):
        if row.generator is not None:
            noise[i].exponential_(generator=row.generator)
    return noise


def top_logprobs(logprobs: torch.Tensor, chosen: int, count: int) -> LogprobDict:
    """{chosen: lp, and the `count` most likely tokens: lp} for one row."""
    result = {chosen: float(logprobs[chosen])}
    if count:
        values, ids = torch.topk(logprobs, count)
        for value, token in zip(values.tolist(), ids.tolist()):
            result.setdefault(token, value)
    return result


def sample(logits: torch.Tensor, rows: list[SamplingRow], default_generator: torch.Generator) -> list[Sample]:
    """logits: float32 [rows, vocab] (left as they are: it may be the step's own output); one
    Sample per row.

    Log-probabilities (a softmax over the whole vocabulary) are computed only for the rows
    that asked for them; the others get logprob NaN."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None  # [len(wanted), vocab]
    if any(row.params.changes_logits for row in rows):
        # Both write in place: on a copy.
        logits = apply_penalties(apply_logit_bias(logits.clone(), rows), rows)
    # max(dim) gives the first maximal index like argmax, in ~60% of argmax's time on CPU.
    tokens = logits.max(dim=-1).indices
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        chosen = [rows[i] for i in random_rows]
        x = logits[random_rows] / torch.tensor([r.params.temperature for r in chosen]).unsqueeze(1)
        x = apply_top_k(x, torch.tensor([r.params.top_k for r in chosen]))
        x = apply_top_p(x, torch.tensor([r.params.top_p for r in chosen], dtype=torch.float32))
        probs = x.softmax(dim=-1)
        noise = exponential_noise(tuple(probs.shape), chosen, default_generator)
        tokens[random_rows] = (probs / noise).max(dim=-1).indices
    token_list = tokens.tolist()
    samples = [Sample(token, float("nan"), None) for token in token_list]
    for slot, i in enumerate(wanted):
        top = top_logprobs(raw_logprobs[slot], token_list[i], rows[i].params.logprobs)
        samples[i] = Sample(token_list[i], top[token_list[i]], top)
    return samples
