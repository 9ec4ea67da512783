"""Per-layer sparsity allocation: which layers to sparsify how much for one model-level target.

The model-level sparsity is the average of the layers' sparsities, weighted by the weight bytes
that a layer's sparsity lets decoding skip. Those are W_down for `down_in` and for `seed` (whose
down_proj input decides), W_up and W_down for `gate_act`, and W_gate and W_up for `ffn_in`.

Greedy allocation starts dense and repeatedly raises by `step` the sparsity of the layer whose
step costs the least loss per skipped byte, measured as the mean next-token loss of the model on
a calibration batch. The search is lazy: a layer's cost is re-measured when it reaches the top
of the queue with a cost measured before the last accepted step, and it is taken only if it is
still the cheapest. The last step is shortened so that the weighted average meets the target.
"""

from __future__ import annotations

import heapq
import logging
import time

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import sparsity
from .calibration import Calibration
from .data import TokenWindows
from .errors import UserError
from .perplexity import window_loss
from .progress import progress_bar

logger = logging.getLogger(__name__)

# The projections whose weights a zero at each site lets decoding skip.
SKIPPED_PROJECTIONS = {
    "down_in": ("down_proj",),
    "seed": ("down_proj",),
    "gate_act": ("up_proj", "down_proj"),
    "ffn_in": ("gate_proj", "up_proj"),
}
# No layer is pushed beyond this sparsity.
MAX_LAYER_SPARSITY = 0.95


def skipped_weight_bytes(model: nn.Module, site: str) -> list[int]:
    """Return, per layer, the weight bytes (scales and biases included) that full sparsity at `site` would skip."""
    weights = []
    for layer in model.layers:
        mlp = layer.mlp.mlp if isinstance(layer.mlp, sparsity.SparseMLP) else layer.mlp
        weights.append(sum(
            value.nbytes for name in SKIPPED_PROJECTIONS[site] for _, value in tree_flatten(mlp[name].parameters())
        ))
    return weights


def weighted_sparsity(layer_targets: list[float], weights: list[int]) -> float:
    """Return the model-level sparsity: layer sparsities averaged with the skipped-byte weights."""
    return sum(value * weight for value, weight in zip(layer_targets, weights)) / sum(weights)


def mean_loss(model: nn.Module, windows: TokenWindows) -> float:
    total = 0.0
    for index in range(windows.count):
        loss = window_loss(model, windows.windows[index : index + 1])
        mx.eval(loss)
        total += loss.item()
    return total / (windows.count * (windows.ctx - 1))


def greedy_allocation(model: nn.Module, calibration: Calibration, target: float, loss_windows: TokenWindows,
                      step: float = 0.1) -> tuple[list[float], dict]:
    """Return per-layer sparsity targets whose weighted average is `target`, and a record of the search.

    The record contains the dense and final loss on `loss_windows`, the loss passes run and every
    accepted step (layer, new sparsity, loss after the step).
    """
    sparsity.check_target(target)
    if not 0.0 < step <= 0.5:
        raise UserError(f"invalid greedy step {step}; use a fraction in (0, 0.5], such as 0.1")
    weights = skipped_weight_bytes(model, calibration.site)
    total_weight = sum(weights)
    num_layers = len(weights)
    current = [0.0] * num_layers

    started = time.perf_counter()
    sparsity.sparsify(model, calibration.config(0.0, current))
    modules = sparsity.sparse_modules(model)
    passes = 0

    def loss_with(layer: int, value: float) -> float:
        nonlocal passes
        modules[layer].thresholds = calibration.thresholds(layer, value)
        passes += 1
        try:
            return mean_loss(model, loss_windows)
        finally:
            modules[layer].thresholds = calibration.thresholds(layer, current[layer])

    def step_size(layer: int) -> float:
        remaining = (target - weighted_sparsity(current, weights)) * total_weight / weights[layer]
        return max(0.0, min(step, MAX_LAYER_SPARSITY - current[layer], remaining))

    try:
        base_loss = mean_loss(model, loss_windows)
        current_loss = base_loss
        accepted = []
        queue = []
        with progress_bar() as progress:
            task = progress.add_task("greedy allocation", total=round(target * 1000))
            for layer in range(num_layers):
                size = step_size(layer)
                if size > 0:
                    cost = (loss_with(layer, current[layer] + size) - current_loss) / (weights[layer] * size)
                    heapq.heappush(queue, (cost, layer, 0))

            while queue and weighted_sparsity(current, weights) < target - 1e-9:
                cost, layer, measured_at = heapq.heappop(queue)
                size = step_size(layer)
                if size <= 0:
                    continue
                if measured_at != len(accepted):
                    cost = (loss_with(layer, current[layer] + size) - current_loss) / (weights[layer] * size)
                    heapq.heappush(queue, (cost, layer, len(accepted)))
                    continue

                current[layer] += size
                modules[layer].thresholds = calibration.thresholds(layer, current[layer])
                current_loss = cost * weights[layer] * size + current_loss
                accepted.append({"layer": layer, "sparsity": round(current[layer], 6), "loss": current_loss})
                progress.update(task, completed=round(weighted_sparsity(current, weights) * 1000))
                if step_size(layer) > 0:
                    # Its next step has not been measured: queue it with the old cost, marked stale.
                    heapq.heappush(queue, (cost, layer, -1))
        final_loss = mean_loss(model, loss_windows)
    finally:
        sparsity.unsparsify(model)

    achieved = weighted_sparsity(current, weights)
    if achieved < target - 1e-6:
        raise UserError(f"greedy allocation reached only {achieved:.3f} of target {target}: no layer may exceed {MAX_LAYER_SPARSITY}; use a lower target")
    record = {
        "step": step,
        "loss_windows": loss_windows.count,
        "loss_ctx": loss_windows.ctx,
        "loss_dense": base_loss,
        "loss_final": final_loss,
        "loss_passes": passes,
        "seconds": round(time.perf_counter() - started, 1),
        "weights": weights,
        "steps": accepted,
    }
    logger.info("Greedy allocation for %.2f: %d steps, %d loss passes, loss %.4f -> %.4f in %.0f s",
                target, len(accepted), passes, base_loss, final_loss, record["seconds"])
    return current, record


def allocate(model: nn.Module, calibration: Calibration, target: float, allocation: str = "uniform",
             loss_windows: TokenWindows | None = None, step: float = 0.1) -> sparsity.SparsityConfig:
    """Return the config for `target` with uniform per-layer targets or a greedy allocation."""
    if allocation == "uniform":
        return calibration.config(target)
    if allocation != "greedy":
        raise UserError(f"unknown allocation {allocation!r}; use uniform or greedy")
    if loss_windows is None:
        raise UserError("greedy allocation needs loss windows: a calibration batch to measure the loss on")
    if target == 0:
        return calibration.config(0.0, [0.0] * len(model.layers), allocation="greedy")
    layer_targets, record = greedy_allocation(model, calibration, target, loss_windows, step)
    return calibration.config(target, layer_targets, allocation="greedy", method={"greedy": record})


def plot_allocation(configs: list[sparsity.SparsityConfig], path) -> None:
    """Plot the per-layer sparsity of each config (uniform ones as flat lines) to a PNG file."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .cli import atomic_path

    figure, axis = plt.subplots(figsize=(7, 4))
    for config in configs:
        values = config.layer_targets or [config.target] * config.num_layers
        axis.plot(range(config.num_layers), values, marker="o", markersize=3,
                  label=f"{config.allocation}, target {config.target:g}")
    axis.set_xlabel("layer")
    axis.set_ylabel("calibrated sparsity")
    axis.set_ylim(0, 1)
    axis.set_title(f"{configs[0].model_id}: per-layer sparsity ({configs[0].site}, {configs[0].granularity})")
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)
