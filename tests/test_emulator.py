"""The MSL emulator (gptoss_mlx.kernels.emulator) against numpy, hand-computed values, the MSL
specification's examples and MLX's own source generator: what Metal accepts runs, what it rejects
fails naming the line."""

from __future__ import annotations

import re

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.kernels.emulator import (
    KernelCompileError,
    KernelLintError,
    KernelRuntimeError,
    full_source,
    metal_kernel,
)

# ---------------------------------------------------------------------------------------------
# The generated source is byte-for-byte what MLX generates (captured from mlx itself: on a CPU-only
# MLX a Metal kernel can only be traced by mx.export_function, which prints it with verbose=True).


def _mlx_generated(capfd, tmp_path, kernel_args, call_args, arrays):
    k = mx.fast.metal_kernel(**kernel_args)

    def f(*xs):
        inputs = [xs[i] if isinstance(i, int) else i[0] for i in call_args["inputs"]]
        kw = dict(call_args, inputs=inputs)
        return k(**kw, verbose=True)

    capfd.readouterr()
    mx.export_function(str(tmp_path / "k.mlxfn"), f, *arrays)
    out = capfd.readouterr().out
    m = re.search(r"Generated source code for `[^`]*`:\n```\n(.*?)\n```\n", out, re.S)
    assert m, out
    return m.group(1)


GEN_CASES = [
    # scalar input, small (constant) array, shape/strides/ndim, template args, two attributes
    dict(
        kernel=dict(
            name="gen_a",
            input_names=["inp", "s", "small"],
            output_names=["out"],
            source=(
                "uint elem = thread_position_in_grid.x;\nT tmp = inp[elem];\n"
                "out[elem] = metal::exp(tmp) * s + small[0] + inp_shape[0] + inp_strides[0]"
                " + inp_ndim + thread_index_in_simdgroup;\n"
            ),
            header="// a header\n#define K 3\n",
            ensure_row_contiguous=False,
        ),
        inputs=[0, (2.0,), 1],
        arrays=[mx.zeros((16,)), mx.zeros((3,))],
        call=dict(
            template=[("T", mx.float32), ("N", 3), ("B", True)],
            output_shapes=[(16,)],
            output_dtypes=[mx.float32],
        ),
    ),
    # atomic outputs, half/bfloat, 0-d array and int/bool scalars, 8 elements is `device`
    dict(
        kernel=dict(
            name="gen_b",
            input_names=["a", "b", "c", "x"],
            output_names=["out", "o2"],
            source=(
                "out[0] = a[0] + threads_per_simdgroup + x_shape[0]"
                " + simdgroup_index_in_threadgroup;"
            ),
            atomic_outputs=True,
        ),
        inputs=[0, (3,), 1, (True,)],
        arrays=[mx.zeros((16,), mx.float16), mx.zeros((8,), mx.bfloat16)],
        call=dict(output_shapes=[(16,), (2,)], output_dtypes=[mx.float16, mx.bfloat16]),
    ),
    # no template, no attribute, shape buffers and two outputs (MLX's separator quirk)
    dict(
        kernel=dict(
            name="gen_c",
            input_names=["w"],
            output_names=["o1", "o2"],
            source="o1[0] = w_shape[1]; o2[0] = w_ndim;",
        ),
        inputs=[0],
        arrays=[mx.zeros((4, 5), mx.uint32)],
        call=dict(output_shapes=[(1,), (1,)], output_dtypes=[mx.int32, mx.int32]),
    ),
    # every thread attribute, a typename template only, 0-d array input
    dict(
        kernel=dict(
            name="gen_d",
            input_names=["v", "z"],
            output_names=["out"],
            source=(
                "// dispatch_quadgroups_per_threadgroup dispatch_simdgroups_per_threadgroup "
                "dispatch_threads_per_threadgroup grid_origin grid_size "
                "quadgroup_index_in_threadgroup quadgroups_per_threadgroup "
                "simdgroups_per_threadgroup thread_execution_width thread_index_in_quadgroup "
                "thread_index_in_threadgroup thread_position_in_threadgroup "
                "threadgroup_position_in_grid threadgroups_per_grid threads_per_grid "
                "threads_per_threadgroup\n"
                "out[0] = T(v[0]) + z;"
            ),
        ),
        inputs=[0, 1],
        arrays=[mx.zeros((9,), mx.int8), mx.array(2.5)],
        call=dict(template=[("T", mx.float16)], output_shapes=[(1,)], output_dtypes=[mx.float16]),
    ),
]


@pytest.mark.parametrize("case", GEN_CASES, ids=[c["kernel"]["name"] for c in GEN_CASES])
def test_generated_source_matches_mlx(case, capfd, tmp_path):
    assert mx.__version__.startswith("0.32."), (
        "the generator reproduces MLX 0.32; re-check it for " + mx.__version__
    )
    call = dict(case["call"], inputs=case["inputs"], grid=(32, 1, 1), threadgroup=(32, 1, 1))
    want = _mlx_generated(capfd, tmp_path, case["kernel"], call, case["arrays"])
    kw = case["kernel"]
    k = metal_kernel(**kw)
    inputs = [case["arrays"][i] if isinstance(i, int) else i[0] for i in case["inputs"]]
    got = full_source(k, inputs, case["call"]["output_dtypes"], case["call"].get("template"))
    assert got == want


# ---------------------------------------------------------------------------------------------
# SIMD and quad collectives on partial groups: 38 threads = one full simdgroup and one of 6 lanes
# (quads: ..., one full quad and one of 2 lanes).

N_THREADS = 38
FLOAT_OPS = [
    "sum",
    "product",
    "max",
    "min",
    "prefix_inclusive_sum",
    "prefix_exclusive_sum",
    "prefix_inclusive_product",
    "prefix_exclusive_product",
    "shuffle",
    "shuffle_down",
    "shuffle_up",
    "shuffle_xor",
    "shuffle_rotate_down",
    "shuffle_rotate_up",
    "broadcast",
    "broadcast_first",
]
INT_OPS = ["and", "or", "xor"]
BOOL_OPS = ["all", "any", "ballot", "is_first"]


def _coll_ref(prefix, op, x, u, b):
    """numpy reference of the documented semantics (NaN marks a read of an inactive lane)."""
    G = 32 if prefix == "simd" else 4
    n = len(x)
    out = np.zeros(n, np.float64)
    for t in range(n):
        lane = t % 32
        g0 = t - lane % G  # thread index of the group's first lane
        gl = lane % G
        members = [g0 + s for s in range(G) if g0 + s < n and (g0 + s) // 32 == t // 32]

        def src(s, t=t, g0=g0, members=members):
            if s < 0 or s >= G:
                return x[t]
            return x[g0 + s] if (g0 + s) in members else np.nan

        vals = x[members]
        k = [m - g0 for m in members]
        if op == "sum":
            r = vals.sum(dtype=np.float64)
        elif op == "product":
            r = np.prod(vals, dtype=np.float64)
        elif op == "max":
            r = vals.max()
        elif op == "min":
            r = vals.min()
        elif op == "prefix_inclusive_sum":
            r = sum(x[g0 + s] for s in k if s <= gl)
        elif op == "prefix_exclusive_sum":
            r = sum(x[g0 + s] for s in k if s < gl)
        elif op == "prefix_inclusive_product":
            r = np.prod([x[g0 + s] for s in k if s <= gl])
        elif op == "prefix_exclusive_product":
            r = np.prod([x[g0 + s] for s in k if s < gl])
        elif op == "shuffle":
            r = src((gl * 3 + 1) % G)
        elif op == "shuffle_down":
            r = src(gl + 1)
        elif op == "shuffle_up":
            r = src(gl - 2)
        elif op == "shuffle_xor":
            r = src(gl ^ 1)
        elif op == "shuffle_rotate_down":
            r = src((gl + 1) % G)
        elif op == "shuffle_rotate_up":
            r = src((gl - 1) % G)
        elif op == "broadcast":
            r = src(1)
        elif op == "broadcast_first":
            r = x[members[0]]
        elif op in ("and", "or", "xor"):
            f = {"and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor}[op]
            r = f.reduce(u[members])
        elif op == "all":
            r = float(all(b[members]))
        elif op == "any":
            r = float(any(b[members]))
        elif op == "ballot":
            r = float(sum(1 << s for s in k if b[g0 + s]))
        elif op == "is_first":
            r = float(t == members[0])
        out[t] = r
    return out


@pytest.mark.parametrize("prefix", ["simd", "quad"])
def test_collectives_on_partial_groups(prefix):
    ops = FLOAT_OPS + INT_OPS + BOOL_OPS
    lines = [
        "uint t = thread_position_in_grid.x; uint l = thread_index_in_simdgroup;",
        f"uint G = {32 if prefix == 'simd' else 4}; uint gl = l % G;",
        "float v = x[t]; uint w = u[t]; bool bb = b[t] != 0;",
    ]
    for i, op in enumerate(ops):
        p = f"{prefix}_{op}"
        if op == "shuffle":
            expr = f"{p}(v, (gl * 3 + 1) % G)"
        elif op in ("shuffle_down", "shuffle_xor", "shuffle_rotate_down", "shuffle_rotate_up"):
            expr = f"{p}(v, 1)"
        elif op == "shuffle_up":
            expr = f"{p}(v, 2)"
        elif op == "broadcast":
            expr = f"{p}(v, 1)"
        elif op in INT_OPS:
            expr = f"float({p}(w))"
        elif op == "ballot":
            expr = f"float(ulong({p}(bb)))"
        elif op == "is_first":
            expr = f"float({p}())"
        elif op in ("all", "any"):
            expr = f"float({p}(bb))"
        else:
            expr = f"{p}(v)"
        lines.append(f"out[{i} * {N_THREADS} + t] = {expr};")
    k = metal_kernel(f"coll_{prefix}", ["x", "u", "b"], ["out"], "\n".join(lines))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, N_THREADS).astype(np.float32)
    u = rng.integers(0, 2**32, N_THREADS, dtype=np.uint64).astype(np.uint32)
    b = (rng.uniform(size=N_THREADS) < 0.8).astype(np.uint8)
    (out,) = k(
        inputs=[mx.array(x), mx.array(u), mx.array(b)],
        grid=(N_THREADS, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(len(ops), N_THREADS)],
        output_dtypes=[mx.float32],
    )
    out = np.array(out)
    for i, op in enumerate(ops):
        want = _coll_ref(prefix, op, x.astype(np.float64), u, b.astype(bool))
        if op in INT_OPS:
            want = want.astype(np.uint32).astype(np.float32)
        np.testing.assert_allclose(out[i], want, rtol=1e-5, err_msg=f"{prefix}_{op}")


# ---------------------------------------------------------------------------------------------


def test_atomics_with_init_value():
    k = metal_kernel(
        "histogram",
        ["idx", "val"],
        ["count", "total", "top"],
        """
        uint t = thread_position_in_grid.x;
        uint bin = idx[t];
        atomic_fetch_add_explicit(&count[bin], 1u, memory_order_relaxed);
        atomic_fetch_add_explicit(total + bin, val[t], memory_order_relaxed);
        atomic_fetch_max_explicit(&top[bin], uint(val[t] * 100.0f), memory_order_relaxed);
        """,
        atomic_outputs=True,
    )
    rng = np.random.default_rng(1)
    idx = rng.integers(0, 10, 5000).astype(np.uint32)
    val = rng.uniform(0, 1, 5000).astype(np.float32)
    count, total, top = k(
        inputs=[mx.array(idx), mx.array(val)],
        grid=(5000, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(10,), (10,), (10,)],
        output_dtypes=[mx.uint32, mx.float32, mx.uint32],
        init_value=5,
    )
    np.testing.assert_array_equal(np.array(count), np.bincount(idx, minlength=10) + 5)
    np.testing.assert_allclose(np.array(total), np.bincount(idx, val, minlength=10) + 5, rtol=1e-4)
    want_top = np.full(10, 5)
    np.maximum.at(want_top, idx, (val * 100).astype(np.uint32))
    np.testing.assert_array_equal(np.array(top), want_top)


def test_strided_inputs_through_elem_to_loc():
    k = metal_kernel(
        "strided_copy",
        ["inp"],
        ["out"],
        """
        uint elem = thread_position_in_grid.x;
        out[elem] = inp[elem_to_loc(elem, inp_shape, inp_strides, inp_ndim)] * 2.0f;
        """,
        ensure_row_contiguous=False,
    )
    base = mx.arange(4 * 6 * 5, dtype=mx.float32).reshape(4, 6, 5)
    x = base.transpose(2, 0, 1)[:, ::2, 1:]  # strided, offset, not row-contiguous
    (out,) = k(
        inputs=[x],
        grid=(x.size, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(out), np.array(x) * 2)
    # with ensure_row_contiguous=True the kernel sees a row-contiguous copy
    k2 = metal_kernel(
        "strided_copy2", ["inp"], ["out"], "uint e = thread_position_in_grid.x; out[e] = inp[e];"
    )
    (out2,) = k2(
        inputs=[x],
        grid=(x.size, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[x.shape],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(out2), np.array(x))


def test_half_and_bfloat_vector_math():
    k = metal_kernel(
        "vecmath",
        ["h", "bf"],
        ["oh", "obf"],
        """
        uint i = thread_position_in_grid.x;
        half4 a = ((const device half4*)h)[i];
        half4 r = fma(a, half4(2.0h), half4(1.0h)) + metal::exp(a) - abs(a) * a.x;
        r.zw = half2(a.w, a.z) * half(0.5);
        ((device half4*)oh)[i] = r;
        bfloat4 b = ((const device bfloat4*)bf)[i];
        float4 f = float4(b);
        float4 g = fast::exp(f) + precise::sqrt(abs(f)) + max(f, float4(0.25f));
        ((device bfloat4*)obf)[i] = bfloat4(g) * bfloat(2.0f);
        """,
    )
    rng = np.random.default_rng(2)
    h = rng.uniform(-1, 1, 64).astype(np.float16)
    bf = mx.array(rng.uniform(-1, 1, 64).astype(np.float32)).astype(mx.bfloat16)
    oh, obf = k(
        inputs=[mx.array(h), bf],
        grid=(16, 1, 1),
        threadgroup=(16, 1, 1),
        output_shapes=[(64,), (64,)],
        output_dtypes=[mx.float16, mx.bfloat16],
    )
    a = h.astype(np.float32).reshape(16, 4)
    want = a * 2 + 1 + np.exp(a) - np.abs(a) * a[:, :1]
    want[:, 2] = a[:, 3] * 0.5
    want[:, 3] = a[:, 2] * 0.5
    np.testing.assert_allclose(
        np.array(oh).astype(np.float32).reshape(16, 4), want, rtol=1e-2, atol=1e-2
    )
    f = np.array(bf.astype(mx.float32))
    g = (np.exp(f) + np.sqrt(np.abs(f)) + np.maximum(f, 0.25)) * 2
    assert obf.dtype == mx.bfloat16
    np.testing.assert_allclose(np.array(obf.astype(mx.float32)), g, rtol=2e-2)


@pytest.mark.parametrize(
    "dtype,n,flag", [(mx.float32, 3, True), (mx.int32, 5, False), (mx.float16, 2, True)]
)
def test_template_parameters(dtype, n, flag):
    k = metal_kernel(
        "templ",
        ["x"],
        ["out"],
        """
        uint i = thread_position_in_grid.x;
        T acc = T(0);
        for (int j = 0; j < N; ++j) acc += x[i] * T(j + 1);
        out[i] = B ? acc : T(-acc);
        """,
    )
    x = mx.arange(10).astype(dtype)
    (out,) = k(
        inputs=[x],
        template=[("T", dtype), ("N", n), ("B", flag)],
        grid=(10, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(10,)],
        output_dtypes=[dtype],
    )
    want = np.arange(10) * (n * (n + 1) // 2) * (1 if flag else -1)
    assert out.dtype == dtype
    np.testing.assert_array_equal(np.array(out.astype(mx.float32)), want)


def test_scalar_inputs():
    k = metal_kernel(
        "scalars",
        ["x", "a", "n", "flag", "z"],
        ["out"],
        "uint i = thread_position_in_grid.x; out[i] = flag ? x[i] * a + float(n) + z : 0.0f;",
    )
    x = mx.arange(20, dtype=mx.float32)
    (out,) = k(
        inputs=[x, 1.5, 7, True, mx.array(0.25)],
        grid=(20, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(20,)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_allclose(np.array(out), np.arange(20) * 1.5 + 7 + 0.25)


REDUCE = """
threadgroup float buf[256];
uint l = thread_position_in_threadgroup.x;
uint g = threadgroup_position_in_grid.x;
uint n = threads_per_threadgroup.x;
buf[l] = x[thread_position_in_grid.x];
threadgroup_barrier(mem_flags::mem_threadgroup);
for (uint s = 128; s > 0; s >>= 1) {
    if (l < s && l + s < n) buf[l] += buf[l + s];
    threadgroup_barrier(mem_flags::mem_threadgroup);
}
if (l == 0) out[g] = buf[0];
"""


@pytest.mark.parametrize("order", ["forward", "reverse", "random"])
def test_threadgroup_reduction(order):
    k = metal_kernel("tg_reduce", ["x"], ["out"], REDUCE)
    x = np.random.default_rng(3).uniform(size=1000).astype(np.float32)
    (out,) = k(
        inputs=[mx.array(x)],
        grid=(1000, 1, 1),
        threadgroup=(256, 1, 1),
        output_shapes=[(4,)],
        output_dtypes=[mx.float32],
        lane_order=order,
        seed=7,
    )
    want = [x[i : i + 256].sum() for i in range(0, 1000, 256)]  # last threadgroup is partial (232)
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# MXFP4 matrix-vector product: one simdgroup per row, lanes stride over the 32-element blocks.

MXFP4_HEADER = """
constant float FP4_VALUES[16] = {+0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f,
                                 -0.0f, -0.5f, -1.0f, -1.5f, -2.0f, -3.0f, -4.0f, -6.0f};
"""
MXFP4_SOURCE = """
uint row = threadgroup_position_in_grid.x * ROWS + simdgroup_index_in_threadgroup;
uint lane = thread_index_in_simdgroup;
uint K = x_shape[0];
uint nblocks = K / 32;
if (row >= uint(w_shape[0])) return;
const device uint4* wrow = (const device uint4*)(w + row * (K / 8));
float acc = 0.0f;
for (uint b = lane; b < nblocks; b += 32) {
    float scale = metal::exp2(float(int(scales[row * nblocks + b]) - 127));
    uint4 q = wrow[b];
    const device float4* xb = (const device float4*)(x + b * 32);
    float part = 0.0f;
    for (int j = 0; j < 4; ++j) {
        uint word = q[j];
        float4 lo = float4(FP4_VALUES[word & 15], FP4_VALUES[(word >> 4) & 15],
                           FP4_VALUES[(word >> 8) & 15], FP4_VALUES[(word >> 12) & 15]);
        float4 hi = float4(FP4_VALUES[(word >> 16) & 15], FP4_VALUES[(word >> 20) & 15],
                           FP4_VALUES[(word >> 24) & 15], FP4_VALUES[(word >> 28) & 15]);
        part += dot(lo, xb[2 * j]) + dot(hi, xb[2 * j + 1]);
    }
    acc += scale * part;
}
acc = simd_sum(acc);
if (lane == 0) out[row] = acc;
"""


def _mxfp4_matvec(wq, scales, x, **kw):
    k = metal_kernel(
        "mxfp4_matvec", ["w", "scales", "x"], ["out"], MXFP4_SOURCE, header=MXFP4_HEADER
    )
    rows = 2
    n = wq.shape[0]
    return k(
        inputs=[wq, scales, x],
        template=[("ROWS", rows)],
        grid=(32 * rows * ((n + rows - 1) // rows), 1, 1),
        threadgroup=(32 * rows, 1, 1),
        output_shapes=[(n,)],
        output_dtypes=[mx.float32],
        **kw,
    )[0]


def _decode_mxfp4(wq: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """Independent numpy decoder: low nibble = even element, E8M0 scale per 32 elements."""
    lut = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32)
    b = wq.view(np.uint8)
    codes = np.stack([b & 15, b >> 4], axis=-1).reshape(b.shape[0], -1)
    return lut[codes] * np.repeat(2.0 ** (scales.astype(np.float32) - 127), 32, axis=1)


def test_mxfp4_matvec():
    rng = np.random.default_rng(4)
    w = mx.array(rng.normal(size=(37, 256)).astype(np.float32))
    wq, scales = mx.quantize(w, mode="mxfp4")
    x = mx.array(rng.normal(size=256).astype(np.float32))
    out = np.array(_mxfp4_matvec(wq, scales, x))
    deq = np.array(mx.dequantize(wq, scales, mode="mxfp4", dtype=mx.float32))
    np.testing.assert_array_equal(_decode_mxfp4(np.array(wq), np.array(scales)), deq)
    np.testing.assert_allclose(out, deq @ np.array(x), rtol=1e-4, atol=1e-4)


def test_mxfp4_matvec_2880():
    """The real expert shape, 2880 x 2880 (its timing is bench/emulator_mxfp4.py's)."""
    rng = np.random.default_rng(5)
    w = mx.array(rng.normal(size=(2880, 2880)).astype(np.float32))
    wq, scales = mx.quantize(w, mode="mxfp4")
    x = mx.array(rng.normal(size=2880).astype(np.float32))
    out = np.array(_mxfp4_matvec(wq, scales, x))
    deq = np.array(mx.dequantize(wq, scales, mode="mxfp4", dtype=mx.float32))
    np.testing.assert_allclose(out, deq @ np.array(x), rtol=1e-3, atol=1e-2)


# ---------------------------------------------------------------------------------------------
# Seeded bugs


def test_missing_barrier_is_detected():
    src = """
    threadgroup float buf[64];
    uint l = thread_position_in_threadgroup.x;
    buf[l] = x[l];
    %s
    out[l] = buf[(l + 1) %% 64];
    """
    x = mx.arange(64, dtype=mx.float32)
    want = np.roll(np.arange(64, dtype=np.float32), -1)
    good = metal_kernel(
        "rotate_ok", ["x"], ["out"], src % "threadgroup_barrier(mem_flags::mem_threadgroup);"
    )
    bad = metal_kernel("rotate_bad", ["x"], ["out"], src % "")
    for order in ("forward", "reverse", "random"):
        kw = dict(
            inputs=[x],
            grid=(64, 1, 1),
            threadgroup=(64, 1, 1),
            output_shapes=[(64,)],
            output_dtypes=[mx.float32],
            lane_order=order,
        )
        np.testing.assert_array_equal(np.array(good(**kw)[0]), want)
        got = np.array(bad(**kw)[0])
        assert np.isnan(got).any(), order  # read the poisoned threadgroup memory
    # Without poison (memory written before an earlier barrier), lane order exposes the race.
    racy = metal_kernel(
        "rotate_racy",
        ["x"],
        ["out"],
        """
    threadgroup float buf[64];
    uint l = thread_position_in_threadgroup.x;
    buf[l] = 0.0f;
    threadgroup_barrier(mem_flags::mem_threadgroup);
    buf[l] = x[l];
    out[l] = buf[(l + 1) % 64];
    """,
    )
    kw = dict(
        inputs=[x],
        grid=(64, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(64,)],
        output_dtypes=[mx.float32],
    )
    fwd = np.array(racy(**kw, lane_order="forward")[0])
    rev = np.array(racy(**kw, lane_order="reverse")[0])
    assert not np.array_equal(fwd, rev)
    assert not np.array_equal(fwd, want)


def test_barrier_in_divergent_branch_is_detected():
    k = metal_kernel(
        "divergent",
        ["x"],
        ["out"],
        """
        threadgroup float buf[32];
        uint l = thread_position_in_threadgroup.x;
        buf[l] = x[l];
        if (l < 16) {
            threadgroup_barrier(mem_flags::mem_threadgroup);
        }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[l] = buf[31 - l];
        """,
    )
    with pytest.raises(
        KernelRuntimeError, match=r"barrier divergence in kernel 'divergent'.*source:6.*source:8"
    ):
        k(
            inputs=[mx.zeros(32)],
            grid=(32, 1, 1),
            threadgroup=(32, 1, 1),
            output_shapes=[(32,)],
            output_dtypes=[mx.float32],
        )
    # a barrier skipped by threads that returned: allowed by default, an error when strict
    k2 = metal_kernel(
        "early_return",
        ["x"],
        ["out"],
        """
        uint l = thread_position_in_threadgroup.x;
        if (l >= 8) return;
        threadgroup_barrier(mem_flags::mem_threadgroup);
        out[l] = x[l];
        """,
    )
    kw = dict(
        inputs=[mx.ones(32)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(k2(**kw)[0]), np.ones(8))
    with pytest.raises(KernelRuntimeError, match="early_return.*returned without reaching"):
        k2(**kw, strict_barriers=True)


def test_out_of_bounds_read_is_detected_in_guarded_mode():
    k = metal_kernel(
        "oob", ["x"], ["out"], "uint i = thread_position_in_grid.x; out[i] = x[i + 1];"
    )
    kw = dict(
        inputs=[mx.arange(16, dtype=mx.float32)],
        grid=(16, 1, 1),
        threadgroup=(16, 1, 1),
        output_shapes=[(16,)],
        output_dtypes=[mx.float32],
    )
    with pytest.raises(
        KernelRuntimeError, match=r"out-of-bounds.*'oob'.*x\[16\].*\[0, 16\).*\(15, 0, 0\)"
    ):
        k(**kw, guarded=True)
    ok = metal_kernel(
        "in_bounds", ["x"], ["out"], "uint i = thread_position_in_grid.x; out[i] = x[i];"
    )
    np.testing.assert_array_equal(np.array(ok(**kw, guarded=True)[0]), np.arange(16))


def test_syntax_error_reported_at_body_line():
    k = metal_kernel(
        "broken",
        ["x"],
        ["out"],
        "uint i = thread_position_in_grid.x;\nfloat y = x[i];\nout[i] = y +;\n",
        header="// header line 1\n// header line 2\n",
    )
    with pytest.raises(KernelCompileError) as e:
        k(
            inputs=[mx.zeros(4)],
            grid=(4, 1, 1),
            threadgroup=(4, 1, 1),
            output_shapes=[(4,)],
            output_dtypes=[mx.float32],
        )
    assert e.value.line == 3
    assert "source line 3" in str(e.value)
    assert isinstance(e.value, GptOssError)


@pytest.mark.parametrize(
    "src,what",
    [
        ("double d = x[0]; out[0] = d;", "double"),
        ("out[0] = fact(3);", "recursion"),
        ("float* p = new float[4]; out[0] = p[0];", "dynamic allocation"),
    ],
)
def test_lint_rejects_what_metal_forbids(src, what):
    header = (
        "int fact(int n) { return n <= 1 ? 1 : n * fact(n - 1); }\n" if what == "recursion" else ""
    )
    k = metal_kernel("forbidden", ["x"], ["out"], src, header=header)
    with pytest.raises(KernelLintError, match=what):
        k(
            inputs=[mx.zeros(4)],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


def test_limits_enforced():
    k = metal_kernel(
        "big_tg", ["x"], ["out"], "threadgroup float buf[9000]; buf[0] = x[0]; out[0] = buf[0];"
    )
    with pytest.raises(KernelRuntimeError, match="36000 bytes of threadgroup memory"):
        k(
            inputs=[mx.zeros(4)],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )
    k2 = metal_kernel("many_threads", ["x"], ["out"], "out[0] = x[0];")
    with pytest.raises(KernelRuntimeError, match="1025"):
        k2(
            inputs=[mx.zeros(4)],
            grid=(2048, 1, 1),
            threadgroup=(1025, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )


def test_dispatch_is_by_threads_with_partial_threadgroups():
    k = metal_kernel(
        "positions",
        ["x"],
        ["out"],
        """
        uint3 p = thread_position_in_grid;
        uint i = (p.z * threads_per_grid.y + p.y) * threads_per_grid.x + p.x;
        out[i] = threads_per_threadgroup.x * 1000 + threadgroup_position_in_grid.x * 10
                 + thread_position_in_threadgroup.x * 0;
        """,
    )
    (out,) = k(
        inputs=[mx.zeros(1)],
        grid=(10, 3, 2),
        threadgroup=(4, 2, 8),
        output_shapes=[(2, 3, 10)],
        output_dtypes=[mx.uint32],
    )
    out = np.array(out)
    want_x = np.array([4000, 4000, 4000, 4000, 4010, 4010, 4010, 4010, 2020, 2020])
    np.testing.assert_array_equal(out, np.broadcast_to(want_x, (2, 3, 10)))


SPIN = """
threadgroup atomic_uint flag;
uint l = thread_position_in_threadgroup.x;
if (l == 0) atomic_store_explicit(&flag, 0u, memory_order_relaxed);
threadgroup_barrier(mem_flags::mem_threadgroup);
%s
"""


def test_spin_wait_on_threadgroup_atomic_progresses_and_deadlock_is_reported():
    ok = metal_kernel(
        "spin_ok",
        ["x"],
        ["out"],
        SPIN
        % """
        if (l == 1) atomic_store_explicit(&flag, 42u, memory_order_relaxed);
        if (l == 0) {
            while (atomic_load_explicit(&flag, memory_order_relaxed) != 42u) {}
            out[0] = x[0];
        }
        """,
    )
    kw = dict(
        inputs=[mx.array([3.0])],
        grid=(2, 1, 1),
        threadgroup=(2, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.float32],
    )
    assert np.array(ok(**kw)[0])[0] == 3.0
    bad = metal_kernel(
        "spin_deadlock",
        ["x"],
        ["out"],
        SPIN
        % """
        if (l == 0) { while (atomic_load_explicit(&flag, memory_order_relaxed) != 42u) {} }
        threadgroup_barrier(mem_flags::mem_threadgroup);
        if (l == 1) atomic_store_explicit(&flag, 42u, memory_order_relaxed);
        out[0] = x[0];
        """,
    )
    with pytest.raises(KernelRuntimeError, match="deadlock in kernel 'spin_deadlock'"):
        bad(**kw)


def test_msl_subset_compiles_and_computes():
    """Types and functions kernels use: packed types, as_type, swizzles, integer builtins, select,
    threadgroup atomics and vectors, simdgroup_barrier, metal:: qualified names, <metal_stdlib>."""
    header = """
#include <metal_stdlib>
using namespace metal;
template <typename T> METAL_FUNC T twice(T v) { return v + v; }
"""
    src = """
    threadgroup float4 tv[32];
    threadgroup atomic_uint hits;
    uint l = thread_index_in_threadgroup;
    if (l == 0) atomic_store_explicit(&hits, 0u, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup | mem_flags::mem_device);
    packed_float3 p = packed_float3(x[3 * l], x[3 * l + 1], x[3 * l + 2]);
    float3 v = p;
    uint bits = as_type<uint>(v.x);
    float back = as_type<float>(bits);
    uint2 u = uint2(bits, popcount(bits));
    tv[l] = float4(v.xy, v.z, back);
    atomic_fetch_add_explicit(&hits, 1u, memory_order_relaxed);
    simdgroup_barrier(mem_flags::mem_none);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float4 w = tv[31 - l];
    float s = metal::precise::divide(w.x, 2.0f) + twice(w.w) + select(0.0f, 1.0f, w.y > 0.0f)
              + float(metal::min(int(l), 5)) + float(clz(1u)) + float(u.y == uint(popcount(bits)));
    out[l] = s + float(atomic_load_explicit(&hits, memory_order_relaxed))
             + (isnan(w.z) ? 100.0f : 0.0f);
    """
    k = metal_kernel("subset", ["x"], ["out"], src, header=header)
    x = np.random.default_rng(6).normal(size=96).astype(np.float32)
    (out,) = k(
        inputs=[mx.array(x)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32,)],
        output_dtypes=[mx.float32],
    )
    v = x.reshape(32, 3)[::-1]
    want = v[:, 0] / 2 + 2 * v[:, 0] + (v[:, 1] > 0) + np.minimum(np.arange(32), 5) + 31 + 1 + 32
    np.testing.assert_allclose(np.array(out), want, rtol=1e-5)


def test_header_error_line_and_verbose_source(capsys):
    k = metal_kernel(
        "bad_header",
        ["x"],
        ["out"],
        "out[0] = helper(x[0]);",
        header="// line 1\nfloat helper(float v) { return v * ; }\n",
    )
    with pytest.raises(KernelCompileError, match="header line 2"):
        k(
            inputs=[mx.zeros(1)],
            grid=(1, 1, 1),
            threadgroup=(1, 1, 1),
            output_shapes=[(1,)],
            output_dtypes=[mx.float32],
        )
    k2 = metal_kernel("verbose_k", ["x"], ["out"], "out[0] = x[0];")
    k2(
        inputs=[mx.zeros(1)],
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.float32],
        verbose=True,
    )
    printed = capsys.readouterr().out
    assert "[[kernel]] void custom_kernel_verbose_k_floatc_float(" in printed
    assert "const constant float* x [[buffer(0)]]" in printed


def test_threadgroup_out_of_bounds_is_detected_in_guarded_mode():
    src = """
    threadgroup float buf[32];
    threadgroup float grid2[2][16];
    uint l = thread_position_in_threadgroup.x;
    buf[l] = x[l];
    grid2[l / 16][l % 16] = x[l];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    threadgroup float* p = buf;
    out[l] = p[31 - l] + grid2[(31 - l) / 16][(31 - l) % 16] + buf[l + OFF];
    """
    k = metal_kernel("tg_bounds", ["x"], ["out"], src)
    kw = dict(
        inputs=[mx.arange(32, dtype=mx.float32)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(32,)],
        output_dtypes=[mx.float32],
        guarded=True,
    )
    (out,) = k(**kw, template=[("OFF", 0)])
    np.testing.assert_array_equal(np.array(out), 2 * np.arange(32)[::-1] + np.arange(32))
    with pytest.raises(
        KernelRuntimeError,
        match=r"out-of-bounds threadgroup.*'tg_bounds'.*index 32 of .* 32 elements",
    ):
        k(**kw, template=[("OFF", 1)])


def test_lint_allows_qualified_calls_of_same_name():
    header = (
        "template <typename T> METAL_FUNC T max(T a, T b, T c) "
        "{ return metal::max(metal::max(a, b), c); }\n"
    )
    k = metal_kernel(
        "not_recursive", ["x"], ["out"], "out[0] = max(x[0], x[1], x[2]);", header=header
    )
    (out,) = k(
        inputs=[mx.array([1.0, 5.0, 3.0])],
        grid=(1, 1, 1),
        threadgroup=(1, 1, 1),
        output_shapes=[(1,)],
        output_dtypes=[mx.float32],
    )
    assert np.array(out)[0] == 5.0


# ---------------------------------------------------------------------------------------------
# What Metal accepts runs: constants, MLX's Limits, swizzles, matrices, half literals, the
# standard library's math, integer and SIMD functions, SIMD-group matrices.


def _run(name, src, inputs, out_shape, out_dtype=mx.float32, threads=1, header="", **kw):
    """One output of `threads` threads (one threadgroup) running `src`."""
    names = [f"in{i}" for i in range(len(inputs))]
    k = metal_kernel(name, names, ["out"], src, header=header)
    return np.array(
        k(
            inputs=inputs,
            grid=(threads, 1, 1),
            threadgroup=(threads, 1, 1),
            output_shapes=[out_shape],
            output_dtypes=[out_dtype],
            **kw,
        )[0]
    )


def test_constants_and_macros_have_metal_values():
    exprs = [
        "INFINITY",
        "-INFINITY",
        "NAN",
        "FLT_MAX",
        "FLT_MIN",
        "FLT_EPSILON",
        "MAXFLOAT",
        "HUGE_VALF",
        "M_LOG2E_F",
        "M_LN2_F",
        "M_PI_F",
        "M_SQRT1_2_F",
        "float(MAXHALF)",
        "float(HUGE_VALH)",
        "float(M_PI_H)",
        "float(MAXBFLOAT)",
        "float(__METAL_VERSION__)",
    ]
    src = "\n".join(f"out[{i}] = {e};" for i, e in enumerate(exprs))
    out = _run(
        "constants",
        "uint t = thread_position_in_grid.x; (void)t;\n" + src,
        [mx.zeros(1)],
        (len(exprs),),
    )
    f32 = np.finfo(np.float32)
    want = [
        np.inf,
        -np.inf,
        np.nan,
        f32.max,
        f32.tiny,
        f32.eps,
        f32.max,
        np.inf,
        np.log2(np.e),
        np.log(2),
        np.pi,
        np.sqrt(0.5),
        np.finfo(np.float16).max,
        np.inf,
        np.float16(np.pi),
        float(mx.array(3.3895313892515355e38, dtype=mx.bfloat16).item()),
        310,
    ]
    np.testing.assert_allclose(out, np.array(want, np.float32), rtol=1e-6)


def test_mlx_limits_have_mlx_values():
    """MLX's Limits<T> (mlx/backend/metal/kernels/utils.h): floats span -inf..inf with finite_max
    the largest finite value; integers span their numeric_limits."""
    exprs = {
        "Limits<float>::max": np.inf,
        "Limits<float>::min": -np.inf,
        "Limits<float>::finite_max": np.finfo(np.float32).max,
        "Limits<float>::finite_min": -np.finfo(np.float32).max,
        "float(Limits<half>::finite_max)": 65504.0,
        "float(Limits<half>::min)": -np.inf,
        "float(Limits<bfloat16_t>::finite_min)": -3.3895313892515355e38,
        "float(Limits<int32_t>::min)": float(np.iinfo(np.int32).min),
        "float(Limits<uint8_t>::max)": 255.0,
        "float(Limits<int16_t>::finite_max)": 32767.0,
        "float(Limits<bool>::max)": 1.0,
    }
    src = "\n".join(f"out[{i}] = {e};" for i, e in enumerate(exprs))
    out = _run("limits", src, [mx.zeros(1)], (len(exprs),))
    np.testing.assert_allclose(out, np.array(list(exprs.values()), np.float32), rtol=1e-6)


def _swizzles(rng, length, count):
    sets = ("xyzw", "rgba")
    picks = []
    for _ in range(count):
        comp = sets[len(picks) % 2]
        picks.append("".join(comp[i] for i in rng.integers(0, 4, length)))
    return picks


def test_swizzle_reads_of_every_length():
    """Generated swizzles (2 to 4 components, either set, repeats allowed) read like numpy's
    fancy indexing, on plain, packed and half vectors, through pointers and on temporaries."""
    rng = np.random.default_rng(0)
    picks = [s for n in (2, 3, 4) for s in _swizzles(rng, n, 12)] + [
        "xy",
        "zw",
        "xyz",
        "yzw",
        "rgba",
    ]
    lines, want, k = [], [], 0
    v = np.array([1.0, 2.0, 3.0, 4.0], np.float32)
    for s in picks:
        idx = ["xyzw".index(c) if c in "xyzw" else "rgba".index(c) for c in s]
        lines.append(
            f"{{ float{len(s)} r = v.{s}; "
            f"for (int i = 0; i < {len(s)}; ++i) out[{k} + i] = r[i]; }}"
        )
        want.extend(v[idx])
        k += len(s)
    # packed, half, pointer, temporary and nested forms
    lines.append(
        f"{{ packed_float3 p = packed_float3(v.xyz); float2 r = p.zx; "
        f"out[{k}] = r.x; out[{k + 1}] = r.y; }}"
    )
    want.extend([3.0, 1.0])
    lines.append(f"{{ half4 h = half4(v); out[{k + 2}] = float(h.wzyx.y); }}")
    want.append(3.0)
    lines.append(f"{{ thread float4* p = &v; out[{k + 3}] = p->ww.x + (v + v).yx.x; }}")
    want.append(4.0 + 4.0)
    lines.append(f"{{ out[{k + 4}] = v.zyx.zy.x; }}")
    want.append(1.0)
    src = "float4 v = float4(1.0f, 2.0f, 3.0f, 4.0f);\n" + "\n".join(lines)
    out = _run("swizzle_reads", src, [mx.zeros(1)], (len(want),))
    np.testing.assert_array_equal(out, np.array(want, np.float32))


def test_swizzle_writes():
    """Assignments and compound assignments through swizzles write the selected components,
    in vectors in thread memory and in device memory (through a pointer)."""
    src = """
    float4 v = float4(1.0f, 2.0f, 3.0f, 4.0f);
    v.zx = float2(10.0f, 20.0f);        // v = (20, 2, 10, 4)
    v.wy += float2(1.0f, 2.0f);         // v = (20, 4, 10, 5)
    v.bgr *= 2.0f;                      // v = (40, 8, 20, 5)
    v.yx = v.xy;                        // v = (8, 40, 20, 5)
    float4 w = float4(0.0f);
    w.xyzw = v.wzyx;                    // w = (5, 20, 40, 8)
    packed_float3 p = packed_float3(1.0f, 2.0f, 3.0f);
    p.zy = float2(7.0f, 6.0f);          // p = (1, 6, 7)
    device float4* o = (device float4*)out;
    o[0] = v;
    o[1] = w;
    o[2] = float4(p, 0.0f);
    o[2].wx = float2(9.0f, 8.0f);       // through the pointer: (8, 6, 7, 9)
    """
    for guarded in (False, True):
        out = _run("swizzle_writes", src, [mx.zeros(1)], (12,), guarded=guarded)
        np.testing.assert_array_equal(out, [8, 40, 20, 5, 5, 20, 40, 8, 8, 6, 7, 9])


@pytest.mark.parametrize(
    "src,message",
    [
        ("float4 v = float4(1.0f); v.xx = float2(1.0f); out[0] = v.x;", "repeats a component"),
        ("float2 v = float2(1.0f); out[0] = v.xz.x;", "component this vector does not have"),
        ("float2 v = float2(1.0f); out[0] = v.z;", "no member named"),
    ],
)
def test_swizzles_metal_rejects_fail_to_compile(src, message):
    with pytest.raises(KernelCompileError, match=message) as e:
        _run("bad_swizzle", src, [mx.zeros(1)], (1,))
    assert e.value.line == 1


def test_matrix_types():
    src = """
    float3x3 m = float3x3(float3(2, 0, 1), float3(1, 3, 0), float3(0, 1, 4));  // columns
    float3 x = float3(1, 2, 3);
    float3 mx = m * x;
    float3 xm = x * m;
    float3x3 mm = m * transpose(m) + float3x3(1.0f);
    float2x4 r = float2x4(float4(1, 2, 3, 4), float4(5, 6, 7, 8));  // 2 columns of 4 rows
    float4 rv = r * float2(1, -1);
    half2x2 h = half2x2(half2(1.5h, 0.5h), half2(-1.0h, 2.0h));
    float out_[16] = {mx.x, mx.y, mx.z, xm.x, xm.y, xm.z, mm[0][0], mm[1][2], mm[2][1],
                      determinant(m), rv.x, rv.w, float(determinant(h)), m[1].y, float(h[1][0]),
                      determinant(float4x4(2.0f))};
    for (int i = 0; i < 16; ++i) out[i] = out_[i];
    """
    out = _run("matrices", src, [mx.zeros(1)], (16,))
    m = np.array([[2, 0, 1], [1, 3, 0], [0, 1, 4]], np.float32).T  # rows x columns
    x = np.array([1, 2, 3], np.float32)
    mm = m @ m.T + np.eye(3)
    r = np.array([[1, 2, 3, 4], [5, 6, 7, 8]], np.float32).T
    h = np.array([[1.5, 0.5], [-1.0, 2.0]], np.float32).T
    want = [
        *(m @ x),
        *(x @ m),
        mm[0, 0],
        mm[2, 1],
        mm[1, 2],
        np.linalg.det(m),
        (r @ [1, -1])[0],
        (r @ [1, -1])[3],
        np.linalg.det(h),
        m[1, 1],
        h[0, 1],
        16.0,
    ]
    np.testing.assert_allclose(out, want, rtol=1e-5)


def test_half_literals():
    out = _run(
        "half_literals",
        "half a = 1.5h; half b = 0.1H; out[0] = a * 2.0h; out[1] = b; out[2] = float(65504.0h);",
        [mx.zeros(1)],
        (3,),
        out_dtype=mx.float16,
    )
    np.testing.assert_array_equal(out, np.array([3.0, 0.1, 65504.0], np.float16))


def test_math_and_geometric_functions():
    exprs = {
        "fast::normalize(float3(3, 4, 0)).y": 0.8,
        "precise::normalize(float2(0, -2)).y": -1.0,
        "length(float4(1, 2, 2, 4))": 5.0,
        "distance(float2(1, 1), float2(4, 5))": 5.0,
        "distance_squared(float2(1, 1), float2(4, 5))": 25.0,
        "cross(float3(1, 0, 0), float3(0, 1, 0)).z": 1.0,
        "reflect(float2(1, -1), float2(0, 1)).y": 1.0,
        "smoothstep(0.0f, 2.0f, 0.5f)": 0.15625,
        "fmedian3(3.0f, -1.0f, 2.0f)": 2.0,
        "fmax3(3.0f, -1.0f, 7.0f)": 7.0,
        "fmin3(3.0f, -1.0f, 7.0f)": -1.0,
        "fdim(5.0f, 3.0f) + fdim(3.0f, 5.0f)": 2.0,
        "cospi(1.0f)": -1.0,
        "sinpi(0.5f)": 1.0,
        "asinh(1.0f)": float(np.arcsinh(1.0)),
        "atanh(0.5f)": float(np.arctanh(0.5)),
        "nextafter(1.0f, 2.0f) - 1.0f": 2.0**-23,
        "exp10(2.0f)": 100.0,
        "sign(-3.0f)": -1.0,
        "float(ilogb(10.0f))": 3.0,
        "copysign(2.0f, -0.0f)": -2.0,
    }
    src = "float c; float s = sincos(0.5f, c); int e; float fr = frexp(8.0f, e); float ip;\n"
    src += "float fp = modf(3.25f, ip);\n"
    src += "\n".join(f"out[{i}] = {e};" for i, e in enumerate(exprs))
    n = len(exprs)
    src += f"\nout[{n}] = s; out[{n + 1}] = c; out[{n + 2}] = fr; out[{n + 3}] = float(e);"
    src += f"\nout[{n + 4}] = fp; out[{n + 5}] = ip;"
    out = _run("mathfns", src, [mx.zeros(1)], (n + 6,))
    want = [*exprs.values(), np.sin(0.5), np.cos(0.5), 0.5, 4.0, 0.25, 3.0]
    np.testing.assert_allclose(out, np.array(want, np.float32), rtol=1e-6, atol=1e-7)


def test_integer_functions():
    """Each against its MSL spec definition, computed by hand in Python."""
    cases = {
        "extract_bits(0xABCD1234u, 8u, 12u)": 0xD12,
        "uint(extract_bits(int(0x0000F000), 12u, 4u))": 0xFFFFFFFF,  # signed: sign-extended
        "uint(extract_bits(int(0x00007000), 12u, 4u))": 0x7,
        "extract_bits(0xFFFFFFFFu, 4u, 0u)": 0,
        "insert_bits(0xFFFF0000u, 0xABu, 4u, 8u)": 0xFFFF0AB0,
        "reverse_bits(1u)": 0x80000000,
        "uint(reverse_bits(ushort(0x0003)))": 0xC000,
        "rotate(0x80000001u, 1u)": 0x00000003,
        "rotate(0x12345678u, 36u)": 0x23456781,
        "absdiff(-5, 7)": 12,
        "uint(addsat(0x7fffffff, 1))": 0x7FFFFFFF,
        "subsat(3u, 5u)": 0,
        "uint(addsat(uchar(250), uchar(10)))": 255,
        "hadd(0xFFFFFFFFu, 0xFFFFFFFFu)": 0xFFFFFFFF,
        "rhadd(1u, 2u)": 2,
        "uint(mul24(-1000, 3000))": (-3000000) & 0xFFFFFFFF,
        "mad24(2u, 3u, 4u)": 10,
        "madhi(0x80000000u, 4u, 1u)": 3,
        "uint(madsat(uchar(200), uchar(2), uchar(10)))": 255,
        "mulhi(0xFFFFFFFFu, 0xFFFFFFFFu)": 0xFFFFFFFE,
        "popcount(0xF0F0u)": 8,
        "clz(1u)": 31,
        "ctz(8u)": 3,
        "uint(median3(5, -2, 9))": 5,
        "max3(1u, 9u, 4u)": 9,
        "extract_bits(uint2(0xF0u, 0x0Fu), 4u, 4u).y": 0,
        "rotate(uint2(1u, 2u), uint2(31u, 1u)).x": 0x80000000,
    }
    src = "\n".join(f"out[{i}] = {e};" for i, e in enumerate(cases))
    out = _run("intfns", src, [mx.zeros(1)], (len(cases),), out_dtype=mx.uint32)
    np.testing.assert_array_equal(out, np.array(list(cases.values()), np.uint32))


def test_shuffle_and_fill_follow_the_spec_examples():
    """MSL spec 6.9.2.1: lanes shifted past the end of the simdgroup (or of each vector of
    `modulo` lanes) take filling data from its other end."""
    src = """
    uint l = thread_index_in_simdgroup;
    float d = float(l), f = 100.0f + float(l);
    out[0 * 32 + l] = simd_shuffle_and_fill_down(d, f, ushort(2));
    out[1 * 32 + l] = simd_shuffle_and_fill_up(d, f, ushort(2));
    out[2 * 32 + l] = simd_shuffle_and_fill_down(d, f, ushort(2), ushort(8));
    out[3 * 32 + l] = simd_shuffle_and_fill_up(d, f, ushort(2), ushort(8));
    out[4 * 32 + l] = quad_shuffle_and_fill_down(d, f, ushort(1));
    out[5 * 32 + l] = float(ulong(simd_active_threads_mask()) == 0xFFFFFFFFul);
    """
    out = _run("fill", src, [mx.zeros(1)], (6, 32), threads=32)
    lanes = np.arange(32)

    def down(delta, m):
        i = lanes % m
        src_lane = lanes - i + (i + delta) % m
        return np.where(i + delta < m, src_lane, 100 + src_lane)

    def up(delta, m):
        i = lanes % m
        src_lane = lanes - i + (i - delta) % m
        return np.where(i - delta >= 0, src_lane, 100 + src_lane)

    np.testing.assert_array_equal(out[0], down(2, 32))
    assert list(out[0][-2:]) == [100, 101]  # the spec's "fa fb" in the last two lanes
    np.testing.assert_array_equal(out[1], up(2, 32))
    assert list(out[1][:2]) == [130, 131]  # "fy fz" (lanes 30, 31 of filling) in the first two
    np.testing.assert_array_equal(out[2], down(2, 8))
    assert list(out[2][6:8]) == [100, 101] and list(out[2][14:16]) == [108, 109]
    np.testing.assert_array_equal(out[3], up(2, 8))
    np.testing.assert_array_equal(out[4], down(1, 4))
    assert out[5].all()


# SIMD-group matrices: MSL spec 6.7 (load, store, multiply, multiply-accumulate, diagonal and
# filled constructors) against numpy; thread_elements with MLX's lane layout.

MATRIX_SRC = """
threadgroup T tg[128];
uint l = thread_index_in_simdgroup;
for (uint i = l; i < 128; i += 32) tg[i] = b[i];
threadgroup_barrier(mem_flags::mem_threadgroup);
simdgroup_matrix<T, 8, 8> A, B, C, D, E;
simdgroup_load(A, a, 8);                                   // device, row-major
simdgroup_load(B, tg, 16, ulong2(8, 0));                   // threadgroup, columns 8..15 of 8x16
simdgroup_load(C, c, 8, ulong2(0, 0), true);               // transposed
simdgroup_multiply_accumulate(D, A, B, C);                 // D = A B + C^T
simdgroup_store(D, out, 8);
simdgroup_multiply(E, simdgroup_matrix<T, 8, 8>(T(2)), A);  // diagonal 2: 2 A
simdgroup_store(E, out + 64, 8, ulong2(0, 0), true);        // stored transposed
E = make_filled_simdgroup_matrix<T, 8, 8>(T(1)) * B;        // column sums of B in every row
simdgroup_store(E, out + 128, 8);
"""


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("guarded", [False, True])
def test_simdgroup_matrix_operations(dtype, guarded):
    rng = np.random.default_rng(1)
    a, b, c = (rng.integers(-4, 5, size=s).astype(np.float32) for s in ((8, 8), (8, 16), (8, 8)))
    k = metal_kernel("sgmatrix", ["a", "b", "c"], ["out"], MATRIX_SRC)
    (out,) = k(
        inputs=[mx.array(v).astype(dtype) for v in (a, b, c)],
        template=[("T", dtype)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(3, 8, 8)],
        output_dtypes=[dtype],
        guarded=guarded,
    )
    out = np.array(out.astype(mx.float32))
    np.testing.assert_array_equal(out[0], a @ b[:, 8:] + c.T)  # small integers: exact
    np.testing.assert_array_equal(out[1], (2 * a).T)
    np.testing.assert_array_equal(out[2], np.broadcast_to(b[:, 8:].sum(0), (8, 8)))


def test_simdgroup_matrix_rounds_once_to_its_type():
    """bfloat: D = A B + C accumulates in float and rounds to bfloat once."""
    rng = np.random.default_rng(2)
    a, b, c = (
        mx.array(rng.normal(size=(8, 8)).astype(np.float32)).astype(mx.bfloat16) for _ in range(3)
    )
    src = """
    simdgroup_bfloat8x8 A, B, C, D;
    simdgroup_load(A, a); simdgroup_load(B, b); simdgroup_load(C, c);
    simdgroup_multiply_accumulate(D, A, B, C);
    simdgroup_store(D, out);
    """
    k = metal_kernel("sgm_round", ["a", "b", "c"], ["out"], src)
    (out,) = k(
        inputs=[a, b, c],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(8, 8)],
        output_dtypes=[mx.bfloat16],
    )
    f = [np.array(x.astype(mx.float32)).astype(np.float64) for x in (a, b, c)]
    exact = f[0] @ f[1] + f[2]
    want = mx.array(exact.astype(np.float32)).astype(mx.bfloat16)
    # one rounding from a float accumulation: within a bfloat ulp of the exact value
    diff = np.abs(np.array(out.astype(mx.float32)) - np.array(want.astype(mx.float32)))
    ulp = np.abs(np.array(want.astype(mx.float32))) * 2.0**-7
    assert (diff <= ulp + 1e-30).all()


def test_simdgroup_matrix_thread_elements_use_mlx_layout():
    """Each lane owns row fm, columns fn and fn + 1 (MLX's steel/gemm/mma.h get_coord): writes
    through thread_elements() make the matrix a collective operation sees."""
    src = """
    uint l = thread_index_in_simdgroup;
    simdgroup_float8x8 M = make_filled_simdgroup_matrix<float, 8, 8>(-1.0f);
    M.thread_elements() = float2(float(2 * l), float(2 * l + 1));
    simdgroup_store(M, out);
    """
    out = _run("sgm_elements", src, [mx.zeros(1)], (8, 8), threads=32)
    want = np.zeros((8, 8))
    for lane in range(32):  # MLX: qid = lane / 4; fm = (qid & 4) + (lane / 2) % 4; fn = ...
        qid = lane // 4
        fm, fn = (qid & 4) + (lane // 2) % 4, (qid & 2) * 2 + (lane % 2) * 2
        want[fm, fn], want[fm, fn + 1] = 2 * lane, 2 * lane + 1
    np.testing.assert_array_equal(out, want)
    assert sorted(out.ravel()) == list(range(64))  # every element owned by exactly one lane


@pytest.mark.parametrize(
    "src,threads,message",
    [
        (  # lanes 16..31 left: not uniform control flow
            "if (thread_index_in_simdgroup >= 16) return;\n"
            "simdgroup_float8x8 A; simdgroup_load(A, in0); simdgroup_store(A, out);",
            32,
            r"simdgroup_load at .*source:2.* 16 of the simdgroup's 32 threads took part",
        ),
        (  # a simdgroup of 16 threads
            "simdgroup_float8x8 A; simdgroup_load(A, in0); simdgroup_store(A, out);",
            16,
            r"the simdgroup has 16 threads; SIMD-group matrices need all 32",
        ),
        (  # lanes passing different pointers
            "simdgroup_float8x8 A; simdgroup_load(A, in0 + (thread_index_in_simdgroup % 2));\n"
            "simdgroup_store(A, out);",
            32,
            r"pass different pointers",
        ),
    ],
)
def test_simdgroup_matrix_needs_the_whole_simdgroup(src, threads, message):
    with pytest.raises(KernelRuntimeError, match=message):
        _run("sgm_bad", src, [mx.zeros(80)], (8, 8), threads=threads)


def test_unset_simdgroup_matrix_reads_as_nan():
    out = _run(
        "sgm_unset",
        "simdgroup_float8x8 A; simdgroup_store(A, out);",
        [mx.zeros(1)],
        (8, 8),
        threads=32,
    )
    assert np.isnan(out).all()


# ---------------------------------------------------------------------------------------------
# What Metal rejects fails, naming the line.


def test_variable_length_array_is_rejected():
    src = "uint n = uint(in0[0]);\nfloat s[n];\ns[0] = 1.0f;\nout[0] = s[0];"
    with pytest.raises(KernelCompileError, match="variable length array") as e:
        _run("vla", src, [mx.ones(1)], (1,))
    assert e.value.line == 2
    assert "variable-length arrays" in str(e.value)  # the hint
    # a compile-time size is fine
    assert (
        _run(
            "fixed",
            "constexpr uint n = 4; float s[n]; s[0] = 1.0f; out[0] = s[0];",
            [mx.ones(1)],
            (1,),
        )[0]
        == 1.0
    )


@pytest.mark.parametrize(
    "header,src,what,where",
    [
        (
            "",
            "float y = in0[0];\nstatic float acc = 0.0f;\nout[0] = y + acc;",
            "`static` local",
            "source:2",
        ),
        (
            "inline float f(float x) {\n  static int calls = 0;\n  return x;\n}\n",
            "out[0] = f(in0[0]);",
            "`static` local",
            "header:2",
        ),
        (
            "",
            "out[0] = in0[0];\nout[0] = erf(in0[0]);",
            "`erf` is not a function of the Metal",
            "source:2",
        ),
        ("", "out[0] = metal::hypot(in0[0], 1.0f);", "`hypot` is not", "source:1"),
        ("", "out[0] = expf(in0[0]);", "`expf` is not", "source:1"),
        (
            "",
            "float a = in0[0];\nthreadgroup float buf[4] = {0};\nout[0] = a;",
            "initializer",
            "source:2",
        ),
        ("", "threadgroup uint count = 0;\nout[0] = float(count);", "initializer", "source:1"),
        (
            "inline float g(float x) {\n  threadgroup float scratch[32];\n  return x;\n}\n",
            "out[0] = g(in0[0]);",
            "non-kernel function",
            "header:2",
        ),
    ],
)
def test_lint_rejects_what_metal_rejects(header, src, what, where):
    with pytest.raises(KernelLintError, match=what) as e:
        _run("rejected", src, [mx.ones(1)], (1,), header=header)
    assert where in str(e.value)


def test_lint_accepts_the_allowed_forms():
    """static constant data, a kernel's own erf, threadgroup pointers with initializers."""
    header = "inline float erf(float x) { return x; }\n"
    src = """
    static constant float K[2] = {1.0f, 2.0f};
    threadgroup float buf[4];
    threadgroup float* p = buf;
    p[0] = erf(in0[0]) * K[1];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[0] = buf[0];
    """
    for guarded in (False, True):
        assert (
            _run("allowed", src, [mx.full((1,), 3.0)], (1,), header=header, guarded=guarded)[0] == 6
        )


ADDRESS_HEADER = """
inline float sum4(thread const float* p) { return p[0] + p[1] + p[2] + p[3]; }
inline float first(const device float* p) { return p[0]; }
inline float first_tg(const threadgroup float* p) { return p[0]; }
"""


@pytest.mark.parametrize(
    "src,line",
    [
        # a threadgroup array where a thread pointer is expected
        ("threadgroup float buf[4];\nbuf[0] = in0[0];\nout[0] = sum4(buf);", 3),
        # a device pointer where a thread pointer is expected
        ("float y = in0[0];\nout[0] = y + sum4(in0);", 2),
        # a device pointer where a threadgroup pointer is expected
        ("out[0] = first_tg(in0);", 1),
        # a threadgroup pointer where a device pointer is expected
        ("threadgroup float buf[4];\nthreadgroup float* p = buf;\nout[0] = first(p);", 3),
        # casting a device pointer to a threadgroup one
        ("threadgroup float* p = (threadgroup float*)in0;\nout[0] = p[0];", 1),
        # a const pointer passed where a non-const one is expected
        ("device float* w = in0;\nout[0] = w[0];", 1),
    ],
)
def test_address_space_mismatch_is_rejected_in_guarded_mode(src, line):
    """Guarded mode gives each address space its own pointer type: what Metal rejects does not
    compile, naming the line."""
    x = mx.arange(16, dtype=mx.float32)
    with pytest.raises(KernelCompileError, match="address spaces") as e:
        _run("aspace", src, [x], (1,), header=ADDRESS_HEADER, guarded=True)
    assert e.value.line == line


def test_address_spaces_that_match_run_in_guarded_mode():
    src = """
    threadgroup float buf[4];
    uint l = thread_index_in_threadgroup;
    buf[l] = in0[l];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float local[4] = {buf[0], buf[1], buf[2], buf[3]};
    const device float4* v = (const device float4*)in0;   // a cast within the address space
    out[l] = sum4(local) + first(in0 + 1) + first_tg(buf + 2) + v[1].x;
    """
    out = _run(
        "aspace_ok",
        src,
        [mx.arange(16, dtype=mx.float32)],
        (4,),
        threads=4,
        header=ADDRESS_HEADER,
        guarded=True,
    )
    np.testing.assert_array_equal(out, [6 + 1 + 2 + 4] * 4)


def test_small_inputs_are_constant_not_device():
    """MLX passes an input of fewer than 8 elements as `constant`: a helper taking a `device`
    pointer, or a cast to one, does not compile for it in Metal, and not in guarded mode."""
    for src in (
        "out[0] = first(in0);",
        "const device float4* v = (const device float4*)in0;\nout[0] = v[0].x;",
    ):
        with pytest.raises(KernelCompileError, match="address spaces"):
            _run("small_constant", src, [mx.ones(4)], (1,), header=ADDRESS_HEADER, guarded=True)
        # eight elements or more are `device`
        assert (
            _run("big_device", src, [mx.ones(8)], (1,), header=ADDRESS_HEADER, guarded=True)[0] == 1
        )


def test_out_of_bounds_through_a_cast_pointer_is_detected_in_guarded_mode():
    src = (
        "const device float4* v = (const device float4*)in0;\n"
        "out[thread_index_in_threadgroup] = v[thread_index_in_threadgroup].w;"
    )
    x = mx.arange(16, dtype=mx.float32)
    out = _run("cast_ok", src, [x], (4,), threads=4, guarded=True)
    np.testing.assert_array_equal(out, [3, 7, 11, 15])
    with pytest.raises(KernelRuntimeError, match=r"out-of-bounds access .*in0\[16\] is outside"):
        _run("cast_oob", src, [x], (5,), threads=5, guarded=True)
