"""Hugging Face `config.json` -> one validated dataclass per model family.

Both spellings found in the wild are read: the keys published on the Hub (GPT-NeoX-20B's
`rotary_pct` / `rotary_emb_base`, no `use_parallel_residual`; GPT-Neo's `attention_types`)
and the keys current transformers writes (`rope_parameters` with `partial_rotary_factor` and
`rope_theta`, `dtype` instead of `torch_dtype`). RoPE scaling: `linear` only (others are
refused by name rather than served wrong).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from neo_serve.errors import ConfigError, UnsupportedArchitectureError

# The keys of neo_serve.models.layers.ACTIVATIONS (a test keeps them equal).
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_python", "gelu_new", "gelu_fast", "gelu_accurate", "gelu_pytorch_tanh", "relu",
                         "relu6", "silu", "swish", "tanh", "quick_gelu")
CHECKPOINT_DTYPES = ("float32", "float16", "bfloat16")


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """What every supported family shares. Built by `load_model_config`, validated here."""

    architecture: ClassVar[str]
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int
    max_position_embeddings: int
    layer_norm_eps: float
    activation: str
    bos_token_id: int | None
    eos_token_id: int | None
    checkpoint_dtype: str | None  # the dtype the weights were saved in, if the config says
    # A config may name several end tokens (`eos_token_id: [0, 50277]`, as chat fine-tunes do);
    # generation stops at any of them, as transformers' does. The first is `eos_token_id`.
    more_eos_token_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"config.json: {name} must be a positive integer, got {value!r}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(
                f"config.json: hidden_size ({self.hidden_size}) must be divisible by the number of "
                f"attention heads ({self.num_heads})")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"config.json: activation {self.activation!r} is not supported; "
                f"supported: {', '.join(SUPPORTED_ACTIVATIONS)}")
        if self.checkpoint_dtype is not None and self.checkpoint_dtype not in CHECKPOINT_DTYPES:
            raise ConfigError(f"config.json: dtype {self.checkpoint_dtype!r} is not one of {CHECKPOINT_DTYPES}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def context_window(self) -> int:
        """Most positions a sequence may take (the default and the limit of max_model_len)."""
        return self.max_position_embeddings


@dataclass(frozen=True, kw_only=True)
class GPTNeoXConfig(ModelConfig):
    """GPT-NeoX-20B, Pythia and any `GPTNeoXForCausalLM` checkpoint."""

    architecture: ClassVar[str] = "GPTNeoXForCausalLM"
    rotary_pct: float = 0.25
    rotary_base: float = 10000.0
    rotary_position_scale: float = 1.0  # linear RoPE scaling: positions are divided by this factor
    use_parallel_residual: bool = True
    attention_bias: bool = True
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.rotary_pct <= 1.0:
            raise ConfigError(f"config.json: rotary_pct must be in (0, 1], got {self.rotary_pct}")
        if self.rotary_dim % 2:
            raise ConfigError(f"config.json: rotary dims ({self.rotary_dim}) must be even")
        if not self.rotary_position_scale > 0:
            raise ConfigError(f"config.json: rope scaling factor must be > 0, got {self.rotary_position_scale}")

    @property
    def context_window(self) -> int:
        # Linear RoPE scaling stretches the trained positions by its factor: the window the
        # fine-tune was made for, as vLLM derives it (max_position_embeddings x factor).
        return int(self.max_position_embeddings * max(1.0, self.rotary_position_scale))

    @property
    def rotary_dim(self) -> int:
        # NOTE: partial rotary: only the first rotary_pct of each head's dims are rotated.
        return int(self.head_dim * self.rotary_pct)


@dataclass(frozen=True, kw_only=True)
class GPTNeoConfig(ModelConfig):
    """GPT-Neo 125M / 1.3B / 2.7B (`GPTNeoForCausalLM`)."""

    architecture: ClassVar[str] = "GPTNeoForCausalLM"
    attention_layers: tuple[str, ...] = field(default=())  # "global" | "local", one per layer
    window_size: int = 256

    def __post_init__(self) -> None:
        super().__post_init__()
        if len(self.attention_layers) != self.num_layers:
            raise ConfigError(
                f"config.json: attention_types expands to {len(self.attention_layers)} layers but "
                f"num_layers is {self.num_layers}")
        bad = sorted({kind for kind in self.attention_layers if kind not in ("global", "local")})
        if bad:
            raise ConfigError(f"config.json: attention_types has unknown kinds {bad}; expected global or local")
        if self.window_size <= 0:
            raise ConfigError(f"config.json: window_size must be positive, got {self.window_size}")


SUPPORTED_ARCHITECTURES: dict[str, type[ModelConfig]] = {
    GPTNeoXConfig.architecture: GPTNeoXConfig,
    GPTNeoConfig.architecture: GPTNeoConfig,
}
_MODEL_TYPES = {"gpt_neox": GPTNeoXConfig.architecture, "gpt_neo": GPTNeoConfig.architecture}


def load_model_config(path: str | Path) -> ModelConfig:
    """Read a checkpoint directory's (or a file's) config.json into its family's dataclass."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not path.exists():
        raise ConfigError(f"{path} does not exist (a checkpoint directory with config.json, safetensors weights "
                          "and a tokenizer)")
    if not file.is_file():
        raise ConfigError(f"no config.json at {file}")
    try:
        raw = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{file}: not valid JSON ({exc})") from exc
    if not isinstance(raw, dict):
        raise ConfigError(f"{file}: expected a JSON object")
    try:
        config = config_from_dict(raw)
    except ConfigError as exc:
        raise type(exc)(f"{file}: {exc}") from None
    if file.name != "config.json":  # e.g. a reference copy named gpt-neox-20b.config.json: no checkpoint
        return config
    return _with_generation_eos(config, file.parent / "generation_config.json")


def _with_generation_eos(config: ModelConfig, file: Path) -> ModelConfig:
    """Also stop at the end tokens of generation_config.json, as transformers' `generate` (which
    reads only that file) and vLLM do: a fine-tune may name its chat end token only there."""
    if not file.is_file():
        return config
    try:
        eos = json.loads(file.read_text()).get("eos_token_id")
    except (json.JSONDecodeError, AttributeError) as exc:
        raise ConfigError(f"{file}: not a JSON object ({exc})") from None
    ids = eos if isinstance(eos, list) else [eos]
    if not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids if i is not None):
        raise ConfigError(f"{file}: eos_token_id must be a token id or a list of them, got {eos!r}")
    known = {config.eos_token_id, *config.more_eos_token_ids}
    extra = tuple(dict.fromkeys(i for i in ids if i is not None and i not in known))
    if not extra:
        return config
    if config.eos_token_id is None:
        return dataclasses.replace(config, eos_token_id=extra[0], more_eos_token_ids=extra[1:])
    return dataclasses.replace(config, more_eos_token_ids=config.more_eos_token_ids + extra)


def config_from_dict(raw: dict[str, Any]) -> ModelConfig:
    architecture = _architecture_of(raw)
    if raw.get("quantization_config"):
        method = (raw["quantization_config"] or {}).get("quant_method", "unknown") \
            if isinstance(raw["quantization_config"], dict) else "unknown"
        raise ConfigError(f"quantized checkpoints are not supported (quantization_config: {method}); serve the "
                          "original float16 / bfloat16 / float32 weights")
    common = _common_fields(raw)
    if architecture == GPTNeoXConfig.architecture:
        return _neox_from_dict(raw, common)
    return _neo_from_dict(raw, common)


def _architecture_of(raw: dict[str, Any]) -> str:
    architectures = raw.get("architectures") or []
    if not architectures and raw.get("model_type") in _MODEL_TYPES:
        architectures = [_MODEL_TYPES[raw["model_type"]]]
    for name in architectures:
        if name in SUPPORTED_ARCHITECTURES:
            return name
    found = architectures or [raw.get("model_type", "<none>")]
    raise UnsupportedArchitectureError(
        f"unsupported architecture {', '.join(map(str, found))}; neo-serve supports "
        f"{', '.join(SUPPORTED_ARCHITECTURES)}")


def _first(raw: dict[str, Any], *keys: str, default: Any = None) -> Any:
    for key in keys:
        if raw.get(key) is not None:
            return raw[key]
    return default


def _common_fields(raw: dict[str, Any]) -> dict[str, Any]:
    dtype = _first(raw, "dtype", "torch_dtype")
    eos = raw.get("eos_token_id")
    eos_ids = list(eos) if isinstance(eos, list) else [eos]  # one id, None, or a list of them
    return {
        "vocab_size": raw.get("vocab_size"),
        "hidden_size": raw.get("hidden_size"),
        "max_position_embeddings": raw.get("max_position_embeddings", 2048),
        "bos_token_id": raw.get("bos_token_id"),
        "eos_token_id": eos_ids[0] if eos_ids else None,
        "more_eos_token_ids": tuple(eos_ids[1:]),
        "checkpoint_dtype": str(dtype).removeprefix("torch.") if dtype else None,
    }


def _neox_from_dict(raw: dict[str, Any], common: dict[str, Any]) -> GPTNeoXConfig:
    rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ("default", "linear", None):
        raise ConfigError(f"rope_parameters.rope_type {rope_type!r} is not supported (only 'default' and 'linear')")
    # Linear scaling (position interpolation, long-context fine-tunes): positions / factor.
    position_scale = float(rope.get("factor", 1.0)) if rope_type == "linear" else 1.0
    hidden = common["hidden_size"]
    return GPTNeoXConfig(
        **common,
        num_layers=raw.get("num_hidden_layers"),
        num_heads=raw.get("num_attention_heads"),
        intermediate_size=_first(raw, "intermediate_size", default=4 * hidden if hidden else None),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        activation=raw.get("hidden_act", "gelu"),
        rotary_pct=float(_first(rope, "partial_rotary_factor", default=None)
                         or _first(raw, "partial_rotary_factor", "rotary_pct", default=0.25)),
        rotary_base=float(_first(rope, "rope_theta", default=None)
                          or _first(raw, "rope_theta", "rotary_emb_base", default=10000.0)),
        # NOTE: GPT-NeoX-20B's published config has no use_parallel_residual key; it means true.
        rotary_position_scale=position_scale,
        use_parallel_residual=bool(raw.get("use_parallel_residual", True)),
        attention_bias=bool(raw.get("attention_bias", True)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
    )


def _neo_from_dict(raw: dict[str, Any], common: dict[str, Any]) -> GPTNeoConfig:
    hidden = common["hidden_size"]
    num_layers = _first(raw, "num_layers", "num_hidden_layers")
    return GPTNeoConfig(
        **common,
        num_layers=num_layers,
        num_heads=_first(raw, "num_heads", "num_attention_heads"),
        intermediate_size=_first(raw, "intermediate_size", default=4 * hidden if hidden else None),
        layer_norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
        activation=raw.get("activation_function", "gelu_new"),
        attention_layers=_expand_attention_types(raw),
        window_size=int(raw.get("window_size", 256)),
    )


def _expand_attention_types(raw: dict[str, Any]) -> tuple[str, ...]:
    """`[[["global", "local"], 12]]` -> ("global", "local", ..., 24 entries)."""
    if raw.get("attention_types"):
        layers: list[str] = []
        try:
            for pattern, repeat in raw["attention_types"]:
                layers.extend(list(pattern) * int(repeat))
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"attention_types must look like [[['global', 'local'], N]]: {exc}") from None
        return tuple(layers)
    return tuple(raw.get("attention_layers") or ())
