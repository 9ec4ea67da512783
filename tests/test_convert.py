"""Tests for the GGUF -> mlx-lm conversion (mlx_sparse.convert).

Tiny GGUF files are written with `gguf.GGUFWriter` from random weights in Hugging Face layout,
so the converted model can be checked against mlx-lm's own model on the original weights. The
`real_model` tests read the SmolLM2 and Gemma-3 GGUFs that the model packages ship.
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import math
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import gguf
import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx.utils import tree_flatten
import numpy as np
import pytest
import sentencepiece
from gguf import GGMLQuantizationType
from tokenizers import pre_tokenizers

from mlx_sparse import convert
from mlx_sparse.aliases import ALIASES
from mlx_sparse.cli import run_command
from mlx_sparse.convert import GGUFModel, convert_gguf, read_gguf, read_gguf_tokenizer, repack_native
from mlx_sparse.errors import UserError

WIKITEXT_TEST = Path("/work/shared/data/wikitext-2-raw/wiki.test.raw")
REPO_ROOT = Path(__file__).resolve().parents[1]

# ---------------------------------------------------------------------------------------------
# Tiny tokenizers


BYTE_LEVEL_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at"), ("i", "n")]
BYTE_LEVEL_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def byte_level_vocab() -> tuple[list[str], list[int]]:
    tokens = BYTE_LEVEL_SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet()) + [left + right for left, right in BYTE_LEVEL_MERGES]
    types = [convert.TOKEN_CONTROL] * len(BYTE_LEVEL_SPECIALS) + [convert.TOKEN_NORMAL] * (len(tokens) - len(BYTE_LEVEL_SPECIALS))
    return tokens, types


SPM_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_MERGED = ["▁t", "he", "▁the", "▁c", "at", "▁cat", "▁s", "▁sat", "on", "▁on", "▁m", "▁mat", "in", "▁in", "er", "▁inn", "▁inner"]
SPM_CHARS = ["▁", *"abcdefghijklmnopqrstuvwxyz", "T", "."]
# User-defined pieces as llama.cpp's converter writes them: with real spaces instead of "▁".
SPM_USER_DEFINED = ["  ", "\n"]


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = SPM_CONTROL + [f"<0x{value:02X}>" for value in range(256)] + SPM_MERGED + SPM_CHARS + SPM_USER_DEFINED
    types = (
        [convert.TOKEN_CONTROL] * len(SPM_CONTROL)
        + [convert.TOKEN_BYTE] * 256
        + [convert.TOKEN_NORMAL] * (len(SPM_MERGED) + len(SPM_CHARS))
        + [convert.TOKEN_USER_DEFINED] * len(SPM_USER_DEFINED)
    )
    scores = [-1000.0] * len(SPM_CONTROL) + [0.0] * 256 + [-float(rank) for rank in range(len(SPM_MERGED) + len(SPM_CHARS))]
    scores += [-1000.0] * len(SPM_USER_DEFINED)
    return tokens, scores, types


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _proto_field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint((number << 3) | wire_type) + payload


def _proto_bytes(number: int, payload: bytes) -> bytes:
    return _proto_field(number, 2, _varint(len(payload)) + payload)


def _proto_int(number: int, value: int) -> bytes:
    return _proto_field(number, 0, _varint(value))


def sentencepiece_reference(tokens, scores, types, unk_id: int, add_dummy_prefix: bool) -> sentencepiece.SentencePieceProcessor:
    """Build a SentencePiece BPE model from GGUF pieces by writing its ModelProto by hand.

    protobuf is not installed, so the few fields needed are serialized directly (field numbers
    from sentencepiece_model.proto: ModelProto.pieces=1, trainer_spec=2, normalizer_spec=3).
    """
    pieces = []
    for index, (token, score, token_type) in enumerate(zip(tokens, scores, types)):
        if token_type == convert.TOKEN_USER_DEFINED:
            token = token.replace(" ", "▁")
        if index == unk_id:
            token_type = convert.TOKEN_UNKNOWN
        piece = _proto_bytes(1, token.encode()) + _proto_field(2, 5, struct.pack("<f", score)) + _proto_int(3, token_type)
        pieces.append(_proto_bytes(1, piece))
    # TrainerSpec: model_type=3 (BPE=2), vocab_size=4, byte_fallback=35, unk/bos/eos/pad ids=40..43.
    trainer = _proto_int(3, 2) + _proto_int(4, len(tokens)) + _proto_int(35, 1) + _proto_int(40, unk_id)
    trainer += _proto_int(41, 2) + _proto_int(42, 1) + _proto_int(43, 0)
    # NormalizerSpec: name=1, add_dummy_prefix=3, remove_extra_whitespaces=4, escape_whitespaces=5.
    normalizer = _proto_bytes(1, b"identity") + _proto_int(3, int(add_dummy_prefix)) + _proto_int(4, 0) + _proto_int(5, 1)
    proto = b"".join(pieces) + _proto_bytes(2, trainer) + _proto_bytes(3, normalizer)
    return sentencepiece.SentencePieceProcessor(model_proto=proto)


# ---------------------------------------------------------------------------------------------
# Tiny GGUF models


LLAMA_ARGS = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "max_position_embeddings": 256,
}

GEMMA3_ARGS = {
    "hidden_size": 64,
    "num_hidden_layers": 7,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 32,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1_000_000.0,
    "rope_local_base_freq": 10000.0,
    "query_pre_attn_scalar": 32,
    "sliding_window": 8,
    "sliding_window_pattern": 6,
    "max_position_embeddings": 256,
}

# gguf-py's own Hugging Face -> GGUF tensor name tables, independent of the converter's.
_GGUF_ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "gemma3": gguf.MODEL_ARCH.GEMMA3}


def hf_weights(model_type: str, args: dict, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights in Hugging Face layout and mlx-lm names (norm weights as the model uses them)."""
    rng = np.random.default_rng(seed)
    model_module = importlib.import_module(f"mlx_lm.models.{model_type}")
    model = model_module.Model(model_module.ModelArgs.from_dict({"model_type": model_type, "vocab_size": vocab_size, **args}))
    weights = {}
    for name, value in tree_flatten(model.parameters()):
        if name == "lm_head.weight":
            continue
        if name.endswith("norm.weight"):
            base = 0.0 if model_type == "gemma3_text" else 1.0
            weights[name] = (base + 0.1 * rng.standard_normal(value.shape)).astype(np.float32)
        else:
            weights[name] = (0.15 * rng.standard_normal(value.shape)).astype(np.float32)
    return weights


def llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Reorder q_proj/k_proj rows per head from rotate-half pairs to adjacent pairs, as llama.cpp does."""
    rows, cols = weight.shape
    return weight.reshape(num_heads, 2, rows // num_heads // 2, cols).swapaxes(1, 2).reshape(rows, cols)


@functools.cache
def gguf_name_map(arch: str) -> gguf.TensorNameMap:
    layers = max(LLAMA_ARGS["num_hidden_layers"], GEMMA3_ARGS["num_hidden_layers"])
    return gguf.get_tensor_name_map(_GGUF_ARCHS[arch], layers)


def gguf_name(arch: str, name: str) -> str:
    return gguf_name_map(arch).get_name(name, try_suffixes=(".weight", ".bias"))


def write_tiny_gguf(
    path: Path,
    arch: str,
    weights: dict[str, np.ndarray],
    args: dict,
    tensor_types: dict[str, GGMLQuantizationType] | None = None,
    tokenizer: str = "gpt2",
    pre: str = "smollm",
    add_space_prefix: bool = False,
    extra_tensors: dict[str, np.ndarray] | None = None,
    customize: Callable[[gguf.GGUFWriter], None] | None = None,
) -> Path:
    """Write `weights` (Hugging Face layout) as llama.cpp would: renamed, permuted or norm-shifted.

    `customize` runs after the metadata is added, to add or remove keys.
    """
    tensor_types = tensor_types or {}
    writer = gguf.GGUFWriter(path, arch)
    writer.add_block_count(args["num_hidden_layers"])
    writer.add_embedding_length(args["hidden_size"])
    writer.add_feed_forward_length(args["intermediate_size"])
    writer.add_head_count(args["num_attention_heads"])
    writer.add_head_count_kv(args["num_key_value_heads"])
    writer.add_layer_norm_rms_eps(args["rms_norm_eps"])
    writer.add_rope_freq_base(args["rope_theta"])
    writer.add_context_length(args["max_position_embeddings"])
    writer.add_key_length(args["head_dim"])
    writer.add_value_length(args["head_dim"])
    if arch == "llama":
        writer.add_rope_dimension_count(args["head_dim"])
    else:
        writer.add_sliding_window(args["sliding_window"])

    if tokenizer == "gpt2":
        tokens, types = byte_level_vocab()
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([f"{left} {right}" for left, right in BYTE_LEVEL_MERGES])
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
        writer.add_add_bos_token(False)
    else:
        tokens, scores, types = spm_vocab()
        writer.add_tokenizer_model("llama")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(2)
        writer.add_eos_token_id(1)
        writer.add_unk_token_id(3)
        writer.add_pad_token_id(0)
        writer.add_add_bos_token(True)
        writer.add_add_space_prefix(add_space_prefix)

    if customize is not None:
        customize(writer)

    for name, value in weights.items():
        if arch == "llama" and name.endswith("self_attn.q_proj.weight"):
            value = llama_cpp_permute(value, args["num_attention_heads"])
        elif arch == "llama" and name.endswith("self_attn.k_proj.weight"):
            value = llama_cpp_permute(value, args["num_key_value_heads"])
        elif arch == "gemma3" and name.endswith("norm.weight"):
            value = value + np.float32(1.0)
        qtype = tensor_types.get(name)
        if qtype is None:
            writer.add_tensor(gguf_name(arch, name), value)
        else:
            writer.add_tensor(gguf_name(arch, name), gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, value in (extra_tensors or {}).items():
        writer.add_tensor(name, value)

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def vocab_size(tokenizer: str) -> int:
    return len(byte_level_vocab()[0]) if tokenizer == "gpt2" else len(spm_vocab()[0])


@pytest.fixture
def tiny_llama(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    return write_tiny_gguf(tmp_path / "tiny-llama.gguf", "llama", weights, LLAMA_ARGS), weights


@pytest.fixture
def tiny_gemma3(tmp_path) -> tuple[Path, dict[str, np.ndarray]]:
    weights = hf_weights("gemma3_text", GEMMA3_ARGS, vocab_size("llama"), seed=1)
    return write_tiny_gguf(tmp_path / "tiny-gemma3.gguf", "gemma3", weights, GEMMA3_ARGS, tokenizer="llama"), weights


def quantized_llama_types(weights: dict[str, np.ndarray]) -> dict[str, GGMLQuantizationType]:
    """Q8_0 embedding, Q4_1 attention and Q4_0 MLP weights, like a mixed llama.cpp quantization."""
    types = {}
    for name, value in weights.items():
        if value.ndim != 2:
            continue
        if "embed_tokens" in name:
            types[name] = GGMLQuantizationType.Q8_0
        elif "self_attn" in name:
            types[name] = GGMLQuantizationType.Q4_1
        else:
            types[name] = GGMLQuantizationType.Q4_0
    return types


# ---------------------------------------------------------------------------------------------
# Model helpers


def reference_model(model_type: str, args: dict, weights: dict[str, np.ndarray], vocab: int) -> nn.Module:
    """mlx-lm's model on Hugging Face layout weights (non-traditional RoPE for llama)."""
    model_module = importlib.import_module(f"mlx_lm.models.{model_type}")
    config = {"model_type": model_type, "vocab_size": vocab, **args}
    if model_type == "llama":
        config.update({"rope_traditional": False, "tie_word_embeddings": True})
    model = model_module.Model(model_module.ModelArgs.from_dict(config))
    arrays = model.sanitize({name: mx.array(value) for name, value in weights.items()})
    model.load_weights(list(arrays.items()), strict=True)
    return model


def model_from_gguf(loaded: GGUFModel) -> nn.Module:
    """Instantiate a model from `read_gguf` output the way mlx-lm does for a folder."""
    config = loaded.config
    model_module = importlib.import_module(f"mlx_lm.models.{config['model_type']}")
    model = model_module.Model(model_module.ModelArgs.from_dict(config))
    weights = model.sanitize(dict(loaded.weights))
    quantization = config.get("quantization")
    if quantization is not None:

        def predicate(path, module):
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"], class_predicate=predicate)
    model.load_weights(list(weights.items()), strict=True)
    return model


def logits_of(model: nn.Module, ids: list[int]) -> np.ndarray:
    return np.array(model(mx.array(ids)[None]).astype(mx.float32))


def token_ids(count: int, vocab: int, seed: int = 3) -> list[int]:
    return np.random.default_rng(seed).integers(0, vocab, size=count).tolist()


# ---------------------------------------------------------------------------------------------
# Layout and weights


@pytest.mark.parametrize("qtype", [GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q8_0])
def test_repack_matches_mx_load(tmp_path, qtype):
    path = tmp_path / "one.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    values = np.random.default_rng(0).standard_normal((8, 96)).astype(np.float32)
    writer.add_tensor("probe", gguf.quants.quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    expected = mx.load(str(path))
    weight, scales, biases, bits = repack_native(gguf.GGUFReader(path).tensors[0])

    assert bits == convert.NATIVE_BITS[qtype]
    assert mx.array_equal(weight, expected["probe"]).item()
    assert mx.array_equal(scales, expected["probe.scales"]).item()
    assert mx.array_equal(biases, expected["probe.biases"]).item()


def test_llama_logits_match_hf_layout(tiny_llama):
    path, weights = tiny_llama
    vocab = vocab_size("gpt2")
    ids = token_ids(24, vocab)

    loaded = read_gguf(path, dtype="float32")

    assert loaded.config["rope_traditional"] is True
    expected = logits_of(reference_model("llama", LLAMA_ARGS, weights, vocab), ids)
    np.testing.assert_allclose(logits_of(model_from_gguf(loaded), ids), expected, atol=1e-4, rtol=1e-4)


def test_gemma3_logits_match_hf_layout(tiny_gemma3):
    path, weights = tiny_gemma3
    vocab = vocab_size("llama")
    ids = token_ids(24, vocab)

    loaded = read_gguf(path, dtype="float32")

    expected = logits_of(reference_model("gemma3_text", GEMMA3_ARGS, weights, vocab), ids)
    np.testing.assert_allclose(logits_of(model_from_gguf(loaded), ids), expected, atol=1e-4, rtol=1e-4)


def test_gemma3_norm_offset_removed(tiny_gemma3):
    path, weights = tiny_gemma3

    loaded = read_gguf(path, dtype="float32")

    for name in ["model.norm.weight", "model.layers.0.self_attn.q_norm.weight", "model.layers.3.post_feedforward_layernorm.weight"]:
        np.testing.assert_allclose(np.array(loaded.weights[name]), weights[name], atol=1e-6, err_msg=name)


def test_gemma3_config_fields(tiny_gemma3):
    path, _ = tiny_gemma3

    config = read_gguf(path, dtype="float32").config

    assert config["model_type"] == "gemma3_text"
    assert config["sliding_window"] == 8
    assert config["sliding_window_pattern"] == 6
    assert config["rope_local_base_freq"] == 10000.0
    assert config["query_pre_attn_scalar"] == 32
    assert config["head_dim"] == 32
    assert config["tie_word_embeddings"] is True


def test_llama_config_fields(tiny_llama):
    path, _ = tiny_llama

    config = read_gguf(path, dtype="float32").config

    assert config["model_type"] == "llama"
    assert config["rms_norm_eps"] == 1e-5
    assert config["num_key_value_heads"] == 2
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == 2
    assert "quantization" not in config


def test_untied_llama_has_lm_head(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    lm_head = 0.1 * np.random.default_rng(5).standard_normal(weights["model.embed_tokens.weight"].shape).astype(np.float32)
    path = write_tiny_gguf(tmp_path / "untied.gguf", "llama", weights, LLAMA_ARGS, extra_tensors={"output.weight": lm_head})

    loaded = read_gguf(path, dtype="float32")

    assert loaded.config["tie_word_embeddings"] is False
    np.testing.assert_array_equal(np.array(loaded.weights["lm_head.weight"]), lm_head)


# ---------------------------------------------------------------------------------------------
# Quantized dtypes


def test_native_quantization_config(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", weights, LLAMA_ARGS, tensor_types=quantized_llama_types(weights))

    config = read_gguf(path, dtype="native").config

    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    assert config["quantization_config"] == config["quantization"]


def test_native_keeps_float_modules_unquantized(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    types = {"model.layers.0.mlp.up_proj.weight": GGMLQuantizationType.Q8_0}
    path = write_tiny_gguf(tmp_path / "partial.gguf", "llama", weights, LLAMA_ARGS, tensor_types=types)

    loaded = read_gguf(path, dtype="native")

    quantization = loaded.config["quantization"]
    assert quantization["bits"] == 8
    assert quantization["model.layers.0.mlp.gate_proj"] is False
    assert "model.layers.0.mlp.up_proj" not in quantization
    assert loaded.weights["model.layers.0.mlp.gate_proj.weight"].dtype == mx.float16


def test_native_folder_logits_match_memory(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", weights, LLAMA_ARGS, tensor_types=quantized_llama_types(weights))
    ids = token_ids(16, vocab_size("gpt2"))

    folder = convert_gguf(path, tmp_path / "out", dtype="native")
    model, _ = mlx_lm.load(str(folder))

    np.testing.assert_array_equal(logits_of(model, ids), logits_of(model_from_gguf(read_gguf(path, dtype="native")), ids))


def test_native_close_to_float32(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", weights, LLAMA_ARGS, tensor_types=quantized_llama_types(weights))

    native = read_gguf(path, dtype="native").weights
    dense = read_gguf(path, dtype="float32").weights

    name = "model.layers.1.self_attn.k_proj"
    dequantized = mx.dequantize(native[f"{name}.weight"], native[f"{name}.scales"], native[f"{name}.biases"], group_size=32, bits=4)
    np.testing.assert_allclose(np.array(dequantized.astype(mx.float32)), np.array(dense[f"{name}.weight"]), atol=2e-3, rtol=1e-3)


@pytest.mark.parametrize("dtype, bits", [("q4", 4), ("q8", 8)])
def test_requantized_folder(tiny_llama, tmp_path, dtype, bits):
    path, _ = tiny_llama
    ids = token_ids(16, vocab_size("gpt2"))

    folder = convert_gguf(path, tmp_path / dtype, dtype=dtype)
    config = json.loads((folder / "config.json").read_text())
    model, _ = mlx_lm.load(str(folder))

    assert config["quantization"] == {"group_size": 32, "bits": bits, "mode": "affine"}
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert isinstance(model.model.layers[1].mlp.down_proj, nn.QuantizedLinear)
    assert model.model.layers[0].input_layernorm.weight.dtype == mx.float16
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(model_from_gguf(read_gguf(path, dtype=dtype)), ids))


@pytest.mark.parametrize("dtype, bits", [("q4", 4), ("q8", 8)])
def test_requantized_error_within_step(tiny_llama, dtype, bits):
    path, weights = tiny_llama

    quantized = read_gguf(path, dtype=dtype).weights

    for module in ["model.embed_tokens", "model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"]:
        scales = quantized[f"{module}.scales"]
        dequantized = mx.dequantize(quantized[f"{module}.weight"], scales, quantized[f"{module}.biases"], group_size=32, bits=bits)
        error = np.abs(np.array(dequantized.astype(mx.float32)) - llama_reference_weight(weights, module))
        step = np.repeat(np.abs(np.array(scales.astype(mx.float32))), 32, axis=-1)
        # MLX's affine grid keeps zero exact (mlx 0.32 quantized.h), so an element can be one step off,
        # not half a step. The float16 cast of the input adds up to 1e-3 here.
        assert np.all(error <= step + 1e-3), module


def llama_reference_weight(weights: dict[str, np.ndarray], module: str) -> np.ndarray:
    """Return a weight as the GGUF stores it: q_proj/k_proj permuted for llama.cpp's RoPE."""
    weight = weights[f"{module}.weight"]
    if module.endswith("q_proj"):
        return llama_cpp_permute(weight, LLAMA_ARGS["num_attention_heads"])
    if module.endswith("k_proj"):
        return llama_cpp_permute(weight, LLAMA_ARGS["num_key_value_heads"])
    return weight


@pytest.mark.parametrize("dtype, bits", [("native", 8), ("q4", 4)])
def test_gemma3_uses_bfloat16(tmp_path, dtype, bits):
    weights = hf_weights("gemma3_text", GEMMA3_ARGS, vocab_size("llama"))
    types = {"model.embed_tokens.weight": GGMLQuantizationType.Q8_0}
    path = write_tiny_gguf(tmp_path / "gemma.gguf", "gemma3", weights, GEMMA3_ARGS, tensor_types=types, tokenizer="llama")

    loaded = read_gguf(path, dtype=dtype)

    assert loaded.weights["model.norm.weight"].dtype == mx.bfloat16
    assert loaded.weights["model.embed_tokens.scales"].dtype == mx.bfloat16
    assert loaded.weights["model.embed_tokens.biases"].dtype == mx.bfloat16
    assert loaded.config["quantization"]["bits"] == bits


@pytest.mark.parametrize("dtype, expected", [("float32", mx.float32), ("float16", mx.float16)])
def test_float_dtypes(tmp_path, dtype, expected):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "mixed.gguf", "llama", weights, LLAMA_ARGS, tensor_types=quantized_llama_types(weights))

    loaded = read_gguf(path, dtype=dtype)

    assert "quantization" not in loaded.config
    assert {value.dtype for value in loaded.weights.values()} == {expected}


# ---------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_level_digits_split(tiny_llama):
    path, _ = tiny_llama
    tokens, _ = byte_level_vocab()

    tokenizer, config = read_gguf_tokenizer(path)

    assert tokenizer.encode("2024").ids == [tokens.index(digit) for digit in "2024"]
    assert tokenizer.encode(" the cat").ids == [tokens.index("Ġthe"), tokens.index("Ġcat")]
    assert tokenizer.encode("<|im_start|>in").ids == [1, tokens.index("in")]
    assert config["add_bos_token"] is False


def test_byte_level_gpt2_pre_keeps_numbers(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "gpt2.gguf", "llama", weights, LLAMA_ARGS, pre="gpt2")

    tokenizer, _ = read_gguf_tokenizer(path)

    assert tokenizer.pre_tokenizer.pre_tokenize_str("a 2024")[1][0] == "Ġ2024"


@pytest.mark.parametrize("add_space_prefix", [False, True])
def test_spm_matches_sentencepiece(tmp_path, add_space_prefix):
    weights = hf_weights("gemma3_text", GEMMA3_ARGS, vocab_size("llama"))
    path = write_tiny_gguf(tmp_path / "spm.gguf", "gemma3", weights, GEMMA3_ARGS, tokenizer="llama", add_space_prefix=add_space_prefix)
    tokens, scores, types = spm_vocab()
    reference = sentencepiece_reference(tokens, scores, types, unk_id=3, add_dummy_prefix=add_space_prefix)
    texts = ["the cat sat on the mat", "two  spaces  ", "the inner inn.\nThe end", "ünï → 字", "Tx", "trail "]
    if not add_space_prefix:
        # With the prefix space, leading spaces split differently: see the NOTE in _sentencepiece_bpe.
        texts += [" lead", "  leading user-defined token"]

    tokenizer, _ = read_gguf_tokenizer(path)

    for text in texts:
        ids = tokenizer.encode(text, add_special_tokens=False).ids
        assert ids == reference.encode(text), text
        assert tokenizer.decode(ids) == text, text


def test_spm_adds_bos(tiny_gemma3):
    path, _ = tiny_gemma3

    tokenizer, config = read_gguf_tokenizer(path)

    assert tokenizer.encode("the cat").ids[0] == 2
    assert config["add_bos_token"] is True
    assert config["bos_token"] == "<bos>"


def test_spm_control_tokens_match(tiny_gemma3):
    path, _ = tiny_gemma3
    tokens, _, _ = spm_vocab()

    tokenizer, _ = read_gguf_tokenizer(path)

    ids = tokenizer.encode("<start_of_turn>the<end_of_turn>", add_special_tokens=False).ids
    assert ids == [tokens.index("<start_of_turn>"), tokens.index("t"), tokens.index("he"), tokens.index("<end_of_turn>")]


def test_spm_merges_rank_by_score():
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    scores = [-10.0, -11.0, -12.0, -2.0, -1.0, -3.0]
    types = [convert.TOKEN_NORMAL] * 6

    merges = convert.sentencepiece_merges(tokens, scores, types)

    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


# ---------------------------------------------------------------------------------------------
# Folder output


def test_folder_opens_with_mlx_lm(tiny_gemma3, tmp_path):
    path, _ = tiny_gemma3
    ids = token_ids(20, vocab_size("llama"))

    folder = convert_gguf(path, tmp_path / "gemma", dtype="float32")
    model, tokenizer = mlx_lm.load(str(folder))

    assert sorted(item.name for item in folder.iterdir()) == [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    np.testing.assert_array_equal(logits_of(model, ids), logits_of(model_from_gguf(read_gguf(path, dtype="float32")), ids))
    assert tokenizer.encode("the cat")[0] == 2
    assert mx.load(str(folder / "model.safetensors"), return_metadata=True)[1] == {"format": "mlx"}


def test_existing_output_needs_force(tiny_llama, tmp_path):
    path, _ = tiny_llama
    out = convert_gguf(path, tmp_path / "out", dtype="float32")

    with pytest.raises(UserError, match="already contains a model; pass --force"):
        convert_gguf(path, out, dtype="native")


def test_force_replaces_output(tiny_llama, tmp_path):
    path, _ = tiny_llama
    out = convert_gguf(path, tmp_path / "out", dtype="float32")

    convert_gguf(path, out, dtype="q8", overwrite=True)

    assert json.loads((out / "config.json").read_text())["quantization"]["bits"] == 8
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out", "tiny-llama.gguf"]


def test_nonempty_folder_rejected(tiny_llama, tmp_path):
    path, _ = tiny_llama
    out = tmp_path / "notes"
    out.mkdir()
    (out / "todo.txt").write_text("keep")

    with pytest.raises(UserError, match="is not empty and contains no config.json"):
        convert_gguf(path, out, dtype="float32", overwrite=True)
    assert (out / "todo.txt").read_text() == "keep"


def test_write_failure_leaves_nothing(tiny_llama, tmp_path, monkeypatch):
    path, _ = tiny_llama

    def fail(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(convert.mx, "save_safetensors", fail)
    with pytest.raises(OSError, match="No space left"):
        convert_gguf(path, tmp_path / "out", dtype="float32")

    assert sorted(item.name for item in tmp_path.iterdir()) == ["tiny-llama.gguf"]


def test_write_failure_keeps_old_model(tiny_llama, tmp_path, monkeypatch):
    path, _ = tiny_llama
    out = convert_gguf(path, tmp_path / "out", dtype="float32")
    before = (out / "config.json").read_text()

    monkeypatch.setattr(convert.mx, "save_safetensors", lambda *args, **kwargs: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        convert_gguf(path, out, dtype="q4", overwrite=True)

    assert (out / "config.json").read_text() == before
    assert sorted(item.name for item in tmp_path.iterdir()) == ["out", "tiny-llama.gguf"]


# ---------------------------------------------------------------------------------------------
# Bad input


def test_missing_file(tmp_path):
    with pytest.raises(UserError, match=r"GGUF file .*missing\.gguf not found"):
        read_gguf(tmp_path / "missing.gguf")


def test_directory_rejected(tmp_path):
    with pytest.raises(UserError, match="is not a file"):
        read_gguf(tmp_path)


def test_not_gguf(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("{}")

    with pytest.raises(UserError, match="is not a GGUF file"):
        read_gguf(path)


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.5, 0.9, 0.999])
def test_truncated_file(tiny_llama, tmp_path, fraction):
    path, _ = tiny_llama
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: max(5, int(len(data) * fraction))])

    with pytest.raises(UserError, match="truncated or corrupt"):
        convert_gguf(cut, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert sorted(item.name for item in tmp_path.iterdir()) == ["cut.gguf", "tiny-llama.gguf"]


def test_unsupported_architecture(tmp_path):
    path = tmp_path / "phi.gguf"
    writer = gguf.GGUFWriter(path, "phi3")
    writer.add_block_count(1)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with pytest.raises(UserError, match=r"unsupported architecture 'phi3' .*; supported: llama, gemma3"):
        read_gguf(path)


def test_unknown_tensor_rejected(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    extra = {"rope_freqs.weight": np.ones(8, dtype=np.float32)}
    path = write_tiny_gguf(tmp_path / "extra.gguf", "llama", weights, LLAMA_ARGS, extra_tensors=extra)

    with pytest.raises(UserError, match="contains the tensor rope_freqs.weight"):
        read_gguf(path)


def test_unknown_pre_tokenizer(tmp_path):
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    path = write_tiny_gguf(tmp_path / "pre.gguf", "llama", weights, LLAMA_ARGS, pre="qwen2")

    with pytest.raises(UserError, match="pre-tokenizer 'qwen2'"):
        read_gguf(path)


def remove_key(key: str) -> Callable[[gguf.GGUFWriter], None]:
    def customize(writer: gguf.GGUFWriter) -> None:
        del writer.kv_data[0][key]

    return customize


def write_llama_with(tmp_path: Path, customize: Callable[[gguf.GGUFWriter], None], **kwargs) -> Path:
    weights = hf_weights("llama", LLAMA_ARGS, vocab_size("gpt2"))
    return write_tiny_gguf(tmp_path / "custom.gguf", "llama", weights, LLAMA_ARGS, customize=customize, **kwargs)


def write_gemma3_with(tmp_path: Path, customize: Callable[[gguf.GGUFWriter], None]) -> Path:
    weights = hf_weights("gemma3_text", GEMMA3_ARGS, vocab_size("llama"))
    return write_tiny_gguf(tmp_path / "custom.gguf", "gemma3", weights, GEMMA3_ARGS, tokenizer="llama", customize=customize)


def test_missing_metadata_key(tmp_path):
    path = write_llama_with(tmp_path, remove_key("llama.embedding_length"))

    with pytest.raises(UserError, match="lacks the metadata key llama.embedding_length"):
        read_gguf(path)


def test_per_layer_kv_heads_rejected(tmp_path):
    def customize(writer):
        del writer.kv_data[0]["llama.attention.head_count_kv"]
        writer.add_array("llama.attention.head_count_kv", [2, 1])

    path = write_llama_with(tmp_path, customize)

    with pytest.raises(UserError, match=r"llama.attention.head_count_kv .* varies per layer \(\[2, 1\]\)"):
        read_gguf(path)


def test_partial_rope_rejected(tmp_path):
    def customize(writer):
        del writer.kv_data[0]["llama.rope.dimension_count"]
        writer.add_rope_dimension_count(8)

    path = write_llama_with(tmp_path, customize)

    with pytest.raises(UserError, match="rotates 8 of 16 head dimensions"):
        read_gguf(path)


def test_rope_scaling_linear(tmp_path):
    def customize(writer):
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)

    path = write_llama_with(tmp_path, customize)

    assert read_gguf(path, dtype="float32").config["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}


def test_rope_scaling_yarn_rejected(tmp_path):
    path = write_llama_with(tmp_path, lambda writer: writer.add_rope_scaling_type(gguf.RopeScalingType.YARN))

    with pytest.raises(UserError, match="RoPE scaling 'yarn'"):
        read_gguf(path)


def test_gemma3_pattern_from_metadata(tmp_path):
    pattern = [(layer + 1) % 3 != 0 for layer in range(GEMMA3_ARGS["num_hidden_layers"])]
    path = write_gemma3_with(tmp_path, lambda writer: writer.add_sliding_window_pattern(pattern))

    assert read_gguf(path, dtype="float32").config["sliding_window_pattern"] == 3


def test_gemma3_irregular_pattern_rejected(tmp_path):
    pattern = [True, False, True, True, False, True, True]
    path = write_gemma3_with(tmp_path, lambda writer: writer.add_sliding_window_pattern(pattern))

    with pytest.raises(UserError, match="irregular sliding-window layer pattern"):
        read_gguf(path)


def test_gemma3_softcapping_rejected(tmp_path):
    path = write_gemma3_with(tmp_path, lambda writer: writer.add_final_logit_softcapping(30.0))

    with pytest.raises(UserError, match="final logit softcapping 30.0"):
        read_gguf(path)


def test_unknown_tokenizer_model(tmp_path):
    def customize(writer):
        del writer.kv_data[0]["tokenizer.ggml.model"]
        writer.add_tokenizer_model("bert")

    path = write_llama_with(tmp_path, customize)

    with pytest.raises(UserError, match="tokenizer model 'bert'.*supported: gpt2, llama"):
        read_gguf(path)


def test_malformed_merge_rejected(tmp_path):
    def customize(writer):
        del writer.kv_data[0]["tokenizer.ggml.merges"]
        writer.add_token_merges(["Ġ t h"])

    path = write_llama_with(tmp_path, customize)

    with pytest.raises(UserError, match="malformed merge 'Ġ t h'"):
        read_gguf(path)


def test_score_count_mismatch(tmp_path):
    def customize(writer):
        del writer.kv_data[0]["tokenizer.ggml.scores"]
        writer.add_token_scores([0.0, 1.0])

    path = write_gemma3_with(tmp_path, customize)

    with pytest.raises(UserError, match=r"has 2 token scores for \d+ tokens"):
        read_gguf(path)


def test_output_is_file(tiny_llama, tmp_path):
    path, _ = tiny_llama
    (tmp_path / "taken").write_text("x")

    with pytest.raises(UserError, match="exists and is not a folder"):
        convert_gguf(path, tmp_path / "taken")


def test_bad_dtype(tiny_llama, tmp_path):
    path, _ = tiny_llama

    with pytest.raises(UserError, match="invalid dtype 'int3'; use one of native, float32, float16, q4, q8"):
        read_gguf(path, dtype="int3")
    with pytest.raises(UserError, match="invalid dtype 'int3'"):
        convert_gguf(path, tmp_path / "out", dtype="int3")
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Command line


def run_cli(argv: list[str]) -> int:
    with pytest.raises(SystemExit) as exit_info:
        run_command(convert.main, argv)
    return exit_info.value.code


def test_cli_converts(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama

    code = run_cli(["--gguf", str(path), "-o", str(tmp_path / "cli"), "--dtype", "q4"])

    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "cli")
    assert json.loads((tmp_path / "cli" / "config.json").read_text())["quantization"]["bits"] == 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--gguf", "missing.gguf", "-o", "out"], "error: GGUF file missing.gguf not found"),
        (["--alias", "llama-9000", "--dtype", "q4"], "error: unknown model alias 'llama-9000'"),
        (["--gguf", "x.gguf", "--dtype", "int3"], "argument --dtype: invalid choice: 'int3'"),
        (["-o", "out"], "one of the arguments --gguf --alias is required"),
    ],
)
def test_cli_errors(tmp_path, monkeypatch, capsys, argv, message):
    monkeypatch.chdir(tmp_path)

    code = run_cli(argv)

    err = capsys.readouterr().err
    assert code == 2
    assert message in err
    assert len(err.strip().splitlines()) == 1
    assert list(tmp_path.iterdir()) == []


def test_cli_existing_output(tiny_llama, tmp_path, capsys):
    path, _ = tiny_llama
    convert_gguf(path, tmp_path / "out", dtype="float32")

    code = run_cli(["--gguf", str(path), "-o", str(tmp_path / "out")])

    assert code == 2
    assert "already contains a model; pass --force" in capsys.readouterr().err


def test_cli_process_has_no_traceback(tmp_path):
    corrupt = tmp_path / "corrupt.gguf"
    corrupt.write_bytes(b"GGUF" + b"\xff" * 40)

    result = subprocess.run(
        [sys.executable, "-m", "mlx_sparse.convert", "--gguf", str(corrupt), "-o", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=120,
    )

    assert result.returncode == 2
    assert result.stderr.startswith("error: ")
    assert "truncated or corrupt" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------------------------
# Real models


def _real_gguf(alias: str) -> Path:
    package = ALIASES[alias].package
    if importlib.util.find_spec(package) is None:
        pytest.skip(f"model package {package} is not installed")
    return ALIASES[alias].gguf_path()


@pytest.fixture(scope="module")
def smollm2_path() -> Path:
    return _real_gguf("smollm2-135m")


@pytest.fixture(scope="module")
def smollm2_native(smollm2_path) -> GGUFModel:
    return read_gguf(smollm2_path, dtype="native")


@pytest.fixture(scope="module")
def gemma3_path() -> Path:
    return _real_gguf("gemma3-270m")


@pytest.fixture(scope="module")
def gemma3_float32(gemma3_path) -> GGUFModel:
    return read_gguf(gemma3_path, dtype="float32")


@pytest.fixture(scope="module")
def gemma3_reader(gemma3_path) -> gguf.GGUFReader:
    return gguf.GGUFReader(gemma3_path)


def wikitext_lines(count: int) -> list[str]:
    lines = WIKITEXT_TEST.read_text(encoding="utf-8").split("\n")
    return [line for line in lines if line.strip()][:count]


@pytest.mark.real_model
def test_smollm2_token_ids(smollm2_native):
    tokenizer = smollm2_native.tokenizer

    assert tokenizer.encode("Hello, world!").ids == [19556, 28, 905, 17]
    assert tokenizer.encode("2024").ids == [34, 32, 34, 36]
    assert tokenizer.encode("<|im_start|>user\nHi<|im_end|>").ids == [1, 4093, 198, 26843, 2]
    assert tokenizer.encode(" = Robert Boulter =").ids == [446, 6356, 389, 9226, 352, 446]


@pytest.mark.real_model
def test_smollm2_round_trip(smollm2_native):
    tokenizer = smollm2_native.tokenizer

    for line in wikitext_lines(500):
        assert tokenizer.decode(tokenizer.encode(line).ids) == line


@pytest.mark.real_model
def test_smollm2_native_config(smollm2_native):
    config = smollm2_native.config

    assert config["quantization"] == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    assert config["rope_traditional"] is True
    assert config["num_hidden_layers"] == 30
    assert smollm2_native.tokenizer_config["add_bos_token"] is False


@pytest.mark.real_model
def test_smollm2_folder_logits(smollm2_path, smollm2_native, tmp_path):
    ids = smollm2_native.tokenizer.encode(" ".join(wikitext_lines(3))).ids[:48]

    folder = convert_gguf(smollm2_path, tmp_path / "smollm2", dtype="float32")
    model, tokenizer = mlx_lm.load(str(folder))
    in_memory = model_from_gguf(read_gguf(smollm2_path, dtype="float32"))

    assert tokenizer.encode("Hello, world!") == [19556, 28, 905, 17]
    folder_logits = logits_of(model, ids)
    np.testing.assert_array_equal(folder_logits, logits_of(in_memory, ids))
    nll = nn.losses.cross_entropy(mx.array(folder_logits[0, :-1]), mx.array(ids[1:])).mean().item()
    assert math.exp(nll) < 200


@pytest.mark.real_model
def test_smollm2_native_weights_match_dense(smollm2_native, smollm2_path):
    reader = gguf.GGUFReader(smollm2_path)
    tensor = next(item for item in reader.tensors if item.name == "blk.3.ffn_down.weight")
    weights = smollm2_native.weights
    name = "model.layers.3.mlp.down_proj"

    dequantized = mx.dequantize(weights[f"{name}.weight"], weights[f"{name}.scales"], weights[f"{name}.biases"], group_size=32, bits=4)

    np.testing.assert_allclose(np.array(dequantized.astype(mx.float32)), convert.dequantize_tensor(tensor), atol=2e-3, rtol=1e-3)


@pytest.mark.real_model
def test_gemma3_matches_sentencepiece(gemma3_reader, gemma3_float32):
    fields = gemma3_reader.fields
    reference = sentencepiece_reference(
        fields["tokenizer.ggml.tokens"].contents(),
        fields["tokenizer.ggml.scores"].contents(),
        fields["tokenizer.ggml.token_type"].contents(),
        unk_id=3,
        add_dummy_prefix=False,
    )
    tokenizer = gemma3_float32.tokenizer

    for line in wikitext_lines(1500) + ["  two  spaces\t\ttabs", "émoji 🤽 and 𝔹", "a\n\n\nb"]:
        ids = tokenizer.encode(line, add_special_tokens=False).ids
        assert ids == reference.encode(line), line
        assert tokenizer.decode(ids) == line, line


@pytest.mark.real_model
def test_gemma3_token_ids(gemma3_float32):
    tokenizer = gemma3_float32.tokenizer

    assert tokenizer.encode("<start_of_turn>user\nHi<end_of_turn>", add_special_tokens=False).ids == [105, 2364, 107, 10979, 106]
    assert tokenizer.encode("Hello").ids[0] == 2
    assert gemma3_float32.tokenizer_config["add_bos_token"] is True


@pytest.mark.real_model
def test_gemma3_norms_and_loss(gemma3_float32, gemma3_reader):
    stored = next(item for item in gemma3_reader.tensors if item.name == "output_norm.weight")
    model = model_from_gguf(gemma3_float32)
    ids = gemma3_float32.tokenizer.encode(" ".join(wikitext_lines(3))).ids[:48]

    logits = logits_of(model, ids)

    np.testing.assert_allclose(np.array(gemma3_float32.weights["model.norm.weight"]), convert.dequantize_tensor(stored) - 1.0, atol=1e-6)
    assert gemma3_float32.config["sliding_window_pattern"] == 6
    nll = nn.losses.cross_entropy(mx.array(logits[0, :-1]), mx.array(ids[1:])).mean().item()
    assert math.exp(nll) < 200


@pytest.mark.real_model
def test_alias_converts_into_store(tmp_path, monkeypatch, capsys):
    _real_gguf("smollm2-135m-q4")
    monkeypatch.setenv("MLX_SPARSE_MODELS_DIR", str(tmp_path))

    code = run_cli(["--alias", "smollm2-135m-q4"])

    assert code == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == str(tmp_path / "smollm2-135m-q4")
    assert json.loads((tmp_path / "smollm2-135m-q4" / "config.json").read_text())["quantization"]["bits"] == 4
