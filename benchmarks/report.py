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
