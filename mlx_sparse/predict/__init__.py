"""Neuron predictors: name each FFN's active units from its input (or the previous layer's) before any FFN weight is read."""

from .apply import apply_predictor, evaluate_predictor, remove_predictor
from .gather import attach_predictor, detach_predictor
from .predictor import LayerPredictor, PredictorSet, load_predictor
from .train import train_predictors
from .truth import capture_layers, iter_active_sets

__all__ = [
    "LayerPredictor",
    "PredictorSet",
    "apply_predictor",
    "attach_predictor",
    "capture_layers",
    "detach_predictor",
    "evaluate_predictor",
    "iter_active_sets",
    "load_predictor",
    "remove_predictor",
    "train_predictors",
]
