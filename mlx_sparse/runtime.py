"""Sparse decoding: swap each layer's FFN for a `BlockSparseFFN` that reads only the active blocks.

    model, tokenizer = mlx_sparse.load("smollm2-135m")
    config = mlx_sparse.load_config("smol_gate_act_block.json", model)
    apply_gather(model, config)      # decode now gathers the active FFN blocks
    remove_gather(model)             # back to the dense MLPs, same weights

`sparsify` (in `mlx_sparse.sparsity`) masks the site values and still reads every weight; this
module turns the same block thresholds into skipped weight reads. It needs a config calibrated
with `--granularity block` at site `gate_act` or `down_in`, the two sites whose zeros skip whole
blocks of up_proj rows or down_proj columns.
"""

from __future__ import annotations

import logging

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .errors import UserError
from .kernels import SITES as GATHER_SITES
from .kernels import BlockSparseFFN
from .sparsity import SparsityConfig, unsparsify

logger = logging.getLogger(__name__)

CALIBRATE_HINT = "calibrate one with python -m mlx_sparse.calibrate --granularity block --site gate_act"


def check_gather_config(config: SparsityConfig) -> None:
    """Raise `UserError` unless `config` is a block config at a site the gather path can skip."""
    if config.granularity != "block" or config.site not in GATHER_SITES:
        raise UserError(
            f"the gather path needs a block config at site gate_act or down_in, but this config has site "
            f"{config.site} and granularity {config.granularity}; {CALIBRATE_HINT}"
        )
    # NOTE: the gather kernels score blocks by magnitude and do not know token positions, so WINA
    # scores and a dense prefix apply to the masked path only.
    if config.score != "magnitude" or config.dense_prefix:
        raise UserError(
            f"the gather path supports score magnitude without a dense prefix, not score {config.score} with dense "
            f"prefix {config.dense_prefix}; use the masked path (python -m mlx_sparse.perplexity) for this config"
        )


def gather_modules(model: nn.Module) -> list[BlockSparseFFN]:
    return [layer.mlp for layer in model.layers if isinstance(layer.mlp, BlockSparseFFN)]


def apply_gather(model: nn.Module, config: SparsityConfig, up_mode: str | None = None, prefill: str = "auto") -> nn.Module:
    """Replace each layer's FFN with a `BlockSparseFFN` using the config's block thresholds (in place).

    `up_mode` and `prefill` are passed to `BlockSparseFFN.from_mlp` (None: "gather" at gate_act,
    "dense" at down_in). Masked `sparsify` modules and earlier gather modules are removed first.
    """
    check_gather_config(config)
    remove_gather(model)
    unsparsify(model)
    config.check_model(model)

    for layer, thresholds in zip(model.layers, config.thresholds):
        layer.mlp = BlockSparseFFN.from_mlp(
            layer.mlp, config.site, thresholds[config.site], config.block_size, up_mode=up_mode, prefill=prefill
        )
    model.sparsity_config = config
    logger.info(
        "Gather path on %d layers: site %s, block size %d, target %.2f",
        len(model.layers), config.site, config.block_size, config.target,
    )
    return model


def remove_gather(model: nn.Module) -> nn.Module:
    """Restore dense MLPs with the same weights (in place); a model without gather FFNs is returned unchanged."""
    for layer in model.layers:
        if isinstance(layer.mlp, BlockSparseFFN):
            layer.mlp = layer.mlp.to_mlp()
    model.sparsity_config = None
    return model


def set_gather_stats(model: nn.Module, enabled: bool) -> None:
    """Start counting active blocks and weight bytes in every gather FFN (fresh counts), or stop."""
    for module in gather_modules(model):
        if enabled:
            module.enable_stats()
        else:
            module.stats = None


def gather_stats(model: nn.Module) -> dict:
    """Sum the counters of every gather FFN since `set_gather_stats(model, True)`.

    `ffn_bytes_per_token` and `ffn_dense_bytes_per_token` are the FFN weight bytes (all layers)
    read per token by the gather path and by the dense FFN. A call on several tokens (a prefill)
    reads each block once for all of them, so start the counters after the prompt for decode figures.
    """
    modules = [module for module in gather_modules(model) if module.stats is not None]
    if not modules:
        raise UserError("no gather statistics: call apply_gather and then set_gather_stats(model, True) before decoding")

    tokens = modules[0].stats.tokens
    active = sum(module.stats.active_blocks for module in modules)
    total = sum(module.stats.total_blocks for module in modules)
    read = sum(module.stats.weight_bytes for module in modules)
    dense = sum(module.stats.dense_weight_bytes for module in modules)
    return {
        "tokens": tokens,
        "active_fraction": active / total if total else 0.0,
        "ffn_bytes_per_token": read / tokens if tokens else 0.0,
        "ffn_dense_bytes_per_token": dense / tokens if tokens else 0.0,
        "ffn_bytes_ratio": read / dense if dense else 0.0,
    }


def _module_bytes(module: nn.Module) -> int:
    return sum(value.nbytes for _, value in tree_flatten(module.parameters()))


def weight_bytes_per_token(model: nn.Module) -> dict[str, int]:
    """Bytes of weights (with scales and biases) that one dense decode step reads, by part.

    `ffn` is every layer's FFN, `lm_head` the output projection (the embedding matrix when the
    embeddings are tied), and `other` attention, norms and, for an untied model, the one embedding
    row that the input token looks up.
    """
    ffn = 0
    for layer in model.layers:
        mlp = layer.mlp
        ffn += mlp.dense_weight_bytes if isinstance(mlp, BlockSparseFFN) else _module_bytes(mlp)

    embedding = model.model.embed_tokens
    embedding_bytes = _module_bytes(embedding)
    if "lm_head" in model:
        lm_head = _module_bytes(model.lm_head)
        embedding_read = embedding_bytes // embedding.weight.shape[0]
    else:
        lm_head = embedding_bytes
        embedding_read = 0

    total = _module_bytes(model)
    other = total - ffn - embedding_bytes - (lm_head if "lm_head" in model else 0) + embedding_read
    return {"ffn": ffn, "lm_head": lm_head, "other": other, "total": ffn + lm_head + other}


def model_dtype(model: nn.Module) -> str:
    """Name the FFN weights' storage: "q<bits>" for quantized projections, else the float type."""
    mlp = model.layers[0].mlp
    if isinstance(mlp, BlockSparseFFN):
        blocks = mlp.gate_blocks
        return f"q{blocks.bits}" if blocks.quantized else str(blocks.weight.dtype).removeprefix("mlx.core.")
    gate = mlp.gate_proj
    if isinstance(gate, nn.QuantizedLinear):
        return f"q{gate.bits}"
    return str(gate.weight.dtype).removeprefix("mlx.core.")
