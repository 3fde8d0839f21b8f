"""The custom kernels against the mlx ops (through the MSL emulator), dispatch, the self-check and
fallback, banded prefill's work, and the whole model with emulated kernels against transformers."""

from __future__ import annotations

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
from gptoss_mlx.kernels import dispatch, sources
from gptoss_mlx.kernels import moe as km
from gptoss_mlx.loading import load_model

LANE_ORDERS = ("forward", "reverse", "random")
FLOAT32_TOL = 1e-4
TOL = {mx.float32: 1e-5, mx.bfloat16: 1e-2}  # bfloat16: against the float32 ops


@pytest.fixture(params=LANE_ORDERS)
def lane_order(request, monkeypatch):
    """Every lane order the emulator offers, with bounds-checked buffers."""
    monkeypatch.setenv("GPTOSS_MLX_EMULATOR_LANE_ORDER", request.param)
    monkeypatch.setenv("GPTOSS_MLX_EMULATOR_GUARDED", "1")
    return request.param


@pytest.fixture
def fresh_checks(monkeypatch):
    """Self-checks on for the emulator, starting from nothing checked and nothing built."""
    monkeypatch.setattr(dispatch, "SELF_CHECK_BACKENDS", {"emulate"})
    K.reset_self_checks()
    yield
    K.reset_self_checks()


def rel(a, b) -> float:
    return dispatch.relative_error(a, b)


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
    import subprocess
    import sys
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
# multiple of 8 per threadgroup), fewer blocks than lanes, several blocks per lane, batch of tokens.
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
    ex = km.random_experts(E, 32, I, seed=H)
    ex.down_proj = km.random_experts(
        E, I, H // 2 if H % 2 == 0 else H, seed=H
    ).gate_up_proj  # [E, H', I]
    H = ex.down_proj.weight.shape[1]
    idx, w = km.random_routing(N, Kp, E, seed=I)
    act = mx.array(np.random.default_rng(H).normal(size=(N * Kp, I)).astype(np.float32))
    got = km.down_combine("emulate", ex.down_proj, act, idx, w)
    want = ops.experts_combine(ex.down_proj, act, idx, w)
    assert got.shape == want.shape == (N, H)
    assert rel(got, want) < TOL[mx.float32]


def test_moe_kernels_bfloat16():
    """bfloat16 in and out, float32 inside: closer to the float32 ops than the bfloat16 ops are."""
    f32 = lambda a: a.astype(mx.float32)  # noqa: E731
    ex = km.random_experts(4, 64, 96, seed=7, dtype=mx.bfloat16)
    idx, w = km.random_routing(2, 4, 4, seed=7, dtype=mx.bfloat16)
    x = mx.random.normal((2, 64), key=mx.random.key(7)).astype(mx.bfloat16)
    up32 = km.in_float32(ex.gate_up_proj)
    act = km.gate_up_swiglu("emulate", ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
    assert act.dtype == mx.bfloat16
    want = ops.experts_swiglu(up32, f32(x), idx, ex.alpha, ex.limit)
    assert rel(act, want) < TOL[mx.bfloat16]
    assert rel(act, want) <= rel(
        ops.experts_swiglu(ex.gate_up_proj, x, idx, ex.alpha, ex.limit), want
    )
    y = km.down_combine("emulate", ex.down_proj, act, idx, w)
    assert y.dtype == mx.bfloat16
    assert (
        rel(y, ops.experts_combine(km.in_float32(ex.down_proj), f32(act), idx, f32(w)))
        < TOL[mx.bfloat16]
    )


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


# --- decode attention -----------------------------------------------------------------------------

# (batch, query heads, KV heads, slots, position): a ring not yet full, a ring after the context
# passed the window (contexts longer than the window), the 128-slot ring, a full cache of 1024 slots
# (split in 4 and merged) partly filled, and a long one filled to the end.
DECODE_CASES = [
    (1, 16, 2, 8, 5),
    (2, 16, 2, 8, 37),
    (2, 16, 2, 128, 300),
    (2, 16, 2, 1024, 700),
    (1, 8, 1, 4096, 4095),
]


@pytest.mark.parametrize("B,Hq,Hkv,S,offset", DECODE_CASES)
def test_decode_attention_matches_mlx(lane_order, B, Hq, Hkv, S, offset):
    if lane_order != "forward" and S > 1024:
        pytest.skip("one lane order is enough for the longest buffer")
    q, k, v, sinks = ka.random_qkv(B, Hq, Hkv, 1, S, 64, seed=S + offset)
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, mx.array(offset))
    want = ops.decode_attention(q, k, v, sinks, 0.125, offset)
    assert got.shape == (B, Hq, 1, 64)
    assert rel(got, want) < TOL[mx.float32]


def test_decode_splits_cover_the_buffer():
    assert ka.decode_splits(128, 64) == (128, 1)
    for S in (257, 1024, 4096, 131072):
        split, ns = ka.decode_splits(S, 64)
        assert split * ns >= S > split * (ns - 1) and ns <= ka.MAX_SPLITS and split % 32 == 0


def test_decode_attention_bfloat16_and_sinks_matter():
    q, k, v, sinks = ka.random_qkv(2, 16, 2, 1, 128, 64, seed=3, dtype=mx.bfloat16)
    sinks = (sinks + 5).astype(mx.bfloat16)  # weighs like ~100 keys: large enough to matter
    got = ka.decode_attention("emulate", q, k, v, sinks, 0.125, 200)
    assert got.dtype == mx.bfloat16
    f32 = [a.astype(mx.float32) for a in (q, k, v, sinks)]
    assert rel(got, ops.decode_attention(*f32, 0.125, 200)) < TOL[mx.bfloat16]
    no_sink = ops.decode_attention(*f32[:3], f32[3] - 1e4, 0.125, 200)
    assert rel(got, no_sink) > 10 * TOL[mx.bfloat16]


# --- banded prefill -------------------------------------------------------------------------------

# (batch, T new queries, P earlier positions in the ring, window): T not a multiple of the 32-query
# block, with and without earlier positions, T beyond the window, the real 128 window.
BANDED_CASES = [(1, 5, 0, 8), (2, 45, 7, 8), (2, 77, 3, 16), (1, 300, 127, 128), (2, 33, 0, 128)]


@pytest.mark.parametrize("B,T,P,W", BANDED_CASES)
def test_banded_attention_matches_mlx(lane_order, B, T, P, W):
    q, k, v, sinks = ka.random_qkv(B, 16, 2, T, T + P, 64, seed=T + P)
    got = ka.banded_attention("emulate", q, k, v, sinks, 0.125, W)
    want = mx.fast.scaled_dot_product_attention(
        q, k, v, scale=0.125, mask=ops.attention_mask(T, T + P, W), sinks=sinks
    )
    assert rel(got, want) < TOL[mx.float32]
    assert rel(got, ops.sliding_window_attention(q, k, v, sinks, 0.125, W)) < TOL[mx.float32]


def test_banded_attention_bfloat16():
    q, k, v, sinks = ka.random_qkv(1, 8, 1, 70, 75, 64, seed=1, dtype=mx.bfloat16)
    got = ka.banded_attention("emulate", q, k, v, sinks, 0.125, 16)
    assert got.dtype == mx.bfloat16
    f32 = [a.astype(mx.float32) for a in (q, k, v, sinks)]
    assert rel(got, ops.sliding_window_attention(*f32, 0.125, 16)) < TOL[mx.bfloat16]


def test_banded_work_grows_linearly_with_T():
    """Keys each query's threadgroup visits (the kernel counts them): at most window + 31,
    whatever T, so the total grows as T x window; full T x T attention would visit T keys."""
    W = 16
    per_query = {}
    for T in (32, 64, 128, 256, 512):
        q, k, v, sinks = ka.random_qkv(1, 2, 1, T, T, 64, seed=T)
        out, visited = ka.banded_attention("emulate", q, k, v, sinks, 0.125, W, count=True)
        want = ops.sliding_window_attention(q, k, v, sinks, 0.125, W)
        assert rel(out, want) < TOL[mx.float32]
        visited = np.array(visited)
        assert visited.shape == (1, 2, T)
        assert visited.max() <= W + 31
        seen = np.minimum(np.arange(T) + 1, W)  # keys each query really needs
        assert (visited >= seen).all()
        per_query[T] = visited.sum() / visited.size
    totals = {T: per_query[T] * T for T in per_query}
    assert totals[512] / totals[256] < 2.05  # linear, not quadratic
    assert per_query[512] < 512 / 10  # far below the T keys of full attention
    # the same count with the real window, and with earlier positions from the ring
    q, k, v, sinks = ka.random_qkv(1, 8, 1, 400, 527, 64, seed=9)
    _, visited = ka.banded_attention("emulate", q, k, v, sinks, 0.125, 128, count=True)
    assert np.array(visited).max() <= 128 + 31


# --- self-check and fallback ----------------------------------------------------------------------


def _broken(family: str, name: str, old: str, new: str):
    real = sources.family.__wrapped__

    def patched(f):
        header, bodies = real(f)
        if f == family:
            assert old in bodies[name]
            bodies = {**bodies, name: bodies[name].replace(old, new)}
        return header, bodies

    return patched


def _experts(backend: str, ex, x, idx, w):
    return km.experts(backend, ex.gate_up_proj, ex.down_proj, x, idx, w, ex.alpha, ex.limit)


def test_self_check_passes_quietly(fresh_checks):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in (km.GATE_UP.name, km.DOWN.name, ka.DECODE.name, ka.BANDED.name):
            assert dispatch.enabled(name, "emulate")


def test_wrong_kernel_warns_once_and_falls_back(fresh_checks, monkeypatch):
    monkeypatch.setattr(
        sources,
        "family",
        _broken("moe", "moe_down_combine", "acc[r] + bsum[r]", "1.01f * (acc[r] + bsum[r])"),
    )
    ex = km.random_experts(4, 64, 64, seed=21)
    idx, w = km.random_routing(2, 4, 4, seed=22)
    x = mx.random.normal((2, 64), key=mx.random.key(22))
    with pytest.warns(
        RuntimeWarning, match=r"kernel 'moe_down_combine' \(emulate\) failed its self-check"
    ):
        out = _experts("emulate", ex, x, idx, w)
    act = ops.experts_swiglu(ex.gate_up_proj, x, idx, ex.alpha, ex.limit)
    want = ops.experts_combine(ex.down_proj, act, idx, w)
    assert rel(out, want) < TOL[mx.float32]
    assert dispatch.enabled(km.GATE_UP.name, "emulate")  # the other kernel still runs
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once only
        out = _experts("emulate", ex, x, idx, w)
    assert rel(out, want) < TOL[mx.float32]


def test_kernel_that_does_not_build_falls_back(fresh_checks, monkeypatch):
    monkeypatch.setattr(
        sources, "family", _broken("attention", "sdpa_decode", "simd_sum(part)", "simd_sum(part")
    )
    q, k, v, sinks = ka.random_qkv(1, 16, 2, 1, 8, 64, seed=4)
    with pytest.warns(RuntimeWarning, match="kernel 'sdpa_decode'.*does not compile"):
        out = ka.attend("emulate", q, k, v, sinks, 0.125, 8, decode_offset=mx.array(20))
        assert out is None  # the mlx path runs instead


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
    monkeypatch.setattr(ka, "FINAL_MAX_KEYS", 64)  # the full layer's buffer (>= 256 slots) splits
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
    assert (
        calls["sdpa_decode"] == n * L and calls["sdpa_decode_merge"] == n * L // 2
    )  # full layers split
    assert cache[0].offset == ids.shape[1]
