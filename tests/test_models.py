"""The MLX ports against mlx-lm's own models on the same weights."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from conftest import TINY_CONFIGS, mlx_lm_model, random_weights
from mlx_sparse.errors import UserError
from mlx_sparse.loading import build_model
from mlx_sparse.models import ffn_modules, get_architecture


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_logits_match_mlx_lm(name):
    config = TINY_CONFIGS[name]
    weights = random_weights(config)
    ours = build_model(config, dict(weights))
    reference = mlx_lm_model(config, weights)

    # 20 tokens is longer than the sliding window of 8, so local attention is exercised.
    tokens = mx.random.randint(0, config["vocab_size"], (2, 20))
    np.testing.assert_allclose(np.array(ours(tokens)), np.array(reference(tokens)), atol=1e-4, rtol=0)


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_tiny_cached_decode_matches_full(name):
    config = TINY_CONFIGS[name]
    model = build_model(config, random_weights(config))
    tokens = mx.random.randint(0, config["vocab_size"], (1, 14))
    full = model(tokens)

    cache = model.make_cache()
    prefix = model(tokens[:, :10], cache=cache)
    steps = [prefix[:, -1]]
    for index in range(10, 13):
        steps.append(model(tokens[:, index : index + 1], cache=cache)[:, -1])
    np.testing.assert_allclose(np.array(mx.stack(steps, axis=1)), np.array(full[:, 9:13]), atol=1e-4, rtol=0)


def test_ffn_modules_expose_projections(tiny_gemma):
    modules = ffn_modules(tiny_gemma)
    assert len(modules) == 3
    assert modules[0].gate_proj.weight.shape == (128, 64)
    assert modules[0].down_proj.weight.shape == (64, 128)
    assert modules[0].activation_name == "gelu_tanh"


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UserError, match="unsupported model_type 'gpt2'.*gemma3_text, llama, mistral"):
        get_architecture("gpt2")


def test_mismatched_weights_rejected():
    config = TINY_CONFIGS["llama"]
    weights = random_weights(config)
    weights.pop("model.norm.weight")
    with pytest.raises(UserError, match="weights do not match"):
        build_model(config, weights)


@pytest.mark.real_model
@pytest.mark.parametrize("alias", ["smollm2-135m", "gemma3-270m"])
def test_real_logits_match_mlx_lm(alias):
    from mlx_lm import load as mlx_lm_load

    from conftest import load_real
    from mlx_sparse.aliases import alias_folder

    model, tokenizer = load_real(alias)
    reference, _ = mlx_lm_load(str(alias_folder(alias)))
    tokens = mx.array([tokenizer.encode("The tower is 324 metres tall, about the same height as an 81-storey building.")])
    np.testing.assert_allclose(np.array(model(tokens)), np.array(reference(tokens)), atol=1e-4, rtol=0)
