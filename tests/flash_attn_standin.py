"""A stand-in for the `flash_attn` package: flash-attn 2.8's documented Python signatures,
computed with plain torch on CPU, checking the argument contracts the CUDA kernels enforce
(float16 or bfloat16 only, one dtype for queries, keys and the cache, int32 index tensors,
Python-int max lengths, pages of a multiple of 256, bottom-right causal alignment, (left, right)
windows). Used only to test neo-serve's flash backend glue."""

from __future__ import annotations

import torch

calls: dict[str, int] = {"varlen": 0, "kvcache": 0}
# flash_api.cpp: TORCH_CHECK(q_dtype == torch::kFloat16 || q_dtype == torch::kBFloat16, ...)
HALF_DTYPES = (torch.float16, torch.bfloat16)


def _attend(q, k, v, scale, causal, window_size):
    """q: [sq, H, D]; k, v: [sk, H, D] -> [sq, H, D], masks aligned bottom-right."""
    sq, sk = q.shape[0], k.shape[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k.float()) * scale
    i = torch.arange(sq).unsqueeze(1) + (sk - sq)  # query row's position among the keys
    j = torch.arange(sk).unsqueeze(0)
    left, right = window_size
    if causal:
        right = 0
    allowed = torch.ones(sq, sk, dtype=torch.bool)
    if right >= 0:
        allowed &= j <= i + right
    if left >= 0:
        allowed &= j >= i - left
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.nan_to_num(scores.softmax(dim=-1))  # fully masked rows give 0, as the kernel does
    return torch.einsum("hqk,khd->qhd", probs, v.float()).to(q.dtype)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    assert q.dtype in HALF_DTYPES, "FlashAttention only support fp16 and bf16 data type"
    assert q.dtype == k.dtype == v.dtype, "query and key must have the same dtype"
    assert cu_seqlens_q.dtype == torch.int32 and cu_seqlens_k.dtype == torch.int32
    assert isinstance(max_seqlen_q, int) and isinstance(max_seqlen_k, int)
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
    assert dropout_p == 0.0 and block_table is None
    calls["varlen"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(cu_seqlens_q.numel() - 1):
        qs, qe = int(cu_seqlens_q[b]), int(cu_seqlens_q[b + 1])
        ks, ke = int(cu_seqlens_k[b]), int(cu_seqlens_k[b + 1])
        assert qe - qs <= max_seqlen_q and ke - ks <= max_seqlen_k
        out[qs:qe] = _attend(q[qs:qe], k[ks:ke], v[ks:ke], scale, causal, window_size)
    return out


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None,
                            cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, block_table=None,
                            softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                            rotary_interleaved=True, alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    assert k is None and v is None and rotary_cos is None  # neo-serve writes K/V and applies rotary itself
    assert q.dim() == 4 and k_cache.dim() == 4
    assert q.dtype in HALF_DTYPES, "FlashAttention only support fp16 and bf16 data type"
    assert q.dtype == k_cache.dtype == v_cache.dtype, "query and key must have the same dtype"
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, "KV cache must have contiguous last dimension"
    assert isinstance(cache_seqlens, torch.Tensor) and cache_seqlens.dtype == torch.int32
    assert cache_seqlens.shape == (q.shape[0],) and cache_seqlens.is_contiguous()
    calls["kvcache"] += 1
    scale = softmax_scale if softmax_scale is not None else q.shape[-1] ** -0.5
    out = torch.empty_like(q)
    for b in range(q.shape[0]):
        length = int(cache_seqlens[b])
        if block_table is not None:
            assert block_table.dtype == torch.int32 and cache_batch_idx is None
            assert block_table.dim() == 2 and block_table.shape[0] == q.shape[0] and block_table.is_contiguous()
            page = k_cache.shape[1]
            assert page % 256 == 0, "Paged KV cache block size must be divisible by 256"
            pages = block_table[b, :-(-length // page)].long()
            keys = k_cache[pages].reshape(-1, *k_cache.shape[2:])[:length]
            values = v_cache[pages].reshape(-1, *v_cache.shape[2:])[:length]
        else:
            row = int(cache_batch_idx[b]) if cache_batch_idx is not None else b
            keys, values = k_cache[row, :length], v_cache[row, :length]
        out[b] = _attend(q[b], keys, values, scale, causal, window_size)
    return out
