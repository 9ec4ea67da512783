"""Block-sparse SwiGLU/GeGLU FFN that reads only the weights of the active neuron blocks.

The FFN computes `down_proj(activation(gate_proj(x)) * up_proj(x))`. Neurons are grouped in blocks
of `block_size`, and a block is active for a token when the root mean square of the site values over
the block is at least `threshold`. Inactive blocks are zeroed, which gives the masked reference
`down_proj((a * mask) * up_proj(x))` for site "gate_act" (a = activation(gate_proj(x))) and
`down_proj(h * mask)` for site "down_in" (h = a * up_proj(x)).

Decode (sequence length 1) runs the gather path: gate_proj for every block, then up_proj (for
up_mode "gather") and down_proj only for the active blocks, with `mx.gather_mm` or
`mx.gather_qmm` reading the blocks in place. With several tokens the path gathers the union of
their active blocks and zeroes each token's inactive ones. Prefill (sequence length above 1) runs
that union path for up to UNION_MAX_TOKENS tokens and the dense masked computation for longer
calls, unless `prefill` forces one of them.

With a `predictor` set, the gather path computes gate_proj too only for the blocks that the
predictor names, and the threshold then applies inside them (see `_predicted_forward`).
"""

from __future__ import annotations

import copy
import math

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sparse.errors import UserError
from mlx_sparse.kernels.block_linear import ColumnBlockLinear, RowBlockLinear
from mlx_sparse.kernels.scores import block_scores, blocked_scores
from mlx_sparse.kernels.stats import FFNStats

SITES = ("gate_act", "down_in")
UP_MODES = ("gather", "dense")
PREFILL_MODES = ("auto", "dense", "union")

# Largest call that prefill "auto" sends through the union path. benchmarks/ffn_micro.py timed the
# SmolLM2-135M FFN (fp32, 50% active blocks per random token, so 4 or more tokens gather every block)
# on a 2-core x86 with OpenBLAS and other jobs running. In four runs, dense MLP time / union path
# time was 1.1-2.2x at 2 tokens and 1.0-3.1x at 4, but 0.8-1.6x at 8 and 0.6-1.7x at 16. The dense
# masked path ran at 0.9-1.0x from 8 tokens on, and 4-bit weights ran all paths within 10%.
UNION_MAX_TOKENS = 4

# up_mode "gather" computes up_proj only for the active blocks. At the "down_in" site the block
# scores need h = a * up_proj(x) in every block, so up_proj is always dense there.
DEFAULT_UP_MODE = {"gate_act": "gather", "down_in": "dense"}

PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def check_threshold(threshold: float) -> float:
    """Return `threshold` as a float, or raise UserError unless it is finite and non-negative."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise UserError(f"invalid block threshold {threshold!r}: use a finite value >= 0 (0 keeps every block)")
    return value


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise UserError(f"unknown {name} {value!r}; use one of {', '.join(choices)}")


class BlockSparseFFN(nn.Module):
    """FFN with gate_proj, up_proj and down_proj stored once in a block layout.

    Build it with `from_mlp`. Set `stats` to an FFNStats (or call `enable_stats()`) to count active
    blocks and weight bytes per call. Counting on the dense prefill path costs one extra
    synchronization per call, and nothing is counted while `stats` is None.
    """

    def __init__(
        self,
        gate_blocks: RowBlockLinear,
        up_blocks: RowBlockLinear,
        down_blocks: ColumnBlockLinear,
        template: nn.Module,
        *,
        site: str,
        threshold: float,
        up_mode: str,
        prefill: str,
    ):
        super().__init__()
        self.gate_blocks = gate_blocks
        self.up_blocks = up_blocks
        self.down_blocks = down_blocks

        # The source MLP without its projections: it supplies activation() and the class that
        # to_mlp() rebuilds. Stored outside the module tree so that it adds no parameters.
        object.__setattr__(self, "_template", template)

        self.site = site
        self.up_mode = up_mode
        self.prefill = prefill
        self.threshold = threshold
        self.stats: FFNStats | None = None
        # Callable from the input tokens [tokens, hidden] to the predicted active blocks (bool
        # [tokens, blocks]); see mlx_sparse.predict.gather. Not part of the module tree.
        object.__setattr__(self, "predictor", None)

    @classmethod
    def from_mlp(
        cls,
        mlp: nn.Module,
        site: str,
        threshold: float,
        block_size: int = 32,
        up_mode: str | None = None,
        prefill: str = "auto",
    ) -> BlockSparseFFN:
        """Build the block-sparse FFN from an MLP with gate_proj, up_proj, down_proj and activation().

        `up_mode` defaults to "gather" for site "gate_act" and "dense" for "down_in"; "gather" at
        "down_in" raises UserError, because its block scores need up_proj in every block.
        `prefill` picks the path of calls with a sequence length above 1: "union" gathers the
        union of the tokens' active blocks, "dense" runs the dense masked FFN, and "auto" takes
        "union" up to UNION_MAX_TOKENS tokens. Sequence length 1 always takes the union path. The
        weights are evaluated here, and the float gate_proj and up_proj weights share memory with
        `mlp`'s. `mlp` itself is not modified.
        """
        _check_choice("site", site, SITES)
        up_mode = DEFAULT_UP_MODE[site] if up_mode is None else up_mode
        _check_choice("up_mode", up_mode, UP_MODES)
        if site == "down_in" and up_mode == "gather":
            raise UserError(
                "up_mode 'gather' needs site 'gate_act': down_in block scores need up_proj in every block; "
                "use up_mode 'dense'"
            )
        _check_choice("prefill", prefill, PREFILL_MODES)
        threshold = check_threshold(threshold)

        missing = [name for name in (*PROJECTIONS, "activation") if not hasattr(mlp, name)]
        if missing:
            raise UserError(
                f"{type(mlp).__name__} has no {', '.join(missing)}; BlockSparseFFN needs an MLP with "
                "gate_proj, up_proj, down_proj and activation(x)"
            )

        gate_blocks = RowBlockLinear.from_linear(mlp.gate_proj, block_size, "gate_proj")
        up_blocks = RowBlockLinear.from_linear(mlp.up_proj, block_size, "up_proj")
        down_blocks = ColumnBlockLinear.from_linear(mlp.down_proj, block_size, "down_proj")

        shapes = {
            "gate_proj": (gate_blocks.output_dims, gate_blocks.input_dims),
            "up_proj": (up_blocks.output_dims, up_blocks.input_dims),
            "down_proj (transposed)": (down_blocks.input_dims, down_blocks.output_dims),
        }
        if len(set(shapes.values())) != 1:
            raise UserError(f"inconsistent FFN shapes {shapes}: expected [intermediate, hidden] for all three")

        template = copy.copy(mlp)
        for name in PROJECTIONS:
            del template[name]

        ffn = cls(
            gate_blocks,
            up_blocks,
            down_blocks,
            template,
            site=site,
            threshold=threshold,
            up_mode=up_mode,
            prefill=prefill,
        )
        mx.eval(ffn.parameters())
        return ffn

    @property
    def threshold(self) -> float:
        """Block threshold: a block is active when its score is >= this value."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)

    @property
    def block_size(self) -> int:
        return self.gate_blocks.block_size

    @property
    def num_blocks(self) -> int:
        return self.gate_blocks.num_blocks

    @property
    def dense_weight_bytes(self) -> int:
        """Bytes of weights, scales and biases that the dense FFN reads per call."""
        return self.num_blocks * (
            self.gate_blocks.block_nbytes + self.up_blocks.block_nbytes + self.down_blocks.block_nbytes
        )

    def activation(self, x: mx.array) -> mx.array:
        return self._template.activation(x)

    def enable_stats(self) -> FFNStats:
        """Start counting into a fresh FFNStats and return it."""
        self.stats = FFNStats()
        return self.stats

    def to_mlp(self) -> nn.Module:
        """Rebuild a dense MLP of the source class with identical weights."""
        mlp = copy.copy(self._template)
        mlp.gate_proj = self.gate_blocks.to_linear()
        mlp.up_proj = self.up_blocks.to_linear()
        mlp.down_proj = self.down_blocks.to_linear()
        return mlp

    def __call__(self, x: mx.array) -> mx.array:
        hidden = self.gate_blocks.input_dims
        if x.shape[-1] != hidden:
            raise ValueError(f"input has last axis {x.shape[-1]}, expected the hidden size {hidden}")

        seq_len = x.shape[-2] if x.ndim >= 2 else 1
        tokens = x.reshape(-1, hidden)
        union = self.prefill == "union" or (self.prefill == "auto" and tokens.shape[0] <= UNION_MAX_TOKENS)
        if self.predictor is not None:
            y = self._predicted_forward(tokens)
        elif seq_len == 1 or union:
            y = self._gather_forward(tokens)
        else:
            y = self._dense_forward(tokens)
        return y.reshape(*x.shape[:-1], self.down_blocks.output_dims)

    def _record(self, tokens: int, active_blocks: int, gathered_blocks: int, dense_up: bool, dense_gate: bool = True) -> None:
        up_blocks = self.num_blocks if dense_up else gathered_blocks
        gate_blocks = self.num_blocks if dense_gate else gathered_blocks
        weight_bytes = (
            gate_blocks * self.gate_blocks.block_nbytes
            + up_blocks * self.up_blocks.block_nbytes
            + gathered_blocks * self.down_blocks.block_nbytes
        )
        self.stats.record(
            tokens=tokens,
            active_blocks=active_blocks,
            total_blocks=tokens * self.num_blocks,
            weight_bytes=weight_bytes,
            dense_weight_bytes=self.dense_weight_bytes,
        )

    def _gather_forward(self, x: mx.array) -> mx.array:
        """Compute the FFN of `x` ([tokens, hidden]) reading up_proj and down_proj for active blocks only."""
        num_tokens = x.shape[0]
        num_blocks = self.num_blocks
        dense_up = self.up_mode == "dense"

        a = self.activation(self.gate_blocks.blocks(x))
        h_all = a * self.up_blocks.blocks(x) if dense_up else None
        site_values = a if self.site == "gate_act" else h_all

        # Threshold 0 keeps every block, so the scores are skipped along with their host sync.
        indices = None
        token_mask = None
        gathered_blocks = num_blocks
        active_blocks = num_blocks * num_tokens
        if self.threshold > 0:
            # The number of active blocks sets the gather shapes, so the mask is read on the host:
            # one synchronization per call. The alternative without it, a fixed k from
            # mx.argpartition on the scores, is exact only while at most k blocks pass. See the
            # "index_selection" table of benchmarks/ffn_micro.py: SmolLM2-135M FFN, fp32, 50% active,
            # 2-core x86 with OpenBLAS and other jobs on the cores. In four runs this path took
            # 350-460 us per token, a fixed k 240-270 us and precomputed indices 220-240 us.
            # With no other jobs running, the same comparison put the synchronization at about 40 us
            # (250 against 205 us).
            # NOTE: the synchronization also stops mx.compile of a model with this module and
            # serializes mx.async_eval pipelining, and its cost on Metal has not been measured.
            mask = np.array(blocked_scores(site_values) >= self.threshold)
            block_active = mask.any(axis=1)
            active_blocks = int(mask.sum())
            gathered_blocks = int(block_active.sum())

            if gathered_blocks == 0:
                if self.stats is not None:
                    self._record(num_tokens, 0, 0, dense_up)
                return mx.zeros((num_tokens, self.down_blocks.output_dims), dtype=x.dtype)

            if gathered_blocks < num_blocks:
                index_array = np.flatnonzero(block_active).astype(np.uint32)
                indices = mx.array(index_array)
                mask = mask[index_array]
            if not mask.all():
                token_mask = mx.array(mask)[..., None]

        if dense_up:
            h = h_all if indices is None else mx.take(h_all, indices, axis=0)
        else:
            a_selected = a if indices is None else mx.take(a, indices, axis=0)
            h = a_selected * self.up_blocks.blocks(x, indices)
        if token_mask is not None:
            h = h * token_mask.astype(h.dtype)

        y = self.down_blocks.blocks(h, indices).sum(axis=0)

        if self.stats is not None:
            self._record(num_tokens, active_blocks, gathered_blocks, dense_up)
        return y

    def _predicted_forward(self, x: mx.array) -> mx.array:
        """Compute the FFN of `x` ([tokens, hidden]) reading all three projections for predicted blocks only.

        A block is active when the predictor names it and its score passes the threshold. The score
        divides the block's RMS by the token's RMS over the whole intermediate size with the
        unpredicted blocks counted as zeros, since they are never computed.
        """
        num_tokens = x.shape[0]
        num_blocks = self.num_blocks

        # The predicted set sets the gather shapes, so it is read on the host: one synchronization
        # per call, as on the threshold path, but before any FFN weight is read.
        predicted = np.array(self.predictor(x)).reshape(num_tokens, num_blocks)
        block_predicted = predicted.any(axis=0)
        gathered_blocks = int(block_predicted.sum())
        if gathered_blocks == 0:
            if self.stats is not None:
                self._record(num_tokens, 0, 0, dense_up=False, dense_gate=False)
            return mx.zeros((num_tokens, self.down_blocks.output_dims), dtype=x.dtype)

        indices = None
        if gathered_blocks < num_blocks:
            index_array = np.flatnonzero(block_predicted).astype(np.uint32)
            indices = mx.array(index_array)
            predicted = predicted[:, index_array]
        token_mask = mx.array(predicted.T)[..., None]

        a = self.activation(self.gate_blocks.blocks(x, indices))
        h = a * self.up_blocks.blocks(x, indices)
        site_values = (a if self.site == "gate_act" else h) * token_mask.astype(h.dtype)

        squares = mx.square(site_values.astype(mx.float32))
        token_rms = mx.sqrt(mx.sum(squares, axis=(0, 2)) / self.gate_blocks.output_dims)
        scores = mx.sqrt(mx.mean(squares, axis=-1)) / mx.maximum(token_rms, 1e-30)[None, :]
        active = (scores >= self.threshold) & token_mask[..., 0]
        h = h * active[..., None].astype(h.dtype)

        y = self.down_blocks.blocks(h, indices).sum(axis=0)
        if self.stats is not None:
            self._record(num_tokens, int(active.sum().item()), gathered_blocks, dense_up=False, dense_gate=False)
        return y

    def _dense_forward(self, x: mx.array) -> mx.array:
        """Compute the dense masked FFN of `x` ([tokens, hidden]) from the block layout."""
        num_tokens = x.shape[0]
        a = self.activation(self.gate_blocks.dense(x))
        h = a * self.up_blocks.dense(x)

        mask = None
        if self.threshold > 0:
            site_values = a if self.site == "gate_act" else h
            mask = block_scores(site_values, self.block_size) >= self.threshold
            blocks = h.reshape(num_tokens, self.num_blocks, self.block_size)
            h = (blocks * mask[..., None].astype(h.dtype)).reshape(h.shape)

        y = self.down_blocks.dense(h)

        if self.stats is not None:
            total = num_tokens * self.num_blocks
            active_blocks = total if mask is None else int(mask.sum().item())
            self._record(num_tokens, active_blocks, self.num_blocks, dense_up=True)
        return y
