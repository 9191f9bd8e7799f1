"""Tiny random checkpoints built with transformers' own classes (the reference; test-only)."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL = "<|endoftext|>"


def _corpus() -> list[str]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [p.read_text(errors="ignore") for p in sorted(stdlib.glob("*.py"))[:40]]
    texts.append("Grüße, naïve café — 日本語のテキスト, emoji 🙂🚀, and plain English prose. " * 20)
    return texts


def build_tokenizer(vocab_size: int = 512) -> Tokenizer:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def save_tokenizer_json(tokenizer: Tokenizer, directory: Path) -> None:
    tokenizer.save(str(directory / "tokenizer.json"))
    _write_special_tokens(directory)


def save_vocab_merges(tokenizer: Tokenizer, directory: Path) -> None:
    """What the GPT-Neo Hub repos ship: vocab.json + merges.txt, no tokenizer.json."""
    tokenizer.model.save(str(directory))
    _write_special_tokens(directory)


def _write_special_tokens(directory: Path) -> None:
    (directory / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": SPECIAL, "eos_token": SPECIAL, "unk_token": SPECIAL}))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "GPT2Tokenizer", "bos_token": SPECIAL, "eos_token": SPECIAL,
         "unk_token": SPECIAL, "add_prefix_space": False, "model_max_length": 2048}))


def make_neox(directory: Path, tokenizer: Tokenizer, *, seed: int = 0, shard: bool = False,
              hub_style: bool = False, **overrides) -> Path:
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_hidden_layers=4,
                    num_attention_heads=4, intermediate_size=160, max_position_embeddings=512,
                    rotary_pct=0.25, rotary_emb_base=10000, hidden_act="gelu", use_parallel_residual=True,
                    initializer_range=0.15, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoXForCausalLM(GPTNeoXConfig(**settings)).eval()
    model.save_pretrained(directory, safe_serialization=True, max_shard_size="100KB" if shard else "10GB")
    save_tokenizer_json(tokenizer, directory)
    if hub_style:
        _make_hub_style_neox(directory, settings)
    return directory


def _make_hub_style_neox(directory: Path, settings: dict) -> None:
    """Rewrite as GPT-NeoX-20B is published: old config keys, legacy buffers in the weights."""
    config = json.loads((directory / "config.json").read_text())
    rope = config.pop("rope_parameters", {})
    config.pop("use_parallel_residual", None)  # absent on the Hub means parallel residual
    config["rotary_pct"] = rope.get("partial_rotary_factor", settings["rotary_pct"])
    config["rotary_emb_base"] = rope.get("rope_theta", settings["rotary_emb_base"])
    config["torch_dtype"] = config.pop("dtype", "float32")
    config["hidden_act"] = "gelu_fast"
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    weights = directory / "model.safetensors"
    tensors = load_file(weights)
    head_dim = settings["hidden_size"] // settings["num_attention_heads"]
    rot = int(head_dim * settings["rotary_pct"])
    positions = settings["max_position_embeddings"]
    for layer in range(settings["num_hidden_layers"]):
        prefix = f"gpt_neox.layers.{layer}.attention."
        tensors[prefix + "bias"] = torch.tril(torch.ones(positions, positions, dtype=torch.bool)).view(1, 1, positions, positions)
        tensors[prefix + "masked_bias"] = torch.tensor(-1e9)
        tensors[prefix + "rotary_emb.inv_freq"] = 1.0 / (10000 ** (torch.arange(0, rot, 2).float() / rot))
    save_file(tensors, weights, metadata={"format": "pt"})


def make_neo(directory: Path, tokenizer: Tokenizer, *, seed: int = 0, **overrides) -> Path:
    from transformers import GPTNeoConfig, GPTNeoForCausalLM

    directory.mkdir(parents=True, exist_ok=True)
    settings = dict(vocab_size=tokenizer.get_vocab_size(), hidden_size=64, num_layers=4, num_heads=4,
                    intermediate_size=None, max_position_embeddings=512, window_size=16,
                    attention_types=[[["global", "local"], 2]], activation_function="gelu_new",
                    initializer_range=0.15, bos_token_id=0, eos_token_id=0)
    settings.update(overrides)
    torch.manual_seed(seed)
    model = GPTNeoForCausalLM(GPTNeoConfig(**settings)).eval()
    model.save_pretrained(directory, safe_serialization=True)
    save_vocab_merges(tokenizer, directory)
    return directory


def reference_greedy(model, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    """A plain greedy loop over the transformers model (full recompute each step)."""
    ids = torch.tensor([prompt_ids])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(ids).logits[0, -1]
            token = int(logits.argmax())
            out.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    return out


def reference_prompt_logprobs(model, prompt_ids: list[int]) -> list[float]:
    with torch.no_grad():
        logits = model(torch.tensor([prompt_ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, prompt_ids[i]]) for i in range(1, len(prompt_ids))]
