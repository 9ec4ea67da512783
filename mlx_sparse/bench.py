"""Decode speed of the gather path against mlx-lm and the dense port, in one process.

    python -m mlx_sparse.bench --model smollm2-135m --sparsity cfg.json --new-tokens 64 --out DIR

Three decoders run the same prompt, interleaved round after round after one warm-up round:
mlx-lm's own model (`mlx_lm.load` on the same converted folder), this package's port with dense
FFNs, and the port with `BlockSparseFFN` (the gather path). A fourth, the gather path with
threshold 0 ("all blocks"), runs the block layout without skipping anything, which separates the
effect of the layout from that of the sparsity. A fifth, with every FFN returning zeros, times the
rest of the decode step. Each reports decode tokens/s (prefill and the first token excluded), and
the medians over `--repeats` rounds go to `DIR/bench.json` and `DIR/bench.md`. The FFN alone is
timed on hidden states captured from a short dense decode, and weight bytes per token are counted
from the blocks that the gather path actually read.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from .cli import ArgumentParser, run_command, setup_logging, write_text_atomic
from .errors import UserError
from .progress import progress_bar

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "The history of the city begins"
DTYPES = ("float32", "q4")
# 4-bit quantization for models stored in floating point: the group size must divide the block
# size of the gather path, and the real-model aliases use 32.
Q4_GROUP_SIZE = 32
# Decode steps whose FFN inputs are captured for the FFN-alone timing.
CAPTURE_TOKENS = 16
# Passes over the captured inputs per timed FFN round.
FFN_PASSES = 3

# "no_ffn" decodes with every FFN replaced by zeros. Its tokens are meaningless, but its step time
# is the part of a decode step spent outside the FFNs.
VARIANTS = ("mlx_lm", "dense", "sparse", "all_blocks", "no_ffn")
FFN_VARIANTS = ("dense", "sparse", "all_blocks")
# With --predictor, a sixth variant decodes through the gather path with predicted block sets.
PREDICTED = "predicted"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.bench", description="Benchmark gather-path decoding against mlx-lm.")
    parser.add_argument("--model", required=True, help="alias or mlx-lm folder")
    parser.add_argument("--sparsity", required=True, help="block sparsity config JSON (site gate_act or down_in)")
    parser.add_argument("--new-tokens", type=int, default=64, help="decode tokens timed per run (default 64)")
    parser.add_argument("--out", required=True, help="folder for bench.json and bench.md")
    parser.add_argument("--dtype", choices=DTYPES, help="float32 or q4: picks the alias of that storage, or casts/quantizes a folder (default: as stored)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds after the warm-up; medians are reported (default 3)")
    parser.add_argument("--prompt", default=DEFAULT_PROMPT, help="prompt text, fed without a chat template")
    parser.add_argument("--up-mode", choices=["gather", "dense"], help="up_proj of the gather path (default: gather at gate_act, dense at down_in)")
    parser.add_argument("--predictor", help="predictor file (python -m mlx_sparse.predict train) for a decoder that computes predicted blocks only")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def resolve_model(spec: str, dtype: str | None) -> tuple[str, Path, str | None]:
    """Return (spec to load, folder that mlx-lm loads, conversion left to do: "float32", "q4" or None).

    An alias is swapped for its sibling of the requested storage (smollm2-135m <-> smollm2-135m-q4).
    """
    from .aliases import ALIASES, ensure_alias
    from .loading import resolve_spec

    if spec in ALIASES:
        if dtype is not None:
            base = spec.removesuffix("-q4")
            spec = base if dtype == "float32" else f"{base}-q4"
            if spec not in ALIASES:
                raise UserError(f"model alias {base!r} has no {dtype} sibling; use one of {', '.join(ALIASES)}")
        return spec, ensure_alias(spec), None

    kind, path = resolve_spec(spec)
    if kind != "folder":
        raise UserError(f"bench needs an mlx-lm folder or alias for the mlx-lm baseline, not {spec}; convert it with python -m mlx_sparse.convert")
    return spec, path, dtype


def cast_floats(model: nn.Module, dtype: mx.Dtype) -> None:
    """Cast every floating-point parameter (quantization scales and biases included) to `dtype`."""

    def cast(value):
        if isinstance(value, mx.array) and mx.issubdtype(value.dtype, mx.floating):
            return value.astype(dtype)
        return value

    model.update(tree_map(cast, model.parameters()))


def convert_storage(model: nn.Module, dtype: str | None, name: str) -> None:
    """Cast float weights to float32 or quantize to 4 bits, the same way for every model compared.

    On the CPU the floating-point parameters that remain (norms, quantization scales and biases)
    are cast to float32 as well. The 4-bit aliases store them as float16, and MLX 0.32.4 has no
    fast float16 CPU kernels: SmolLM2-135M 4-bit decoded at about 0.1 tokens/s with float16
    scales and 7 tokens/s with float32 ones (MLX 0.32.4 CPU backend, 2-core x86 with OpenBLAS).
    """
    quantized = any(isinstance(module, nn.QuantizedLinear) for module in model.modules())
    if dtype == "float32":
        if quantized:
            raise UserError(f"model {name} is quantized and cannot be cast to float32; pass a float model or --dtype q4")
        cast_floats(model, mx.float32)
    elif dtype == "q4" and not quantized:
        nn.quantize(model, group_size=Q4_GROUP_SIZE, bits=4)

    if mx.default_device() == mx.cpu:
        cast_floats(model, mx.float32)
    mx.eval(model.parameters())


def share_weights(model: nn.Module, reference: nn.Module) -> bool:
    """Load the mlx-lm model's parameter arrays into the port, so both decoders read the same memory.

    Two separately loaded copies of SmolLM2-135M decoded 5-7% apart, with the faster one always the
    copy loaded second, whichever code ran it (2-core x86, MLX 0.32.4). With shared arrays the
    port and mlx-lm ran within 2%, so the comparison measures the code and not where the weights sit.
    Returns False, and keeps separate copies, when the parameter names or shapes differ.
    """
    try:
        model.load_weights(list(tree_flatten(reference.parameters())), strict=True)
    except ValueError as exc:
        logger.warning("Port and mlx-lm parameters differ (%s); comparing separately loaded weights", exc)
        return False
    mx.eval(model.parameters())
    return True


class _ZeroFFN(nn.Module):
    """FFN stand-in that returns zeros: a decode with it times everything but the FFNs."""

    def __call__(self, x: mx.array) -> mx.array:
        return mx.zeros_like(x)


class _CaptureFFN(nn.Module):
    """Pass-through wrapper that keeps the inputs of single-token calls of an FFN."""

    def __init__(self, mlp: nn.Module):
        super().__init__()
        self.mlp = mlp
        object.__setattr__(self, "inputs", [])

    def __call__(self, x: mx.array) -> mx.array:
        if x.shape[-2] == 1:
            self.inputs.append(x)
        return self.mlp(x)


def set_ffns(model: nn.Module, ffns: list[nn.Module]) -> None:
    for layer, ffn in zip(model.layers, ffns):
        layer.mlp = ffn


def decode(model: nn.Module, prompt: mx.array, new_tokens: int, after_first=None) -> tuple[float, list[int]]:
    """Greedy-decode `new_tokens` tokens after the first one; return (tokens/s, all generated tokens).

    The clock starts when the first token (the prefill's output) is out, as in mlx-lm's generation
    tokens/s. `after_first` runs at that moment (it starts the block counters).
    """
    from mlx_lm.generate import generate_step

    steps = generate_step(prompt, model, max_tokens=new_tokens + 1)
    first, _ = next(steps)
    if after_first is not None:
        after_first()
    start = time.perf_counter()
    tokens = [int(first)] + [int(token) for token, _ in steps]
    elapsed = time.perf_counter() - start
    return new_tokens / elapsed, tokens


def capture_ffn_inputs(model: nn.Module, prompt: mx.array, tokens: int) -> list[list[mx.array]]:
    """Run a short decode with each FFN wrapped and return its single-token inputs, per layer."""
    dense = [layer.mlp for layer in model.layers]
    wrappers = [_CaptureFFN(mlp) for mlp in dense]
    set_ffns(model, wrappers)
    try:
        decode(model, prompt, tokens)
    finally:
        set_ffns(model, dense)
    inputs = [wrapper.inputs for wrapper in wrappers]
    mx.eval(inputs)
    return inputs


def time_ffns(ffns: list[nn.Module], inputs: list[list[mx.array]]) -> float:
    """Return ms per token for all layers' FFNs on the captured inputs, one evaluation per token."""
    tokens = min(len(layer_inputs) for layer_inputs in inputs)
    start = time.perf_counter()
    for _ in range(FFN_PASSES):
        for t in range(tokens):
            mx.eval([ffn(layer_inputs[t]) for ffn, layer_inputs in zip(ffns, inputs)])
    return (time.perf_counter() - start) * 1000 / (FFN_PASSES * tokens)


def time_lm_head(model: nn.Module, repeats: int = 20) -> float:
    """Return ms for the output projection of one token (the embedding matrix when tied)."""
    hidden = model.args.hidden_size
    x = mx.random.normal((1, 1, hidden), key=mx.random.key(0))
    head = model.lm_head if "lm_head" in model else model.model.embed_tokens.as_linear
    mx.eval(head(x))
    start = time.perf_counter()
    for _ in range(repeats):
        mx.eval(head(x))
    return (time.perf_counter() - start) * 1000 / repeats


def machine_info() -> dict:
    from mlx_lm import __version__ as mlx_lm_version

    from .blas import loaded_blas

    return {
        "threads": {"cpu_count": os.cpu_count(), "OPENBLAS_NUM_THREADS": os.environ.get("OPENBLAS_NUM_THREADS")},
        "blas": loaded_blas(),
        "device": str(mx.default_device()),
        "platform": f"{platform.system()} {platform.machine()}",
        "mlx_version": mx.__version__,
        "mlx_lm_version": mlx_lm_version,
    }


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 3) if denominator else None


def _zero_thresholds(config):
    """Return a copy of `config` with every threshold 0: the gather path then reads every block."""
    return replace(config, thresholds=[{name: 0.0 for name in entry} for entry in config.thresholds])


def build_decoders(model: nn.Module, reference: nn.Module, config, up_mode: str | None, predictors=None) -> dict[str, tuple]:
    """Return {variant: (model, FFNs to swap in or None)} for every name in VARIANTS, and PREDICTED with `predictors`.

    The dense and gather FFNs are built once and swapped in, so the rounds do not rebuild weights.
    The gather FFNs share the float gate_proj and up_proj weights with the dense ones.
    """
    from .runtime import apply_gather

    dense_ffns = [layer.mlp for layer in model.layers]
    apply_gather(model, _zero_thresholds(config), up_mode=up_mode)
    all_block_ffns = [layer.mlp for layer in model.layers]
    set_ffns(model, dense_ffns)
    apply_gather(model, config, up_mode=up_mode)
    sparse_ffns = [layer.mlp for layer in model.layers]
    set_ffns(model, dense_ffns)
    decoders = {
        "mlx_lm": (reference, None),
        "dense": (model, dense_ffns),
        "sparse": (model, sparse_ffns),
        "all_blocks": (model, all_block_ffns),
        "no_ffn": (model, [_ZeroFFN() for _ in model.layers]),
    }
    if predictors is not None:
        from .predict import attach_predictor

        apply_gather(model, config, up_mode="gather")
        attach_predictor(model, config, predictors)
        decoders[PREDICTED] = (model, [layer.mlp for layer in model.layers])
        set_ffns(model, dense_ffns)
    model.sparsity_config = None
    return decoders


@dataclass
class Rounds:
    """Measurements of the timed rounds, one list entry per round."""

    tok_s: dict[str, list[float]] = field(default_factory=dict)
    ffn_ms: dict[str, list[float]] = field(default_factory=dict)
    # Tokens of each variant's first (warm-up) decode.
    tokens: dict[str, list[int]] = field(default_factory=dict)


def time_rounds(decoders: dict, prompt: mx.array, ffn_inputs: list[list[mx.array]], new_tokens: int, repeats: int) -> Rounds:
    """Run one warm-up round and `repeats` timed rounds, each of which runs every variant once.

    The order of the variants rotates by one place per round, so that no variant always follows
    the same one: with 5 variants and 5 rounds, each variant runs once in each position.
    """
    rounds = Rounds()
    names = list(decoders)
    ffn_names = [name for name in (*FFN_VARIANTS, PREDICTED) if name in decoders]
    with progress_bar() as progress:
        task = progress.add_task("bench rounds", total=repeats + 1)
        for round_index in range(repeats + 1):
            timed = round_index > 0
            shift = round_index % len(names)
            for name in names[shift:] + names[:shift]:
                decoder, ffns = decoders[name]
                if ffns is not None:
                    set_ffns(decoder, ffns)
                speed, generated = decode(decoder, prompt, new_tokens)
                rounds.tokens.setdefault(name, generated)
                if timed:
                    rounds.tok_s.setdefault(name, []).append(speed)

            for name in ffn_names:
                elapsed = time_ffns(decoders[name][1], ffn_inputs)
                if timed:
                    rounds.ffn_ms.setdefault(name, []).append(elapsed)

            if timed:
                speeds = ", ".join(f"{name} {rounds.tok_s[name][-1]:.1f}" for name in names)
                logger.info("round %d of %d, tokens/s: %s", round_index, repeats, speeds)
            progress.advance(task)
    return rounds


def count_sparse_bytes(model: nn.Module, sparse_ffns: list[nn.Module], prompt: mx.array, new_tokens: int) -> dict:
    """Decode once with the block counters on (from the first token on) and return `gather_stats`."""
    from .runtime import gather_stats, set_gather_stats

    set_ffns(model, sparse_ffns)
    decode(model, prompt, new_tokens, after_first=lambda: set_gather_stats(model, True))
    counted = gather_stats(model)
    set_gather_stats(model, False)
    return counted


def run_bench(args) -> dict:
    from mlx_lm import load as mlx_lm_load

    from .loading import load
    from .runtime import check_gather_config, model_dtype, weight_bytes_per_token
    from .sparsity import load_config

    config = load_config(args.sparsity)
    check_gather_config(config)
    spec, folder, conversion = resolve_model(args.model, args.dtype)

    model, tokenizer = load(spec)
    config.check_model(model)
    predictors = None
    if args.predictor:
        from .predict import load_predictor

        predictors = load_predictor(args.predictor, model, config)
    reference, _ = mlx_lm_load(str(folder))
    convert_storage(model, conversion, spec)
    convert_storage(reference, conversion, f"{spec} (mlx-lm)")
    shared = share_weights(model, reference)

    load_average_start = os.getloadavg()
    prompt = mx.array(tokenizer.encode(args.prompt))
    ffn_inputs = capture_ffn_inputs(model, prompt, min(args.new_tokens, CAPTURE_TOKENS))
    decoders = build_decoders(model, reference, config, args.up_mode, predictors)

    mx.reset_peak_memory()
    rounds = time_rounds(decoders, prompt, ffn_inputs, args.new_tokens, args.repeats)
    peak_memory = mx.get_peak_memory()

    sparse_ffns = decoders["sparse"][1]
    counted = count_sparse_bytes(model, sparse_ffns, prompt, args.new_tokens)
    predicted_counted = count_sparse_bytes(model, decoders[PREDICTED][1], prompt, args.new_tokens) if predictors else None
    set_ffns(model, decoders["dense"][1])
    parts = weight_bytes_per_token(model)
    bytes_dense = parts["total"]
    bytes_sparse = parts["total"] - parts["ffn"] + counted["ffn_bytes_per_token"]
    lm_head_ms = time_lm_head(model)

    medians = {name: statistics.median(values) for name, values in rounds.tok_s.items()}
    ffn_medians = {name: statistics.median(values) for name, values in rounds.ffn_ms.items()}
    decode_ms = {name: 1000 / medians[name] for name in VARIANTS}
    storage = model_dtype(model)
    machine = machine_info()
    result = {
        "model": spec,
        "sparsity": str(args.sparsity),
        "dtype": "q4" if storage == "q4" else storage,
        "threads": machine["threads"],
        "blas": machine["blas"],
        "mlx_lm_tok_s": round(medians["mlx_lm"], 2),
        "dense_tok_s": round(medians["dense"], 2),
        "sparse_tok_s": round(medians["sparse"], 2),
        "speedup_sparse_vs_mlx_lm": ratio(medians["sparse"], medians["mlx_lm"]),
        "speedup_dense_vs_mlx_lm": ratio(medians["dense"], medians["mlx_lm"]),
        "ffn_ms_dense": round(ffn_medians["dense"], 3),
        "ffn_ms_sparse": round(ffn_medians["sparse"], 3),
        "weight_bytes_per_token_dense": int(bytes_dense),
        "weight_bytes_per_token_sparse": int(round(bytes_sparse)),
        "peak_memory_bytes": int(peak_memory),
        "details": {
            "config": {"site": config.site, "granularity": config.granularity, "block_size": config.block_size,
                       "target": config.target, "calibrated_on": config.model_id},
            "up_mode": sparse_ffns[0].up_mode,
            "weights_shared_with_mlx_lm": shared,
            "float_parameters_dtype": str(model.model.norm.weight.dtype).removeprefix("mlx.core."),
            "new_tokens": args.new_tokens,
            "repeats": args.repeats,
            "prompt_tokens": int(prompt.size),
            "all_blocks_tok_s": round(medians["all_blocks"], 2),
            "speedup_all_blocks_vs_mlx_lm": ratio(medians["all_blocks"], medians["mlx_lm"]),
            "speedup_sparse_vs_all_blocks": ratio(medians["sparse"], medians["all_blocks"]),
            "ffn_ms_all_blocks": round(ffn_medians["all_blocks"], 3),
            "speedup_ffn_sparse_vs_dense": ratio(ffn_medians["dense"], ffn_medians["sparse"]),
            "tok_s_rounds": {name: [round(value, 2) for value in values] for name, values in rounds.tok_s.items()},
            "ffn_ms_rounds": {name: [round(value, 3) for value in values] for name, values in rounds.ffn_ms.items()},
            "dense_tokens_match_mlx_lm": rounds.tokens["dense"] == rounds.tokens["mlx_lm"],
            "all_blocks_tokens_match_dense": rounds.tokens["all_blocks"] == rounds.tokens["dense"],
            "sparse_tokens_match_dense": rounds.tokens["sparse"] == rounds.tokens["dense"],
            "active_fraction": round(counted["active_fraction"], 4),
            "ffn_bytes_ratio": round(counted["ffn_bytes_ratio"], 4),
            "weight_bytes_ratio": ratio(bytes_sparse, bytes_dense),
            "weight_bytes_per_token_parts": parts,
            "ms_per_token": {
                "decode_mlx_lm": round(decode_ms["mlx_lm"], 2),
                "decode_dense": round(decode_ms["dense"], 2),
                "decode_sparse": round(decode_ms["sparse"], 2),
                "decode_no_ffn": round(decode_ms["no_ffn"], 2),
                "ffn_in_decode_dense": round(decode_ms["dense"] - decode_ms["no_ffn"], 2),
                "ffn_in_decode_sparse": round(decode_ms["sparse"] - decode_ms["no_ffn"], 2),
                "ffn_alone_dense": round(ffn_medians["dense"], 2),
                "ffn_alone_sparse": round(ffn_medians["sparse"], 2),
                "lm_head_alone": round(lm_head_ms, 2),
            },
            "load_average_start": [round(value, 2) for value in load_average_start],
            "load_average_end": [round(value, 2) for value in os.getloadavg()],
            **{key: value for key, value in machine.items() if key not in ("threads", "blas")},
        },
    }
    if predictors is not None:
        header = predictors.header
        result["predicted_tok_s"] = round(medians[PREDICTED], 2)
        result["speedup_predicted_vs_mlx_lm"] = ratio(medians[PREDICTED], medians["mlx_lm"])
        result["details"]["predicted"] = {
            "predictor": str(args.predictor),
            "rank": header.rank,
            "activation": header.activation,
            "lookahead": header.lookahead,
            "recall_target": header.recall_target,
            "ffn_ms": round(ffn_medians[PREDICTED], 3),
            "speedup_ffn_vs_dense": ratio(ffn_medians["dense"], ffn_medians[PREDICTED]),
            "speedup_vs_sparse": ratio(medians[PREDICTED], medians["sparse"]),
            "active_fraction": round(predicted_counted["active_fraction"], 4),
            "ffn_bytes_ratio": round(predicted_counted["ffn_bytes_ratio"], 4),
            "weight_bytes_per_token": int(round(parts["total"] - parts["ffn"] + predicted_counted["ffn_bytes_per_token"])),
            "tokens_match_sparse": rounds.tokens[PREDICTED] == rounds.tokens["sparse"],
            "decode_ms": round(1000 / medians[PREDICTED], 2),
        }
    return result


def render_markdown(result: dict) -> str:
    details = result["details"]
    parts = details["ms_per_token"]
    rows = [
        ("decode tokens/s: mlx-lm dense", result["mlx_lm_tok_s"]),
        ("decode tokens/s: mlx_sparse dense", result["dense_tok_s"]),
        ("decode tokens/s: mlx_sparse sparse (gather)", result["sparse_tok_s"]),
        ("decode tokens/s: gather path, all blocks (threshold 0)", details["all_blocks_tok_s"]),
        ("speedup sparse / mlx-lm", result["speedup_sparse_vs_mlx_lm"]),
        ("speedup dense / mlx-lm", result["speedup_dense_vs_mlx_lm"]),
        ("speedup sparse / all blocks", details["speedup_sparse_vs_all_blocks"]),
        ("FFN ms per token: dense MLP", result["ffn_ms_dense"]),
        ("FFN ms per token: gather, sparse", result["ffn_ms_sparse"]),
        ("FFN ms per token: gather, all blocks", details["ffn_ms_all_blocks"]),
        ("FFN speedup sparse / dense", details["speedup_ffn_sparse_vs_dense"]),
        ("decode step ms: mlx-lm / dense / sparse", f"{parts['decode_mlx_lm']} / {parts['decode_dense']} / {parts['decode_sparse']}"),
        ("decode step ms with zero FFNs (attention, norms, lm_head, sampling)", parts["decode_no_ffn"]),
        ("FFN ms inside the decode step: dense / sparse", f"{parts['ffn_in_decode_dense']} / {parts['ffn_in_decode_sparse']}"),
        ("lm_head ms per token (alone)", parts["lm_head_alone"]),
        ("active blocks (fraction of token-block pairs)", details["active_fraction"]),
        ("weight bytes per token: dense", result["weight_bytes_per_token_dense"]),
        ("weight bytes per token: sparse", result["weight_bytes_per_token_sparse"]),
        ("weight bytes ratio: whole model / FFN only", f"{details['weight_bytes_ratio']} / {details['ffn_bytes_ratio']}"),
        ("peak memory (bytes)", result["peak_memory_bytes"]),
        ("dense tokens equal mlx-lm's", details["dense_tokens_match_mlx_lm"]),
    ]
    predicted = details.get("predicted")
    if predicted is not None:
        rows += [
            ("decode tokens/s: gather path, predicted blocks", result["predicted_tok_s"]),
            ("speedup predicted / mlx-lm", result["speedup_predicted_vs_mlx_lm"]),
            ("FFN ms per token: gather, predicted blocks", predicted["ffn_ms"]),
            ("predicted path: active fraction after the threshold / FFN bytes ratio",
             f"{predicted['active_fraction']} / {predicted['ffn_bytes_ratio']}"),
        ]
    table = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return (
        f"# Decode benchmark: {result['model']} ({result['dtype']})\n\n"
        f"Sparsity config: `{result['sparsity']}` (site {details['config']['site']}, block {details['config']['block_size']}, "
        f"target {details['config']['target']}, up_proj {details['up_mode']}).\n\n"
        f"{details['new_tokens']} decode tokens after a {details['prompt_tokens']}-token prompt, median of "
        f"{details['repeats']} interleaved rounds (variant order rotated each round) after a warm-up. {details['platform']}, device {details['device']}, "
        f"{result['threads']['cpu_count']} cores, OPENBLAS_NUM_THREADS={result['threads']['OPENBLAS_NUM_THREADS']}, "
        f"BLAS {result['blas']}, MLX {details['mlx_version']}, mlx-lm {details['mlx_lm_version']}, load average "
        f"{details['load_average_start']} at start and {details['load_average_end']} at end.\n\n"
        "| measure | value |\n|---|---|\n"
        f"{table}\n\n"
        "Weight bytes per token count every weight, scale and bias that one decode step reads: attention, norms, "
        "the FFNs and the lm_head (the tied embedding matrix), plus one embedding row when untied. For the sparse "
        "path the FFN part is the gate_proj, up_proj and down_proj blocks that the gather path read, averaged over "
        "the decoded tokens. The port reads the mlx-lm model's weight arrays (shared in memory) unless "
        "`weights_shared_with_mlx_lm` is false. Peak memory is the MLX peak of the whole benchmark process, which "
        "holds both models and the gather FFNs at once. FFN times run all layers' FFNs on inputs captured from a dense "
        "decode, evaluated once per token. The FFN time inside the decode step is the step time minus that of a "
        "decode whose FFNs return zeros, and the lm_head time is one output projection alone.\n"
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.new_tokens < 1:
        raise UserError(f"invalid --new-tokens {args.new_tokens}; use a positive number of tokens")
    if args.repeats < 1:
        raise UserError(f"invalid --repeats {args.repeats}; use a positive number of rounds")

    from .blas import log_blas

    log_blas()
    result = run_bench(args)
    out = Path(args.out)
    write_text_atomic(out / "bench.json", json.dumps(result, indent=1) + "\n")
    write_text_atomic(out / "bench.md", render_markdown(result))
    print(
        f"wrote {out / 'bench.json'}: mlx-lm {result['mlx_lm_tok_s']} tok/s, dense {result['dense_tok_s']} tok/s, "
        f"sparse {result['sparse_tok_s']} tok/s ({result['speedup_sparse_vs_mlx_lm']}x mlx-lm)"
    )
    return 0


if __name__ == "__main__":
    run_command(main)
