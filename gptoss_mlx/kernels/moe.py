"""Decode MoE through the kernels of `metal/moe.metal`, with the mlx ops as reference and fallback.

`experts(backend, up, down, x, indices, weights, alpha, limit)` is what `moe.Experts` calls first:
`[N, H]` out, or None when the mlx path should run (backend mlx, batches of `ops.SORT_THRESHOLD`
token-expert pairs or more, weights that are not plain MXFP4 arrays, unsupported shapes, or a
kernel that is slower or wrong here: see `measured`). The reference each kernel is checked
against is `ops.experts_swiglu` / `ops.experts_combine`.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import mlx.core as mx
import numpy as np

from .. import ops
from . import measured
from .dispatch import Kernel, relative_error

SIMDGROUPS = 8  # per threadgroup (256 threads)
UP_ROWS = 4  # output features per simdgroup (8 interleaved weight rows)
DOWN_ROWS = 4  # output rows per simdgroup
XS_STRIDE = 36  # floats per staged block of 32 activations (moe.metal)
MAX_INPUT = (32 * 1024 // (4 * XS_STRIDE)) * 32  # input features the staging holds (7264)
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

GATE_UP = Kernel(
    "moe", "moe_gate_up_swiglu", ["x", "indices", "w", "scales", "bias", "params"], ["act"]
)
DOWN = Kernel(
    "moe", "moe_down_combine", ["act", "indices", "weights", "w", "scales", "bias"], ["y"]
)
KERNELS = (GATE_UP, DOWN)


def _grid(n_out: int, rows: int, batch: int) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    per_tg = SIMDGROUPS * rows
    return (32 * SIMDGROUPS * (-(-n_out // per_tg)), batch, 1), (32 * SIMDGROUPS, 1, 1)


def gate_up_swiglu(
    backend: str, proj: ops.MXFP4Weights, x: mx.array, indices: mx.array, alpha: float, limit: float
) -> mx.array:
    """x `[N, H]`, indices `[N, K]` -> SwiGLU activations `[N*K, I]` (one kernel)."""
    N, K = indices.shape
    I = proj.weight.shape[1] // 2
    grid, tg = _grid(I, UP_ROWS, N * K)
    params = mx.array([alpha, limit], dtype=mx.float32)
    return GATE_UP(
        backend,
        inputs=[x, indices, proj.weight, proj.scales, proj.bias, params],
        template=[("T", x.dtype), ("H", x.shape[1]), ("ROWS", UP_ROWS)],
        grid=grid,
        threadgroup=tg,
        output_shapes=[(N * K, I)],
        output_dtypes=[x.dtype],
    )[0]


def down_combine(
    backend: str, proj: ops.MXFP4Weights, act: mx.array, indices: mx.array, weights: mx.array
) -> mx.array:
    """act `[N*K, I]`, indices/weights `[N, K]` -> `sum_k w_k (W2[e_k] act_k + b2[e_k])`
    `[N, H]` (one kernel)."""
    N, K = indices.shape
    H = proj.weight.shape[1]
    grid, tg = _grid(H, DOWN_ROWS, N)
    return DOWN(
        backend,
        inputs=[act, indices, weights, proj.weight, proj.scales, proj.bias],
        template=[("T", act.dtype), ("I", act.shape[1]), ("ROWS", DOWN_ROWS)],
        grid=grid,
        threadgroup=tg,
        output_shapes=[(N, H)],
        output_dtypes=[act.dtype],
    )[0]


def _is_mxfp4(p: ops.MXFP4Weights) -> bool:
    """Whether `p` holds MXFP4 expert weights as `ops.MXFP4Weights` describes them."""
    w, scales = getattr(p, "weight", None), getattr(p, "scales", None)
    return (
        isinstance(w, mx.array)
        and isinstance(scales, mx.array)
        and isinstance(getattr(p, "bias", None), mx.array)
        and w.dtype == mx.uint32
        and scales.dtype == mx.uint8
        and w.ndim == scales.ndim == 3
        and scales.shape[2] * 4 == w.shape[2]
    )


def supported(up: ops.MXFP4Weights, down: ops.MXFP4Weights, x: mx.array, indices: mx.array) -> bool:
    """Whether the kernels take these experts and this batch."""
    N, K = indices.shape
    if not (_is_mxfp4(up) and _is_mxfp4(down) and x.ndim == 2 and x.dtype in _FLOATS):
        return False
    H, I = x.shape[1], down.weight.shape[2] * 8
    return (
        N * K < ops.SORT_THRESHOLD  # larger batches sort by expert: the mlx path
        and H % 32 == 0
        and I % 32 == 0
        and max(H, I) <= MAX_INPUT
        and up.weight.shape[1:] == (2 * I, H // 8)
        and down.weight.shape[1:] == (H, I // 8)
    )


def experts(
    backend: str,
    up: ops.MXFP4Weights,
    down: ops.MXFP4Weights,
    x: mx.array,
    indices: mx.array,
    weights: mx.array,
    alpha: float,
    limit: float,
) -> mx.array | None:
    """`ops.experts` through the kernels, or None to let the mlx path run.

    x `[N, H]`, indices and weights `[N, k]`; `up` the gate/linear (interleaved) projection,
    `down` the down projection -> `[N, H]`.
    """
    if backend == "mlx" or not supported(up, down, x, indices):
        return None
    shapes = measured.Shapes(
        hidden=x.shape[1], intermediate=down.weight.shape[2] * 8, experts_per_token=indices.shape[1]
    )
    use_up = measured.enabled(GATE_UP.name, backend, shapes)
    use_down = measured.enabled(DOWN.name, backend, shapes)
    if not (use_up or use_down):
        return None
    act = None
    if use_up:
        act = measured.run(
            GATE_UP.name, backend, lambda: gate_up_swiglu(backend, up, x, indices, alpha, limit)
        )
    if act is None:
        act = ops.experts_swiglu(up, x, indices, alpha, limit)
    y = None
    if use_down:
        y = measured.run(
            DOWN.name, backend, lambda: down_combine(backend, down, act, indices, weights)
        )
    return y if y is not None else ops.experts_combine(down, act, indices, weights)


# --- random experts and the trials: the kernels against the mlx ops at given shapes ------------


def random_experts(
    E: int, H: int, I: int, seed: int = 0, dtype: mx.Dtype = mx.float32
) -> types.SimpleNamespace:
    """An Experts-like namespace (`gate_up_proj`, `down_proj`, `alpha`, `limit`) with random MXFP4
    weights (scales near 2^0) and biases."""
    rng = np.random.default_rng(seed)

    def proj(n_in: int, n_out: int) -> types.SimpleNamespace:
        return types.SimpleNamespace(
            weight=mx.array(rng.integers(0, 2**32, size=(E, n_out, n_in // 8), dtype=np.uint32)),
            scales=mx.array(rng.integers(122, 128, size=(E, n_out, n_in // 32), dtype=np.uint8)),
            bias=mx.array(rng.normal(size=(E, n_out)).astype(np.float32)).astype(dtype),
        )

    return types.SimpleNamespace(
        gate_up_proj=proj(H, 2 * I), down_proj=proj(I, H), alpha=1.702, limit=7.0
    )


def in_dtype(proj: ops.MXFP4Weights, dtype: mx.Dtype) -> types.SimpleNamespace:
    """The same MXFP4 weights with the bias in `dtype`."""
    return types.SimpleNamespace(
        weight=proj.weight, scales=proj.scales, bias=proj.bias.astype(dtype)
    )


def random_routing(
    N: int, K: int, E: int, seed: int = 0, dtype: mx.Dtype = mx.float32
) -> tuple[mx.array, mx.array]:
    """Each of N tokens' K distinct experts `[N, K]` uint32 and softmax weights `[N, K]`."""
    rng = np.random.default_rng(seed + 1)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.uint32)
    w = rng.random((N, K)).astype(np.float32)
    return mx.array(idx), mx.softmax(mx.array(w), axis=-1).astype(dtype)


# Kernels accumulate in float32 and round once; the reference is the mlx ops in float32 on the same
# (bfloat16-valued) inputs, so the bfloat16 tolerance covers the output rounding only.
TOL = {mx.float32: 1e-4, mx.bfloat16: 1e-2, mx.float16: 1e-2}


def _check(
    run: Callable[[mx.Dtype], mx.array], reference: Callable[[mx.Dtype], mx.array]
) -> tuple[bool, str]:
    """Each dtype: the kernel's output against the float32 mlx ops on the same values."""
    for dtype, tol in TOL.items():
        got, want = run(dtype), reference(dtype)
        err = relative_error(got, want)
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""


@measured.trials
def _trials(backend: str, shapes: measured.Shapes) -> list[measured.Trial]:
    """One decoded token's K experts at the model's hidden and intermediate sizes (only the
    selected experts' weights are read, so K experts stand for all E)."""
    if not shapes.has_experts:
        return []
    H, I, K = shapes.hidden, shapes.intermediate, shapes.experts_per_token
    if H % 32 or I % 32 or max(H, I) > MAX_INPUT:
        return []
    ex = random_experts(K, H, I, seed=11)
    idx = mx.arange(K, dtype=mx.uint32)[None]
    w = mx.softmax(mx.array(np.random.default_rng(12).random((1, K)).astype(np.float32)), axis=-1)
    x = mx.array(np.random.default_rng(13).normal(size=(1, H)).astype(np.float32))
    act = mx.array(np.random.default_rng(14).normal(size=(K, I)).astype(np.float32))
    up, down, a, lim = ex.gate_up_proj, ex.down_proj, ex.alpha, ex.limit
    f32 = mx.float32

    def up_kernel(dt: mx.Dtype) -> mx.array:
        return gate_up_swiglu(backend, in_dtype(up, dt), x.astype(dt), idx, a, lim)

    def up_ops(dt: mx.Dtype) -> mx.array:
        return ops.experts_swiglu(in_dtype(up, dt), x.astype(dt), idx, a, lim)

    def down_kernel(dt: mx.Dtype) -> mx.array:
        return down_combine(backend, in_dtype(down, dt), act.astype(dt), idx, w.astype(dt))

    def down_ops(dt: mx.Dtype) -> mx.array:
        return ops.experts_combine(in_dtype(down, dt), act.astype(dt), idx, w.astype(dt))

    def up_reference(dt: mx.Dtype) -> mx.array:  # the float32 ops on the dt-rounded inputs
        rounded = in_dtype(in_dtype(up, dt), f32)
        return ops.experts_swiglu(rounded, x.astype(dt).astype(f32), idx, a, lim)

    def down_reference(dt: mx.Dtype) -> mx.array:
        rounded = in_dtype(in_dtype(down, dt), f32)
        return ops.experts_combine(
            rounded, act.astype(dt).astype(f32), idx, w.astype(dt).astype(f32)
        )

    dt = measured.DTYPE
    return [
        measured.Trial(
            GATE_UP.name,
            f"N=1 K={K} {H}->{2 * I}",
            (GATE_UP,),
            lambda: up_kernel(dt),
            lambda: up_ops(dt),
            lambda: _check(up_kernel, up_reference),
        ),
        measured.Trial(
            DOWN.name,
            f"N=1 K={K} {I}->{H}",
            (DOWN,),
            lambda: down_kernel(dt),
            lambda: down_ops(dt),
            lambda: _check(down_kernel, down_reference),
        ),
    ]
