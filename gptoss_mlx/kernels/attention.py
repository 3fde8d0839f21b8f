"""Attention through the kernels of `metal/attention.metal`; the mlx ops are reference and fallback.

`attend(backend, q, k, v, sinks, scale, window, decode_offset)` is what `attention.Attention` calls
first; it returns `[B, Hq, T, D]`, or None when the mlx path should run:

- one decoded token at array-valued position `decode_offset` over the whole ring / full-cache
  buffer: `sdpa_decode` reads the buffer in place, no mask, split over enough threadgroups to fill
  a GPU at batch 1 and merged by `sdpa_decode_merge`;
- a chunk of T > 1 queries on a sliding layer: `sdpa_banded` visits only the keys of each query
  block's band (at most window + 7 per query) on SIMD-group matrices, so the work grows as
  T x window;
- anything else (full layers' prefill, quantized caches, unsupported shapes, or a kernel that is
  slower or wrong here: see `measured`): the mlx ops.

The reference each kernel is checked against is `ops.decode_attention` /
`ops.sliding_window_attention`.
"""

from __future__ import annotations

from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .. import ops
from . import measured
from .dispatch import Kernel, relative_error

_FLOATS = (mx.float32, mx.float16, mx.bfloat16)
MIN_KEYS_PER_SPLIT = 16  # decode: a split's keys (G simdgroups take turns over them)
TARGET_THREADGROUPS = 256  # decode: splits until B * Hkv * splits reaches this (or keys run out)
MAX_SPLITS = 64
QUERY_BLOCK = 8  # banded: queries per threadgroup (the rows of its 8x8 matrices)
FULL_SLOTS, FULL_FILLED = 4096, 4000  # the full-layer decode trial's buffer
PREFILL_CHUNK = 512  # the banded trial's queries (generate.py's default prefill chunk)

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
DECODE_SLIDING, DECODE_FULL = "sdpa_decode:sliding", "sdpa_decode:full"


def decode_splits(B: int, Hkv: int, S: int) -> tuple[int, int]:
    """(keys per split, number of splits) for a buffer of S slots: enough threadgroups
    (B x Hkv x splits) to fill a GPU, each with at least MIN_KEYS_PER_SPLIT keys."""
    ns = max(
        1,
        min(-(-TARGET_THREADGROUPS // (B * Hkv)), -(-S // MIN_KEYS_PER_SPLIT), MAX_SPLITS),
    )
    split = -(-S // ns)
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
    split, ns = decode_splits(B, Hkv, S)
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
        template=[("OT", o_dtype), ("D", D), ("G", G), ("SPLIT", split), ("FINAL", final)],
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
        template=[("OT", q.dtype), ("D", D), ("G", G), ("W", window)],
        grid=(32 * G, B * Hkv, -(-T // QUERY_BLOCK)),
        threadgroup=(32 * G, 1, 1),
        output_shapes=[(B, Hq, T, D), (B, Hq, T)][: 2 if count else 1],
        output_dtypes=[q.dtype, mx.int32][: 2 if count else 1],
    )
    return (outs[0], outs[1]) if count else outs[0]


# --- dispatch -----------------------------------------------------------------------------------


def _arrays_supported(q: object, k: object, v: object) -> bool:
    """Plain float arrays of one dtype (a quantized cache, for one, is not)."""
    if not all(isinstance(a, mx.array) for a in (q, k, v)):
        return False
    B, Hq, _, D = q.shape
    return (
        q.dtype in _FLOATS
        and k.dtype == q.dtype
        and v.dtype == q.dtype
        and k.ndim == 4
        and k.shape[0] == B
        and k.shape[3] == D
        and v.shape == k.shape
        and Hq % k.shape[1] == 0
    )


def decode_fits(G: int, D: int) -> bool:
    """sdpa_decode: D a multiple of 32, G query heads per KV head as simdgroups, and their partial
    sums (G x G x D floats) in threadgroup memory."""
    return D % 32 == 0 and G <= 32 and 4 * G * G * (D + 2) <= 32 * 1024


def banded_fits(G: int, D: int) -> bool:
    """sdpa_banded: D a multiple of 8 up to 64, at most 8 query heads per KV head (the staged
    queries share the 16 KB K/V tile)."""
    return D % 8 == 0 and D <= 64 and G <= 8


def decode_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
    return _arrays_supported(q, k, v) and decode_fits(q.shape[1] // k.shape[1], q.shape[3])


def banded_supported(q: mx.array, k: mx.array, v: mx.array) -> bool:
    return _arrays_supported(q, k, v) and banded_fits(q.shape[1] // k.shape[1], q.shape[3])


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
        if not decode_supported(q, k, v):
            return None
        key = DECODE_SLIDING if window is not None else DECODE_FULL
        shapes = measured.Shapes(
            heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3], window=window or 128
        )
        if not measured.enabled(key, backend, shapes):
            return None
        return measured.run(
            key, backend, lambda: decode_attention(backend, q, k, v, sinks, scale, decode_offset)
        )
    if T > 1 and window is not None and k.shape[2] - T < window and banded_supported(q, k, v):
        shapes = measured.Shapes(
            heads=q.shape[1], kv_heads=k.shape[1], head_dim=q.shape[3], window=window
        )
        if measured.enabled(BANDED.name, backend, shapes):
            return measured.run(
                BANDED.name,
                backend,
                lambda: banded_attention(backend, q, k, v, sinks, scale, window),
            )
    return None


# --- random inputs and the trials: the kernels against the mlx ops at given shapes -------------

# The reference is the mlx ops in float32 on the same (bfloat16-valued) inputs: the kernels
# accumulate in float32, so the bfloat16 tolerance covers the output rounding only.
TOL = {mx.float32: 1e-4, mx.bfloat16: 1e-2, mx.float16: 1e-2}


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


def _trial(
    name: str,
    shape: str,
    kernels: tuple[Kernel, ...],
    qkvs: tuple[mx.array, ...],
    kernel: Callable[..., mx.array],
    reference: Callable[..., mx.array],
) -> measured.Trial:
    """A trial from inputs (float32) and the kernel and reference as functions of q, k, v, sinks."""

    def inputs(dt: mx.Dtype) -> list[mx.array]:
        return [a.astype(dt) for a in qkvs]

    def check() -> tuple[bool, str]:
        for dt, tol in TOL.items():
            got = kernel(*inputs(dt))
            want = reference(*[a.astype(mx.float32) for a in inputs(dt)])
            err = relative_error(got, want)
            if not (got.dtype == dt and err < tol):
                return False, f"relative error {err:.3g} in {dt}, tolerance {tol:g}"
        return True, ""

    dt = measured.DTYPE
    return measured.Trial(
        name,
        shape,
        kernels,
        lambda: kernel(*inputs(dt)),
        lambda: reference(*inputs(dt)),
        check,
    )


@measured.trials
def _trials(backend: str, shapes: measured.Shapes) -> list[measured.Trial]:
    """Decode over a full window ring and over a 4096-slot full-layer buffer (4000 filled), and a
    512-query prefill chunk after window - 1 earlier positions, at the model's head shapes."""
    if not shapes.has_attention:
        return []
    Hq, Hkv, D, W = shapes.heads, shapes.kv_heads, shapes.head_dim, shapes.window
    scale = D**-0.5
    out = []
    decode = ((DECODE_SLIDING, W, 5 * W), (DECODE_FULL, FULL_SLOTS, FULL_FILLED - 1))
    for name, S, pos in decode if decode_fits(Hq // Hkv, D) else ():
        offset = mx.array(pos)
        out.append(
            _trial(
                name,
                f"B=1 Hq={Hq} Hkv={Hkv} slots={S} filled={min(pos + 1, S)}",
                (DECODE, MERGE),
                random_qkv(1, Hq, Hkv, 1, S, D, seed=S),
                lambda q, k, v, s, o=offset: decode_attention(backend, q, k, v, s, scale, o),
                lambda q, k, v, s, o=offset: ops.decode_attention(q, k, v, s, scale, o),
            )
        )
    if not banded_fits(Hq // Hkv, D):
        return out
    T, P = PREFILL_CHUNK, W - 1
    out.append(
        _trial(
            BANDED.name,
            f"B=1 T={T} after {P} window={W} Hq={Hq}",
            (BANDED,),
            random_qkv(1, Hq, Hkv, T, T + P, D, seed=5),
            lambda q, k, v, s: banded_attention(backend, q, k, v, s, scale, W),
            lambda q, k, v, s: ops.sliding_window_attention(q, k, v, s, scale, W),
        )
    )
    return out
