"""GPT-Neo (125M / 1.3B / 2.7B): Attention -> MLP -> Block -> Model -> ForCausalLM.

Hugging Face parameter names (`transformer.h.N.attn.attention.q_proj.weight`, ...). A module
holds one pipeline stage, as in gpt_neox.py.
"""

from __future__ import annotations

import torch
from torch import nn

from neo_serve.config import GPTNeoConfig
from neo_serve.models.attention import AttentionBackend, AttentionMetadata
from neo_serve.models.layers import ACTIVATIONS, Embedding
from neo_serve.models.stages import StageSpec


class GPTNeoSelfAttention(nn.Module):
    def __init__(self, config: GPTNeoConfig, window: int | None, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.window = window
        self.q_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.k_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.v_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=False)
        self.out_proj = nn.Linear(config.hidden_size, config.hidden_size, bias=True)
        self.backend = backend

    def forward(self, hidden, k_cache, v_cache, meta):
        shape = (hidden.shape[0], self.num_heads, self.head_dim)
        q = self.q_proj(hidden).view(shape)
        k = self.k_proj(hidden).view(shape)
        v = self.v_proj(hidden).view(shape)
        # NOTE: GPT-Neo does not scale attention logits by 1/sqrt(head_dim): scale is 1.0. Its
        # logits reach ~1e5, past float16's 65504; transformers computes q.k in float32 for it.
        # Every backend here reduces in float32 too: flash-attn and SDPA's fused kernels always,
        # SDPA's math fallback since torch 2.5 (unless a caller turns on
        # torch.backends.cuda.allow_fp16_bf16_reduction_math_sdp), the CPU's math path upcasts
        # (tests/test_attention_backends.py checks a float16 cache against the reference).
        out = self.backend(q, k, v, k_cache, v_cache, meta, scale=1.0, window=self.window)
        return self.out_proj(out.reshape(hidden.shape[0], -1))


class GPTNeoAttention(nn.Module):
    """Hugging Face nests the self-attention one level deeper: `attn.attention.q_proj`."""

    def __init__(self, config: GPTNeoConfig, layer_index: int, backend: AttentionBackend) -> None:
        super().__init__()
        # NOTE: local layers see a sliding window of `window_size` keys (query i: i-window+1 .. i).
        local = config.attention_layers[layer_index] == "local"
        self.attention = GPTNeoSelfAttention(config, config.window_size if local else None, backend)

    def forward(self, hidden, k_cache, v_cache, meta):
        return self.attention(hidden, k_cache, v_cache, meta)


class GPTNeoMLP(nn.Module):
    def __init__(self, config: GPTNeoConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(config.hidden_size, config.intermediate_size)
        self.c_proj = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.c_proj(self.act(self.c_fc(hidden)))


class GPTNeoBlock(nn.Module):
    def __init__(self, config: GPTNeoConfig, layer_index: int, backend: AttentionBackend) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attn = GPTNeoAttention(config, layer_index, backend)
        self.ln_2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = GPTNeoMLP(config)

    def forward(self, hidden, k_cache, v_cache, meta):
        hidden = hidden + self.attn(self.ln_1(hidden), k_cache, v_cache, meta)
        return hidden + self.mlp(self.ln_2(hidden))


class GPTNeoModel(nn.Module):
    def __init__(self, config: GPTNeoConfig, stage: StageSpec, backend: AttentionBackend) -> None:
        super().__init__()
        # NOTE: learned absolute positions, added to the token embedding on the first stage.
        self.wte = Embedding(config.vocab_size, config.hidden_size) if stage.is_first else None
        self.wpe = Embedding(config.max_position_embeddings, config.hidden_size) if stage.is_first else None
        self.h = nn.ModuleDict({str(i): GPTNeoBlock(config, i, backend) for i in stage.layer_indices})
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps) if stage.is_last else None


class GPTNeoForCausalLM(nn.Module):
    def __init__(self, config: GPTNeoConfig, stage: StageSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.transformer = GPTNeoModel(config, stage, backend)
        # NOTE: lm_head is tied to wte in the checkpoints. The last stage keeps its own copy
        # (loaded from transformer.wte.weight) because wte itself lives on the first stage.
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if stage.is_last else None

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """See GPTNeoXForCausalLM.forward: same shapes and contract."""
        if self.stage.is_first:
            hidden = self.transformer.wte(inputs) + self.transformer.wpe(positions)
        else:
            hidden = inputs
        for local, block in enumerate(self.transformer.h.values()):
            hidden = block(hidden, kv_cache[local, 0], kv_cache[local, 1], meta)
        if self.stage.is_last:
            hidden = self.transformer.ln_f(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> logits [rows, vocab] in the model's dtype: sampling widens them."""
        return self.lm_head(hidden)

    def tied_weights(self) -> dict[str, str]:
        """Parameter -> the checkpoint tensor it is read from when the checkpoint omits it. Both
        ways: a converter that drops one name of a shared tensor may keep either."""
        return {"lm_head.weight": "transformer.wte.weight", "transformer.wte.weight": "lm_head.weight"}
