"""Stream text from a model, dense or with a sparsity config applied to its FFNs.

    python -m mlx_sparse.generate --model smollm2-135m --sparsity cfg.json --prompt "Hello"

The flags mirror mlx-lm's `mlx_lm.generate` where they exist. Decoding uses mlx-lm's
`stream_generate`, so with no sparsity config the tokens are those mlx-lm produces. A block
config at site gate_act or down_in decodes through the gather path (`mlx_sparse.runtime`), which
reads only the active FFN blocks. Any other config masks the site values and still reads every
weight.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

import mlx.core as mx

from .cli import ArgumentParser, run_command, setup_logging
from .errors import UserError

logger = logging.getLogger(__name__)


def build_prompt(tokenizer, prompt: str, use_chat_template: bool) -> list[int]:
    """Tokenise `prompt`, wrapping it in the tokenizer's chat template when it has one and it is wanted."""
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.generate", description="Generate text with FFN activation sparsity.")
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--sparsity", help="sparsity config JSON from mlx_sparse.calibrate (omit for dense)")
    parser.add_argument("--prompt", "-p", default="The capital of France is", help="prompt text; '-' reads standard input")
    parser.add_argument("--max-tokens", "-m", type=int, default=100, help="maximum new tokens (default 100)")
    parser.add_argument("--temp", type=float, default=0.0, help="sampling temperature; 0 is greedy (default 0)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling probability mass (default 1.0: off)")
    parser.add_argument("--seed", type=int, help="random seed for sampling")
    parser.add_argument("--ignore-chat-template", action="store_true", help="feed the prompt as plain text")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="cast float weights to this type")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.max_tokens < 1:
        raise UserError(f"invalid --max-tokens {args.max_tokens}; use a positive number of tokens")
    if args.temp < 0:
        raise UserError(f"invalid --temp {args.temp}; use 0 for greedy or a positive temperature")
    if not 0 < args.top_p <= 1:
        raise UserError(f"invalid --top-p {args.top_p}; use a probability in (0, 1]")

    from mlx_lm.generate import stream_generate
    from mlx_lm.sample_utils import make_sampler

    from . import runtime, sparsity
    from .blas import log_blas
    from .loading import load

    config = sparsity.load_config(args.sparsity) if args.sparsity else None
    log_blas()
    model, tokenizer = load(args.model, dtype=args.dtype)
    gather = config is not None and uses_gather(config)
    if gather:
        runtime.apply_gather(model, config)
    elif config is not None:
        sparsity.sparsify(model, config)
        logger.info(
            "FFN thresholds applied: site %s, %s, target %.2f (masked: every weight is still read; "
            "the gather path needs a block config at site gate_act or down_in, magnitude scores and no dense prefix)",
            config.site, config.granularity, config.target,
        )

    if args.seed is not None:
        mx.random.seed(args.seed)
    prompt_text = sys.stdin.read() if args.prompt == "-" else args.prompt
    prompt = build_prompt(tokenizer, prompt_text, not args.ignore_chat_template)
    sampler = make_sampler(temp=args.temp, top_p=args.top_p if args.top_p < 1 else 0.0)

    response = None
    for response in stream_generate(model, tokenizer, prompt, max_tokens=args.max_tokens, sampler=sampler):
        if gather and response.generation_tokens == 1:
            # The prompt has been processed, so the block counters start here and count decode steps only.
            runtime.set_gather_stats(model, True)
        print(response.text, end="", flush=True)
    print()
    if response is not None:
        print(
            f"prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.1f} tokens/s; "
            f"generation: {response.generation_tokens} tokens, {response.generation_tps:.1f} tokens/s; "
            f"peak memory {response.peak_memory:.3f} GB",
            file=sys.stderr,
        )
    if gather and response is not None and response.generation_tokens > 1:
        counted = runtime.gather_stats(model)
        print(
            f"gather path: {counted['active_fraction']:.1%} of FFN blocks active, FFN weight bytes read "
            f"{counted['ffn_bytes_ratio']:.1%} of dense per decode token",
            file=sys.stderr,
        )
    return 0


def uses_gather(config) -> bool:
    """Return whether `config` can run on the gather path: block granularity at gate_act or down_in, magnitude
    scores and no dense prefix."""
    from .kernels import SITES

    return config.granularity == "block" and config.site in SITES and config.score == "magnitude" and not config.dense_prefix


if __name__ == "__main__":
    run_command(main)
