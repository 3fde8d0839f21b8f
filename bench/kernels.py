"""Micro-benchmark: each custom Metal kernel against the mlx ops it replaces, at gpt-oss shapes.

Run on an Apple Silicon Mac from the repository root:

    python bench/kernels.py                              # gpt-oss-20b/120b per-token shapes
    python bench/kernels.py --batch 1,4 --contexts 1024,4096,32768

Prints one row per case: time per call of the mlx ops and of the kernel (median of --repeat timed
loops of --iters calls evaluated together), the speed-up, the threadgroups the kernel launches,
the kernel's effective bandwidth over the bytes the op must read at least (selected experts'
MXFP4 weights, scales and biases; filled K/V slots; the chunk's q/k/v), and the kernel's relative
error against the mlx ops. Then the measured-dispatch decisions at the model's shapes -- what
`gptoss-mlx bench --kernels` prints and what `load_model` uses (kernels run only where correct
and faster). On a machine without Metal it says so and prints no numbers; `--backend emulate
--small` runs the same code through the CPU emulator at small shapes (a smoke test of this
script: its times mean nothing).
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
from gptoss_mlx.kernels import measured  # noqa: E402
from gptoss_mlx.kernels import moe as km  # noqa: E402
from gptoss_mlx.kernels.dispatch import relative_error  # noqa: E402

Case = tuple[str, str, Callable[[], mx.array], Callable[[], mx.array], int, int]


def timed(fn: Callable[[], mx.array], iters: int, repeat: int) -> float:
    """Median seconds per call; each loop evaluates all its calls at once, as a decode step does."""
    mx.eval(fn())  # warm up: builds the kernel, allocates
    samples = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        mx.eval([fn() for _ in range(iters)])
        samples.append((time.perf_counter() - t0) / iters)
    return statistics.median(samples)


def ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",") if v.strip()]


def moe_cases(args: argparse.Namespace, b: str) -> Iterator[Case]:
    dt, K = mx.bfloat16, 4
    E, H, I = (4, 256, 256) if args.small else (args.experts, args.hidden, args.hidden)
    ex = km.random_experts(E, H, I, seed=0, dtype=dt)
    for N in args.tokens:
        idx, w = km.random_routing(N, K, E, seed=N, dtype=dt)
        x = mx.random.normal((N, H)).astype(dt)
        act = mx.random.normal((N * K, I)).astype(dt)
        used = len({int(e) for e in np.array(idx).ravel()})
        tg_up = -(-I // (km.SIMDGROUPS * km.UP_ROWS)) * N * K
        tg_down = -(-H // (km.SIMDGROUPS * km.DOWN_ROWS)) * N
        yield (
            "moe up + swiglu",
            f"N={N} K={K} E={E} {H}->{2 * I}",
            lambda ex=ex, x=x, idx=idx: ops.experts_swiglu(ex.gate_up_proj, x, idx, 1.702, 7.0),
            lambda ex=ex, x=x, idx=idx: km.gate_up_swiglu(b, ex.gate_up_proj, x, idx, 1.702, 7.0),
            used * 2 * I * (H // 2 + H // 32 + 2) + N * H * 2,
            tg_up,
        )
        yield (
            "moe down + combine",
            f"N={N} K={K} E={E} {I}->{H}",
            lambda ex=ex, a=act, idx=idx, w=w: ops.experts_combine(ex.down_proj, a, idx, w),
            lambda ex=ex, a=act, idx=idx, w=w: km.down_combine(b, ex.down_proj, a, idx, w),
            used * H * (I // 2 + I // 32 + 2) + N * K * I * 2,
            tg_down,
        )


def attention_cases(args: argparse.Namespace, b: str) -> Iterator[Case]:
    dt = mx.bfloat16
    Hq, Hkv, D, W = (16, 2, 64, 16) if args.small else (64, 8, 64, 128)
    for B in args.batch:
        contexts = [(f"ring {W}", W, 5 * W)] + [
            (f"full {n}", -(-n // 256) * 256, n - 1) for n in args.contexts
        ]
        for label, S, pos in contexts:
            if args.small:
                S, pos = min(S, 512), min(pos, 400)
            q, k, v, sinks = ka.random_qkv(B, Hq, Hkv, 1, S, D, seed=S, dtype=dt)
            n = min(pos + 1, S)
            split, ns = ka.decode_splits(B, Hkv, S)
            yield (
                f"decode attention ({label})",
                f"B={B} Hq={Hq} Hkv={Hkv} slots={S} filled={n}",
                lambda q=q, k=k, v=v, s=sinks, o=pos: ops.decode_attention(q, k, v, s, 0.125, o),
                lambda q=q, k=k, v=v, s=sinks, o=pos: ka.decode_attention(
                    b, q, k, v, s, 0.125, mx.array(o)
                ),
                B * (2 * Hkv * n * D * 2 + Hq * D * 2),
                B * Hkv * ns,
            )
    for T in [200] if args.small else args.prefill:
        P = W - 1
        q, k, v, sinks = ka.random_qkv(1, Hq, Hkv, T, T + P, D, seed=T, dtype=dt)
        yield (
            "banded prefill attention",
            f"T={T} after {P} window={W} Hq={Hq}",
            lambda q=q, k=k, v=v, s=sinks: ops.sliding_window_attention(q, k, v, s, 0.125, W),
            lambda q=q, k=k, v=v, s=sinks: ka.banded_attention(b, q, k, v, s, 0.125, W),
            2 * Hkv * (T + P) * D * 2 + 2 * Hq * T * D * 2,
            Hkv * -(-T // ka.QUERY_BLOCK),
        )


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=32, help="32 (20b) or 128 (120b)")
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--tokens", type=ints, default=[1, 4, 15], help="MoE tokens per call")
    ap.add_argument("--batch", type=ints, default=[1, 4], help="decode attention batch rows")
    ap.add_argument("--contexts", type=ints, default=[1024, 4096, 32768], help="full-layer")
    ap.add_argument("--prefill", type=ints, default=[512, 2048], help="banded chunk lengths")
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
        args.tokens, args.batch, args.contexts = [1], [1], [300]
        print("CPU emulator: a smoke test of this script; the times below mean nothing.")
    print(f"{measured.device_name(args.backend)}, mlx {mx.__version__}, bfloat16")
    rows = []
    b = args.backend
    for name, shape, mlx_fn, kernel_fn, nbytes, tgs in [
        *moe_cases(args, b),
        *attention_cases(args, b),
    ]:
        err = relative_error(kernel_fn(), mlx_fn())
        t_mlx = timed(mlx_fn, args.iters, args.repeat)
        t_k = timed(kernel_fn, args.iters, args.repeat)
        rows.append(
            (name, shape, t_mlx * 1e3, t_k * 1e3, t_mlx / t_k, tgs, nbytes / t_k / 1e9, err)
        )
    head = (
        "op",
        "shape",
        "mlx ms",
        "kernel ms",
        "speed-up",
        "threadgroups",
        "kernel GB/s",
        "rel err",
    )
    cell = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)  # noqa: E731
    widths = [max(len(head[i]), *(len(cell(r[i])) for r in rows)) for i in range(len(head))]
    fmt = lambda r: "  ".join(cell(v).ljust(w) for v, w in zip(r, widths, strict=True))  # noqa: E731
    print(fmt(head))
    for r in rows:
        print(fmt(r))
    print(
        "GB/s: bytes the op must read at least, over the kernel's time. threadgroups: of the "
        "kernel's launch (decode: its split pass). rel err: kernel vs the bfloat16 mlx ops (max "
        "abs diff / max abs); the kernels accumulate in float32 and round once, the mlx ops round "
        "the gate/linear features to bfloat16 before the SwiGLU, so a few % on 'moe up' is the "
        "mlx side's rounding (tests/test_kernels.py compares both with float32 ops)."
    )
    if not args.small:
        shapes = measured.Shapes(args.hidden, args.hidden, 4, 64, 8, 64, 128)
        decisions = measured.decide(b, shapes, measure=True, fresh=True)
        print()
        print(measured.format_decisions(decisions, b, measured=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
