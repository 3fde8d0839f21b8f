"""Grouped-query attention with learned sinks, banded on sliding layers.

For query head h (reading KV head h // group) and keys j in its window:

    s_j = (q . k_j) / sqrt(D)
    out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))

The sink joins the softmax denominator unscaled and has no value vector. Sliding layers see the
`window` keys ending at the query (itself included), full layers every earlier key. The kernels
take the op where they apply (`kernels.attend`); elsewhere it is `ops.attention`, which computes a
long chunk on a sliding layer in blocks of `window` queries (`ops.banded_attention`). A decoded
token over a quantized cache (`--kv-bits`) takes `ops.quantized_attention`, which reads the packed
keys and values directly (the kernels read plain buffers only).
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels, ops
from .cache import DecodeSlot, KVCache
from .config import SLIDING, ModelConfig
from .rope import YarnRoPE


class Attention(nn.Module, kernels.UsesKernels):
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

    def __call__(
        self, x: mx.array, cache: KVCache | DecodeSlot | None = None, last_only: bool = False
    ) -> mx.array:
        """`[B, T, hidden]` -> `[B, T, hidden]`; with `last_only`, only the last position's query
        (-> `[B, 1, hidden]`) while every position's key and value still enter the cache."""
        B, T, _ = x.shape
        offset = cache.offset if cache is not None else 0
        x_q = x[:, -1:] if last_only else x
        Tq = x_q.shape[1]
        q = self.q_proj(x_q).reshape(B, Tq, self.num_heads, self.head_dim).transpose(0, 2, 1, 3)
        k = self.k_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        v = self.v_proj(x).reshape(B, T, self.num_kv_heads, self.head_dim).transpose(0, 2, 1, 3)
        q = self.rope(q, offset + T - Tq)
        k = self.rope(k, offset)
        if cache is not None:
            k, v, mask = cache.update(k, v)
        else:
            mask = ops.attention_mask(T, T, self.window)
        if last_only and isinstance(mask, mx.array):  # a [T, S] band: keep the last query's row
            mask = mask[-1:]
        sinks = self.sinks.astype(q.dtype)
        if isinstance(k, ops.QuantizedKV):  # a decoded token over a quantized cache buffer
            out = ops.quantized_attention(q, k, v, sinks, self.scale, mask)
        else:
            decode_offset = cache.offset if isinstance(cache, DecodeSlot) else None
            out = kernels.attend(
                self.backend, q, k, v, sinks, self.scale, self.window, decode_offset
            )  # the decode / banded kernels, or None
            if out is None:
                out = ops.attention(q, k, v, sinks, self.scale, mask, self.window)
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, Tq, -1))
