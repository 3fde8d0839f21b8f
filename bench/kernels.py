"""Micro-benchmark: each custom Metal kernel against the mlx ops it replaces, at gpt-oss shapes.

Run on an Apple Silicon Mac from the repository root:

    python bench/kernels.py                 # gpt-oss-20b shapes, bfloat16
    python bench/kernels.py --experts 128   # gpt-oss-120b's expert count (same per-token work)

Prints one row per op: time per call of the mlx ops and of the kernel (median of --repeat timed
loops of --iters calls), the speed-up, and the kernel's effective bandwidth over the bytes it must
read. On a machine without Metal it says so and prints no numbers. `--backend emulate --small`
runs the same code through the CPU emulator at small shapes (a smoke test of this script, not a
benchmark: its times mean nothing).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from gptoss_mlx import ops  # noqa: E402
from gptoss_mlx.kernels import attention as ka  # noqa: E402
from gptoss_mlx.kernels import moe as km  # noqa: E402
from gptoss_mlx.kernels.dispatch import relative_error  # noqa: E402


def timed(fn: Callable[[], mx.array], iters: int, repeat: int) -> float:
    """Median seconds per call; each loop evaluates all its calls at once, as a decode step does."""
    mx.eval(fn())  # warm up: builds the kernel, allocates
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(iters)])
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def cases(
    args: argparse.Namespace,
) -> Iterator[tuple[str, str, Callable[[], mx.array], Callable[[], mx.array], int]]:
    """(name, shape note, mlx fn, kernel fn, bytes the op must read)."""
    dt = mx.bfloat16
    E, H, I, K, N = args.experts, args.hidden, args.hidden, 4, args.tokens
    if args.small:
        E, H, I = 4, 256, 256
    b = args.backend
    ex = km.random_experts(E, H, I, seed=0, dtype=dt)
    idx, w = km.random_routing(N, K, E, seed=0, dtype=dt)
    x = mx.random.normal((N, H)).astype(dt)
    act = mx.random.normal((N * K, I)).astype(dt)
    experts_used = len({int(e) for e in np.array(idx).ravel()})
    up_bytes = experts_used * 2 * I * (H // 2 + H // 32 + 2)
    down_bytes = experts_used * H * (I // 2 + I // 32 + 2)
    yield (
        "moe up + swiglu",
        f"N={N} K={K} E={E} {H}->{2 * I}",
        lambda: ops.experts_swiglu(ex.gate_up_proj, x, idx, ex.alpha, ex.limit),
        lambda: km.gate_up_swiglu(b, ex.gate_up_proj, x, idx, ex.alpha, ex.limit),
        up_bytes,
    )
    yield (
        "moe down + combine",
        f"N={N} K={K} E={E} {I}->{H}",
        lambda: ops.experts_combine(ex.down_proj, act, idx, w),
        lambda: km.down_combine(b, ex.down_proj, act, idx, w),
        down_bytes,
    )

    Hq, Hkv, D = (64, 8, 64) if not args.small else (16, 2, 64)
    for label, S, offset in (
        ("ring", 128, 5000),
        ("full", args.context_capacity, args.context - 1),
    ):
        if args.small:
            S, offset = min(S, 512), min(offset, 400)
        q, k, v, sinks = ka.random_qkv(1, Hq, Hkv, 1, S, D, seed=S, dtype=dt)
        n = min(offset + 1, S)
        yield (
            f"decode attention ({label})",
            f"Hq={Hq} Hkv={Hkv} slots={S} filled={n}",
            lambda q=q, k=k, v=v, s=sinks, o=offset: ops.decode_attention(q, k, v, s, 0.125, o),
            lambda q=q, k=k, v=v, s=sinks, o=offset: ka.decode_attention(
                b, q, k, v, s, 0.125, mx.array(o)
            ),
            2 * Hkv * n * D * 2,
        )
    T, W = (args.prefill, 128) if not args.small else (200, 16)
    q, k, v, sinks = ka.random_qkv(1, Hq, Hkv, T, T, D, seed=1, dtype=dt)
    yield (
        "banded prefill attention",
        f"T={T} window={W} Hq={Hq}",
        lambda: ops.sliding_window_attention(q, k, v, sinks, 0.125, W),
        lambda: ka.banded_attention(b, q, k, v, sinks, 0.125, W),
        2 * Hkv * T * D * 2 + Hq * T * D * 2,
    )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per decode call (batch rows)")
    ap.add_argument(
        "--context", type=int, default=4000, help="filled positions of the full-layer cache"
    )
    ap.add_argument("--context-capacity", type=int, default=4096)
    ap.add_argument("--prefill", type=int, default=2048, help="chunk length for banded prefill")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--backend", choices=("metal", "emulate"), default="metal")
    ap.add_argument("--small", action="store_true", help="small shapes (for --backend emulate)")
    args = ap.parse_args()
    if args.backend == "metal" and not mx.metal.is_available():
        print(
            "No Metal device here (mx.metal.is_available() is False): this benchmark times the "
            "custom Metal kernels and needs an Apple Silicon Mac. No numbers printed."
        )
        return 0
    if args.backend == "emulate":
        args.iters, args.repeat = 1, 1
        print("CPU emulator: a smoke test of this script; the times below mean nothing.")
    else:
        info = mx.device_info()
        print(f"{info.get('device_name', 'Metal GPU')}, mlx {mx.__version__}, bfloat16")
    rows = []
    for name, shape, mlx_fn, kernel_fn, nbytes in cases(args):
        err = relative_error(kernel_fn(), mlx_fn())
        t_mlx = timed(mlx_fn, args.iters, args.repeat)
        t_k = timed(kernel_fn, args.iters, args.repeat)
        rows.append((name, shape, t_mlx * 1e3, t_k * 1e3, t_mlx / t_k, nbytes / t_k / 1e9, err))
    head = ("op", "shape", "mlx ms", "kernel ms", "speed-up", "kernel GB/s", "rel err")
    widths = [
        max(
            len(head[i]),
            *(len(f"{r[i]:.3f}" if isinstance(r[i], float) else str(r[i])) for r in rows),
        )
        for i in range(len(head))
    ]
    fmt = lambda r: "  ".join(  # noqa: E731
        (f"{v:.3f}" if isinstance(v, float) else str(v)).ljust(wd)
        for v, wd in zip(r, widths, strict=True)
    )
    print(fmt(head))
    for r in rows:
        print(fmt(r))
    print(
        "GB/s: bytes the op must read (selected experts' MXFP4 weights + scales + biases; "
        "filled K/V slots; prefill q/k/v) over the kernel's time.\nrel err: kernel vs the "
        "bfloat16 mlx ops (max abs diff / max abs). The kernels accumulate in float32 and round "
        "once; the mlx ops round the gate/linear features to bfloat16 before the SwiGLU, so a few "
        "% on 'moe up' is the mlx side's rounding (tests/test_kernels.py compares both with "
        "float32 ops)."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
