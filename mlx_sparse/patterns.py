"""Predictability study of FFN active sets: across tokens, across layers and under token edits.

    python -m mlx_sparse.patterns --model smollm2-135m --sparsity cfg.json --out out/patterns

The active set of a layer at a token is the set of units (neurons or blocks) whose site value
survives the config's threshold (see `mlx_sparse.predict.truth`). Three studies run on the same
windows, one window at a time:

- cross-token: Jaccard of consecutive tokens' active sets, and recall of a token's set by the
  union of the previous k tokens' sets, with that union's size as a fraction of the units;
- cross-layer: ridge maps from layer l's active set, or from its FFN input, to layer l+1's active
  set, scored with a top-m rule against a per-unit firing-frequency baseline;
- perturbation: a fraction of the token positions replaced by random tokens, and the overlap of
  the edited run's active sets with the original run's, at unedited and at edited positions.

Position 0 of every window (BOS, or the first token of a fresh sequence) is left out of every
statistic, because it can attend only to itself and so behaves unlike the other positions.
"""

from __future__ import annotations

import json
import logging
import math
import numbers
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cli import ArgumentParser, atomic_path, run_command, setup_logging, write_text_atomic
from .data import TokenWindows, load_windows
from .errors import UserError
from .predict.truth import LayerCapture, capture_layers, check_predict_config, num_units
from .progress import progress_bar
from .sparsity import SparsityConfig, load_config

logger = logging.getLogger(__name__)

DEFAULT_WINDOW_SIZES = (1, 4, 16)
DEFAULT_REPLACE_FRACTIONS = (0.05, 0.1, 0.2, 0.3)
# Tokens kept per layer for the cross-layer fits: ceil(MAX_FIT_TOKENS / windows) random positions
# of each window, so the total exceeds it by less than the window count.
MAX_FIT_TOKENS = 4096
# Ridge penalties, as multiples of the number of fit tokens (each standardised feature has unit
# variance, so n is the scale of a diagonal entry of X^T X).
RIDGE_ALPHAS = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)

CROSS_LAYER_RULE = (
    "ridge regression (numpy, closed form) from standardised features to the 0/1 active vector of "
    "layer l+1, intercept unpenalised; fit on the first half of the sampled tokens (in window order), "
    "scored on the second half. The penalty is chosen from alpha * n_fit, alpha in "
    f"{list(RIDGE_ALPHAS)}, by recall on the last quarter of the fit half. Rule top_m_true_count: "
    "predict the m highest-scoring units with m = the true active count of the token, so precision "
    "equals recall. Rule top_m_fixed (keys *_fixed_m): m = the mean active count per token on the "
    "fit half, the same m for every token. Recall and precision are micro-averaged over tokens. "
    "frequency: the score of a unit is its firing frequency on the fit half, for every token."
)
DEFINITIONS = {
    "jaccard": "|A and B| / |A or B| per token, averaged over tokens; two empty sets count as 1",
    "recall": "sum over tokens of |true and predicted| / sum over tokens of |true| (micro-average)",
    "positions": "position 0 of every window is excluded from every statistic",
    "jaccard_consecutive": "tokens t-1 and t, for t >= 2",
    "jaccard_random_pair": "pairs of positions drawn at random from the same window (a baseline)",
    "recall_by_k": "recall of token t's set by the union of the sets of tokens t-k .. t-1, for t > max(k)",
    "union_fraction_by_k": "mean size of that union as a fraction of the units (the recall of a random set of that size)",
    "perturbation_unedited": "positions >= 1 that kept their token, compared with the same positions of the original run",
    "perturbation_unedited_after_first_edit": "unedited positions after the first edited one; earlier positions match exactly by causality",
    "perturbation_edited": "positions that got a random token, compared with the original token's set at that position",
}


# Overlap metrics on boolean masks [tokens, units].


def jaccard(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """Return the Jaccard index of each row pair of two boolean masks; 1.0 where both rows are empty."""
    intersection = np.logical_and(first, second).sum(axis=-1)
    union = np.logical_or(first, second).sum(axis=-1)
    return np.where(union > 0, intersection / np.maximum(union, 1), 1.0)


def recall(truth: np.ndarray, predicted: np.ndarray) -> float:
    """Return the fraction of all true units that `predicted` covers, pooled over rows (nan if none are true)."""
    total = int(truth.sum())
    if total == 0:
        return math.nan
    return float(np.logical_and(truth, predicted).sum() / total)


def window_unions(active: np.ndarray, k: int, targets: np.ndarray) -> np.ndarray:
    """Return, for each target position t, the union of the active sets of positions t-k .. t-1.

    `active` is [positions, units]; every target must be at least k.
    """
    counts = np.cumsum(active, axis=0, dtype=np.int32)
    counts = np.concatenate([np.zeros((1, active.shape[1]), dtype=np.int32), counts], axis=0)
    return (counts[targets] - counts[targets - k]) > 0


# Cross-layer prediction: ridge scores and the top-m rule.


def top_m_hits(scores: np.ndarray, truth: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Return per row how many of the `m` highest-scoring units are truly active.

    `scores` and `truth` are [rows, units]; `m` is one count per row (or a scalar). Ties in score
    go to the lower unit index.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.cumsum(np.take_along_axis(truth, order, axis=1), axis=1)
    hits = np.concatenate([np.zeros((truth.shape[0], 1), dtype=hits.dtype), hits], axis=1)
    m = np.broadcast_to(np.asarray(m, dtype=np.int64), (truth.shape[0],))
    return hits[np.arange(truth.shape[0]), m]


def top_m_recall(scores: np.ndarray, truth: np.ndarray) -> float:
    """Return the pooled recall of the rule top_m_true_count (precision is the same number)."""
    counts = truth.sum(axis=1)
    total = int(counts.sum())
    if total == 0:
        return math.nan
    return float(top_m_hits(scores, truth, counts).sum() / total)


def score_rules(scores: np.ndarray, truth: np.ndarray, fixed_m: int) -> dict:
    """Return recall and precision of the rules top_m_true_count and top_m_fixed for one predictor."""
    oracle = top_m_recall(scores, truth)
    hits = int(top_m_hits(scores, truth, fixed_m).sum())
    true_total = int(truth.sum())
    predicted_total = fixed_m * truth.shape[0]
    return {
        "recall": oracle,
        "precision": oracle,
        "recall_fixed_m": hits / true_total if true_total else math.nan,
        "precision_fixed_m": hits / predicted_total if predicted_total else math.nan,
    }


def _standardise(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    mean = train.mean(axis=0)
    std = train.std(axis=0)
    std = np.where(std > 1e-6, std, 1.0)
    return [(array - mean) / std for array in (train, *others)]


def _ridge_solve(x_fit: np.ndarray, y_fit: np.ndarray, x_apply: np.ndarray, alphas: Sequence[float]) -> list[np.ndarray]:
    """Return the ridge predictions on `x_apply` for each penalty alpha * n_fit.

    The normal equations are solved in the primal (features x features) or the dual
    (tokens x tokens) form, whichever is smaller. Both give the same ridge solution.
    """
    # NOTE: np.linalg.solve is used rather than one SVD for all penalties because numpy's
    # multithreaded LAPACK SVD and eigh ran 40x slower than single-threaded on a 2-core Linux
    # machine shared with other jobs, while LU solves stayed fast.
    x_fit, x_apply = _standardise(x_fit, x_apply)
    y_mean = y_fit.mean(axis=0)
    y_centred = y_fit - y_mean
    count, width = x_fit.shape
    predictions = []
    if width <= count:
        gram = x_fit.T @ x_fit
        cross = x_fit.T @ y_centred
        for alpha in alphas:
            weights = np.linalg.solve(gram + alpha * count * np.eye(width), cross)
            predictions.append(y_mean + x_apply @ weights)
    else:
        kernel = x_fit @ x_fit.T
        applied = x_apply @ x_fit.T
        for alpha in alphas:
            dual = np.linalg.solve(kernel + alpha * count * np.eye(count), y_centred)
            predictions.append(y_mean + applied @ dual)
    return predictions


def ridge_scores(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray, alphas: Sequence[float] = RIDGE_ALPHAS) -> tuple[np.ndarray, float]:
    """Fit a ridge map x -> y on the training rows and return (scores on `x_test`, chosen alpha).

    Features are standardised and y is centred with the training statistics, so the intercept
    is not penalised. Each alpha is fitted on the first three quarters of the training rows and
    scored by top_m_true_count recall on the last quarter. The best alpha (the smaller on a tie)
    is then refitted on all training rows.
    """
    x_train = np.asarray(x_train, dtype=np.float64)
    y_train = np.asarray(y_train, dtype=np.float64)
    x_test = np.asarray(x_test, dtype=np.float64)
    split = (3 * x_train.shape[0]) // 4
    if len(alphas) > 1 and split >= 2 and split < x_train.shape[0]:
        truth = y_train[split:] > 0.5
        candidates = _ridge_solve(x_train[:split], y_train[:split], x_train[split:], alphas)
        recalls = [top_m_recall(scores, truth) for scores in candidates]
        recalls = [-1.0 if math.isnan(value) else value for value in recalls]
        alpha = alphas[int(np.argmax(recalls))]
    else:
        alpha = alphas[0]
    return _ridge_solve(x_train, y_train, x_test, [alpha])[0], alpha


# Perturbation: random token replacement.


def replacement_vocabulary(model: nn.Module, tokenizer) -> np.ndarray:
    """Return the token ids that replacements are drawn from: the vocabulary without special tokens."""
    size = model.args.vocab_size
    special: list[int] = []
    if tokenizer is not None:
        size = min(size, getattr(tokenizer, "vocab_size", None) or size)
        special = list(getattr(tokenizer, "all_special_ids", None) or [])
    vocabulary = np.setdiff1d(np.arange(size), np.asarray(special, dtype=np.int64))
    if vocabulary.size < 2:
        raise UserError(f"the vocabulary has {vocabulary.size} non-special tokens; random replacement needs at least 2")
    return vocabulary


def replace_tokens(tokens: np.ndarray, fraction: float, vocabulary: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Replace `fraction` of the positions >= 1 of one window by different random tokens.

    Returns (edited tokens, boolean mask of edited positions). A fraction above 0 edits at least one
    position, and at least one position >= 1 stays unedited.
    """
    length = tokens.shape[0]
    count = int(round(fraction * (length - 1)))
    if fraction > 0:
        count = max(count, 1)
    count = min(count, length - 2)
    positions = rng.choice(np.arange(1, length), size=count, replace=False)
    edited = tokens.copy()
    new = vocabulary[rng.integers(vocabulary.size, size=count)]
    same = new == tokens[positions]
    while same.any():
        new[same] = vocabulary[rng.integers(vocabulary.size, size=int(same.sum()))]
        same = new == tokens[positions]
    edited[positions] = new
    mask = np.zeros(length, dtype=bool)
    mask[positions] = True
    return edited, mask


# Accumulators: sums per layer over windows, so memory does not grow with the window count.


class CrossTokenStats:
    def __init__(self, layers: int, window_sizes: Sequence[int]):
        self.window_sizes = list(window_sizes)
        self.jaccard_sum = np.zeros(layers)
        self.jaccard_count = 0
        self.random_sum = np.zeros(layers)
        self.random_count = 0
        self.hits = np.zeros((layers, len(window_sizes)))
        self.true = np.zeros(layers)
        self.union_fraction_sum = np.zeros((layers, len(window_sizes)))
        self.target_count = 0

    def add_window(self, actives: list[np.ndarray], partners: np.ndarray) -> None:
        """Add one window. `partners[i]` is the random partner position of position i + 1."""
        length = actives[0].shape[0]
        targets = np.arange(max(self.window_sizes) + 1, length)
        positions = np.arange(1, length)
        for layer, active in enumerate(actives):
            self.jaccard_sum[layer] += jaccard(active[1:-1], active[2:]).sum()
            self.random_sum[layer] += jaccard(active[positions], active[partners]).sum()
            truth = active[targets]
            self.true[layer] += truth.sum()
            for index, k in enumerate(self.window_sizes):
                union = window_unions(active, k, targets)
                self.hits[layer, index] += np.logical_and(union, truth).sum()
                self.union_fraction_sum[layer, index] += union.mean(axis=1).sum()
        self.jaccard_count += length - 2
        self.random_count += positions.size
        self.target_count += targets.size

    def to_json(self) -> dict:
        layers = []
        for layer in range(self.jaccard_sum.size):
            layers.append({
                "layer": layer,
                "jaccard_consecutive": self.jaccard_sum[layer] / self.jaccard_count,
                "jaccard_random_pair": self.random_sum[layer] / self.random_count,
                "recall_by_k": {str(k): _ratio(self.hits[layer, index], self.true[layer]) for index, k in enumerate(self.window_sizes)},
                "union_fraction_by_k": {str(k): self.union_fraction_sum[layer, index] / self.target_count for index, k in enumerate(self.window_sizes)},
            })
        return {"k": self.window_sizes, "target_tokens": self.target_count, "layers": layers}


PERTURBATION_GROUPS = ("unedited", "unedited_after_first_edit", "edited")


class PerturbationStats:
    def __init__(self, layers: int, fractions: Sequence[float]):
        self.fractions = list(fractions)
        shape = (len(PERTURBATION_GROUPS), layers, len(fractions))
        self.jaccard_sum = np.zeros(shape)
        self.hits = np.zeros(shape)
        self.true = np.zeros(shape)
        self.counts = np.zeros((len(PERTURBATION_GROUPS), len(fractions)), dtype=np.int64)

    def add_run(self, fraction_index: int, original: list[np.ndarray], edited: list[np.ndarray], mask: np.ndarray) -> None:
        """Add one edited run of a window, with `mask` marking its edited positions."""
        positions = np.arange(mask.size)
        first_edit = positions[mask][0] if mask.any() else mask.size
        groups = [
            (positions >= 1) & ~mask,
            (positions > first_edit) & ~mask,
            mask,
        ]
        for group, selected in enumerate(groups):
            self.counts[group, fraction_index] += selected.sum()
            for layer, (before, after) in enumerate(zip(original, edited)):
                truth = before[selected]
                self.jaccard_sum[group, layer, fraction_index] += jaccard(truth, after[selected]).sum()
                self.hits[group, layer, fraction_index] += np.logical_and(truth, after[selected]).sum()
                self.true[group, layer, fraction_index] += truth.sum()

    def to_json(self) -> dict:
        layers = []
        for layer in range(self.jaccard_sum.shape[1]):
            entry = {"layer": layer}
            for group, name in enumerate(PERTURBATION_GROUPS):
                entry[f"jaccard_{name}"] = {
                    f"{fraction:g}": _ratio(self.jaccard_sum[group, layer, index], self.counts[group, index]) for index, fraction in enumerate(self.fractions)
                }
                entry[f"recall_{name}"] = {
                    f"{fraction:g}": _ratio(self.hits[group, layer, index], self.true[group, layer, index]) for index, fraction in enumerate(self.fractions)
                }
            layers.append(entry)
        tokens = {
            name: {f"{fraction:g}": int(self.counts[group, index]) for index, fraction in enumerate(self.fractions)}
            for group, name in enumerate(PERTURBATION_GROUPS)
        }
        return {"fractions": self.fractions, "tokens": tokens, "layers": layers}


class FitSamples:
    """FFN inputs and active sets of a fixed random subset of token positions, per layer."""

    def __init__(self, layers: int):
        self.inputs: list[list[np.ndarray]] = [[] for _ in range(layers)]
        self.actives: list[list[np.ndarray]] = [[] for _ in range(layers)]

    def add_window(self, inputs: list[np.ndarray], actives: list[np.ndarray], positions: np.ndarray) -> None:
        for layer, (hidden, active) in enumerate(zip(inputs, actives)):
            self.inputs[layer].append(np.asarray(hidden[positions], dtype=np.float32))
            self.actives[layer].append(active[positions])

    def layer(self, layer: int) -> tuple[np.ndarray, np.ndarray]:
        return np.concatenate(self.inputs[layer]), np.concatenate(self.actives[layer])


def _ratio(numerator: float, denominator: float) -> float:
    return float(numerator / denominator) if denominator else math.nan


def evaluate_cross_layer(samples: FitSamples, layers: int) -> dict:
    """Fit and score the cross-layer predictors for every layer pair (l, l+1)."""
    entries = []
    with progress_bar() as progress:
        task = progress.add_task("cross-layer fits", total=layers - 1)
        inputs, actives = samples.layer(0)
        for layer in range(layers - 1):
            next_inputs, next_actives = samples.layer(layer + 1)
            half = next_actives.shape[0] // 2
            truth = next_actives[half:]
            frequency = next_actives[:half].mean(axis=0)
            fixed_m = int(round(next_actives[:half].sum(axis=1).mean()))

            entry = {"layer": layer, "target_layer": layer + 1, "fit_tokens": half, "test_tokens": truth.shape[0], "fixed_m": fixed_m}
            features = {
                "active_to_next": actives.astype(np.float32),
                "input_to_next": inputs,
                "same_layer_input": next_inputs,
            }
            for name, x in features.items():
                scores, alpha = ridge_scores(x[:half], next_actives[:half], x[half:])
                entry[name] = {**score_rules(scores, truth, fixed_m), "ridge_alpha": alpha}
            entry["frequency"] = score_rules(np.broadcast_to(frequency, truth.shape), truth, fixed_m)
            entries.append(entry)

            inputs, actives = next_inputs, next_actives
            progress.update(task, advance=1)
    return {"rule": CROSS_LAYER_RULE, "predictors": CROSS_LAYER_PREDICTORS, "layers": entries}


CROSS_LAYER_PREDICTORS = {
    "active_to_next": "layer l's active set (0/1 vector) -> layer l+1's active set",
    "input_to_next": "layer l's FFN input (hidden vector) -> layer l+1's active set",
    "frequency": "per-unit firing frequency of layer l+1 (best input-independent predictor)",
    "same_layer_input": "layer l+1's own FFN input -> its active set (reference: what a same-layer predictor sees)",
}


def _layer_mean(layers: list[dict], *keys: str) -> float:
    values = []
    for entry in layers:
        value = entry
        for key in keys:
            value = value[key]
        values.append(value)
    values = [value for value in values if not math.isnan(value)]
    return float(np.mean(values)) if values else math.nan


def summarise(result: dict) -> dict:
    """Return the means over layers of the main numbers of each study."""
    cross_token = result["cross_token"]
    layers = cross_token["layers"]
    keys = [str(k) for k in cross_token["k"]]
    summary = {
        "jaccard_consecutive": _layer_mean(layers, "jaccard_consecutive"),
        "jaccard_random_pair": _layer_mean(layers, "jaccard_random_pair"),
        "recall_by_k": {k: _layer_mean(layers, "recall_by_k", k) for k in keys},
        "union_fraction_by_k": {k: _layer_mean(layers, "union_fraction_by_k", k) for k in keys},
    }
    cross_layer = result["cross_layer"]["layers"]
    if cross_layer:
        summary["cross_layer_recall"] = {name: _layer_mean(cross_layer, name, "recall") for name in CROSS_LAYER_PREDICTORS}
        summary["cross_layer_recall_fixed_m"] = {name: _layer_mean(cross_layer, name, "recall_fixed_m") for name in CROSS_LAYER_PREDICTORS}
        summary["cross_layer_precision_fixed_m"] = {name: _layer_mean(cross_layer, name, "precision_fixed_m") for name in CROSS_LAYER_PREDICTORS}
    perturbation = result["perturbation"]
    fractions = [f"{fraction:g}" for fraction in perturbation["fractions"]]
    summary["perturbation"] = {
        f"{metric}_{group}": {fraction: _layer_mean(perturbation["layers"], f"{metric}_{group}", fraction) for fraction in fractions}
        for group in PERTURBATION_GROUPS
        for metric in ("jaccard", "recall")
    }
    return summary


def check_study_arguments(window_sizes: Sequence[int], replace_fractions: Sequence[float], ctx: int | None = None) -> None:
    """Raise `UserError` unless the window sizes and fractions are usable (and fit `ctx` when given)."""
    if not window_sizes:
        raise UserError("no sliding-window sizes given; pass positive integers such as 1,4,16")
    for k in window_sizes:
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise UserError(f"invalid sliding-window size {k!r}; use positive integers such as 1,4,16")
    for fraction in replace_fractions:
        if not isinstance(fraction, numbers.Real) or math.isnan(fraction) or not 0 <= fraction < 1:
            raise UserError(f"invalid replace fraction {fraction!r}; use fractions in [0, 1) such as 0.05,0.1,0.2,0.3")
    if ctx is not None and ctx < max(window_sizes) + 2:
        raise UserError(
            f"context of {ctx} tokens is too short for a sliding window of {max(window_sizes)}; "
            f"use --ctx of at least {max(window_sizes) + 2} or smaller --window-sizes"
        )


def run_patterns(
    model: nn.Module,
    tokenizer,
    config: SparsityConfig,
    windows: TokenWindows | mx.array | np.ndarray,
    window_sizes: Sequence[int] = DEFAULT_WINDOW_SIZES,
    replace_fractions: Sequence[float] = DEFAULT_REPLACE_FRACTIONS,
    seed: int = 0,
) -> dict:
    """Run the cross-token, cross-layer and perturbation studies and return the result as a JSON dict.

    `windows` are token windows ([count, ctx] ids, or TokenWindows). `tokenizer` may be None,
    because it only narrows the replacement vocabulary to the tokenizer's ids without special
    tokens. The model runs sparsified with `config` and is restored afterwards.
    """
    check_predict_config(config)
    config.check_model(model)
    source = windows.source if isinstance(windows, TokenWindows) else "token array"
    tokens = np.asarray(windows.windows if isinstance(windows, TokenWindows) else windows)
    if tokens.ndim != 2:
        raise UserError(f"token windows have shape {tokens.shape}; pass a [count, ctx] array of token ids")
    count, ctx = tokens.shape
    check_study_arguments(window_sizes, replace_fractions, ctx)
    window_sizes = sorted(set(int(k) for k in window_sizes))
    replace_fractions = [float(fraction) for fraction in replace_fractions]

    rng = np.random.default_rng(seed)
    vocabulary = replacement_vocabulary(model, tokenizer)
    layers = len(model.layers)
    per_window = min(ctx - 1, math.ceil(MAX_FIT_TOKENS / count))
    if count * per_window < 8:
        raise UserError(f"{count} window(s) of {ctx} tokens leave {count * per_window} tokens for the cross-layer fits; use at least 8")

    cross_token = CrossTokenStats(layers, window_sizes)
    perturbation = PerturbationStats(layers, replace_fractions)
    samples = FitSamples(layers)

    def active_sets(run, window: np.ndarray) -> list[LayerCapture]:
        _, captures = run(mx.array(window[None, :].astype(np.int32)))
        mx.eval([(capture.inputs, capture.active) for capture in captures])
        return captures

    with capture_layers(model, config) as run, progress_bar() as progress:
        task = progress.add_task("active sets", total=count * (1 + len(replace_fractions)))
        for index in range(count):
            window = tokens[index]
            captures = active_sets(run, window)
            actives = [np.array(capture.active) for capture in captures]
            inputs = [np.array(capture.inputs) for capture in captures]
            del captures
            progress.update(task, advance=1)

            positions = np.arange(1, ctx)
            shuffled = rng.permutation(positions)
            partners = np.empty_like(positions)
            partners[shuffled - 1] = np.roll(shuffled, 1)
            cross_token.add_window(actives, partners)
            samples.add_window(inputs, actives, np.sort(rng.choice(positions, size=per_window, replace=False)))
            del inputs

            for fraction_index, fraction in enumerate(replace_fractions):
                edited, mask = replace_tokens(window, fraction, vocabulary, rng)
                edited_actives = [np.array(capture.active) for capture in active_sets(run, edited)]
                perturbation.add_run(fraction_index, actives, edited_actives, mask)
                progress.update(task, advance=1)
            logger.debug("window %d/%d done", index + 1, count)

    result = {
        "model": getattr(model, "model_id", None),
        "sparsity": {
            "site": config.site, "granularity": config.granularity, "block_size": config.block_size,
            "target": config.target, "model_id": config.model_id,
        },
        "site": config.site,
        "granularity": config.granularity,
        "units": num_units(config),
        "data": source,
        "ctx": ctx,
        "windows": count,
        "tokens": count * ctx,
        "seed": seed,
        "definitions": DEFINITIONS,
        "cross_token": cross_token.to_json(),
        "cross_layer": evaluate_cross_layer(samples, layers),
        "perturbation": perturbation.to_json(),
    }
    result["summary"] = summarise(result)
    return result


# Plots, one per study.


def _plot(path: Path, draw) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    figure, axis = plt.subplots(figsize=(9, 4.5))
    draw(axis)
    axis.set_xlabel("layer")
    axis.xaxis.set_major_locator(MaxNLocator(integer=True))
    axis.grid(alpha=0.3)
    axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def _title(result: dict, study: str) -> str:
    return f"{result['model']}: {study} ({result['site']}, {result['granularity']}, {result['units']} units)"


def plot_cross_token(result: dict, path: Path) -> None:
    layers = result["cross_token"]["layers"]
    x = [entry["layer"] for entry in layers]

    def draw(axis):
        axis.plot(x, [entry["jaccard_consecutive"] for entry in layers], marker="o", color="black", label="Jaccard, consecutive tokens")
        axis.plot(x, [entry["jaccard_random_pair"] for entry in layers], color="black", linestyle=":", label="Jaccard, random pair")
        for index, k in enumerate(result["cross_token"]["k"]):
            color = f"C{index}"
            axis.plot(x, [entry["recall_by_k"][str(k)] for entry in layers], color=color, label=f"recall by union of previous {k}")
            axis.plot(x, [entry["union_fraction_by_k"][str(k)] for entry in layers], color=color, linestyle="--", label=f"union size / units, k={k}")
        axis.set_ylim(0, 1.02)
        axis.set_title(_title(result, "cross-token"), fontsize=9)

    _plot(path, draw)


def plot_cross_layer(result: dict, path: Path) -> None:
    layers = result["cross_layer"]["layers"]
    x = [entry["layer"] + 1 for entry in layers]

    def draw(axis):
        labels = {
            "active_to_next": "from active set of l",
            "input_to_next": "from FFN input of l",
            "frequency": "firing frequency only",
            "same_layer_input": "from FFN input of l+1",
        }
        for index, name in enumerate(CROSS_LAYER_PREDICTORS):
            axis.plot(x, [entry[name]["recall"] for entry in layers], marker="o", markersize=3, color=f"C{index}", label=labels[name])
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("recall of layer l+1's set, top-m with m = true count")
        axis.set_title(_title(result, "cross-layer prediction of layer l+1"), fontsize=9)

    _plot(path, draw)


def plot_perturbation(result: dict, path: Path) -> None:
    perturbation = result["perturbation"]
    layers = perturbation["layers"]
    x = [entry["layer"] for entry in layers]

    def draw(axis):
        for index, fraction in enumerate(perturbation["fractions"]):
            key = f"{fraction:g}"
            color = f"C{index}"
            axis.plot(x, [entry["jaccard_unedited"][key] for entry in layers], color=color, label=f"{key}: unedited positions")
            axis.plot(x, [entry["jaccard_edited"][key] for entry in layers], color=color, linestyle="--", label=f"{key}: edited positions")
        axis.set_ylim(0, 1.02)
        axis.set_ylabel("Jaccard with the original run")
        axis.set_title(_title(result, "token replacement"), fontsize=9)

    _plot(path, draw)


def json_ready(value):
    """Return `value` with NaN turned into None and numpy scalars into Python numbers, for strict JSON."""
    if isinstance(value, dict):
        return {key: json_ready(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(item) for item in value]
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def write_outputs(result: dict, out: Path) -> list[Path]:
    """Write patterns.json and one PNG per study into `out` and return the written paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "patterns.json"]
    write_text_atomic(paths[0], json.dumps(json_ready(result), indent=1, allow_nan=False) + "\n")

    plots = [("cross_token.png", plot_cross_token), ("perturbation.png", plot_perturbation)]
    if result["cross_layer"]["layers"]:
        plots.insert(1, ("cross_layer.png", plot_cross_layer))
    for name, plot in plots:
        paths.append(out / name)
        plot(result, paths[-1])
    return paths


# Command line.


def parse_window_sizes(text: str) -> list[int]:
    try:
        sizes = [int(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise UserError(f"invalid --window-sizes {text!r}; use comma-separated positive integers such as 1,4,16") from exc
    if not sizes or any(size < 1 for size in sizes):
        raise UserError(f"invalid --window-sizes {text!r}; use comma-separated positive integers such as 1,4,16")
    return sorted(set(sizes))


def parse_fractions(text: str) -> list[float]:
    try:
        fractions = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise UserError(f"invalid --replace-fractions {text!r}; use comma-separated fractions in [0, 1) such as 0.05,0.1,0.2,0.3") from exc
    if not fractions or any(math.isnan(value) or not 0 <= value < 1 for value in fractions):
        raise UserError(f"invalid --replace-fractions {text!r}; use comma-separated fractions in [0, 1) such as 0.05,0.1,0.2,0.3")
    return sorted(set(fractions))


def check_output_folder(path: str) -> Path:
    """Return `path` as a Path, or raise `UserError` when it or a parent exists and is not a folder."""
    out = Path(path)
    for candidate in (out, *out.parents):
        if candidate.exists():
            if not candidate.is_dir():
                raise UserError(f"output path {candidate} is a file; pass a folder for --out such as out/patterns")
            break
    return out


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m mlx_sparse.patterns",
        description="Measure how predictable FFN active sets are across tokens, across layers and under token edits.",
    )
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--sparsity", required=True, help="sparsity config JSON (site gate_act or down_in) from mlx_sparse.calibrate")
    parser.add_argument("--data", default="wikitext2:test", help="wikitext2:test (default), wikitext2:valid or a .txt/.raw/.jsonl file")
    parser.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=4, help="windows to study (default 4)")
    parser.add_argument(
        "--window-sizes", default="1,4,16",
        help="comma-separated k: a token's set is compared with the union of the previous k tokens' sets (default 1,4,16)",
    )
    parser.add_argument(
        "--replace-fractions", default="0.05,0.1,0.2,0.3",
        help="comma-separated fractions of token positions to replace by random tokens (default 0.05,0.1,0.2,0.3)",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed for the sampled positions and replacement tokens (default 0)")
    parser.add_argument("--out", required=True, help="output folder for patterns.json and the PNG plots")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    window_sizes = parse_window_sizes(args.window_sizes)
    fractions = parse_fractions(args.replace_fractions)
    check_study_arguments(window_sizes, fractions, args.ctx)
    if args.max_windows < 1:
        raise UserError(f"invalid --max-windows {args.max_windows}; use a positive number of windows")
    out = check_output_folder(args.out)
    config = load_config(args.sparsity)
    check_predict_config(config)

    from .blas import log_blas
    from .loading import load

    log_blas()
    model, tokenizer = load(args.model)
    config.check_model(model)
    data = load_windows(args.data, tokenizer, args.ctx, args.max_windows, args.data_dir)
    result = run_patterns(model, tokenizer, config, data, window_sizes, fractions, args.seed)
    result["sparsity"]["path"] = args.sparsity

    paths = write_outputs(result, out)
    summary = result["summary"]
    print(f"consecutive-token Jaccard {summary['jaccard_consecutive']:.3f} (random pair {summary['jaccard_random_pair']:.3f})")
    for name, value in summary.get("cross_layer_recall", {}).items():
        print(f"cross-layer recall, {name}: {value:.3f}")
    for fraction, value in summary["perturbation"]["jaccard_unedited"].items():
        print(f"replace {fraction}: Jaccard at unedited positions {value:.3f}, at edited positions {summary['perturbation']['jaccard_edited'][fraction]:.3f}")
    print(f"wrote {', '.join(str(path) for path in paths)}")
    return 0


if __name__ == "__main__":
    run_command(main)
