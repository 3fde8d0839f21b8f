"""YaRN rotary position embedding, exactly as OpenAI's reference computes it.

For head dim d, theta and scaling factor s (from an original context L):

    freq_i        = theta ** (2i / d),                        i in [0, d/2)
    low, high     = (d/2) ln(L / (beta * 2 pi)) / ln(theta)    for beta_fast, beta_slow
    ramp_i        = clamp((i - low) / (high - low), 0, 1)      (low/high are NOT rounded)
    inv_freq_i    = ramp_i / (s * freq_i) + (1 - ramp_i) / freq_i
    concentration = 0.1 ln(s) + 1                              (multiplies cos and sin)

The rotation is half-split (NeoX): dims [0, d/2) pair with [d/2, d), absolute positions from 0.
"""

from __future__ import annotations

import math

import mlx.core as mx
import mlx.nn as nn

from .config import ModelConfig


def yarn_inv_freq(config: ModelConfig) -> tuple[mx.array, float]:
    """(inv_freq [head_dim/2] float32, concentration) for this config."""
    d = config.head_dim
    theta = config.rope_theta
    s = config.rope_scaling_factor
    L = config.rope_original_context

    def ramp_bound(beta: float) -> float:
        return (d / 2) * math.log(L / (beta * 2 * math.pi)) / math.log(theta)

    low, high = ramp_bound(config.rope_beta_fast), ramp_bound(config.rope_beta_slow)
    i = mx.arange(d // 2, dtype=mx.float32)
    freq = theta ** (2 * i / d)
    ramp = mx.clip((i - low) / (high - low), 0.0, 1.0)
    inv_freq = ramp / (s * freq) + (1 - ramp) / freq
    concentration = 0.1 * math.log(s) + 1.0
    return inv_freq, concentration


class YarnRoPE(nn.Module):
    """YaRN RoPE on `[B, H, T, D]` queries or keys starting at absolute position `offset`."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, self.concentration = yarn_inv_freq(config)
        self.dims = config.head_dim
        # mx.fast.rope takes periods (1 / inv_freq); private so it is not a weight.
        self._periods = 1.0 / inv_freq

    def __call__(self, x: mx.array, offset: int = 0) -> mx.array:
        # Rotation is linear, so scaling x by the concentration scales cos and sin alike.
        return mx.fast.rope(
            x * self.concentration,
            self.dims,
            traditional=False,
            base=None,
            scale=1.0,
            offset=offset,
            freqs=self._periods,
        )
