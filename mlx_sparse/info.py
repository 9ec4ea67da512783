"""Architecture, sizes and parameter breakdown of a model.

    python -m mlx_sparse.info --model smollm2-135m
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

import mlx.nn as nn
from mlx.utils import tree_flatten

from .cli import ArgumentParser, run_command, setup_logging

logger = logging.getLogger(__name__)

GROUPS = ("embedding", "attention", "ffn", "norms", "lm_head")


def parameter_group(name: str) -> str:
    if "embed_tokens" in name:
        return "embedding"
    if ".mlp." in name:
        return "ffn"
    if "self_attn" in name and "norm" not in name:
        return "attention"
    if name.startswith("lm_head"):
        return "lm_head"
    return "norms"


def count_parameters(model: nn.Module) -> dict[str, dict[str, int]]:
    """Count parameters and stored bytes per group; a quantized weight counts its unpacked values.

    Scales and biases of quantized weights add to the bytes, not to the parameter count.
    """
    counts = {group: {"parameters": 0, "bytes": 0} for group in GROUPS}
    modules = dict(tree_flatten(model.leaf_modules(), is_leaf=lambda value: isinstance(value, nn.Module)))
    for path, module in modules.items():
        bits = getattr(module, "bits", None)
        for name, value in tree_flatten(module.parameters()):
            group = parameter_group(f"{path}.{name}")
            counts[group]["bytes"] += value.nbytes
            if name in ("scales", "biases") and bits is not None:
                continue
            elements = value.size * (32 // bits) if (bits is not None and name == "weight") else value.size
            counts[group]["parameters"] += elements
    return counts


def describe(model: nn.Module) -> dict:
    args = model.args
    counts = count_parameters(model)
    total = sum(group["parameters"] for group in counts.values())
    body = total - counts["embedding"]["parameters"] - counts["lm_head"]["parameters"]
    quantization = getattr(model, "config", {}).get("quantization")
    return {
        "model": getattr(model, "model_id", None),
        "model_type": args.model_type,
        "layers": args.num_hidden_layers,
        "hidden_size": args.hidden_size,
        "intermediate_size": args.intermediate_size,
        "attention_heads": args.num_attention_heads,
        "kv_heads": args.num_key_value_heads,
        "head_dim": args.head_dim,
        "vocab_size": args.vocab_size,
        "ffn_activation": model.layers[0].mlp.activation_name if hasattr(model.layers[0].mlp, "activation_name") else None,
        "quantization": quantization,
        "parameters": {group: values["parameters"] for group, values in counts.items()},
        "bytes": {group: values["bytes"] for group, values in counts.items()},
        "total_parameters": total,
        "ffn_share": counts["ffn"]["parameters"] / total,
        "ffn_share_without_embedding": counts["ffn"]["parameters"] / body if body else 0.0,
    }


def format_table(info: dict) -> str:
    lines = [
        f"model            {info['model']} ({info['model_type']})",
        f"layers           {info['layers']}, hidden {info['hidden_size']}, intermediate {info['intermediate_size']}, FFN {info['ffn_activation']}",
        f"attention        {info['attention_heads']} heads, {info['kv_heads']} KV heads, head dim {info['head_dim']}",
        f"vocabulary       {info['vocab_size']}",
        f"quantization     {info['quantization'] or 'none'}",
        "",
        f"{'group':<12} {'parameters':>14} {'share':>7} {'stored MB':>10}",
    ]
    total = info["total_parameters"]
    for group in GROUPS:
        parameters = info["parameters"][group]
        if parameters == 0 and info["bytes"][group] == 0:
            continue
        lines.append(f"{group:<12} {parameters:>14,} {parameters / total:>7.1%} {info['bytes'][group] / 1e6:>10.1f}")
    lines.append(f"{'total':<12} {total:>14,} {1:>7.1%} {sum(info['bytes'].values()) / 1e6:>10.1f}")
    lines.append("")
    lines.append(f"FFN share: {info['ffn_share']:.1%} of all parameters, {info['ffn_share_without_embedding']:.1%} without embedding and lm_head")
    return "\n".join(lines)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(prog="python -m mlx_sparse.info", description="Show a model's architecture and parameter breakdown.")
    parser.add_argument("--model", required=True, help="alias, mlx-lm folder, .gguf file or hub id")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)

    from .loading import load

    model, _ = load(args.model)
    info = describe(model)
    print(json.dumps(info, indent=1) if args.json else format_table(info))
    return 0


if __name__ == "__main__":
    run_command(main)
