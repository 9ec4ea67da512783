"""Perplexity scoring: the window loss split across CPU streams equals the one-pass loss."""

from __future__ import annotations

import math
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from mlx_sparse.data import TokenWindows
from mlx_sparse.perplexity import _loss_streams, evaluate_perplexity, window_loss


def reference_nll(model, windows: mx.array) -> float:
    """Return the next-token negative log-likelihood from a NumPy log-softmax, summed over every window."""
    logits = np.array(model(windows[:, :-1]).astype(mx.float32), dtype=np.float64)
    targets = np.array(windows[:, 1:])
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return float(-np.take_along_axis(log_probs, targets[..., None], axis=-1).sum())


def test_loss_streams_only_on_cpu():
    streams = _loss_streams()
    if mx.default_device() == mx.cpu:
        assert len(streams) == min(2, os.cpu_count() or 1)
        assert all(stream.device == mx.cpu for stream in streams)
    else:
        assert streams == ()


def test_split_loss_matches_numpy(tiny_llama):
    # 35 targets per window, so the two stream slices have different lengths (18 and 17).
    windows = mx.random.randint(0, 97, (2, 36), key=mx.random.key(5))
    loss = window_loss(tiny_llama, windows).item()
    one_pass = nn.losses.cross_entropy(tiny_llama(windows[:, :-1]), windows[:, 1:], reduction="sum").item()

    np.testing.assert_allclose(loss, reference_nll(tiny_llama, windows), rtol=1e-5)
    np.testing.assert_allclose(loss, one_pass, rtol=1e-6)


def test_perplexity_is_exp_mean_nll(tiny_llama):
    windows = mx.random.randint(0, 97, (3, 17), key=mx.random.key(6))
    data = TokenWindows(source="random", windows=windows, total_tokens=3 * 17)
    result = evaluate_perplexity(tiny_llama, data, batch_size=2)

    assert result.tokens == 3 * 16
    np.testing.assert_allclose(result.ppl, math.exp(reference_nll(tiny_llama, windows) / result.tokens), rtol=1e-5)
