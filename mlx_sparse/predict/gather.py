"""Decoding with predicted block sets: attach a PredictorSet to the gather path's BlockSparseFFNs.

    apply_gather(model, config)
    attach_predictor(model, config, predictors)   # gate_proj, up_proj, down_proj: predicted blocks only
    detach_predictor(model)
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from ..errors import UserError
from ..runtime import gather_modules
from ..sparsity import SparsityConfig
from .apply import InputRelay
from .predictor import PredictorSet


class BlockPrediction:
    """Callable for one BlockSparseFFN: records its input and predicts its active blocks."""

    def __init__(self, predictors: PredictorSet, layer: int, relay: InputRelay):
        self.predictors = predictors
        self.layer = layer
        self.relay = relay

    def __call__(self, x: mx.array) -> mx.array:
        self.relay.inputs[self.layer] = x
        return self.predictors.predict(self.layer, self.relay.inputs[self.predictors.source_layer(self.layer)])


def attach_predictor(model: nn.Module, config: SparsityConfig, predictors: PredictorSet) -> nn.Module:
    """Make every gather FFN of `model` (see `runtime.apply_gather`) compute only the predicted blocks."""
    modules = gather_modules(model)
    if len(modules) != len(model.layers):
        raise UserError("attach_predictor needs the gather path on every layer; call mlx_sparse.runtime.apply_gather first")
    if config.granularity != "block":
        raise UserError(f"the gather path needs a block predictor, but this one predicts {config.granularity}s; train one with a block config")
    predictors.check(model, config)

    relay = InputRelay(len(modules))
    for index, module in enumerate(modules):
        object.__setattr__(module, "predictor", BlockPrediction(predictors, index, relay))
    return model


def detach_predictor(model: nn.Module) -> nn.Module:
    for module in gather_modules(model):
        object.__setattr__(module, "predictor", None)
    return model
