"""Header and resume logic shared by the benchmark scripts that write a JSON report row by row."""

from __future__ import annotations

import json
import os
import platform
import sys
from pathlib import Path

from mlx_sparse.blas import loaded_blas


def new_report(script: str, **settings) -> dict:
    """Return an empty report with the command that runs `script`, the machine and `settings`."""
    return {
        "commands": [f"scripts/run.sh .venv/bin/python benchmarks/{script} " + " ".join(sys.argv[1:])],
        "machine": f"{platform.system()} {platform.machine()}",
        "cores": os.cpu_count(),
        "blas": loaded_blas(),
        "mlx": __import__("mlx.core").core.__version__,
        **settings,
        "rows": [],
    }


def resume(report: dict, path: Path, keys: tuple[str, ...] = ("rows",)) -> dict:
    """Copy `keys` and the earlier commands from the report at `path` into `report`, when it exists."""
    if path.is_file():
        earlier = json.loads(path.read_text())
        for key in keys:
            report[key] = earlier.get(key, report[key])
        report["commands"] = earlier.get("commands", [earlier.get("command")]) + report["commands"]
    return report


def markdown_header(report: dict, title: str) -> list[str]:
    """Return the markdown title and the line of commands that made the report."""
    label = "Commands (a later one resumes the rows of the earlier ones)" if len(report["commands"]) > 1 else "Commands"
    return [f"# {title}", "", f"{label}: " + ", ".join(f"`{command}`" for command in report["commands"]), ""]


def machine_text(report: dict) -> str:
    """Return the sentence naming the machine, BLAS and MLX version that the report ran on."""
    return f"Machine: {report['machine']}, {report['cores']} cores, BLAS {report['blas']}, MLX {report['mlx']}. "
