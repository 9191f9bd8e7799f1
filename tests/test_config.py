import json

import pytest
import torch

from neo_serve.config import GPTNeoConfig, GPTNeoXConfig, config_from_dict, load_model_config
from neo_serve.errors import ConfigError, UnsupportedArchitectureError


def test_gpt_neox_20b_hub_keys(reference_dir):
    config = load_model_config(reference_dir / "gpt-neox-20b.config.json")
    assert isinstance(config, GPTNeoXConfig)
    assert (config.num_layers, config.hidden_size, config.num_heads) == (44, 6144, 64)
    assert config.head_dim == 96 and config.rotary_dim == 24  # rotary_pct 0.25 of 96
    assert config.use_parallel_residual is True  # absent key means parallel
    assert config.activation == "gelu_fast"
    assert config.vocab_size == 50432 and config.checkpoint_dtype == "float16"


def test_pythia_and_current_transformers_keys(reference_dir):
    config = load_model_config(reference_dir / "pythia-160m.config.json")
    assert (config.num_layers, config.hidden_size, config.rotary_dim) == (12, 768, 16)
    raw = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 100, "hidden_size": 64,
           "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 128,
           "rope_parameters": {"rope_type": "default", "partial_rotary_factor": 0.5, "rope_theta": 500.0},
           "use_parallel_residual": False, "dtype": "bfloat16"}
    config = config_from_dict(raw)
    assert config.rotary_pct == 0.5 and config.rotary_base == 500.0 and config.rotary_dim == 8
    assert config.use_parallel_residual is False and config.checkpoint_dtype == "bfloat16"


@pytest.mark.parametrize("name,layers,hidden", [("gpt-neo-125m", 12, 768), ("gpt-neo-1.3b", 24, 2048),
                                                ("gpt-neo-2.7b", 32, 2560)])
def test_gpt_neo_attention_types(reference_dir, name, layers, hidden):
    config = load_model_config(reference_dir / f"{name}.config.json")
    assert isinstance(config, GPTNeoConfig)
    assert config.num_layers == layers and config.hidden_size == hidden
    assert config.attention_layers[:4] == ("global", "local", "global", "local")
    assert len(config.attention_layers) == layers and config.window_size == 256
    assert config.intermediate_size == 4 * hidden  # null in the config means 4 * hidden
    assert config.activation == "gelu_new"


def test_unsupported_architecture_names_the_supported_ones(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"]}))
    with pytest.raises(UnsupportedArchitectureError) as info:
        load_model_config(tmp_path)
    message = str(info.value)
    assert "LlamaForCausalLM" in message and "GPTNeoXForCausalLM" in message and "GPTNeoForCausalLM" in message


def test_bad_values_name_the_field(tmp_path):
    raw = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 100, "hidden_size": 65,
           "num_hidden_layers": 2, "num_attention_heads": 4}
    with pytest.raises(ConfigError, match="hidden_size"):
        config_from_dict(raw)
    raw.update(hidden_size=64, hidden_act="swishy")
    with pytest.raises(ConfigError, match="swishy"):
        config_from_dict(raw)
    raw.update(hidden_act="gelu", num_hidden_layers=0)
    with pytest.raises(ConfigError, match="num_layers"):
        config_from_dict(raw)


def test_every_activation_name_computes_what_transformers_computes():
    from transformers.activations import ACT2FN

    from neo_serve.config import SUPPORTED_ACTIVATIONS
    from neo_serve.models.layers import ACTIVATIONS

    assert set(SUPPORTED_ACTIVATIONS) == set(ACTIVATIONS)
    x = torch.linspace(-8, 8, 1001, dtype=torch.float32)
    for name, function in ACTIVATIONS.items():
        assert torch.allclose(function(x), ACT2FN[name](x), atol=1e-5), name


def test_quantized_checkpoints_are_refused_by_name():
    raw = {"architectures": ["GPTNeoXForCausalLM"], "vocab_size": 512, "hidden_size": 64, "num_hidden_layers": 2,
           "num_attention_heads": 4, "quantization_config": {"quant_method": "gptq", "bits": 4}}
    with pytest.raises(ConfigError, match="quantized checkpoints are not supported.*gptq"):
        config_from_dict(raw)
