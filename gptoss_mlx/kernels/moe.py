"""Decode MoE through the kernels of `metal/moe.metal`, with the mlx ops as reference and fallback.

`experts(module, x, indices, weights)` is what `moe.Experts` calls first: `[N, H]` out, or None when
the mlx path should run (backend mlx, prefill-sized batches, unsupported shapes).
"""

from __future__ import annotations

import types

import mlx.core as mx
import numpy as np

from . import Kernel, backend_for, enabled, relative_error, self_check

SIMDGROUPS = 4  # per threadgroup
UP_ROWS = 2  # output features per simdgroup (4 interleaved weight rows)
DOWN_ROWS = 2  # output rows per simdgroup
MAX_PAIRS = 64  # token-expert pairs: from here the mlx path sorts by expert (moe.SORT_THRESHOLD)
_FLOATS = (mx.float32, mx.float16, mx.bfloat16)

GATE_UP = Kernel(
    "moe", "moe_gate_up_swiglu", ["x", "indices", "w", "scales", "bias", "params"], ["act"]
)
DOWN = Kernel(
    "moe", "moe_down_combine", ["act", "indices", "weights", "w", "scales", "bias"], ["y"]
)
KERNELS = (GATE_UP, DOWN)


def _grid(n_out: int, rows: int, batch: int):
    per_tg = SIMDGROUPS * rows
    return (32 * SIMDGROUPS * (-(-n_out // per_tg)), batch, 1), (32 * SIMDGROUPS, 1, 1)


def gate_up_swiglu(
    backend: str, proj, x: mx.array, indices: mx.array, alpha: float, limit: float
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
    backend: str, proj, act: mx.array, indices: mx.array, weights: mx.array
) -> mx.array:
    """act `[N*K, I]`, indices/weights `[N, K]` -> `sum_k w_k (W2[e_k] act_k + b2[e_k])` `[N, H]`."""
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


def mlx_gate_up_swiglu(proj, x, indices, alpha, limit) -> mx.array:
    """The model's ops for the same thing (moe.Experts' unsorted path)."""
    from ..moe import swiglu

    N, K = indices.shape
    h = proj(x[:, None, None, :], indices)  # [N, K, 1, 2I]
    return swiglu(h, alpha, limit).reshape(N * K, -1)


def mlx_down_combine(proj, act, indices, weights) -> mx.array:
    N, K = indices.shape
    y = proj(act.reshape(N, K, 1, -1), indices)[..., 0, :]  # [N, K, H]
    return (y * weights[..., None].astype(y.dtype)).sum(axis=1)


def supported(module, x: mx.array, indices: mx.array) -> bool:
    from ..moe import MXFP4SwitchLinear

    up, down = module.gate_up_proj, module.down_proj
    N, K = indices.shape
    return (
        isinstance(up, MXFP4SwitchLinear)
        and isinstance(down, MXFP4SwitchLinear)
        and x.ndim == 2
        and x.dtype in _FLOATS
        and N * K < MAX_PAIRS
        and up.weight.dtype == mx.uint32
        and up.scales.dtype == mx.uint8
        and down.weight.dtype == mx.uint32
        and down.scales.dtype == mx.uint8
        and x.shape[1] % 32 == 0
        and down.weight.shape[2] * 8 % 32 == 0
        and up.weight.shape[1] == 2 * down.weight.shape[2] * 8
    )


def experts(module, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array | None:
    """`moe.Experts.__call__` through the kernels, or None to let the mlx path run."""
    backend = backend_for(module)
    if backend == "mlx" or not supported(module, x, indices):
        return None
    use_up, use_down = enabled(GATE_UP.name, backend), enabled(DOWN.name, backend)
    if not (use_up or use_down):
        return None
    alpha, limit = module.alpha, module.limit
    if use_up:
        act = gate_up_swiglu(backend, module.gate_up_proj, x, indices, alpha, limit)
    else:
        act = mlx_gate_up_swiglu(module.gate_up_proj, x, indices, alpha, limit)
    if use_down:
        return down_combine(backend, module.down_proj, act, indices, weights)
    return mlx_down_combine(module.down_proj, act, indices, weights)


# --- self-checks: small random experts, the kernel against the mlx ops --------------------------


def random_experts(E: int, H: int, I: int, seed: int = 0, dtype=mx.float32):
    """An Experts-like namespace with random MXFP4 weights (scales near 2^0) and biases."""
    from ..moe import MXFP4SwitchLinear

    rng = np.random.default_rng(seed)

    def proj(n_in, n_out):
        p = MXFP4SwitchLinear(E, n_in, n_out)
        p.weight = mx.array(rng.integers(0, 2**32, size=(E, n_out, n_in // 8), dtype=np.uint32))
        p.scales = mx.array(rng.integers(122, 128, size=(E, n_out, n_in // 32), dtype=np.uint8))
        p.bias = mx.array(rng.normal(size=(E, n_out)).astype(np.float32)).astype(dtype)
        return p

    return types.SimpleNamespace(
        gate_up_proj=proj(H, 2 * I), down_proj=proj(I, H), alpha=1.702, limit=7.0
    )


def in_float32(proj):
    """A copy of an MXFP4SwitchLinear whose bias is float32 (the weights are MXFP4 either way)."""
    from ..moe import MXFP4SwitchLinear

    E, n_out, words = proj.weight.shape
    p = MXFP4SwitchLinear(E, words * 8, n_out)
    p.weight, p.scales, p.bias = proj.weight, proj.scales, proj.bias.astype(mx.float32)
    return p


def random_routing(N: int, K: int, E: int, seed: int = 0, dtype=mx.float32):
    rng = np.random.default_rng(seed + 1)
    idx = np.stack([rng.permutation(E)[:K] for _ in range(N)]).astype(np.uint32)
    w = rng.random((N, K)).astype(np.float32)
    return mx.array(idx), mx.softmax(mx.array(w), axis=-1).astype(dtype)


_CHECK_SHAPE = dict(E=3, H=64, I=96, N=2, K=2)  # partial threadgroups in both kernels
# Kernels accumulate in float32 and round once; the reference is the mlx ops in float32 on the same
# (bfloat16-valued) inputs, so the bfloat16 tolerance covers the output rounding only.
_TOL = {mx.float32: 1e-4, mx.bfloat16: 1e-2}
_f32 = lambda a: a.astype(mx.float32)  # noqa: E731


@self_check(GATE_UP.name)
def _check_gate_up(backend: str):
    s = _CHECK_SHAPE
    for dtype, tol in _TOL.items():
        ex = random_experts(s["E"], s["H"], s["I"], seed=11, dtype=dtype)
        idx, _ = random_routing(s["N"], s["K"], s["E"], seed=11)
        x = mx.array(
            np.random.default_rng(12).normal(size=(s["N"], s["H"])).astype(np.float32)
        ).astype(dtype)
        got = gate_up_swiglu(backend, ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
        want = mlx_gate_up_swiglu(in_float32(ex.gate_up_proj), _f32(x), idx, ex.alpha, ex.limit)
        err = relative_error(got, want)
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""


@self_check(DOWN.name)
def _check_down(backend: str):
    s = _CHECK_SHAPE
    for dtype, tol in _TOL.items():
        ex = random_experts(s["E"], s["H"], s["I"], seed=13, dtype=dtype)
        idx, w = random_routing(s["N"], s["K"], s["E"], seed=13, dtype=dtype)
        act = mx.array(
            np.random.default_rng(14).normal(size=(s["N"] * s["K"], s["I"])).astype(np.float32)
        ).astype(dtype)
        got = down_combine(backend, ex.down_proj, act, idx, w)
        err = relative_error(
            got, mlx_down_combine(in_float32(ex.down_proj), _f32(act), idx, _f32(w))
        )
        if not (got.dtype == dtype and err < tol):
            return False, f"relative error {err:.3g} in {dtype}, tolerance {tol:g}"
    return True, ""
