"""Sampling: a handful of pure functions over float32 logits [rows, vocab].

Order (as in vLLM and transformers): logit bias -> penalties -> greedy argmax, or temperature ->
top-k -> top-p -> draw.
A draw takes one uniform number per row (`SamplingRow.uniform`; a seeded sequence's is a
function of its seed and the token's position, so a seeded request gives the same tokens
whatever else is in the batch) through the inverse of the row's cumulative distribution. On a
CPU, top-p finds each row's probability threshold by a radix select over the probabilities' bits
instead of sorting the vocabulary (on a GPU it sorts), and a row with top_k works on its k most
likely tokens alone: on a 2-core CPU, sorting 32 rows of 50k tokens and drawing one exponential
per token took ~100 ms, as long as the decode step of a 160M model (docs/benchmarks.md,
"Sampling: sampled requests").

These functions run where the logits are: on the last stage's device (see step_result.py), so
every tensor they make goes to `logits.device`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch

from neo_serve.engine.outputs import LogprobDict
from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.models.attention import host_to_device


@dataclass(frozen=True)
class SamplingRow:
    """What the sampler needs of one sequence."""

    params: SamplingParams
    # The tokens the penalties look at (empty when the row has none: they travel to the last stage
    # with every step): repetition over prompt and output, presence and frequency over the output.
    prompt_ids: list[int]
    output_ids: list[int]
    uniform: float = 0.0  # in [0, 1): where the row's draw falls (unused by a greedy row)


@dataclass(frozen=True)
class Sample:
    token_id: int
    logprob: float  # of the sampled token under the model's distribution
    top_logprobs: LogprobDict | None  # sampled token + the `logprobs` most likely, when asked


def seeded_uniform(seed: int, position: int) -> float:
    """The uniform number in [0, 1) of a seeded sequence's token at `position` (0 = its first
    generated token): splitmix64's finalizer over the seed's own mix plus the position, 53 bits.
    A function of the two alone, not a generator's state, so the same seed gives the same tokens
    alone or batched, wherever the step runs, and after a step lost to preemption or to a stage
    failure is computed again."""
    key = _mix64(seed & _MASK64)
    return (_mix64((key + (position + 1) * _GOLDEN) & _MASK64) >> 11) * 2.0 ** -53


def choice_seed(seed: int, index: int) -> int:
    """The seed of a request's sequence `index` (its n choices): the request's own for the first,
    a mix of both for the others. With `seed + index` (vLLM v1's rule) choice 1 of seed s would be
    choice 0 of seed s + 1: a study over seeds 0..9 with n = 4 would get 13 distinct samples."""
    return seed if index == 0 else _mix64((seed & _MASK64) ^ _mix64((index * _GOLDEN) & _MASK64))


_MASK64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15
# Where a repetition penalty's quotient is cut: a tiny penalty (1e-38 is > 0, so valid) divides
# a seen token's logit past float32's range, and inf logits make the row's probabilities NaN,
# whose draw is an arbitrary token. No model's logit comes near 1e30, and the smallest
# temperature that samples (1e-5) keeps 1e30 finite: the seen tokens tie at the top instead.
PENALISED_LOGIT_LIMIT = 1e30


def _mix64(value: int) -> int:
    value = ((value ^ (value >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    value = ((value ^ (value >> 27)) * 0x94D049BB133111EB) & _MASK64
    return value ^ (value >> 31)


def apply_penalties(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Repetition (over prompt and output, Hugging Face's rule), presence and frequency (over
    the output, OpenAI's rule) penalties, in place on the rows that ask for them.

    The (row, token) pairs they touch are listed on the host and sent to the logits' device in
    one copy each, and applied with one indexed write per penalty: per row, a GPU would wait for
    each copy, and a count over the whole vocabulary per row costs [rows, vocab] temporaries."""
    vocab = logits.shape[-1]
    seen: list[set[int]] = []  # repetition: each row's distinct prompt and output tokens
    seen_rows: list[int] = []
    seen_penalty: list[float] = []
    counted_rows: list[int] = []  # presence and frequency: each row's distinct output tokens
    counted_ids: list[int] = []
    counts: list[int] = []
    frequency: list[float] = []
    presence: list[float] = []
    for i, row in enumerate(rows):
        params = row.params
        if not params.has_penalties:
            continue
        if params.repetition_penalty != 1.0:
            tokens = set(row.prompt_ids)
            tokens.update(row.output_ids)
            seen.append(tokens)
            seen_rows.append(i)
            seen_penalty.append(params.repetition_penalty)
        if row.output_ids and (params.presence_penalty or params.frequency_penalty):
            for token, count in Counter(token for token in row.output_ids if token < vocab).items():
                counted_rows.append(i)
                counted_ids.append(token)
                counts.append(count)
                frequency.append(params.frequency_penalty)
                presence.append(params.presence_penalty)
    if seen:
        # Flat (row, token) pairs built by torch, not Python lists: ~2x faster for 64 rows of
        # 300 tokens. Tokens past the vocabulary (none from a valid prompt) are left out.
        sizes = torch.tensor([len(tokens) for tokens in seen])
        seen_ids = torch.tensor([token for tokens in seen for token in tokens], dtype=torch.long)
        row_of = torch.repeat_interleave(torch.tensor(seen_rows), sizes)
        penalty = torch.repeat_interleave(torch.tensor(seen_penalty, dtype=logits.dtype), sizes)
        inside = seen_ids < vocab
        where = _device_index(torch.stack([row_of[inside], seen_ids[inside]]), logits.device)
        penalty = host_to_device(penalty[inside], logits.device)
        values = logits[where]
        penalised = torch.where(values > 0, values / penalty, values * penalty)
        logits[where] = penalised.clamp_(-PENALISED_LOGIT_LIMIT, PENALISED_LOGIT_LIMIT)
    if counted_ids:
        where = _device_index(torch.tensor([counted_rows, counted_ids]), logits.device)
        # Two subtractions, as `logit - frequency * count - presence` rounds in float32.
        scaled = torch.tensor(frequency, dtype=logits.dtype) * torch.tensor(counts, dtype=logits.dtype)
        logits.index_put_(where, host_to_device(scaled.neg_(), logits.device), accumulate=True)
        logits.index_put_(where, _device_values(presence, logits).neg_(), accumulate=True)
    return logits


def apply_logit_bias(logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its logits, in place (one indexed write for every row)."""
    biased_rows: list[int] = []
    biased_ids: list[int] = []
    biases: list[float] = []
    for i, row in enumerate(rows):
        bias = row.params.logit_bias
        if bias:
            biased_rows += [i] * len(bias)
            biased_ids += list(bias)
            biases += list(bias.values())
    if biased_ids:
        logits.index_put_(_device_index(torch.tensor([biased_rows, biased_ids]), logits.device),
                          _device_values(biases, logits), accumulate=True)
    return logits


def _device_index(pairs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) pairs, int64 [2, n] on the host, as an index into [rows, vocab] on `device`,
    in one copy."""
    on_device = host_to_device(pairs, device)
    return on_device[0], on_device[1]


def _device_values(values: list[float], like: torch.Tensor) -> torch.Tensor:
    return host_to_device(torch.tensor(values, dtype=like.dtype), like.device)


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's top_k[i] largest logits (0 = keep all)."""
    vocab = logits.shape[-1]
    top_k = top_k.to(logits.device)
    k = torch.where(top_k > 0, top_k.clamp(max=vocab), torch.full_like(top_k, vocab))
    if bool((k >= vocab).all()):
        return logits
    top_values = torch.topk(logits, int(k.max()), dim=-1).values  # [rows, k_max], descending
    threshold = top_values.gather(1, (k - 1).unsqueeze(1))  # [rows, 1]
    return logits.masked_fill(logits < threshold, float("-inf"))


# Radix select (see top_p_keep): a float32 >= 0 orders as its int32 bit pattern, and every
# probability in [0, 1] has a pattern below 2**30. The first pass buckets the tokens by their top
# 12 bits (7 of the exponent, 5 of the mantissa: buckets at most 3% wide), the next two by 9 each.
_FIRST_BITS = 12
_LATER_BITS = (9, 9)
_PATTERN_BITS = 30


def top_p_keep(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """bool [rows, vocab]: the tokens top-p keeps, from probabilities [rows, vocab] (each row
    summing to about 1) and top_p [rows] in (0, 1]: every token at least as likely as the
    threshold t, the largest value for which the tokens of probability >= t hold top_p of the
    mass. That is the sorted rule (keep the most likely tokens until their mass reaches top_p),
    except that a token as likely as the last one kept is kept too, whatever order a sort would
    have put them in.

    Instead of a sort (O(vocab log vocab) a row), three passes of a histogram of probability
    mass by bit pattern: the first over every token, the next two over the tokens left in each
    row's chosen bucket. Masses are summed in float64. On a GPU, a sort (`top_p_keep_by_sort`):
    fast there, and the same from run to run, where the histograms' float64 atomics add up in
    whatever order the threads run, so that a top_p at a bucket's edge could cut differently
    from one run of the same batch to the next. (A scan's rounding may still differ with the
    number of rows, as the model's own logits may: docs/serving.md.)"""
    if probs.is_cuda:
        return top_p_keep_by_sort(probs, top_p)
    probs = probs.float().contiguous()
    rows = probs.shape[0]
    patterns = probs.view(torch.int32)  # [rows, vocab], ordered as the probabilities
    target = top_p.to(device=probs.device, dtype=torch.float64).unsqueeze(1)  # [rows, 1]

    shift = _PATTERN_BITS - _FIRST_BITS
    buckets = (patterns >> shift).clamp_(0, (1 << _FIRST_BITS) - 1).long()  # [rows, vocab]
    mass = torch.zeros(rows, 1 << _FIRST_BITS, dtype=torch.float64, device=probs.device)
    mass.scatter_add_(1, buckets, probs.double())
    chosen, above = _bucket_reaching(mass, torch.zeros_like(target), target)
    threshold = chosen.squeeze(1)  # [rows] the chosen bucket's top bits so far

    # The tokens in each row's chosen bucket, as flat lists: usually a small share of the vocab.
    row_of, column = (buckets == chosen).nonzero(as_tuple=True)
    candidate = patterns[row_of, column].long()
    candidate_mass = probs[row_of, column].double()
    for bits in _LATER_BITS:
        shift -= bits
        inside = (candidate >> (shift + bits)) == threshold[row_of]  # still in the chosen bucket
        sub_bucket = (candidate >> shift) & ((1 << bits) - 1)
        mass = torch.zeros(rows << bits, dtype=torch.float64, device=probs.device)
        mass.index_add_(0, (row_of << bits) + sub_bucket, torch.where(inside, candidate_mass, 0.0))
        chosen, above = _bucket_reaching(mass.view(rows, 1 << bits), above, target)
        threshold = (threshold << bits) | chosen.squeeze(1)
    return patterns >= threshold.to(torch.int32).unsqueeze(1)


def top_p_keep_by_sort(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """`top_p_keep`'s rule by a sort: the most likely tokens until the mass before the next one
    (summed in float64, in order) reaches top_p, and every token as likely as the last kept."""
    probs = probs.float()
    ordered = probs.sort(dim=-1, descending=True).values  # [rows, vocab]
    running = ordered.double().cumsum(dim=-1)
    mass_before = torch.cat([torch.zeros_like(running[:, :1]), running[:, :-1]], dim=1)  # [rows, vocab]
    target = top_p.to(device=probs.device, dtype=torch.float64).unsqueeze(1)
    count = (mass_before < target).sum(dim=1, keepdim=True).clamp_(min=1)  # tokens kept before ties
    return probs >= ordered.gather(1, count - 1)


def _bucket_reaching(mass: torch.Tensor, above: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mass [rows, buckets] (float64, in increasing order of probability), `above` [rows, 1] the
    mass of the tokens above all of them, target [rows, 1]: each row's highest bucket where the
    mass from it up reaches target (the lowest if none does) [rows, 1], and the mass above it."""
    from_here_up = mass.flip(1).cumsum(1).flip(1) + above  # [rows, buckets]
    chosen = ((from_here_up >= target).sum(1, keepdim=True) - 1).clamp_(min=0)
    return chosen, from_here_up.gather(1, chosen) - mass.gather(1, chosen)


def draw(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """int64 [rows]: each row's token at its uniform number [rows] on the row's cumulative
    distribution; probs [rows, vocab] >= 0, any scale (a dropped token is 0, never drawn)."""
    cumulative = probs.cumsum(dim=-1, dtype=torch.float64)  # [rows, vocab]
    # u < 1 makes u * total < total in float64, so some position's running sum lies past the
    # point; the first such is a token of non-zero probability (a zero adds nothing to the sum).
    point = uniforms.to(probs.device).unsqueeze(1) * cumulative[:, -1:]  # [rows, 1]
    # A row with NaN (NaN logits, or an overflowing temperature over -inf ones) has no such
    # position; it gets the last token rather than an id past the vocabulary.
    return torch.searchsorted(cumulative, point, right=True).squeeze(1).clamp_(max=probs.shape[-1] - 1)


def score_rows(logprobs: torch.Tensor, chosen: list[int], counts: list[int]) -> list[LogprobDict]:
    """Per row of logprobs [rows, vocab]: {chosen[i]: its logprob, and the counts[i] most likely
    tokens: theirs}. A few transfers to the host for all rows, not two per row (on a GPU, each
    waits for the device): one for the chosen tokens, one per distinct count. Rows of one count
    take one topk of that count: a row's alternatives must not depend on what other rows ask
    for (a wider topk cut short may order tied tokens otherwise, and a bfloat16 head ties often)."""
    index = host_to_device(torch.tensor(chosen, dtype=torch.long), logprobs.device)
    chosen_logprobs = logprobs.gather(1, index.unsqueeze(1)).squeeze(1).tolist()
    top_values: list[list[float]] = [[] for _ in chosen]
    top_ids: list[list[int]] = [[] for _ in chosen]
    by_count: dict[int, list[int]] = {}
    for i, count in enumerate(counts):
        if count:
            by_count.setdefault(min(count, logprobs.shape[-1]), []).append(i)
    for count, members in by_count.items():
        values, ids = select_rows(logprobs, members).topk(count, dim=-1)  # [members, count], most likely first
        for i, row_values, row_ids in zip(members, values.tolist(), ids.tolist()):
            top_values[i], top_ids[i] = row_values, row_ids
    result = []
    for i, token in enumerate(chosen):
        entry = {token: chosen_logprobs[i]}
        for value, other in zip(top_values[i], top_ids[i]):
            entry.setdefault(other, value)
        result.append(entry)
    return result


def select_rows(tensor: torch.Tensor, indices: list[int]) -> torch.Tensor:
    """tensor[indices], for reading: consecutive rows in order (all of a decode step's, or
    scored prompts that generate nothing) are a view, not a copy."""
    if indices and indices == list(range(indices[0], indices[-1] + 1)):
        return tensor[indices[0]:indices[-1] + 1]
    return tensor[indices]


def _draw_tempered(tempered: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
    """int64 [rows]: a token per row of tempered logits [rows, vocab], after its top-k and top-p.

    A row with top_k draws among the tokens top-k keeps alone (its k most likely and any tied
    with the k-th: [rows, k] instead of [rows, vocab]; the playground's top_k 50 made the
    vocabulary-wide work most of a step), in token-id order, so that up to float rounding it
    lands on the token a draw over the whole vocabulary would. Which way a row goes, and the
    width it is drawn over, depend on its own parameters and logits only, never on the rest of
    the batch."""
    vocab = tempered.shape[-1]
    uniforms = torch.tensor([row.uniform for row in rows], dtype=torch.float64)  # [rows]
    top_p = torch.tensor([r.params.top_p for r in rows], dtype=torch.float64)
    tokens = torch.empty(len(rows), dtype=torch.long, device=tempered.device)
    whole_vocab: list[int] = []
    by_top_k: dict[int, list[int]] = {}
    for i, row in enumerate(rows):
        k = row.params.top_k
        if 0 < k < vocab:
            by_top_k.setdefault(k, []).append(i)
        else:
            whole_vocab.append(i)
    for k, group in by_top_k.items():
        logits = select_rows(tempered, group)
        values, token_ids = logits.topk(k, dim=-1)  # [group, k], most likely first
        # How many tokens top-k keeps: k, or more when tokens tie with the k-th (common with a
        # bfloat16 head). Fewer means NaN logits: those rows go the vocabulary-wide way.
        kept = (logits >= values[:, -1:]).sum(dim=-1).tolist()
        by_width: dict[int, list[int]] = {}
        for j, width in enumerate(kept):
            if width < k:
                whole_vocab.append(group[j])
            else:
                by_width.setdefault(width, []).append(j)
        for width, positions in by_width.items():
            if width == k:
                width_values, width_ids = select_rows(values, positions), select_rows(token_ids, positions)
            else:
                width_values, width_ids = select_rows(logits, positions).topk(width, dim=-1)
            width_ids, order = width_ids.sort(dim=-1)  # token-id order, as in the whole vocab
            probs = width_values.gather(1, order).softmax(dim=-1)  # [positions, width]
            members = [group[j] for j in positions]
            picked = draw(apply_top_p(probs, top_p[members]), uniforms[members])  # positions among the width
            tokens[members] = width_ids.gather(1, picked.unsqueeze(1)).squeeze(1)
    if whole_vocab:
        members = sorted(whole_vocab)
        logits = apply_top_k(select_rows(tempered, members), torch.tensor([rows[i].params.top_k for i in members]))
        tokens[members] = draw(apply_top_p(logits.softmax(dim=-1), top_p[members]), uniforms[members])
    return tokens


def apply_top_p(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """probs [rows, n] (changed in place) with the tokens top-p drops set to 0 (see top_p_keep).
    A row with top_p 1 keeps every token, even beside rows that cut: the sum of its float32
    probabilities can pass 1.0, which would drop its least likely tokens (and make a seeded
    request's tokens depend on its batch)."""
    cutting = (top_p < 1.0).nonzero().squeeze(1).tolist()
    if len(cutting) == len(top_p):
        probs.masked_fill_(top_p_keep(probs, top_p).logical_not_(), 0.0)
    elif cutting:
        probs[cutting] = probs[cutting].masked_fill_(top_p_keep(probs[cutting], top_p[cutting]).logical_not_(), 0.0)
    return probs


def sample(logits: torch.Tensor, rows: list[SamplingRow]) -> list[Sample]:
    """logits: float32 [rows, vocab] (left as they are: it may be the step's own output); one
    Sample per row.

    Log-probabilities (a softmax over the whole vocabulary) are computed only for the rows
    that asked for them; the others get logprob NaN."""
    wanted = [i for i, row in enumerate(rows) if row.params.logprobs is not None]
    raw_logprobs = torch.log_softmax(logits[wanted], dim=-1) if wanted else None  # [len(wanted), vocab]
    if any(row.params.changes_logits for row in rows):
        # Both write in place: on a copy.
        logits = apply_penalties(apply_logit_bias(logits.clone(), rows), rows)
    tokens = torch.empty(len(rows), dtype=torch.long, device=logits.device)
    greedy_rows = [i for i, row in enumerate(rows) if row.params.greedy]
    if greedy_rows:
        # max(dim) gives the first maximal index like argmax, in ~60% of argmax's time on CPU.
        tokens[greedy_rows] = select_rows(logits, greedy_rows).max(dim=-1).indices
    random_rows = [i for i, row in enumerate(rows) if not row.params.greedy]
    if random_rows:
        chosen = [rows[i] for i in random_rows]
        temperature = torch.tensor([r.params.temperature for r in chosen], device=logits.device)
        tempered = select_rows(logits, random_rows) / temperature.unsqueeze(1)  # [len(chosen), vocab]
        tokens[random_rows] = _draw_tempered(tempered, chosen)
    token_list = tokens.tolist()
    samples = [Sample(token, float("nan"), None) for token in token_list]
    if wanted:
        scored = score_rows(raw_logprobs, [token_list[i] for i in wanted], [rows[i].params.logprobs for i in wanted])
        for i, top in zip(wanted, scored):
            samples[i] = Sample(token_list[i], top[token_list[i]], top)
    return samples
