"""Time the MSL emulator on a 2880 x 2880 MXFP4 matrix-vector product (the target: under 5 s).

Run from the repository root: ``python bench/emulator_mxfp4.py [--guarded] [--repeat N]``.
Prints the compile/load time (first call, 0 when the build is cached) and the run time.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402
import numpy as np  # noqa: E402

from tests.test_emulator import _mxfp4_matvec  # noqa: E402  (the test's kernel)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=2880)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--guarded", action="store_true")
    ap.add_argument("--lane-order", default="forward")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    w = mx.array(rng.normal(size=(args.n, args.n)).astype(np.float32))
    wq, scales = mx.quantize(w, mode="mxfp4")
    x = mx.array(rng.normal(size=args.n).astype(np.float32))
    mx.eval(wq, scales, x)
    kw = dict(guarded=args.guarded, lane_order=args.lane_order)
    t0 = time.perf_counter()
    _mxfp4_matvec(wq[:2], scales[:2], x, **kw)
    print(f"compile/load: {time.perf_counter() - t0:.3f} s")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        out = _mxfp4_matvec(wq, scales, x, **kw)
        print(
            f"{args.n}x{args.n} MXFP4 matvec: {time.perf_counter() - t0:.3f} s "
            f"on {os.cpu_count()} cores"
        )
    ref = np.array(mx.dequantize(wq, scales, mode="mxfp4", dtype=mx.float32)) @ np.array(x)
    print("max abs error vs mx.dequantize reference:", float(np.abs(np.array(out) - ref).max()))


if __name__ == "__main__":
    main()
