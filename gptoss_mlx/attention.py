"""Grouped-query attention with learned sinks, banded on sliding layers.

For query head h (reading KV head h // group) and keys j in its window:

    s_j = (q . k_j) / sqrt(D)
    out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))

The sink joins the softmax denominator unscaled and has no value vector. Sliding layers see the
`window` keys ending at the query (itself included), full layers every earlier key.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .cache import attention_mask
from .config import SLIDING, ModelConfig
from .rope import YarnRoPE


class Attention(nn.Module):
    """`[B, T, hidden]` -> `[B, T, hidden]`; q/k/v/o projections with biases, sinks `[H]`."""

    def __init__(self, config: ModelConfig, layer_type: str):
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.scale = config.head_dim**-0.5
        self.window = config.sliding_window if layer_type == SLIDING else None
        H, Hkv, D = self.num_heads, self.num_kv_heads, self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, H * D, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, Hkv * D, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, Hkv * D, bias=True)
        self.o_proj = nn.Linear(H * D, config.hidden_size, bias=True)
        self.sinks = mx.zeros((H,))
        self.rope = YarnRoPE(config)

    def __call__(self, x: mx.array, cache=None) -> mx.array:
        B, T, _ = x.shape
        offset = cache.offset if cache is not None else 0
        q = self.q_proj(x).reshape(B, T, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset)
        k = self.rope(k, offset)
        if cache is not None:
            k, v, mask = cache.update(k, v)
        else:
            mask = attention_mask(T, T, self.window)
        out = mx.fast.scaled_dot_product_attention(
            q, k, v, scale=self.scale, mask=mask, sinks=self.sinks.astype(q.dtype)
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))
