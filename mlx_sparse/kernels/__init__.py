"""Block-sparse FFN kernels for decoding: gather matmuls over the active blocks of neurons."""

from mlx_sparse.kernels.block_ffn import (
    DEFAULT_UP_MODE,
    PREFILL_MODES,
    SITES,
    UNION_MAX_TOKENS,
    UP_MODES,
    BlockSparseFFN,
    check_threshold,
)
from mlx_sparse.kernels.block_linear import ColumnBlockLinear, RowBlockLinear, gather_mm_supported
from mlx_sparse.kernels.scores import block_scores
from mlx_sparse.kernels.stats import FFNStats

__all__ = [
    "DEFAULT_UP_MODE",
    "PREFILL_MODES",
    "SITES",
    "UNION_MAX_TOKENS",
    "UP_MODES",
    "BlockSparseFFN",
    "ColumnBlockLinear",
    "FFNStats",
    "RowBlockLinear",
    "block_scores",
    "check_threshold",
    "gather_mm_supported",
]
