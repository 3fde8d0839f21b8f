"""Custom Metal kernels: the decode MoE projections, decode attention, banded prefill attention.

Each op the kernels cover runs on a backend, metal | mlx | emulate, chosen per model (`use`);
shapes a kernel does not support run the pure-MLX ops of `gptoss_mlx.ops` silently, and on Metal
a kernel runs only where it is correct and faster than those ops (measured at the model's shapes
on first use, decisions cached: `measured`). The model calls the two entry points, `attend`
(attention) and `experts` (the experts of one layer), which return None where the mlx ops should
run.

    dispatch.py   backend choice, `Kernel` objects
    measured.py   trials, checks and timings against the mlx ops, cached decisions, fallback
    sources.py    the kernel sources in `metal/*.metal`
    attention.py  decode and banded attention;  moe.py  fused MXFP4 up+SwiGLU and down+combine
    emulator/     runs the Metal sources on a CPU, for tests
"""

from __future__ import annotations

from .attention import attend
from .dispatch import BACKENDS, ENV_VAR, Kernel, UsesKernels, compilable, kernel_modules, resolve
from .measured import (
    GPT_OSS,
    Decision,
    Shapes,
    cache_dir,
    decide,
    enabled,
    format_decisions,
    model_shapes,
    policy,
    use,
)
from .measured import reset as reset_self_checks
from .moe import experts

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "GPT_OSS",
    "Decision",
    "Kernel",
    "Shapes",
    "UsesKernels",
    "attend",
    "cache_dir",
    "compilable",
    "decide",
    "enabled",
    "experts",
    "format_decisions",
    "kernel_modules",
    "model_shapes",
    "policy",
    "reset_self_checks",
    "resolve",
    "use",
]
