"""Neuron grouping for block sparsity: permute each FFN's neurons so that co-active ones share a block.

    python -m mlx_sparse.group --model smollm2-135m --data wikitext2:valid -o models/smollm2-135m-grouped

Block sparsity zeroes a block of `block_size` consecutive intermediate neurons when its RMS,
relative to the token's RMS, is below the layer threshold (see `mlx_sparse.kernels.scores`). A
block that mixes large and small values is either kept whole or dropped whole, so the order of
the neurons decides how much of the site's energy the rule keeps. Permuting the rows of gate_proj
and up_proj and the columns of down_proj with the same permutation leaves the FFN's output
unchanged and only moves neurons between blocks.

The statistics are relative magnitudes |v| / rms(v) of the site values (`down_in` or `gate_act`)
at a fixed-size random sample of tokens per layer, so memory does not grow with the amount of
text. Methods, all deterministic for a given sample:

- `magnitude`: sort neurons by mean energy share (v**2 / sum(v**2)) and cut the order into blocks.
  Often-large neurons share blocks that the threshold keeps, rarely-large ones share blocks it drops.
- `coact`: greedy balanced clustering by co-activation. A neuron is active at a token when it is
  among the token's largest 20% by energy. Each block starts from the unassigned neuron with the
  largest mean energy and grows by the neuron whose active pattern over tokens has the largest
  summed cosine similarity to the patterns of the block's members.
- `energy`: starts from `coact` and then maximizes the energy that the block rule keeps on the
  sample at the `target` block sparsity. It alternates between marking the (token, block) pairs
  above the layer's quantile threshold and swapping neurons between blocks to raise the energy
  inside the marked pairs. For a fixed number of marked pairs, neither step lowers the energy
  they contain.

Blocks are ordered by mean energy (largest first), and neurons inside a block likewise.

Calibrate the block thresholds on other text than the grouping read (for example group with
`--skip-windows 16` and calibrate on the first 16 windows). Grouping concentrates the energy of
the tokens it saw, so thresholds calibrated on the same tokens are lower than held-out tokens
need. On SmolLM2-135M at a 0.5 block target, WikiText-2 test sparsity was 0.464 with grouping and
calibration on the same 16 valid windows and 0.480 on different ones (benchmarks/group.py).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from .cli import ArgumentParser, run_command, setup_logging, staging_folder
from .data import TokenWindows, load_text, load_windows
from .errors import UserError
from .models import MLP
from .progress import progress_bar

logger = logging.getLogger(__name__)

METHODS = ("energy", "coact", "magnitude")
DEFAULT_METHOD = "energy"
GROUP_SITES = ("down_in", "gate_act")
DEFAULT_SAMPLE_TOKENS = 8192
# Share of a token's neurons that `coact` counts as active. Of 10%, 20%, 30% and 50%, 20% kept the
# most held-out energy in blocks on SmolLM2-135M layers 5 and 15 and tied with 10% on layer 25
# (WikiText-2 valid).
ACTIVE_FRACTION = 0.2
CONFIG_KEY = "mlx_sparse_grouping"
GROUPING_FILE = "grouping.json"

# Tokenizer and generation files that mlx-lm's loaders read from a model folder.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
    "tokenizer.model", "added_tokens.json", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json",
)


# ---------------------------------------------------------------------------------------------
# Checks


def check_options(
    block_size: int = 32, site: str = "down_in", method: str = DEFAULT_METHOD, target: float = 0.5, max_tokens: int = DEFAULT_SAMPLE_TOKENS
) -> None:
    """Raise `UserError` for a grouping option that no model can accept."""
    if site not in GROUP_SITES:
        raise UserError(f"unknown grouping site {site!r}; use one of {', '.join(GROUP_SITES)}")
    if method not in METHODS:
        raise UserError(f"unknown grouping method {method!r}; use one of {', '.join(METHODS)}")
    if block_size < 1:
        raise UserError(f"invalid block size {block_size}; use a positive divisor of the intermediate size, such as 32")
    if not 0.0 < target < 1.0:
        raise UserError(f"invalid grouping target {target}; use the block sparsity to optimize for, a fraction in (0, 1) such as 0.5")
    if max_tokens < 1:
        raise UserError(f"invalid sample size {max_tokens}; use a positive number of tokens such as {DEFAULT_SAMPLE_TOKENS}")


def check_block_size(block_size: int, intermediate_size: int) -> None:
    if block_size < 1 or intermediate_size % block_size:
        raise UserError(
            f"block size {block_size} does not divide the intermediate size {intermediate_size}; use a divisor such as 32"
        )


def dense_ffns(model: nn.Module) -> list[MLP]:
    """Return each layer's FFN, or raise `UserError` when a layer's FFN is wrapped (sparsified)."""
    ffns = []
    for index, layer in enumerate(model.layers):
        if not isinstance(layer.mlp, MLP):
            raise UserError(
                f"layer {index} FFN is a {type(layer.mlp).__name__}, not a dense MLP; group the dense model "
                "(call mlx_sparse.sparsity.unsparsify first)"
            )
        ffns.append(layer.mlp)
    return ffns


def check_output_folder(out_dir: str | os.PathLike, overwrite: bool) -> Path:
    """Return `out_dir` as a Path, or raise `UserError` when writing there would destroy something."""
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"output {out_dir} exists and is not a folder; pass a new folder path with -o")
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return out_dir
    if not overwrite:
        raise UserError(f"output folder {out_dir} is not empty; pass a new folder with -o, or --overwrite to replace a model folder")
    if not (out_dir / "config.json").is_file():
        raise UserError(f"output folder {out_dir} is not empty and contains no config.json, so it is not replaced; pass a new folder with -o")
    return out_dir


# ---------------------------------------------------------------------------------------------
# Statistics


class _SiteRecorder(nn.Module):
    """Dense FFN that also hands the site values of the sampled tokens to a callback."""

    def __init__(self, mlp: MLP, site: str, record):
        super().__init__()
        self.mlp = mlp
        self.site = site
        self.record = record

    def __call__(self, x: mx.array) -> mx.array:
        mlp = self.mlp
        activated = mlp.activation(mlp.gate_proj(x))
        down_in = activated * mlp.up_proj(x)
        self.record(activated if self.site == "gate_act" else down_in)
        return mlp.down_proj(down_in)


def relative_magnitudes(values: mx.array) -> mx.array:
    """Return |v| / rms(v) per row in float32: the per-token scale that block scores divide out."""
    values = values.astype(mx.float32)
    rms = mx.sqrt(mx.mean(mx.square(values), axis=-1, keepdims=True))
    return mx.abs(values) / mx.maximum(rms, 1e-30)


def collect_samples(
    model: nn.Module, windows: TokenWindows, site: str = "down_in", max_tokens: int = DEFAULT_SAMPLE_TOKENS, seed: int = 0
) -> list[np.ndarray]:
    """Return per layer the relative site magnitudes [tokens, intermediate] (float16) at sampled tokens.

    At most `max_tokens` token positions are drawn without replacement from all windows with a
    generator seeded by `seed`, the same positions for every layer. The samples take
    layers x tokens x intermediate size x 2 bytes: 755 MB for SmolLM2-135M at 8192 tokens.
    """
    check_options(site=site, max_tokens=max_tokens)
    ffns = dense_ffns(model)
    width = ffns[0].gate_proj.weight.shape[0]
    total = windows.count * windows.ctx
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(total, size=min(max_tokens, total), replace=False))
    samples = [np.empty((chosen.size, width), dtype=np.float16) for _ in ffns]

    pending: list[mx.array | None] = [None] * len(ffns)
    positions = mx.array(np.zeros(0, dtype=np.int32))

    def make_record(layer: int):
        def record(values: mx.array) -> None:
            rows = values.reshape(-1, values.shape[-1])[positions]
            pending[layer] = relative_magnitudes(rows)

        return record

    for layer, (block, mlp) in enumerate(zip(model.layers, ffns)):
        block.mlp = _SiteRecorder(mlp, site, make_record(layer))
    try:
        filled = 0
        with progress_bar() as progress:
            task = progress.add_task("co-activation statistics", total=windows.count)
            for index in range(windows.count):
                start = index * windows.ctx
                local = chosen[(chosen >= start) & (chosen < start + windows.ctx)] - start
                if local.size:
                    positions = mx.array(local.astype(np.int32))
                    logits = model(windows.windows[index : index + 1])
                    mx.eval(logits, *pending)
                    for layer, rows in enumerate(pending):
                        samples[layer][filled : filled + local.size] = np.asarray(rows, dtype=np.float32)
                    filled += local.size
                progress.update(task, advance=1)
    finally:
        for block, mlp in zip(model.layers, ffns):
            block.mlp = mlp
    logger.info("Sampled %s site values of %d of %d tokens in %d layers", site, chosen.size, total, len(ffns))
    return samples


# ---------------------------------------------------------------------------------------------
# Grouping


def energy_shares(magnitudes: np.ndarray) -> np.ndarray:
    """Return v**2 / sum(v**2) per token in float32, from relative magnitudes |v| / rms(v)."""
    energy = np.square(magnitudes.astype(np.float32))
    return energy / np.maximum(energy.sum(axis=1, keepdims=True), 1e-30)


def block_members(assignment: np.ndarray, block_size: int) -> np.ndarray:
    """Return the neuron indices of every block [blocks, block_size] for a balanced assignment."""
    return np.argsort(assignment, kind="stable").reshape(-1, block_size)


def improve_assignment(score: np.ndarray, assignment: np.ndarray, block_size: int, max_rounds: int = 100) -> np.ndarray:
    """Swap neurons between blocks to raise sum(score[i, assignment[i]]), keeping every block full.

    Each round pairs up blocks greedily by the gain that swapping their members brings. Within a
    pair (a, b), the k-th best candidate of a for b swaps with the k-th best of b for a as long as
    the swap gains. The search stops at a round without a gaining swap (a local optimum for
    swaps) or after `max_rounds`.
    """
    neurons, blocks = score.shape
    assignment = assignment.copy()
    pairs = np.triu_indices(blocks, 1)
    for _ in range(max_rounds):
        current = score[np.arange(neurons), assignment]
        members = block_members(assignment, block_size)

        # move_gain[a, k, b]: gain of moving member k of block a into block b, members sorted by it.
        move_gain = (score - current[:, None])[members]
        order = np.argsort(-move_gain, axis=1, kind="stable")
        sorted_gain = np.take_along_axis(move_gain, order, axis=1)
        swap_gain = sorted_gain + sorted_gain.transpose(2, 1, 0)
        pair_gain = np.where(swap_gain > 0, swap_gain, 0.0).sum(axis=1)[pairs]

        used = np.zeros(blocks, dtype=bool)
        moved = 0
        for pair in np.argsort(-pair_gain, kind="stable"):
            if pair_gain[pair] <= 0:
                break
            a, b = pairs[0][pair], pairs[1][pair]
            if used[a] or used[b]:
                continue
            used[a] = used[b] = True
            count = int((swap_gain[a, :, b] > 0).sum())
            from_a = members[a, order[a, :count, b]]
            from_b = members[b, order[b, :count, a]]
            assignment[from_a] = b
            assignment[from_b] = a
            moved += count
        if moved == 0:
            break
    return assignment


def group_magnitude(shares: np.ndarray, block_size: int) -> np.ndarray:
    order = np.argsort(-shares.mean(axis=0), kind="stable")
    assignment = np.empty(shares.shape[1], dtype=np.int64)
    assignment[order] = np.arange(shares.shape[1]) // block_size
    return assignment


def group_coact(shares: np.ndarray, block_size: int, active_fraction: float = ACTIVE_FRACTION) -> np.ndarray:
    tokens, neurons = shares.shape
    # Co-activation counts of binary patterns: a neuron is active at a token when it is among the
    # token's largest `active_fraction` of neurons by energy. Tokens whose site vector is all
    # zeros have no largest neurons and stay inactive.
    top = max(1, round(active_fraction * neurons))
    largest = np.argpartition(-shares, top - 1, axis=1)[:, :top]
    active = np.zeros((tokens, neurons), dtype=np.float32)
    np.put_along_axis(active, largest, 1.0, axis=1)
    active[shares.sum(axis=1) <= 0] = 0.0
    counts = active.T @ active
    norms = np.sqrt(np.maximum(np.diag(counts), 1.0))
    similarity = counts / norms[:, None] / norms[None, :]
    np.fill_diagonal(similarity, 0.0)

    mean_share = shares.mean(axis=0)
    free = np.ones(neurons, dtype=bool)
    assignment = np.full(neurons, -1, dtype=np.int64)
    for block in range(neurons // block_size):
        seed = int(np.argmax(np.where(free, mean_share, -np.inf)))
        free[seed] = False
        assignment[seed] = block
        affinity = similarity[seed].copy()
        for _ in range(block_size - 1):
            best = int(np.argmax(np.where(free, affinity, -np.inf)))
            free[best] = False
            assignment[best] = block
            affinity += similarity[best]
    return assignment


def kept_energy(shares: np.ndarray, assignment: np.ndarray, target: float) -> tuple[float, np.ndarray]:
    """Return the fraction of energy in blocks at or above the `target` quantile of block energy, and that mask."""
    onehot = np.zeros((shares.shape[1], assignment.max() + 1), dtype=np.float32)
    onehot[np.arange(shares.shape[1]), assignment] = 1.0
    block_energy = shares @ onehot
    threshold = np.quantile(block_energy, target)
    kept = block_energy >= threshold
    return float(block_energy[kept].sum() / max(block_energy.sum(), 1e-30)), kept


def group_energy(shares: np.ndarray, block_size: int, target: float, max_steps: int = 30) -> np.ndarray:
    # A block's relative RMS is a monotone function of its energy share, so the layer quantile of
    # block shares over (token, block) pairs marks the blocks that calibration at `target` keeps.
    assignment = group_coact(shares, block_size)
    start, kept = kept_energy(shares, assignment, target)
    value = start
    for _ in range(max_steps):
        gain = shares.T @ kept.astype(np.float32)
        updated = improve_assignment(gain, assignment, block_size, max_rounds=5)
        if np.array_equal(updated, assignment):
            break
        assignment = updated
        value, kept = kept_energy(shares, assignment, target)
    logger.debug("energy grouping: kept energy on the sample %.4f -> %.4f", start, value)
    return assignment


def order_blocks(shares: np.ndarray, assignment: np.ndarray, block_size: int) -> np.ndarray:
    """Return the permutation that lays the blocks out largest mean energy first, and neurons likewise."""
    mean_share = shares.mean(axis=0)
    members = block_members(assignment, block_size)
    members = np.take_along_axis(members, np.argsort(-mean_share[members], axis=1, kind="stable"), axis=1)
    block_order = np.argsort(-mean_share[members].sum(axis=1), kind="stable")
    return members[block_order].reshape(-1)


def group_layer(magnitudes: np.ndarray, block_size: int = 32, method: str = DEFAULT_METHOD, target: float = 0.5) -> np.ndarray:
    """Return the permutation of one layer's neurons: new neuron k is old neuron `perm[k]`.

    `magnitudes` are the relative site magnitudes [tokens, intermediate] from `collect_samples`.
    """
    check_options(block_size=block_size, method=method, target=target)
    check_block_size(block_size, magnitudes.shape[1])
    shares = energy_shares(magnitudes)
    if method == "magnitude":
        assignment = group_magnitude(shares, block_size)
    elif method == "coact":
        assignment = group_coact(shares, block_size)
    else:
        assignment = group_energy(shares, block_size, target)
    return order_blocks(shares, assignment, block_size)


def group_model(
    model: nn.Module,
    windows: TokenWindows,
    block_size: int = 32,
    site: str = "down_in",
    method: str = DEFAULT_METHOD,
    target: float = 0.5,
    max_tokens: int = DEFAULT_SAMPLE_TOKENS,
    seed: int = 0,
) -> list[np.ndarray]:
    """Return one neuron permutation per layer (int64 arrays) that groups co-active neurons into blocks.

    The model is only read; apply the result with `permute_ffn`.
    """
    check_options(block_size, site, method, target, max_tokens)
    ffns = dense_ffns(model)
    check_block_size(block_size, ffns[0].gate_proj.weight.shape[0])

    samples = collect_samples(model, windows, site, max_tokens, seed)
    permutations = []
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(f"grouping ({method})", total=len(samples))
        for magnitudes in samples:
            permutations.append(group_layer(magnitudes, block_size, method, target))
            progress.update(task, advance=1)
    logger.info("Grouped %d layers into blocks of %d (%s, site %s) in %.1f s", len(samples), block_size, method, site, time.perf_counter() - started)
    return permutations


# ---------------------------------------------------------------------------------------------
# Applying a permutation


def check_permutations(permutations: Sequence, layers: int, width: int) -> list[np.ndarray]:
    if len(permutations) != layers:
        raise UserError(f"got {len(permutations)} permutations for {layers} layers; pass one permutation per layer")
    checked = []
    for layer, permutation in enumerate(permutations):
        permutation = np.asarray(permutation)
        valid = permutation.shape == (width,) and np.issubdtype(permutation.dtype, np.integer)
        if not valid or not np.array_equal(np.sort(permutation), np.arange(width)):
            raise UserError(f"permutation of layer {layer} is not a permutation of 0..{width - 1}; pass each neuron index once")
        checked.append(permutation.astype(np.int64))
    return checked


def check_float_ffns(model: nn.Module) -> None:
    """Raise `UserError` when an FFN projection is quantized, because permuting it would change the model.

    Rows of gate_proj and up_proj could move with their quantization groups, but the columns of
    down_proj cross groups, so down_proj would have to be quantized again. On SmolLM2-135M 4-bit
    (group size 32), re-quantizing a randomly permuted down_proj changed its weights by 8.3%
    (relative Frobenius norm) and the next-token distribution by 0.32 nats of KL divergence on 16
    tokens, which is far from a function-preserving permutation.

    NOTE: the float aliases are dequantized GGUF weights, so quantizing their grouped folder again
    has the same re-quantization error in down_proj. Only weights that were never quantized avoid it.
    """
    for index, mlp in enumerate(dense_ffns(model)):
        if any(isinstance(linear, nn.QuantizedLinear) for linear in (mlp.gate_proj, mlp.up_proj, mlp.down_proj)):
            raise UserError(
                f"layer {index} FFN is quantized, and permuting down_proj columns would re-quantize it; group the float "
                "model (for example smollm2-135m, not smollm2-135m-q4) and quantize the grouped folder afterwards"
            )


def permute_ffn(model: nn.Module, permutations: Sequence) -> None:
    """Permute every layer's intermediate neurons in place: gate_proj/up_proj rows and down_proj columns.

    New neuron k of layer l is old neuron `permutations[l][k]`. The dense model computes the same
    function up to float summation order. Quantized FFNs raise `UserError` (see `check_float_ffns`).
    """
    ffns = dense_ffns(model)
    check_float_ffns(model)
    width = ffns[0].gate_proj.weight.shape[0]
    for mlp, permutation in zip(ffns, check_permutations(permutations, len(ffns), width)):
        index = mx.array(permutation.astype(np.int32))
        mlp.gate_proj.weight = mlp.gate_proj.weight[index]
        mlp.up_proj.weight = mlp.up_proj.weight[index]
        mlp.down_proj.weight = mlp.down_proj.weight[:, index]
        for linear in (mlp.gate_proj, mlp.up_proj):
            if "bias" in linear:
                linear.bias = linear.bias[index]
    mx.eval(model.parameters())


# ---------------------------------------------------------------------------------------------
# Writing the grouped model


def _write_tokenizer(tokenizer_source, folder: Path) -> None:
    if isinstance(tokenizer_source, (str, os.PathLike)):
        source = Path(tokenizer_source)
        if not source.is_dir():
            raise UserError(f"tokenizer source {source} is not a folder; pass the source model folder or its tokenizer")
        copied = [name for name in TOKENIZER_FILES if (source / name).is_file()]
        if not any(name.startswith("tokenizer") for name in copied):
            raise UserError(f"tokenizer source {source} has no tokenizer.json or tokenizer.model; pass the source model folder")
        for name in copied:
            shutil.copy2(source / name, folder / name)
    elif hasattr(tokenizer_source, "save_pretrained"):
        tokenizer_source.save_pretrained(str(folder))
    else:
        raise UserError(f"cannot write a tokenizer from {type(tokenizer_source).__name__}; pass a model folder or the tokenizer from mlx_sparse.load")


def save_grouped(
    model: nn.Module,
    tokenizer_source,
    out_dir: str | os.PathLike,
    info: dict,
    permutations: Sequence | None = None,
    config: dict | None = None,
    overwrite: bool = False,
) -> Path:
    """Write a permuted model as an mlx-lm folder, atomically, and return the folder.

    The folder gets these files:

    - config.json: `config` (default `model.config`, set by `mlx_sparse.load`) with `info` under
      the key "mlx_sparse_grouping".
    - model.safetensors: the weights with mlx-lm parameter names.
    - the tokenizer files, copied from the folder `tokenizer_source` or saved by its `save_pretrained`.
    - grouping.json: `info` and the permutations.

    It is written under a temporary name beside `out_dir` and renamed into place, so a failure
    leaves no partial output. An existing model folder is replaced only when `overwrite` is true.
    """
    from .convert import _replace_folder

    out_dir = check_output_folder(out_dir, overwrite)
    config = config if config is not None else getattr(model, "config", None)
    if not isinstance(config, dict):
        raise UserError("the model has no config dict; load it with mlx_sparse.load or pass config=")
    dense_ffns(model)

    weights = dict(tree_flatten(model.parameters()))
    with staging_folder(out_dir) as staging:
        _write_tokenizer(tokenizer_source, staging)
        full_config = {**config, CONFIG_KEY: info}
        (staging / "config.json").write_text(json.dumps(full_config, indent=2) + "\n", encoding="utf-8")
        # NOTE: one safetensors file, without mlx-lm's 5 GB sharding; fine for the small models here.
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        grouping = {**info, "permutations": [np.asarray(p).astype(int).tolist() for p in permutations or []]}
        (staging / GROUPING_FILE).write_text(json.dumps(grouping) + "\n", encoding="utf-8")

        check_output_folder(out_dir, overwrite)
        _replace_folder(staging, out_dir)
    logger.info("Wrote grouped model to %s", out_dir)
    return out_dir


def grouping_info(
    model: nn.Module, windows: TokenWindows, site: str, method: str, block_size: int, target: float, max_tokens: int, seed: int
) -> dict:
    """Return the record of a grouping run that `save_grouped` stores in config.json and grouping.json."""
    return {
        "source_model": getattr(model, "model_id", None),
        "method": method,
        "site": site,
        "block_size": block_size,
        "target": target,
        "data": windows.source,
        "ctx": windows.ctx,
        "windows": windows.count,
        "sample_tokens": min(max_tokens, windows.count * windows.ctx),
        "seed": seed,
    }


def load_permutations(folder: str | os.PathLike) -> list[np.ndarray]:
    """Read the permutations that `save_grouped` stored in a folder's grouping.json."""
    path = Path(folder) / GROUPING_FILE
    if not path.is_file():
        raise UserError(f"{path} not found; the folder was not written by python -m mlx_sparse.group")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); regroup the model") from exc
    return [np.asarray(permutation, dtype=np.int64) for permutation in data.get("permutations", [])]


# ---------------------------------------------------------------------------------------------
# Command line


def skip_windows(windows: TokenWindows, count: int) -> TokenWindows:
    """Return `windows` without its first `count` windows, or raise `UserError` when none would be left."""
    if count == 0:
        return windows
    if count >= windows.count:
        raise UserError(f"{windows.source} has {windows.count} windows, so skipping {count} leaves none; use a smaller --skip-windows")
    return TokenWindows(source=f"{windows.source} windows {count}-{windows.count - 1}", windows=windows.windows[count:], total_tokens=windows.total_tokens)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m mlx_sparse.group",
        description="Permute FFN neurons so that neurons active together share a block, and write the model folder.",
    )
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--data", default="wikitext2:valid", help="text to group on: wikitext2:valid (default), wikitext2:test or a file")
    parser.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=16, help="windows of --data to group on (default 16)")
    parser.add_argument(
        "--skip-windows", type=int, default=0,
        help="windows to skip at the start of --data, so that grouping reads other text than a calibration on the first windows (default 0)",
    )
    parser.add_argument("--site", default="down_in", help=f"site whose values are grouped: {', '.join(GROUP_SITES)} (default down_in)")
    parser.add_argument("--block-size", type=int, default=32, help="neurons per block (default 32)")
    parser.add_argument("--method", default=DEFAULT_METHOD, help=f"grouping method: {', '.join(METHODS)} (default {DEFAULT_METHOD})")
    parser.add_argument("--target", type=float, default=0.5, help="block sparsity that the energy method optimizes for (default 0.5)")
    parser.add_argument("--sample-tokens", type=int, default=DEFAULT_SAMPLE_TOKENS, help=f"tokens sampled per layer for the statistics (default {DEFAULT_SAMPLE_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token sample (default 0)")
    parser.add_argument("-o", "--output", required=True, help="output model folder")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def check_source_config(spec: str, block_size: int) -> None:
    """Check the block size against a model folder's config.json before the weights are loaded."""
    from .loading import resolve_spec

    kind, path = resolve_spec(spec)
    if kind != "folder":
        return
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise UserError(f"invalid JSON in {path / 'config.json'}: {exc}; reconvert the model") from exc
    if "quantization" in config:
        raise UserError(
            f"model {spec} is quantized, and permuting down_proj columns would re-quantize it; group the float "
            "model (for example smollm2-135m, not smollm2-135m-q4) and quantize the grouped folder afterwards"
        )
    if isinstance(config.get("intermediate_size"), int):
        check_block_size(block_size, config["intermediate_size"])


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_options(args.block_size, args.site, args.method, args.target, args.sample_tokens)
    if args.ctx < 2:
        raise UserError(f"invalid --ctx {args.ctx}; use at least 2 tokens per window, such as 512")
    if args.max_windows < 1:
        raise UserError(f"invalid --max-windows {args.max_windows}; use a positive number of windows")
    if args.skip_windows < 0:
        raise UserError(f"invalid --skip-windows {args.skip_windows}; use a non-negative number of windows")
    if args.seed < 0:
        raise UserError(f"invalid --seed {args.seed}; use a non-negative integer")
    out_dir = check_output_folder(args.output, args.overwrite)
    load_text(args.data, args.data_dir)
    check_source_config(args.model, args.block_size)

    from .blas import log_blas
    from .loading import load, resolve_spec

    log_blas()
    model, tokenizer = load(args.model)
    check_float_ffns(model)
    windows = skip_windows(load_windows(args.data, tokenizer, args.ctx, args.max_windows + args.skip_windows, args.data_dir), args.skip_windows)
    permutations = group_model(model, windows, args.block_size, args.site, args.method, args.target, args.sample_tokens, args.seed)

    probe = windows.windows[:1, : min(32, windows.ctx)]
    before = model(probe)
    permute_ffn(model, permutations)
    difference = mx.max(mx.abs(model(probe) - before)).item()
    logger.info("Max abs logit change from the permutation on %d tokens: %.2e", probe.shape[1], difference)

    info = grouping_info(model, windows, args.site, args.method, args.block_size, args.target, args.sample_tokens, args.seed)
    info["max_abs_logit_change"] = difference
    kind, path = resolve_spec(args.model)
    save_grouped(model, path if kind == "folder" else tokenizer, out_dir, info, permutations, overwrite=args.overwrite)
    print(out_dir)
    return 0


if __name__ == "__main__":
    run_command(main)
