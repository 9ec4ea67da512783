"""Ground truth for prediction: which neurons or blocks of each FFN are active at each token.

For a sparsity config at site `gate_act` or `down_in`, a unit (a neuron for `neuron` granularity,
a block of `block_size` neurons for `block`) is active at a token when its site value survives
the threshold: |v| >= t for a neuron, block score >= t for a block. A forward pass with
`capture_layers` yields, per layer, the FFN input and this active mask for every token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..sparsity import SparseMLP, SparsityConfig, block_scores, sparsify, unsparsify

PREDICT_SITES = ("gate_act", "down_in")


def check_predict_config(config: SparsityConfig) -> None:
    """Raise `UserError` unless the config's site has one active set per FFN neuron."""
    if config.site not in PREDICT_SITES:
        raise UserError(
            f"active sets need a config at site gate_act or down_in, not {config.site}; "
            "calibrate one with python -m mlx_sparse.calibrate --site gate_act"
        )
    # NOTE: WINA scores and a dense prefix change which units are active; the predictor code
    # does not model them yet.
    if config.score != "magnitude" or config.dense_prefix:
        raise UserError(
            f"predictors support configs with score magnitude and no dense prefix, not score {config.score} with "
            f"dense prefix {config.dense_prefix}; calibrate with --score magnitude --dense-prefix 0"
        )


def num_units(config: SparsityConfig) -> int:
    """Return the active-set width of one layer: neurons, or blocks of neurons."""
    if config.granularity == "block":
        return config.intermediate_size // config.block_size
    return config.intermediate_size


def unit_scores(values: mx.array, config: SparsityConfig) -> mx.array:
    """Return what the threshold compares per unit: |v| per neuron or the relative block score."""
    if config.granularity == "block":
        return block_scores(values, config.block_size)
    return mx.abs(values).astype(mx.float32)


def active_mask(values: mx.array, config: SparsityConfig, layer: int) -> mx.array:
    """Return the boolean active set [..., units] of one layer's site values."""
    return unit_scores(values, config) >= config.thresholds[layer][config.site]


@dataclass
class LayerCapture:
    """One layer's FFN input [tokens, hidden] and active set [tokens, units] for one forward pass."""

    inputs: mx.array
    active: mx.array


class _CaptureInput(nn.Module):
    """Wrapper that keeps the FFN input of the last call and then runs the wrapped SparseMLP."""

    def __init__(self, inner: SparseMLP):
        super().__init__()
        self.inner = inner
        self.last_input = None

    def __call__(self, x: mx.array) -> mx.array:
        self.last_input = x
        return self.inner(x)


@contextmanager
def capture_layers(model: nn.Module, config: SparsityConfig):
    """Sparsify `model` with `config` and yield a function that runs tokens and returns LayerCaptures.

    The function takes int tokens [batch, length] and returns (logits, [LayerCapture per layer]),
    with tokens flattened to batch * length rows. The model runs with the thresholds applied, so
    each layer receives the inputs that the sparse model produces. The model is restored on exit.
    """
    check_predict_config(config)
    sparsify(model, config)
    modules = [layer.mlp for layer in model.layers]
    site_values: list[mx.array | None] = [None] * len(modules)

    def make_recorder(index: int):
        def record(name: str, values: mx.array) -> None:
            site_values[index] = values

        return record

    for index, (layer, module) in enumerate(zip(model.layers, modules)):
        module.recorder = make_recorder(index)
        layer.mlp = _CaptureInput(module)

    def run(tokens: mx.array) -> tuple[mx.array, list[LayerCapture]]:
        logits = model(tokens)
        captures = []
        for index, layer in enumerate(model.layers):
            inputs = layer.mlp.last_input
            captures.append(LayerCapture(
                inputs=inputs.reshape(-1, inputs.shape[-1]),
                active=active_mask(site_values[index], config, index).reshape(-1, num_units(config)),
            ))
        return logits, captures

    try:
        yield run
    finally:
        for layer, module in zip(model.layers, modules):
            module.recorder = None
            layer.mlp = module
        unsparsify(model)


def iter_active_sets(model: nn.Module, config: SparsityConfig, windows: mx.array) -> Iterator[list[LayerCapture]]:
    """Yield the evaluated LayerCaptures of each window of `windows` ([count, ctx]) in turn."""
    with capture_layers(model, config) as run:
        for index in range(windows.shape[0]):
            _, captures = run(windows[index : index + 1])
            mx.eval([(capture.inputs, capture.active) for capture in captures])
            yield captures
