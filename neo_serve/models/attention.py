"""Attention over the packed tokens of one step, behind one interface.

A step's tokens from every scheduled sequence are packed into one `[tokens, heads, head_dim]`
tensor. Each sequence owns one contiguous extent of the stage's KV arena, so its keys are a
zero-copy view, which is what makes plain SDPA fast on CPU. Backends:
- `sdpa`: torch.nn.functional.scaled_dot_product_attention per sequence (default, CPU and GPU);
  head-major arena `[heads, slots, head_dim]`, so each head's keys are one contiguous block. On a
  GPU the step's single-token (decoding) sequences are attended together instead, in a few
  calls over a padded gather of their keys (see `decode_groups`);
- `reference`: explicit matmul + softmax in float32, for checking the others (head-major too);
- `flash`: flash-attn 2 (`flash_attn_varlen_func` for fresh prefills, `flash_attn_with_kvcache`
  with a block table over the arena for decodes and continued prefills), CUDA only;
  token-major arena `[slots, heads, head_dim]`, which flash-attn reads as pages.
The cache may be kept in a wider dtype than the model (float32 on CPUs whose bfloat16 SDPA
decode kernels are slower, see kv_dtype_probe.py): queries and new keys are cast to the cache
dtype, the output back to the model's.
"""

from __future__ import annotations

import importlib
import logging
from dataclasses import dataclass, field
from typing import Protocol

import torch
import torch.nn.functional as F

from neo_serve.errors import ConfigError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SequenceSlice:
    """Where one sequence's tokens sit in this step."""

    query_start: int  # offset of its first new token in the packed batch
    query_len: int  # new tokens this step
    context_len: int  # tokens already in the KV cache before this step
    kv_start: int  # first arena slot of its extent (its token 0 lives there)

    @property
    def total_len(self) -> int:
        return self.context_len + self.query_len


@dataclass(frozen=True)
class AttentionMetadata:
    sequences: tuple[SequenceSlice, ...]
    slot_mapping: torch.Tensor  # [tokens] arena slot each new token's K/V is written to
    block_size: int  # arena granularity (extents start on a block boundary)
    # A backend's per-step plan (SDPA's per-sequence calls and masks, keyed ("sdpa", window);
    # flash-attn's index tensors, keyed "flash") is the same in every layer: built once per step,
    # in the first layer that needs it.
    plans: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def build(cls, sequences: tuple[SequenceSlice, ...], block_size: int, device: torch.device | str = "cpu") -> "AttentionMetadata":
        slots: list[int] = []
        for seq in sequences:
            first = seq.kv_start + seq.context_len
            slots.extend(range(first, first + seq.query_len))
        return cls(sequences, host_to_device(torch.tensor(slots, dtype=torch.long), torch.device(device)), block_size)


class AttentionBackend(Protocol):
    name: str
    token_major: bool  # arena layout: [slots, heads, dim] if True, else [heads, slots, dim]

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata, *, scale: float,
                 window: int | None) -> torch.Tensor:
        """q, k, v: [tokens, heads, head_dim] (new tokens); caches in the backend's layout.

        Writes k, v into the caches at `meta.slot_mapping`, then returns [tokens, heads, head_dim].
        `window`: a query at position p sees keys p-window+1 .. p (None: all keys up to p).
        """


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             meta: AttentionMetadata, *, token_major: bool) -> None:
    """Store the step's new keys/values ([tokens, heads, dim]) at their arena slots."""
    if token_major:
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
    else:
        k_cache.index_copy_(1, meta.slot_mapping, k.transpose(0, 1).to(k_cache.dtype))
        v_cache.index_copy_(1, meta.slot_mapping, v.transpose(0, 1).to(v_cache.dtype))


def visible_key_range(seq: SequenceSlice, window: int | None) -> tuple[int, int]:
    """Positions [first, end) of keys any of this step's queries may see."""
    first = 0 if window is None else max(0, seq.context_len - window + 1)
    return first, seq.total_len


def attention_mask(seq: SequenceSlice, key_first: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean [query_len, keys] mask (True = attend), or None when no key must be hidden."""
    key_end = seq.total_len
    if seq.query_len == 1 and (window is None or key_end - key_first <= window):
        return None  # a single query sees every key in its visible range
    q_pos = torch.arange(seq.context_len, key_end, device=device).unsqueeze(1)  # [q, 1]
    k_pos = torch.arange(key_first, key_end, device=device).unsqueeze(0)  # [1, k]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed &= k_pos > q_pos - window
    return allowed


@dataclass(frozen=True)
class SdpaCall:
    """One sequence's SDPA call in a layer: which queries, which arena slots of keys, which mask."""

    query_start: int
    query_len: int
    key_slot: int  # arena slot of the first visible key
    key_len: int
    mask: torch.Tensor | None
    causal: bool  # a fresh prefill without a window: SDPA's own causal mask, no mask tensor


def sdpa_plan(meta: AttentionMetadata, window: int | None, device: torch.device) -> tuple[SdpaCall, ...]:
    """The step's per-sequence SDPA calls, worked out once per step and window, not per layer."""
    plan = meta.plans.get(("sdpa", window))
    if plan is None:
        calls = []
        for seq in meta.sequences:
            first, end = visible_key_range(seq, window)
            causal = seq.context_len == 0 and window is None and seq.query_len > 1
            mask = None if causal else attention_mask(seq, first, window, device)
            calls.append(SdpaCall(seq.query_start, seq.query_len, seq.kv_start + first, end - first, mask, causal))
        plan = meta.plans[("sdpa", window)] = tuple(calls)
    return plan


# Bytes of keys (and again of values) one batched decode call may gather (a group holds one
# sequence at least, whatever its length): a transient copy per layer, which must fit in the
# activation reserve `neo-serve plan` leaves beside the KV cache (1 GiB).
DECODE_GATHER_BYTES = 128 * 2**20


def host_to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A step plan's host tensor on `device`; to a GPU from pinned memory without waiting, so that
    planning in the first layer does not stall the host behind the GPU's queue."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


@dataclass(frozen=True)
class DecodeGroup:
    """Single-query sequences attended in one SDPA call over a padded gather of their keys."""

    query_index: torch.Tensor  # [rows] each sequence's token in the packed batch
    key_slots: torch.Tensor  # [rows, keys] arena slots of each row's keys, the last one repeated as padding
    mask: torch.Tensor  # [rows, 1, 1, keys] bool: True on a row's own keys


def decode_groups(meta: AttentionMetadata, window: int | None, device: torch.device,
                  key_slot_bytes: int, budget_bytes: int) -> tuple[tuple[SdpaCall, ...], tuple[DecodeGroup, ...]]:
    """The step's SDPA calls split into per-sequence calls (prefills) and decode groups, once per
    step and window. Rows are grouped longest first, so that each group pads to lengths close to
    its own, and a group gathers at most `budget_bytes` of keys (`key_slot_bytes` per slot)."""
    plan = meta.plans.get(("sdpa-grouped", window))
    if plan is not None:
        return plan
    calls = sdpa_plan(meta, window, device)
    is_decode = [call.query_len == 1 and call.mask is None for call in calls]  # one query, every key in range
    singles = tuple(call for call, decode in zip(calls, is_decode) if not decode)
    decodes = sorted((call for call, decode in zip(calls, is_decode) if decode),
                     key=lambda call: call.key_len, reverse=True)
    groups: list[DecodeGroup] = []
    start = 0
    while start < len(decodes):
        longest = decodes[start].key_len
        rows = max(1, min(len(decodes) - start, budget_bytes // max(1, longest * key_slot_bytes)))
        members = decodes[start:start + rows]
        offsets = torch.arange(longest)  # [keys]
        lengths = torch.tensor([call.key_len for call in members]).unsqueeze(1)  # [rows, 1]
        firsts = torch.tensor([call.key_slot for call in members]).unsqueeze(1)  # [rows, 1]
        groups.append(DecodeGroup(
            query_index=host_to_device(torch.tensor([call.query_start for call in members]), device),
            key_slots=host_to_device(firsts + torch.minimum(offsets, lengths - 1), device),
            mask=host_to_device((offsets < lengths)[:, None, None, :], device)))
        start += rows
    plan = meta.plans[("sdpa-grouped", window)] = (singles, tuple(groups))
    return plan


def sequence_sdpa(queries: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, call: SdpaCall,
                  scale: float) -> torch.Tensor:
    """One sequence's SDPA call over 4-D views: queries [1, heads, tokens, dim], keys and values
    [1, heads, slots, dim] (the whole arena); returns [1, heads, query_len, dim]."""
    return F.scaled_dot_product_attention(queries.narrow(2, call.query_start, call.query_len),
                                          keys.narrow(2, call.key_slot, call.key_len),
                                          values.narrow(2, call.key_slot, call.key_len),
                                          attn_mask=call.mask, is_causal=call.causal, scale=scale)


class SdpaBackend:
    name = "sdpa"
    token_major = False

    def __init__(self, *, batch_decodes: bool = False, gather_budget_bytes: int = DECODE_GATHER_BYTES) -> None:
        # On a GPU each SDPA call is a kernel launch plus ~20-40 us of Python and dispatch, so a
        # decode step of 64 sequences x 44 layers (GPT-NeoX-20B) would spend more time launching
        # than attending: decodes are batched there. On a CPU the per-sequence calls read the
        # cache in place and measured as fast as one padded call (docs/benchmarks.md).
        self.batch_decodes = batch_decodes
        self.gather_budget_bytes = gather_budget_bytes

    def __call__(self, q, k, v, k_cache, v_cache, meta, *, scale, window):
        write_kv(k, v, k_cache, v_cache, meta, token_major=False)
        out_dtype = q.dtype
        # 4-D [1, heads, len, dim] views: SDPA's fused CPU/GPU kernels take only 4-D inputs (3-D
        # ones fall back to the slow math path), and they accept these strides as they are. Made
        # once per layer, so that each sequence costs three `narrow`s and its SDPA call: a decode
        # step of 64 sequences makes one such call per sequence and layer.
        queries = q.to(k_cache.dtype).transpose(0, 1).unsqueeze(0)  # [1, heads, tokens, dim]
        if self.batch_decodes:
            return self._grouped(queries, k_cache, v_cache, meta, scale, window).to(out_dtype)
        keys, values = k_cache.unsqueeze(0), v_cache.unsqueeze(0)  # [1, heads, slots, dim]
        # [1, heads, query_len, dim] per sequence, in packed order
        results = [sequence_sdpa(queries, keys, values, call, scale) for call in sdpa_plan(meta, window, q.device)]
        # Sequences are packed back to back, so one cat restores the token order.
        return torch.cat(results, dim=2)[0].transpose(0, 1).to(out_dtype)  # [tokens, heads, dim]

    def _grouped(self, queries, k_cache, v_cache, meta, scale, window) -> torch.Tensor:
        """Prefills per sequence, decodes in groups; [tokens, heads, dim] in the cache's dtype."""
        heads, _, dim = k_cache.shape
        singles, groups = decode_groups(meta, window, queries.device, heads * dim * k_cache.element_size(),
                                        self.gather_budget_bytes)
        out = queries.new_empty(queries.shape[2], heads, dim)  # [tokens, heads, dim]
        arena_keys, arena_values = k_cache.unsqueeze(0), v_cache.unsqueeze(0)  # [1, heads, slots, dim]
        for call in singles:
            result = sequence_sdpa(queries, arena_keys, arena_values, call, scale)  # [1, heads, q, dim]
            out[call.query_start:call.query_start + call.query_len] = result[0].transpose(0, 1)
        for group in groups:
            group_queries = queries[0, :, group.query_index].transpose(0, 1).unsqueeze(2)  # [rows, heads, 1, dim]
            keys = k_cache[:, group.key_slots].transpose(0, 1)  # [rows, heads, keys, dim]
            values = v_cache[:, group.key_slots].transpose(0, 1)
            result = F.scaled_dot_product_attention(group_queries, keys, values, attn_mask=group.mask,
                                                    scale=scale)  # [rows, heads, 1, dim]
            out.index_copy_(0, group.query_index, result.squeeze(2))
            del keys, values, result  # one group's gathered copy alive at a time
        return out


class ReferenceBackend:
    """Textbook attention in float32, for tests: softmax(q k^T * scale + mask) v."""

    name = "reference"
    token_major = False

    def __call__(self, q, k, v, k_cache, v_cache, meta, *, scale, window):
        write_kv(k, v, k_cache, v_cache, meta, token_major=False)
        out = torch.empty_like(q)
        for seq in meta.sequences:
            q_seq = q[seq.query_start:seq.query_start + seq.query_len].float().transpose(0, 1)
            keys = k_cache[:, seq.kv_start:seq.kv_start + seq.total_len].float()  # [heads, len, dim]
            values = v_cache[:, seq.kv_start:seq.kv_start + seq.total_len].float()
            scores = q_seq @ keys.transpose(-1, -2) * scale  # [heads, q, k]
            q_pos = torch.arange(seq.context_len, seq.total_len, device=q.device).unsqueeze(1)
            k_pos = torch.arange(seq.total_len, device=q.device).unsqueeze(0)
            allowed = k_pos <= q_pos
            if window is not None:
                allowed &= k_pos > q_pos - window
            scores = scores.masked_fill(~allowed, float("-inf"))
            result = scores.softmax(dim=-1) @ values
            out[seq.query_start:seq.query_start + seq.query_len] = result.transpose(0, 1).to(q.dtype)
        return out


@dataclass(frozen=True)
class FlashFromCache:
    """One `flash_attn_with_kvcache` call: the step's sequences with a context and `query_len`
    new tokens each (decodes: 1), reading their keys from the arena's pages."""

    index: torch.Tensor  # [batch * query_len] long: their queries' rows in the packed batch
    block_table: torch.Tensor  # [batch, max_pages] int32: each sequence's arena pages, in order
    cache_seqlens: torch.Tensor  # [batch] int32: keys in the cache, this step's included
    batch: int
    query_len: int


@dataclass(frozen=True)
class FlashPlan:
    """flash-attn's index tensors for one step, on the stage's device."""

    fresh_index: torch.Tensor | None  # [tokens] long: rows of fresh prefills (no context), packed
    fresh_cu_seqlens: torch.Tensor | None  # [fresh + 1] int32: their offsets in `fresh_index`
    fresh_max_len: int
    from_cache: tuple[FlashFromCache, ...]


def flash_plan(meta: AttentionMetadata, device: torch.device) -> FlashPlan:
    """Built on the host once per step and moved in one copy per tensor: built in each layer,
    it took a host-to-device copy per sequence and layer."""
    plan = meta.plans.get("flash")
    if plan is not None:
        return plan

    def to_device(values: list, dtype: torch.dtype) -> torch.Tensor:
        return host_to_device(torch.tensor(values, dtype=dtype), device)

    fresh = [s for s in meta.sequences if s.context_len == 0]
    fresh_index = fresh_cu_seqlens = None
    if fresh:
        rows = [row for s in fresh for row in range(s.query_start, s.query_start + s.query_len)]
        offsets = [0]
        for s in fresh:
            offsets.append(offsets[-1] + s.query_len)
        fresh_index, fresh_cu_seqlens = to_device(rows, torch.long), to_device(offsets, torch.int32)
    by_query_len: dict[int, list[SequenceSlice]] = {}
    for s in meta.sequences:
        if s.context_len > 0:
            by_query_len.setdefault(s.query_len, []).append(s)
    calls = []
    block = meta.block_size
    for query_len, seqs in by_query_len.items():
        pages = [-(-s.total_len // block) for s in seqs]  # each sequence's pages, from its first
        table = [[0] * max(pages) for _ in seqs]
        for row, (s, count) in enumerate(zip(seqs, pages)):
            first_page = s.kv_start // block
            table[row][:count] = range(first_page, first_page + count)
        rows = [r for s in seqs for r in range(s.query_start, s.query_start + query_len)]
        calls.append(FlashFromCache(to_device(rows, torch.long), to_device(table, torch.int32),
                                    to_device([s.total_len for s in seqs], torch.int32), len(seqs), query_len))
    plan = meta.plans["flash"] = FlashPlan(fresh_index, fresh_cu_seqlens, max((s.query_len for s in fresh), default=0),
                                           tuple(calls))
    return plan


class FlashAttentionBackend:
    """flash-attn 2 on CUDA. The arena is viewed as pages of `block_size` slots.

    flash-attn requires a page size that is a multiple of 256, so the KV cache's block size
    must be too (checked at construction of the engine).
    """

    name = "flash"
    token_major = True
    PAGE_MULTIPLE = 256

    def __init__(self, module=None) -> None:
        self.flash = module if module is not None else importlib.import_module("flash_attn")

    def __call__(self, q, k, v, k_cache, v_cache, meta, *, scale, window):
        # flash-attn computes in the model's dtype (fp16/bf16), and reads the cache in that same
        # dtype (the engine refuses flash-attn for any other cache dtype).
        write_kv(k, v, k_cache, v_cache, meta, token_major=True)
        out = torch.empty_like(q)
        # NOTE: flash-attn counts a window as (left, right) keys beside the query; (window-1, 0)
        # is "query i sees keys i-window+1 .. i"; (-1, -1) is no window.
        window_size = (window - 1, 0) if window is not None else (-1, -1)
        plan = flash_plan(meta, q.device)
        if plan.fresh_index is not None:
            index = plan.fresh_index
            out[index] = self.flash.flash_attn_varlen_func(
                q[index], k[index], v[index], cu_seqlens_q=plan.fresh_cu_seqlens, cu_seqlens_k=plan.fresh_cu_seqlens,
                max_seqlen_q=plan.fresh_max_len, max_seqlen_k=plan.fresh_max_len, dropout_p=0.0,
                softmax_scale=scale, causal=True, window_size=window_size)
        slots, heads, dim = k_cache.shape
        pages_k = k_cache.view(slots // meta.block_size, meta.block_size, heads, dim)
        pages_v = v_cache.view(slots // meta.block_size, meta.block_size, heads, dim)
        for call in plan.from_cache:  # decodes in one call; continued prefills by query length
            q_batch = q[call.index].view(call.batch, call.query_len, heads, dim)  # [batch, q, heads, dim]
            result = self.flash.flash_attn_with_kvcache(
                q_batch, pages_k, pages_v, cache_seqlens=call.cache_seqlens, block_table=call.block_table,
                softmax_scale=scale, causal=True, window_size=window_size)
            out[call.index] = result.reshape(-1, heads, dim)
        return out


# FlashAttention-2 runs on Ampere or newer GPUs (A100, A10G, L4, H100); a T4 or V100 would
# fail at the first forward, so `auto` takes SDPA there.
FLASH_ATTN_MIN_CAPABILITY = (8, 0)


def flash_kernels_run(module, device: torch.device | str) -> bool:
    """Whether `module`'s flash-attn kernels run on `device`: one call on two float16 tokens.
    The capability check is not enough: flash-attn 2 builds check for sm8x or sm90 in their C++
    (`TORCH_CHECK(is_sm90 || is_sm8x, "FlashAttention only supports Ampere GPUs or newer.")`),
    so a newer GPU such as a Blackwell passes the check and then fails every request; so does a
    build without kernels for the card. What failed is logged."""
    try:
        tokens = torch.zeros(2, 1, 64, dtype=torch.float16, device=device)  # [tokens, heads, head_dim]
        offsets = torch.tensor([0, 2], dtype=torch.int32, device=device)
        module.flash_attn_varlen_func(tokens, tokens, tokens, cu_seqlens_q=offsets, cu_seqlens_k=offsets,
                                      max_seqlen_q=2, max_seqlen_k=2, causal=True)
        if torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)  # a kernel's launch is asynchronous: its own failure shows here
    except Exception as exc:  # noqa: BLE001 - any refusal means: not on this device
        logger.warning("neo-serve: flash-attn does not run on %s (%r); attention_backend auto takes SDPA", device, exc)
        return False
    return True


def flash_attn_available(device: torch.device | str | None = None, *, run_check: bool = True) -> bool:
    """flash-attn is installed and runs on the CUDA device (default: the current one), checked
    with one call (milliseconds, where a stage loads). `run_check=False` reads the capability
    only: a process that checks a config (an app's build on a GPU host) must not make a CUDA
    context, hundreds of MB on a GPU that a replica may get."""
    if not torch.cuda.is_available():
        return False
    if tuple(torch.cuda.get_device_capability(device)) < FLASH_ATTN_MIN_CAPABILITY:
        return False
    try:
        module = importlib.import_module("flash_attn")
    except ImportError:
        return False
    return not run_check or flash_kernels_run(module, device if device is not None else "cuda")


def require_flash_attn(device: torch.device | str, *, run_check: bool = True) -> None:
    """Refuse an explicit `flash` on a CUDA device that cannot run it; else flash-attn's own error
    comes at the first forward, and every request fails. (On a CPU only the tests' stand-in runs.)"""
    if torch.device(device).type == "cuda" and not flash_attn_available(device, run_check=run_check):
        raise ConfigError(f"attention_backend flash cannot run on {device}: it needs the flash-attn package "
                          "(pip install -e '.[gpu]'), an Ampere or newer GPU (compute capability "
                          f"{FLASH_ATTN_MIN_CAPABILITY[0]}.{FLASH_ATTN_MIN_CAPABILITY[1]}) and a flash-attn build "
                          "whose kernels run on it (the log has what a one-call check raised); set "
                          "attention_backend to auto or sdpa")


def make_backend(name: str, device: torch.device | str = "cpu") -> AttentionBackend:
    """`auto` picks flash-attn on a CUDA device that can run it when installed, otherwise SDPA."""
    if name == "auto":
        name = "flash" if torch.device(device).type == "cuda" and flash_attn_available(device) else "sdpa"
    elif name == "flash":
        require_flash_attn(device)
    if name == "sdpa":
        return SdpaBackend(batch_decodes=torch.device(device).type == "cuda")
    if name == "reference":
        return ReferenceBackend()
    if name == "flash":
        return FlashAttentionBackend()
    raise ValueError(f"attention backend {name!r} is not one of auto, sdpa, reference, flash")
