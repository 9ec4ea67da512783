"""Train and evaluate neuron predictors.

    python -m mlx_sparse.predict train --model smollm2-135m --sparsity cfg.json --rank 64 -o pred.safetensors
    python -m mlx_sparse.predict eval --model smollm2-135m --sparsity cfg.json --predictor pred.safetensors --json
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path

from ..cli import ArgumentParser, check_output_file, run_command, setup_logging
from ..errors import UserError
from .predictor import ACTIVATIONS

logger = logging.getLogger(__name__)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.predict", description="Train or evaluate per-layer neuron predictors.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)

    def common(sub: ArgumentParser, data: str, windows: int) -> None:
        sub.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
        sub.add_argument("--sparsity", required=True, help="sparsity config JSON at site gate_act or down_in")
        sub.add_argument("--data", default=data, help=f"text to run (default {data})")
        sub.add_argument("--data-dir", help="folder with wikitext-2-raw/ (default: $MLX_SPARSE_DATA_DIR)")
        sub.add_argument("--ctx", type=int, default=512, help="tokens per window (default 512)")
        sub.add_argument("--max-windows", type=int, default=windows, help=f"windows to use (default {windows})")
        sub.add_argument("-v", "--verbose", action="store_true")

    train = commands.add_parser("train", help="train predictors on calibration text")
    common(train, "wikitext2:valid", 32)
    train.add_argument("--rank", type=int, default=64, help="rank of each layer's predictor (default 64)")
    train.add_argument("--activation", choices=ACTIVATIONS, default="linear", help="between the two low-rank maps (default linear)")
    train.add_argument("--lookahead", action="store_true", help="predict layer l from the FFN input of layer l-1")
    train.add_argument("--recall", type=float, default=0.99, help="held-out recall that sets each decision threshold (default 0.99)")
    train.add_argument("--max-samples", type=int, default=16384, help="token samples kept per layer (default 16384)")
    train.add_argument("--epochs", type=int, default=8, help="passes over the samples (default 8)")
    train.add_argument("--batch-size", type=int, default=256, help="samples per step (default 256)")
    train.add_argument("--learning-rate", type=float, default=3e-3, help="Adam learning rate (default 3e-3)")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("-o", "--output", required=True, help="predictor file to write (.safetensors)")

    evaluate = commands.add_parser("eval", help="measure recall, precision and perplexity with predicted sets")
    common(evaluate, "wikitext2:test", 8)
    evaluate.add_argument("--predictor", required=True, help="predictor file from the train command")
    evaluate.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    return parser


def check_common(args) -> None:
    if not Path(args.sparsity).is_file():
        raise UserError(f"sparsity config {args.sparsity} not found; create one with python -m mlx_sparse.calibrate")
    if args.ctx < 2:
        raise UserError(f"invalid --ctx {args.ctx}; use at least 2 tokens, such as 512")
    if args.max_windows is not None and args.max_windows < 1:
        raise UserError(f"invalid --max-windows {args.max_windows}; use a positive integer")


def run_train(args) -> None:
    from ..data import load_windows
    from ..loading import load
    from ..sparsity import load_config
    from .train import train_predictors
    from .truth import check_predict_config

    if args.rank < 1:
        raise UserError(f"invalid --rank {args.rank}; use a positive integer such as 64")
    if not 0.0 < args.recall <= 1.0:
        raise UserError(f"invalid --recall {args.recall}; use a fraction in (0, 1], such as 0.99")
    output = check_output_file(args.output)
    if output.suffix != ".safetensors":
        raise UserError(f"predictor output {output} must end in .safetensors; use a name such as pred.safetensors")
    config = load_config(args.sparsity)
    check_predict_config(config)

    model, tokenizer = load(args.model)
    config.check_model(model)
    windows = load_windows(args.data, tokenizer, args.ctx, args.max_windows, args.data_dir)
    predictors = train_predictors(
        model, config, windows, rank=args.rank, activation=args.activation, lookahead=args.lookahead,
        recall_target=args.recall, max_samples=args.max_samples, epochs=args.epochs, batch_size=args.batch_size,
        learning_rate=args.learning_rate, seed=args.seed,
    )
    predictors.save(output)
    logger.info("Wrote %s (%d parameters)", output, predictors.num_parameters)


def run_eval(args) -> None:
    from ..data import load_windows
    from ..loading import load
    from ..sparsity import load_config
    from .apply import evaluate_predictor
    from .predictor import load_predictor

    config = load_config(args.sparsity)
    load_predictor(args.predictor)
    model, tokenizer = load(args.model)
    config.check_model(model)
    predictors = load_predictor(args.predictor, model, config)
    windows = load_windows(args.data, tokenizer, args.ctx, args.max_windows, args.data_dir)
    result = evaluate_predictor(model, config, predictors, windows)
    result = {"model": args.model, "sparsity": args.sparsity, "predictor": args.predictor, "data": args.data, **result}

    if args.json:
        print(json.dumps(result))
        return
    print(
        f"recall {result['recall']:.4f}, precision {result['precision']:.4f}, predicted active "
        f"{result['predicted_active']:.4f}, predictor cost {result['predictor_cost_ratio']:.3f} of the skipped FFN weights\n"
        f"perplexity: dense {result['ppl_dense']:.3f}, oracle sets {result['ppl_oracle']:.3f}, "
        f"predicted sets {result['ppl_predicted']:.3f} ({result['windows']} windows of {result['ctx']})"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    check_common(args)
    if args.command == "train":
        run_train(args)
    else:
        run_eval(args)
    return 0


if __name__ == "__main__":
    run_command(main)
