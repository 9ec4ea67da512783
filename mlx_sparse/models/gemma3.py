"""Gemma-3 text decoder (GeGLU FFN, q/k norms, local and global attention layers)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask, scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache
from mlx_lm.models.rope_utils import initialize_rope

from .base import MLP, BaseModelArgs


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    vocab_size: int
    head_dim: int = 256
    num_key_value_heads: int = 1
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_local_base_freq: float = 10_000.0
    rope_scaling: dict[str, Any] | None = None
    query_pre_attn_scalar: float = 256
    sliding_window: int = 512
    # Every `sliding_window_pattern`-th layer is global; the others attend to a local window.
    sliding_window_pattern: int = 6
    layer_types: list[str] | None = None
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.layer_types is None:
            pattern = self.sliding_window_pattern
            self.layer_types = [
                "full_attention" if (i + 1) % pattern == 0 else "sliding_attention"
                for i in range(self.num_hidden_layers)
            ]


class RMSNorm(nn.Module):
    """Gemma's RMSNorm, which scales by `1 + weight` (weights are stored as offsets from 1)."""

    def __init__(self, dims: int, eps: float):
        super().__init__()
        self.weight = mx.zeros((dims,))
        self.eps = eps

    def __call__(self, x: mx.array) -> mx.array:
        return mx.fast.rms_norm(x, 1.0 + self.weight, self.eps)


def add_residual(x: mx.array, y: mx.array) -> mx.array:
    """Add a residual branch, clipping to the float16 range when running in float16.

    Gemma's residual stream exceeds float16's range on some tokens; clipping keeps it finite.
    """
    if x.dtype != mx.float16:
        return x + y
    bound = mx.finfo(mx.float16).max
    return mx.clip(x.astype(mx.float32) + y.astype(mx.float32), -bound, bound).astype(mx.float16)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, use_sliding: bool):
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = args.head_dim
        self.scale = args.query_pre_attn_scalar**-0.5

        dim = args.hidden_size
        self.q_proj = nn.Linear(dim, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, self.n_kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim, args.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, args.rms_norm_eps)

        if use_sliding:
            self.rope = initialize_rope(self.head_dim, args.rope_local_base_freq, False)
        else:
            self.rope = initialize_rope(
                self.head_dim, args.rope_theta, False, args.rope_scaling, args.max_position_embeddings
            )

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        batch, length, _ = x.shape

        queries = self.q_proj(x).reshape(batch, length, self.n_heads, -1).transpose(0, 2, 1, 3)
        keys = self.k_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)
        values = self.v_proj(x).reshape(batch, length, self.n_kv_heads, -1).transpose(0, 2, 1, 3)

        queries = self.q_norm(queries)
        keys = self.k_norm(keys)

        offset = cache.offset if cache is not None else 0
        queries = self.rope(queries, offset=offset)
        keys = self.rope(keys, offset=offset)
        if cache is not None:
            keys, values = cache.update_and_fetch(keys, values)

        output = scaled_dot_product_attention(queries, keys, values, cache=cache, scale=self.scale, mask=mask)
        output = output.transpose(0, 2, 1, 3).reshape(batch, length, -1)
        return self.o_proj(output)


class TransformerBlock(nn.Module):
    def __init__(self, args: ModelArgs, use_sliding: bool):
        super().__init__()
        self.use_sliding = use_sliding
        self.self_attn = Attention(args, use_sliding)
        self.mlp = MLP(args.hidden_size, args.intermediate_size, "gelu_tanh")
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.pre_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_feedforward_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, x: mx.array, mask=None, cache=None) -> mx.array:
        attention = self.self_attn(self.input_layernorm(x), mask, cache)
        h = add_residual(x, self.post_attention_layernorm(attention))
        ffn = self.mlp(self.pre_feedforward_layernorm(h))
        return add_residual(h, self.post_feedforward_layernorm(ffn))


class Gemma3Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [TransformerBlock(args, kind == "sliding_attention") for kind in args.layer_types]
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)

        # NOTE: the sqrt(hidden_size) embedding scale is rounded to bfloat16 first, as mlx-lm
        # 0.32 does, so that logits match mlx-lm's Gemma-3 to 1e-4.
        h = h * mx.array(self.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)

        if cache is None:
            cache = [None] * len(self.layers)
        full_index = next((i for i, layer in enumerate(self.layers) if not layer.use_sliding), None)
        sliding_index = next((i for i, layer in enumerate(self.layers) if layer.use_sliding), None)
        full_mask = create_attention_mask(h, cache[full_index]) if full_index is not None else None
        sliding_mask = None
        if sliding_index is not None:
            sliding_mask = create_attention_mask(h, cache[sliding_index], window_size=self.args.sliding_window)

        for layer, layer_cache in zip(self.layers, cache):
            mask = sliding_mask if layer.use_sliding else full_mask
            h = layer(h, mask, layer_cache)
        return self.norm(h)


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = Gemma3Model(args)
        self.tie_word_embeddings = True

    def __call__(self, inputs: mx.array, cache=None, input_embeddings: mx.array | None = None) -> mx.array:
        out = self.model(inputs, cache, input_embeddings)
        if self.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(out)
        return self.lm_head(out)

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """Keep an untied lm_head when the checkpoint has one; Gemma-3 checkpoints usually tie it."""
        if "lm_head.weight" in weights:
            self.tie_word_embeddings = False
            self.lm_head = nn.Linear(self.args.hidden_size, self.args.vocab_size, bias=False)
        return weights

    @property
    def layers(self) -> list[TransformerBlock]:
        return self.model.layers

    def make_cache(self) -> list:
        return [
            RotatingKVCache(max_size=self.args.sliding_window) if layer.use_sliding else KVCache()
            for layer in self.layers
        ]
