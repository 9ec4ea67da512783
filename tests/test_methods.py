"""Sparsity methods: WINA scores, dense prefix, greedy per-layer allocation and the same-data warning."""

from __future__ import annotations

import json
import logging

import mlx.core as mx
import numpy as np
import pytest

from mlx_sparse.allocation import allocate, greedy_allocation, mean_loss, skipped_weight_bytes, weighted_sparsity
from mlx_sparse.calibration import Calibration, calibrate_targets, first_windows
from mlx_sparse.data import TokenWindows, warn_same_data
from mlx_sparse.errors import UserError
from mlx_sparse.models import MLP
from mlx_sparse.perplexity import evaluate_perplexity
from mlx_sparse.runtime import apply_gather
from mlx_sparse.sparsity import SparseMLP, SparsityConfig, load_config, sparsify, unsparsify, wina_column_norms
from test_cli import assert_one_line_error, run_module


def random_windows(count=4, ctx=33, vocab=97, seed=5):
    windows = mx.random.randint(0, vocab, (count, ctx), key=mx.random.key(seed)).astype(mx.int32)
    return TokenWindows(source="random", windows=windows, total_tokens=count * ctx)


def hand_made_mlp():
    """MLP with 4 neurons whose W_down column norms are 1, 2, 3 and 4."""
    mlp = MLP(hidden_size=2, intermediate_size=4, activation="silu")
    mlp.down_proj.weight = mx.array([[1.0, 0.0, 3.0, 0.0], [0.0, 2.0, 0.0, 4.0]])
    return mlp


def test_wina_column_norms_hand_made():
    np.testing.assert_allclose(np.array(wina_column_norms(hand_made_mlp(), "down_in")), [1.0, 2.0, 3.0, 4.0])


def test_wina_ranks_by_weighted_magnitude():
    mlp = hand_made_mlp()
    values = mx.array([[4.0, 1.5, 1.0, 0.5]])
    # |v| * norm = 4, 3, 3, 2: a threshold of 2.5 keeps the first three entries, where magnitude
    # alone (1.5 against 1.0 and 0.5) would keep only the first two.
    wina = SparseMLP(mlp, "down_in", "neuron", 1, {"down_in": 2.5}, score="wina")
    magnitude = SparseMLP(mlp, "down_in", "neuron", 1, {"down_in": 1.2})
    np.testing.assert_array_equal(np.array(wina.apply("down_in", values)), [[4.0, 1.5, 1.0, 0.0]])
    np.testing.assert_array_equal(np.array(magnitude.apply("down_in", values)), [[4.0, 1.5, 0.0, 0.0]])


def test_wina_rejected_for_seed(tiny_llama):
    with pytest.raises(UserError, match="score wina needs a site"):
        Calibration.record(tiny_llama, random_windows(), "seed", "neuron", score="wina")


@pytest.mark.parametrize(("site", "granularity"), [("down_in", "neuron"), ("gate_act", "block"), ("ffn_in", "neuron")])
def test_wina_calibration_meets_target(tiny_llama, site, granularity):
    windows = random_windows()
    config = calibrate_targets(tiny_llama, windows, [0.5], site, granularity, block_size=16, score="wina")[0]
    assert config.score == "wina"
    sparsify(tiny_llama, config)
    try:
        result = evaluate_perplexity(tiny_llama, windows)
    finally:
        unsparsify(tiny_llama)
    assert abs(result.actual_sparsity - 0.5) <= 0.01


def test_dense_prefix_keeps_first_positions(tiny_llama):
    windows = random_windows(1, 17)
    dense = np.array(tiny_llama(windows.windows))
    config = calibrate_targets(tiny_llama, random_windows(), [0.7], "down_in", "neuron", dense_prefix=2)[0]
    sparsify(tiny_llama, config)
    try:
        sparse = np.array(tiny_llama(windows.windows))
    finally:
        unsparsify(tiny_llama)
    # Causal attention: the first two positions see only dense FFNs, so their logits are exact.
    np.testing.assert_allclose(sparse[:, :2], dense[:, :2], rtol=1e-6, atol=1e-6)
    assert np.abs(sparse[:, 2:] - dense[:, 2:]).max() > 1e-3


def test_dense_prefix_excluded_from_calibration(tiny_llama):
    windows = random_windows(4, 9)
    plain = calibrate_targets(tiny_llama, windows, [0.5], "down_in", "neuron")[0]
    prefixed = calibrate_targets(tiny_llama, windows, [0.5], "down_in", "neuron", dense_prefix=3)[0]
    sparsify(tiny_llama, prefixed)
    try:
        result = evaluate_perplexity(tiny_llama, windows)
    finally:
        unsparsify(tiny_llama)
    assert plain.thresholds != prefixed.thresholds
    # Perplexity feeds the first 8 tokens of each window: 3 positions stay dense, 5 are at the 0.5 target.
    assert abs(result.actual_sparsity - 0.5 * 5 / 8) <= 0.01


def test_dense_prefix_longer_than_window_rejected(tiny_llama):
    with pytest.raises(UserError, match="covers the whole"):
        calibrate_targets(tiny_llama, random_windows(2, 9), [0.5], dense_prefix=9)


@pytest.mark.parametrize("target", [0.3, 0.5, 0.7])
def test_greedy_meets_target(tiny_llama, target):
    windows = random_windows()
    calibration = Calibration.record(tiny_llama, windows, "down_in", "neuron")
    config = allocate(tiny_llama, calibration, target, "greedy", first_windows(windows, 1), step=0.1)
    weights = skipped_weight_bytes(tiny_llama, "down_in")
    assert config.allocation == "greedy"
    assert abs(weighted_sparsity(config.layer_targets, weights) - target) <= 0.01
    for value in config.layer_targets:
        assert 0.0 <= value <= 0.95
    for entry in config.thresholds:
        assert entry["down_in"] >= 0.0

    sparsify(tiny_llama, config)
    try:
        result = evaluate_perplexity(tiny_llama, windows)
    finally:
        unsparsify(tiny_llama)
    for layer, value in zip(result.layers, config.layer_targets):
        assert layer["actual_sparsity"] >= 0.0
        assert abs(layer["actual_sparsity"] - value) <= 0.02
    assert abs(result.actual_sparsity - target) <= 0.01


def test_greedy_record_and_round_trip(tiny_llama, tmp_path):
    windows = random_windows()
    calibration = Calibration.record(tiny_llama, windows, "down_in", "neuron")
    config = allocate(tiny_llama, calibration, 0.5, "greedy", first_windows(windows, 1))
    record = config.calibration["greedy"]
    assert record["loss_passes"] >= len(record["steps"])
    assert record["loss_final"] >= record["loss_dense"] - 1e-3
    path = tmp_path / "greedy.json"
    config.save(path)
    loaded = load_config(path, tiny_llama)
    assert loaded.layer_targets == config.layer_targets
    assert loaded.allocation == "greedy"


def test_greedy_too_high_target_rejected(tiny_llama):
    windows = random_windows()
    calibration = Calibration.record(tiny_llama, windows, "down_in", "neuron")
    with pytest.raises(UserError, match="use a lower target"):
        greedy_allocation(tiny_llama, calibration, 0.97, first_windows(windows, 1))
    with pytest.raises(UserError, match="invalid greedy step"):
        greedy_allocation(tiny_llama, calibration, 0.5, first_windows(windows, 1), step=0.0)


def test_old_config_without_method_fields_loads(tiny_llama, tmp_path):
    config = calibrate_targets(tiny_llama, random_windows(), [0.5])[0]
    data = json.loads(json.dumps(config.__dict__))
    for key in ("score", "dense_prefix", "allocation", "layer_targets"):
        del data[key]
    loaded = SparsityConfig.from_dict(data)
    assert loaded.score == "magnitude"
    assert loaded.dense_prefix == 0
    assert loaded.allocation == "uniform"


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"score": "energy"}, "unknown score 'energy'"),
        ({"dense_prefix": -1}, "invalid dense prefix -1"),
        ({"allocation": "random"}, "allocation 'random'"),
        ({"layer_targets": [0.5]}, "layer_targets must list"),
        ({"layer_targets": [0.5, 1.0]}, "layer_targets must list"),
    ],
)
def test_invalid_method_fields_rejected(tiny_llama, change, fragment):
    data = {**calibrate_targets(tiny_llama, random_windows(), [0.5])[0].__dict__, **change}
    with pytest.raises(UserError, match=fragment):
        SparsityConfig.from_dict(data)


def test_gather_rejects_wina_config(tiny_llama):
    config = calibrate_targets(tiny_llama, random_windows(), [0.5], "gate_act", "block", block_size=16, score="wina")[0]
    with pytest.raises(UserError, match="gather path supports score magnitude"):
        apply_gather(tiny_llama, config)


def test_same_data_warning(tmp_path, caplog, monkeypatch):
    folder = tmp_path / "wikitext-2-raw"
    folder.mkdir()
    (folder / "wiki.test.raw").write_text("text")
    monkeypatch.setenv("MLX_SPARSE_DATA_DIR", str(tmp_path))
    with caplog.at_level(logging.WARNING):
        assert warn_same_data("wikitext2:test", str(folder / "wiki.test.raw"))
    assert "same data" in caplog.text
    assert not warn_same_data("wikitext2:valid", "wikitext2:test")
    assert warn_same_data("notes.txt", "notes.txt")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--score", "energy"], "unknown score 'energy'"),
        (["--dense-prefix", "-2"], "invalid dense prefix -2"),
        (["--allocation", "random"], "unknown allocation 'random'"),
        (["--allocation", "greedy", "--greedy-windows", "0"], "invalid greedy windows 0"),
        (["--site", "seed", "--score", "wina"], "score wina needs a site"),
    ],
)
def test_method_options_errors(args, fragment, tmp_path):
    result = run_module("calibrate", "--model", "smollm2-135m", *args, "-o", str(tmp_path / "x.json"))
    assert_one_line_error(result, fragment)
    assert not (tmp_path / "x.json").exists()
    result = run_module("sweep", "--model", "smollm2-135m", *args, "--out", str(tmp_path / "sweep"))
    assert_one_line_error(result, fragment)


@pytest.mark.real_model
def test_greedy_beats_uniform_loss_smollm2(smollm2):
    model, tokenizer = smollm2
    from mlx_sparse.data import load_windows

    windows = load_windows("wikitext2:valid", tokenizer, 48, 2)
    calibration = Calibration.record(model, windows, "down_in", "neuron")
    batch = first_windows(windows, 1)
    greedy = allocate(model, calibration, 0.5, "greedy", batch, step=0.5)
    uniform = calibration.config(0.5)
    losses = {}
    for name, config in (("greedy", greedy), ("uniform", uniform)):
        sparsify(model, config)
        try:
            losses[name] = mean_loss(model, batch)
        finally:
            unsparsify(model)
    weights = skipped_weight_bytes(model, "down_in")
    assert abs(weighted_sparsity(greedy.layer_targets, weights) - 0.5) <= 0.01
    assert losses["greedy"] < losses["uniform"]
    assert len(set(round(value, 3) for value in greedy.layer_targets)) > 1
