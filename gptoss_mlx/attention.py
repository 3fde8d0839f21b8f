"""Grouped-query attention with learned sinks, banded on sliding layers.

For query head h (reading KV head h // group) and keys j in its window:

    s_j = (q . k_j) / sqrt(D)
    out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m))

The sink joins the softmax denominator unscaled and has no value vector. Sliding layers see the
`window` keys ending at the query (itself included), full layers every earlier key.

A long chunk on a sliding layer is computed in blocks of `window` queries (`banded_attention`):
each block attends only to the 2 * window keys around it, so the work grows as T x window
instead of T x T.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
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

    def __call__(self, x: mx.array, cache=None, last_only: bool = False) -> mx.array:
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
            mask = attention_mask(T, T, self.window)
        if last_only and isinstance(mask, mx.array):  # a [T, S] band: keep the last query's row
            mask = mask[-1:]
        sinks = self.sinks.astype(q.dtype)
        out = kernels.attend(self, q, k, v, sinks, cache)  # decode / banded kernels, or None
        if out is None and self.window is not None and Tq > 2 * self.window:
            out = banded_attention(q, k, v, sinks, self.scale, self.window)
        elif out is None:
            out = mx.fast.scaled_dot_product_attention(
                q, k, v, scale=self.scale, mask=mask, sinks=sinks
            )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, Tq, -1))


def banded_attention(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, window: int
) -> mx.array:
    """Sliding-window attention with sinks for a chunk of T queries, in blocks of `window`.

    q `[B, H, T, D]` are the last T of the S = P + T positions in k, v `[B, H_kv, S, D]` (P < window
    earlier positions first). Keys are padded to start `window` positions before the first query,
    so query block b (positions b*W .. b*W+W-1 of the chunk) needs exactly key blocks b and b+1:
    query t of a block sees block column c iff t < c <= t + W and the key is not padding.
    Returns `[B, H, T, D]`.
    """
    B, H, T, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    W, P = window, S - T
    nb = -(-T // W)
    pad_q = nb * W - T
    pad_left, pad_right = W - P, (nb + 1) * W - (W - P) - S

    def blocks(x, heads):  # [B, heads, S, D] -> [B*nb, heads, 2W, D]
        x = mx.pad(x, [(0, 0), (0, 0), (pad_left, pad_right), (0, 0)])
        x = x.reshape(B, heads, nb + 1, W, D)
        x = mx.concatenate([x[:, :, :-1], x[:, :, 1:]], axis=3)  # [B, heads, nb, 2W, D]
        return x.transpose(0, 2, 1, 3, 4).reshape(B * nb, heads, 2 * W, D)

    qb = mx.pad(q, [(0, 0), (0, 0), (0, pad_q), (0, 0)]).reshape(B, H, nb, W, D)
    qb = qb.transpose(0, 2, 1, 3, 4).reshape(B * nb, H, W, D)
    t = mx.arange(W)[:, None]
    c = mx.arange(2 * W)[None, :]
    block_start = (mx.arange(nb) * W)[:, None, None]
    mask = (c > t) & (c <= t + W) & (block_start + c >= pad_left)  # [nb, W, 2W]
    mask = mx.broadcast_to(mask[None, :, None], (B, nb, 1, W, 2 * W)).reshape(B * nb, 1, W, 2 * W)
    out = mx.fast.scaled_dot_product_attention(
        qb, blocks(k, Hkv), blocks(v, Hkv), scale=scale, mask=mask, sinks=sinks
    )
    out = out.reshape(B, nb, H, W, D).transpose(0, 2, 1, 3, 4).reshape(B, H, nb * W, D)
    return out[:, :, :T]
