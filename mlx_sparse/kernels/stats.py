"""Counters of active blocks and weight bytes read by a BlockSparseFFN."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class FFNStats:
    """Totals over the calls since the last `reset()`.

    `active_blocks` and `total_blocks` count per token (a call on 4 tokens with 48 blocks adds 192
    to `total_blocks`). `weight_bytes` counts the bytes of weights, scales and biases of the blocks
    that the call read: all gate_proj blocks, the up_proj and down_proj blocks that it gathered, or
    every block on the dense prefill path. A call reads each block once for all its tokens.
    """

    calls: int = 0
    tokens: int = 0
    active_blocks: int = 0
    total_blocks: int = 0
    weight_bytes: int = 0
    dense_weight_bytes: int = 0

    def reset(self) -> None:
        self.calls = 0
        self.tokens = 0
        self.active_blocks = 0
        self.total_blocks = 0
        self.weight_bytes = 0
        self.dense_weight_bytes = 0

    def record(self, tokens: int, active_blocks: int, total_blocks: int, weight_bytes: int, dense_weight_bytes: int):
        self.calls += 1
        self.tokens += tokens
        self.active_blocks += active_blocks
        self.total_blocks += total_blocks
        self.weight_bytes += weight_bytes
        self.dense_weight_bytes += dense_weight_bytes

    @property
    def active_fraction(self) -> float:
        """Fraction of (token, block) pairs whose block was active; 0 before the first call."""
        return self.active_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def weight_bytes_ratio(self) -> float:
        """Weight bytes read over the bytes the dense FFN reads for the same calls; 0 before the first call."""
        return self.weight_bytes / self.dense_weight_bytes if self.dense_weight_bytes else 0.0
