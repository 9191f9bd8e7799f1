"""Engine configuration, validated where it is built."""

from __future__ import annotations

from dataclasses import dataclass

# No torch at import: the router builds these configs (neo_serve.serve.config) and needs no torch.
DTYPE_NAMES = ("float32", "bfloat16", "float16")  # neo_serve.loader.DTYPES maps them to torch dtypes

ATTENTION_BACKENDS = ("auto", "sdpa", "reference", "flash")


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """How to run one model. `model` is a checkpoint directory in Hugging Face's layout."""

    model: str
    tokenizer: str | None = None  # directory with tokenizer files; defaults to `model`
    dtype: str = "auto"  # auto (the checkpoint's; float16 -> float32 on CPU) | float32 | bfloat16 | float16
    num_stages: int = 1
    device: str = "auto"  # auto: cuda when available, else cpu
    kv_cache_tokens: int = 32768  # KV slots per stage (every stage holds its layers' share)
    block_size: int | None = None  # KV allocation granularity; default 16, 256 where stages may run flash-attn
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None  # default: the model's context window (max_position_embeddings, x a linear RoPE factor)
    attention_backend: str = "auto"
    kv_cache_dtype: str = "auto"  # auto: the model's dtype on GPU; on CPU see models/kv_dtype_probe.py
    pack_cpu_linears: bool = True  # oneDNN-prepacked linear weights on CPU (2-4x faster than MKL here)
    seed: int = 0  # for unseeded requests' draws

    def __post_init__(self) -> None:
        if self.dtype != "auto" and self.dtype not in DTYPE_NAMES:
            raise ValueError(f"dtype must be auto or one of {', '.join(DTYPE_NAMES)}, got {self.dtype!r}")
        if self.kv_cache_dtype != "auto" and self.kv_cache_dtype not in DTYPE_NAMES:
            raise ValueError(f"kv_cache_dtype must be auto or one of {', '.join(DTYPE_NAMES)}, "
                             f"got {self.kv_cache_dtype!r}")
        if self.attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(f"attention_backend must be one of {ATTENTION_BACKENDS}, got {self.attention_backend!r}")
        for name in ("num_stages", "kv_cache_tokens", "max_num_seqs", "max_num_batched_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.block_size is not None and self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {self.block_size}")

    @property
    def resolved_device(self) -> str:
        if self.device == "auto":
            import torch

            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device
