"""A pipeline stage: its layers (loaded from the checkpoint) and the KV arena for them.

The same class runs in-process (the offline `LLM`, single-stage serving) and inside a Ray
actor (one per placement-group bundle in the served pipeline). It never sees requests: only
the packed tensors of a step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from neo_serve.config import load_model_config
from neo_serve.engine.kv_cache import KVArena, KVCopy
from neo_serve.engine.step_result import SamplingPlan, StepResult, argmax_result, step_result
from neo_serve.loader import DTYPES, CheckpointFiles, load_stage, resolve_dtype
from neo_serve.models.attention import AttentionMetadata, SequenceSlice, host_to_device, make_backend
from neo_serve.models.kv_dtype_probe import cpu_kv_cache_dtype
from neo_serve.models.packed_linear import pack_linears, packing_supported
from neo_serve.models.stages import StageSpec


@dataclass(frozen=True)
class StepInput:
    """One step's work, identical for every stage (under Ray, sent by value in each stage's call)."""

    input_ids: torch.Tensor  # [tokens] long, packed over sequences
    positions: torch.Tensor  # [tokens] long
    sequences: tuple[SequenceSlice, ...]
    logits_indices: torch.Tensor  # [rows] positions in the packed batch whose logits are needed
    kv_copies: tuple[KVCopy, ...]  # extent moves to apply before the forward
    # Every row is a plain greedy sample (SamplingParams.argmax_only): the last stage takes each
    # row's most likely token, with no `sampling` plan to carry.
    argmax_only: bool = False
    # Otherwise what the last stage does with the logits (step_result.py); the runners send it to
    # the last stage only.
    sampling: SamplingPlan | None = None

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    def __reduce__(self):
        # Under Ray a step is pickled once per stage call, on the replica's event loop. Tensors
        # pickle through torch's storage serializer and slices as one object each, which cost
        # that loop more than submitting the calls; flat int lists pickle in microseconds.
        slices = [value for s in self.sequences
                  for value in (s.query_start, s.query_len, s.context_len, s.kv_start)]
        return (_step_from_lists, (self.input_ids.tolist(), self.positions.tolist(), slices,
                                   self.logits_indices.tolist(), self.kv_copies, self.argmax_only, self.sampling))


def _step_from_lists(input_ids: list[int], positions: list[int], slices: list[int],
                     logits_indices: list[int], kv_copies: tuple[KVCopy, ...], argmax_only: bool,
                     sampling: SamplingPlan | None = None) -> StepInput:
    sequences = tuple(SequenceSlice(*slices[i:i + 4]) for i in range(0, len(slices), 4))
    return StepInput(input_ids=torch.tensor(input_ids, dtype=torch.long),
                     positions=torch.tensor(positions, dtype=torch.long), sequences=sequences,
                     logits_indices=torch.tensor(logits_indices, dtype=torch.long), kv_copies=kv_copies,
                     argmax_only=argmax_only, sampling=sampling)


def step_positions(sequences: tuple[SequenceSlice, ...]) -> torch.Tensor:
    """[tokens] long: each new token's position in its sequence, in packed order."""
    positions: list[int] = []
    for seq in sequences:
        positions.extend(range(seq.context_len, seq.total_len))
    return torch.tensor(positions, dtype=torch.long)


@dataclass(frozen=True, kw_only=True)
class StageWorkerSpec:
    checkpoint: str
    stage: StageSpec
    dtype: str
    device: str
    num_kv_slots: int
    block_size: int
    attention_backend: str = "auto"  # auto: flash-attn where this stage's GPU runs it, else SDPA
    kv_cache_dtype: str = "auto"  # auto: the model's dtype on GPU; on CPU see models/kv_dtype_probe.py
    pack_cpu_linears: bool = True  # oneDNN-prepacked weights on CPU (see models/packed_linear.py)


class StageWorker:
    def __init__(self, spec: StageWorkerSpec) -> None:
        self.spec = spec
        self.device = torch.device(spec.device)
        config = load_model_config(spec.checkpoint)
        files = CheckpointFiles.open(spec.checkpoint)
        self.dtype = resolve_dtype(spec.dtype, config, files, self.device)
        # `auto` (on CUDA only; see LLMEngine._attention_backend_and_block_size): flash-attn if this
        # stage's GPU runs it, else SDPA. Each stage's arena has its own layout, so stages may differ.
        self.backend = make_backend(spec.attention_backend, self.device)
        self.model = load_stage(spec.checkpoint, config, spec.stage, dtype=self.dtype, device=self.device,
                                backend=self.backend, files=files)
        self.packed_linears = 0
        if spec.pack_cpu_linears and packing_supported(self.device, self.dtype):
            self.packed_linears = pack_linears(self.model)
        kv_dtype = self._kv_dtype(spec.kv_cache_dtype, config.num_heads, config.head_dim)
        self.kv = KVArena(spec.stage.num_layers, spec.num_kv_slots, config.num_heads, config.head_dim,
                          kv_dtype, self.device, token_major=self.backend.token_major)

    def _kv_dtype(self, name: str, num_heads: int, head_dim: int) -> torch.dtype:
        if name != "auto":
            return DTYPES[name]
        if self.device.type == "cpu" and self.backend.name != "flash":
            # Half-precision CPU SDPA decode kernels are faster than float32 on some CPUs and
            # ~50x slower on others: measured here (see models/kv_dtype_probe.py).
            return cpu_kv_cache_dtype(self.dtype, num_heads, head_dim)
        return self.dtype

    @torch.inference_mode()
    def execute(self, step: StepInput, hidden: torch.Tensor | None = None) -> torch.Tensor | StepResult:
        """First stage: token ids in; others: the previous stage's hidden states [tokens, hidden].

        Returns hidden states for the next stage, or on the last stage the step's result for
        `step.logits_indices`: each row's most likely token when `step.argmax_only`, else what
        `step.sampling` asks for (tokens sampled and logprobs, computed here on this stage's
        device: see step_result.py).
        """
        if step.kv_copies:
            self.kv.apply_copies(step.kv_copies)
        # Every index tensor goes to the device before the forward is queued, from pinned memory
        # on a GPU: a copy from pageable memory waits for the GPU's queue, so `logits_indices`
        # copied after the layers would stall the host until they ran, then the head's launches.
        meta = AttentionMetadata.build(step.sequences, self.spec.block_size, self.device)
        positions = host_to_device(step.positions, self.device)
        logits_indices = host_to_device(step.logits_indices, self.device) if self.spec.stage.is_last else None
        # A previous stage may compute in another dtype: `auto` resolves per stage, and on a
        # bfloat16 checkpoint a CPU without bfloat16 kernels runs float32 (heterogeneous nodes).
        inputs = (host_to_device(step.input_ids, self.device) if self.spec.stage.is_first
                  else hidden.to(self.device, self.dtype))
        hidden = self.model(inputs, positions, self.kv.tensor, meta)
        if logits_indices is None:
            return hidden
        logits = self.model.compute_logits(hidden[logits_indices])  # [rows, vocab], the head's dtype
        if step.argmax_only:
            return argmax_result(logits)
        if step.sampling is None:
            raise ValueError("a step that is not argmax_only needs its sampling plan on the last stage")
        return step_result(logits, step.sampling)

    def ready(self) -> bool:
        return True
