"""MLX ports of the supported decoder architectures, selected by config.json's `model_type`."""

from __future__ import annotations

from types import ModuleType

from ..errors import UserError
from . import gemma3, llama
from .base import MLP

ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,
    "gemma3_text": gemma3,
}


def get_architecture(model_type: str | None) -> ModuleType:
    """Return the port module (with `Model` and `ModelArgs`) for a config's `model_type`."""
    if model_type not in ARCHITECTURES:
        raise UserError(
            f"unsupported model_type {model_type!r}; mlx_sparse supports {', '.join(sorted(ARCHITECTURES))}"
        )
    return ARCHITECTURES[model_type]


def ffn_modules(model) -> list[MLP]:
    """Return each decoder layer's FFN module, in layer order."""
    return [layer.mlp for layer in model.layers]


__all__ = ["ARCHITECTURES", "MLP", "ffn_modules", "get_architecture"]
