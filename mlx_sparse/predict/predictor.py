"""Low-rank neuron predictors: per layer, a small network that names the active units from an FFN input.

A layer's predictor maps a hidden vector x to one logit per unit (neuron or block of neurons):
`up(act(down(x)))` with `down` [hidden -> rank] and `up` [rank -> units], where act is the identity
("linear") or ReLU ("relu"). A unit is predicted active when its logit is at least the layer's
decision threshold, chosen on held-out tokens for a target recall. With `lookahead`, the predictor
of layer l reads the FFN input of layer l - 1, so the active set is known one layer early.
Layer 0 has no earlier FFN and reads its own input.

A `PredictorSet` is saved as one safetensors file whose metadata holds a JSON header (model,
sizes, config, decision thresholds); no pickle is involved.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from ..cli import atomic_path
from ..errors import UserError
from ..sparsity import SparsityConfig, describe_model
from .truth import num_units

PREDICTOR_VERSION = 1
ACTIVATIONS = ("linear", "relu")
HEADER_KEY = "mlx_sparse_predictor"


class LayerPredictor(nn.Module):
    """Low-rank map from one hidden vector to one logit per unit of one layer."""

    def __init__(self, hidden_size: int, rank: int, units: int, activation: str = "linear"):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise UserError(f"unknown predictor activation {activation!r}; use linear or relu")
        self.down = nn.Linear(hidden_size, rank, bias=False)
        self.up = nn.Linear(rank, units, bias=True)
        self.activation = activation

    def __call__(self, x: mx.array) -> mx.array:
        z = self.down(x)
        if self.activation == "relu":
            z = nn.relu(z)
        return self.up(z)

    @property
    def num_parameters(self) -> int:
        return self.down.weight.size + self.up.weight.size + self.up.bias.size


@dataclass
class PredictorHeader:
    """The model, config and decision thresholds of a predictor file, checked again when it is loaded."""

    model_id: str
    model_type: str
    num_layers: int
    hidden_size: int
    intermediate_size: int
    site: str
    granularity: str
    block_size: int
    target: float
    units: int
    rank: int
    activation: str
    lookahead: bool
    recall_target: float
    # Per layer: a unit is predicted active when its logit is >= this value.
    decision_thresholds: list[float]
    # The sparsity config's own thresholds, so that a predictor is not paired with another config.
    config_thresholds: list[float]
    training: dict = field(default_factory=dict)
    version: int = PREDICTOR_VERSION


class PredictorSet(nn.Module):
    """One LayerPredictor per layer plus the header that ties them to a model and sparsity config."""

    def __init__(self, header: PredictorHeader):
        super().__init__()
        self.header = header
        self.layers = [
            LayerPredictor(header.hidden_size, header.rank, header.units, header.activation)
            for _ in range(header.num_layers)
        ]

    @classmethod
    def for_config(cls, model: nn.Module, config: SparsityConfig, rank: int, activation: str = "linear",
                   lookahead: bool = False, recall_target: float = 0.99) -> PredictorSet:
        """Create untrained predictors (decision thresholds 0) sized for `model` and `config`."""
        if rank < 1:
            raise UserError(f"invalid predictor rank {rank}; use a positive integer such as 64")
        if not 0.0 < recall_target <= 1.0:
            raise UserError(f"invalid recall target {recall_target}; use a fraction in (0, 1], such as 0.99")
        config.check_model(model)
        described = describe_model(model)
        header = PredictorHeader(
            model_id=described["model_id"],
            model_type=config.model_type,
            num_layers=config.num_layers,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            site=config.site,
            granularity=config.granularity,
            block_size=config.block_size,
            target=config.target,
            units=num_units(config),
            rank=rank,
            activation=activation,
            lookahead=lookahead,
            recall_target=recall_target,
            decision_thresholds=[0.0] * config.num_layers,
            config_thresholds=[entry[config.site] for entry in config.thresholds],
        )
        return cls(header)

    def source_layer(self, layer: int) -> int:
        """Return the layer whose FFN input the predictor of `layer` reads."""
        return max(layer - 1, 0) if self.header.lookahead else layer

    def predict(self, layer: int, x: mx.array) -> mx.array:
        """Return the predicted active set (bool [..., units]) of `layer` from its source input `x`."""
        return self.layers[layer](x) >= self.header.decision_thresholds[layer]

    @property
    def num_parameters(self) -> int:
        return sum(layer.num_parameters for layer in self.layers)

    def check(self, model: nn.Module, config: SparsityConfig) -> None:
        """Raise `UserError` unless this predictor was trained for `model` and `config`."""
        header = self.header
        expected = describe_model(model)
        for key in ("model_type", "num_layers", "hidden_size", "intermediate_size"):
            if getattr(header, key) != expected[key]:
                raise UserError(
                    f"predictor is for {header.model_id} ({key}={getattr(header, key)}) but the model has "
                    f"{key}={expected[key]}; train one for this model with python -m mlx_sparse.predict train"
                )
        for key in ("site", "granularity", "block_size"):
            if getattr(header, key) != getattr(config, key):
                raise UserError(
                    f"predictor was trained for {key}={getattr(header, key)} but the sparsity config has "
                    f"{key}={getattr(config, key)}; train one with this config"
                )
        config_thresholds = [entry[config.site] for entry in config.thresholds]
        if not all(math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12) for a, b in zip(header.config_thresholds, config_thresholds)):
            raise UserError(
                f"predictor was trained for other thresholds than the sparsity config's (target {header.target} "
                f"against {config.target}); train one with this config"
            )

    def save(self, path: str | Path) -> None:
        """Write weights and header to one safetensors file, atomically."""
        from mlx.utils import tree_flatten

        weights = dict(tree_flatten(self.parameters()))
        metadata = {HEADER_KEY: json.dumps(asdict(self.header))}
        with atomic_path(path, suffix=".safetensors") as tmp:
            mx.save_safetensors(str(tmp), weights, metadata=metadata)


def load_predictor(path: str | Path, model: nn.Module | None = None, config: SparsityConfig | None = None) -> PredictorSet:
    """Read a predictor file and check it against `model` and `config` when given."""
    path = Path(path)
    hint = "train one with python -m mlx_sparse.predict train"
    if not path.is_file():
        raise UserError(f"predictor file {path} not found; {hint}")
    try:
        weights, metadata = mx.load(str(path), return_metadata=True)
    except (RuntimeError, ValueError, OSError) as exc:
        raise UserError(f"predictor file {path} is not a readable safetensors file ({exc}); {hint}") from exc
    if HEADER_KEY not in metadata:
        raise UserError(f"{path} has no mlx_sparse predictor header; {hint}")
    try:
        data = json.loads(metadata[HEADER_KEY])
        if data.get("version") != PREDICTOR_VERSION:
            raise UserError(f"predictor {path} has version {data.get('version')!r}, expected {PREDICTOR_VERSION}; retrain it")
        header = PredictorHeader(**data)
    except (json.JSONDecodeError, TypeError) as exc:
        raise UserError(f"predictor {path} has a malformed header ({exc}); {hint}") from exc
    if len(header.decision_thresholds) != header.num_layers:
        raise UserError(f"predictor {path} has {len(header.decision_thresholds)} decision thresholds for {header.num_layers} layers; retrain it")

    predictors = PredictorSet(header)
    try:
        predictors.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise UserError(f"predictor {path} weights do not match its header ({exc}); retrain it") from exc
    mx.eval(predictors.parameters())
    if model is not None and config is not None:
        predictors.check(model, config)
    return predictors
