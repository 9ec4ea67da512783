"""Calibration: streaming histograms, quantile thresholds and the sparsity they give."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from mlx_sparse import calibrate, sparsify
from mlx_sparse.calibration import LogHistogram, calibrate_targets
from mlx_sparse.data import TokenWindows
from mlx_sparse.errors import UserError
from mlx_sparse.perplexity import evaluate_perplexity


def random_windows(count=4, ctx=33, vocab=97, seed=3):
    windows = mx.random.randint(0, vocab, (count, ctx), key=mx.random.key(seed))
    return TokenWindows(source="random", windows=windows, total_tokens=count * ctx)


def test_histogram_quantile_matches_numpy():
    values = np.exp(np.random.default_rng(0).normal(size=200_000)).astype(np.float32)
    histogram = LogHistogram()
    for chunk in np.array_split(values, 7):
        histogram.add(mx.array(chunk))
    for fraction in (0.1, 0.5, 0.9):
        expected = float(np.quantile(values, fraction))
        assert histogram.quantile(fraction) == pytest.approx(expected, rel=0.005)
    assert histogram.quantile(0.0) == 0.0
    assert histogram.total == values.size


def test_histogram_counts_zeros_below_any_threshold():
    histogram = LogHistogram()
    histogram.add(mx.array([0.0] * 60 + [1.0] * 40))
    assert histogram.quantile(0.5) < 1e-9
    assert histogram.quantile(0.7) == pytest.approx(1.0, rel=0.005)


@pytest.mark.parametrize(
    ("site", "granularity", "tensor"),
    [("down_in", "neuron", "down_in"), ("gate_act", "block", "gate_act"), ("ffn_in", "neuron", "ffn_in"), ("seed", "neuron", "down_in")],
)
def test_calibrated_sparsity_near_target(tiny_llama, site, granularity, tensor):
    windows = random_windows()
    config = calibrate(tiny_llama, data=windows, target=0.5, site=site, granularity=granularity, block_size=16)

    assert len(config.thresholds) == 2
    assert config.calibration["tokens"] == 4 * 33
    sparsify(tiny_llama, config)
    result = evaluate_perplexity(tiny_llama, windows)
    if site == "seed":
        # The down_proj input of the seed rule is zero where the gate or the up output is zero.
        assert result.actual_sparsity == pytest.approx(0.75, abs=0.05)
    else:
        for layer in result.layers:
            assert layer["actual_sparsity"] == pytest.approx(0.5, abs=0.01), layer
            assert layer[f"sparsity_{tensor}"] == layer["actual_sparsity"]


def test_targets_share_one_pass(tiny_llama):
    configs = calibrate_targets(tiny_llama, random_windows(), [0.0, 0.3, 0.7], "down_in", "neuron")
    assert [config.target for config in configs] == [0.0, 0.3, 0.7]
    assert configs[0].thresholds[0]["down_in"] == 0.0
    assert configs[1].thresholds[0]["down_in"] < configs[2].thresholds[0]["down_in"]
    assert all(layer.mlp.__class__.__name__ == "MLP" for layer in tiny_llama.layers)


@pytest.mark.parametrize("target", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_target_rejected(tiny_llama, target):
    with pytest.raises(UserError, match="invalid sparsity target"):
        calibrate(tiny_llama, data=random_windows(), target=target)


def test_unknown_site_rejected(tiny_llama):
    with pytest.raises(UserError, match="unknown sparsity site 'attn'"):
        calibrate(tiny_llama, data=random_windows(), site="attn")


def test_spec_without_tokenizer_rejected(tiny_llama):
    with pytest.raises(UserError, match="needs a tokenizer"):
        calibrate(tiny_llama, data="wikitext2:valid")
