"""Time one FFN layer: dense mlx-lm-style MLP against BlockSparseFFN, for decode and prefill.

Shapes are those of SmolLM2-135M (hidden 576, intermediate 1536, SiLU) and Gemma-3-270M (hidden 640,
intermediate 2048, tanh-approximate GELU), with random weights in float32 and MLX 4-bit (group 32).
Each block threshold is the quantile of the block scores of 64 random tokens that leaves the target
fraction of blocks active, so the active count varies from token to token as it does in a model.
Variants run interleaved: every round times `--calls` calls of each variant, each call evaluated
with `mx.eval` inside the timed region, and the reported time is the median over rounds.

Run: scripts/run.sh .venv/bin/python benchmarks/ffn_micro.py
Writes benchmarks/results/ffn_micro.json and ffn_micro.md (`--name` changes the file name).
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sparse.blas import log_blas
from mlx_sparse.cli import ArgumentParser, run_command, setup_logging, write_text_atomic
from mlx_sparse.errors import UserError
from mlx_sparse.kernels import BlockSparseFFN, block_scores
from mlx_sparse.kernels.scores import rms_last_axis
from mlx_sparse.progress import progress_bar

logger = logging.getLogger(__name__)

RESULTS_DIR = Path(__file__).resolve().parent / "results"
BLOCK_SIZE = 32
GROUP_SIZE = 32
FRACTIONS = (0.3, 0.5, 0.7)
SPARSE_VARIANTS = (("gate_act", "gather"), ("gate_act", "dense"), ("down_in", "dense"))
PREFILL_LENGTHS = (2, 4, 8, 16, 32, 128)
TOKEN_POOL = 16
CALIBRATION_TOKENS = 64


@dataclass(frozen=True)
class Shape:
    model: str
    hidden: int
    intermediate: int
    activation: Callable[[mx.array], mx.array]


SHAPES = (
    Shape("smollm2-135m", 576, 1536, nn.silu),
    Shape("gemma3-270m", 640, 2048, nn.gelu_approx),
)


class MLP(nn.Module):
    """mlx-lm's Llama/Gemma-3 MLP with the activation as a method, as BlockSparseFFN.from_mlp expects."""

    def __init__(self, shape: Shape):
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.up_proj = nn.Linear(shape.hidden, shape.intermediate, bias=False)
        self.down_proj = nn.Linear(shape.intermediate, shape.hidden, bias=False)
        self._activation = shape.activation

    def activation(self, x: mx.array) -> mx.array:
        return self._activation(x)

    def __call__(self, x: mx.array) -> mx.array:
        return self.down_proj(self.activation(self.gate_proj(x)) * self.up_proj(x))


def build_mlp(shape: Shape, weights: str, seed: int = 0) -> MLP:
    mx.random.seed(seed)
    mlp = MLP(shape)
    if weights == "q4":
        nn.quantize(mlp, group_size=GROUP_SIZE, bits=4)
    mx.eval(mlp.parameters())
    return mlp


def site_values(mlp: MLP, x: mx.array, site: str) -> mx.array:
    a = mlp.activation(mlp.gate_proj(x))
    return a if site == "gate_act" else a * mlp.up_proj(x)


def calibrate_threshold(mlp: MLP, shape: Shape, site: str, fraction: float) -> float:
    """Return the block threshold that leaves `fraction` of the blocks of random tokens active."""
    x = mx.random.normal((1, CALIBRATION_TOKENS, shape.hidden), key=mx.random.key(123))
    scores = np.array(block_scores(site_values(mlp, x, site), BLOCK_SIZE)).ravel()
    return float(np.quantile(scores, 1.0 - fraction))


def time_interleaved(
    variants: dict[str, Callable[[int], mx.array]], rounds: int, calls: int, progress, task
) -> dict[str, float]:
    """Return the median over rounds of the mean microseconds per call of each variant."""
    for run in variants.values():
        for i in range(3):
            mx.eval(run(i))

    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, run in variants.items():
            start = time.perf_counter()
            for i in range(calls):
                mx.eval(run(i))
            samples[name].append((time.perf_counter() - start) / calls * 1e6)
        progress.advance(task)
    return {name: float(np.median(values)) for name, values in samples.items()}


def measure_stats(ffn: BlockSparseFFN, tokens: list[mx.array]) -> dict[str, float]:
    stats = ffn.enable_stats()
    for x in tokens:
        mx.eval(ffn(x))
    ffn.stats = None
    return {"active_fraction": stats.active_fraction, "weight_bytes_ratio": stats.weight_bytes_ratio}


def decode_section(shape: Shape, weights: str, rounds: int, calls: int, progress, task) -> list[dict]:
    mlp = build_mlp(shape, weights)
    tokens = [mx.random.normal((1, 1, shape.hidden), key=mx.random.key(i)) for i in range(TOKEN_POOL)]
    mx.eval(tokens)

    all_blocks = "all blocks (threshold 0)"
    modules: dict[str, BlockSparseFFN] = {all_blocks: BlockSparseFFN.from_mlp(mlp, "gate_act", 0.0)}
    targets: dict[str, tuple[str, str, float]] = {}
    for fraction in FRACTIONS:
        for site, up_mode in SPARSE_VARIANTS:
            name = f"{site} up={up_mode} {fraction:.0%}"
            threshold = calibrate_threshold(mlp, shape, site, fraction)
            modules[name] = BlockSparseFFN.from_mlp(mlp, site, threshold, BLOCK_SIZE, up_mode=up_mode)
            targets[name] = (site, up_mode, fraction)

    variants: dict[str, Callable[[int], mx.array]] = {"dense": lambda i: mlp(tokens[i % TOKEN_POOL])}
    for name, ffn in modules.items():
        variants[name] = lambda i, ffn=ffn: ffn(tokens[i % TOKEN_POOL])
    times = time_interleaved(variants, rounds, calls, progress, task)

    rows = []
    for name, micros in times.items():
        row = {"model": shape.model, "weights": weights, "variant": name, "us_per_token": round(micros, 1)}
        row["speedup_vs_dense"] = round(times["dense"] / micros, 3)
        row["speedup_vs_all_blocks"] = round(times[all_blocks] / micros, 3)
        if name in modules:
            row.update({key: round(value, 3) for key, value in measure_stats(modules[name], tokens).items()})
        if name in targets:
            site, up_mode, fraction = targets[name]
            row.update({"site": site, "up_mode": up_mode, "target_active": fraction})
        rows.append(row)
    return rows


def index_selection_section(rounds: int, calls: int, progress, task) -> list[dict]:
    """Compare the host-synchronized selection with precomputed indices and a fixed-k argpartition."""
    shape = SHAPES[0]
    mlp = build_mlp(shape, "fp32")
    tokens = [mx.random.normal((1, 1, shape.hidden), key=mx.random.key(i)) for i in range(TOKEN_POOL)]
    threshold = calibrate_threshold(mlp, shape, "gate_act", 0.5)
    ffn = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, BLOCK_SIZE)
    fixed_k = ffn.num_blocks // 2

    precomputed = []
    for x in tokens:
        a = mlp.activation(mlp.gate_proj(x)).reshape(ffn.num_blocks, 1, BLOCK_SIZE)
        active = np.flatnonzero(np.array(rms_last_axis(a) >= threshold)[:, 0]).astype(np.uint32)
        precomputed.append(mx.array(active))

    def gather(x: mx.array, a: mx.array, indices: mx.array) -> mx.array:
        h = mx.take(a, indices, axis=0) * ffn.up_blocks.blocks(x, indices)
        return ffn.down_blocks.blocks(h, indices).sum(axis=0)

    def with_precomputed(i: int) -> mx.array:
        x = tokens[i % TOKEN_POOL].reshape(1, -1)
        return gather(x, ffn.activation(ffn.gate_blocks.blocks(x)), precomputed[i % TOKEN_POOL])

    def with_argpartition(i: int) -> mx.array:
        x = tokens[i % TOKEN_POOL].reshape(1, -1)
        a = ffn.activation(ffn.gate_blocks.blocks(x))
        scores = rms_last_axis(a)[:, 0]
        top = mx.argpartition(-scores, fixed_k - 1)[:fixed_k]
        return gather(x, a, mx.sort(top).astype(mx.uint32))

    variants = {
        "dense": lambda i: mlp(tokens[i % TOKEN_POOL]),
        "host sync on the mask (BlockSparseFFN)": lambda i: ffn(tokens[i % TOKEN_POOL]),
        "precomputed indices (no selection cost)": with_precomputed,
        f"argpartition, fixed k={fixed_k} (no sync, not exact)": with_argpartition,
    }
    times = time_interleaved(variants, rounds, calls, progress, task)
    return [
        {"variant": name, "us_per_token": round(micros, 1), "speedup_vs_dense": round(times["dense"] / micros, 3)}
        for name, micros in times.items()
    ]


def prefill_section(weights: str, rounds: int, progress, task) -> list[dict]:
    shape = SHAPES[0]
    mlp = build_mlp(shape, weights)
    threshold = calibrate_threshold(mlp, shape, "gate_act", 0.5)
    dense_path = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, BLOCK_SIZE, prefill="dense")
    union_path = BlockSparseFFN.from_mlp(mlp, "gate_act", threshold, BLOCK_SIZE, prefill="union")

    rows = []
    for length in PREFILL_LENGTHS:
        x = mx.random.normal((1, length, shape.hidden), key=mx.random.key(length))
        variants = {
            "dense": lambda i: mlp(x),
            "prefill=dense (masked)": lambda i: dense_path(x),
            "prefill=union (gather)": lambda i: union_path(x),
        }
        times = time_interleaved(variants, rounds, 2, progress, task)
        union_stats = measure_stats(union_path, [x])
        for name, micros in times.items():
            rows.append(
                {
                    "weights": weights,
                    "tokens": length,
                    "variant": name,
                    "us_per_call": round(micros, 1),
                    "speedup_vs_dense": round(times["dense"] / micros, 3),
                    "union_weight_bytes_ratio": round(union_stats["weight_bytes_ratio"], 3),
                    "active_fraction": round(union_stats["active_fraction"], 3),
                }
            )
    return rows


def markdown_table(rows: list[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(str(row.get(column, "")) for column in columns) + " |")
    return "\n".join(lines)


def write_markdown(path: Path, report: dict) -> None:
    environment = report["environment"]
    text = [
        "# FFN micro-benchmark: dense MLP against BlockSparseFFN",
        "",
        f"Command: `{report['command']}` (LD_PRELOAD={environment['ld_preload'] or 'unset'}; "
        "`scripts/run.sh` sets it to Debian's OpenBLAS)",
        "",
        f"Machine: {environment['machine']}, {environment['cpu_count']} cores, BLAS {environment['blas']}, "
        f"OPENBLAS_NUM_THREADS={environment['openblas_num_threads']}, MLX {environment['mlx']}, "
        f"device {environment['device']}, load average at start {environment['load_average_at_start']} "
        "(other processes share the cores).",
        "",
        "Random weights, block size 32, 4-bit = MLX affine group 32. Times are the median over "
        f"{report['rounds']} interleaved rounds of {report['calls']} calls. Weights are reused call after "
        "call, so they stay in the CPU caches: in a full model they stream from memory.",
        "",
        "## Decode (1 token)",
        "",
        "`speedup_vs_dense` = dense time / variant time. `speedup_vs_all_blocks` compares with the same block "
        "layout at threshold 0, which skips the scores and their host sync, so it isolates the effect of "
        "sparsity from that of the layout. `weight_bytes_ratio` counts the blocks gathered.",
        "",
        markdown_table(
            report["decode"],
            [
                "model",
                "weights",
                "variant",
                "us_per_token",
                "speedup_vs_dense",
                "speedup_vs_all_blocks",
                "active_fraction",
                "weight_bytes_ratio",
            ],
        ),
        "",
        "## Index selection (SmolLM2-135M FFN, fp32, gate_act, 50% active)",
        "",
        markdown_table(report["index_selection"], ["variant", "us_per_token", "speedup_vs_dense"]),
        "",
        "## Prefill (SmolLM2-135M FFN, gate_act, 50% active per token)",
        "",
        markdown_table(
            report["prefill"],
            ["weights", "tokens", "variant", "us_per_call", "speedup_vs_dense", "active_fraction", "union_weight_bytes_ratio"],
        ),
        "",
    ]
    write_text_atomic(path, "\n".join(text))


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=25, help="interleaved rounds per variant (default 25)")
    parser.add_argument("--calls", type=int, default=20, help="timed calls per variant and round (default 20)")
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help="directory for the results")
    parser.add_argument("--name", default="ffn_micro", help="file name of the results, without .json or .md")
    parser.add_argument("--verbose", action="store_true", help="log debug messages")
    args = parser.parse_args(argv)
    setup_logging(args.verbose)
    if args.rounds < 1 or args.calls < 1:
        raise UserError(f"invalid --rounds {args.rounds} or --calls {args.calls}: use positive integers")

    blas = log_blas()
    report = {
        "command": " ".join(shlex.quote(part) for part in ["python", *sys.argv]),
        "environment": {
            "machine": f"{platform.system()} {platform.machine()}",
            "cpu_count": os.cpu_count(),
            "openblas_num_threads": os.environ.get("OPENBLAS_NUM_THREADS", "unset"),
            "blas": blas,
            "ld_preload": os.environ.get("LD_PRELOAD", ""),
            "mlx": mx.__version__,
            "device": str(mx.default_device()),
            "load_average_at_start": [round(value, 2) for value in os.getloadavg()],
        },
        "rounds": args.rounds,
        "calls": args.calls,
    }

    prefill_rounds = max(3, args.rounds // 3)
    steps = args.rounds * (len(SHAPES) * 2 + 1) + prefill_rounds * 2 * len(PREFILL_LENGTHS)
    started = time.perf_counter()
    with progress_bar() as progress:
        task = progress.add_task("timing FFN variants", total=steps)
        report["decode"] = [
            row
            for shape in SHAPES
            for weights in ("fp32", "q4")
            for row in decode_section(shape, weights, args.rounds, args.calls, progress, task)
        ]
        report["index_selection"] = index_selection_section(args.rounds, args.calls, progress, task)
        report["prefill"] = [row for weights in ("fp32", "q4") for row in prefill_section(weights, prefill_rounds, progress, task)]
    report["seconds"] = round(time.perf_counter() - started, 1)
    report["environment"]["load_average_at_end"] = [round(value, 2) for value in os.getloadavg()]

    json_path = args.out_dir / f"{args.name}.json"
    markdown_path = args.out_dir / f"{args.name}.md"
    write_text_atomic(json_path, json.dumps(report, indent=2) + "\n")
    write_markdown(markdown_path, report)
    logger.info("wrote %s and %s in %.0f s", json_path, markdown_path, report["seconds"])
    return 0


if __name__ == "__main__":
    run_command(main)
