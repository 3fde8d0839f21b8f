"""Attention through the kernels of `metal/attention.metal`; the mlx ops are reference and fallback.

`attend(backend, q, k, v, sinks, scale, window, decode_offset)` is what `attention.Attention` calls
first; it returns `[B, Hq, T, D]`, or None when the mlx path should run:

- one decoded token at array-valued position `decode_offset` over the whole ring / full-cache
  buffer: `sdpa_decode` reads the buffer in place, no mask; long buffers are split and merged;
- a chunk of T > 1 queries on a sliding layer: `sdpa_banded` visits only the keys of each query
  block's band (at most window + 31 per query), so the work grows as T x window;
- anything else (full layers' prefill, unsupported shapes): the mlx ops.

The reference each kernel is checked against is `ops.decode_attention` /
`ops.sliding_window_attention`.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from .. import ops
from .dispatch import Kernel, enabled, relative_error, self_check

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
FINAL_MAX_KEYS = 256  # buffers up to this many slots (the 128-slot rings) take one pass, no merge
MAX_SPLITS = 64  # longer buffers are cut into at most this many splits per (row, KV head)
QUERY_BLOCK = 32  # banded: queries per threadgroup (one per lane)

DECODE = Kernel(
    "attention", "sdpa_decode", ["q", "k", "v", "sinks", "offset", "params"], ["o", "ml"]
)
MERGE = Kernel("attention", "sdpa_decode_merge", ["o", "ml", "sinks"], ["out"])
BANDED = Kernel("attention", "sdpa_banded", ["q", "k", "v", "sinks", "params"], ["o"])
BANDED_COUNTING = Kernel(
    "attention",
    "sdpa_banded",
    ["q", "k", "v", "sinks", "params"],
    ["o", "visited_keys"],
    defines="#define GPTOSS_COUNT_VISITED 1\n",
    variant="counting",
)
KERNELS = (DECODE, MERGE, BANDED, BANDED_COUNTING)


def keys_per_tile(D: int) -> int:
    """Keys staged per tile: K and V tiles of TK x D floats stay within 16 KB of threadgroup
    memory."""
    return min(32, 2048 // D)


def decode_splits(S: int, D: int) -> tuple[int, int]:
    """(keys per split, number of splits) for a buffer of S slots."""
    if S <= FINAL_MAX_KEYS:
        return S, 1
    tk = keys_per_tile(D)
    split = max(FINAL_MAX_KEYS, -(-S // MAX_SPLITS))
    split = -(-split // tk) * tk
    return split, -(-S // split)


def decode_attention(
    backend: str,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    sinks: mx.array,
    scale: float,
    offset: mx.array | int,
) -> mx.array:
    """q `[B, Hq, 1, D]` over the buffers k, v `[B, Hkv, S, D]` whose slots 0 .. min(offset, S-1)
    are filled; -> `[B, Hq, 1, D]`."""
    B, Hq, _, D = q.shape
    Hkv, S = k.shape[1], k.shape[2]
    G = Hq // Hkv
    split, ns = decode_splits(S, D)
    offset = (
        (offset if isinstance(offset, mx.array) else mx.array(offset)).reshape(1).astype(mx.int32)
    )
    params = mx.array([scale], dtype=mx.float32)
    final = ns == 1
    o_shape, ml_shape = ((B, Hq, 1, D), (1,)) if final else ((B, Hq, ns, D), (B, Hq, ns, 2))
    o_dtype = q.dtype if final else mx.float32
    o, ml = DECODE(
        backend,
        inputs=[q, k, v, sinks, offset, params],
        template=[
            ("OT", o_dtype),
            ("D", D),
            ("TK", keys_per_tile(D)),
            ("SPLIT", split),
            ("FINAL", final),
        ],
        grid=(32 * G, B * Hkv, ns),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[o_shape, ml_shape],
        output_dtypes=[o_dtype, mx.float32],
    )
    if final:
        return o
    return MERGE(
        backend,
        inputs=[o, ml, sinks],
        template=[("T", q.dtype), ("D", D)],
        grid=(32, B * Hq, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(B, Hq, 1, D)],
        output_dtypes=[q.dtype],
    )[0]


def banded_attention(
    backend: str,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    sinks: mx.array,
    scale: float,
    window: int,
    count: bool = False,
) -> mx.array | tuple[mx.array, mx.array]:
    """Sliding-window attention with sinks: q `[B, Hq, T, D]` are the last T of the S positions in
    k, v `[B, Hkv, S, D]`; -> `[B, Hq, T, D]` (and, with `count`, keys visited per query
    `[B, Hq, T]`)."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    kernel = BANDED_COUNTING if count else BANDED
    outs = kernel(
        backend,
        inputs=[q, k, v, sinks, mx.array([scale], dtype=mx.float32)],
        template=[("OT", q.dtype), ("D", D), ("TK", keys_per_tile(D)), ("W", window)],
        grid=(32 * G, B * Hkv, -(-T // QUERY_BLOCK)),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[(B, Hq, T, D), (B, Hq, T)][: 2 if count else 1],
        output_dtypes=[q.dtype, mx.int32][: 2 if count else 1],
    )
    return (outs[0], outs[1]) if count else outs[0]


# --- dispatch -----------------------------------------------------------------------------------


def _supported(q: mx.array, k: mx.array, v: mx.array, max_dim: int) -> bool:
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    return (
        q.dtype in _FLOATS
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and D % 32 == 0
        and D <= max_dim
        and Hq % Hkv == 0
        and 32 * (Hq // Hkv) <= 1024
        and k.shape[0] == B
        and v.shape == k.shape
    )


def attend(
    backend: str,
    q: mx.array,
    k: mx.array,
    v: mx.array,
    sinks: mx.array,
    scale: float,
    window: int | None,
    decode_offset: mx.array | None = None,
) -> mx.array | None:
    """Attention with sinks through the kernels, or None for the mlx path.

    q `[B, Hq, T, D]`, k and v `[B, Hkv, S, D]`; `window` None on full layers. `decode_offset`: for
    one decoded token over a whole cache buffer, its position (slots up to it are filled);
    otherwise the queries are the last T of the S positions in k, v.
    """
    if backend == "mlx":
        return None
    T = q.shape[2]
    if T == 1 and decode_offset is not None:
        if _supported(q, k, v, 128) and enabled(DECODE.name, backend):
            return decode_attention(backend, q, k, v, sinks, scale, decode_offset)
        return None
    if T > 1 and window is not None and k.shape[2] - T < window:
        if _supported(q, k, v, 64) and enabled(BANDED.name, backend):
            return banded_attention(backend, q, k, v, sinks, scale, window)
    return None


# --- self-checks ---------------------------------------------------------------------------------

# The reference is the mlx ops in float32 on the same (bfloat16-valued) inputs: the kernels
# accumulate in float32, so the bfloat16 tolerance covers the output rounding only.
_TOL = {mx.float32: 1e-4, mx.bfloat16: 1e-2}


def _f32(*arrays: mx.array) -> list[mx.array]:
    return [a.astype(mx.float32) for a in arrays]


def random_qkv(
    B: int,
    Hq: int,
    Hkv: int,
    T: int,
    S: int,
    D: int,
    seed: int = 0,
    dtype: mx.Dtype = mx.float32,
) -> tuple[mx.array, mx.array, mx.array, mx.array]:
    """Standard-normal q `[B, Hq, T, D]`, k and v `[B, Hkv, S, D]` and sinks `[Hq]`."""
    rng = np.random.default_rng(seed)

    def normal(*shape: int) -> mx.array:
        return mx.array(rng.normal(size=shape).astype(np.float32)).astype(dtype)

    return normal(B, Hq, T, D), normal(B, Hkv, S, D), normal(B, Hkv, S, D), normal(Hq)


@self_check(DECODE.name)
def _check_decode(backend: str) -> tuple[bool, str]:
    for dtype, tol in _TOL.items():
        for S, offset in (
            (16, 9),
            (FINAL_MAX_KEYS + 64, FINAL_MAX_KEYS + 40),
        ):  # one pass; split + merge
            q, k, v, sinks = random_qkv(1, 4, 2, 1, S, 64, seed=S, dtype=dtype)
            got = decode_attention(backend, q, k, v, sinks, 0.125, offset)
            err = relative_error(got, ops.decode_attention(*_f32(q, k, v, sinks), 0.125, offset))
            if not (got.dtype == dtype and err < tol):
                return (
                    False,
                    f"relative error {err:.3g} in {dtype} with {S} slots, tolerance {tol:g}",
                )
    return True, ""


@self_check(BANDED.name)
def _check_banded(backend: str) -> tuple[bool, str]:
    for dtype, tol in _TOL.items():
        q, k, v, sinks = random_qkv(1, 4, 2, 40, 43, 64, seed=5, dtype=dtype)
        got = banded_attention(backend, q, k, v, sinks, 0.125, 8)
        err = relative_error(got, ops.sliding_window_attention(*_f32(q, k, v, sinks), 0.125, 8))
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""
