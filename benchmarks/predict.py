"""Predictor recall, cost and perplexity on the real models, and decode speed with predicted blocks.

    scripts/run.sh .venv/bin/python benchmarks/predict.py --models smollm2-135m,gemma3-270m --out benchmarks/results

The configs are 50% gate_act block, down_in block and down_in neuron (block size 32) for each
model. Thresholds are calibrated and predictors trained on WikiText-2 valid, and recall, precision, predicted-active fraction and perplexity (dense, oracle sets, predicted sets)
are measured on WikiText-2 test. The decode benchmark (`python -m mlx_sparse.bench --predictor`)
runs on the gate_act block config. Writes predict.json after every row; `--resume` skips rows
already there. Predictor files go to `--work-dir`, not to the results.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from mlx_sparse import load, unsparsify
from mlx_sparse.calibration import calibrate_targets
from mlx_sparse.cli import setup_logging, write_text_atomic
from mlx_sparse.data import load_windows
from mlx_sparse.perplexity import evaluate_perplexity
from mlx_sparse.predict import evaluate_predictor, load_predictor, train_predictors
from mlx_sparse.sparsity import load_config, sparsify
from report import machine_text, markdown_header, new_report, resume

logger = logging.getLogger("predict")

CONFIGS = (("gate_act", "block"), ("down_in", "block"), ("down_in", "neuron"))
# (rank, activation, lookahead, recall target) per predictor row.
PREDICTORS = {
    ("gate_act", "block"): ((64, "linear", False, 0.95), (64, "linear", False, 0.99), (64, "linear", True, 0.95),
                            (128, "relu", False, 0.95)),
    ("down_in", "block"): ((64, "linear", False, 0.99), (64, "linear", False, 0.95)),
    ("down_in", "neuron"): ((64, "linear", False, 0.99), (64, "linear", False, 0.95)),
}
TARGET = 0.5


def row_key(row: dict) -> tuple:
    return (row["model"], row["site"], row["granularity"], row["rank"], row["activation"], row["lookahead"], row["recall_target"])


def format_markdown(report: dict) -> str:
    lines = [
        *markdown_header(report, "Neuron predictors: recall, cost and perplexity"),
        machine_text(report) +
        f"Thresholds: target {TARGET}, calibrated on WikiText-2 valid ({report['calib_windows']} windows of {report['ctx']}). "
        "Predictors: trained on WikiText-2 valid (windows, token samples per layer and epochs in the `training` "
        f"column). Evaluation: WikiText-2 test, {report['eval_windows']} windows of {report['ctx']} tokens.",
        "",
        "Recall and precision are means over layers of the predicted set against the set that the threshold alone "
        "keeps, at the same tokens. `predicted` is the fraction of units (blocks of 32 neurons, or neurons) the "
        "predictor names, so 1 - predicted of gate_proj, up_proj and down_proj is skipped; `active` is the fraction "
        "left after the threshold inside the predicted set. Cost is predictor parameters over the FFN weights "
        "skipped, which is also the ratio of their FLOPs per token.",
        "",
        "| model | site | granularity | rank | activation | lookahead | training | recall target | recall | precision | predicted | active | cost | PPL dense | PPL oracle | PPL predicted | predicted / oracle |",
        "|---|---|---|---:|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in report["rows"]:
        lines.append(
            f"| {row['model']} | {row['site']} | {row['granularity']} | {row['rank']} | {row['activation']} | "
            f"{'yes' if row['lookahead'] else 'no'} | {row['training']['windows']} w, {row['training']['samples_per_layer']} s, "
            f"{row['training']['epochs']} ep | {row['recall_target']} | {row['recall']:.4f} | {row['precision']:.4f} | "
            f"{row['predicted_active']:.3f} | {row['active']:.3f} | {row['predictor_cost_ratio']:.3f} | {row['ppl_dense']:.3f} | "
            f"{row['ppl_oracle']:.3f} | {row['ppl_predicted']:.3f} | {row['ppl_predicted'] / row['ppl_oracle']:.4f} |"
        )
    if report.get("bench"):
        lines += [
            "",
            "## Decode speed with predicted blocks",
            "",
            "`python -m mlx_sparse.bench --predictor` on the gate_act block config, float32, same process and weights "
            "as mlx-lm (full tables in the linked files):",
            "",
            "| model | predictor | mlx-lm tok/s | threshold gather tok/s | predicted tok/s | predicted / mlx-lm | FFN bytes ratio (predicted) | bench |",
            "|---|---|---:|---:|---:|---:|---:|---|",
        ]
        for entry in report["bench"]:
            lines.append(
                f"| {entry['model']} | {entry['predictor']} | {entry['mlx_lm_tok_s']} | {entry['sparse_tok_s']} | "
                f"{entry['predicted_tok_s']} | {entry['speedup_predicted_vs_mlx_lm']} | {entry['ffn_bytes_ratio']} | "
                f"[{entry['path']}]({entry['path']}) |"
            )
    lines += ["", "## Targets", "", "| model | site | granularity | predictor | recall >= 0.95 with predicted <= 0.65 | "
              "PPL predicted <= oracle x 1.01 | cost <= 10% |", "|---|---|---|---|---|---|---|"]
    for row in report["rows"]:
        predictor = f"r{row['rank']} {row['activation']}{' lookahead' if row['lookahead'] else ''}, recall target {row['recall_target']}"
        lines.append(
            f"| {row['model']} | {row['site']} | {row['granularity']} | {predictor} | "
            f"{yes_no(row['recall'] >= 0.95 and row['predicted_active'] <= 0.65)} | "
            f"{yes_no(row['ppl_predicted'] <= row['ppl_oracle'] * 1.01)} | {yes_no(row['predictor_cost_ratio'] <= 0.10)} |"
        )
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def yes_no(value: bool) -> str:
    return "met" if value else "missed"


NOTES = """## Reading the tables

- Recall and the predicted-active fraction trade against each other through the decision
  threshold: a recall target of 0.95 on held-out tokens lands at 0.93-0.94 on the test text,
  just under the 0.95 bar, so the bar needs a held-out target near 0.96.
- A low-rank map from the FFN input names active blocks far better than from firing frequency
  alone (see patterns/), but a rank above 64 or a ReLU between the two maps adds nothing here:
  the limit is what the FFN input carries about the block scores, not the predictor's capacity.
- Neuron-level predictors (one output per neuron) cost more than the weights they let decoding
  skip on these small models: the 1536 or 2048 outputs of the second map alone are a large
  share of an FFN of hidden size 576 or 640.
- The predicted path scores a block against the token's RMS with the unpredicted blocks counted
  as zeros. That underestimates the RMS, so more blocks pass than with the threshold alone (the
  `active` column against 1 - target). Its perplexity can therefore beat the oracle's, and the
  comparison is not at equal sparsity. NOTE: a per-layer correction of that RMS, measured on
  calibration text, would put both at the same sparsity.
- The block configs themselves cost far more perplexity than neuron ones on these checkpoints
  (see quality.md and group.md), so the perplexity columns here measure prediction, not a
  usable operating point.
- The decode benchmark ran while other jobs held the cores. The README explains why speedups
  measured on busy cores overstate the gain: on quiet cores the float32 gather path ran at 0.87x
  mlx-lm."""


def save(report: dict, out: Path) -> None:
    write_text_atomic(out / "predict.json", json.dumps(report, indent=1) + "\n")
    write_text_atomic(out / "predict.md", format_markdown(report))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="smollm2-135m,gemma3-270m")
    parser.add_argument("--calib-windows", type=int, default=16)
    parser.add_argument("--train-windows", type=int, default=32)
    parser.add_argument("--eval-windows", type=int, default=8)
    parser.add_argument("--max-samples", type=int, default=16384)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--ctx", type=int, default=512)
    parser.add_argument("--bench-tokens", type=int, default=64)
    parser.add_argument("--bench-repeats", type=int, default=5)
    parser.add_argument("--skip-bench", action="store_true")
    parser.add_argument("--out", default="benchmarks/results")
    parser.add_argument("--work-dir", default="/tmp/mlx_sparse_predict", help="folder for the trained predictor files")
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--configs", default=",".join(f"{site}:{granularity}" for site, granularity in CONFIGS),
                        help="comma-separated site:granularity pairs to run")
    parser.add_argument("--max-predictors", type=int, default=None,
                        help="train at most this many of each config's predictor rows (the first ones)")
    args = parser.parse_args()
    setup_logging()

    out = Path(args.out)
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    report = new_report("predict.py", ctx=args.ctx, calib_windows=args.calib_windows, train_windows=args.train_windows, eval_windows=args.eval_windows, max_samples=args.max_samples, epochs=args.epochs, bench=[])
    if args.resume:
        resume(report, out / "predict.json", ("rows", "bench"))
    done = {row_key(row) for row in report["rows"]}

    for model_name in args.models.split(","):
        model, tokenizer = load(model_name)
        calibration = load_windows("wikitext2:valid", tokenizer, args.ctx, args.calib_windows)
        training = load_windows("wikitext2:valid", tokenizer, args.ctx, args.train_windows)
        evaluation = load_windows("wikitext2:test", tokenizer, args.ctx, args.eval_windows)
        known_dense = None

        for site, granularity in (tuple(item.split(":")) for item in args.configs.split(",")):
            config_path = out / "predict" / f"{model_name}_{site}_{granularity}50.json"
            pending = [
                spec for spec in PREDICTORS[(site, granularity)][: args.max_predictors]
                if (model_name, site, granularity, *spec) not in done
            ]
            if not pending and not (site == "gate_act" and not args.skip_bench):
                continue
            if config_path.is_file():
                config = load_config(config_path, model)
            else:
                config = calibrate_targets(model, calibration, [TARGET], site, granularity)[0]
                config.save(config_path)
            if not pending:
                continue

            if known_dense is None:
                unsparsify(model)
                known_dense = evaluate_perplexity(model, evaluation, description="perplexity, dense").ppl
            sparsify(model, config)
            oracle = evaluate_perplexity(model, evaluation, description="perplexity, oracle sets")
            unsparsify(model)
            known = {"ppl_dense": known_dense, "ppl_oracle": oracle.ppl, "oracle_sparsity": oracle.actual_sparsity}

            for rank, activation, lookahead, recall in pending:
                name = f"{model_name}_{site}_{granularity}_r{rank}_{activation}{'_lookahead' if lookahead else ''}_recall{recall}"
                predictor_path = work / f"{name}.safetensors"
                predictors = train_predictors(
                    model, config, training, rank=rank, activation=activation, lookahead=lookahead,
                    recall_target=recall, max_samples=args.max_samples, epochs=args.epochs,
                )
                predictors.save(predictor_path)
                result = evaluate_predictor(model, config, load_predictor(predictor_path, model, config), evaluation, known)
                row = {"model": model_name, "site": site, "granularity": granularity, "rank": rank,
                       "activation": activation, "lookahead": lookahead, "recall_target": recall,
                       "config": str(config_path), "predictor_file": str(predictor_path),
                       "training": predictors.header.training, **result}
                report["rows"].append(row)
                done.add(row_key(row))
                save(report, out)
                logger.info("%s: recall %.4f, predicted %.3f, PPL oracle %.3f, predicted %.3f", name, row["recall"],
                            row["predicted_active"], row["ppl_oracle"], row["ppl_predicted"])

        if args.skip_bench or any(entry["model"] == model_name for entry in report["bench"]):
            continue
        from mlx_sparse import bench

        config_path = out / "predict" / f"{model_name}_gate_act_block50.json"
        predictor_path = work / f"{model_name}_gate_act_block_r64_linear_recall0.95.safetensors"
        bench_dir = out / "predict" / f"bench_{model_name}"
        del model
        code = bench.main([
            "--model", model_name, "--dtype", "float32", "--sparsity", str(config_path), "--predictor", str(predictor_path),
            "--new-tokens", str(args.bench_tokens), "--repeats", str(args.bench_repeats), "--out", str(bench_dir),
        ])
        if code:
            logger.error("bench failed for %s (exit %s)", model_name, code)
            continue
        measured = json.loads((bench_dir / "bench.json").read_text())
        report["bench"].append({
            "model": model_name, "predictor": "r64 linear, recall 0.95", "path": str(bench_dir.relative_to(out) / "bench.md"),
            "mlx_lm_tok_s": measured["mlx_lm_tok_s"], "sparse_tok_s": measured["sparse_tok_s"],
            "predicted_tok_s": measured["predicted_tok_s"], "speedup_predicted_vs_mlx_lm": measured["speedup_predicted_vs_mlx_lm"],
            "ffn_bytes_ratio": measured["details"]["predicted"]["ffn_bytes_ratio"],
        })
        save(report, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
