"""Shared plumbing for the `python -m mlx_sparse.<command>` entry points."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console
from rich.logging import RichHandler

from .errors import UserError

EXIT_USAGE = 2


class ArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose usage errors are one line and exit with code 2."""

    def error(self, message: str) -> None:
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def setup_logging(verbose: bool = False) -> None:
    """Send log records to stderr through rich, so stdout carries only a command's output."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(
        level=level,
        format="%(message)s",
        datefmt="[%X]",
        handlers=[RichHandler(show_path=False, console=Console(stderr=True), rich_tracebacks=False)],
        force=True,
    )


def run_command(main: Callable[[Sequence[str] | None], int | None], argv: Sequence[str] | None = None) -> None:
    """Run a command's main function and turn `UserError` into one line on stderr and exit code 2."""
    try:
        code = main(argv)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(EXIT_USAGE)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)


def check_output_file(path: str | os.PathLike) -> Path:
    """Return `path` as a Path, or raise `UserError` when it names an existing folder."""
    target = Path(path)
    if target.is_dir():
        raise UserError(f"output path {target} is a folder; pass a file path such as {target / 'config.json'}")
    return target


@contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ""):
    """Yield a temporary path beside `path` and rename it onto `path` only if the block succeeds.

    A crash or an error inside the block leaves no partial file behind.
    """
    target = check_output_file(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=suffix or target.suffix)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp creates the file readable by its owner only; give it the usual umask mode.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def staging_folder(out_dir: Path):
    """Yield a fresh folder beside `out_dir` with the usual umask mode, removed on exit.

    Callers write a whole model folder into it and move it into place before the block ends, so
    a crash leaves no partial output folder behind.
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out_dir.parent, prefix=f".{out_dir.name}.partial-"))
    try:
        # mkdtemp makes a private (0700) folder; give it the permissions a plain mkdir would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
