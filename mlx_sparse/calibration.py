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


def calibrate_targets(
    model: nn.Module,
    windows: TokenWindows,
    targets: Sequence[float],
    site: str = "down_in",
    granularity: str = "neuron",
    block_size: int = 32,
) -> list[sparsity.SparsityConfig]:
    """Return one config per target from a single pass over the calibration windows.

    Each threshold is the target quantile of the layer's |values| (neuron) or block RMS scores
    (block), measured on the dense model. The model is left dense.
    """
    sparsity.check_site(site, granularity, block_size)
    for target in targets:
        sparsity.check_target(target)

    shape = sparsity.describe_model(model)
    width = shape["hidden_size"] if site == "ffn_in" else shape["intermediate_size"]
    if granularity == "block" and (width % block_size or (site == "seed" and shape["hidden_size"] % block_size)):
        raise UserError(f"block size {block_size} does not divide the FFN width {width}; use a divisor such as 32")

    tensors = sparsity.SITE_TENSORS[site]

    def make_config(target: float, thresholds: list[dict[str, float]]) -> sparsity.SparsityConfig:
        return sparsity.SparsityConfig(
            model_id=shape["model_id"], model_type=shape["model_type"], num_layers=shape["num_layers"],
            hidden_size=shape["hidden_size"], intermediate_size=shape["intermediate_size"], site=site,
            granularity=granularity, block_size=block_size, target=target, thresholds=thresholds,
            calibration={
                "data": windows.source,
                "ctx": windows.ctx,
                "windows": windows.count,
                "tokens": windows.count * windows.ctx,
                "method": "per-layer quantile of a log2 histogram",
            },
        )

    probe = make_config(0.0, [{name: 0.0 for name in tensors} for _ in range(shape["num_layers"])])
    sparsity.sparsify(model, probe)
    try:
        histograms = record_histograms(model, windows, granularity, block_size)
    finally:
        sparsity.unsparsify(model)

    configs = []
    for target in targets:
        thresholds = [{name: layer[name].quantile(target) for name in tensors} for layer in histograms]
        configs.append(make_config(target, thresholds))
    logger.info("Calibrated %d layers (%s, %s) for targets %s on %d tokens", shape["num_layers"], site, granularity, list(targets), windows.count * windows.ctx)
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
) -> sparsity.SparsityConfig:
    """Return a config whose per-layer thresholds zero a `target` fraction of each site tensor.

    `data` is a data spec, tokenised with `tokenizer` into `max_windows` windows of `ctx` tokens,
    or windows already tokenised. The model is left dense.
    """
    sparsity.check_site(site, granularity, block_size)
    sparsity.check_target(target)
    windows = resolve_windows(data, tokenizer, ctx, max_windows, data_dir)
    return calibrate_targets(model, windows, [target], site, granularity, block_size)[0]


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
    parser.add_argument("-o", "--output", required=True, help="path of the config JSON to write")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    sparsity.check_site(args.site, args.granularity, args.block_size)
    sparsity.check_target(args.target)
    check_output_file(args.output)

    from .blas import log_blas
    from .loading import load

    log_blas()
    model, tokenizer = load(args.model, dtype=args.dtype)
    config = calibrate(
        model, tokenizer, args.data, target=args.target, site=args.site, granularity=args.granularity,
        block_size=args.block_size, ctx=args.ctx, max_windows=args.max_windows, data_dir=args.data_dir,
    )
    config.save(args.output)
    print(f"wrote {args.output}: {config.num_layers} layers, site {config.site}, {config.granularity}, target {config.target}")
    return 0


if __name__ == "__main__":
    run_command(main)
