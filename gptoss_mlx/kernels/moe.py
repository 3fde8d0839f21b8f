"""Decode MoE through the kernels of `metal/moe.metal`, with the mlx ops as reference and fallback.

`experts(backend, up, down, x, indices, weights, alpha, limit)` is what `moe.Experts` calls first:
`[N, H]` out, or None when the mlx path should run (backend mlx, batches of `ops.SORT_THRESHOLD`
token-expert pairs or more, unsupported shapes). The reference each kernel is checked against is
`ops.experts_swiglu` / `ops.experts_combine`.
"""

from __future__ import annotations

import types

import mlx.core as mx
import numpy as np

from .. import ops
from .dispatch import Kernel, enabled, relative_error, self_check

SIMDGROUPS = 4  # per threadgroup
UP_ROWS = 2  # output features per simdgroup (4 interleaved weight rows)
DOWN_ROWS = 2  # output rows per simdgroup
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
        template=[("T", x.dtype), ("ROWS", UP_ROWS)],
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
        template=[("T", act.dtype), ("ROWS", DOWN_ROWS)],
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
        and hasattr(p, "bias")
        and w.dtype == mx.uint32
        and scales.dtype == mx.uint8
        and w.ndim == scales.ndim == 3
    )


def supported(up: ops.MXFP4Weights, down: ops.MXFP4Weights, x: mx.array, indices: mx.array) -> bool:
    """Whether the kernels take these experts and this batch."""
    N, K = indices.shape
    return (
        _is_mxfp4(up)
        and _is_mxfp4(down)
        and x.ndim == 2
        and x.dtype in _FLOATS
        and N * K < ops.SORT_THRESHOLD  # larger batches sort by expert: the mlx path
        and x.shape[1] % 32 == 0
        and down.weight.shape[2] * 8 % 32 == 0
        and up.weight.shape[1] == 2 * down.weight.shape[2] * 8
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
    use_up, use_down = enabled(GATE_UP.name, backend), enabled(DOWN.name, backend)
    if not (use_up or use_down):
        return None
    if use_up:
        act = gate_up_swiglu(backend, up, x, indices, alpha, limit)
    else:
        act = ops.experts_swiglu(up, x, indices, alpha, limit)
    if use_down:
        return down_combine(backend, down, act, indices, weights)
    return ops.experts_combine(down, act, indices, weights)


# --- self-checks: small random experts, the kernel against the mlx ops --------------------------


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


def in_float32(proj: ops.MXFP4Weights) -> types.SimpleNamespace:
    """The same MXFP4 weights with a float32 bias."""
    return types.SimpleNamespace(
        weight=proj.weight, scales=proj.scales, bias=proj.bias.astype(mx.float32)
    )


def random_routing(
    N: int, K: int, E: int, seed: int = 0, dtype: mx.Dtype = mx.float32
) -> tuple[mx.array, mx.array]:
    """Each of N tokens' K distinct experts `[N, K]` uint32 and softmax weights `[N, K]`."""
    rng = np.random.default_rng(seed + 1)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.uint32)
    w = rng.random((N, K)).astype(np.float32)
    return mx.array(idx), mx.softmax(mx.array(w), axis=-1).astype(dtype)


_CHECK_SHAPE = dict(E=3, H=64, I=96, N=2, K=2)  # partial threadgroups in both kernels
# Kernels accumulate in float32 and round once; the reference is the mlx ops in float32 on the same
# (bfloat16-valued) inputs, so the bfloat16 tolerance covers the output rounding only.
_TOL = {mx.float32: 1e-4, mx.bfloat16: 1e-2}


def _f32(a: mx.array) -> mx.array:
    return a.astype(mx.float32)


@self_check(GATE_UP.name)
def _check_gate_up(backend: str) -> tuple[bool, str]:
    s = _CHECK_SHAPE
    for dtype, tol in _TOL.items():
        ex = random_experts(s["E"], s["H"], s["I"], seed=11, dtype=dtype)
        idx, _ = random_routing(s["N"], s["K"], s["E"], seed=11)
        x = mx.array(
            np.random.default_rng(12).normal(size=(s["N"], s["H"])).astype(np.float32)
        ).astype(dtype)
        got = gate_up_swiglu(backend, ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
        want = ops.experts_swiglu(in_float32(ex.gate_up_proj), _f32(x), idx, ex.alpha, ex.limit)
        err = relative_error(got, want)
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""


@self_check(DOWN.name)
def _check_down(backend: str) -> tuple[bool, str]:
    s = _CHECK_SHAPE
    for dtype, tol in _TOL.items():
        ex = random_experts(s["E"], s["H"], s["I"], seed=13, dtype=dtype)
        idx, w = random_routing(s["N"], s["K"], s["E"], seed=13, dtype=dtype)
        act = mx.array(
            np.random.default_rng(14).normal(size=(s["N"] * s["K"], s["I"])).astype(np.float32)
        ).astype(dtype)
        got = down_combine(backend, ex.down_proj, act, idx, w)
        err = relative_error(
            got, ops.experts_combine(in_float32(ex.down_proj), _f32(act), idx, _f32(w))
        )
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""
