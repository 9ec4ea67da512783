"""FFN projections stored as blocks of intermediate neurons, for gather matmuls over the active blocks.

Block j holds the intermediate neurons j * block_size .. (j + 1) * block_size - 1. gate_proj and
up_proj weights ([intermediate, hidden]) are blocked along their rows and down_proj weights
([hidden, intermediate]) along their columns. Quantized weights keep MLX's affine quantization as
it is, packed along the input axis, so a block reads exactly the packed values, scales and biases
of the dense layer and the outputs equal the dense quantized layer's.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from mlx_sparse.errors import UserError


def gather_mm_supported(dtype: mx.Dtype) -> bool:
    """Return whether `mx.gather_mm` can run on `dtype` on the default device.

    The CPU GatherMM of MLX 0.32.4 implements float32 only and raises for float16 and bfloat16 at
    evaluation. Other devices get gather_mm for every float type, as mlx-lm's SwitchLinear uses it
    for float16 and bfloat16 MoE weights on Metal.
    NOTE: the Metal path has not been run in this project's tests, which run on CPU.
    """
    return dtype == mx.float32 or mx.default_device() != mx.cpu


def _check_linear(linear: nn.Module, name: str) -> None:
    if not isinstance(linear, (nn.Linear, nn.QuantizedLinear)):
        raise UserError(f"{name} is a {type(linear).__name__}; BlockSparseFFN needs nn.Linear or nn.QuantizedLinear")
    if "bias" in linear:
        raise UserError(f"{name} has a bias; BlockSparseFFN supports bias-free projections only")
    if isinstance(linear, nn.QuantizedLinear) and linear.mode != "affine":
        raise UserError(f"{name} uses quantization mode {linear.mode!r}; BlockSparseFFN supports mode 'affine' only")


def _split_blocks(dims: int, block_size: int, name: str, axis_name: str) -> int:
    if block_size <= 0:
        raise UserError(f"invalid block_size {block_size}: use a positive divisor of the intermediate size")
    if dims % block_size != 0:
        raise UserError(
            f"block_size {block_size} does not divide the {axis_name} {dims} of {name}; use a divisor of {dims}"
        )
    return dims // block_size


class _BlockLinear(nn.Module):
    """Weights, and for quantized layers scales and biases, with the block index on axis 0."""

    def __init__(
        self,
        weight: mx.array,
        scales: mx.array | None = None,
        biases: mx.array | None = None,
        *,
        block_size: int,
        input_dims: int,
        output_dims: int,
        group_size: int | None = None,
        bits: int | None = None,
    ):
        super().__init__()
        self.weight = weight
        if scales is not None:
            self.scales = scales
            self.biases = biases
        self.block_size = block_size
        self.input_dims = input_dims
        self.output_dims = output_dims
        self.group_size = group_size
        self.bits = bits
        if self.quantized:
            self.freeze()

    @property
    def quantized(self) -> bool:
        return "scales" in self

    @property
    def num_blocks(self) -> int:
        return self.weight.shape[0]

    @property
    def block_nbytes(self) -> int:
        """Bytes of weights, scales and biases that one block reads."""
        total = self.weight.nbytes
        if self.quantized:
            total += self.scales.nbytes + self.biases.nbytes
        return total // self.num_blocks

    def _gather_qmm(self, x: mx.array, indices: mx.array) -> mx.array:
        return mx.gather_qmm(
            x,
            self.weight,
            self.scales,
            self.biases,
            rhs_indices=indices,
            transpose=True,
            group_size=self.group_size,
            bits=self.bits,
            mode="affine",
            sorted_indices=True,
        )


class RowBlockLinear(_BlockLinear):
    """gate_proj or up_proj with the weight as [blocks, block_size, hidden // pack].

    The layout is a reshape of the nn.Linear weight [intermediate, hidden] (pack = 32 // bits for
    quantized weights, 1 for float), so building it copies nothing.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int, name: str) -> RowBlockLinear:
        _check_linear(linear, name)
        output_dims = linear.weight.shape[0]
        num_blocks = _split_blocks(output_dims, block_size, name, "output size")

        def blocked(array: mx.array) -> mx.array:
            return array.reshape(num_blocks, block_size, array.shape[-1])

        if isinstance(linear, nn.QuantizedLinear):
            input_dims = linear.weight.shape[1] * 32 // linear.bits
            return cls(
                blocked(linear.weight),
                blocked(linear.scales),
                blocked(linear.biases),
                block_size=block_size,
                input_dims=input_dims,
                output_dims=output_dims,
                group_size=linear.group_size,
                bits=linear.bits,
            )
        return cls(
            blocked(linear.weight), block_size=block_size, input_dims=linear.weight.shape[1], output_dims=output_dims
        )

    def _flat(self, array: mx.array) -> mx.array:
        return array.reshape(self.output_dims, array.shape[-1])

    def dense(self, x: mx.array) -> mx.array:
        """Compute the dense projection `x @ W.T` ([..., hidden] -> [..., intermediate])."""
        if self.quantized:
            return mx.quantized_matmul(
                x,
                self._flat(self.weight),
                self._flat(self.scales),
                self._flat(self.biases),
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        return x @ self._flat(self.weight).T

    def blocks(self, x: mx.array, indices: mx.array | None = None) -> mx.array:
        """Compute the outputs of the blocks in `indices` (sorted uint32), or of all blocks when None.

        `x` is [tokens, hidden] and the result [len(indices), tokens, block_size].
        """
        x = x[None]
        if indices is None:
            indices = mx.arange(self.num_blocks, dtype=mx.uint32)
        if self.quantized:
            return self._gather_qmm(x, indices)

        if gather_mm_supported(self.weight.dtype):
            return mx.gather_mm(x, self.weight.swapaxes(-1, -2), rhs_indices=indices, sorted_indices=True)

        # Fallback without gather_mm (float16 and bfloat16 on CPU): copies the gathered blocks.
        selected = mx.take(self.weight, indices, axis=0)
        return x @ selected.swapaxes(-1, -2)

    def to_linear(self) -> nn.Module:
        """Rebuild the dense layer with identical weights."""
        if self.quantized:
            linear = nn.QuantizedLinear(
                self.input_dims, self.output_dims, bias=False, group_size=self.group_size, bits=self.bits
            )
            linear.weight = self._flat(self.weight)
            linear.scales = self._flat(self.scales)
            linear.biases = self._flat(self.biases)
            return linear
        linear = nn.Linear(self.input_dims, self.output_dims, bias=False)
        linear.weight = self._flat(self.weight)
        return linear


class ColumnBlockLinear(_BlockLinear):
    """down_proj with the weight blocked along the intermediate (input) axis.

    Float weights are stored transposed, as [blocks, block_size, hidden], so that a block is a
    contiguous [block_size, hidden] matrix. Quantized weights are packed along the intermediate axis
    and cannot be transposed without requantizing. They are stored as [blocks, hidden,
    block_size // pack], with scales and biases as [blocks, hidden, block_size // group_size], so
    block_size must be a multiple of the group size. Both layouts are one copy at build time.
    """

    @classmethod
    def from_linear(cls, linear: nn.Module, block_size: int, name: str) -> ColumnBlockLinear:
        _check_linear(linear, name)
        output_dims = linear.weight.shape[0]

        if isinstance(linear, nn.QuantizedLinear):
            input_dims = linear.weight.shape[1] * 32 // linear.bits
            num_blocks = _split_blocks(input_dims, block_size, name, "input size")
            if block_size % linear.group_size != 0:
                raise UserError(
                    f"block_size {block_size} is not a multiple of the quantization group size "
                    f"{linear.group_size} of {name}; use a multiple of {linear.group_size}"
                )

            def blocked(array: mx.array) -> mx.array:
                array = array.reshape(output_dims, num_blocks, array.shape[-1] // num_blocks)
                return mx.contiguous(array.transpose(1, 0, 2))

            return cls(
                blocked(linear.weight),
                blocked(linear.scales),
                blocked(linear.biases),
                block_size=block_size,
                input_dims=input_dims,
                output_dims=output_dims,
                group_size=linear.group_size,
                bits=linear.bits,
            )

        input_dims = linear.weight.shape[1]
        num_blocks = _split_blocks(input_dims, block_size, name, "input size")
        weight = mx.contiguous(linear.weight.T).reshape(num_blocks, block_size, output_dims)
        return cls(weight, block_size=block_size, input_dims=input_dims, output_dims=output_dims)

    def _dense_quantized(self, array: mx.array) -> mx.array:
        return mx.contiguous(array.transpose(1, 0, 2)).reshape(self.output_dims, -1)

    def dense(self, h: mx.array) -> mx.array:
        """Compute the dense projection ([..., intermediate] -> [..., hidden]).

        Quantized weights are transposed back to [hidden, intermediate // pack] on each call, which
        keeps them stored once. The copy moves about 0.7 MB for the 4-bit SmolLM2-135M FFN with
        float32 scales, little next to the matmuls of a prefill.
        """
        if self.quantized:
            return mx.quantized_matmul(
                h,
                self._dense_quantized(self.weight),
                self._dense_quantized(self.scales),
                self._dense_quantized(self.biases),
                transpose=True,
                group_size=self.group_size,
                bits=self.bits,
            )
        return h @ self.weight.reshape(self.input_dims, self.output_dims)

    def blocks(self, h: mx.array, indices: mx.array | None = None) -> mx.array:
        """Compute the partial outputs of the blocks in `indices` (sorted uint32), or of all blocks when None.

        `h` is [len(indices), tokens, block_size], the down_proj inputs of those blocks, and the
        result [len(indices), tokens, hidden]: its sum over axis 0 is the projection.
        """
        if indices is None:
            indices = mx.arange(self.num_blocks, dtype=mx.uint32)
        if self.quantized:
            return self._gather_qmm(h, indices)

        if gather_mm_supported(self.weight.dtype):
            return mx.gather_mm(h, self.weight, rhs_indices=indices, sorted_indices=True)

        # Fallback without gather_mm (float16 and bfloat16 on CPU): copies the gathered blocks.
        return h @ mx.take(self.weight, indices, axis=0)

    def to_linear(self) -> nn.Module:
        """Rebuild the dense layer with identical weights."""
        if self.quantized:
            linear = nn.QuantizedLinear(
                self.input_dims, self.output_dims, bias=False, group_size=self.group_size, bits=self.bits
            )
            linear.weight = self._dense_quantized(self.weight)
            linear.scales = self._dense_quantized(self.scales)
            linear.biases = self._dense_quantized(self.biases)
            return linear
        linear = nn.Linear(self.input_dims, self.output_dims, bias=False)
        linear.weight = mx.contiguous(self.weight.reshape(self.input_dims, self.output_dims).T)
        return linear
