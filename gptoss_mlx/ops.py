"""The attention and expert ops in pure MLX: the specification every kernel is tested against.

The model modules (attention.py, moe.py, cache.py) compute with these; the kernels in `kernels/`
replace some of them on some shapes and check themselves against them. Everything here is a
function of arrays (and of objects holding MXFP4 weights), so both sides import it and it imports
neither.

Attention with learned sinks, for query head h (reading KV head h // group) and keys j it sees:

    out = sum_j exp(s_j - m) v_j / (sum_j exp(s_j - m) + exp(sink_h - m)),   s_j = scale * q . k_j

Experts (MXFP4 weights, interleaved gate/linear rows), for each token and each of its k experts e:

    h = W1[e] x + b1[e];  act = swiglu(h);  y = sum_e w_e (W2[e] act + b2[e])
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple, Protocol

import mlx.core as mx

# Token-expert pairs (tokens x experts per token) from which the experts' inputs are sorted by
# expert, so each expert's rows are contiguous and its weights are read once. Batches below it
# gather unsorted, and those are the batches the fused decode kernels take.
SORT_THRESHOLD = 64


class MXFP4Weights(Protocol):
    """E stacked `[out, in]` MXFP4 matrices with biases (`moe.MXFP4SwitchLinear` is one).

    weight: uint32 `[E, out, in/8]` (8 FP4 codes per word, low nibble = even element),
    scales: uint8 `[E, out, in/32]` (E8M0), bias: `[E, out]`.
    """

    weight: mx.array
    scales: mx.array
    bias: mx.array


# --- attention ------------------------------------------------------------------------------------


def attention_mask(num_queries: int, num_keys: int, window: int | None) -> mx.array | str | None:
    """Mask for queries that are the last `num_queries` of `num_keys` consecutive positions.

    Query t (absolute position num_keys - num_queries + t) sees key j iff j <= its position and, for
    a sliding layer, its position - j < window. Returns None (nothing to mask), "causal" (MLX's
    lower-right causal mask), or a boolean `[T, S]` band.
    """
    if num_queries == 1 and (window is None or num_keys <= window):
        return None
    if window is None or num_keys <= window:
        return "causal"
    q_pos = mx.arange(num_keys - num_queries, num_keys)[:, None]
    k_pos = mx.arange(num_keys)[None, :]
    distance = q_pos - k_pos
    return (distance >= 0) & (distance < window)


def filled_slots(num_slots: int, offset: mx.array | int) -> mx.array:
    """Mask `[num_slots]` of the cache slots a decoded token at position `offset` attends to:
    slots 0 .. min(offset, num_slots - 1), the ones written so far (itself included)."""
    return mx.arange(num_slots) <= offset


def attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    sinks: mx.array,
    scale: float,
    mask: mx.array | str | None,
    window: int | None,
) -> mx.array:
    """q `[B, Hq, T, D]` over k, v `[B, Hkv, S, D]` under `mask` -> `[B, Hq, T, D]`.

    On a sliding layer a chunk of more than 2 * window queries takes `banded_attention`, whose
    blocks imply the mask, so the work grows as T x window instead of T x S.
    """
    if window is not None and q.shape[2] > 2 * window:
        return banded_attention(q, k, v, sinks, scale, window)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


def sliding_window_attention(
    q: mx.array, k: mx.array, v: mx.array, sinks: mx.array, scale: float, window: int
) -> mx.array:
    """q `[B, Hq, T, D]`, the last T of the S positions in k, v `[B, Hkv, S, D]`, each seeing the
    `window` keys ending at it -> `[B, Hq, T, D]` (what the banded kernel computes)."""
    mask = attention_mask(q.shape[2], k.shape[2], window)
    return attention(q, k, v, sinks, scale, mask, window)


def decode_attention(
    q: mx.array,
    k: mx.array,
    v: mx.array,
    sinks: mx.array,
    scale: float,
    offset: mx.array | int,
) -> mx.array:
    """One decoded query per row, q `[B, Hq, 1, D]`, over a whole cache buffer k, v `[B, Hkv, S, D]`
    whose slots 0 .. min(offset, S - 1) are filled -> `[B, Hq, 1, D]` (what the decode kernel
    computes)."""
    mask = filled_slots(k.shape[2], offset)
    return mx.fast.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, sinks=sinks)


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

    def blocks(x: mx.array, heads: int) -> mx.array:  # [B, heads, S, D] -> [B*nb, heads, 2W, D]
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


# --- attention over affine-quantized keys and values ---------------------------------------------


class QuantizedKV(NamedTuple):
    """Keys or values `[B, H_kv, S, D]` affine-quantized along D in groups of `group_size`:
    weight uint32 `[B, H_kv, S, D * bits / 32]`, scales and biases `[B, H_kv, S, D / group_size]`
    (MLX's `mx.quantize` layout). Every axis but the last is the logical tensor's, so slicing,
    gathering or concatenating along the position axis applies to each part alike (`map`)."""

    weight: mx.array
    scales: mx.array
    biases: mx.array
    group_size: int
    bits: int

    @classmethod
    def quantize(cls, x: mx.array, group_size: int, bits: int) -> QuantizedKV:
        return cls(*mx.quantize(x, group_size=group_size, bits=bits), group_size, bits)

    def dequantize(self) -> mx.array:
        """The values `[B, H_kv, S, D]`, in the scales' dtype."""
        return mx.dequantize(
            self.weight, self.scales, self.biases, group_size=self.group_size, bits=self.bits
        )

    @property
    def arrays(self) -> tuple[mx.array, mx.array, mx.array]:
        return self.weight, self.scales, self.biases

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays)

    def map(self, fn: Callable[..., mx.array], *others: QuantizedKV) -> QuantizedKV:
        """`fn` applied part by part (to this and the same part of each of `others`)."""
        parts = zip(self.arrays, *(o.arrays for o in others), strict=True)
        return QuantizedKV(*(fn(*p) for p in parts), self.group_size, self.bits)


def quantized_attention(
    q: mx.array,
    k: QuantizedKV,
    v: QuantizedKV,
    sinks: mx.array,
    scale: float,
    mask: mx.array | str | None,
) -> mx.array:
    """Attention with sinks over quantized keys and values: q `[B, Hq, T, D]`, k and v
    `[B, Hkv, S, D]` quantized, `mask` as `attention_mask` or `filled_slots` give it ->
    `[B, Hq, T, D]`.

    Scores and values come from `mx.quantized_matmul` on the packed cache (no dequantized copy),
    in float32; the sink is one more logit per head in the softmax, with no value vector.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k.weight.shape[1], k.weight.shape[2]
    G = Hq // Hkv
    queries = (q.astype(mx.float32) * scale).reshape(B, Hkv, G, T, D)

    def per_group(a: mx.array) -> mx.array:  # [B, Hkv, S, x] -> [B, Hkv, 1, S, x]
        return mx.expand_dims(a, 2)

    k, v = k.map(per_group), v.map(per_group)
    scores = mx.quantized_matmul(
        queries, *k.arrays, transpose=True, group_size=k.group_size, bits=k.bits
    )  # [B, Hkv, G, T, S]
    if isinstance(mask, str):  # "causal": the queries are the last T of the S positions
        mask = mx.arange(S - T, S)[:, None] >= mx.arange(S)[None, :]
    if mask is not None:
        scores = mx.where(mask, scores, mx.array(-mx.inf, mx.float32))
    sink = mx.broadcast_to(sinks.astype(mx.float32).reshape(1, Hkv, G, 1, 1), (B, Hkv, G, T, 1))
    probs = mx.softmax(mx.concatenate([scores, sink], axis=-1), axis=-1, precise=True)
    out = mx.quantized_matmul(
        probs[..., :-1], *v.arrays, transpose=False, group_size=v.group_size, bits=v.bits
    )  # [B, Hkv, G, T, D]
    return out.reshape(B, Hq, T, D).astype(q.dtype)


# --- experts --------------------------------------------------------------------------------------


def gather_mxfp4_matmul(
    x: mx.array, w: MXFP4Weights, indices: mx.array, sorted_indices: bool = False
) -> mx.array:
    """x `[..., 1, in]` broadcast against expert indices `[...]` -> `W[e] x + b[e]`
    `[..., 1, out]`."""
    y = mx.gather_qmm(
        x,
        w.weight,
        w.scales,
        None,
        rhs_indices=indices,
        transpose=True,
        mode="mxfp4",
        sorted_indices=sorted_indices,
    )
    return y + mx.expand_dims(w.bias[indices], -2).astype(y.dtype)


def swiglu(h: mx.array, alpha: float, limit: float) -> mx.array:
    """The clamped SwiGLU on interleaved gate/linear features `[..., 2I]` -> `[..., I]`:
    gate = min(h[0::2], limit), lin = clamp(h[1::2], -limit, limit),
    act = gate * sigmoid(alpha * gate) * (lin + 1)."""
    gate = mx.minimum(h[..., 0::2], limit)
    lin = mx.clip(h[..., 1::2], -limit, limit)
    return gate * mx.sigmoid(alpha * gate) * (lin + 1)


def experts_swiglu(
    up: MXFP4Weights, x: mx.array, indices: mx.array, alpha: float, limit: float
) -> mx.array:
    """x `[N, H]`, indices `[N, k]` -> the SwiGLU activations of each token's experts `[N*k, I]`
    (what the gate-up kernel computes)."""
    N, k = indices.shape
    h = gather_mxfp4_matmul(x[:, None, None, :], up, indices)  # [N, k, 1, 2I]
    return swiglu(h, alpha, limit).reshape(N * k, -1)


def experts_combine(
    down: MXFP4Weights, act: mx.array, indices: mx.array, weights: mx.array
) -> mx.array:
    """act `[N*k, I]`, indices and weights `[N, k]` -> `sum_k w_k (W2[e_k] act_k + b2[e_k])`
    `[N, H]` (what the down kernel computes)."""
    N, k = indices.shape
    y = gather_mxfp4_matmul(act.reshape(N, k, 1, -1), down, indices)[..., 0, :]  # [N, k, H]
    return mix(y, weights)


def mix(y: mx.array, weights: mx.array) -> mx.array:
    """Each token's expert outputs `[N, k, H]` weighted by `weights` `[N, k]`, summed: `[N, H]`."""
    return (y * weights[..., None].astype(y.dtype)).sum(axis=1)


def experts(
    up: MXFP4Weights,
    down: MXFP4Weights,
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    alpha: float,
    limit: float,
) -> mx.array:
    """x `[N, H]` through each token's experts `indices` `[N, k]`, mixed by `weights` -> `[N, H]`.

    From SORT_THRESHOLD token-expert pairs on, the pairs are grouped by expert first, so each
    expert's weights are read once for all its rows.
    """
    N, k = indices.shape
    if N * k < SORT_THRESHOLD:
        act = experts_swiglu(up, x, indices, alpha, limit)
        return experts_combine(down, act, indices, weights)
    flat = indices.flatten()
    order = mx.argsort(flat)
    y = sorted_expert_outputs(up, down, x[order // k], flat[order], alpha, limit)
    return mix(y[mx.argsort(order)].reshape(N, k, -1), weights)


def sorted_expert_outputs(
    up: MXFP4Weights,
    down: MXFP4Weights,
    rows: mx.array,
    expert_ids: mx.array,
    alpha: float,
    limit: float,
) -> mx.array:
    """Token-expert pairs grouped by expert: rows `[P, H]`, `expert_ids` `[P]` ascending ->
    each pair's expert output `W2[e] swiglu(W1[e] x + b1[e]) + b2[e]` `[P, H]` (unweighted).
    Each expert's rows go through its weights together."""
    h = gather_mxfp4_matmul(rows[:, None, :], up, expert_ids, sorted_indices=True)
    y = gather_mxfp4_matmul(swiglu(h, alpha, limit), down, expert_ids, sorted_indices=True)
    return y[:, 0, :]
