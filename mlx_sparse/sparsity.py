"""Thresholded FFN activations: sparsity sites, the sparse FFN module and its config file.

A site is the FFN tensor whose small entries are zeroed; its zeros decide which weights a sparse
runtime can skip:

- `down_in`: `activation(gate_proj(x)) * up_proj(x)`, the input of down_proj. A zero skips one
  column of W_down.
- `gate_act`: `activation(gate_proj(x))` (as in CATS). A zero skips one row of W_up and one column
  of W_down.
- `ffn_in`: the FFN input `x` (as in TEAL). A zero skips one column of W_gate and of W_up.
- `seed`: the baseline of Dhar et al. (IPCCC 2024): separate thresholds on the gate_proj output
  before the activation, the up_proj output and the down_proj output.

With `neuron` granularity an entry is zeroed when |v| < t. With `block` granularity consecutive
entries form blocks of `block_size`, and a block is zeroed when its root mean square, relative to that of the whole
token vector, is below the block threshold: the unit that `mx.gather_mm` can skip.

The rule reads a score per entry: |v| itself ("magnitude"), or with score "wina" |v_i| times the
L2 norm of the weight column that v_i multiplies (WINA). `dense_prefix` keeps the first positions
of every sequence dense.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import MISSING, asdict, dataclass, field, fields
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from .cli import write_text_atomic
from .errors import UserError
from .kernels.scores import block_scores
from .models import MLP

logger = logging.getLogger(__name__)

CONFIG_VERSION = 1
SITES = ("down_in", "gate_act", "ffn_in", "seed")
GRANULARITIES = ("neuron", "block")
SCORES = ("magnitude", "wina")
ALLOCATIONS = ("uniform", "greedy")

# The tensors that carry a threshold at each site, in the order the FFN computes them.
SITE_TENSORS = {
    "down_in": ("down_in",),
    "gate_act": ("gate_act",),
    "ffn_in": ("ffn_in",),
    "seed": ("gate", "up", "down"),
}


def check_site(site: str, granularity: str, block_size: int) -> None:
    if site not in SITES:
        raise UserError(f"unknown sparsity site {site!r}; use one of {', '.join(SITES)}")
    if granularity not in GRANULARITIES:
        raise UserError(f"unknown granularity {granularity!r}; use neuron or block")
    if block_size < 1:
        raise UserError(f"invalid block size {block_size}; use a positive integer such as 32")


def check_target(target: float) -> None:
    if not (0.0 <= target < 1.0) or math.isnan(target):
        raise UserError(f"invalid sparsity target {target}; use a fraction in [0, 1), such as 0.5")


def check_score(score: str, site: str, dense_prefix: int = 0) -> None:
    if score not in SCORES:
        raise UserError(f"unknown score {score!r}; use magnitude or wina")
    if score == "wina" and site == "seed":
        raise UserError("score wina needs a site whose values multiply one weight column (down_in, gate_act, ffn_in), not seed; use --score magnitude")
    if not isinstance(dense_prefix, int) or isinstance(dense_prefix, bool) or dense_prefix < 0:
        raise UserError(f"invalid dense prefix {dense_prefix!r}; use a number of positions >= 0, such as 1")


def keep_mask(scores: mx.array, threshold: mx.array | float, granularity: str, block_size: int) -> mx.array:
    """Return the boolean mask (shape of `scores`) of entries kept: |score| >= t, or block score >= t."""
    if granularity == "neuron":
        return mx.abs(scores) >= threshold
    *lead, width = scores.shape
    keep = block_scores(scores, block_size) >= threshold
    return mx.broadcast_to(keep[..., None], (*lead, width // block_size, block_size)).reshape(scores.shape)


def threshold_values(values: mx.array, threshold: mx.array | float, granularity: str, block_size: int) -> mx.array:
    """Zero the entries (or blocks) of `values` whose magnitude (or block RMS) is below `threshold`."""
    return mx.where(keep_mask(values, threshold, granularity, block_size), values, mx.zeros_like(values))


def _float_weight(linear: nn.Module) -> mx.array:
    if isinstance(linear, nn.QuantizedLinear):
        return mx.dequantize(linear.weight, linear.scales, linear.biases, linear.group_size, linear.bits).astype(mx.float32)
    return linear.weight.astype(mx.float32)


def wina_column_norms(mlp: MLP, site: str) -> mx.array:
    """Return the L2 norm of the weight column that each entry of the site tensor multiplies.

    An entry of down_in, and of gate_act through the up_proj product, multiplies one column of
    W_down. An entry of the FFN input multiplies one column of W_gate and one of W_up, and both
    count.
    """
    if site in ("down_in", "gate_act"):
        return mx.sqrt(mx.sum(mx.square(_float_weight(mlp.down_proj)), axis=0))
    if site == "ffn_in":
        squares = mx.square(_float_weight(mlp.gate_proj)).sum(axis=0) + mx.square(_float_weight(mlp.up_proj)).sum(axis=0)
        return mx.sqrt(squares)
    raise UserError(f"score wina is not defined for site {site}; use --score magnitude")


@dataclass
class SparsityConfig:
    """Per-layer thresholds for one model, site and granularity, as saved to JSON."""

    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    site: str
    granularity: str
    block_size: int
    target: float
    # One dict per layer, from tensor name (see SITE_TENSORS) to threshold.
    thresholds: list[dict[str, float]]
    calibration: dict = field(default_factory=dict)
    version: int = CONFIG_VERSION
    score: str = "magnitude"
    # Positions at the start of each sequence that stay dense.
    dense_prefix: int = 0
    allocation: str = "uniform"
    # Per-layer sparsity targets that the thresholds were calibrated for (greedy allocation).
    layer_targets: list[float] | None = None

    def save(self, path: str | Path) -> None:
        """Write the config as JSON, atomically."""
        write_text_atomic(path, json.dumps(asdict(self), indent=1) + "\n")

    @classmethod
    def from_dict(cls, data: dict, source: str = "config") -> "SparsityConfig":
        if not isinstance(data, dict):
            raise UserError(f"{source} is not a sparsity config (a JSON object); create one with python -m mlx_sparse.calibrate")
        if data.get("version") != CONFIG_VERSION:
            raise UserError(f"{source} has config version {data.get('version')!r}, expected {CONFIG_VERSION}; recalibrate with this mlx_sparse")
        required = [item.name for item in fields(cls) if item.default is MISSING and item.default_factory is MISSING]
        missing = [name for name in required if name not in data]
        if missing:
            raise UserError(f"{source} is missing {', '.join(missing)}; recalibrate with python -m mlx_sparse.calibrate")
        config = cls(**{name: data[name] for name in cls.__dataclass_fields__ if name in data})
        check_site(config.site, config.granularity, config.block_size)
        check_score(config.score, config.site, config.dense_prefix)
        if config.allocation not in ALLOCATIONS:
            raise UserError(f"{source} has allocation {config.allocation!r}; use uniform or greedy")
        if config.layer_targets is not None and (
            len(config.layer_targets) != config.num_layers or not all(0.0 <= value < 1.0 for value in config.layer_targets)
        ):
            raise UserError(f"{source} layer_targets must list one fraction in [0, 1) per layer; recalibrate")
        if len(config.thresholds) != config.num_layers:
            raise UserError(f"{source} has {len(config.thresholds)} layer thresholds for {config.num_layers} layers; recalibrate")
        for layer, entry in enumerate(config.thresholds):
            if not isinstance(entry, dict) or set(entry) != set(SITE_TENSORS[config.site]):
                raise UserError(f"{source} layer {layer} thresholds {entry!r} do not match site {config.site}; recalibrate")
            for name, value in entry.items():
                if not isinstance(value, (int, float)) or value < 0 or math.isnan(value):
                    raise UserError(f"{source} layer {layer} threshold {name}={value!r} is invalid; thresholds are numbers >= 0")
        return config

    def check_model(self, model: nn.Module) -> None:
        """Raise `UserError` unless this config was calibrated for a model of `model`'s shape."""
        expected = describe_model(model)
        for key in ("model_type", "num_layers", "hidden_size", "intermediate_size"):
            if getattr(self, key) != expected[key]:
                raise UserError(
                    f"sparsity config is for {self.model_id} ({key}={getattr(self, key)}) but the model "
                    f"{expected['model_id']} has {key}={expected[key]}; calibrate a config for this model"
                )
        if self.model_id != expected["model_id"]:
            logger.warning("Sparsity config was calibrated on %s; applying it to %s of the same shape", self.model_id, expected["model_id"])
        if self.granularity == "block":
            width = self.hidden_size if self.site == "ffn_in" else self.intermediate_size
            if width % self.block_size or (self.site == "seed" and self.hidden_size % self.block_size):
                raise UserError(f"block size {self.block_size} does not divide the FFN width {width}; use a divisor such as 32")


def load_config(path: str | Path, model: nn.Module | None = None) -> SparsityConfig:
    """Read a sparsity config JSON, check it, and check it against `model` when given."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"sparsity config {path} not found; create one with python -m mlx_sparse.calibrate")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"sparsity config {path} is not valid JSON ({exc}); recreate it with python -m mlx_sparse.calibrate") from exc
    config = SparsityConfig.from_dict(data, source=f"sparsity config {path}")
    if model is not None:
        config.check_model(model)
    return config


def describe_model(model: nn.Module) -> dict:
    # Wrappers (SparseMLP, the predicted and gather FFNs) keep the source MLP as `mlp` or `_template`.
    mlp = model.layers[0].mlp
    while not isinstance(mlp, MLP) and isinstance(getattr(mlp, "mlp", getattr(mlp, "_template", None)), nn.Module):
        mlp = getattr(mlp, "mlp", None) or mlp._template
    return {
        "model_id": getattr(model, "model_id", type(model).__module__),
        "model_type": model.args.model_type,
        "num_layers": len(model.layers),
        "hidden_size": model.args.hidden_size,
        "intermediate_size": model.args.intermediate_size,
        "activation": mlp.activation_name,
    }


class SiteStats:
    """Running zero counts of each site tensor, kept as lazy MLX scalars so no step syncs."""

    def __init__(self):
        self.zeros: dict[str, mx.array] = {}
        self.totals: dict[str, int] = {}

    def add(self, name: str, values: mx.array) -> None:
        zeros = mx.sum(values == 0).astype(mx.float32)
        self.zeros[name] = self.zeros[name] + zeros if name in self.zeros else zeros
        self.totals[name] = self.totals.get(name, 0) + values.size

    def arrays(self) -> list[mx.array]:
        return list(self.zeros.values())

    def sparsity(self) -> dict[str, float]:
        return {name: float(self.zeros[name].item()) / self.totals[name] for name in self.zeros if self.totals[name]}


class SparseMLP(nn.Module):
    """The original FFN with thresholds applied at one site; masked, so every weight is still read.

    `recorder`, when set, receives the scores of every site tensor before thresholding: the values
    themselves, or for score "wina" the values times their weight column norms, without the
    dense-prefix positions (calibration uses it).
    """

    def __init__(self, mlp: MLP, site: str, granularity: str, block_size: int, thresholds: dict[str, float],
                 score: str = "magnitude", dense_prefix: int = 0):
        super().__init__()
        check_score(score, site, dense_prefix)
        self.mlp = mlp
        self.site = site
        self.granularity = granularity
        self.block_size = block_size
        self.thresholds = dict(thresholds)
        self.score = score
        self.dense_prefix = dense_prefix
        # Stored outside the parameter tree: derived from the weights, not a weight.
        object.__setattr__(self, "_column_norms", wina_column_norms(mlp, site) if score == "wina" else None)
        self.collect_stats = False
        self.stats = SiteStats()
        self.recorder = None

    def apply(self, name: str, values: mx.array) -> mx.array:
        scores = values if self._column_norms is None else values * self._column_norms
        # NOTE: every call on several positions counts as the start of a sequence. Evaluation and
        # the first prefill chunk of generation are, but a prompt that mlx-lm prefills in several
        # chunks also keeps the first positions of its later chunks dense.
        prefix = min(self.dense_prefix, values.shape[-2]) if values.ndim >= 2 and values.shape[-2] > 1 else 0
        if self.recorder is not None:
            self.recorder(name, scores[..., prefix:, :] if prefix else scores)
        threshold = self.thresholds[name]
        if threshold > 0:
            keep = keep_mask(scores, threshold, self.granularity, self.block_size)
            if prefix:
                positions = mx.arange(values.shape[-2])[:, None] < prefix
                keep = keep | positions
            values = mx.where(keep, values, mx.zeros_like(values))
        if self.collect_stats:
            self.stats.add(name, values)
        return values

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.mlp
        if self.site == "ffn_in":
            return mlp(self.apply("ffn_in", x))

        gate = mlp.gate_proj(x)
        if self.site == "seed":
            gate = self.apply("gate", gate)
        activated = mlp.activation(gate)
        if self.site == "gate_act":
            activated = self.apply("gate_act", activated)

        up = mlp.up_proj(x)
        if self.site == "seed":
            up = self.apply("up", up)
        down_in = activated * up
        if self.site == "down_in":
            down_in = self.apply("down_in", down_in)
        elif self.site == "seed" and self.collect_stats:
            self.stats.add("down_in", down_in)

        out = mlp.down_proj(down_in)
        if self.site == "seed":
            out = self.apply("down", out)
        return out


def sparse_modules(model: nn.Module) -> list[SparseMLP]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, SparseMLP)]


def sparsify(model: nn.Module, config: SparsityConfig) -> nn.Module:
    """Replace each layer's FFN with a `SparseMLP` using the config's thresholds (in place)."""
    config.check_model(model)
    unsparsify(model)
    for layer, thresholds in zip(model.layers, config.thresholds):
        layer.mlp = SparseMLP(layer.mlp, config.site, config.granularity, config.block_size, thresholds,
                              config.score, config.dense_prefix)
    model.sparsity_config = config
    return model


def unsparsify(model: nn.Module) -> nn.Module:
    """Restore the original FFN modules (in place); a dense model is returned unchanged."""
    for layer in model.layers:
        if isinstance(layer.mlp, SparseMLP):
            layer.mlp = layer.mlp.mlp
    model.sparsity_config = None
    return model


def decisive_tensor(site: str) -> str:
    """Return the name of the tensor whose zeros decide which FFN weights are skipped at `site`."""
    return "down_in" if site == "seed" else SITE_TENSORS[site][0]


def set_stats(model: nn.Module, enabled: bool) -> None:
    """Turn zero counting on or off in every sparse FFN and reset the counts."""
    for module in sparse_modules(model):
        module.collect_stats = enabled
        module.stats = SiteStats()


def stats_arrays(model: nn.Module) -> list[mx.array]:
    """Return the lazy zero counters, to be evaluated together with a forward pass's output."""
    return [array for module in sparse_modules(model) for array in module.stats.arrays()]


def layer_sparsity(model: nn.Module) -> list[dict[str, float]]:
    """Return the measured sparsity (fraction of zeros) of every site tensor, per layer."""
    return [module.stats.sparsity() for module in sparse_modules(model)]
