"""Report which BLAS library the MLX CPU backend is using in this process.

MLX's Linux CPU wheel links the reference BLAS, which runs fp32 matmuls about 64 times slower than
OpenBLAS on a 2-core x86 machine (512x576x1536: 355 ms against 5.5 ms). Preloading Debian's
OpenBLAS (`LD_PRELOAD=/usr/lib/<arch>-linux-gnu/openblas-pthread/libblas.so.3`) replaces it
without rebuilding MLX; `scripts/run.sh` does that when the library is installed.
"""

from __future__ import annotations

import glob
import logging
import os
import platform
from pathlib import Path

logger = logging.getLogger(__name__)

OPENBLAS_GLOB = "/usr/lib/*-linux-gnu/openblas-pthread/libblas.so.3"


def find_openblas() -> str | None:
    """Return the path of Debian's OpenBLAS `libblas.so.3`, or None when it is not installed."""
    matches = sorted(glob.glob(OPENBLAS_GLOB))
    return matches[0] if matches else None


def loaded_blas() -> str:
    """Name the BLAS in use: "accelerate" on macOS, else the BLAS libraries mapped into this process."""
    if platform.system() == "Darwin":
        return "accelerate"
    maps = Path("/proc/self/maps")
    if not maps.exists():
        return "unknown"
    names = set()
    for line in maps.read_text().splitlines():
        path = line.split()[-1] if line.split() else ""
        base = os.path.basename(path)
        if "openblas" in path:
            names.add("openblas")
        elif base.startswith(("libblas", "libcblas")):
            names.add("reference-blas")
        elif "mkl" in base:
            names.add("mkl")
    if "openblas" in names:
        return "openblas"
    if names:
        return ",".join(sorted(names))
    return "unknown"


def log_blas() -> str:
    """Log the BLAS in use and warn, with the fix, when a Linux process runs on the reference BLAS."""
    blas = loaded_blas()
    if platform.system() == "Linux" and blas != "openblas":
        hint = find_openblas()
        fix = (
            f"LD_PRELOAD={hint}"
            if hint
            else "apt-get install libopenblas0-pthread, then LD_PRELOAD=" + OPENBLAS_GLOB.replace("*", "<arch>")
        )
        logger.warning("MLX CPU matmuls use the %s BLAS, which is slow; run with %s", blas, fix)
    else:
        logger.info("BLAS in use: %s", blas)
    return blas
