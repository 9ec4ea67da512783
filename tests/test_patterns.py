"""Predictability study: overlap metrics, the ridge top-m rule, token replacement and the command."""

from __future__ import annotations

import json
import math

import mlx.core as mx
import numpy as np
import pytest

from mlx_sparse.calibration import calibrate_targets
from mlx_sparse.cli import run_command
from mlx_sparse.data import TokenWindows, load_windows
from mlx_sparse.errors import UserError
from mlx_sparse.patterns import (
    jaccard,
    main,
    recall,
    replace_tokens,
    ridge_scores,
    run_patterns,
    score_rules,
    top_m_hits,
    top_m_recall,
    window_unions,
)
from mlx_sparse.predict.truth import iter_active_sets
from mlx_sparse.sparsity import SparseMLP


def random_windows(count=2, ctx=40, vocab=97, seed=3):
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(count, ctx)).astype(np.int32)
    return TokenWindows(source="random", windows=mx.array(tokens), total_tokens=count * ctx)


def test_jaccard_hand_made():
    first = np.array([[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)
    second = np.array([[1, 0, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    np.testing.assert_allclose(jaccard(first, second), [1 / 3, 1.0, 1.0, 0.0])


def test_recall_pooled_over_rows():
    truth = np.array([[1, 1, 0, 0], [0, 0, 1, 0]], dtype=bool)
    predicted = np.array([[1, 0, 0, 0], [0, 0, 1, 1]], dtype=bool)
    assert recall(truth, predicted) == pytest.approx(2 / 3)
    assert math.isnan(recall(np.zeros((2, 4), dtype=bool), predicted))


def test_window_unions_hand_made():
    active = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 0], [0, 0, 1], [1, 0, 0]], dtype=bool)
    targets = np.array([2, 3, 4])
    np.testing.assert_array_equal(window_unions(active, 1, targets), active[[1, 2, 3]])
    expected = np.array([[1, 1, 0], [0, 1, 0], [0, 0, 1]], dtype=bool)
    np.testing.assert_array_equal(window_unions(active, 2, targets), expected)


def test_top_m_hits_per_row():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    truth = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=bool)
    np.testing.assert_array_equal(top_m_hits(scores, truth, np.array([2, 2])), [1, 2])
    np.testing.assert_array_equal(top_m_hits(scores, truth, np.array([0, 3])), [0, 2])
    assert top_m_recall(scores, truth) == pytest.approx(3 / 4)


def test_score_rules_fixed_m():
    scores = np.array([[0.9, 0.1, 0.5, 0.3], [0.2, 0.8, 0.7, 0.1]])
    truth = np.array([[1, 0, 0, 1], [0, 1, 1, 0]], dtype=bool)
    rules = score_rules(scores, truth, fixed_m=1)
    assert rules["recall"] == pytest.approx(3 / 4)
    assert rules["precision"] == pytest.approx(3 / 4)
    assert rules["recall_fixed_m"] == pytest.approx(2 / 4)
    assert rules["precision_fixed_m"] == pytest.approx(2 / 2)


def test_ridge_copy_recall_one():
    rng = np.random.default_rng(0)
    active = rng.random((400, 16)) < 0.5
    scores, alpha = ridge_scores(active[:200].astype(float), active[:200].astype(float), active[200:].astype(float))
    assert top_m_recall(scores, active[200:]) == 1.0
    assert alpha == 1e-3

    frequency = np.broadcast_to(active[:200].mean(axis=0), (200, 16))
    assert top_m_recall(frequency, active[200:]) < 0.7


def test_ridge_dual_matches_primal():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((30, 50))
    y = (rng.random((30, 6)) < 0.5).astype(float)
    wide, _ = ridge_scores(x[:20], y[:20], x[20:], alphas=[0.5])

    # Reference: closed-form ridge with standardised features and an unpenalised intercept.
    mean, std = x[:20].mean(axis=0), x[:20].std(axis=0)
    fit, apply = (x[:20] - mean) / std, (x[20:] - mean) / std
    weights = np.linalg.solve(fit.T @ fit + 0.5 * 20 * np.eye(50), fit.T @ (y[:20] - y[:20].mean(axis=0)))
    np.testing.assert_allclose(wide, y[:20].mean(axis=0) + apply @ weights, rtol=1e-8, atol=1e-10)


def test_replace_tokens_edits_fraction():
    tokens = np.arange(17, dtype=np.int32)
    edited, mask = replace_tokens(tokens, 0.25, np.arange(97), np.random.default_rng(0))
    assert mask.sum() == 4
    assert not mask[0]
    assert np.all(edited[mask] != tokens[mask])
    np.testing.assert_array_equal(edited[~mask], tokens[~mask])


def test_replace_tokens_fraction_zero():
    tokens = np.arange(17, dtype=np.int32)
    edited, mask = replace_tokens(tokens, 0.0, np.arange(97), np.random.default_rng(0))
    assert not mask.any()
    np.testing.assert_array_equal(edited, tokens)


@pytest.fixture
def tiny_study(tiny_llama):
    windows = random_windows()
    config = calibrate_targets(tiny_llama, windows, [0.5], "gate_act", "neuron")[0]
    result = run_patterns(tiny_llama, None, config, windows, window_sizes=[1, 4], replace_fractions=[0.0, 0.3], seed=1)
    return tiny_llama, config, windows, result


def test_patterns_fraction_zero_exact(tiny_study):
    _, _, _, result = tiny_study
    for entry in result["perturbation"]["layers"]:
        assert entry["jaccard_unedited"]["0"] == 1.0
        assert entry["recall_unedited"]["0"] == 1.0
        assert math.isnan(entry["jaccard_edited"]["0"])
        assert entry["jaccard_edited"]["0.3"] < 1.0
    assert result["perturbation"]["tokens"]["edited"]["0.3"] == 2 * round(0.3 * 39)


def test_patterns_cross_token_matches_reference(tiny_study):
    model, config, windows, result = tiny_study
    sums, pairs, hits, true = np.zeros(2), 0, np.zeros(2), np.zeros(2)
    for captures in iter_active_sets(model, config, windows.windows):
        for layer, capture in enumerate(captures):
            active = np.array(capture.active)
            sums[layer] += jaccard(active[1:-1], active[2:]).sum()
            previous = active[1:-4] | active[2:-3] | active[3:-2] | active[4:-1]
            hits[layer] += (previous & active[5:]).sum()
            true[layer] += active[5:].sum()
        pairs += active.shape[0] - 2

    layers = result["cross_token"]["layers"]
    np.testing.assert_allclose([entry["jaccard_consecutive"] for entry in layers], sums / pairs)
    np.testing.assert_allclose([entry["recall_by_k"]["4"] for entry in layers], hits / true)


def test_patterns_layout(tiny_study):
    model, _, _, result = tiny_study
    assert result["units"] == 128
    assert result["tokens"] == 80
    assert result["cross_token"]["k"] == [1, 4]
    assert len(result["cross_token"]["layers"]) == 2
    assert [entry["target_layer"] for entry in result["cross_layer"]["layers"]] == [1]
    assert result["cross_layer"]["layers"][0]["fit_tokens"] == 39
    assert set(result["summary"]["cross_layer_recall"]) == {"active_to_next", "input_to_next", "frequency", "same_layer_input"}
    assert not any(isinstance(layer.mlp, SparseMLP) for layer in model.layers)


def test_patterns_rejects_short_context(tiny_llama):
    windows = random_windows(ctx=10)
    config = calibrate_targets(tiny_llama, windows, [0.5], "gate_act", "neuron")[0]
    with pytest.raises(UserError, match="too short for a sliding window of 16"):
        run_patterns(tiny_llama, None, config, windows, window_sizes=[1, 16])


def test_patterns_rejects_ffn_in_config(tiny_llama):
    windows = random_windows()
    config = calibrate_targets(tiny_llama, windows, [0.5], "ffn_in", "neuron")[0]
    with pytest.raises(UserError, match="gate_act or down_in"):
        run_patterns(tiny_llama, None, config, windows)


@pytest.fixture
def config_file(tmp_path, tiny_llama):
    config = calibrate_targets(tiny_llama, random_windows(), [0.5], "gate_act", "neuron")[0]
    path = tmp_path / "config.json"
    config.save(path)
    return path


def run_main(capsys, *args):
    with pytest.raises(SystemExit) as exit_info:
        run_command(main, ["--model", "no-such-alias", *args])
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    return exit_info.value.code, lines


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--replace-fractions", "0.1,x"], "invalid --replace-fractions '0.1,x'"),
        (["--replace-fractions", "0.5,1"], "invalid --replace-fractions '0.5,1'"),
        (["--window-sizes", "0,4"], "invalid --window-sizes '0,4'"),
        (["--window-sizes", "a"], "invalid --window-sizes 'a'"),
        (["--window-sizes", "1,64", "--ctx", "32"], "context of 32 tokens is too short"),
        (["--max-windows", "0"], "invalid --max-windows 0"),
    ],
)
def test_cli_bad_argument_exit_2(tmp_path, capsys, config_file, args, fragment):
    out = tmp_path / "out"
    code, lines = run_main(capsys, "--sparsity", str(config_file), "--out", str(out), *args)
    assert code == 2
    assert len(lines) == 1
    assert fragment in lines[0]
    assert not out.exists()


def test_cli_missing_config_exit_2(tmp_path, capsys):
    code, lines = run_main(capsys, "--sparsity", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out"))
    assert code == 2
    assert lines == [f"error: sparsity config {tmp_path / 'absent.json'} not found; create one with python -m mlx_sparse.calibrate"]


@pytest.mark.parametrize("below", [False, True])
def test_cli_output_is_file_exit_2(tmp_path, capsys, config_file, below):
    target = tmp_path / "taken"
    target.write_text("x")
    out = target / "sub" if below else target
    code, lines = run_main(capsys, "--sparsity", str(config_file), "--out", str(out))
    assert code == 2
    assert len(lines) == 1
    assert f"output path {target} is a file" in lines[0]
    assert target.read_text() == "x"


def test_cli_unknown_model_after_checks(tmp_path, capsys, config_file):
    code, lines = run_main(capsys, "--sparsity", str(config_file), "--out", str(tmp_path / "out"))
    assert code == 2
    assert len(lines) == 1
    assert "no-such-alias" in lines[0]
    assert not (tmp_path / "out").exists()


@pytest.mark.real_model
def test_patterns_smollm2_block(smollm2, wikitext_dir):
    model, tokenizer = smollm2
    calibration = load_windows("wikitext2:valid", tokenizer, 128, 2, wikitext_dir)
    config = calibrate_targets(model, calibration, [0.5], "gate_act", "block")[0]
    windows = load_windows("wikitext2:test", tokenizer, 128, 1, wikitext_dir)
    result = run_patterns(model, tokenizer, config, windows, window_sizes=[1, 4], replace_fractions=[0.1], seed=0)
    json.dumps(result)

    assert result["units"] == 48
    for entry in result["cross_token"]["layers"]:
        assert 0 < entry["jaccard_consecutive"] < 1
    summary = result["summary"]
    assert summary["cross_layer_recall"]["frequency"] < summary["cross_layer_recall"]["input_to_next"]
    assert summary["perturbation"]["jaccard_edited"]["0.1"] < summary["perturbation"]["jaccard_unedited"]["0.1"]
