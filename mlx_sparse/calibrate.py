"""Command entry point: `python -m mlx_sparse.calibrate`."""

from .calibration import main
from .cli import run_command

if __name__ == "__main__":
    run_command(main)
