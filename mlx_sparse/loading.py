"""Load a model and tokenizer from an alias, an mlx-lm folder, a .gguf file or a hub id."""

from __future__ import annotations

import glob
import json
import logging
import tempfile
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tokenizer_utils import TokenizerWrapper
from mlx_lm.utils import load_tokenizer

from .aliases import ALIASES, ensure_alias
from .errors import UserError
from .models import get_architecture

logger = logging.getLogger(__name__)

FLOAT_DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def build_model(config: dict, weights: dict[str, mx.array]) -> nn.Module:
    """Instantiate the port for `config` and load `weights`, quantizing modules as mlx-lm does."""
    architecture = get_architecture(config.get("model_type"))
    args = architecture.ModelArgs.from_dict(config)
    model = architecture.Model(args)
    weights = model.sanitize(weights)

    quantization = config.get("quantization")
    if quantization is not None:

        def quantize_predicate(path: str, module: nn.Module):
            if path in quantization:
                return quantization[path]
            return hasattr(module, "to_quantized") and f"{path}.scales" in weights

        nn.quantize(
            model,
            group_size=quantization["group_size"],
            bits=quantization["bits"],
            mode=quantization.get("mode", "affine"),
            class_predicate=quantize_predicate,
        )

    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as exc:
        raise UserError(f"weights do not match the {config.get('model_type')} config: {exc}") from exc
    mx.eval(model.parameters())
    model.eval()
    return model


def cast_model(model: nn.Module, dtype: str) -> None:
    """Cast the floating-point parameters of `model` to `dtype`; quantized weights stay packed."""
    if dtype not in FLOAT_DTYPES:
        raise UserError(f"invalid dtype {dtype!r}; use one of {', '.join(FLOAT_DTYPES)}")
    target = FLOAT_DTYPES[dtype]

    def cast(value):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(target)
        return value

    model.update(tree_map(cast, model.parameters()))
    mx.eval(model.parameters())


def resolve_spec(spec: str) -> tuple[str, Path]:
    """Turn a model spec into (kind, path), where kind is "folder" or "gguf"; downloads hub ids."""
    if spec in ALIASES:
        return "folder", ensure_alias(spec)

    path = Path(spec).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {spec} not found; check the path")
        return "gguf", path
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"model folder {spec} has no config.json; convert a model into it with python -m mlx_sparse.convert")
        return "folder", path
    if path.exists():
        raise UserError(f"model {spec} is neither a folder nor a .gguf file; pass an mlx-lm folder, a .gguf file, a hub id or one of {', '.join(ALIASES)}")

    looks_like_hub_id = spec.count("/") == 1 and not spec.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise UserError(f"model {spec!r} not found; pass an mlx-lm folder, a .gguf file, a hub id (org/name) or one of {', '.join(ALIASES)}")
    return "folder", download_from_hub(spec)


def download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    patterns = ["*.json", "model*.safetensors", "tokenizer.model", "*.txt", "*.jinja"]
    try:
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError, ValueError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(
            f"could not download hub model {repo_id!r} ({first_line}); check the id and the network, or pass a local folder or alias"
        ) from exc


def load_folder(folder: Path) -> tuple[dict, nn.Module]:
    try:
        config = json.loads((folder / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON in {folder / 'config.json'}: {exc}; reconvert the model") from exc

    weight_files = sorted(glob.glob(str(folder / "model*.safetensors")))
    if not weight_files:
        raise UserError(f"no model*.safetensors in {folder}; convert a model into it with python -m mlx_sparse.convert")
    weights: dict[str, mx.array] = {}
    for weight_file in weight_files:
        weights.update(mx.load(weight_file))
    return config, build_model(config, weights)


def load_gguf(path: Path) -> tuple[dict, nn.Module, TokenizerWrapper]:
    """Load a .gguf file in memory: MLX-quantized as stored on a GPU, dequantised to float32 on a CPU.

    MLX 0.32's CPU quantized and half-precision matmuls are slow (a 9-token SmolLM2-135M forward
    pass took 76 s in 4-bit against well under a second in float32 on 2 x86 cores), so a CPU run
    dequantises. Both give the same perplexity to 0.1%.
    """
    from .convert import read_gguf, write_tokenizer_files

    on_cpu = mx.default_device() == mx.cpu
    gguf_dtype = "float32" if on_cpu else "native"
    logger.info("Reading %s with %s weights", path.name, gguf_dtype)
    gguf_model = read_gguf(path, dtype=gguf_dtype)
    model = build_model(gguf_model.config, gguf_model.weights)

    # mlx-lm builds its tokenizer wrapper from files, so the rebuilt tokenizer goes through a
    # temporary folder.
    with tempfile.TemporaryDirectory(prefix="mlx_sparse_tok_") as tmp:
        write_tokenizer_files(gguf_model, Path(tmp))
        tokenizer = load_tokenizer(Path(tmp))
    return gguf_model.config, model, tokenizer


def load(spec: str, dtype: str | None = None) -> tuple[nn.Module, TokenizerWrapper]:
    """Load `(model, tokenizer)` from an alias, an mlx-lm folder, a .gguf file or a hub id.

    `dtype` casts the floating-point parameters (float32, float16 or bfloat16). The model gets a
    `model_id` attribute (the alias, folder name, file name or hub id) that sparsity configs record.
    """
    kind, path = resolve_spec(spec)
    if kind == "gguf":
        config, model, tokenizer = load_gguf(path)
    else:
        config, model = load_folder(path)
        tokenizer = load_tokenizer(path)

    if dtype is not None:
        cast_model(model, dtype)

    model.model_id = spec if spec in ALIASES else (path.name if kind == "gguf" or Path(spec).exists() else spec)
    model.config = config
    n_params = sum(value.size for _, value in tree_flatten(model.parameters()))
    logger.info("Loaded %s (%s, %d layers, %.1fM stored values)", model.model_id, config["model_type"], len(model.layers), n_params / 1e6)
    return model, tokenizer
