"""Shared fixtures: tiny random-init models and the converted real models."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("MLX_SPARSE_MODELS_DIR", str(REPO / "models"))
DEFAULT_DATA_DIR = REPO.parent / "shared" / "data"
if "MLX_SPARSE_DATA_DIR" not in os.environ and (DEFAULT_DATA_DIR / "wikitext-2-raw").is_dir():
    os.environ["MLX_SPARSE_DATA_DIR"] = str(DEFAULT_DATA_DIR)

TINY_CONFIGS = {
    "llama": dict(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=97, rms_norm_eps=1e-5,
        rope_traditional=True, tie_word_embeddings=True,
    ),
    "mistral": dict(
        model_type="mistral", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=1, vocab_size=97, rms_norm_eps=1e-5,
        sliding_window=8, layer_types=["sliding_attention", "full_attention"], tie_word_embeddings=False,
    ),
    "gemma3_text": dict(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=1, head_dim=32, vocab_size=97,
        sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=32,
    ),
}


def random_weights(config: dict, seed: int = 0) -> dict[str, mx.array]:
    """Random weights with mlx-lm's parameter names for `config`, scaled to keep activations sane."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    reference = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    return {name: mx.random.normal(value.shape) * 0.1 for name, value in tree_flatten(reference.parameters())}


def mlx_lm_model(config: dict, weights: dict[str, mx.array]):
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    model.load_weights(list(model.sanitize(dict(weights)).items()) if hasattr(model, "sanitize") else list(weights.items()))
    return model


@pytest.fixture
def tiny_llama():
    from mlx_sparse.loading import build_model

    config = TINY_CONFIGS["llama"]
    model = build_model(config, random_weights(config))
    model.model_id = "tiny-llama"
    return model


@pytest.fixture
def tiny_gemma():
    from mlx_sparse.loading import build_model

    config = TINY_CONFIGS["gemma3_text"]
    model = build_model(config, random_weights(config))
    model.model_id = "tiny-gemma"
    return model


def real_model_available(alias: str) -> bool:
    from mlx_sparse.aliases import ALIASES

    return importlib.util.find_spec(ALIASES[alias].package) is not None


_REAL_MODELS: dict[str, tuple] = {}


def load_real(alias: str):
    """Load a converted real model once per test session (converting it on first use)."""
    if not real_model_available(alias):
        pytest.skip(f"package for {alias} not installed ({alias} needs: make install)")
    if alias not in _REAL_MODELS:
        from mlx_sparse import load

        _REAL_MODELS[alias] = load(alias)
    return _REAL_MODELS[alias]


@pytest.fixture(scope="session")
def smollm2():
    return load_real("smollm2-135m")


@pytest.fixture(scope="session")
def gemma3():
    return load_real("gemma3-270m")


@pytest.fixture(scope="session")
def wikitext_dir() -> Path:
    data_dir = os.environ.get("MLX_SPARSE_DATA_DIR")
    if not data_dir or not (Path(data_dir) / "wikitext-2-raw" / "wiki.test.raw").is_file():
        pytest.skip("WikiText-2 not found; set MLX_SPARSE_DATA_DIR to a folder with wikitext-2-raw/")
    return Path(data_dir)
