"""Perplexity against actual sparsity over several targets: one calibration pass, one eval each.

    python -m mlx_sparse.sweep --model smollm2-135m --targets 0,0.3,0.5,0.7 --out out/sweep
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from . import sparsity
from .calibration import add_method_arguments, check_allocation
from .cli import ArgumentParser, atomic_path, run_command, setup_logging, write_text_atomic
from .data import load_windows, warn_same_data
from .errors import UserError
from .perplexity import evaluate_perplexity

logger = logging.getLogger(__name__)


def parse_targets(text: str) -> list[float]:
    try:
        targets = [float(item) for item in text.split(",") if item.strip()]
    except ValueError as exc:
        raise UserError(f"invalid --targets {text!r}; use comma-separated fractions such as 0,0.3,0.5,0.7") from exc
    if not targets:
        raise UserError(f"invalid --targets {text!r}; use comma-separated fractions such as 0,0.3,0.5,0.7")
    for target in targets:
        sparsity.check_target(target)
    return targets


def config_name(target: float) -> str:
    return f"config_{target:g}.json"


def run_sweep(model, tokenizer, targets, site, granularity, block_size, calib_data, calib_windows, data, ctx, max_windows,
              data_dir=None, score="magnitude", dense_prefix=0, allocation="uniform", greedy_step=0.1, greedy_windows=1) -> tuple[dict, list]:
    """Calibrate every target in one pass, then score each on `data`; returns (summary, configs)."""
    from .allocation import allocate
    from .calibration import Calibration, first_windows

    calibration_windows = load_windows(calib_data, tokenizer, ctx, calib_windows, data_dir)
    calibration = Calibration.record(model, calibration_windows, site, granularity, block_size, score, dense_prefix)
    loss_windows = first_windows(calibration_windows, greedy_windows)
    configs = [allocate(model, calibration, target, allocation, loss_windows, greedy_step) for target in targets]
    evaluation = load_windows(data, tokenizer, ctx, max_windows, data_dir)

    results = []
    for config in configs:
        sparsity.sparsify(model, config)
        try:
            result = evaluate_perplexity(model, evaluation, description=f"target {config.target:g}")
        finally:
            sparsity.unsparsify(model)
        results.append({
            "target": config.target,
            "actual_sparsity": result.actual_sparsity,
            "ppl": result.ppl,
            "config": config_name(config.target),
            "layers": result.layers,
        })
        logger.info("target %.2f: actual sparsity %.4f, PPL %.3f", config.target, result.actual_sparsity, result.ppl)

    summary = {
        "model": getattr(model, "model_id", None),
        "site": site,
        "granularity": granularity,
        "block_size": block_size,
        "score": score,
        "dense_prefix": dense_prefix,
        "allocation": allocation,
        "data": data,
        "calib_data": calib_data,
        "calib_windows": calibration_windows.count,
        "ctx": ctx,
        "windows": evaluation.count,
        "tokens": evaluation.count * (ctx - 1),
        "results": results,
    }
    return summary, configs


def format_markdown(summary: dict) -> str:
    dense = next((row["ppl"] for row in summary["results"] if row["target"] == 0), None)
    lines = [
        f"# Sparsity sweep: {summary['model']}",
        "",
        f"Site `{summary['site']}`, {summary['granularity']} granularity"
        + (f" (blocks of {summary['block_size']})" if summary["granularity"] == "block" else "")
        + f"; calibrated on {summary['calib_data']} ({summary['calib_windows']} windows), "
        f"scored on {summary['data']}: {summary['windows']} windows of {summary['ctx']} tokens ({summary['tokens']} predicted tokens).",
        "",
        "| target | actual sparsity | perplexity | vs dense |",
        "|---:|---:|---:|---:|",
    ]
    for row in summary["results"]:
        change = f"{(row['ppl'] / dense - 1) * 100:+.2f}%" if dense else "n/a"
        lines.append(f"| {row['target']:.2f} | {row['actual_sparsity']:.4f} | {row['ppl']:.3f} | {change} |")
    return "\n".join(lines) + "\n"


def plot_sweep(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = summary["results"]
    figure, axis = plt.subplots(figsize=(6, 4))
    axis.plot([row["actual_sparsity"] for row in rows], [row["ppl"] for row in rows], marker="o", label=f"{summary['site']}, {summary['granularity']}")
    dense = next((row["ppl"] for row in rows if row["target"] == 0), None)
    if dense is not None:
        axis.axhline(dense, color="gray", linestyle="--", label=f"dense {dense:.2f}")
    axis.set_xlabel("actual FFN sparsity (fraction of zeros)")
    axis.set_ylabel(f"perplexity ({summary['data']}, ctx {summary['ctx']})")
    axis.set_title(str(summary["model"]))
    axis.grid(alpha=0.3)
    axis.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=120)
    plt.close(figure)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.sweep", description="Calibrate several sparsity targets and measure perplexity for each.")
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--targets", default="0,0.3,0.5,0.7", help="comma-separated target sparsities (default 0,0.3,0.5,0.7)")
    parser.add_argument("--site", default="down_in", help=f"one of {', '.join(sparsity.SITES)} (default down_in)")
    parser.add_argument("--granularity", default="neuron", help="neuron or block (default neuron)")
    parser.add_argument("--block-size", type=int, default=32, help="neurons per block (default 32)")
    parser.add_argument("--calib-data", default="wikitext2:valid", help="calibration text (default wikitext2:valid)")
    parser.add_argument("--calib-windows", type=int, default=16, help="calibration windows (default 16)")
    parser.add_argument("--data", default="wikitext2:test", help="evaluation text (default wikitext2:test)")
    parser.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
    parser.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
    parser.add_argument("--max-windows", type=int, default=8, help="evaluation windows (default 8)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast float weights to this type")
    add_method_arguments(parser)
    parser.add_argument("--out", required=True, help="output folder for sweep.json, sweep.md, sweep.png and the configs")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    targets = parse_targets(args.targets)
    sparsity.check_site(args.site, args.granularity, args.block_size)
    sparsity.check_score(args.score, args.site, args.dense_prefix)
    check_allocation(args.allocation, args.greedy_windows)
    warn_same_data(args.calib_data, args.data, args.data_dir)

    from .blas import log_blas
    from .loading import load

    log_blas()
    model, tokenizer = load(args.model, dtype=args.dtype)
    summary, configs = run_sweep(
        model, tokenizer, targets, args.site, args.granularity, args.block_size,
        args.calib_data, args.calib_windows, args.data, args.ctx, args.max_windows, args.data_dir,
        args.score, args.dense_prefix, args.allocation, args.greedy_step, args.greedy_windows,
    )

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for config in configs:
        config.save(out / config_name(config.target))
    write_text_atomic(out / "sweep.json", json.dumps(summary, indent=1) + "\n")
    markdown = format_markdown(summary)
    write_text_atomic(out / "sweep.md", markdown)
    plot_sweep(summary, out / "sweep.png")
    if args.allocation == "greedy":
        from .allocation import plot_allocation

        plot_allocation([config for config in configs if config.target > 0] or configs, out / "allocation.png")
    print(markdown)
    print(f"wrote {out}/sweep.json, sweep.md, sweep.png and {len(configs)} configs")
    return 0


if __name__ == "__main__":
    run_command(main)
