"""Sliding-window attention: the banded (blocked) path equals dense masked attention."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.ops import banded_attention


def dense_reference(q, k, v, sinks, scale, window):
    """numpy: softmax over the window's keys plus the sink, queries the last T of S positions."""
    q, k, v, sinks = (np.array(a, dtype=np.float64) for a in (q, k, v, sinks))
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    k = np.repeat(k, H // Hkv, axis=1)
    v = np.repeat(v, H // Hkv, axis=1)
    scores = q @ k.transpose(0, 1, 3, 2) * scale
    distance = (np.arange(S - T, S)[:, None]) - np.arange(S)[None, :]
    scores = np.where((distance >= 0) & (distance < window), scores, -np.inf)
    m = np.maximum(scores.max(-1, keepdims=True), sinks[None, :, None, None])
    e = np.exp(scores - m)
    return (e @ v) / (e.sum(-1, keepdims=True) + np.exp(sinks[None, :, None, None] - m))


@pytest.mark.parametrize("T,P", [(17, 0), (37, 0), (37, 3), (40, 7), (64, 7)])
def test_banded_attention_equals_dense_window(T, P):
    window, B, H, Hkv, D = 8, 2, 4, 2, 16
    rng = np.random.RandomState(T + P)
    q = mx.array(rng.randn(B, H, T, D).astype(np.float32))
    k = mx.array(rng.randn(B, Hkv, P + T, D).astype(np.float32))
    v = mx.array(rng.randn(B, Hkv, P + T, D).astype(np.float32))
    sinks = mx.array(rng.randn(H).astype(np.float32) * 2)
    ours = np.array(banded_attention(q, k, v, sinks, 0.25, window))
    assert np.abs(ours - dense_reference(q, k, v, sinks, 0.25, window)).max() < 1e-5
