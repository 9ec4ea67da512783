"""Per-layer thresholds for a target sparsity, from streaming histograms of calibration activations.

    python -m mlx_sparse.calibrate --model smollm2-135m --site down_in --target 0.5 -o cfg.json
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from . import sparsity
from .cli import ArgumentParser, check_output_file, run_command, setup_logging
from .data import TokenWindows, load_windows
from .errors import UserError
from .progress import progress_bar

logger = logging.getLogger(__name__)


class LogHistogram:
    """Histogram of magnitudes over log2-spaced bins; its memory does not grow with the token count.

    The bins span 2**-40 to 2**20 in 16384 steps, so a bin is 0.25% wide in relative terms and a
    quantile read from it is off by at most that much; exact zeros fall into the first bin.
    """

    LOW = -40.0
    HIGH = 20.0
    BINS = 16384

    def __init__(self):
        self.counts = mx.zeros((self.BINS,), dtype=mx.int32)
        self.total = 0

    def add(self, magnitudes: mx.array) -> None:
        scale = self.BINS / (self.HIGH - self.LOW)
        logs = mx.log2(mx.maximum(magnitudes.astype(mx.float32).reshape(-1), 2.0**self.LOW))
        index = mx.clip(mx.floor((logs - self.LOW) * scale), 0, self.BINS - 1).astype(mx.int32)
        self.counts = self.counts.at[index].add(mx.ones(index.shape, dtype=mx.int32))
        self.total += index.size

    def quantile(self, fraction: float) -> float:
        """Return t such that about `fraction` of the recorded magnitudes are below t (0 for fraction 0)."""
        if fraction <= 0 or self.total == 0:
            return 0.0
        counts = np.asarray(self.counts, dtype=np.int64)
        cumulative = np.cumsum(counts)
        wanted = fraction * self.total
        bin_index = int(np.searchsorted(cumulative, wanted, side="left"))
        bin_index = min(bin_index, self.BINS - 1)
        below = cumulative[bin_index - 1] if bin_index > 0 else 0
        inside = counts[bin_index]
        position = (wanted - below) / inside if inside else 1.0

        width = (self.HIGH - self.LOW) / self.BINS
        log_value = self.LOW + (bin_index + position) * width
        return float(2.0**log_value)


def record_histograms(model: nn.Module, data: TokenWindows, granularity: str, block_size: int) -> list[dict[str, LogHistogram]]:
    """Run the calibration windows through the model and histogram every site tensor of every layer."""
    modules = sparsity.sparse_modules(model)
    histograms: list[dict[str, LogHistogram]] = [{} for _ in modules]

    def make_recorder(layer: int):
        def record(name: str, values: mx.array) -> None:
            if granularity == "block":
                magnitudes = sparsity.block_scores(values, block_size)
            else:
                magnitudes = mx.abs(values)
            histograms[layer].setdefault(name, LogHistogram()).add(magnitudes)

        return record

    for layer, module in enumerate(modules):
        module.recorder = make_recorder(layer)
    try:
        with progress_bar() as progress:
            task = progress.add_task("calibrating", total=data.count)
            for index in range(data.count):
                logits = model(data.windows[index : index + 1])
                counts = [histogram.counts for layer in histograms for histogram in layer.values()]
                mx.eval(logits, *counts)
                progress.update(task, advance=1)
    finally:
        for module in modules:
            module.recorder = None
    return histograms


def resolve_windows(data, tokenizer, ctx: int, max_windows: int | None, data_dir: str | None) -> TokenWindows:
    if isinstance(data, TokenWindows):
        return data
    if tokenizer is None:
        raise UserError("calibration needs a tokenizer when data is a spec string; pass the tokenizer from mlx_sparse.load")
    return load_windows(data, tokenizer, ctx, max_windows, data_dir)


class Calibration:
    """Per-layer score histograms of one site on calibration windows: thresholds for any sparsity, per layer.

    Build it with `Calibration.record`. `config(target)` gives every layer the same target, and
    `config(target, layer_targets)` one target per layer (used by greedy allocation).
    """

    def __init__(self, shape: dict, windows: TokenWindows, site: str, granularity: str, block_size: int,
                 score: str, dense_prefix: int, histograms: list[dict[str, LogHistogram]]):
        self.shape = shape
        self.windows = windows
        self.site = site
        self.granularity = granularity
        self.block_size = block_size
        self.score = score
        self.dense_prefix = dense_prefix
        self.histograms = histograms

    @classmethod
    def record(cls, model: nn.Module, windows: TokenWindows, site: str = "down_in", granularity: str = "neuron",
               block_size: int = 32, score: str = "magnitude", dense_prefix: int = 0) -> Calibration:
        """Run `windows` through the dense model once and histogram every layer's site scores."""
        sparsity.check_site(site, granularity, block_size)
        sparsity.check_score(score, site, dense_prefix)
        shape = sparsity.describe_model(model)
        width = shape["hidden_size"] if site == "ffn_in" else shape["intermediate_size"]
        if granularity == "block" and (width % block_size or (site == "seed" and shape["hidden_size"] % block_size)):
            raise UserError(f"block size {block_size} does not divide the FFN width {width}; use a divisor such as 32")
        if dense_prefix >= windows.ctx:
            raise UserError(f"dense prefix {dense_prefix} covers the whole {windows.ctx}-token window; use a smaller --dense-prefix")

        calibration = cls(shape, windows, site, granularity, block_size, score, dense_prefix, [])
        sparsity.sparsify(model, calibration.config(0.0))
        try:
            calibration.histograms = record_histograms(model, windows, granularity, block_size)
        finally:
            sparsity.unsparsify(model)
        return calibration

    def thresholds(self, layer: int, target: float) -> dict[str, float]:
        if not self.histograms:
            return {name: 0.0 for name in sparsity.SITE_TENSORS[self.site]}
        return {name: histogram.quantile(target) for name, histogram in self.histograms[layer].items()}

    def config(self, target: float, layer_targets: Sequence[float] | None = None,
               allocation: str = "uniform", method: dict | None = None) -> sparsity.SparsityConfig:
        """Return the config whose layer l threshold zeroes `layer_targets[l]` (default `target`) of its scores."""
        shape = self.shape
        per_layer = [target] * shape["num_layers"] if layer_targets is None else list(layer_targets)
        windows = self.windows
        return sparsity.SparsityConfig(
            model_id=shape["model_id"], model_type=shape["model_type"], num_layers=shape["num_layers"],
            hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"], site=self.site,
            granularity=self.granularity, block_size=self.block_size, target=target,
            thresholds=[self.thresholds(layer, value) for layer, value in enumerate(per_layer)],
            calibration={
                "data": windows.source,
                "ctx": windows.ctx,
                "windows": windows.count,
                "tokens": windows.count * windows.ctx,
                "method": "per-layer quantile of a log2 histogram",
                **(method or {}),
            },
            score=self.score,
            dense_prefix=self.dense_prefix,
            allocation=allocation,
            layer_targets=None if layer_targets is None else [float(value) for value in per_layer],
        )


def calibrate_targets(
    model: nn.Module,
    windows: TokenWindows,
    targets: Sequence[float],
    site: str = "down_in",
    granularity: str = "neuron",
    block_size: int = 32,
    score: str = "magnitude",
    dense_prefix: int = 0,
) -> list[sparsity.SparsityConfig]:
    """Return one config per target from a single pass over the calibration windows.

    Each threshold is the target quantile of the layer's |scores| (neuron) or block RMS scores
    (block), measured on the dense model. The model is left dense.
    """
    for target in targets:
        sparsity.check_target(target)
    calibration = Calibration.record(model, windows, site, granularity, block_size, score, dense_prefix)
    configs = [calibration.config(target) for target in targets]
    logger.info("Calibrated %d layers (%s, %s) for targets %s on %d tokens", len(model.layers), site, granularity, list(targets), windows.count * windows.ctx)
    return configs


def calibrate(
    model: nn.Module,
    tokenizer=None,
    data: str | TokenWindows = "wikitext2:valid",
    target: float = 0.5,
    site: str = "down_in",
    granularity: str = "neuron",
    block_size: int = 32,
    ctx: int = 512,
    max_windows: int | None = 16,
    data_dir: str | None = None,
    score: str = "magnitude",
    dense_prefix: int = 0,
    allocation: str = "uniform",
    greedy_step: float = 0.1,
    greedy_windows: int = 1,
) -> sparsity.SparsityConfig:
    """Return a config whose per-layer thresholds zero a `target` fraction of the site scores.

    `data` is a data spec, tokenised with `tokenizer` into `max_windows` windows of `ctx` tokens,
    or windows already tokenised. With allocation "uniform" every layer gets `target`; with
    "greedy" the layers get different targets whose weighted average is `target`, chosen on the
    loss of the first `greedy_windows` calibration windows (see `mlx_sparse.allocation`). The
    model is left dense.
    """
    from .allocation import allocate

    sparsity.check_site(site, granularity, block_size)
    sparsity.check_target(target)
    sparsity.check_score(score, site, dense_prefix)
    check_allocation(allocation, greedy_windows)
    windows = resolve_windows(data, tokenizer, ctx, max_windows, data_dir)
    calibration = Calibration.record(model, windows, site, granularity, block_size, score, dense_prefix)
    loss_windows = first_windows(windows, greedy_windows) if allocation == "greedy" else None
    return allocate(model, calibration, target, allocation, loss_windows, greedy_step)


def check_allocation(allocation: str, greedy_windows: int) -> None:
    if allocation not in sparsity.ALLOCATIONS:
        raise UserError(f"unknown allocation {allocation!r}; use uniform or greedy")
    if greedy_windows < 1:
        raise UserError(f"invalid greedy windows {greedy_windows}; use a positive number of calibration windows, such as 1")


def first_windows(windows: TokenWindows, count: int) -> TokenWindows:
    """Return the first `count` windows of `windows` (all of them when there are fewer)."""
    return TokenWindows(source=windows.source, windows=windows.windows[:count], total_tokens=windows.total_tokens)


def add_method_arguments(parser: ArgumentParser) -> None:
    """Add the score, dense-prefix and allocation options shared by calibrate and sweep."""
    parser.add_argument("--score", default="magnitude", help="what the threshold compares: magnitude, or wina (|v| times its weight column norm)")
    parser.add_argument("--dense-prefix", type=int, default=0, help="first positions of each sequence kept dense (default 0)")
    parser.add_argument("--allocation", default="uniform", help="per-layer sparsity: uniform (default) or greedy")
    parser.add_argument("--greedy-step", type=float, default=0.1, help="sparsity step of the greedy search (default 0.1)")
    parser.add_argument("--greedy-windows", type=int, default=1, help="calibration windows whose loss guides the greedy search (default 1)")


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.calibrate", description="Calibrate per-layer FFN thresholds for a target sparsity.")
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--site", default="down_in", help=f"where to threshold: {', '.join(sparsity.SITES)} (default down_in)")
    parser.add_argument("--granularity", default="neuron", help="neuron or block (default neuron)")
    parser.add_argument("--block-size", type=int, default=32, help="neurons per block for block granularity (default 32)")
    parser.add_argument("--target", type=float, default=0.5, help="fraction of zeros per layer, in [0, 1) (default 0.5)")
    parser.add_argument("--data", default="wikitext2:valid", help="calibration text: wikitext2:valid (default), wikitext2:test or a file")
    parser.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast float weights to this type")
    add_method_arguments(parser)
    parser.add_argument("-o", "--output", required=True, help="path of the config JSON to write (greedy also writes <name>_allocation.png)")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    sparsity.check_site(args.site, args.granularity, args.block_size)
    sparsity.check_target(args.target)
    sparsity.check_score(args.score, args.site, args.dense_prefix)
    check_allocation(args.allocation, args.greedy_windows)
    output = check_output_file(args.output)

    from .blas import log_blas
    from .loading import load

    log_blas()
    model, tokenizer = load(args.model, dtype=args.dtype)
    config = calibrate(
        model, tokenizer, args.data, target=args.target, site=args.site, granularity=args.granularity,
        block_size=args.block_size, ctx=args.ctx, max_windows=args.max_windows, data_dir=args.data_dir,
        score=args.score, dense_prefix=args.dense_prefix, allocation=args.allocation,
        greedy_step=args.greedy_step, greedy_windows=args.greedy_windows,
    )
    config.save(output)
    if config.allocation == "greedy":
        from .allocation import plot_allocation

        plot_allocation([config], output.with_name(f"{output.stem}_allocation.png"))
    print(f"wrote {args.output}: {config.num_layers} layers, site {config.site}, {config.granularity}, target {config.target}")
    return 0


if __name__ == "__main__":
    run_command(main)
