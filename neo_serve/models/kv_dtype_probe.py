"""The KV cache dtype that makes CPU decode attention fastest on this machine, measured once.

CPU SDPA decode kernels in bfloat16/float16 are fast on some CPUs and very slow on others:
- Intel Xeon with AMX / AVX512-BF16 (2 vCPUs, Pythia-160M shape): 22 us per bfloat16 call
  against 30 us in float32, and a bfloat16 cache halves the bytes attention reads (64 streams:
  538 tok/s instead of 413, docs/benchmarks.md);
- AMD EPYC without them: bfloat16 calls ~50x slower than float32.
So for a half-precision model on CPU, `kv_cache_dtype: auto` times one decode call in each
dtype when the stage loads, and keeps the model's dtype only when it is clearly faster.
"""

from __future__ import annotations

import functools
import logging
import time

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

# The narrow dtype must win by this much: near a tie, run-to-run noise would flip the choice
# (and with it the KV rounding) from one start to the next; float32 is the safer side.
REQUIRED_SPEEDUP = 1.2
PROBE_KEYS = 512  # keys per call: a mid-length sequence
PROBE_CALLS = 7  # the fastest of these is the kernel's speed; slower ones met other load


@functools.lru_cache(maxsize=None)
def decode_call_seconds(dtype: torch.dtype, num_heads: int, head_dim: int) -> float:
    """Fastest of PROBE_CALLS single-query SDPA calls over PROBE_KEYS cached keys, on CPU."""
    generator = torch.Generator().manual_seed(0)
    query = torch.randn(1, num_heads, 1, head_dim, generator=generator).to(dtype)
    keys = torch.randn(1, num_heads, PROBE_KEYS, head_dim, generator=generator).to(dtype)
    values = torch.randn(1, num_heads, PROBE_KEYS, head_dim, generator=generator).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        F.scaled_dot_product_attention(query, keys, values)  # first call: kernel dispatch, allocation
        for _ in range(PROBE_CALLS):
            started = time.perf_counter()
            F.scaled_dot_product_attention(query, keys, values)
            best = min(best, time.perf_counter() - started)
    return best


def cpu_kv_cache_dtype(model_dtype: torch.dtype, num_heads: int, head_dim: int) -> torch.dtype:
    """`auto` on CPU: float32, or the model's half-precision dtype where its kernels are faster."""
    if model_dtype == torch.float32:
        return torch.float32
    narrow = decode_call_seconds(model_dtype, num_heads, head_dim)
    wide = decode_call_seconds(torch.float32, num_heads, head_dim)
    chosen = choose(model_dtype, narrow_seconds=narrow, float32_seconds=wide)
    logger.info("KV cache dtype auto -> %s: one decode attention call takes %.0f us in %s, %.0f us in float32",
                str(chosen).removeprefix("torch."), narrow * 1e6, str(model_dtype).removeprefix("torch."), wide * 1e6)
    return chosen


def choose(model_dtype: torch.dtype, *, narrow_seconds: float, float32_seconds: float) -> torch.dtype:
    return model_dtype if narrow_seconds * REQUIRED_SPEEDUP <= float32_seconds else torch.float32
