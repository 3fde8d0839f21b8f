"""The custom kernels against the mlx ops (through the MSL emulator, every lane order, guarded), at
small shapes and at gpt-oss-20b's and -120b's real shapes; measured dispatch (decisions, the cache,
fallback) with an injected clock; banded prefill's work; the whole model with emulated kernels
against transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import types
import warnings

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

import gptoss_mlx.kernels as K
from gptoss_mlx import ops
from gptoss_mlx.benchmark import count_primitives
from gptoss_mlx.errors import GptOssError
from gptoss_mlx.kernels import attention as ka
from gptoss_mlx.kernels import dispatch, measured, sources
from gptoss_mlx.kernels import moe as km
from gptoss_mlx.loading import load_model

LANE_ORDERS = ("forward", "reverse", "random")
FLOAT32_TOL = 1e-4
TOL = {mx.float32: 1e-5, mx.bfloat16: 1e-2}  # bfloat16: against the float32 ops
# gpt-oss-20b and -120b per token: hidden = expert intermediate = 2880, 4 of 32 or 128 experts,
# 64 query heads over 8 KV heads of 64 dims, window 128 (shared reference, "Shapes").
H_REAL, E_20B, E_120B = 2880, 32, 128


@pytest.fixture(params=LANE_ORDERS)
def lane_order(request, monkeypatch):
    """Every lane order the emulator offers, guarded: bounds checks, typed address spaces."""
    monkeypatch.setenv("GPTOSS_MLX_EMULATOR_LANE_ORDER", request.param)
    monkeypatch.setenv("GPTOSS_MLX_EMULATOR_GUARDED", "1")
    return request.param


@pytest.fixture
def fresh_checks(monkeypatch, tmp_path):
    """Decisions for the emulator too, starting from none, with a private cache folder."""
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", {"emulate"})
    monkeypatch.setenv(measured.CACHE_ENV_VAR, str(tmp_path / "cache"))
    K.reset_self_checks()
    yield
    K.reset_self_checks()


def rel(a, b) -> float:
    return dispatch.relative_error(a, b)


def f32(*arrays):
    return [a.astype(mx.float32) for a in arrays]


# --- dispatch -------------------------------------------------------------------------------------


def test_resolve_backends(monkeypatch):
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.resolve() == ("metal" if mx.metal.is_available() else "mlx")
    for name in ("mlx", "emulate", " MLX "):
        assert K.resolve(name) == name.strip().lower()
    monkeypatch.setenv(K.ENV_VAR, "emulate")
    assert K.resolve() == "emulate"
    assert K.resolve("mlx") == "mlx"  # the argument wins over the environment
    monkeypatch.setenv(K.ENV_VAR, "cuda")
    with pytest.raises(GptOssError, match=r"GPTOSS_MLX_KERNELS=.*auto, metal, mlx, emulate"):
        K.resolve()
    with pytest.raises(GptOssError, match="kernels='fast'"):
        K.resolve("fast")
    if not mx.metal.is_available():
        with pytest.raises(GptOssError, match="needs a Metal GPU"):
            K.resolve("metal")


def test_load_model_kernels_argument(hf_mxfp4_dir, monkeypatch):
    monkeypatch.setenv(K.ENV_VAR, "emulate")
    with pytest.raises(GptOssError, match="unknown kernel backend"):
        load_model(hf_mxfp4_dir, dtype="float32", kernels="gpu")
    model = load_model(hf_mxfp4_dir, dtype="float32")  # from the environment
    assert {m.kernel_backend for m in K.kernel_modules(model)} == {"emulate"}
    assert not K.compilable(model)
    model = load_model(hf_mxfp4_dir, dtype="float32", kernels="mlx")
    assert {m.kernel_backend for m in K.kernel_modules(model)} == {"mlx"}
    assert K.compilable(model)


def test_sources_are_packaged_once():
    """One copy in git (metal/); the wheel gets it as gptoss_mlx/metal/ from setup.py's build."""
    d = sources.source_dir()
    assert d.name == "metal" and d.parent.name != "gptoss_mlx"
    assert {p.stem for p in d.glob("*.metal")} >= {"moe", "attention"}
    for fam, names in (("moe", km.KERNELS), ("attention", ka.KERNELS)):
        header, bodies = sources.family(fam)
        assert header.strip() and {k.name for k in names} <= set(bodies)


def test_wheel_ships_the_kernel_sources(tmp_path):
    import zipfile

    root = sources.source_dir().parent
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(root),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
    )
    if r.returncode != 0:
        pytest.skip(f"cannot build a wheel here: {r.stderr.strip()[-300:]}")
    (wheel,) = tmp_path.glob("*.whl")
    with zipfile.ZipFile(wheel) as z:
        shipped = {
            n.split("/")[-1]: z.read(n) for n in z.namelist() if n.startswith("gptoss_mlx/metal/")
        }
    assert shipped == {p.name: p.read_bytes() for p in sources.source_dir().glob("*.metal")}


# --- MoE kernels ----------------------------------------------------------------------------------

# (experts, hidden, intermediate, tokens, experts per token): partial threadgroups (outputs not a
# multiple of 32 per threadgroup), fewer blocks than lanes, several blocks per lane, batches.
MOE_SHAPES = [(4, 64, 100, 1, 4), (3, 96, 64, 2, 2), (5, 1056, 40, 3, 4)]


@pytest.mark.parametrize("E,H,I,N,Kp", MOE_SHAPES)
def test_gate_up_swiglu_matches_mlx(lane_order, E, H, I, N, Kp):
    ex = km.random_experts(E, H, I, seed=H + I)
    idx, _ = km.random_routing(N, Kp, E, seed=N)
    x = mx.array(np.random.default_rng(I).normal(size=(N, H)).astype(np.float32)) * 0.5
    got = km.gate_up_swiglu("emulate", ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
    want = ops.experts_swiglu(ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
    assert got.shape == want.shape == (N * Kp, I)
    assert rel(got, want) < TOL[mx.float32]
    # the clamps are exercised: some gates above the limit
    h = ops.gather_mxfp4_matmul(x[:, None, None, :], ex.gate_up_proj, idx)
    assert (h[..., 0::2] > ex.limit).any().item() and (mx.abs(h[..., 1::2]) > ex.limit).any().item()


@pytest.mark.parametrize("E,H,I,N,Kp", [(4, 100, 64, 1, 4), (3, 64, 96, 2, 3), (5, 40, 1056, 3, 4)])
def test_down_combine_matches_mlx(lane_order, E, H, I, N, Kp):
    down = km.random_experts(E, I, H, seed=H).gate_up_proj  # [E, 2H, I/8]
    down.weight, down.scales, down.bias = down.weight[:, :H], down.scales[:, :H], down.bias[:, :H]
    idx, w = km.random_routing(N, Kp, E, seed=I)
    act = mx.array(np.random.default_rng(H).normal(size=(N * Kp, I)).astype(np.float32))
    got = km.down_combine("emulate", down, act, idx, w)
    want = ops.experts_combine(down, act, idx, w)
    assert got.shape == want.shape == (N, H)
    assert rel(got, want) < TOL[mx.float32]


def test_fp4_codes_decode_exactly():
    """Every E2M1 code in every nibble position of a word, with scales 2^-10 to 2^-3, decodes to
    the published values: token j's input is the one-hot e_j, so its gate (= linear) feature is
    the single weight j, value(code) x scale of its block."""
    H, N = 256, 128
    codes = (np.arange(H) // 8) % 16  # element j: nibble position j % 8 of word j // 8
    words = (codes.reshape(-1, 8) << (4 * np.arange(8))).sum(axis=1).astype(np.uint32)
    scales = np.arange(117, 117 + H // 32).astype(np.uint8)
    up = types.SimpleNamespace(
        weight=mx.array(np.broadcast_to(words, (1, 64, H // 8)).copy()),
        scales=mx.array(np.broadcast_to(scales, (1, 64, H // 32)).copy()),
        bias=mx.zeros((1, 64)),
    )
    x = mx.array(np.eye(H, dtype=np.float32)[:N])
    # alpha 0 and a large limit: act = gate * sigmoid(0) * (lin + 1) = w * 0.5 * (w + 1)
    act = km.gate_up_swiglu("emulate", up, x, mx.zeros((N, 1), dtype=mx.uint32), 0.0, 1e6)
    w = ck.FP4_VALUES[codes[:N]] * 2.0 ** (scales[np.arange(N) // 32].astype(np.float32) - 127)
    np.testing.assert_array_equal(np.array(act)[:, 0], w * 0.5 * (w + 1))


def test_moe_kernels_bfloat16():
    """bfloat16 in and out, float32 inside: closer to the float32 ops than the bfloat16 ops are."""
    ex = km.random_experts(4, 64, 96, seed=7, dtype=mx.bfloat16)
    idx, w = km.random_routing(2, 4, 4, seed=7, dtype=mx.bfloat16)
    x = mx.random.normal((2, 64), key=mx.random.key(7)).astype(mx.bfloat16)
    up32 = km.in_dtype(ex.gate_up_proj, mx.float32)
    act = km.gate_up_swiglu("emulate", ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
    assert act.dtype == mx.bfloat16
    want = ops.experts_swiglu(up32, *f32(x), idx, ex.alpha, ex.limit)
    assert rel(act, want) < TOL[mx.bfloat16]
    assert rel(act, want) <= rel(
        ops.experts_swiglu(ex.gate_up_proj, x, idx, ex.alpha, ex.limit), want
    )
    y = km.down_combine("emulate", ex.down_proj, act, idx, w)
    assert y.dtype == mx.bfloat16
    down32 = km.in_dtype(ex.down_proj, mx.float32)
    assert rel(y, ops.experts_combine(down32, *f32(act), idx, *f32(w))) < TOL[mx.bfloat16]


@pytest.mark.parametrize("threshold", [8, 64])
def test_kernels_take_exactly_the_batches_the_mlx_path_does_not_sort(monkeypatch, threshold):
    """One constant, ops.SORT_THRESHOLD, splits the batches: below it the kernels apply and the mlx
    ops gather unsorted; from it on the kernels decline and the mlx ops sort by expert."""
    monkeypatch.setattr(ops, "SORT_THRESHOLD", threshold)
    ex = km.random_experts(4, 64, 64, seed=5)
    for N in (threshold // 4 - 1, threshold // 4):  # 4 experts per token
        idx, w = km.random_routing(N, 4, 4, seed=N)
        x = mx.ones((N, 64))
        small = N * 4 < threshold
        assert km.supported(ex.gate_up_proj, ex.down_proj, x, idx) == small
        graph = count_primitives(ops.experts(ex.gate_up_proj, ex.down_proj, x, idx, w, 1.7, 7.0))
        assert ("ArgSort" in graph) == (not small)


@pytest.fixture(scope="module")
def real_experts():
    """Expert weights at the real 20b and 120b shapes ([E, 5760, 360] and [E, 2880, 360] uint32):
    the selected experts random (one of them the last, 127 of 120b's 128), the others zero."""
    made = {}
    rng = np.random.default_rng(20)
    for E in (E_20B, E_120B):
        chosen = np.array([3, 17, E - 2, E - 1], dtype=np.uint32)

        def proj(n_out: int, n_in: int, chosen=chosen, E=E) -> object:
            w = np.zeros((E, n_out, n_in // 8), np.uint32)
            s = np.full((E, n_out, n_in // 32), 127, np.uint8)
            w[chosen] = rng.integers(0, 2**32, size=(4, n_out, n_in // 8), dtype=np.uint32)
            s[chosen] = rng.integers(122, 128, size=(4, n_out, n_in // 32), dtype=np.uint8)
            bias = rng.normal(size=(E, n_out)).astype(np.float32)
            return types.SimpleNamespace(
                weight=mx.array(w), scales=mx.array(s), bias=mx.array(bias)
            )

        made[E] = (proj(2 * H_REAL, H_REAL), proj(H_REAL, H_REAL), mx.array(chosen)[None])
    return made


@pytest.mark.parametrize("E", [E_20B, E_120B], ids=["20b", "120b"])
def test_moe_kernels_at_real_shapes(lane_order, real_experts, E):
    """One decoded token's 4 experts at gpt-oss's hidden and intermediate size (2880), the real
    expert counts and the production launch (256-thread threadgroups), against the mlx ops."""
    up, down, idx = real_experts[E]
    rng = np.random.default_rng(E)
    x = mx.array(rng.normal(size=(1, H_REAL)).astype(np.float32))
    w = mx.softmax(mx.array(rng.random((1, 4)).astype(np.float32)), axis=-1)
    act = km.gate_up_swiglu("emulate", up, x, idx, 1.702, 7.0)
    want_act = ops.experts_swiglu(up, x, idx, 1.702, 7.0)
    assert rel(act, want_act) < FLOAT32_TOL
    y = km.down_combine("emulate", down, want_act, idx, w)
    assert rel(y, ops.experts_combine(down, want_act, idx, w)) < FLOAT32_TOL


def test_moe_kernels_at_real_shapes_bfloat16(real_experts):
    up, down, idx = real_experts[E_20B]
    x = mx.array(np.random.default_rng(1).normal(size=(1, H_REAL)).astype(np.float32))
    w = mx.softmax(mx.array([[0.1, 0.2, 0.3, 0.4]]), axis=-1)
    xb, wb = x.astype(mx.bfloat16), w.astype(mx.bfloat16)
    upb, downb = km.in_dtype(up, mx.bfloat16), km.in_dtype(down, mx.bfloat16)
    act = km.gate_up_swiglu("emulate", upb, xb, idx, 1.702, 7.0)
    want = ops.experts_swiglu(km.in_dtype(upb, mx.float32), *f32(xb), idx, 1.702, 7.0)
    assert act.dtype == mx.bfloat16 and rel(act, want) < TOL[mx.bfloat16]
    y = km.down_combine("emulate", downb, act, idx, wb)
    act32, w32 = f32(act, wb)
    ref = ops.experts_combine(km.in_dtype(downb, mx.float32), act32, idx, w32)
    assert y.dtype == mx.bfloat16 and rel(y, ref) < TOL[mx.bfloat16]


# --- decode attention -----------------------------------------------------------------------------

# (batch, query heads, KV heads, slots, position): a ring not yet full, a ring after the context
# passed the window, the 128-slot ring, a full cache of 1024 slots partly filled, one filled to the
# end with a single KV head.
DECODE_CASES = [
    (1, 16, 2, 8, 5),
    (2, 16, 2, 8, 37),
    (2, 16, 2, 128, 300),
    (2, 16, 2, 1024, 700),
    (1, 8, 1, 1024, 1023),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,offset", DECODE_CASES)
def test_decode_attention_matches_mlx(lane_order, B, Hq, Hkv, S, offset):
    q, k, v, sinks = ka.random_qkv(B, Hq, Hkv, 1, S, 64, seed=S + offset)
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, mx.array(offset))
    want = ops.decode_attention(q, k, v, sinks, 0.125, offset)
    assert got.shape == (B, Hq, 1, 64)
    assert rel(got, want) < TOL[mx.float32]


# The real heads (64 query heads, 8 KV heads, 64 dims): the 128-slot ring of a sliding layer, and
# a full layer's 4096-slot buffer with 4000 positions filled (split over 32 threadgroups per KV
# head, merged). Longer buffers only add splits (decode_splits covers their arithmetic).
REAL_DECODE = [(128, 5000), (4096, 3999)]


@pytest.mark.parametrize("S,offset", REAL_DECODE, ids=["ring", "full"])
def test_decode_attention_at_real_shapes(lane_order, S, offset):
    q, k, v, sinks = ka.random_qkv(1, 64, 8, 1, S, 64, seed=S)
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, mx.array(offset))
    assert rel(got, ops.decode_attention(q, k, v, sinks, 0.125, offset)) < TOL[mx.float32]


def test_decode_fills_the_gpu_at_batch_1():
    """Threadgroups at batch 1 (8 KV heads): the ring gets 8 splits (64 threadgroups, was 8), a
    full layer's buffer 32 (256); every split has at least MIN_KEYS_PER_SPLIT keys."""
    assert ka.decode_splits(1, 8, 128) == (16, 8)
    assert ka.decode_splits(1, 8, 4096) == (128, 32)
    assert ka.decode_splits(64, 8, 4096)[1] == 1  # a large batch fills the GPU alone: one pass
    for B in (1, 2, 5, 40):
        for S in (8, 128, 257, 1024, 4096, 131072):
            split, ns = ka.decode_splits(B, 8, S)
            assert split * ns >= S > split * (ns - 1) and ns <= ka.MAX_SPLITS
            assert split >= min(S, ka.MIN_KEYS_PER_SPLIT)
            assert B * 8 * ns >= min(ka.TARGET_THREADGROUPS, B * 8 * -(-S // ka.MIN_KEYS_PER_SPLIT))


def test_decode_attention_bfloat16_and_sinks_matter():
    q, k, v, sinks = ka.random_qkv(2, 16, 2, 1, 128, 64, seed=3, dtype=mx.bfloat16)
    sinks = (sinks + 5).astype(mx.bfloat16)  # weighs like ~100 keys: large enough to matter
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, 200)
    assert got.dtype == mx.bfloat16
    q32, k32, v32, s32 = f32(q, k, v, sinks)
    assert rel(got, ops.decode_attention(q32, k32, v32, s32, 0.125, 200)) < TOL[mx.bfloat16]
    no_sink = ops.decode_attention(q32, k32, v32, s32 - 1e4, 0.125, 200)
    assert rel(got, no_sink) > 10 * TOL[mx.bfloat16]


def test_decode_scores_far_apart_stay_finite():
    """Scores spanning thousands in log space (one key dominating, others underflowing) and a sink
    far below: finite sentinels and exp2 keep every output finite and equal to the mlx ops."""
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 64, 64, seed=9)
    k = k * mx.where(mx.arange(64)[None, None, :, None] == 7, 40.0, 1.0)  # one huge score
    sinks = sinks - 1e4
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, mx.array(63))
    assert np.isfinite(np.array(got)).all()
    assert rel(got, ops.decode_attention(q, k, v, sinks, 0.125, 63)) < TOL[mx.float32]


# --- banded prefill (SIMD-group matrices) ---------------------------------------------------------

# (batch, T new queries, P earlier positions in the ring, window): T not a multiple of the 8-query
# block, with and without earlier positions, T beyond the window, the real 128 window.
BANDED_CASES = [(1, 5, 0, 8), (2, 45, 7, 8), (2, 77, 3, 16), (1, 300, 127, 128), (2, 33, 0, 128)]


def _dense(q, k, v, sinks, W):
    """Dense attention with the band as an explicit [T, S] mask (MLX's fused SDPA)."""
    T, S = q.shape[2], k.shape[2]
    return mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.125, mask=ops.attention_mask(T, S, W), sinks=sinks
    )


@pytest.mark.parametrize("B,T,P,W", BANDED_CASES)
def test_banded_attention_matches_dense_attention(lane_order, B, T, P, W):
    q, k, v, sinks = ka.random_qkv(B, 16, 2, T, T + P, 64, seed=T + P)
    got = ka.banded_attention("emulate", q, k, v, sinks, 0.125, W)
    assert rel(got, _dense(q, k, v, sinks, W)) < TOL[mx.float32]
    assert rel(got, ops.sliding_window_attention(q, k, v, sinks, 0.125, W)) < TOL[mx.float32]


# Real heads and window: a later chunk after a full ring (127 earlier positions), and a first chunk
# shorter than the window with a partial 8-query block. Each threadgroup's band (8 queries: up to
# 135 keys, 5 tiles) is the same whatever the chunk length, so 64 and 45 queries cover every
# threadgroup situation a 512-query chunk has.
REAL_BANDED = [(64, 127), (45, 0)]


@pytest.mark.parametrize("T,P", REAL_BANDED, ids=["after-ring", "first-chunk"])
def test_banded_attention_at_real_shapes(lane_order, T, P):
    q, k, v, sinks = ka.random_qkv(1, 64, 8, T, T + P, 64, seed=T)
    got = ka.banded_attention("emulate", q, k, v, sinks, 0.125, 128)
    assert rel(got, _dense(q, k, v, sinks, 128)) < TOL[mx.float32]


def test_banded_attention_bfloat16():
    q, k, v, sinks = ka.random_qkv(1, 8, 1, 70, 75, 64, seed=1, dtype=mx.bfloat16)
    got = ka.banded_attention("emulate", q, k, v, sinks, 0.125, 16)
    assert got.dtype == mx.bfloat16
    assert (
        rel(got, ops.sliding_window_attention(*f32(q, k, v, sinks), 0.125, 16)) < TOL[mx.bfloat16]
    )


def test_banded_work_grows_linearly_with_T():
    """Keys each query's threadgroup visits (the kernel counts them): at most window + 7,
    whatever T, so the total grows as T x window; full T x T attention would visit T keys."""
    W = 16
    per_query = {}
    for T in (32, 64, 128, 256, 512):
        q, k, v, sinks = ka.random_qkv(1, 2, 1, T, T, 64, seed=T)
        out, visited = ka.banded_attention("emulate", q, k, v, sinks, 0.125, W, count=True)
        assert rel(out, ops.sliding_window_attention(q, k, v, sinks, 0.125, W)) < TOL[mx.float32]
        visited = np.array(visited)
        assert visited.shape == (1, 2, T)
        assert visited.max() <= W + ka.QUERY_BLOCK - 1
        seen = np.minimum(np.arange(T) + 1, W)  # keys each query really needs
        assert (visited >= seen).all()
        per_query[T] = visited.sum() / visited.size
    totals = {T: per_query[T] * T for T in per_query}
    assert totals[512] / totals[256] < 2.05  # linear, not quadratic
    assert per_query[512] < 512 / 10  # far below the T keys of full attention
    # the same count with the real window, and with earlier positions from the ring
    q, k, v, sinks = ka.random_qkv(1, 8, 1, 400, 527, 64, seed=9)
    _, visited = ka.banded_attention("emulate", q, k, v, sinks, 0.125, 128, count=True)
    assert np.array(visited).max() <= 128 + ka.QUERY_BLOCK - 1


def test_kernels_step_aside_for_inputs_they_do_not_support():
    """A quantized cache (tuples of packed arrays), mixed dtypes, heads the threadgroup memory does
    not hold: the mlx path runs (None), whatever the backend."""
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 16, 64, seed=1)
    packed = (k.astype(mx.uint32), mx.ones((1, 2, 16, 1)), mx.zeros((1, 2, 16, 1)))
    assert ka.attend("emulate", q, packed, packed, sinks, 0.125, 8, mx.array(5)) is None
    kq = mx.quantize(k.reshape(-1, 64), bits=8)[0].reshape(1, 2, 16, -1)
    assert ka.attend("emulate", q, kq, kq, sinks, 0.125, 8, mx.array(5)) is None
    half_k = k.astype(mx.bfloat16)
    assert ka.attend("emulate", q, half_k, half_k, sinks, 0.125, 8, mx.array(5)) is None
    q2, k2, v2, s2 = ka.random_qkv(1, 32, 2, 10, 10, 64, seed=2)  # 16 heads per KV head
    assert ka.attend("emulate", q2, k2, v2, s2, 0.125, 8) is None
    ex = km.random_experts(4, 64, 64, seed=1)
    idx, w = km.random_routing(1, 4, 4, seed=1)
    dense = types.SimpleNamespace(
        weight=mx.zeros((4, 128, 64)), scales=None, bias=mx.zeros((4, 128))
    )
    assert km.experts("emulate", dense, ex.down_proj, mx.ones((1, 64)), idx, w, 1.7, 7.0) is None


# --- measured dispatch: decisions, cache, fallback (injected clock) ---------------------------

TINY_SHAPES = measured.Shapes(
    hidden=64, intermediate=96, experts_per_token=2, heads=16, kv_heads=2, head_dim=64, window=8
)


class FakeClock:
    """A clock the test advances: each kernel launch costs `kernel`, each mlx-path call `mlx`."""

    def __init__(self) -> None:
        self.now = 0.0
        self.kernel = 1.0
        self.mlx = 1.0
        self.launches = 0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch, fresh_checks):
    """Small trials (so the emulator runs them quickly) and a fake clock advanced by the calls."""
    monkeypatch.setattr(ka, "FULL_SLOTS", 96)
    monkeypatch.setattr(ka, "FULL_FILLED", 70)
    monkeypatch.setattr(ka, "PREFILL_CHUNK", 24)
    c = FakeClock()
    real_call = dispatch.Kernel.__call__

    def launch(self, backend, **kw):
        c.now += c.kernel
        c.launches += 1
        return real_call(self, backend, **kw)

    monkeypatch.setattr(dispatch.Kernel, "__call__", launch)
    for name in (
        "experts_swiglu",
        "experts_combine",
        "decode_attention",
        "sliding_window_attention",
    ):
        real = getattr(ops, name)

        def timed_op(*a, real=real, **kw):
            c.now += c.mlx
            return real(*a, **kw)

        monkeypatch.setattr(ops, name, timed_op)
    return c


TRIAL_NAMES = [
    km.GATE_UP.name,
    km.DOWN.name,
    ka.DECODE_SLIDING,
    ka.DECODE_FULL,
    ka.BANDED.name,
]


def test_faster_kernels_are_used(clock):
    clock.kernel, clock.mlx = 0.5, 3.0  # every kernel launch is cheaper than its mlx path
    decisions = K.decide("emulate", TINY_SHAPES, clock=clock)
    assert sorted(d.name for d in decisions) == sorted(TRIAL_NAMES)
    for d in decisions:
        assert d.correct and d.use(measured=True) and not d.cached, d
        assert d.kernel_s < d.mlx_s
    assert all(K.enabled(n, "emulate") for n in TRIAL_NAMES)


def test_slower_kernels_step_aside(clock):
    """Kernel slower -> the mlx path is chosen, and the model's calls take it."""
    clock.kernel, clock.mlx = 5.0, 1.0
    decisions = K.decide("emulate", TINY_SHAPES, clock=clock)
    assert all(d.correct and not d.use(measured=True) for d in decisions)
    assert not any(K.enabled(n, "emulate") for n in TRIAL_NAMES)
    ex = km.random_experts(4, 64, 96, seed=1)
    idx, w = km.random_routing(1, 2, 4, seed=1)
    launches = clock.launches
    assert (
        km.experts("emulate", ex.gate_up_proj, ex.down_proj, mx.ones((1, 64)), idx, w, 1.7, 7.0)
        is None
    )
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 8, 64)
    assert ka.attend("emulate", q, k, v, sinks, 0.125, 8, mx.array(3)) is None
    assert clock.launches == launches  # no kernel ran
    # the report says so
    table = K.format_decisions(decisions, "emulate", measured=True)
    for name in TRIAL_NAMES:
        assert name in table
    assert table.count("mlx (kernel slower)") == len(TRIAL_NAMES)


def _broken(family: str, name: str, old: str, new: str):
    real = sources.family.__wrapped__

    def patched(f):
        header, bodies = real(f)
        if f == family:
            assert old in bodies[name]
            bodies = {**bodies, name: bodies[name].replace(old, new)}
        return header, bodies

    return patched


def test_incorrect_kernel_is_not_used_however_fast(clock, monkeypatch):
    monkeypatch.setattr(
        sources,
        "family",
        _broken("moe", "moe_down_combine", "acc[r] + bsum[r]", "1.01f * (acc[r] + bsum[r])"),
    )
    clock.kernel, clock.mlx = 0.1, 10.0
    with pytest.warns(
        RuntimeWarning, match=r"kernel 'moe_down_combine' \(emulate\) failed its check"
    ):
        decisions = {d.name: d for d in K.decide("emulate", TINY_SHAPES, clock=clock)}
    assert not decisions[km.DOWN.name].correct and decisions[km.DOWN.name].kernel_s is None
    assert "relative error" in decisions[km.DOWN.name].detail
    assert not K.enabled(km.DOWN.name, "emulate")
    assert K.enabled(km.GATE_UP.name, "emulate")  # the other kernel still runs
    # a later run: the incorrect kernel stays out (from the cache, not checked again)
    K.reset_self_checks()
    launches = clock.launches
    with pytest.warns(RuntimeWarning, match="moe_down_combine"):
        again = {d.name: d for d in K.decide("emulate", TINY_SHAPES, clock=clock)}
    assert again[km.DOWN.name].cached and not again[km.DOWN.name].correct
    assert clock.launches == launches and not K.enabled(km.DOWN.name, "emulate")
    ex = km.random_experts(4, 64, 96, seed=21)
    idx, w = km.random_routing(2, 2, 4, seed=22)
    x = mx.random.normal((2, 64), key=mx.random.key(22))
    out = km.experts("emulate", ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)
    want = ops.experts(ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)
    assert rel(out, want) < TOL[mx.float32]


def test_decisions_are_cached_per_chip_mlx_version_and_kernel_source(clock, monkeypatch):
    clock.kernel, clock.mlx = 0.5, 3.0
    first = K.decide("emulate", TINY_SHAPES, clock=clock)
    stored = json.loads((K.cache_dir() / measured.DECISIONS_FILE).read_text())
    (key,) = stored
    assert "emulator on" in key and mx.__version__ in key and "hidden=64" in key
    assert set(stored[key]) == set(TRIAL_NAMES)
    # a later run: every decision from the cache, no kernel launched, instantly
    K.reset_self_checks()
    launches = clock.launches
    again = K.decide("emulate", TINY_SHAPES, clock=clock)
    assert clock.launches == launches
    assert all(d.cached for d in again)
    assert [d.use(True) for d in again] == [d.use(True) for d in first]
    assert all(K.enabled(n, "emulate") for n in TRIAL_NAMES)
    # a changed kernel source: that trial is measured again, the others stay cached
    monkeypatch.setattr(
        sources,
        "family",
        _broken(
            "attention",
            "sdpa_banded",
            "constexpr uint TK = 32;",
            "constexpr uint TK = 32;  // edited",
        ),
    )
    K.reset_self_checks()
    changed = {d.name: d.cached for d in K.decide("emulate", TINY_SHAPES, clock=clock)}
    assert changed == {n: n != ka.BANDED.name for n in TRIAL_NAMES}
    # another MLX version, another chip, other shapes, or fresh=True: measured again
    for patch in (
        lambda: monkeypatch.setattr(mx, "__version__", "0.99.0"),
        lambda: monkeypatch.setattr(measured, "device_name", lambda backend: "Apple M9 Ultra"),
    ):
        patch()
        assert not any(d.cached for d in K.decide("emulate", TINY_SHAPES, clock=clock))
    other = dict(TINY_SHAPES.__dict__, intermediate=64)
    assert not any(d.cached for d in K.decide("emulate", measured.Shapes(**other), clock=clock))
    assert not any(d.cached for d in K.decide("emulate", TINY_SHAPES, clock=clock, fresh=True))


def test_forced_kernels_are_checked_not_timed(clock, monkeypatch):
    """GPTOSS_MLX_KERNELS (or kernels=) still forces a choice: metal uses every correct kernel
    however slow (checked, not timed); auto measures."""
    monkeypatch.delenv(K.ENV_VAR, raising=False)
    assert K.policy(None) == "measure" and K.policy("auto") == "measure"
    assert K.policy("metal") == "check" and K.policy("emulate") == "check"
    monkeypatch.setenv(K.ENV_VAR, "metal")
    assert K.policy(None) == "check"
    clock.kernel, clock.mlx = 5.0, 1.0
    decisions = K.decide("emulate", TINY_SHAPES, measure=False, clock=clock)
    assert all(d.use(measured=False) and d.kernel_s is None for d in decisions)
    assert all(K.enabled(n, "emulate") for n in TRIAL_NAMES)
    assert "forced: checked, not timed" in K.format_decisions(decisions, "emulate", measured=False)


def test_kernel_raising_on_its_first_real_call_falls_back(fresh_checks, monkeypatch):
    real_call = dispatch.Kernel.__call__
    calls = []

    def failing(self, backend, **kw):
        calls.append(self.name)
        if self.name in (km.DOWN.name, ka.DECODE.name):
            raise RuntimeError("device lost")
        return real_call(self, backend, **kw)

    for key in TRIAL_NAMES:  # decided already: correct and faster
        measured._STATUS[(key, "emulate")] = True
    monkeypatch.setattr(dispatch.Kernel, "__call__", failing)
    ex = km.random_experts(4, 64, 96, seed=3)
    idx, w = km.random_routing(1, 4, 4, seed=3)
    x = mx.random.normal((1, 64), key=mx.random.key(3))
    want = ops.experts(ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)
    with pytest.warns(
        RuntimeWarning,
        match=r"kernel 'moe_down_combine' \(emulate\) failed on a real call.*device lost",
    ):
        out = km.experts("emulate", ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)
    assert rel(out, want) < TOL[mx.float32]  # the gate/up kernel's activations, the mlx down path
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 8, 64)
    with pytest.warns(RuntimeWarning, match="sdpa_decode:sliding"):
        assert ka.attend("emulate", q, k, v, sinks, 0.125, 8, mx.array(3)) is None
    calls.clear()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        out = km.experts("emulate", ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)
        assert ka.attend("emulate", q, k, v, sinks, 0.125, 8, mx.array(3)) is None
    assert calls == [km.GATE_UP.name]  # the failed kernels are not tried again
    assert rel(out, want) < TOL[mx.float32]


def test_without_a_decision_a_kernel_is_checked_at_the_call_shapes(fresh_checks, monkeypatch):
    """A kernel used without `use` (no decision yet) is checked at the shapes of the call; a kernel
    that does not build steps aside with a warning."""
    monkeypatch.setattr(ka, "FULL_SLOTS", 96)
    monkeypatch.setattr(ka, "FULL_FILLED", 70)
    monkeypatch.setattr(ka, "PREFILL_CHUNK", 24)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for key in TRIAL_NAMES:
            assert K.enabled(key, "emulate", TINY_SHAPES)
    K.reset_self_checks()
    monkeypatch.setattr(
        sources, "family", _broken("attention", "sdpa_decode", "simd_sum(part)", "simd_sum(part")
    )
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 8, 64, seed=4)
    with pytest.warns(RuntimeWarning, match="kernel 'sdpa_decode:sliding'.*does not compile"):
        assert ka.attend("emulate", q, k, v, sinks, 0.125, 8, decode_offset=mx.array(20)) is None


def test_use_decides_at_the_model_shapes(real_heads, hf_mxfp4_dir, fresh_checks, monkeypatch):
    monkeypatch.setattr(ka, "FULL_SLOTS", 96)
    monkeypatch.setattr(ka, "FULL_FILLED", 70)
    monkeypatch.setattr(ka, "PREFILL_CHUNK", 24)
    seen = []
    real = measured.decide

    def spy(backend, shapes, measure=True, **kw):
        seen.append((backend, shapes, measure))
        return real(backend, shapes, measure=measure, **kw)

    monkeypatch.setattr(measured, "decide", spy)
    model = load_model(real_heads[0], dtype="float32", kernels="emulate")
    c = model.config
    want = measured.Shapes(
        c.hidden_size,
        c.intermediate_size,
        c.experts_per_token,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim,
        c.sliding_window,
    )
    assert K.model_shapes(model) == want
    assert seen == [("emulate", want, False)]  # forced (not auto): checked, not timed
    assert all((n, "emulate") in measured._STATUS for n in TRIAL_NAMES)
    # 16-dim heads (the tiny checkpoint): the decode kernel steps aside, the others are decided
    K.reset_self_checks()
    load_model(hf_mxfp4_dir, dtype="float32", kernels="emulate")
    decided = {name for name, _ in measured._STATUS}
    assert decided == {km.GATE_UP.name, km.DOWN.name, ka.BANDED.name}


def test_cache_dir_follows_the_platform(monkeypatch, tmp_path):
    monkeypatch.setenv(measured.CACHE_ENV_VAR, str(tmp_path / "x"))
    assert K.cache_dir() == tmp_path / "x"
    monkeypatch.delenv(measured.CACHE_ENV_VAR)
    monkeypatch.setattr(measured.Path, "home", lambda: tmp_path)
    monkeypatch.setattr(measured.sys, "platform", "darwin")
    assert K.cache_dir() == tmp_path / "Library" / "Caches" / "gptoss-mlx"
    monkeypatch.setattr(measured.sys, "platform", "linux")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert K.cache_dir() == tmp_path / "xdg" / "gptoss-mlx"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert K.cache_dir() == tmp_path / ".cache" / "gptoss-mlx"


def _bench_kernels(folder, env: dict) -> subprocess.CompletedProcess:
    repo = str(sources.source_dir().parent)
    return subprocess.run(
        [sys.executable, "-m", "gptoss_mlx.cli", "bench", "--kernels", "--model", str(folder)],
        capture_output=True,
        text=True,
        cwd=repo,
        env={**os.environ, "PYTHONPATH": repo, **env},
    )


def test_bench_kernels_prints_times_and_decisions(real_heads, tmp_path):
    """`gptoss-mlx bench --kernels`: each kernel's time against its mlx path and the decision at
    the model's shapes (here through the emulator, labelled as such; on a Mac, Metal)."""
    folder = real_heads[0]
    done = _bench_kernels(folder, {K.ENV_VAR: "emulate", measured.CACHE_ENV_VAR: str(tmp_path)})
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "CPU emulator" in out and "mlx ms" in out and "kernel ms" in out and "decision" in out
    for name in TRIAL_NAMES:
        (row,) = [line for line in out.splitlines() if line.startswith(name + " ")]
        assert row.split()[-1] in ("kernel", "slower)"), row  # correct: used or slower, timed
    assert (tmp_path / measured.DECISIONS_FILE).exists()
    if not mx.metal.is_available():
        done = _bench_kernels(folder, {K.ENV_VAR: "auto"})
        assert done.returncode == 0 and "No Metal GPU here" in done.stdout


# --- the whole model ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def real_heads(tmp_path_factory):
    cfg = ck.REAL_HEADS
    tensors = ck.make_hf_tensors(cfg, seed=3)
    folder = ck.write_hf_mxfp4(tmp_path_factory.mktemp("real-heads"), cfg, tensors)
    ids = np.random.RandomState(2).randint(0, cfg.vocab_size, (2, 21))
    return folder, ids, ck.reference_logits(ck.reference_model(tensors, cfg), ids)


def _count_kernel_calls(monkeypatch):
    calls = {}
    real = K.Kernel.__call__

    def counting(self, backend, **kw):
        calls[self.kernel_name] = calls.get(self.kernel_name, 0) + 1
        assert backend == "emulate"
        return real(self, backend, **kw)

    monkeypatch.setattr(K.Kernel, "__call__", counting)
    return calls


def test_model_with_emulated_kernels_matches_transformers(real_heads, monkeypatch):
    folder, ids, ref = real_heads
    monkeypatch.setenv(K.ENV_VAR, "emulate")
    model = load_model(folder, dtype="float32", dense_bits=16)
    calls = _count_kernel_calls(monkeypatch)
    # prefill: banded kernel on the sliding layer (the 21-token prompt is longer than its window, 8)
    full = np.array(model(mx.array(ids)))
    assert ck.relative_error(full, ref) < FLOAT32_TOL
    assert calls == {"sdpa_banded": 1}
    # step-by-step decoding through the caches: ring (sliding) and growing buffer (full layer)
    cache = model.make_cache()
    prompt = 3
    steps = [np.array(model(mx.array(ids[:, :prompt]), cache=cache))]
    for t in range(prompt, ids.shape[1]):
        steps.append(np.array(model(mx.array(ids[:, t : t + 1]), cache=cache)))
    assert ck.relative_error(np.concatenate(steps, axis=1), ref) < FLOAT32_TOL
    n = ids.shape[1] - prompt  # decoded tokens
    L = ck.REAL_HEADS.num_hidden_layers
    # the 2 x 3-token prompt is few enough token-expert pairs for the MoE kernels too
    assert calls["moe_gate_up_swiglu"] == calls["moe_down_combine"] == (n + 1) * L
    assert calls["sdpa_banded"] == 2  # the full prompt above, and the 3-token one (sliding layer)
    # decode: the full layer's 256-slot buffer is split over threadgroups and merged; the sliding
    # layer's 8-slot ring is one split (fewer keys than MIN_KEYS_PER_SPLIT), finished in one pass
    assert calls["sdpa_decode"] == n * L and calls["sdpa_decode_merge"] == n * L // 2
    assert cache[0].offset == ids.shape[1]
