"""Neuron grouping: permutations keep the dense model, group co-active neurons and write loadable folders."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from tokenizers import Tokenizer, models, pre_tokenizers

from conftest import REPO, TINY_CONFIGS, random_weights
from mlx_sparse import group
from mlx_sparse.data import TokenWindows
from mlx_sparse.errors import UserError

WORDS = ["[UNK]"] + [f"w{index}" for index in range(96)]


def random_windows(count=4, ctx=64, vocab=97, seed=5) -> TokenWindows:
    tokens = np.random.default_rng(seed).integers(0, vocab, size=(count, ctx)).astype(np.int32)
    return TokenWindows(source="random", windows=mx.array(tokens), total_tokens=count * ctx)


def random_permutations(model, seed=1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    width = model.layers[0].mlp.gate_proj.weight.shape[0]
    return [rng.permutation(width) for _ in model.layers]


def block_of(permutation: np.ndarray, block_size: int) -> np.ndarray:
    """Return the block index of every original neuron after the permutation."""
    return np.argsort(permutation) // block_size


def write_tiny_folder(folder: Path, kind: str = "llama", quantized: bool = False) -> Path:
    """Write a tiny random model folder with a 97-word tokenizer that mlx-lm can load."""
    folder.mkdir(parents=True)
    config = dict(TINY_CONFIGS[kind])
    weights = random_weights(config)
    if quantized:
        from mlx_sparse.loading import build_model

        model = build_model(config, weights)
        nn.quantize(model, group_size=32, bits=4, class_predicate=lambda _, module: isinstance(module, nn.Linear))
        weights = dict(tree_flatten(model.parameters()))
        config["quantization"] = {"group_size": 32, "bits": 4, "mode": "affine"}
    (folder / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(folder / "model.safetensors"), weights)

    tokenizer = Tokenizer(models.WordLevel({word: index for index, word in enumerate(WORDS)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]"}))
    return folder


def write_text(path: Path, words: int = 1200, seed: int = 2) -> Path:
    rng = np.random.default_rng(seed)
    path.write_text(" ".join(WORDS[index] for index in rng.integers(1, len(WORDS), size=words)))
    return path


# ---------------------------------------------------------------------------------------------
# Permuting


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gemma"])
def test_permute_keeps_dense_logits(request, fixture):
    model = request.getfixturevalue(fixture)
    tokens = random_windows(1, 24).windows
    before = model(tokens)
    gate_before = np.array(model.layers[0].mlp.gate_proj.weight)
    permutations = random_permutations(model)

    group.permute_ffn(model, permutations)

    np.testing.assert_allclose(np.array(model(tokens)), np.array(before), atol=1e-4, rtol=0)
    np.testing.assert_array_equal(np.array(model.layers[0].mlp.gate_proj.weight), gate_before[permutations[0]])


def test_permute_moves_down_proj_columns(tiny_llama):
    mlp = tiny_llama.layers[1].mlp
    down_before = np.array(mlp.down_proj.weight)
    up_before = np.array(mlp.up_proj.weight)
    permutations = random_permutations(tiny_llama, seed=4)

    group.permute_ffn(tiny_llama, permutations)

    np.testing.assert_array_equal(np.array(mlp.down_proj.weight), down_before[:, permutations[1]])
    np.testing.assert_array_equal(np.array(mlp.up_proj.weight), up_before[permutations[1]])


@pytest.mark.parametrize(
    ("permutations", "fragment"),
    [
        (lambda width: [np.arange(width)], "got 1 permutations for 2 layers"),
        (lambda width: [np.arange(width), np.zeros(width, dtype=int)], "layer 1 is not a permutation"),
        (lambda width: [np.arange(width), np.arange(width - 1)], "layer 1 is not a permutation"),
        (lambda width: [np.arange(width), np.arange(width) + 0.0], "layer 1 is not a permutation"),
    ],
)
def test_permute_invalid_permutation_rejected(tiny_llama, permutations, fragment):
    with pytest.raises(UserError, match=fragment):
        group.permute_ffn(tiny_llama, permutations(128))


def test_permute_quantized_rejected(tiny_llama):
    nn.quantize(tiny_llama, group_size=32, bits=4, class_predicate=lambda _, module: isinstance(module, nn.Linear))
    with pytest.raises(UserError, match="layer 0 FFN is quantized"):
        group.permute_ffn(tiny_llama, random_permutations(tiny_llama))


def test_permute_sparsified_rejected(tiny_llama):
    from mlx_sparse.calibration import calibrate_targets
    from mlx_sparse.sparsity import sparsify

    permutations = random_permutations(tiny_llama)
    sparsify(tiny_llama, calibrate_targets(tiny_llama, random_windows(), [0.5])[0])
    with pytest.raises(UserError, match="not a dense MLP"):
        group.permute_ffn(tiny_llama, permutations)


# ---------------------------------------------------------------------------------------------
# Grouping


@pytest.mark.parametrize("method", group.METHODS)
def test_group_model_returns_permutations(tiny_llama, method):
    permutations = group.group_model(tiny_llama, random_windows(), block_size=16, method=method, max_tokens=200)

    assert len(permutations) == len(tiny_llama.layers)
    for permutation in permutations:
        np.testing.assert_array_equal(np.sort(permutation), np.arange(128))


def test_group_model_same_seed_same_result(tiny_gemma):
    first = group.group_model(tiny_gemma, random_windows(), block_size=16, site="gate_act", max_tokens=100, seed=3)
    second = group.group_model(tiny_gemma, random_windows(), block_size=16, site="gate_act", max_tokens=100, seed=3)

    for a, b in zip(first, second):
        np.testing.assert_array_equal(a, b)


def coactive_magnitudes(tokens=3000, neurons=128, groups=8, seed=0):
    """Return magnitudes where neuron n belongs to group n % groups and each group fires as a whole."""
    rng = np.random.default_rng(seed)
    magnitudes = rng.uniform(0.0, 0.3, size=(tokens, neurons))
    for token in range(tokens):
        for fired in rng.choice(groups, size=2, replace=False):
            magnitudes[token, fired::groups] += rng.uniform(2.0, 4.0)
    return magnitudes


@pytest.mark.parametrize("method", ["energy", "coact"])
def test_group_layer_puts_coactive_neurons_in_one_block(method):
    permutation = group.group_layer(coactive_magnitudes(), block_size=16, method=method)

    blocks = block_of(permutation, 16)
    np.testing.assert_array_equal(np.sort(permutation), np.arange(128))
    for fired in range(8):
        members = np.arange(fired, 128, 8)
        assert len(set(blocks[members].tolist())) == 1, f"group {fired} spread over blocks {sorted(set(blocks[members].tolist()))}"


def test_group_layer_beats_identity_on_kept_energy():
    magnitudes = coactive_magnitudes(seed=1)
    shares = group.energy_shares(magnitudes)
    identity = np.arange(128) // 16

    grouped = block_of(group.group_layer(magnitudes, block_size=16), 16)

    assert group.kept_energy(shares, grouped, 0.5)[0] > 0.95
    assert group.kept_energy(shares, identity, 0.5)[0] < 0.8


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"block_size": 24}, "block size 24 does not divide the intermediate size 128"),
        ({"block_size": 0}, "invalid block size 0"),
        ({"method": "kmeans"}, "unknown grouping method 'kmeans'"),
        ({"site": "ffn_in"}, "unknown grouping site 'ffn_in'"),
        ({"target": 1.0}, "invalid grouping target 1.0"),
        ({"max_tokens": 0}, "invalid sample size 0"),
    ],
)
def test_group_model_bad_option_rejected(tiny_llama, kwargs, fragment):
    with pytest.raises(UserError, match=fragment):
        group.group_model(tiny_llama, random_windows(), **kwargs)


# ---------------------------------------------------------------------------------------------
# Writing and loading the folder


def test_saved_folder_loads_with_same_logits(tmp_path):
    from mlx_lm import load as mlx_lm_load

    from mlx_sparse import load

    source = write_tiny_folder(tmp_path / "source")
    model, _ = load(str(source))
    tokens = random_windows(1, 20).windows
    before = np.array(model(tokens))
    permutations = group.group_model(model, random_windows(), block_size=16, max_tokens=200)
    group.permute_ffn(model, permutations)
    info = {"method": "energy", "site": "down_in", "block_size": 16}

    out = group.save_grouped(model, source, tmp_path / "grouped", info, permutations)

    ours, _ = load(str(out))
    theirs, tokenizer = mlx_lm_load(str(out))
    np.testing.assert_allclose(np.array(ours(tokens)), before, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.array(theirs(tokens)), before, atol=1e-4, rtol=0)
    assert tokenizer.encode("w1 w2") == [2, 3]
    config = json.loads((out / "config.json").read_text())
    assert config[group.CONFIG_KEY] == info
    assert config["intermediate_size"] == 128
    stored = group.load_permutations(out)
    for saved, expected in zip(stored, permutations, strict=True):
        np.testing.assert_array_equal(saved, expected)


def test_saved_folder_from_tokenizer_object(tmp_path, tiny_gemma):
    from mlx_lm.utils import load_tokenizer

    source = write_tiny_folder(tmp_path / "source", kind="gemma3_text")
    tokenizer = load_tokenizer(source)
    tiny_gemma.config = dict(TINY_CONFIGS["gemma3_text"])

    out = group.save_grouped(tiny_gemma, tokenizer, tmp_path / "grouped", {"method": "coact"}, random_permutations(tiny_gemma))

    assert (out / "tokenizer.json").is_file()
    assert load_tokenizer(out).encode("w5") == [6]


def test_save_existing_output_rejected(tmp_path, tiny_llama):
    tiny_llama.config = dict(TINY_CONFIGS["llama"])
    source = write_tiny_folder(tmp_path / "source")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "notes.txt").write_text("keep")

    with pytest.raises(UserError, match="is not empty; pass a new folder"):
        group.save_grouped(tiny_llama, source, occupied, {})
    with pytest.raises(UserError, match="contains no config.json, so it is not replaced"):
        group.save_grouped(tiny_llama, source, occupied, {}, overwrite=True)
    assert (occupied / "notes.txt").read_text() == "keep"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["occupied", "source"]


def test_save_overwrite_replaces_model_folder(tmp_path, tiny_llama):
    tiny_llama.config = dict(TINY_CONFIGS["llama"])
    source = write_tiny_folder(tmp_path / "source")
    out = group.save_grouped(tiny_llama, source, tmp_path / "grouped", {"run": 1})

    group.save_grouped(tiny_llama, source, out, {"run": 2}, overwrite=True)

    assert json.loads((out / "config.json").read_text())[group.CONFIG_KEY] == {"run": 2}
    assert sorted(path.name for path in tmp_path.iterdir()) == ["grouped", "source"]


# ---------------------------------------------------------------------------------------------
# Command line


def test_cli_writes_grouped_folder(tmp_path):
    from mlx_sparse import load

    source = write_tiny_folder(tmp_path / "source")
    data = write_text(tmp_path / "text.txt")
    out = tmp_path / "grouped"

    group.main([
        "--model", str(source), "--data", str(data), "--ctx", "32", "--max-windows", "8", "--skip-windows", "2",
        "--block-size", "16", "--seed", "7", "-o", str(out),
    ])

    original, _ = load(str(source))
    grouped, _ = load(str(out))
    tokens = random_windows(1, 20).windows
    np.testing.assert_allclose(np.array(grouped(tokens)), np.array(original(tokens)), atol=1e-4, rtol=0)
    info = json.loads((out / "config.json").read_text())[group.CONFIG_KEY]
    assert info["method"] == group.DEFAULT_METHOD
    assert info["block_size"] == 16
    assert info["windows"] == 8
    assert info["data"] == f"{data} windows 2-9"
    assert info["seed"] == 7
    assert len(group.load_permutations(out)) == 2


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--block-size", "24"], "block size 24 does not divide the intermediate size 128"),
        (["--method", "kmeans"], "unknown grouping method 'kmeans'"),
        (["--site", "seed"], "unknown grouping site 'seed'"),
        (["--ctx", "1"], "invalid --ctx 1"),
        (["--max-windows", "0"], "invalid --max-windows 0"),
        (["--seed", "-1"], "invalid --seed -1"),
        (["--skip-windows", "-1"], "invalid --skip-windows -1"),
        (["--skip-windows", "40"], "has 37 windows, so skipping 40 leaves none"),
        (["--sample-tokens", "0"], "invalid sample size 0"),
    ],
)
def test_cli_bad_option_rejected(tmp_path, extra, fragment):
    source = write_tiny_folder(tmp_path / "source")
    data = write_text(tmp_path / "text.txt")
    out = tmp_path / "grouped"

    with pytest.raises(UserError, match=fragment):
        group.main(["--model", str(source), "--data", str(data), "--ctx", "32", "-o", str(out), *extra])
    assert not out.exists()


def test_cli_missing_data_rejected(tmp_path):
    source = write_tiny_folder(tmp_path / "source")
    with pytest.raises(UserError, match="data file .*absent.txt not found"):
        group.main(["--model", str(source), "--data", str(tmp_path / "absent.txt"), "-o", str(tmp_path / "grouped")])
    assert not (tmp_path / "grouped").exists()


def test_cli_existing_output_rejected(tmp_path):
    source = write_tiny_folder(tmp_path / "source")
    data = write_text(tmp_path / "text.txt")
    with pytest.raises(UserError, match="output folder .*source is not empty"):
        group.main(["--model", str(source), "--data", str(data), "-o", str(source)])


def test_cli_quantized_model_rejected(tmp_path):
    source = write_tiny_folder(tmp_path / "source", quantized=True)
    data = write_text(tmp_path / "text.txt")
    with pytest.raises(UserError, match="is quantized, and permuting down_proj columns would re-quantize it"):
        group.main(["--model", str(source), "--data", str(data), "-o", str(tmp_path / "grouped")])
    assert not (tmp_path / "grouped").exists()


def test_cli_error_is_one_line_exit_2(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mlx_sparse.group", "--model", "smollm2-135m", "--method", "kmeans", "-o", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=REPO, timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.strip() == "error: unknown grouping method 'kmeans'; use one of energy, coact, magnitude"
    assert result.stdout == ""


# ---------------------------------------------------------------------------------------------
# Real model


@pytest.mark.real_model
def test_smollm2_permutation_keeps_logits(smollm2):
    model, tokenizer = smollm2
    tokens = mx.array([tokenizer.encode("The capital of France is Paris, and the capital of Italy is Rome.")])
    before = np.array(model(tokens))
    permutations = random_permutations(model, seed=9)

    group.permute_ffn(model, permutations)
    try:
        after = np.array(model(tokens))
    finally:
        group.permute_ffn(model, [np.argsort(permutation) for permutation in permutations])

    # The permuted down_proj sums its 1536 products in another order. In float32 that moved these
    # logits (up to 29 in magnitude) by 6e-5 for this permutation and by 1.1e-4 for a grouping
    # permutation, as much as scoring the same tokens with a longer prefix does. A wrong
    # permutation moves them by whole units.
    np.testing.assert_allclose(after, before, atol=1e-3, rtol=0)
    np.testing.assert_allclose(np.array(model(tokens)), before, atol=1e-3, rtol=0)


@pytest.mark.real_model
def test_smollm2_grouping_lowers_block_perplexity(smollm2, wikitext_dir):
    from mlx_sparse.calibration import calibrate_targets
    from mlx_sparse.data import load_windows
    from mlx_sparse.perplexity import evaluate_perplexity
    from mlx_sparse.sparsity import sparsify, unsparsify

    model, tokenizer = smollm2
    calibration = load_windows("wikitext2:valid", tokenizer, 256, 2, wikitext_dir)
    test = load_windows("wikitext2:test", tokenizer, 256, 1, wikitext_dir)

    def block_perplexity() -> float:
        sparsify(model, calibrate_targets(model, calibration, [0.5], "down_in", "block", 32)[0])
        try:
            return evaluate_perplexity(model, test).ppl
        finally:
            unsparsify(model)

    ungrouped = block_perplexity()
    permutations = group.group_model(model, calibration, block_size=32)
    group.permute_ffn(model, permutations)
    try:
        grouped = block_perplexity()
    finally:
        group.permute_ffn(model, [np.argsort(permutation) for permutation in permutations])

    # Measured on one test window of 256 tokens: 585 ungrouped against 48 grouped.
    assert grouped < ungrouped / 3
