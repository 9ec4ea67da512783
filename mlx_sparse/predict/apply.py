"""Perplexity with predicted active sets: the FFN computes only what the predictor names.

`PredictedMLP` is the masked reference of decoding with a predictor. Units outside the predicted
set are zero, and inside it the sparsity config's threshold still applies. For block granularity
the block score divides a block's RMS by the token's RMS over the whole intermediate size with
the unpredicted blocks counted as zeros, because a decoder that skips those blocks never computes
them. That is the score the gather path computes, and with every unit predicted it equals the
oracle score exactly.
"""

from __future__ import annotations

import logging
import math
import time

import mlx.core as mx
import mlx.nn as nn

from ..data import TokenWindows
from ..models import MLP
from ..perplexity import evaluate_perplexity, window_loss
from ..progress import progress_bar
from ..sparsity import SparsityConfig, sparsify, unsparsify
from .predictor import PredictorSet
from .truth import check_predict_config, unit_scores

logger = logging.getLogger(__name__)


class InputRelay:
    """The FFN inputs of the current forward pass, by layer, so a lookahead predictor can read layer l - 1's."""

    def __init__(self, num_layers: int):
        self.inputs: list[mx.array | None] = [None] * num_layers


class PredictionStats:
    """Lazy counts of predicted, truly active and finally active units, summed over calls."""

    NAMES = ("hits", "predicted", "oracle", "active", "total")

    def __init__(self):
        self.counts = {name: mx.array(0.0) for name in self.NAMES}

    def add(self, predicted: mx.array, oracle: mx.array, active: mx.array) -> None:
        values = {
            "hits": mx.sum(predicted & oracle),
            "predicted": mx.sum(predicted),
            "oracle": mx.sum(oracle),
            "active": mx.sum(active),
            "total": mx.array(predicted.size),
        }
        for name, value in values.items():
            self.counts[name] = self.counts[name] + value.astype(mx.float32)

    def arrays(self) -> list[mx.array]:
        return list(self.counts.values())

    def summary(self) -> dict[str, float]:
        counts = {name: float(value.item()) for name, value in self.counts.items()}
        return {
            "recall": counts["hits"] / counts["oracle"] if counts["oracle"] else 1.0,
            "precision": counts["hits"] / counts["predicted"] if counts["predicted"] else 1.0,
            "predicted_active": counts["predicted"] / counts["total"] if counts["total"] else 0.0,
            "oracle_active": counts["oracle"] / counts["total"] if counts["total"] else 0.0,
            "active": counts["active"] / counts["total"] if counts["total"] else 0.0,
        }


class PredictedMLP(nn.Module):
    """An FFN whose active units are the predicted ones that also pass the config's threshold."""

    def __init__(self, mlp: MLP, layer: int, config: SparsityConfig, predictors: PredictorSet, relay: InputRelay):
        super().__init__()
        self.mlp = mlp
        self.layer = layer
        self.threshold = config.thresholds[layer][config.site]
        object.__setattr__(self, "_config", config)
        object.__setattr__(self, "_predictors", predictors)
        object.__setattr__(self, "_relay", relay)
        self.stats = PredictionStats()

    def _expand(self, values: mx.array, units: mx.array) -> mx.array:
        """Zero the neurons of `values` whose unit is False in `units`."""
        config = self._config
        if config.granularity == "neuron":
            return mx.where(units, values, mx.zeros_like(values))
        blocks = values.reshape(*values.shape[:-1], units.shape[-1], config.block_size)
        return mx.where(units[..., None], blocks, mx.zeros_like(blocks)).reshape(values.shape)

    def __call__(self, x: mx.array) -> mx.array:
        relay, predictors = self._relay, self._predictors
        relay.inputs[self.layer] = x
        predicted = predictors.predict(self.layer, relay.inputs[predictors.source_layer(self.layer)])

        mlp = self.mlp
        activated = mlp.activation(mlp.gate_proj(x))
        h = activated * mlp.up_proj(x)
        site = activated if self._config.site == "gate_act" else h

        oracle = unit_scores(site, self._config) >= self.threshold
        active = predicted & (unit_scores(self._expand(site, predicted), self._config) >= self.threshold)
        self.stats.add(predicted, oracle, active)
        return mlp.down_proj(self._expand(h, active))


def apply_predictor(model: nn.Module, config: SparsityConfig, predictors: PredictorSet) -> nn.Module:
    """Replace each layer's FFN with a PredictedMLP (in place); `remove_predictor` undoes it."""
    check_predict_config(config)
    remove_predictor(model)
    unsparsify(model)
    predictors.check(model, config)
    relay = InputRelay(len(model.layers))
    for index, layer in enumerate(model.layers):
        layer.mlp = PredictedMLP(layer.mlp, index, config, predictors, relay)
    return model


def remove_predictor(model: nn.Module) -> nn.Module:
    for layer in model.layers:
        if isinstance(layer.mlp, PredictedMLP):
            layer.mlp = layer.mlp.mlp
    return model


def predicted_modules(model: nn.Module) -> list[PredictedMLP]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, PredictedMLP)]


def predicted_perplexity(model: nn.Module, data: TokenWindows) -> tuple[float, list[dict]]:
    """Return the perplexity of a model with PredictedMLPs on `data` and the per-layer prediction stats."""
    modules = predicted_modules(model)
    for module in modules:
        module.stats = PredictionStats()

    total = 0.0
    with progress_bar() as progress:
        task = progress.add_task("perplexity, predicted sets", total=data.count)
        for index in range(data.count):
            loss = window_loss(model, data.windows[index : index + 1])
            mx.eval(loss, *[array for module in modules for array in module.stats.arrays()])
            total += loss.item()
            progress.update(task, advance=1)
    ppl = math.exp(total / (data.count * (data.ctx - 1)))
    return ppl, [{"layer": module.layer, **module.stats.summary()} for module in modules]


def ffn_weights(config: SparsityConfig) -> int:
    """Return the weight count of one FFN: gate_proj, up_proj and down_proj."""
    return 3 * config.hidden_size * config.intermediate_size


def evaluate_predictor(model: nn.Module, config: SparsityConfig, predictors: PredictorSet, data: TokenWindows,
                       known: dict | None = None) -> dict:
    """Measure recall, precision, predicted-active fraction, cost and perplexity (dense, oracle, predicted).

    The oracle run applies the config's thresholds to every unit (`sparsify`), and the predicted
    run lets only predicted units through. Recall and precision compare, at each token of the
    predicted run, the predicted set with the set that the threshold alone would keep. The
    predictor cost is its parameter count over the FFN weights that decoding skips for units
    outside the predicted set (gate_proj, up_proj and down_proj of each), which is also the
    ratio of their FLOPs per token. `known` may carry "ppl_dense", and "ppl_oracle" with
    "oracle_sparsity", measured earlier on the same data, and those runs are then skipped.
    """
    started = time.perf_counter()
    predictors.check(model, config)
    result = dict(known or {})
    if "ppl_dense" not in result:
        unsparsify(model)
        result["ppl_dense"] = evaluate_perplexity(model, data, description="perplexity, dense").ppl

    if "ppl_oracle" not in result:
        sparsify(model, config)
        try:
            oracle = evaluate_perplexity(model, data, description="perplexity, oracle sets")
        finally:
            unsparsify(model)
        result["ppl_oracle"] = oracle.ppl
        result["oracle_sparsity"] = oracle.actual_sparsity

    apply_predictor(model, config, predictors)
    try:
        result["ppl_predicted"], layers = predicted_perplexity(model, data)
    finally:
        remove_predictor(model)

    weights = ffn_weights(config)
    skipped = sum((1.0 - row["predicted_active"]) * weights for row in layers)
    for row, predictor in zip(layers, predictors.layers):
        layer_skipped = (1.0 - row["predicted_active"]) * weights
        row["predictor_cost_ratio"] = predictor.num_parameters / layer_skipped if layer_skipped else math.inf

    def mean(key: str) -> float:
        return sum(row[key] for row in layers) / len(layers)

    result.update(
        recall=mean("recall"),
        precision=mean("precision"),
        predicted_active=mean("predicted_active"),
        active=mean("active"),
        predictor_parameters=predictors.num_parameters,
        ffn_weights=weights * len(layers),
        predictor_cost_ratio=predictors.num_parameters / skipped if skipped else math.inf,
        tokens=data.count * (data.ctx - 1),
        windows=data.count,
        ctx=data.ctx,
        seconds=round(time.perf_counter() - started, 1),
        layers=layers,
    )
    return result
