"""Evaluation and calibration text: WikiText-2 and local files, tokenised into fixed windows."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import numpy as np

from .errors import UserError

logger = logging.getLogger(__name__)

WIKITEXT_FILES = {"test": "wiki.test.raw", "valid": "wiki.valid.raw"}
WIKITEXT_HUB = ("Salesforce/wikitext", "wikitext-2-raw-v1")
TEXT_SUFFIXES = (".txt", ".raw", ".jsonl")


@dataclass
class TokenWindows:
    """Non-overlapping token windows of one text, ready for a forward pass."""

    source: str
    windows: mx.array  # int32, [count, ctx]
    total_tokens: int  # tokens in the whole tokenised text

    @property
    def count(self) -> int:
        return self.windows.shape[0]

    @property
    def ctx(self) -> int:
        return self.windows.shape[1]


def join_wikitext_rows(lines: list[str]) -> str:
    """Join WikiText rows the standard way: one row per line, whitespace-only rows empty, "\\n\\n" between.

    This is the string that Hugging Face's `Salesforce/wikitext` rows give when joined with
    "\\n\\n", as used by GPTQ, SparseGPT and TEAL; it differs slightly from reading the file whole.
    """
    rows = ["" if not line.strip() else line for line in lines]
    return "\n\n".join(rows)


def read_wikitext_file(path: Path) -> str:
    lines = path.read_text(encoding="utf-8").split("\n")
    if lines and lines[-1] == "":
        lines = lines[:-1]
    return join_wikitext_rows([line + "\n" if line.strip() else line for line in lines])


def load_wikitext(split: str, data_dir: str | Path | None = None) -> str:
    if split not in WIKITEXT_FILES:
        raise UserError(f"unknown WikiText-2 split {split!r}; use wikitext2:test or wikitext2:valid")
    data_dir = data_dir or os.environ.get("MLX_SPARSE_DATA_DIR")
    if data_dir:
        path = Path(data_dir) / "wikitext-2-raw" / WIKITEXT_FILES[split]
        if not path.is_file():
            raise UserError(f"WikiText-2 file {path} not found; point --data-dir or MLX_SPARSE_DATA_DIR at a folder with wikitext-2-raw/{WIKITEXT_FILES[split]}")
        return read_wikitext_file(path)
    return download_wikitext(split)


def download_wikitext(split: str) -> str:
    """Fetch the WikiText-2 raw split from the Hugging Face hub (parquet), for machines without a local copy."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    repo, config = WIKITEXT_HUB
    hub_split = "validation" if split == "valid" else split
    filename = f"{config}/{hub_split}-00000-of-00001.parquet"
    try:
        path = hf_hub_download(repo, filename, repo_type="dataset")
    except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as exc:
        raise UserError(
            f"WikiText-2 {split} is not available offline and the download failed ({type(exc).__name__}); "
            "set --data-dir or MLX_SPARSE_DATA_DIR to a folder with wikitext-2-raw/"
        ) from exc
    try:
        import pyarrow.parquet as parquet
    except ImportError as exc:
        raise UserError("reading the downloaded WikiText-2 parquet file needs pyarrow; pip install pyarrow, or use --data-dir") from exc
    rows = parquet.read_table(path).column("text").to_pylist()
    return join_wikitext_rows(rows)


def read_text_file(path: Path) -> str:
    if not path.is_file():
        raise UserError(f"data file {path} not found; pass wikitext2:test, wikitext2:valid or a .txt, .raw or .jsonl file")
    if path.suffix not in TEXT_SUFFIXES:
        raise UserError(f"unsupported data file {path}; use a .txt, .raw or .jsonl (field 'text') file")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"data file {path} is not UTF-8 text ({exc.reason}); convert it to UTF-8") from exc
    if path.suffix != ".jsonl":
        return raw

    texts = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be an object with a 'text' field") from exc
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f"{path}:{number} has no string field 'text'; each line must be an object with a 'text' field")
        texts.append(record["text"])
    return "\n\n".join(texts)


def load_text(spec: str, data_dir: str | Path | None = None) -> str:
    """Return the text named by `spec`: wikitext2:test, wikitext2:valid or a .txt/.raw/.jsonl path."""
    if spec.startswith("wikitext2:"):
        return load_wikitext(spec.split(":", 1)[1], data_dir)
    return read_text_file(Path(spec).expanduser())


def bos_token_id(tokenizer) -> int | None:
    """Return the BOS id when the tokenizer adds one by itself, else None."""
    probe = tokenizer.encode("a")
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None and probe and probe[0] == bos:
        return bos
    return None


def tokenize_windows(tokenizer, text: str, ctx: int, max_windows: int | None = None, source: str = "text") -> TokenWindows:
    """Tokenise `text` once and cut it into non-overlapping windows of `ctx` tokens.

    When the tokenizer adds a BOS token, every window starts with BOS followed by `ctx - 1` text
    tokens, so each window is scored as a fresh sequence would be.
    """
    if ctx < 2:
        raise UserError(f"invalid context length {ctx}; use at least 2 tokens, such as 512")
    if max_windows is not None and max_windows < 1:
        raise UserError(f"invalid --max-windows {max_windows}; use a positive number of windows")

    bos = bos_token_id(tokenizer)
    # The text is cut into windows below, so transformers' warning that it exceeds the model's
    # maximum length does not apply.
    transformers_logger = logging.getLogger("transformers.tokenization_utils_base")
    previous_level = transformers_logger.level
    transformers_logger.setLevel(logging.ERROR)
    try:
        tokens = tokenizer.encode(text, add_special_tokens=False) if text else []
    finally:
        transformers_logger.setLevel(previous_level)
    body = ctx - 1 if bos is not None else ctx
    count = len(tokens) // body
    if count == 0:
        raise UserError(f"{source} has {len(tokens)} tokens, fewer than one window of {ctx}; use more text or a smaller --ctx")
    if max_windows is not None:
        count = min(count, max_windows)

    array = np.asarray(tokens[: count * body], dtype=np.int32).reshape(count, body)
    if bos is not None:
        array = np.concatenate([np.full((count, 1), bos, dtype=np.int32), array], axis=1)
    logger.info("%s: %d tokens, %d windows of %d", source, len(tokens), count, ctx)
    return TokenWindows(source=source, windows=mx.array(array), total_tokens=len(tokens))


def load_windows(spec: str, tokenizer, ctx: int, max_windows: int | None = None, data_dir: str | Path | None = None) -> TokenWindows:
    return tokenize_windows(tokenizer, load_text(spec, data_dir), ctx, max_windows, source=spec)


def data_file(spec: str, data_dir: str | Path | None = None) -> Path | None:
    """Return the local file that a data spec reads, or None for text that comes from the hub."""
    if spec.startswith("wikitext2:"):
        data_dir = data_dir or os.environ.get("MLX_SPARSE_DATA_DIR")
        split = spec.split(":", 1)[1]
        if not data_dir or split not in WIKITEXT_FILES:
            return None
        return (Path(data_dir) / "wikitext-2-raw" / WIKITEXT_FILES[split]).resolve()
    return Path(spec).expanduser().resolve()


def warn_same_data(calibration: str, evaluation: str, data_dir: str | Path | None = None) -> bool:
    """Log a warning and return True when calibration and evaluation read the same text."""
    same = calibration == evaluation or (
        data_file(calibration, data_dir) is not None and data_file(calibration, data_dir) == data_file(evaluation, data_dir)
    )
    if same:
        logger.warning(
            "Calibration and evaluation use the same data (%s): thresholds tuned on the scored text overstate quality; "
            "calibrate on wikitext2:valid and score on wikitext2:test", evaluation,
        )
    return same
