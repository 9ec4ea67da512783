"""Block-sparse FFN kernels against a dense masked reference computed from the dense MLP."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from mlx_sparse.errors import UserError
from mlx_sparse.kernels import UNION_MAX_TOKENS, BlockSparseFFN, FFNStats, block_scores

HIDDEN = 64
INTERMEDIATE = 256
BLOCK = 32
NUM_BLOCKS = INTERMEDIATE // BLOCK

# (dtype, bits): bits None keeps float weights.
WEIGHT_KINDS = {
    "fp32": (mx.float32, None),
    "fp16": (mx.float16, None),
    "q4": (mx.float32, 4),
    "q8": (mx.float32, 8),
}

# (rtol, atol) of the kernel against the dense masked reference. Quantized layers compute the same
# dequantized products in float32, so they get float32 tolerances. float16 rounds each partial block
# sum of down_proj, against one rounding of the dense product.
TOLERANCES = {"fp32": (1e-5, 1e-6), "fp16": (1e-2, 2e-3), "q4": (1e-5, 1e-6), "q8": (1e-5, 1e-6)}

SITE_MODES = [("gate_act", "gather"), ("gate_act", "dense"), ("down_in", "dense")]

# (batch, sequence length, prefill mode): decode, batched decode, and prefill on each path.
SHAPES = {
    "decode": (1, 1, "dense"),
    "batch_decode": (3, 1, "dense"),
    "prefill_dense": (2, 5, "dense"),
    "prefill_union": (2, 5, "union"),
    "prefill_auto_long": (1, 20, "auto"),
}


class SwiGLU(nn.Module):
    def __init__(self, hidden: int = HIDDEN, intermediate: int = INTERMEDIATE, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)

    def activation(self, x: mx.array) -> mx.array:
        return nn.silu(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


class GeGLU(SwiGLU):
    def activation(self, x: mx.array) -> mx.array:
        return nn.gelu_approx(x)


class NoActivation(nn.Module):
    def __init__(self):
        super().__init__()
        self.gate_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.up_proj = nn.Linear(HIDDEN, INTERMEDIATE, bias=False)
        self.down_proj = nn.Linear(INTERMEDIATE, HIDDEN, bias=False)


def make_mlp(kind: str, seed: int = 0, cls: type = SwiGLU, group_size: int = 32) -> nn.Module:
    mx.random.seed(seed)
    mlp = cls()
    dtype, bits = WEIGHT_KINDS[kind]
    mlp.set_dtype(dtype)
    if bits is not None:
        nn.quantize(mlp, group_size=group_size, bits=bits)
    mx.eval(mlp.parameters())
    return mlp


def make_input(kind: str, batch: int, seq_len: int, seed: int = 1) -> mx.array:
    mx.random.seed(seed)
    dtype, _ = WEIGHT_KINDS[kind]
    return mx.random.normal((batch, seq_len, HIDDEN)).astype(dtype)


def reference_parts(mlp: nn.Module, x: mx.array, site: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return the dense a, up_proj output and block scores (numpy float64) of the site values."""
    a = mlp.activation(mlp.gate_proj(x))
    u = mlp.up_proj(x)
    values = a if site == "gate_act" else a * u
    values = np.array(values.astype(mx.float32)).astype(np.float64)
    blocks = values.reshape(*values.shape[:-1], NUM_BLOCKS, BLOCK)
    token_rms = np.sqrt(np.mean(values**2, axis=-1, keepdims=True))
    scores = np.sqrt(np.mean(blocks**2, axis=-1)) / token_rms
    return a, u, scores


def masked_reference(mlp: nn.Module, x: mx.array, site: str, threshold: float) -> tuple[np.ndarray, np.ndarray]:
    """Return the dense masked FFN output and the block mask, from the dense layers of `mlp`."""
    a, u, scores = reference_parts(mlp, x, site)
    mask = scores >= threshold
    neuron_mask = mx.array(np.repeat(mask, BLOCK, axis=-1)).astype(a.dtype)
    if site == "gate_act":
        y = mlp.down_proj((a * neuron_mask) * u)
    else:
        y = mlp.down_proj((a * u) * neuron_mask)
    return np.array(y.astype(mx.float32)), mask


def case_threshold(scores: np.ndarray, case: str) -> float:
    """Place the threshold midway between two sorted block scores, so that rounding cannot move a block."""
    ordered = np.sort(scores.ravel())
    if case == "all":
        return 0.0
    if case == "all_above_zero":
        return float(ordered[0] / 2)
    if case == "none":
        return float(ordered[-1] * 2)
    if case == "one":
        return float((ordered[-1] + ordered[-2]) / 2)
    if case == "half":
        middle = ordered.size // 2
        return float((ordered[middle - 1] + ordered[middle]) / 2)
    raise ValueError(case)


@pytest.mark.parametrize("case", ["all", "all_above_zero", "none", "one", "half"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("site_mode", SITE_MODES, ids=["-".join(pair) for pair in SITE_MODES])
@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_ffn_matches_masked_reference(kind, site_mode, shape, case):
    site, up_mode = site_mode
    batch, seq_len, prefill = SHAPES[shape]
    mlp = make_mlp(kind)
    x = make_input(kind, batch, seq_len)
    _, _, scores = reference_parts(mlp, x, site)
    threshold = case_threshold(scores, case)
    expected, mask = masked_reference(mlp, x, site, threshold)

    ffn = BlockSparseFFN.from_mlp(mlp, site, threshold, BLOCK, up_mode=up_mode, prefill=prefill)
    stats = ffn.enable_stats()
    y = ffn(x)

    rtol, atol = TOLERANCES[kind]
    assert y.shape == x.shape
    assert y.dtype == x.dtype
    np.testing.assert_allclose(np.array(y.astype(mx.float32)), expected, rtol=rtol, atol=atol)
    assert stats.active_blocks == int(mask.sum())
    if case == "none":
        np.testing.assert_array_equal(np.array(y), 0)


@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_ffn_zero_threshold_equals_dense(kind):
    mlp = make_mlp(kind)
    x = make_input(kind, 1, 1)
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", 0.0, BLOCK)
    rtol, atol = TOLERANCES[kind]
    np.testing.assert_allclose(
        np.array(ffn(x).astype(mx.float32)), np.array(mlp(x).astype(mx.float32)), rtol=rtol, atol=atol
    )


def test_ffn_gelu_activation():
    mlp = make_mlp("fp32", cls=GeGLU)
    x = make_input("fp32", 1, 1)
    _, _, scores = reference_parts(mlp, x, "gate_act")
    threshold = case_threshold(scores, "half")
    expected, _ = masked_reference(mlp, x, "gate_act", threshold)
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, BLOCK)
    np.testing.assert_allclose(np.array(ffn(x)), expected, rtol=1e-5, atol=1e-6)


def test_ffn_random_thresholds():
    mlp = make_mlp("fp32")
    rng = np.random.default_rng(7)
    for seed in range(5):
        x = make_input("fp32", 1, 1, seed=seed + 10)
        _, _, scores = reference_parts(mlp, x, "down_in")
        ordered = np.sort(scores.ravel())
        position = int(rng.integers(1, ordered.size))
        threshold = float((ordered[position - 1] + ordered[position]) / 2)
        expected, mask = masked_reference(mlp, x, "down_in", threshold)
        ffn = BlockSparseFFN.from_mlp(mlp, "down_in", threshold, BLOCK)
        stats = ffn.enable_stats()
        np.testing.assert_allclose(np.array(ffn(x)), expected, rtol=1e-5, atol=1e-6)
        assert stats.active_blocks == ordered.size - position


def test_ffn_threshold_setter_changes_mask():
    mlp = make_mlp("fp32")
    x = make_input("fp32", 1, 1)
    _, _, scores = reference_parts(mlp, x, "gate_act")
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", 0.0, BLOCK)
    ffn.threshold = case_threshold(scores, "one")
    expected, _ = masked_reference(mlp, x, "gate_act", ffn.threshold)
    np.testing.assert_allclose(np.array(ffn(x)), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", list(WEIGHT_KINDS))
def test_to_mlp_round_trip(kind):
    mlp = make_mlp(kind)
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)
    restored = ffn.to_mlp()
    assert type(restored) is type(mlp)

    original = dict(nn.utils.tree_flatten(mlp.parameters()))
    rebuilt = dict(nn.utils.tree_flatten(restored.parameters()))
    assert sorted(rebuilt) == sorted(original)
    for name, value in original.items():
        assert rebuilt[name].shape == value.shape, name
        assert rebuilt[name].dtype == value.dtype, name
        np.testing.assert_array_equal(np.array(rebuilt[name]), np.array(value), err_msg=name)

    x = make_input(kind, 2, 3)
    np.testing.assert_array_equal(np.array(restored(x)), np.array(mlp(x)))


@pytest.mark.parametrize("kind", ["fp32", "q4"])
def test_to_mlp_restores_quantization(kind):
    mlp = make_mlp(kind)
    restored = BlockSparseFFN.from_mlp(mlp, "down_in", 0.1, BLOCK).to_mlp()
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert type(getattr(restored, name)) is type(getattr(mlp, name))
    if kind == "q4":
        assert restored.down_proj.bits == 4
        assert restored.down_proj.group_size == 32


def test_from_mlp_leaves_source_intact():
    mlp = make_mlp("fp32")
    BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)
    assert sorted(mlp.keys()) == ["down_proj", "gate_proj", "up_proj"]


def test_ffn_parameters_stored_once():
    ffn = BlockSparseFFN.from_mlp(make_mlp("fp32"), "gate_act", 0.1, BLOCK)
    names = sorted(name for name, _ in nn.utils.tree_flatten(ffn.parameters()))
    assert names == ["down_blocks.weight", "gate_blocks.weight", "up_blocks.weight"]
    assert ffn.gate_blocks.weight.shape == (NUM_BLOCKS, BLOCK, HIDDEN)
    assert ffn.down_blocks.weight.shape == (NUM_BLOCKS, BLOCK, HIDDEN)


def test_quantized_down_layout_is_per_block():
    ffn = BlockSparseFFN.from_mlp(make_mlp("q4"), "gate_act", 0.1, BLOCK)
    assert ffn.down_blocks.weight.shape == (NUM_BLOCKS, HIDDEN, BLOCK * 4 // 32)
    assert ffn.down_blocks.scales.shape == (NUM_BLOCKS, HIDDEN, 1)
    assert ffn.gate_blocks.weight.shape == (NUM_BLOCKS, BLOCK, HIDDEN * 4 // 32)


def test_stats_decode_weight_bytes():
    mlp = make_mlp("fp32")
    x = make_input("fp32", 1, 1)
    _, _, scores = reference_parts(mlp, x, "gate_act")
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", case_threshold(scores, "half"), BLOCK)
    stats = ffn.enable_stats()
    ffn(x)
    block_bytes = BLOCK * HIDDEN * 4
    active = NUM_BLOCKS // 2
    assert stats.calls == 1
    assert stats.tokens == 1
    assert stats.active_blocks == active
    assert stats.total_blocks == NUM_BLOCKS
    assert stats.weight_bytes == (NUM_BLOCKS + 2 * active) * block_bytes
    assert stats.dense_weight_bytes == 3 * NUM_BLOCKS * block_bytes
    assert stats.weight_bytes_ratio == pytest.approx(2 / 3)
    assert stats.active_fraction == pytest.approx(0.5)


def test_stats_dense_up_counts_all_up_blocks():
    mlp = make_mlp("fp32")
    x = make_input("fp32", 1, 1)
    _, _, scores = reference_parts(mlp, x, "down_in")
    ffn = BlockSparseFFN.from_mlp(mlp, "down_in", case_threshold(scores, "one"), BLOCK)
    stats = ffn.enable_stats()
    ffn(x)
    block_bytes = BLOCK * HIDDEN * 4
    assert stats.weight_bytes == (2 * NUM_BLOCKS + 1) * block_bytes


def test_stats_quantized_block_bytes():
    mlp = make_mlp("q4")
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", 0.0, BLOCK)
    stats = ffn.enable_stats()
    ffn(make_input("q4", 1, 1))
    dense_bytes = sum(
        getattr(getattr(mlp, name), part).nbytes
        for name in ("gate_proj", "up_proj", "down_proj")
        for part in ("weight", "scales", "biases")
    )
    assert stats.dense_weight_bytes == dense_bytes
    assert stats.weight_bytes == dense_bytes


def test_stats_dense_prefill():
    mlp = make_mlp("fp32")
    x = make_input("fp32", 2, 5)
    _, _, scores = reference_parts(mlp, x, "gate_act")
    threshold = case_threshold(scores, "half")
    _, mask = masked_reference(mlp, x, "gate_act", threshold)
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, BLOCK, prefill="dense")
    stats = ffn.enable_stats()
    ffn(x)
    assert stats.tokens == 10
    assert stats.total_blocks == 10 * NUM_BLOCKS
    assert stats.active_blocks == int(mask.sum())
    assert stats.weight_bytes == stats.dense_weight_bytes


@pytest.mark.parametrize("seq_len, union", [(UNION_MAX_TOKENS, True), (UNION_MAX_TOKENS + 1, False)])
def test_prefill_auto_path(seq_len, union):
    mlp = make_mlp("fp32")
    x = make_input("fp32", 1, seq_len)
    _, _, scores = reference_parts(mlp, x, "gate_act")
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", case_threshold(scores, "one"), BLOCK)
    stats = ffn.enable_stats()
    ffn(x)
    block_bytes = BLOCK * HIDDEN * 4
    expected = (NUM_BLOCKS + 2) * block_bytes if union else 3 * NUM_BLOCKS * block_bytes
    assert stats.weight_bytes == expected


def test_stats_off_by_default():
    ffn = BlockSparseFFN.from_mlp(make_mlp("fp32"), "gate_act", 0.1, BLOCK)
    ffn(make_input("fp32", 1, 1))
    assert ffn.stats is None


def test_stats_reset():
    stats = FFNStats()
    stats.record(tokens=2, active_blocks=3, total_blocks=16, weight_bytes=10, dense_weight_bytes=20)
    stats.reset()
    assert stats == FFNStats()
    assert stats.active_fraction == 0.0
    assert stats.weight_bytes_ratio == 0.0


def test_block_scores_values():
    rng = np.random.default_rng(3)
    values = rng.normal(size=(2, 3, INTERMEDIATE)).astype(np.float32)
    wide = values.astype(np.float64)
    token_rms = np.sqrt(np.mean(wide**2, axis=-1, keepdims=True))
    expected = np.sqrt(np.mean(wide.reshape(2, 3, NUM_BLOCKS, BLOCK) ** 2, axis=-1)) / token_rms
    scores = block_scores(mx.array(values), BLOCK)
    assert scores.shape == (2, 3, NUM_BLOCKS)
    np.testing.assert_allclose(np.array(scores), expected, rtol=1e-6)


def test_block_scores_float16_no_overflow():
    values = mx.concatenate([mx.full((1, BLOCK), 300.0, dtype=mx.float16), mx.zeros((1, INTERMEDIATE - BLOCK), dtype=mx.float16)], axis=-1)
    scores = block_scores(values, BLOCK)
    assert scores.dtype == mx.float32
    # One block of 300s among zeros: its RMS is 300 and the token's is 300 / sqrt(NUM_BLOCKS).
    np.testing.assert_allclose(np.array(scores)[0, 0], np.sqrt(NUM_BLOCKS), rtol=1e-6)
    np.testing.assert_allclose(np.array(scores)[0, 1:], 0.0)


@pytest.mark.parametrize("block_size", [0, 48])
def test_block_scores_bad_block_size(block_size):
    with pytest.raises(UserError, match=f"block_size {block_size}"):
        block_scores(mx.zeros((1, INTERMEDIATE)), block_size)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"site": "up_out"}, "unknown site 'up_out'"),
        ({"up_mode": "fused"}, "unknown up_mode 'fused'"),
        ({"site": "down_in", "up_mode": "gather"}, "up_mode 'gather' needs site 'gate_act'"),
        ({"prefill": "sparse"}, "unknown prefill 'sparse'"),
        ({"block_size": 48}, "block_size 48 does not divide"),
        ({"block_size": 0}, "invalid block_size 0"),
        ({"threshold": -0.5}, "invalid block threshold -0.5"),
        ({"threshold": float("nan")}, "invalid block threshold nan"),
        ({"threshold": "high"}, "invalid block threshold 'high'"),
    ],
)
def test_from_mlp_bad_arguments(kwargs, message):
    arguments = {"site": "gate_act", "threshold": 0.1, "block_size": BLOCK} | kwargs
    with pytest.raises(UserError, match=message):
        BlockSparseFFN.from_mlp(make_mlp("fp32"), **arguments)


def test_from_mlp_block_not_multiple_of_group():
    mlp = make_mlp("q4", group_size=64)
    with pytest.raises(UserError, match="block_size 32 is not a multiple of the quantization group size 64"):
        BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, 32)


def test_from_mlp_group_size_64():
    mlp = make_mlp("q4", group_size=64)
    x = make_input("q4", 1, 1)
    a = mlp.activation(mlp.gate_proj(x))
    wide = np.array(a).astype(np.float64)
    values = wide.reshape(1, 1, -1, 64)
    scores = np.sqrt(np.mean(values**2, axis=-1)) / np.sqrt(np.mean(wide**2, axis=-1, keepdims=True))
    threshold = case_threshold(scores, "half")
    neuron_mask = mx.array(np.repeat(scores >= threshold, 64, axis=-1)).astype(mx.float32)
    expected = mlp.down_proj((a * neuron_mask) * mlp.up_proj(x))

    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, 64)
    assert ffn.num_blocks == INTERMEDIATE // 64
    np.testing.assert_allclose(np.array(ffn(x)), np.array(expected), rtol=1e-5, atol=1e-6)


def test_from_mlp_missing_activation():
    mlp = NoActivation()
    with pytest.raises(UserError, match="NoActivation has no activation"):
        BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)


def test_from_mlp_bias_rejected():
    mlp = SwiGLU(bias=True)
    with pytest.raises(UserError, match="gate_proj has a bias"):
        BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)


def test_from_mlp_non_affine_rejected():
    mlp = make_mlp("fp32")
    nn.quantize(mlp, group_size=32, bits=4, mode="mxfp4")
    with pytest.raises(UserError, match="quantization mode 'mxfp4'"):
        BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)


def test_from_mlp_inconsistent_shapes():
    mlp = make_mlp("fp32")
    mlp.up_proj = nn.Linear(HIDDEN, 2 * INTERMEDIATE, bias=False)
    with pytest.raises(UserError, match="inconsistent FFN shapes"):
        BlockSparseFFN.from_mlp(mlp, "gate_act", 0.1, BLOCK)


def test_threshold_setter_rejects_negative():
    ffn = BlockSparseFFN.from_mlp(make_mlp("fp32"), "gate_act", 0.1, BLOCK)
    with pytest.raises(UserError, match="invalid block threshold -1"):
        ffn.threshold = -1
    assert ffn.threshold == 0.1


def test_ffn_wrong_hidden_size():
    ffn = BlockSparseFFN.from_mlp(make_mlp("fp32"), "gate_act", 0.1, BLOCK)
    with pytest.raises(ValueError, match="last axis 32, expected the hidden size 64"):
        ffn(mx.zeros((1, 1, 32)))
