"""Measured dispatch: a kernel runs where it is correct and faster than the mlx ops, else not.

On first use on a Metal device (`use`, which `load_model` calls), every kernel is tried at the
model's real shapes with its production launch sizes: checked against the mlx ops of
`gptoss_mlx.ops` (float32, bfloat16 and float16 inputs against the float32 ops), then timed
against them in bfloat16, the compute dtype. A kernel is used only where correct *and* faster.
Decisions are kept per chip, MLX version, kernel source (a hash of the kernel's text) and shapes
in a JSON file in the user's cache folder (`cache_dir()`), so later runs start at once; a changed
kernel is measured again. `GPTOSS_MLX_KERNELS=metal` (or `kernels="metal"`) forces the kernels
wherever they are correct (checked, not timed); `mlx` forces the mlx ops. A kernel that raises on
a real call steps aside for the rest of the process, with one warning (`run`).

The decisions are made per trial, one per kernel and situation:

    moe_gate_up_swiglu    one token's 4 experts, gate/up projection and SwiGLU
    moe_down_combine      their down projection, weighted and summed
    sdpa_decode:sliding   one decoded token over a full window ring (window slots)
    sdpa_decode:full      one decoded token over a full-layer buffer of 4096 slots, 4000 filled
    sdpa_banded           a prefill chunk of 512 queries after 127 earlier positions (sliding)

Kernel modules register the trials (`trials`); `gptoss-mlx bench --kernels` prints the decisions
(`format_decisions`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterable
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn

from . import dispatch
from .dispatch import ENV_VAR, Kernel, kernel_modules, resolve

DECISIONS_FILE = "kernel-decisions.json"
CACHE_ENV_VAR = "GPTOSS_MLX_CACHE_DIR"
DTYPE = mx.bfloat16  # the dtype the kernels are timed in (the model's compute dtype)


@dataclasses.dataclass(frozen=True)
class Shapes:
    """The model dimensions the kernels run at; a family's fields are None where unknown."""

    hidden: int | None = None  # H
    intermediate: int | None = None  # I (expert)
    experts_per_token: int | None = None  # K
    heads: int | None = None  # Hq
    kv_heads: int | None = None  # Hkv
    head_dim: int | None = None  # D
    window: int | None = None  # sliding window W

    def key(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self))

    @property
    def has_experts(self) -> bool:
        return None not in (self.hidden, self.intermediate, self.experts_per_token)

    @property
    def has_attention(self) -> bool:
        return None not in (self.heads, self.kv_heads, self.head_dim, self.window)


GPT_OSS = Shapes(2880, 2880, 4, 64, 8, 64, 128)  # gpt-oss-20b and -120b alike (per token)


def model_shapes(model: nn.Module) -> Shapes:
    """The shapes of `model`'s attention and expert modules (read from their attributes)."""
    found: dict[str, int | None] = {}
    for m in kernel_modules(model):
        if hasattr(m, "gate_up_proj") and "hidden" not in found:
            _, two_i, h8 = m.gate_up_proj.weight.shape
            found.update(hidden=h8 * 8, intermediate=two_i // 2)
        if hasattr(m, "num_kv_heads") and getattr(m, "window", None) and "heads" not in found:
            found.update(
                heads=m.num_heads, kv_heads=m.num_kv_heads, head_dim=m.head_dim, window=m.window
            )
    k = getattr(getattr(model, "config", None), "experts_per_token", None)
    return Shapes(experts_per_token=k if "hidden" in found else None, **found)


# --- trials ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Trial:
    """One kernel in one situation: how to run it and the mlx ops it replaces, and its check."""

    name: str  # the decision's key, e.g. "sdpa_decode:full"
    shape: str  # what it runs on, for people
    kernels: tuple[Kernel, ...]  # the kernels it launches (their source decides the cache entry)
    run_kernel: Callable[[], mx.array]  # in DTYPE
    run_mlx: Callable[[], mx.array]  # the same inputs through the mlx ops
    check: Callable[[], tuple[bool, str]]  # correctness at these shapes: (ok, what was wrong)

    def source_hash(self) -> str:
        h = hashlib.sha256()
        for k in self.kernels:
            for part in (k.kernel_name, *k.source()):
                h.update(part.encode())
        return h.hexdigest()[:16]


TrialMaker = Callable[[str, Shapes], list[Trial]]
_MAKERS: list[TrialMaker] = []


def trials(fn: TrialMaker) -> TrialMaker:
    """Register `fn(backend, shapes) -> [Trial]` (a kernel module's trials at given shapes)."""
    _MAKERS.append(fn)
    return fn


def all_trials(backend: str, shapes: Shapes) -> list[Trial]:
    return [t for make in _MAKERS for t in make(backend, shapes)]


# --- decisions ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Decision:
    """Whether a trial's kernel runs, and why."""

    name: str
    shape: str
    correct: bool
    kernel_s: float | None  # seconds per call (None: not timed)
    mlx_s: float | None
    detail: str  # what the check found wrong, if anything
    cached: bool = False

    def use(self, measured: bool) -> bool:
        """Correct, and (when measured) faster than the mlx ops."""
        if not self.correct:
            return False
        if not measured:
            return True
        return self.kernel_s is not None and self.mlx_s is not None and self.kernel_s < self.mlx_s


_STATUS: dict[tuple[str, str], bool] = {}
_WARNED: set[tuple[str, str]] = set()


def enabled(key: str, backend: str, shapes: Shapes | None = None) -> bool:
    """Whether the kernel of trial `key` runs on `backend`. Without a decision yet (no `use`), the
    trial is checked now at `shapes` (not timed): correct kernels run."""
    if backend not in dispatch.SELF_CHECK_BACKENDS:
        return True
    if (key, backend) not in _STATUS:
        chosen = [t for t in all_trials(backend, shapes or GPT_OSS) if t.name == key]
        decisions = decide(backend, shapes or GPT_OSS, measure=False, only=chosen, cache=False)
        _STATUS.setdefault((key, backend), bool(decisions) and decisions[0].correct)
    return _STATUS[(key, backend)]


def run(key: str, backend: str, fn: Callable[[], mx.array]) -> mx.array | None:
    """`fn()` (a kernel call); if it raises, warn once and let the mlx ops run (None) henceforth."""
    try:
        return fn()
    except Exception as e:  # any failure of a kernel is a reason to step aside, never to stop
        _STATUS[(key, backend)] = False
        if (key, backend) not in _WARNED:
            _WARNED.add((key, backend))
            warnings.warn(
                f"gptoss-mlx: kernel '{key}' ({backend}) failed on a real call "
                f"({type(e).__name__}: {e}); using the MLX ops for it from now on",
                RuntimeWarning,
                stacklevel=3,
            )
        return None


def reset() -> None:
    """Forget decisions, warnings and built kernels (tests)."""
    _STATUS.clear()
    _WARNED.clear()
    for k in Kernel.all():
        k.reset()


def cache_dir() -> Path:
    """$GPTOSS_MLX_CACHE_DIR, else the platform's user cache folder: ~/Library/Caches/gptoss-mlx on
    macOS, $XDG_CACHE_HOME/gptoss-mlx (default ~/.cache/gptoss-mlx) elsewhere."""
    if os.environ.get(CACHE_ENV_VAR):
        return Path(os.environ[CACHE_ENV_VAR])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Caches" / "gptoss-mlx"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gptoss-mlx"


def device_name(backend: str) -> str:
    """The chip the kernels run on (the emulator runs on the host CPU)."""
    if backend == "metal":
        return str(mx.device_info().get("device_name", "Metal GPU"))
    return f"emulator on {platform.machine()}"


def _cache_key(backend: str, shapes: Shapes) -> str:
    return f"{device_name(backend)}|mlx {mx.__version__}|{DTYPE}|{shapes.key()}"


def _read_cache() -> dict:
    try:
        return json.loads((cache_dir() / DECISIONS_FILE).read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(data: dict) -> None:
    try:
        d = cache_dir()
        d.mkdir(parents=True, exist_ok=True)
        tmp = d / f".{DECISIONS_FILE}.{os.getpid()}"
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        os.replace(tmp, d / DECISIONS_FILE)
    except OSError as e:  # a read-only home only costs the next run a new measurement
        warnings.warn(
            f"gptoss-mlx: cannot save kernel decisions in {cache_dir()}: {e}", stacklevel=3
        )


def timed(
    fn: Callable[[], mx.array], clock: Callable[[], float], iters: int, repeat: int
) -> list[float]:
    """Seconds per call of `fn`, `repeat` samples of `iters` calls evaluated together."""
    samples = []
    for _ in range(repeat):
        t0 = clock()
        mx.eval([fn() for _ in range(iters)])
        samples.append((clock() - t0) / iters)
    return samples


def _measure(
    trial: Trial, clock: Callable[[], float], iters: int, repeat: int
) -> tuple[float, float]:
    """Median seconds per call of the kernel and of the mlx ops, timed in turn after a warm-up."""
    mx.eval(trial.run_kernel(), trial.run_mlx())  # builds and allocates
    kernel, mlx = [], []
    for _ in range(repeat):
        mlx += timed(trial.run_mlx, clock, iters, 1)
        kernel += timed(trial.run_kernel, clock, iters, 1)
    return statistics.median(kernel), statistics.median(mlx)


def decide(
    backend: str,
    shapes: Shapes,
    measure: bool = True,
    clock: Callable[[], float] | None = None,
    cache: bool = True,
    fresh: bool = False,
    only: Iterable[Trial] | None = None,
) -> list[Decision]:
    """Check (and with `measure`, time) every trial at `shapes` and record whether its kernel runs.

    Cached decisions for this chip, MLX version, shapes and kernel source are reused unless
    `fresh` (an incorrect kernel stays incorrect until its source changes; a kernel only checked
    is timed when `measure` asks); new ones are saved (`cache`). A trial whose check raises is
    incorrect.
    """
    clock = clock or time.perf_counter
    iters, repeat = (20, 5) if backend == "metal" else (1, 1)
    stored = _read_cache() if cache else {}
    key = _cache_key(backend, shapes)
    entries = stored.setdefault(key, {})
    decisions = []
    for trial in all_trials(backend, shapes) if only is None else list(only):
        source = trial.source_hash()
        entry = entries.get(trial.name)
        if (
            entry
            and not fresh
            and entry.get("source") == source
            and (entry.get("kernel_s") is not None or not measure or not entry["correct"])
        ):
            d = Decision(
                trial.name,
                trial.shape,
                entry["correct"],
                entry.get("kernel_s"),
                entry.get("mlx_s"),
                entry.get("detail", ""),
                cached=True,
            )
        else:
            try:
                ok, detail = trial.check()
            except (
                Exception
            ) as e:  # a kernel that fails to build or run is as wrong as a bad result
                ok, detail = False, f"{type(e).__name__}: {e}"
            kernel_s = mlx_s = None
            if ok and measure:
                kernel_s, mlx_s = _measure(trial, clock, iters, repeat)
            d = Decision(trial.name, trial.shape, ok, kernel_s, mlx_s, detail)
            entries[trial.name] = {
                "correct": ok,
                "kernel_s": kernel_s,
                "mlx_s": mlx_s,
                "detail": detail,
                "source": source,
            }
        if not d.correct and (trial.name, backend) not in _WARNED:
            _WARNED.add((trial.name, backend))
            warnings.warn(
                f"gptoss-mlx: kernel '{trial.name}' ({backend}) failed its check against the MLX "
                f"ops at {trial.shape} ({d.detail}); using the MLX ops for it instead",
                RuntimeWarning,
                stacklevel=2,
            )
        _STATUS[(trial.name, backend)] = d.use(measure)
        decisions.append(d)
    if cache:
        _write_cache(stored)
    return decisions


def policy(choice: str | None) -> str:
    """'measure' when the kernels are chosen automatically, 'check' when forced."""
    raw = choice if choice is not None else (os.environ.get(ENV_VAR) or "auto")
    return "measure" if str(raw).strip().lower() == "auto" else "check"


def use(model: nn.Module, choice: str | None, clock: Callable[[], float] | None = None) -> str:
    """Pin `model`'s attention and expert modules to a backend (None: $GPTOSS_MLX_KERNELS or
    auto) and, where kernels check themselves (Metal), decide now -- outside any compiled graph --
    which kernels run at the model's shapes: measured under auto, checked when forced.
    Returns the backend."""
    backend = resolve(choice)
    for m in kernel_modules(model):
        m.kernel_backend = backend
    if backend in dispatch.SELF_CHECK_BACKENDS:
        decide(backend, model_shapes(model), measure=policy(choice) == "measure", clock=clock)
    return backend


def format_decisions(decisions: list[Decision], backend: str, measured: bool) -> str:
    """A table: each trial's shapes, mlx and kernel time, speed-up and decision."""
    head = ("kernel", "shape", "mlx ms", "kernel ms", "speed-up", "decision")
    rows = []
    for d in decisions:
        ms = lambda s: "-" if s is None else f"{s * 1e3:.3f}"  # noqa: E731
        speed = "-" if not (d.kernel_s and d.mlx_s) else f"{d.mlx_s / d.kernel_s:.2f}x"
        if not d.correct:
            why = f"mlx (kernel incorrect: {d.detail})"
        elif d.use(measured):
            why = "kernel" + ("" if measured else " (forced: checked, not timed)")
        else:
            why = "mlx (kernel slower)"
        rows.append(
            (
                d.name,
                d.shape,
                ms(d.mlx_s),
                ms(d.kernel_s),
                speed,
                why + (" [cached]" if d.cached else ""),
            )
        )
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)] if rows else []
    fmt = lambda r: "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()  # noqa: E731
    lines = [f"kernels on {device_name(backend)} ({backend}), mlx {mx.__version__}, {DTYPE}"]
    if backend == "emulate":
        lines.append("CPU emulator: the times below are the emulator's, not a GPU's")
    lines += [fmt(head), *(fmt(r) for r in rows)]
    lines.append(f"decisions cached in {cache_dir() / DECISIONS_FILE}")
    return "\n".join(lines)
