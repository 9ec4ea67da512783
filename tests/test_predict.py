"""Neuron predictors: active sets, training, decision thresholds, files, masked and gather decoding."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest

from conftest import REPO
from mlx_sparse.calibration import calibrate_targets
from mlx_sparse.data import TokenWindows
from mlx_sparse.errors import UserError
from mlx_sparse.predict import (
    PredictorSet,
    apply_predictor,
    attach_predictor,
    capture_layers,
    detach_predictor,
    evaluate_predictor,
    load_predictor,
    remove_predictor,
    train_predictors,
)
from mlx_sparse.predict.train import Reservoir, decision_threshold, set_metrics
from mlx_sparse.runtime import apply_gather, remove_gather
from test_cli import assert_one_line_error, run_module


def random_windows(count=4, ctx=33, vocab=97, seed=5):
    windows = mx.random.randint(0, vocab, (count, ctx), key=mx.random.key(seed)).astype(mx.int32)
    return TokenWindows(source="random", windows=windows, total_tokens=count * ctx)


def tiny_config(model, site="gate_act", granularity="block", target=0.5):
    return calibrate_targets(model, random_windows(), [target], site, granularity, block_size=16)[0]


def always_active(model, config) -> PredictorSet:
    predictors = PredictorSet.for_config(model, config, rank=4)
    predictors.header.decision_thresholds = [-math.inf] * config.num_layers
    return predictors


def random_predictor(model, config, lookahead=False, seed=7) -> PredictorSet:
    """Untrained predictor with random weights and decision threshold 0: it names about half the units."""
    mx.random.seed(seed)
    predictors = PredictorSet.for_config(model, config, rank=8, lookahead=lookahead)
    mx.eval(predictors.parameters())
    return predictors


def test_set_metrics_hand_made():
    predicted = np.array([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=bool)
    truth = np.array([[1, 0, 0, 0], [1, 1, 1, 0]], dtype=bool)
    metrics = set_metrics(predicted, truth)
    assert metrics["recall"] == pytest.approx(3 / 4)
    assert metrics["precision"] == pytest.approx(3 / 4)
    assert metrics["predicted_active"] == pytest.approx(4 / 8)
    assert metrics["true_active"] == pytest.approx(4 / 8)


def test_set_metrics_empty_sets():
    empty = np.zeros((2, 3), dtype=bool)
    metrics = set_metrics(empty, empty)
    assert metrics["recall"] == 1.0
    assert metrics["precision"] == 1.0
    assert metrics["predicted_active"] == 0.0


@pytest.mark.parametrize("recall", [0.5, 0.8, 0.95, 1.0])
def test_decision_threshold_meets_recall(recall):
    rng = np.random.default_rng(0)
    truth = rng.random((200, 10)) < 0.4
    logits = rng.normal(size=truth.shape) + 2.0 * truth
    threshold = decision_threshold(logits, truth, recall)
    achieved = set_metrics(logits >= threshold, truth)["recall"]
    assert achieved >= recall
    # The next larger positive logit as threshold would miss the target.
    positives = np.sort(logits[truth])
    above = positives[positives > threshold]
    if above.size:
        assert set_metrics(logits >= above[0], truth)["recall"] < recall


def test_decision_threshold_without_positives():
    assert decision_threshold(np.zeros((3, 2)), np.zeros((3, 2), dtype=bool), 0.99) == math.inf


def test_reservoir_bounded_and_uniform():
    rng = np.random.default_rng(1)
    reservoir = Reservoir(200, 1, 1, rng)
    for first in range(0, 20000, 500):
        rows = np.arange(first, first + 500, dtype=np.float32)[:, None]
        reservoir.add(rows, rows > 10000)
    inputs, targets = reservoir.arrays()
    assert len(reservoir) == 200
    assert reservoir.seen == 20000
    assert len(np.unique(inputs)) == 200
    np.testing.assert_array_equal(targets[:, 0], inputs[:, 0] > 10000)
    # A uniform sample of 0..19999 has mean 10000 and, over 200 rows, a standard error near 408.
    assert abs(inputs.mean() - 10000) < 2000


def test_reservoir_keeps_everything_below_capacity():
    reservoir = Reservoir(100, 2, 3, np.random.default_rng(0))
    reservoir.add(np.ones((30, 2), np.float32), np.ones((30, 3), bool))
    inputs, targets = reservoir.arrays()
    assert inputs.shape == (30, 2)
    assert targets.all()


@pytest.mark.parametrize("granularity", ["neuron", "block"])
def test_active_sets_follow_threshold(tiny_llama, granularity):
    config = tiny_config(tiny_llama, "down_in", granularity)
    tokens = random_windows(1, 17).windows
    with capture_layers(tiny_llama, config) as run:
        _, captures = run(tokens)
        mx.eval([(capture.inputs, capture.active) for capture in captures])
    assert not hasattr(tiny_llama.layers[0].mlp, "inner")

    mlp = tiny_llama.layers[0].mlp
    x = captures[0].inputs
    h = np.array(mlp.activation(mlp.gate_proj(x)) * mlp.up_proj(x))
    threshold = config.thresholds[0]["down_in"]
    if granularity == "neuron":
        expected = np.abs(h) >= threshold
    else:
        blocks = h.reshape(h.shape[0], -1, 16)
        token_rms = np.sqrt((h**2).mean(axis=-1, keepdims=True))
        expected = np.sqrt((blocks**2).mean(axis=-1)) / token_rms >= threshold
    active = np.array(captures[0].active)
    assert active.shape == expected.shape
    # Scores that sit on the threshold may round either way.
    assert (active != expected).mean() < 0.01
    assert 0.3 < active.mean() < 0.7


def test_active_sets_reject_ffn_in(tiny_llama):
    config = tiny_config(tiny_llama, "ffn_in", "neuron")
    with pytest.raises(UserError, match="site gate_act or down_in"):
        with capture_layers(tiny_llama, config):
            pass


@pytest.mark.parametrize(("site", "granularity"), [("gate_act", "block"), ("down_in", "block"), ("down_in", "neuron")])
def test_always_active_predictor_gives_oracle_ppl(tiny_llama, site, granularity):
    config = tiny_config(tiny_llama, site, granularity)
    result = evaluate_predictor(tiny_llama, config, always_active(tiny_llama, config), random_windows(2, 33, seed=9))
    np.testing.assert_allclose(result["ppl_predicted"], result["ppl_oracle"], rtol=1e-6)
    assert result["recall"] == 1.0
    assert result["predicted_active"] == 1.0
    assert 0.4 < result["oracle_sparsity"] < 0.6


def masked_reference(model, config, predictors, x_layers, layer):
    """NumPy reference of one predicted FFN: predicted units only, threshold inside, zeros elsewhere."""
    mlp = model.layers[layer].mlp
    x = x_layers[layer]
    source = x_layers[predictors.source_layer(layer)]
    predicted = np.array(predictors.layers[layer](source)) >= predictors.header.decision_thresholds[layer]
    a = np.array(mlp.activation(mlp.gate_proj(x)))
    h = a * np.array(mlp.up_proj(x))
    site = a if config.site == "gate_act" else h
    size = config.block_size
    neuron_predicted = np.repeat(predicted, size, axis=-1) if config.granularity == "block" else predicted
    site = np.where(neuron_predicted, site, 0.0)
    if config.granularity == "block":
        token_rms = np.sqrt((site**2).mean(axis=-1, keepdims=True))
        blocks = site.reshape(*site.shape[:-1], -1, size)
        scores = np.sqrt((blocks**2).mean(axis=-1)) / np.maximum(token_rms, 1e-30)
        active = np.repeat(predicted & (scores >= config.thresholds[layer][config.site]), size, axis=-1)
    else:
        active = predicted & (np.abs(site) >= config.thresholds[layer][config.site])
    return np.array(mlp.down_proj(mx.array(np.where(active, h, 0.0).astype(np.float32)))), predicted


@pytest.mark.parametrize(("site", "granularity", "lookahead"),
                         [("gate_act", "block", False), ("down_in", "neuron", False), ("gate_act", "block", True)])
def test_predicted_mlp_matches_numpy(tiny_llama, site, granularity, lookahead):
    config = tiny_config(tiny_llama, site, granularity)
    predictors = random_predictor(tiny_llama, config, lookahead)
    x_layers = [mx.random.normal((5, 64), key=mx.random.key(layer)) for layer in range(2)]

    expected = [masked_reference(tiny_llama, config, predictors, x_layers, layer) for layer in range(2)]
    apply_predictor(tiny_llama, config, predictors)
    try:
        actual = [np.array(tiny_llama.layers[layer].mlp(x_layers[layer])) for layer in range(2)]
    finally:
        remove_predictor(tiny_llama)
    for layer in range(2):
        reference, predicted = expected[layer]
        assert 0.1 < predicted.mean() < 0.9
        np.testing.assert_allclose(actual[layer], reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("lookahead", [False, True])
def test_gather_predicted_matches_masked(tiny_llama, lookahead):
    config = tiny_config(tiny_llama, "gate_act", "block")
    predictors = random_predictor(tiny_llama, config, lookahead)
    x_layers = [mx.random.normal((1, 1, 64), key=mx.random.key(10 + layer)) for layer in range(2)]

    apply_predictor(tiny_llama, config, predictors)
    try:
        expected = [np.array(tiny_llama.layers[layer].mlp(x_layers[layer])) for layer in range(2)]
    finally:
        remove_predictor(tiny_llama)
    apply_gather(tiny_llama, config)
    attach_predictor(tiny_llama, config, predictors)
    try:
        actual = [np.array(tiny_llama.layers[layer].mlp(x_layers[layer])) for layer in range(2)]
        for module in (layer.mlp for layer in tiny_llama.layers):
            module.enable_stats()
        tiny_llama.layers[0].mlp(x_layers[0])
        stats = tiny_llama.layers[0].mlp.stats
    finally:
        detach_predictor(tiny_llama)
        remove_gather(tiny_llama)
    for layer in range(2):
        np.testing.assert_allclose(actual[layer], expected[layer], rtol=1e-5, atol=1e-6)
    assert stats.weight_bytes < stats.dense_weight_bytes


def test_attach_needs_gather_path(tiny_llama):
    config = tiny_config(tiny_llama, "gate_act", "block")
    with pytest.raises(UserError, match="apply_gather first"):
        attach_predictor(tiny_llama, config, always_active(tiny_llama, config))


def test_predictor_reloads_same_outputs(tiny_llama, tmp_path):
    config = tiny_config(tiny_llama, "gate_act", "block")
    predictors = train_predictors(tiny_llama, config, random_windows(), rank=4, epochs=2, max_samples=64)
    path = tmp_path / "pred.safetensors"
    predictors.save(path)
    loaded = load_predictor(path, tiny_llama, config)

    x = mx.random.normal((3, 64), key=mx.random.key(2))
    for layer in range(2):
        np.testing.assert_array_equal(np.array(loaded.layers[layer](x)), np.array(predictors.layers[layer](x)))
    assert loaded.header == predictors.header
    assert loaded.header.training["samples_per_layer"] == 64
    assert all(math.isfinite(value) for value in loaded.header.decision_thresholds)


def test_training_reaches_recall_target(tiny_llama):
    config = tiny_config(tiny_llama, "down_in", "block")
    predictors = train_predictors(tiny_llama, config, random_windows(8), rank=16, epochs=20, recall_target=0.9)
    held_out = predictors.header.training["heldout_layers"]
    for row in held_out:
        assert row["recall"] >= 0.9
        assert row["predicted_active"] < 1.0


@pytest.fixture
def saved_predictor(tiny_llama, tmp_path):
    config = tiny_config(tiny_llama, "gate_act", "block")
    path = tmp_path / "pred.safetensors"
    random_predictor(tiny_llama, config).save(path)
    return config, path


def test_mismatched_model_rejected(saved_predictor, tiny_gemma):
    config, path = saved_predictor
    predictors = load_predictor(path)
    with pytest.raises(UserError, match="train one for this model"):
        predictors.check(tiny_gemma, config)


def test_mismatched_config_rejected(saved_predictor, tiny_llama):
    config, path = saved_predictor
    other = replace(config, thresholds=[{"gate_act": value["gate_act"] * 1.5} for value in config.thresholds])
    with pytest.raises(UserError, match="other thresholds"):
        load_predictor(path, tiny_llama, other)
    neuron = tiny_config(tiny_llama, "gate_act", "neuron")
    with pytest.raises(UserError, match="granularity=block"):
        load_predictor(path, tiny_llama, neuron)


def test_corrupt_predictor_files_rejected(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match="not a readable safetensors file"):
        load_predictor(garbage)

    plain = tmp_path / "plain.safetensors"
    mx.save_safetensors(str(plain), {"w": mx.zeros((2,))})
    with pytest.raises(UserError, match="no mlx_sparse predictor header"):
        load_predictor(plain)

    with pytest.raises(UserError, match="not found"):
        load_predictor(tmp_path / "absent.safetensors")


def test_header_weight_mismatch_rejected(saved_predictor, tmp_path):
    _, path = saved_predictor
    weights, metadata = mx.load(str(path), return_metadata=True)
    header = json.loads(metadata["mlx_sparse_predictor"])
    header["rank"] = 5
    broken = tmp_path / "broken.safetensors"
    mx.save_safetensors(str(broken), weights, metadata={"mlx_sparse_predictor": json.dumps(header)})
    with pytest.raises(UserError, match="weights do not match its header"):
        load_predictor(broken)


@pytest.mark.parametrize("kwargs", [dict(rank=0), dict(recall_target=0.0), dict(recall_target=1.5)])
def test_invalid_predictor_settings_rejected(tiny_llama, kwargs):
    config = tiny_config(tiny_llama, "gate_act", "block")
    with pytest.raises(UserError, match="invalid"):
        PredictorSet.for_config(tiny_llama, config, **{"rank": 4, **kwargs})


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["train", "--model", "smollm2-135m", "--sparsity", "absent.json", "-o", "p.safetensors"], "sparsity config absent.json not found"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{config}", "--rank", "0", "-o", "p.safetensors"], "invalid --rank 0"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{config}", "--recall", "1.5", "-o", "p.safetensors"], "invalid --recall 1.5"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{config}", "-o", "p.bin"], "must end in .safetensors"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{config}", "-o", "{folder}"], "is a folder"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{config}", "--ctx", "1", "-o", "p.safetensors"], "invalid --ctx 1"),
        (["eval", "--model", "smollm2-135m", "--sparsity", "{config}", "--predictor", "absent.safetensors"], "predictor file absent.safetensors not found"),
        (["eval", "--model", "smollm2-135m", "--sparsity", "{config}", "--predictor", "{config}", "--max-windows", "0"], "invalid --max-windows 0"),
        (["train", "--model", "smollm2-135m", "--sparsity", "{ffn_in}", "-o", "p.safetensors"], "site gate_act or down_in"),
    ],
)
def test_predict_command_errors(tiny_llama, tmp_path, args, fragment):
    config = tiny_config(tiny_llama, "gate_act", "block")
    config_path = tmp_path / "config.json"
    config.save(config_path)
    ffn_in = tmp_path / "ffn_in.json"
    tiny_config(tiny_llama, "ffn_in", "neuron").save(ffn_in)
    filled = [arg.format(config=config_path, folder=tmp_path, ffn_in=ffn_in) for arg in args]
    result = run_module("predict", *filled)
    assert_one_line_error(result, fragment)
    assert not (REPO / "p.safetensors").exists()


@pytest.mark.real_model
def test_train_and_eval_commands_smollm2(smollm2, tmp_path):
    model, tokenizer = smollm2
    windows_valid = 2
    config_path = tmp_path / "config.json"
    from mlx_sparse.data import load_windows

    calibration = load_windows("wikitext2:valid", tokenizer, 128, windows_valid)
    calibrate_targets(model, calibration, [0.5], "gate_act", "block")[0].save(config_path)
    predictor = tmp_path / "pred.safetensors"
    result = run_module("predict", "train", "--model", "smollm2-135m", "--sparsity", str(config_path), "--rank", "32",
                        "--ctx", "128", "--max-windows", "8", "--epochs", "4", "--recall", "0.9", "-o", str(predictor))
    assert result.returncode == 0, result.stderr

    result = run_module("predict", "eval", "--model", "smollm2-135m", "--sparsity", str(config_path), "--predictor",
                        str(predictor), "--ctx", "128", "--max-windows", "1", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("recall", "precision", "predicted_active", "ppl_dense", "ppl_oracle", "ppl_predicted", "predictor_cost_ratio", "layers"):
        assert key in report, key
    assert len(report["layers"]) == 30
    assert report["recall"] > 0.8
    assert report["predicted_active"] < 0.9
    assert 0.3 < report["precision"] < 1.0
    assert report["ppl_oracle"] > report["ppl_dense"]

    out = tmp_path / "bench"
    result = run_module("bench", "--model", "smollm2-135m", "--sparsity", str(config_path), "--predictor", str(predictor),
                        "--new-tokens", "4", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    bench = json.loads((out / "bench.json").read_text())
    assert bench["predicted_tok_s"] > 0
    assert bench["speedup_predicted_vs_mlx_lm"] > 0
    assert bench["details"]["predicted"]["ffn_bytes_ratio"] < 1.0


@pytest.mark.real_model
def test_always_active_predictor_gemma3(gemma3):
    model, tokenizer = gemma3
    from mlx_sparse.data import load_windows

    windows = load_windows("wikitext2:valid", tokenizer, 64, 1)
    config = calibrate_targets(model, windows, [0.5], "down_in", "neuron")[0]
    result = evaluate_predictor(model, config, always_active(model, config), windows, known={"ppl_dense": 0.0})
    np.testing.assert_allclose(result["ppl_predicted"], result["ppl_oracle"], rtol=1e-5)
    assert result["recall"] == 1.0
