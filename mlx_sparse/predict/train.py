"""Training of per-layer predictors on calibration text, with a bounded sample buffer.

One pass of the sparse model over the calibration windows fills, per layer, a reservoir of
(predictor input, active set) pairs: its memory is set by `max_samples`, not by the token count.
Each layer's predictor is then trained with Adam on a binary cross-entropy loss, and its decision
threshold is set on held-out samples so that it recalls `recall_target` of the truly active units.
"""

from __future__ import annotations

import logging
import math
import time

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np

from ..data import TokenWindows
from ..errors import UserError
from ..progress import progress_bar
from ..sparsity import SparsityConfig
from .predictor import PredictorSet
from .truth import capture_layers

logger = logging.getLogger(__name__)


class Reservoir:
    """Uniform sample of at most `capacity` rows from a stream of (input, target) row batches.

    Standard reservoir sampling (Algorithm R), vectorized per batch: after n rows have been
    offered, each of them is kept with probability capacity / n.
    """

    def __init__(self, capacity: int, input_width: int, target_width: int, rng: np.random.Generator):
        self.capacity = capacity
        self.inputs = np.zeros((capacity, input_width), dtype=np.float32)
        self.targets = np.zeros((capacity, target_width), dtype=np.bool_)
        self.seen = 0
        self.rng = rng

    def __len__(self) -> int:
        return min(self.seen, self.capacity)

    def add(self, inputs: np.ndarray, targets: np.ndarray) -> None:
        count = inputs.shape[0]
        free = max(0, min(self.capacity - self.seen, count))
        if free:
            self.inputs[self.seen : self.seen + free] = inputs[:free]
            self.targets[self.seen : self.seen + free] = targets[:free]

        # Row i of the rest is the (seen + i + 1)-th row offered: it replaces a random slot with
        # probability capacity / (seen + i + 1).
        positions = self.seen + np.arange(free, count) + 1
        slots = (self.rng.random(positions.shape[0]) * positions).astype(np.int64)
        keep = slots < self.capacity
        rows = np.arange(free, count)[keep]
        self.inputs[slots[keep]] = inputs[rows]
        self.targets[slots[keep]] = targets[rows]
        self.seen += count

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        size = len(self)
        return self.inputs[:size], self.targets[:size]


def collect_samples(model: nn.Module, config: SparsityConfig, windows: TokenWindows, max_samples: int,
                    lookahead: bool, seed: int = 0) -> list[Reservoir]:
    """Run the sparse model over `windows` and keep up to `max_samples` (input, active set) pairs per layer."""
    rng = np.random.default_rng(seed)
    reservoirs: list[Reservoir] = []
    with capture_layers(model, config) as run, progress_bar() as progress:
        task = progress.add_task("collecting active sets", total=windows.count)
        for index in range(windows.count):
            _, captures = run(windows.windows[index : index + 1])
            mx.eval([(capture.inputs, capture.active) for capture in captures])
            if not reservoirs:
                reservoirs = [
                    Reservoir(max_samples, capture.inputs.shape[-1], capture.active.shape[-1], rng) for capture in captures
                ]
            for layer, capture in enumerate(captures):
                source = captures[max(layer - 1, 0)] if lookahead else capture
                reservoirs[layer].add(np.array(source.inputs.astype(mx.float32)), np.array(capture.active))
            progress.update(task, advance=1)
    return reservoirs


def decision_threshold(logits: np.ndarray, targets: np.ndarray, recall_target: float) -> float:
    """Return the largest logit threshold that keeps at least `recall_target` of the active units.

    With no active unit in `targets` every threshold has full recall, and the threshold is +inf.
    """
    positives = np.sort(logits[targets])
    if positives.size == 0:
        return math.inf
    missed = int(math.floor((1.0 - recall_target) * positives.size + 1e-9))
    return float(positives[min(missed, positives.size - 1)])


def _train_layer(predictor: nn.Module, inputs: mx.array, targets: mx.array, epochs: int, batch_size: int,
                 learning_rate: float, rng: np.random.Generator) -> float:
    optimizer = optim.Adam(learning_rate=learning_rate)

    def loss_fn(module, x, y):
        return nn.losses.binary_cross_entropy(module(x), y, with_logits=True, reduction="mean")

    step = nn.value_and_grad(predictor, loss_fn)
    loss = mx.array(math.nan)
    count = inputs.shape[0]
    for _ in range(epochs):
        order = mx.array(rng.permutation(count).astype(np.uint32))
        for first in range(0, count, batch_size):
            batch = order[first : first + batch_size]
            loss, grads = step(predictor, inputs[batch], targets[batch])
            optimizer.update(predictor, grads)
            mx.eval(predictor.parameters(), optimizer.state, loss)
    return float(loss.item())


def train_predictors(model: nn.Module, config: SparsityConfig, windows: TokenWindows, rank: int = 64,
                     activation: str = "linear", lookahead: bool = False, recall_target: float = 0.99,
                     max_samples: int = 16384, holdout: float = 0.1, epochs: int = 8, batch_size: int = 256,
                     learning_rate: float = 3e-3, seed: int = 0) -> PredictorSet:
    """Train one predictor per layer for `config` on `windows` and set its decision thresholds.

    A random `holdout` share of each layer's samples is kept out of training and sets the decision
    threshold. The per-layer held-out recall, precision and predicted-active fraction are stored
    in the header's `training` entry.
    """
    if max_samples < 16:
        raise UserError(f"invalid max_samples {max_samples}; use at least 16, such as 16384")
    if not 0.0 < holdout < 1.0:
        raise UserError(f"invalid holdout share {holdout}; use a fraction in (0, 1), such as 0.1")
    if epochs < 1 or batch_size < 1 or learning_rate <= 0:
        raise UserError(f"invalid training settings (epochs {epochs}, batch size {batch_size}, learning rate {learning_rate}); use positive values")

    mx.random.seed(seed)
    predictors = PredictorSet.for_config(model, config, rank, activation, lookahead, recall_target)
    started = time.perf_counter()
    reservoirs = collect_samples(model, config, windows, max_samples, lookahead, seed)
    rng = np.random.default_rng(seed + 1)

    layers_report = []
    with progress_bar() as progress:
        task = progress.add_task("training predictors", total=len(reservoirs))
        for layer, reservoir in enumerate(reservoirs):
            inputs, targets = reservoir.arrays()
            order = rng.permutation(inputs.shape[0])
            held_count = max(1, int(round(holdout * inputs.shape[0])))
            train_rows, held_rows = order[held_count:], order[:held_count]

            loss = _train_layer(
                predictors.layers[layer], mx.array(inputs[train_rows]), mx.array(targets[train_rows].astype(np.float32)),
                epochs, batch_size, learning_rate, rng,
            )
            logits = np.array(predictors.layers[layer](mx.array(inputs[held_rows])))
            truth = targets[held_rows]
            threshold = decision_threshold(logits, truth, recall_target)
            predictors.header.decision_thresholds[layer] = threshold
            layers_report.append({"layer": layer, "train_loss": loss, **set_metrics(logits >= threshold, truth)})
            progress.update(task, advance=1)

    predictors.header.training = {
        "data": windows.source,
        "windows": windows.count,
        "ctx": windows.ctx,
        "samples_per_layer": len(reservoirs[0]),
        "holdout": holdout,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 1),
        "heldout_layers": layers_report,
    }
    logger.info(
        "Trained %d predictors (rank %d, %s%s) in %.0f s; held-out recall %.3f, predicted active %.3f",
        len(reservoirs), rank, activation, ", lookahead" if lookahead else "", time.perf_counter() - started,
        np.mean([row["recall"] for row in layers_report]), np.mean([row["predicted_active"] for row in layers_report]),
    )
    return predictors


def set_metrics(predicted: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Return recall, precision and the predicted and true active fractions of two boolean arrays."""
    hits = int(np.logical_and(predicted, truth).sum())
    predicted_count = int(predicted.sum())
    true_count = int(truth.sum())
    return {
        "recall": hits / true_count if true_count else 1.0,
        "precision": hits / predicted_count if predicted_count else 1.0,
        "predicted_active": predicted_count / predicted.size if predicted.size else 0.0,
        "true_active": true_count / truth.size if truth.size else 0.0,
    }
