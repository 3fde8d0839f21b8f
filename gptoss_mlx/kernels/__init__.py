"""Custom Metal kernels: the decode MoE projections, decode attention, banded prefill attention.

Each op the kernels cover runs on a backend, metal | mlx | emulate, chosen per model
(`dispatch`); shapes a kernel does not support run the pure-MLX ops of `gptoss_mlx.ops` silently,
and with `metal` each kernel first checks itself against those ops. The model calls the two entry
points, `attend` (attention) and `experts` (the experts of one layer), which return None where the
mlx ops should run.

    dispatch.py   backend choice, `Kernel` objects, self-check registry
    sources.py    the kernel sources in `metal/*.metal`
    attention.py  decode and banded attention;  moe.py  fused MXFP4 up+SwiGLU and down+combine
    emulator/     runs the Metal sources on a CPU, for tests
"""

from __future__ import annotations

from .attention import attend
from .dispatch import (
    BACKENDS,
    ENV_VAR,
    Kernel,
    UsesKernels,
    compilable,
    enabled,
    kernel_modules,
    reset_self_checks,
    resolve,
    use,
)
from .moe import experts

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "Kernel",
    "UsesKernels",
    "attend",
    "compilable",
    "enabled",
    "experts",
    "kernel_modules",
    "reset_self_checks",
    "resolve",
    "use",
]
