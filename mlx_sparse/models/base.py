"""Pieces shared by the model ports: config parsing and the gated FFN that sparsity acts on."""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn

ACTIVATIONS = {
    "silu": nn.silu,
    # Gemma's "gelu_pytorch_tanh": the tanh approximation of GELU.
    "gelu_tanh": nn.gelu_approx,
}


@dataclass
class BaseModelArgs:
    @classmethod
    def from_dict(cls, params: dict) -> "BaseModelArgs":
        """Build the args from a config.json dict, ignoring keys this port does not use."""
        known = inspect.signature(cls).parameters
        return cls(**{key: value for key, value in params.items() if key in known})


class MLP(nn.Module):
    """Gated FFN: `down_proj(activation(gate_proj(x)) * up_proj(x))` (SwiGLU or GeGLU).

    The sparsity code reads `gate_proj`, `up_proj`, `down_proj` and `activation` of this module
    and swaps the whole module out, so the dense path stays exactly mlx-lm's.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, activation: str, bias: bool = False):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=bias)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)
        self.activation_name = activation

    def activation(self, x: mx.array) -> mx.array:
        return ACTIVATIONS[self.activation_name](x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))
