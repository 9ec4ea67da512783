"""Gather-path decoding: equivalence with the masked FFN, restoring dense MLPs, commands and errors."""

from __future__ import annotations

import json
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sparse import sparsify, unsparsify
from mlx_sparse.errors import UserError
from mlx_sparse.kernels import BlockSparseFFN
from mlx_sparse.models import MLP
from mlx_sparse.runtime import (
    apply_gather,
    gather_stats,
    model_dtype,
    remove_gather,
    set_gather_stats,
    weight_bytes_per_token,
)
from mlx_sparse.sparsity import SITE_TENSORS, SparsityConfig, describe_model
from test_cli import assert_one_line_error, run_module

BLOCK = 32
TOKENS = [3, 17, 42, 8, 91, 5, 60, 23]
BENCH_KEYS = (
    "model", "sparsity", "dtype", "threads", "blas", "mlx_lm_tok_s", "dense_tok_s", "sparse_tok_s",
    "speedup_sparse_vs_mlx_lm", "speedup_dense_vs_mlx_lm", "ffn_ms_dense", "ffn_ms_sparse",
    "weight_bytes_per_token_dense", "weight_bytes_per_token_sparse", "peak_memory_bytes",
)


def make_config(model, site="gate_act", granularity="block", threshold=0.9) -> SparsityConfig:
    shape = describe_model(model)
    return SparsityConfig(
        model_id=shape["model_id"],
        model_type=shape["model_type"],
        num_layers=shape["num_layers"],
        hidden_size=shape["hidden_size"],
        intermediate_size=shape["intermediate_size"],
        site=site,
        granularity=granularity,
        block_size=BLOCK,
        target=0.5,
        thresholds=[{name: threshold for name in SITE_TENSORS[site]} for _ in range(shape["num_layers"])],
    )


def decode_logits(model, tokens=TOKENS, prefill=3) -> np.ndarray:
    """Logits of a prefill of `prefill` tokens, then of one token per step, concatenated on the sequence axis."""
    cache = model.make_cache()
    steps = [model(mx.array([tokens[:prefill]]), cache=cache)]
    for token in tokens[prefill:]:
        steps.append(model(mx.array([[token]]), cache=cache))
    return np.array(mx.concatenate(steps, axis=1))


def quantize(model):
    nn.quantize(model, group_size=32, bits=4)
    mx.eval(model.parameters())
    return model


@pytest.fixture(params=["tiny_llama", "tiny_gemma"])
def tiny_model(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("site", ["gate_act", "down_in"])
@pytest.mark.parametrize("weights", ["fp32", "q4"])
def test_gather_logits_equal_masked(tiny_model, weights, site):
    model = quantize(tiny_model) if weights == "q4" else tiny_model
    config = make_config(model, site=site)

    sparsify(model, config)
    expected = decode_logits(model)
    unsparsify(model)

    apply_gather(model, config)
    set_gather_stats(model, True)
    actual = decode_logits(model)

    assert all(isinstance(layer.mlp, BlockSparseFFN) for layer in model.layers)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-5)
    active = gather_stats(model)["active_fraction"]
    assert 0.0 < active < 1.0


def test_gather_long_prefill_equals_masked(tiny_llama):
    config = make_config(tiny_llama)
    sparsify(tiny_llama, config)
    expected = decode_logits(tiny_llama, prefill=7)
    unsparsify(tiny_llama)
    apply_gather(tiny_llama, config)
    np.testing.assert_allclose(decode_logits(tiny_llama, prefill=7), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("weights", ["fp32", "q4"])
def test_remove_gather_restores_dense(tiny_model, weights):
    model = quantize(tiny_model) if weights == "q4" else tiny_model
    expected = decode_logits(model)
    apply_gather(model, make_config(model))
    remove_gather(model)
    assert all(type(layer.mlp) is MLP for layer in model.layers)
    assert model.sparsity_config is None
    np.testing.assert_array_equal(decode_logits(model), expected)


def test_apply_gather_replaces_masked(tiny_llama):
    config = make_config(tiny_llama)
    sparsify(tiny_llama, config)
    expected = decode_logits(tiny_llama)
    apply_gather(tiny_llama, config)
    assert all(isinstance(layer.mlp, BlockSparseFFN) for layer in tiny_llama.layers)
    assert tiny_llama.sparsity_config is config
    np.testing.assert_allclose(decode_logits(tiny_llama), expected, rtol=1e-4, atol=1e-5)


def test_apply_gather_twice_keeps_one_layer(tiny_llama):
    first, second = make_config(tiny_llama), make_config(tiny_llama, threshold=0.5)
    apply_gather(tiny_llama, first)
    apply_gather(tiny_llama, second)
    ffn = tiny_llama.layers[0].mlp
    assert isinstance(ffn, BlockSparseFFN)
    assert ffn.threshold == 0.5
    assert type(ffn.to_mlp()) is MLP


@pytest.mark.parametrize(
    ("site", "granularity"),
    [("gate_act", "neuron"), ("down_in", "neuron"), ("ffn_in", "block"), ("seed", "block"), ("seed", "neuron")],
)
def test_apply_gather_rejects_config(tiny_llama, site, granularity):
    config = make_config(tiny_llama, site=site, granularity=granularity)
    with pytest.raises(UserError, match=f"site {site} and granularity {granularity}") as error:
        apply_gather(tiny_llama, config)
    assert "--granularity block --site gate_act" in str(error.value)
    assert all(type(layer.mlp) is MLP for layer in tiny_llama.layers)


def test_apply_gather_wrong_model(tiny_llama, tiny_gemma):
    with pytest.raises(UserError, match="calibrate a config for this model"):
        apply_gather(tiny_gemma, make_config(tiny_llama))


def test_gather_stats_zero_threshold(tiny_llama):
    apply_gather(tiny_llama, make_config(tiny_llama, threshold=0.0))
    set_gather_stats(tiny_llama, True)
    decode_logits(tiny_llama, prefill=1)
    counted = gather_stats(tiny_llama)
    assert counted["tokens"] == len(TOKENS)
    assert counted["active_fraction"] == 1.0
    assert counted["ffn_bytes_ratio"] == 1.0
    assert counted["ffn_dense_bytes_per_token"] == 2 * 3 * 64 * 128 * 4


def test_gather_stats_no_active_block(tiny_llama):
    # A threshold above every relative block score (at most sqrt(blocks) = 2) gathers nothing, so
    # only gate_proj is read: one third of the FFN weights.
    apply_gather(tiny_llama, make_config(tiny_llama, threshold=1e9))
    set_gather_stats(tiny_llama, True)
    decode_logits(tiny_llama, prefill=1)
    counted = gather_stats(tiny_llama)
    assert counted["active_fraction"] == 0.0
    assert counted["ffn_bytes_ratio"] == pytest.approx(1 / 3)
    assert counted["ffn_bytes_per_token"] == 2 * 64 * 128 * 4


def test_gather_stats_off(tiny_llama):
    apply_gather(tiny_llama, make_config(tiny_llama))
    set_gather_stats(tiny_llama, True)
    set_gather_stats(tiny_llama, False)
    assert all(layer.mlp.stats is None for layer in tiny_llama.layers)
    with pytest.raises(UserError, match="no gather statistics"):
        gather_stats(tiny_llama)


def test_weight_bytes_tied(tiny_llama):
    parts = weight_bytes_per_token(tiny_llama)
    hidden, intermediate, vocab, layers = 64, 128, 97, 2
    # q_proj and o_proj are [64, 64]; k_proj and v_proj [32, 64] with 2 key-value heads of 16.
    attention = layers * (2 * hidden * hidden + 2 * 32 * hidden) * 4
    norms = (2 * layers + 1) * hidden * 4
    assert parts["ffn"] == layers * 3 * hidden * intermediate * 4
    assert parts["lm_head"] == vocab * hidden * 4
    assert parts["other"] == attention + norms
    assert parts["total"] == parts["ffn"] + parts["lm_head"] + parts["other"]


def test_weight_bytes_same_with_gather(tiny_llama):
    dense = weight_bytes_per_token(tiny_llama)
    apply_gather(tiny_llama, make_config(tiny_llama))
    assert weight_bytes_per_token(tiny_llama) == dense


def test_model_dtype_names(tiny_llama):
    config = make_config(tiny_llama)
    assert model_dtype(tiny_llama) == "float32"
    apply_gather(tiny_llama, config)
    assert model_dtype(tiny_llama) == "float32"
    remove_gather(tiny_llama)
    quantize(tiny_llama)
    assert model_dtype(tiny_llama) == "q4"
    apply_gather(tiny_llama, config)
    assert model_dtype(tiny_llama) == "q4"


def write_config(path, config: SparsityConfig):
    path.write_text(json.dumps(asdict(config)))
    return str(path)


def test_bench_missing_config(tmp_path):
    result = run_module("bench", "--model", "smollm2-135m", "--sparsity", str(tmp_path / "absent.json"), "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "absent.json not found")
    assert not (tmp_path / "out").exists()


def test_bench_neuron_config(tmp_path, tiny_llama):
    config = write_config(tmp_path / "neuron.json", make_config(tiny_llama, granularity="neuron"))
    result = run_module("bench", "--model", "smollm2-135m", "--sparsity", config, "--out", str(tmp_path / "out"))
    assert_one_line_error(result, "site gate_act and granularity neuron")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--new-tokens", "0"], "invalid --new-tokens 0"),
        (["--repeats", "0"], "invalid --repeats 0"),
        (["--dtype", "q8"], "invalid choice: 'q8'"),
    ],
)
def test_bench_bad_arguments(tmp_path, tiny_llama, args, fragment):
    config = write_config(tmp_path / "block.json", make_config(tiny_llama))
    result = run_module("bench", "--model", "smollm2-135m", "--sparsity", config, "--out", str(tmp_path / "out"), *args)
    assert_one_line_error(result, fragment)


def real_block_config(model, tmp_path, site="gate_act", granularity="block", threshold=0.9) -> str:
    return write_config(tmp_path / f"{site}_{granularity}.json", make_config(model, site, granularity, threshold))


@pytest.mark.real_model
def test_gather_equals_masked_smollm2(smollm2):
    model, _ = smollm2
    config = make_config(model)
    sparsify(model, config)
    try:
        expected = decode_logits(model)
    finally:
        unsparsify(model)
    apply_gather(model, config)
    try:
        actual = decode_logits(model)
    finally:
        remove_gather(model)
    np.testing.assert_allclose(actual, expected, rtol=1e-3, atol=1e-3)


@pytest.mark.real_model
def test_generate_gather_path_smollm2(smollm2, tmp_path):
    config = real_block_config(smollm2[0], tmp_path)
    result = run_module("generate", "--model", "smollm2-135m", "--sparsity", config, "--prompt", "The history of the city begins",
                        "--max-tokens", "8", "--ignore-chat-template")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "tokens/s" in result.stderr
    assert "Gather path on 30 layers" in result.stderr
    assert "gather path:" in result.stderr


@pytest.mark.real_model
def test_generate_masked_path_smollm2(smollm2, tmp_path):
    config = real_block_config(smollm2[0], tmp_path, site="down_in", granularity="neuron", threshold=0.01)
    result = run_module("generate", "--model", "smollm2-135m", "--sparsity", config, "--max-tokens", "4")
    assert result.returncode == 0, result.stderr
    assert "every weight is still read" in result.stderr
    assert "gather path:" not in result.stderr


@pytest.mark.real_model
def test_bench_writes_json_smollm2(smollm2, tmp_path):
    config = real_block_config(smollm2[0], tmp_path)
    out = tmp_path / "bench"
    result = run_module("bench", "--model", "smollm2-135m", "--sparsity", config, "--new-tokens", "8", "--repeats", "1", "--out", str(out))
    assert result.returncode == 0, result.stderr
    report = json.loads((out / "bench.json").read_text())
    for key in BENCH_KEYS:
        assert key in report, key
    assert report["model"] == "smollm2-135m"
    assert report["dtype"] == "float32"
    for key in ("mlx_lm_tok_s", "dense_tok_s", "sparse_tok_s", "ffn_ms_dense", "ffn_ms_sparse", "peak_memory_bytes"):
        assert report[key] > 0, key
    assert report["weight_bytes_per_token_sparse"] < report["weight_bytes_per_token_dense"]
    assert report["details"]["dense_tokens_match_mlx_lm"] is True
    assert report["details"]["weights_shared_with_mlx_lm"] is True
    assert 0.0 < report["details"]["active_fraction"] < 1.0
    assert "| decode tokens/s: mlx_sparse sparse (gather) |" in (out / "bench.md").read_text()
