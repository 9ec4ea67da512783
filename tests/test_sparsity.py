"""Thresholded FFN sites against an independent NumPy reference, and the config file."""

from __future__ import annotations

import json

import mlx.core as mx
import numpy as np
import pytest

from mlx_sparse import SparsityConfig, load_config, sparsify, unsparsify
from mlx_sparse.errors import UserError
from mlx_sparse.sparsity import SITE_TENSORS, SparseMLP, describe_model, set_stats, layer_sparsity, stats_arrays


def numpy_silu(x):
    return x / (1 + np.exp(-x))


def numpy_block_scores(values, block_size):
    """Block RMS relative to the RMS of the whole last axis."""
    values = values.astype(np.float64)
    blocks = values.reshape(*values.shape[:-1], -1, block_size)
    return np.sqrt(np.mean(blocks**2, axis=-1)) / np.sqrt(np.mean(values**2, axis=-1, keepdims=True))


def numpy_mask(values, threshold, granularity, block_size):
    if granularity == "neuron":
        return np.where(np.abs(values) >= threshold, values, 0.0)
    blocks = values.reshape(*values.shape[:-1], -1, block_size)
    scores = numpy_block_scores(values, block_size)
    return np.where((scores >= threshold)[..., None], blocks, 0.0).reshape(values.shape)


def numpy_ffn(mlp, x, site, granularity, block_size, thresholds):
    """Dense FFN in NumPy with the site's thresholds applied, written without the package's code."""
    gate_w = np.array(mlp.gate_proj.weight)
    up_w = np.array(mlp.up_proj.weight)
    down_w = np.array(mlp.down_proj.weight)

    def mask(name, values):
        return numpy_mask(values, thresholds[name], granularity, block_size)

    if site == "ffn_in":
        x = mask("ffn_in", x)
    gate = x @ gate_w.T
    if site == "seed":
        gate = mask("gate", gate)
    activated = numpy_silu(gate)
    if site == "gate_act":
        activated = mask("gate_act", activated)
    up = x @ up_w.T
    if site == "seed":
        up = mask("up", up)
    down_in = activated * up
    if site == "down_in":
        down_in = mask("down_in", down_in)
    out = down_in @ down_w.T
    if site == "seed":
        out = mask("down", out)
    return out


def make_config(model, site, granularity, thresholds, block_size=32, target=0.5):
    shape = describe_model(model)
    return SparsityConfig(
        model_id=shape["model_id"], model_type=shape["model_type"], num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"], site=site,
        granularity=granularity, block_size=block_size, target=target, thresholds=thresholds,
    )


def median_thresholds(mlp, x, site, granularity, block_size):
    """Thresholds at the median magnitude of each site tensor, so about half of each is zeroed."""
    gate = x @ np.array(mlp.gate_proj.weight).T
    up = x @ np.array(mlp.up_proj.weight).T
    tensors = {
        "ffn_in": x,
        "gate": gate,
        "gate_act": numpy_silu(gate),
        "up": up,
        "down_in": numpy_silu(gate) * up,
    }
    tensors["down"] = tensors["down_in"] @ np.array(mlp.down_proj.weight).T

    def median(values):
        if granularity == "neuron":
            return float(np.median(np.abs(values)))
        return float(np.median(numpy_block_scores(values, block_size)))

    return {name: median(tensors[name]) for name in SITE_TENSORS[site]}


@pytest.mark.parametrize("granularity", ["neuron", "block"])
@pytest.mark.parametrize("site", sorted(SITE_TENSORS))
def test_site_matches_numpy_reference(tiny_llama, site, granularity):
    block_size = 16
    mlp = tiny_llama.layers[0].mlp
    x = np.array(mx.random.normal((3, 5, 64), key=mx.random.key(1)))
    thresholds = median_thresholds(mlp, x, site, granularity, block_size)
    config = make_config(tiny_llama, site, granularity, [thresholds] * 2, block_size)

    sparsify(tiny_llama, config)
    sparse_out = np.array(tiny_llama.layers[0].mlp(mx.array(x)))
    expected = numpy_ffn(mlp, x, site, granularity, block_size, thresholds)
    np.testing.assert_allclose(sparse_out, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("site", sorted(SITE_TENSORS))
def test_zero_thresholds_give_dense_output(tiny_gemma, site):
    tokens = mx.random.randint(0, 97, (1, 12))
    dense = np.array(tiny_gemma(tokens))
    thresholds = [{name: 0.0 for name in SITE_TENSORS[site]}] * 3
    sparsify(tiny_gemma, make_config(tiny_gemma, site, "block", thresholds))
    np.testing.assert_array_equal(np.array(tiny_gemma(tokens)), dense)


def test_unsparsify_restores_modules(tiny_llama):
    originals = [layer.mlp for layer in tiny_llama.layers]
    config = make_config(tiny_llama, "down_in", "neuron", [{"down_in": 0.1}] * 2)
    sparsify(tiny_llama, config)
    assert all(isinstance(layer.mlp, SparseMLP) for layer in tiny_llama.layers)

    unsparsify(tiny_llama)
    assert [layer.mlp for layer in tiny_llama.layers] == originals
    assert tiny_llama.sparsity_config is None


def test_sparsify_twice_does_not_nest(tiny_llama):
    config = make_config(tiny_llama, "down_in", "neuron", [{"down_in": 0.1}] * 2)
    sparsify(tiny_llama, config)
    sparsify(tiny_llama, config)
    assert not isinstance(tiny_llama.layers[0].mlp.mlp, SparseMLP)


def test_stats_count_zeros(tiny_llama):
    mlp = tiny_llama.layers[0].mlp
    x = mx.random.normal((1, 40, 64), key=mx.random.key(2))
    down_in = np.array(mlp.activation(mlp.gate_proj(x)) * mlp.up_proj(x))
    threshold = float(np.quantile(np.abs(down_in), 0.3))
    config = make_config(tiny_llama, "down_in", "neuron", [{"down_in": threshold}, {"down_in": 0.0}])
    sparsify(tiny_llama, config)
    set_stats(tiny_llama, True)

    tiny_llama.layers[0].mlp(x)
    mx.eval(stats_arrays(tiny_llama))
    measured = layer_sparsity(tiny_llama)[0]["down_in"]
    assert measured == pytest.approx(float(np.mean(np.abs(down_in) < threshold)), abs=1e-6)
    assert measured == pytest.approx(0.3, abs=0.01)


def test_config_round_trip(tmp_path, tiny_llama):
    config = make_config(tiny_llama, "seed", "block", [{"gate": 0.1, "up": 0.2, "down": 0.3}] * 2, target=0.4)
    config.calibration = {"data": "wikitext2:valid", "tokens": 8192}
    path = tmp_path / "cfg.json"
    config.save(path)

    loaded = load_config(path, tiny_llama)
    assert loaded == config
    assert json.loads(path.read_text())["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.json"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_layers": 3}, "has 2 layer thresholds for 3 layers"),
        ({"site": "attention"}, "unknown sparsity site 'attention'"),
        ({"granularity": "row"}, "unknown granularity 'row'"),
        ({"version": 99}, "config version 99"),
        ({"thresholds": [{"gate_act": 0.1}] * 2}, "do not match site down_in"),
        ({"thresholds": [{"down_in": -1.0}] * 2}, "threshold down_in=-1.0 is invalid"),
    ],
)
def test_invalid_config_rejected(tmp_path, tiny_llama, change, message):
    data = json.loads(json.dumps(make_config(tiny_llama, "down_in", "neuron", [{"down_in": 0.1}] * 2).__dict__))
    data.update(change)
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    with pytest.raises(UserError, match=message):
        load_config(path)


def test_config_for_other_model_rejected(tmp_path, tiny_llama, tiny_gemma):
    config = make_config(tiny_llama, "down_in", "neuron", [{"down_in": 0.1}] * 2)
    config.save(tmp_path / "cfg.json")
    with pytest.raises(UserError, match="config is for tiny-llama .*calibrate a config for this model"):
        load_config(tmp_path / "cfg.json", tiny_gemma)


def test_config_missing_or_corrupt(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_config(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_config(tmp_path / "bad.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="not a sparsity config"):
        load_config(tmp_path / "list.json")
    (tmp_path / "partial.json").write_text(json.dumps({"version": 1, "site": "down_in"}))
    with pytest.raises(UserError, match="is missing model_id"):
        load_config(tmp_path / "partial.json")


def test_block_size_must_divide_width(tiny_llama):
    config = make_config(tiny_llama, "down_in", "block", [{"down_in": 0.1}] * 2, block_size=48)
    with pytest.raises(UserError, match="block size 48 does not divide the FFN width 128"):
        sparsify(tiny_llama, config)
