"""The engine: requests in, tokens out, one `step()` at a time.

    step() = schedule -> prepare (pack tensors and the sampling plan) -> execute (stages; the
             last one samples) -> postprocess (detokenize, stop checks, free finished)

The served pipeline calls the same pieces (`schedule_step`, then `process_step` split in
`sample_step`, which picks the results that still count, and `apply_step`, the bookkeeping)
with several micro-batches in flight; the offline `LLM` calls `step()` until nothing is left.
"""

from __future__ import annotations

import itertools
import random
import time
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from neo_serve.config import ModelConfig, load_model_config
from neo_serve.engine.config import EngineConfig
from neo_serve.engine.executor import Executor, LocalPipelineExecutor
from neo_serve.engine.kv_cache import ExtentAllocator
from neo_serve.engine.outputs import LogprobDict, RequestOutput
from neo_serve.engine.sampler import Sample, SamplingRow, choice_seed, seeded_uniform
from neo_serve.engine.sampling_params import SamplingParams
from neo_serve.engine.scheduler import ScheduledBatch, Scheduler, SchedulerConfig
from neo_serve.engine.sequence import Request, Sequence
from neo_serve.engine.step_result import PromptScoring, SamplingPlan, StepResult
from neo_serve.engine.worker import StageWorkerSpec, StepInput, step_positions
from neo_serve.errors import ConfigError, InvalidRequestError
from neo_serve.loader import DTYPES, CheckpointFiles, resolve_dtype
from neo_serve.models.attention import FlashAttentionBackend, SequenceSlice, flash_attn_available, require_flash_attn
from neo_serve.models.stages import partition_layers
from neo_serve.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass
class PreparedStep:
    """A scheduled batch and the tensors that run it; per chunk, where its results will be in the
    step's `StepResult`."""

    batch: ScheduledBatch
    step_input: StepInput
    sample_slots: list[int]  # per chunk: index of its sample in StepResult.samples, or -1
    scoring_slots: list[int]  # per chunk: index of its prompt logprobs in StepResult.prompt_logprobs, or -1


@dataclass(frozen=True)
class SampledStep:
    """What of a finished step's result counts, per chunk of its batch: whether the chunk's
    sequence was still live, its prompt logprobs and its sampled token (None: none)."""

    live: list[bool]
    prompt_logprobs: list[list[LogprobDict] | None]
    samples: list[Sample | None]
    last_stage_seconds: float | None = None  # StepResult.last_stage_seconds


class LLMEngine:
    def __init__(self, config: EngineConfig, *, executor: Executor | None = None) -> None:
        self.config = config
        self.model_config: ModelConfig = load_model_config(config.model)
        self.tokenizer = Tokenizer.from_dir(config.tokenizer or config.model)
        self.max_model_len = config.max_model_len or self.model_config.context_window
        # Longer text prompts cannot fit the context however they tokenize: no token covers more
        # than `max_token_chars` characters (x4 for normalizers that merge characters, e.g. NFC).
        # They are refused before encoding, which for a few MiB takes seconds and GiBs.
        self.max_prompt_chars = 4 * self.max_model_len * self.tokenizer.max_token_chars
        if self.max_model_len > self.model_config.context_window:
            scale = getattr(self.model_config, "rotary_position_scale", 1.0)
            raise ConfigError(f"max_model_len {self.max_model_len} exceeds the model's context window of "
                              f"{self.model_config.context_window} positions (max_position_embeddings "
                              f"{self.model_config.max_position_embeddings}"
                              + (f" x linear RoPE factor {scale:g})" if scale > 1 else ")"))
        attention_backend, block_size = self._attention_backend_and_block_size(config)
        num_blocks = config.kv_cache_tokens // block_size
        if num_blocks * block_size < self.max_model_len:
            raise ConfigError(f"kv_cache_tokens ({config.kv_cache_tokens}) must hold at least one sequence of "
                              f"max_model_len ({self.max_model_len}) tokens; raise kv_cache_tokens or lower max_model_len")
        self.stages = partition_layers(self.model_config, config.num_stages)
        self.stage_specs = [
            StageWorkerSpec(checkpoint=config.model, stage=stage, dtype=config.dtype,
                            device=config.resolved_device, num_kv_slots=num_blocks * block_size,
                            block_size=block_size, attention_backend=attention_backend,
                            kv_cache_dtype=config.kv_cache_dtype, pack_cpu_linears=config.pack_cpu_linears)
            for stage in self.stages
        ]
        self.executor: Executor = executor if executor is not None else LocalPipelineExecutor(self.stage_specs)
        self.allocator = ExtentAllocator(num_blocks, block_size)
        self.scheduler = Scheduler(SchedulerConfig(max_num_seqs=config.max_num_seqs,
                                                   max_num_batched_tokens=config.max_num_batched_tokens),
                                   self.allocator)
        self.requests: dict[str, Request] = {}
        # Where unseeded rows' draws fall (seeded ones: sampler.seeded_uniform).
        self.uniforms = random.Random(config.seed)
        self._ids = itertools.count()
        self.num_generated_tokens = 0  # tokens appended to sequences (not those of sequences aborted mid-step)

    def _attention_backend_and_block_size(self, config: EngineConfig) -> tuple[str, int]:
        """The attention backend the stages are given, and the KV block size.

        On CUDA, `auto` is left to each stage, which takes flash-attn when it is installed and its
        own GPU runs it, else SDPA: the engine itself may run where no GPU is visible (the
        scheduler of a multi-stage replica, a CPU head node checking the config). Here `auto`
        only gives way to SDPA where flash-attn cannot run on any GPU: it computes in float16 or
        bfloat16 with the cache in the model's dtype. Blocks are then a multiple of flash-attn's
        256-slot pages, which SDPA takes too, so that every stage may choose it. An explicit
        `flash` that cannot run is refused here rather than failing at the first decode."""
        backend = config.attention_backend
        device = config.resolved_device
        on_cuda = device.startswith("cuda")
        if not on_cuda:
            backend = "sdpa" if backend == "auto" else backend
        elif backend in ("auto", "flash"):
            # The stored tensors' dtype only when nothing else says it: a config checked at build
            # time may sit beside no weights (they are fetched onto the cluster's volume later).
            needs_files = config.dtype == "auto" and not self.model_config.checkpoint_dtype
            files = CheckpointFiles.open(config.model) if needs_files else None
            model_dtype = resolve_dtype(config.dtype, self.model_config, files, device)
            kv_dtype = model_dtype if config.kv_cache_dtype == "auto" else DTYPES[config.kv_cache_dtype]
            problem = None
            if torch.float32 in (model_dtype, kv_dtype):
                problem = "runs float16 and bfloat16 only"
            elif kv_dtype != model_dtype:
                problem = "reads the KV cache in the model's dtype"
            if problem is not None:
                if backend == "flash":
                    raise ConfigError(f"attention_backend flash {problem}, but the model runs in {model_dtype} with a "
                                      f"{kv_dtype} KV cache: set dtype to float16 or bfloat16 and kv_cache_dtype to "
                                      "auto (or the same), or attention_backend to sdpa")
                backend = "sdpa"
        # The capability only, not flash-attn's one-call check: this may be an app's build on a
        # GPU host, which must not make a CUDA context; the stage's own load makes the call (a GPU
        # whose flash-attn build refuses it then runs SDPA on these 256-slot blocks).
        if backend == "flash" and on_cuda and config.num_stages == 1:
            require_flash_attn(device, run_check=False)  # one stage runs in this very process: refused now
        if (backend == "auto" and on_cuda and config.num_stages == 1 and torch.cuda.is_available()
                and not flash_attn_available(device, run_check=False)):
            # One stage runs in this very process, on its GPU: no stage can take flash-attn here
            # (a T4 or V100, or flash-attn not installed), so nothing needs its 256-slot pages.
            # Where no GPU is visible (a CPU head node checking the config at build time) the
            # replica's GPU is unknown: its limits are checked with flash-attn's pages, the
            # stricter ones, rather than pass here and fail in the replica.
            # Each sequence holds at least one block: with 256-slot blocks, 16384 cache tokens
            # would run at most 64 sequences, whatever max_num_seqs says.
            backend = "sdpa"
        page = FlashAttentionBackend.PAGE_MULTIPLE
        may_use_flash = backend == "flash" or (backend == "auto" and on_cuda)
        if config.block_size is None:
            return backend, page if may_use_flash else 16
        if config.block_size % page and may_use_flash:
            if backend == "flash":
                raise ConfigError(f"block_size {config.block_size}: flash-attn's paged KV cache needs a multiple of "
                                  f"{page} slots")
            backend = "sdpa"  # `auto` with blocks flash-attn cannot page
        return backend, config.block_size

    # ---- requests -------------------------------------------------------------------------
    def add_request(self, prompt: str | list[int], params: SamplingParams | None = None, *,
                    request_id: str | None = None, prompt_token_ids: list[int] | None = None) -> Request:
        """Validate and queue a request. Raises InvalidRequestError naming the bad field.
        `prompt_token_ids`: a text prompt's ids from `self.tokenizer`, when the caller encoded it
        already (off the event loop)."""
        params = params or SamplingParams()
        request_id = request_id if request_id is not None else f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise InvalidRequestError(f"request id {request_id!r} is already running", field="request_id")
        text, prompt_ids = self._tokenize(prompt, prompt_token_ids)
        max_tokens = self._resolve_max_tokens(len(prompt_ids), params)
        vocab = self.model_config.vocab_size
        # A bias past the vocabulary would fail the whole step; such a stop token could never stop.
        for name, tokens in (("logit_bias", params.logit_bias), ("stop_token_ids", params.stop_token_ids)):
            if outside := [token for token in tokens if token >= vocab]:
                raise InvalidRequestError(f"{name} token {outside[0]} is outside the vocabulary [0, {vocab})",
                                          field=name)
        request = Request(request_id, text, prompt_ids, params, max_tokens)
        if params.prompt_logprobs is not None:
            request.prompt_logprobs = [None]  # token 0 has no context
        for index in range(params.n):
            seed = None if params.seed is None else choice_seed(params.seed, index)
            detok = IncrementalDetokenizer(self.tokenizer, prompt_ids, skip_special_tokens=params.skip_special_tokens)
            request.sequences.append(Sequence(request, index, detok, seed))
        if max_tokens == 0:  # nothing to generate: only score the prompt, if asked
            for seq in request.sequences:
                seq.finish_reason = "length"
                if seq.index > 0 or not request.needs_prompt_logprobs:
                    self.scheduler.finish(seq)
            if request.finished:
                return request  # complete already; never enters the engine
        self.requests[request_id] = request
        for seq in request.sequences:
            if not seq.finished:
                self.scheduler.add(seq)
        return request

    def _tokenize(self, prompt: str | list[int],
                  prompt_token_ids: list[int] | None = None) -> tuple[str | None, list[int]]:
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty", field="prompt")
            self.check_prompt_text(prompt)
            ids = prompt_token_ids if prompt_token_ids is not None else self.tokenizer.encode(prompt)
            self._check_text_ids(ids)
            return prompt, ids
        if not isinstance(prompt, (list, tuple)) or not prompt:
            raise InvalidRequestError("prompt must be a non-empty string or list of token ids", field="prompt")
        if len(prompt) > self.max_model_len:  # refused before a Python loop over a million ids
            raise self._too_long(len(prompt))
        vocab = self.model_config.vocab_size
        for position, token in enumerate(prompt):
            if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab:
                raise InvalidRequestError(
                    f"prompt token {token!r} at position {position} is outside the vocabulary [0, {vocab})",
                    field="prompt")
        return None, list(prompt)

    def _check_text_ids(self, ids: list[int]) -> None:
        # A fine-tune's tokenizer may add tokens (a pad, chat markers) past the rows of an embedding
        # that was never resized: such an id would fail the whole step, not just this request.
        vocab = self.model_config.vocab_size
        if ids and max(ids) >= vocab:
            token = next(t for t in ids if t >= vocab)
            raise InvalidRequestError(
                f"prompt contains {self.tokenizer.decode([token], skip_special_tokens=False)!r} (token {token}), "
                f"which the tokenizer has but the model's vocabulary of {vocab} does not", field="prompt")

    def _resolve_max_tokens(self, prompt_len: int, params: SamplingParams) -> int:
        if prompt_len > self.max_model_len:
            raise self._too_long(prompt_len)
        if prompt_len == self.max_model_len and params.max_tokens != 0:
            raise InvalidRequestError(
                f"prompt has {prompt_len} tokens, the whole context window of {self.max_model_len}: no room for a "
                "generated token (with max_tokens 0 it is only scored)", field="prompt")
        if params.max_tokens is None:
            return self.max_model_len - prompt_len
        if prompt_len + params.max_tokens > self.max_model_len:
            raise InvalidRequestError(
                f"prompt ({prompt_len} tokens) + max_tokens ({params.max_tokens}) exceeds the context window "
                f"of {self.max_model_len} tokens", field="max_tokens")
        return params.max_tokens

    def check_prompt_text(self, text: str) -> None:
        """Refuse, before encoding it, a text prompt longer than `max_prompt_chars`."""
        if len(text) > self.max_prompt_chars:
            raise InvalidRequestError(
                f"prompt has {len(text)} characters, more than a context window of {self.max_model_len} tokens "
                f"can hold (at most {self.max_prompt_chars} characters for this tokenizer)", field="prompt")

    def _too_long(self, prompt_len: int) -> InvalidRequestError:
        return InvalidRequestError(f"prompt has {prompt_len} tokens; the context window is {self.max_model_len}",
                                   field="prompt")

    def abort_request(self, request_id: str) -> bool:
        """Remove a request and free its KV now. Returns whether it was known."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return False
        for seq in request.sequences:
            if not seq.finished:
                seq.finish_reason = seq.finish_reason or "abort"
                self.scheduler.finish(seq)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[RequestOutput]:
        prepared = self.schedule_step()
        if prepared is None:
            return []
        return self.process_step(prepared, self.executor.execute(prepared.step_input))

    def schedule_step(self, in_flight: Mapping[Sequence, int] | None = None, max_seqs: int | None = None,
                      prefill_split: int = 1) -> PreparedStep | None:
        """Schedule and pack one (micro-)batch; see Scheduler.schedule for the arguments."""
        batch = self.scheduler.schedule(in_flight, max_seqs, prefill_split)
        if not batch.chunks:
            return None
        return self._prepare(batch)

    def _prepare(self, batch: ScheduledBatch) -> PreparedStep:
        input_ids: list[int] = []
        slices: list[SequenceSlice] = []
        logits_indices: list[int] = []
        sample_rows: list[int] = []  # logits row of each sampled chunk
        sampled: list[Sequence] = []  # the sequence of each sampled row
        scoring: list[PromptScoring] = []
        sample_slots: list[int] = []
        scoring_slots: list[int] = []
        now = time.monotonic()
        for chunk in batch.chunks:
            seq = chunk.seq
            request = seq.request
            request.metrics.first_scheduled_time = request.metrics.first_scheduled_time or now
            query_start = len(input_ids)
            input_ids.extend([seq.token_at(chunk.start)] if chunk.length == 1 else seq.tokens(chunk.start, chunk.end))
            slices.append(SequenceSlice(query_start, chunk.length, chunk.start,
                                        seq.extent.start * self.allocator.block_size))
            # Prompt logprobs: the logits at position p score prompt token p + 1. A prompt
            # recomputed after preemption scores only the tokens it has not scored yet.
            scoring_slots.append(-1)
            if seq.index == 0 and request.needs_prompt_logprobs:
                first_scored = max(chunk.start, len(request.prompt_logprobs) - 1)
                scored_end = min(chunk.end, len(seq.prompt_ids) - 1)
                if scored_end > first_scored:
                    scoring_slots[-1] = len(scoring)
                    targets = request.prompt_ids[first_scored + 1:scored_end + 1]  # the token after each position
                    scoring.append(PromptScoring(len(logits_indices), targets, request.params.prompt_logprobs))
                    logits_indices.extend(query_start + p - chunk.start for p in range(first_scored, scored_end))
            sample_slots.append(-1)
            if chunk.samples and request.max_tokens > 0:
                sample_slots[-1] = len(sample_rows)
                sample_rows.append(len(logits_indices))
                logits_indices.append(query_start + chunk.length - 1)
                sampled.append(seq)
        # Only sampled rows (no prompt logprobs), each a plain greedy pick: no plan to build or send.
        argmax_only = not scoring and all(seq.request.params.argmax_only for seq in sampled)
        step_input = StepInput(
            input_ids=torch.tensor(input_ids, dtype=torch.long),
            positions=step_positions(tuple(slices)),
            sequences=tuple(slices),
            logits_indices=torch.tensor(logits_indices, dtype=torch.long),
            kv_copies=tuple(batch.kv_copies),
            argmax_only=argmax_only,
            sampling=None if argmax_only else SamplingPlan(sample_rows, [self._sampling_row(seq) for seq in sampled],
                                                           scoring),
        )
        return PreparedStep(batch, step_input, sample_slots, scoring_slots)

    def _sampling_row(self, seq: Sequence) -> SamplingRow:
        """What the last stage needs to sample `seq`'s next token: its parameters, the tokens its
        penalties count (copies: the stage may read them while the engine appends to the
        sequence) and where its draw falls."""
        params = seq.request.params
        prompt_ids: list[int] = []
        output_ids: list[int] = []
        if params.repetition_penalty != 1.0:
            prompt_ids, output_ids = list(seq.prompt_ids), list(seq.output_ids)
        elif params.presence_penalty or params.frequency_penalty:
            output_ids = list(seq.output_ids)
        if params.greedy:
            uniform = 0.0
        elif seq.seed is not None:
            uniform = seeded_uniform(seq.seed, len(seq.output_ids))
        else:
            uniform = self.uniforms.random()
        return SamplingRow(params, prompt_ids, output_ids, uniform)

    def process_step(self, prepared: PreparedStep, result: StepResult) -> list[RequestOutput]:
        """Apply a step's result (tokens sampled and logprobs, from the last stage): detokenizing,
        stop checks."""
        return self.apply_step(prepared, self.sample_step(prepared, result))

    def sample_step(self, prepared: PreparedStep, result: StepResult) -> SampledStep:
        """Which of a step's results still count: those of the chunks whose sequences are still
        live (not aborted or preempted while the step ran). It reads the engine's state and
        changes none of it."""
        live = [self._is_live(chunk.seq) for chunk in prepared.batch.chunks]
        prompt_logprobs: list[list[LogprobDict] | None] = [
            result.prompt_logprobs[slot] if slot >= 0 and alive else None
            for slot, alive in zip(prepared.scoring_slots, live)]
        samples: list[Sample | None] = [
            result.samples[slot] if slot >= 0 and alive else None for slot, alive in zip(prepared.sample_slots, live)]
        return SampledStep(live, prompt_logprobs, samples, result.last_stage_seconds)

    def apply_step(self, prepared: PreparedStep, sampled: SampledStep) -> list[RequestOutput]:
        """The bookkeeping half of `process_step`: append tokens, detokenize, check stops, free
        finished sequences. Runs on the thread that owns the engine."""
        touched: dict[str, Request] = {}
        now = time.monotonic()
        for chunk, was_live, prompt_logprobs, result in zip(prepared.batch.chunks, sampled.live,
                                                            sampled.prompt_logprobs, sampled.samples):
            seq = chunk.seq
            request = seq.request
            if not was_live or not self._is_live(seq):
                continue
            seq.num_computed = chunk.end
            if prompt_logprobs is not None:
                request.prompt_logprobs.extend(prompt_logprobs)
                touched[request.request_id] = request
            if result is not None:
                self._append_token(seq, result.token_id, result.logprob, result.top_logprobs)
                self.num_generated_tokens += 1
                request.metrics.first_token_time = request.metrics.first_token_time or now
                touched[request.request_id] = request
        # A prompt-only request (max_tokens=0) ends once its prompt is scored.
        for request in list(touched.values()):
            if request.max_tokens == 0 and not request.needs_prompt_logprobs:
                for seq in request.sequences:
                    if not seq.finished:
                        self.scheduler.finish(seq)
        outputs = []
        for request in touched.values():
            if request.finished:
                request.metrics.finished_time = time.monotonic()
                self.requests.pop(request.request_id, None)
            outputs.append(request.to_output())
        return outputs

    def _is_live(self, seq: Sequence) -> bool:
        return seq.request.request_id in self.requests and seq.extent is not None

    def _append_token(self, seq: Sequence, token: int, logprob: float, top: dict[int, float] | None) -> None:
        params = seq.request.params
        seq.output_ids.append(token)
        if top is not None:  # logprobs were asked for
            seq.logprobs.append(top)
            seq.cumulative_logprob += logprob
        config = self.model_config
        # A stop token or EOS stays in token_ids (and logprobs) but not in the text, as in vLLM.
        if token in params.stop_token_ids:
            self._finish(seq, "stop", token)
            return
        if (token == config.eos_token_id or token in config.more_eos_token_ids) and not params.ignore_eos:
            self._finish(seq, "stop", None)
            return
        delta = seq.detokenizer.add(token)
        seq.output_text += delta
        if params.stop and self._check_stop_strings(seq, len(delta)):
            pass
        elif len(seq.output_ids) >= seq.request.max_tokens or seq.total_len >= self.max_model_len:
            self._finish(seq, "length", None)

    def _check_stop_strings(self, seq: Sequence, delta_len: int) -> bool:
        stop = self._cut_at_stop_string(seq, delta_len)
        if stop is None:
            return False
        self._finish(seq, "stop", stop, flush=False)
        return True

    @staticmethod
    def _cut_at_stop_string(seq: Sequence, delta_len: int) -> str | None:
        """The first stop string that the text's last `delta_len` characters complete, with the
        text cut before it (the stop string is not part of the output); None if there is none."""
        text = seq.output_text
        # Each stop is searched only where it could end in the new characters: one long stop must
        # not make every short one rescan the whole text after each token.
        end = len(text) - delta_len + 1
        hits = [(index, stop) for stop in seq.request.params.stop
                if (index := text.find(stop, max(0, end - len(stop)))) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        seq.output_text = text[:index]
        return stop

    def _finish(self, seq: Sequence, reason: str, stop_reason: str | int | None, *, flush: bool = True) -> None:
        if flush:
            # Text the detokenizer held back (a token ending in part of a character) comes out
            # now, never searched for stop strings yet.
            tail = seq.detokenizer.flush()
            seq.output_text += tail
            if tail and seq.request.params.stop:
                stop = self._cut_at_stop_string(seq, len(tail))
                if stop is not None:
                    reason, stop_reason = "stop", stop
        seq.finish_reason = reason
        seq.stop_reason = stop_reason
        self.scheduler.finish(seq)

    def recompute_all(self) -> int:
        """After a stage lost its KV cache (restarted): every running sequence is recomputed
        from its tokens at its next step. Returns how many were running."""
        return self.scheduler.preempt_all()

    # ---- introspection ------------------------------------------------------------------------
    def kv_cache_usage(self) -> float:
        """Fraction of KV blocks reserved, whole blocks with each sequence's room to grow (the
        same on every stage)."""
        return 1.0 - self.allocator.num_free_blocks / self.allocator.num_blocks

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_schedulable(self) -> int:
        """Running sequences and the waiting ones the KV cache admits now (Scheduler.num_schedulable)."""
        return self.scheduler.num_schedulable()
