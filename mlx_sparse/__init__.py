"""mlx_sparse: activation sparsity for the FFNs of LLMs on MLX.

    model, tokenizer = mlx_sparse.load("smollm2-135m")
    config = mlx_sparse.calibrate(model, tokenizer, "wikitext2:valid", target=0.5)
    mlx_sparse.sparsify(model, config)
"""

from .calibration import calibrate
from .errors import UserError
from .loading import load
from .sparsity import SparsityConfig, load_config, sparsify, unsparsify

__version__ = "0.1.0"

__all__ = ["SparsityConfig", "UserError", "calibrate", "load", "load_config", "sparsify", "unsparsify"]
