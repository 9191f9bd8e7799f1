"""Shared fixtures: tiny random checkpoints made once per test session with transformers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_tokenizer, make_neo, make_neox  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def neox_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_neox(tmp_path_factory.mktemp("neox"), tokenizer)


@pytest.fixture(scope="session")
def neox_sequential_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """Sequential residual, exact gelu replaced by relu, rotary on half the head."""
    return make_neox(tmp_path_factory.mktemp("neox-seq"), tokenizer, seed=1, use_parallel_residual=False,
                     hidden_act="relu", rotary_pct=0.5)


@pytest.fixture(scope="session")
def neox_sharded_checkpoint(tmp_path_factory, tokenizer) -> Path:
    return make_neox(tmp_path_factory.mktemp("neox-sharded"), tokenizer, seed=2, shard=True)


@pytest.fixture(scope="session")
def neox_hub_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """GPT-NeoX-20B's published style: rotary_pct/rotary_emb_base, legacy buffers, gelu_fast."""
    return make_neox(tmp_path_factory.mktemp("neox-hub"), tokenizer, seed=3, hub_style=True)


@pytest.fixture(scope="session")
def neo_checkpoint(tmp_path_factory, tokenizer) -> Path:
    """GPT-Neo with vocab.json + merges.txt only, global/local layers, window 16."""
    return make_neo(tmp_path_factory.mktemp("neo"), tokenizer)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    path = SHARED / "reference"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the tests need ../shared beside the repository")
    return path
