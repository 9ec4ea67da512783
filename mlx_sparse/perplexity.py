"""Perplexity of a (possibly sparsified) model on token windows, with the measured sparsity.

    python -m mlx_sparse.perplexity --model smollm2-135m --sparsity cfg.json --data wikitext2:test
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import mlx.core as mx
import mlx.nn as nn

from . import sparsity
from .cli import ArgumentParser, run_command, setup_logging
from .data import TokenWindows, load_windows
from .progress import progress_bar

logger = logging.getLogger(__name__)


@dataclass
class PerplexityResult:
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token, in nats
    tokens: int  # predicted tokens scored
    windows: int
    ctx: int
    actual_sparsity: float | None = None  # fraction of zeros of the tensor that decides skipped weights
    layers: list[dict] = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return asdict(self)


@functools.cache
def _loss_streams() -> tuple[mx.Stream, ...]:
    """Return one CPU stream per core (two at most) for the log-softmax, or none off the CPU.

    MLX runs each CPU stream's elementwise work on one thread. On Gemma-3's 262k-entry vocabulary
    the log-softmax of a 512-token window took 2.1 s against 2.4 s for the forward pass (2 x86
    cores), so the window is cut into slices that run on separate streams at once.
    """
    if mx.default_device() != mx.cpu:
        return ()
    return tuple(mx.new_stream(mx.cpu) for _ in range(min(2, os.cpu_count() or 1)))


def window_loss(model: nn.Module, batch: mx.array) -> mx.array:
    """Sum of the next-token cross-entropy over a batch of windows, in nats."""
    logits = model(batch[:, :-1]).astype(mx.float32)
    targets = batch[:, 1:]

    streams = _loss_streams()
    if len(streams) < 2:
        return nn.losses.cross_entropy(logits, targets, reduction="sum")

    edges = [round(i * targets.shape[1] / len(streams)) for i in range(len(streams) + 1)]
    parts = []
    for stream, start, end in zip(streams, edges, edges[1:]):
        with mx.stream(stream):
            parts.append(nn.losses.cross_entropy(logits[:, start:end], targets[:, start:end], reduction="sum"))
    return sum(parts)


def evaluate_perplexity(model: nn.Module, data: TokenWindows, batch_size: int = 1, description: str = "perplexity") -> PerplexityResult:
    """Score every window of `data`; when the model is sparsified, also count the zeros per layer."""
    sparse = bool(sparsity.sparse_modules(model))
    sparsity.set_stats(model, sparse)

    total_nll = 0.0
    start = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task(description, total=data.count)
        for first in range(0, data.count, batch_size):
            batch = data.windows[first : first + batch_size]
            loss = window_loss(model, batch)
            mx.eval(loss, *sparsity.stats_arrays(model))
            total_nll += loss.item()
            progress.update(task, advance=batch.shape[0])
    seconds = time.perf_counter() - start

    tokens = data.count * (data.ctx - 1)
    nll = total_nll / tokens
    result = PerplexityResult(ppl=math.exp(nll), nll=nll, tokens=tokens, windows=data.count, ctx=data.ctx, seconds=seconds)

    if sparse:
        config = model.sparsity_config
        decisive = sparsity.decisive_tensor(config.site)
        per_layer = sparsity.layer_sparsity(model)
        result.layers = [{"layer": index, "actual_sparsity": values[decisive], **{f"sparsity_{name}": value for name, value in values.items()}} for index, values in enumerate(per_layer)]
        result.actual_sparsity = sum(values[decisive] for values in per_layer) / len(per_layer)
        sparsity.set_stats(model, False)
    logger.info("PPL %.3f over %d tokens (%d windows) in %.1f s", result.ppl, tokens, data.count, seconds)
    return result


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.perplexity", description="Measure perplexity, dense or with a sparsity config.")
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--sparsity", help="sparsity config JSON from mlx_sparse.calibrate (omit for dense)")
    parser.add_argument("--data", default="wikitext2:test", help="wikitext2:test, wikitext2:valid or a .txt/.raw/.jsonl file")
    parser.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, help="score at most this many windows (default: all)")
    parser.add_argument("--batch-size", type=int, default=1, help="windows per forward pass (default 1)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast float weights to this type")
    parser.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from .blas import log_blas
    from .errors import UserError
    from .loading import load

    if args.batch_size < 1:
        raise UserError(f"invalid --batch-size {args.batch_size}; use a positive integer")
    config = sparsity.load_config(args.sparsity) if args.sparsity else None
    log_blas()
    if config is not None and config.calibration.get("data"):
        from .data import warn_same_data

        warn_same_data(config.calibration["data"], args.data, args.data_dir)
    model, tokenizer = load(args.model, dtype=args.dtype)
    if config is not None:
        sparsity.sparsify(model, config)
    data = load_windows(args.data, tokenizer, args.ctx, args.max_windows, args.data_dir)
    result = evaluate_perplexity(model, data, args.batch_size)

    if args.json:
        print(json.dumps(result.to_json()))
    else:
        line = f"perplexity {result.ppl:.3f} over {result.tokens} tokens ({result.windows} windows of {result.ctx})"
        if result.actual_sparsity is not None:
            line += f", actual sparsity {result.actual_sparsity:.4f}"
        print(line)
    return 0


if __name__ == "__main__":
    run_command(main)
