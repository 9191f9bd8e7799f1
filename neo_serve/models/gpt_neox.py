"""GPT-NeoX (GPT-NeoX-20B, Pythia): Attention -> MLP -> Layer -> Model -> ForCausalLM.

Parameter names are Hugging Face's (`gpt_neox.layers.N.attention.query_key_value.weight`, ...)
so that loading is a name-to-name copy. A module holds one pipeline stage: only the layers in
`stage.layer_start .. stage.layer_end`, the embedding on the first stage and the final norm
and `embed_out` on the last.
"""

from __future__ import annotations

import torch
from torch import nn

from neo_serve.config import GPTNeoXConfig
from neo_serve.models.attention import AttentionBackend, AttentionMetadata
from neo_serve.models.layers import ACTIVATIONS, Embedding, RotaryEmbedding, default_scale
from neo_serve.models.stages import StageSpec


class GPTNeoXAttention(nn.Module):
    def __init__(self, config: GPTNeoXConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.head_dim = config.head_dim
        self.scale = default_scale(config.head_dim)
        self.query_key_value = nn.Linear(config.hidden_size, 3 * config.hidden_size, bias=config.attention_bias)
        self.dense = nn.Linear(config.hidden_size, config.hidden_size, bias=config.attention_bias)
        self.rotary = rotary  # shared by all layers of the stage; holds no parameters
        self.backend = backend

    def forward(self, hidden: torch.Tensor, positions: torch.Tensor, k_cache: torch.Tensor,
                v_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        tokens = hidden.shape[0]
        # NOTE: the fused QKV output is head-interleaved: [tokens, heads, (q|k|v), head_dim],
        # not [q for all heads | k for all heads | v ...].
        qkv = self.query_key_value(hidden).view(tokens, self.num_heads, 3, self.head_dim)
        q, k, v = qkv.unbind(dim=2)  # each [tokens, heads, head_dim]
        q, k = self.rotary(positions, q, k)
        out = self.backend(q, k, v, k_cache, v_cache, meta, scale=self.scale, window=None)
        return self.dense(out.reshape(tokens, -1))


class GPTNeoXMLP(nn.Module):
    def __init__(self, config: GPTNeoXConfig) -> None:
        super().__init__()
        self.dense_h_to_4h = nn.Linear(config.hidden_size, config.intermediate_size)
        self.dense_4h_to_h = nn.Linear(config.intermediate_size, config.hidden_size)
        self.act = ACTIVATIONS[config.activation]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.dense_4h_to_h(self.act(self.dense_h_to_4h(hidden)))


class GPTNeoXLayer(nn.Module):
    def __init__(self, config: GPTNeoXConfig, rotary: RotaryEmbedding, backend: AttentionBackend) -> None:
        super().__init__()
        self.use_parallel_residual = config.use_parallel_residual
        self.input_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.attention = GPTNeoXAttention(config, rotary, backend)
        self.mlp = GPTNeoXMLP(config)

    def forward(self, hidden, positions, k_cache, v_cache, meta):
        attn = self.attention(self.input_layernorm(hidden), positions, k_cache, v_cache, meta)
        if self.use_parallel_residual:
            # NOTE: parallel residual: x + attn(ln1(x)) + mlp(ln2(x)), both norms read the input.
            return hidden + attn + self.mlp(self.post_attention_layernorm(hidden))
        hidden = hidden + attn
        return hidden + self.mlp(self.post_attention_layernorm(hidden))


class GPTNeoXModel(nn.Module):
    def __init__(self, config: GPTNeoXConfig, stage: StageSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.embed_in = Embedding(config.vocab_size, config.hidden_size) if stage.is_first else None
        rotary = RotaryEmbedding(config.rotary_dim, config.context_window, config.rotary_base,
                                 config.rotary_position_scale)
        # Keyed by the global layer index so parameter names match the checkpoint's.
        self.layers = nn.ModuleDict({str(i): GPTNeoXLayer(config, rotary, backend) for i in stage.layer_indices})
        self.final_layer_norm = (nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
                                 if stage.is_last else None)


class GPTNeoXForCausalLM(nn.Module):
    def __init__(self, config: GPTNeoXConfig, stage: StageSpec, backend: AttentionBackend) -> None:
        super().__init__()
        self.config = config
        self.stage = stage
        self.gpt_neox = GPTNeoXModel(config, stage, backend)
        self.embed_out = nn.Linear(config.hidden_size, config.vocab_size, bias=False) if stage.is_last else None

    def forward(self, inputs: torch.Tensor, positions: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        """inputs: token ids [tokens] on the first stage, else hidden states [tokens, hidden].

        kv_cache: [stage layers, 2, slots, heads, head_dim]. Returns hidden states [tokens, hidden],
        normalised by the final layer norm on the last stage.
        """
        hidden = self.gpt_neox.embed_in(inputs) if self.stage.is_first else inputs
        for local, layer in enumerate(self.gpt_neox.layers.values()):
            hidden = layer(hidden, positions, kv_cache[local, 0], kv_cache[local, 1], meta)
        if self.stage.is_last:
            hidden = self.gpt_neox.final_layer_norm(hidden)
        return hidden

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[rows, hidden] -> logits [rows, vocab] in the model's dtype: sampling widens them."""
        return self.embed_out(hidden)

    def tied_weights(self) -> dict[str, str]:
        """Parameter -> the checkpoint tensor it is read from when the checkpoint omits it. Both
        ways: a converter that drops one name of a shared tensor may keep either."""
        if not self.config.tie_word_embeddings:
            return {}
        return {"embed_out.weight": "gpt_neox.embed_in.weight", "gpt_neox.embed_in.weight": "embed_out.weight"}
