"""Run ``mx.fast.metal_kernel`` kernels on a CPU: an MSL emulator for Linux tests.

``metal_kernel(...)`` takes the same arguments as ``mx.fast.metal_kernel`` and returns a callable
with the same call signature. Calling it

1. generates the kernel source exactly as MLX 0.32 does (``source.generate``; checked against
   mlx 0.32.4's own output in tests/test_emulator.py) -- header, template line, ``[[kernel]] void
   custom_kernel_<name>...(`` signature, the body as written, the explicit instantiation;
2. lints it for what Metal forbids and g++ would accept (below);
3. compiles it with g++ as C++17 after ``msl.h`` and links an entry point that calls the kernel
   once per thread; builds are cached by a hash of the translation unit, the flags and the headers
   (``$GPTOSS_MLX_EMULATOR_CACHE`` or ``~/.cache/gptoss_mlx/emulator``);
4. runs it with GPU semantics: dispatch by threads (``grid`` counts threads, threadgroups are
   ``min(threadgroup, grid)``, edge threadgroups partial), outputs filled with ``init_value`` first
   (or poisoned with 0xFF bytes -- NaN -- when there is none, like uninitialised GPU memory);
   threads of a threadgroup are cooperative fibers on one OS thread (switched without system calls
   on x86-64), threadgroups spread over the cores; a barrier waits for all live threads of its
   threadgroup; a SIMD (32 lanes) or quad collective completes over the lanes of its simdgroup
   that reach the same call site.

What is NOT Apple's: MLX prepends its JIT prelude (``metal::utils()``: bf16.h, bf16_math.h,
complex.h, defines.h, logging.h, utils.h of MLX's Metal kernels) to the generated source. That
prelude is Metal code g++ cannot compile, so the emulator replaces it with its own C++ equivalent
in ``msl.h`` (``using namespace metal``, ``float16_t``, ``bfloat16_t``, ``elem_to_loc``, MLX's
``Limits<T>`` with its values, the MSL types, functions and constants). The header and body you
write, and the signature MLX generates, are compiled as written, with these rewrites on the same
lines (so errors name your lines):

- a declaration of threadgroup storage (``threadgroup float buf[64];``) becomes per-threadgroup
  storage (``static thread_local``, registered for poisoning);
- a multi-component swizzle (``v.zyx``, ``v.rg``, ``p->xy``) becomes ``v.template swz<2, 1, 0>()``,
  which reads as a vector and, on an lvalue, writes assignments back;
- in guarded mode, ``device T*``, ``constant T*`` and ``threadgroup T*`` (buffer parameters
  included) become pointer classes typed by address space and threadgroup arrays checked arrays.

What it accepts, as Metal does (MSL specification chapter 6; Metal 3.1, ``__METAL_VERSION__``
310): vectors and packed vectors of every scalar type with all swizzles; ``float``/``half``
matrix types (``float4x4``, ``half2x3``, ...); ``1.0h`` literals; the math, geometric, integer,
relational and SIMD functions (``fast::``/``precise::`` included, ``simd_shuffle_and_fill_*``,
``extract_bits``, ``madsat``, ...); ``INFINITY``, ``NAN``, ``FLT_MAX``, ``M_LOG2E_F`` and the other
constants; atomics; ``simdgroup_float8x8`` / ``simdgroup_half8x8`` / ``simdgroup_bfloat8x8`` with
``simdgroup_load``, ``simdgroup_store``, ``simdgroup_multiply(_accumulate)``,
``make_filled_simdgroup_matrix`` and ``thread_elements`` (MLX's lane mapping). A SIMD-group matrix
operation is a collective of the whole simdgroup (all 32 threads, the same arguments: "uniform
control flow", else an error naming the line); its products accumulate in float, one fused
multiply-add per term in order, rounded once to the matrix type (Apple leaves the order
unspecified, so a GPU may differ in the last bits).

What it rejects, as Metal does, naming the line: ``double``, recursion, exceptions,
``new``/``delete``, ``goto``, ``std::``, variable-length arrays, ``static`` locals (other than
``static constant``), functions Metal does not have (``erf``, ``hypot``, ``expf``, ``printf``,
...), threadgroup variables with an initializer or declared in a non-kernel function, and in
guarded mode an address-space mismatch: a device, constant or threadgroup pointer where a thread
pointer (or another space) is expected, including the ``constant`` binding MLX gives inputs of
fewer than 8 elements passed where ``device`` is expected.

Bug finders (keyword options of the kernel call, or environment variables):

- threadgroup memory is poisoned with 0xFF bytes (NaN for float/half/bfloat) at the start of each
  threadgroup (``poison=True``, ``GPTOSS_MLX_EMULATOR_POISON=0`` to turn off); inactive lanes read
  by a shuffle/broadcast give poison too, and so does an unset SIMD-group matrix;
- barrier divergence (live threads waiting at different barriers, a GPU deadlock) is an error
  naming the kernel and both call sites; ``strict_barriers=True`` also rejects a barrier that some
  threads of the threadgroup returned without reaching;
- ``lane_order="forward" | "reverse" | "random"`` (``GPTOSS_MLX_EMULATOR_LANE_ORDER``, ``seed=``):
  the order in which runnable threads are resumed, to expose races between barriers;
- ``guarded=True`` (``GPTOSS_MLX_EMULATOR_GUARDED=1``): every access through a pointer derived
  from a buffer argument or a threadgroup array (indexing, arithmetic, casts) is checked against
  its extent, and address spaces are typed (above); the first out-of-bounds access is an error
  naming the kernel, the buffer, the index and the thread;
- the lint above; at most 1024 threads per threadgroup and 32 KB of threadgroup memory.

What it cannot catch:

- errors only Apple's compiler reports beyond the rules above (other Metal-specific type rules,
  implicit conversions Metal rejects, features g++ accepts as C++), and Metal limits that depend
  on the compiled kernel (register pressure lowering ``maxTotalThreadsPerThreadgroup`` below 1024);
- address-space mistakes outside guarded mode, a raw pointer (``&x[i]``) passed into any address
  space, references (``device T&``) of the wrong space, and a templated helper taking
  ``const device T*`` called with ``&x[i]`` (rejected in guarded mode although Metal accepts it);
- timing: anything that depends on real concurrency between threadgroups or on the relative speed
  of simdgroups; threadgroups run concurrently only across the host's cores, and the threads of a
  threadgroup only interleave at barriers and SIMD collectives (lane order changes that
  interleaving, but a data race inside one such interval is only found through its effect);
  intra-threadgroup spin-waits on atomics never yield and hang;
- fast-math rounding: ``fast::`` and ``precise::`` are the same IEEE functions in float, half math
  is computed in float and rounded, so results can differ from a GPU in the last bits;
- Metal syntax that is not C++ and not rewritten: texture and sampler types, function constants,
  ``[[attributes]]`` on user functions; a struct member named like a swizzle (``.rg``) is taken
  for one;
- any out-of-bounds access when not guarded.

g++ is the only tool it needs (see README.md in this folder).
"""

from __future__ import annotations

import ctypes
import os
import threading
from collections.abc import Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from gptoss_mlx.kernels.emulator import build
from gptoss_mlx.kernels.emulator.errors import (
    KernelCompileError,
    KernelError,
    KernelLintError,
    KernelRuntimeError,
)
from gptoss_mlx.kernels.emulator.source import InputInfo, generate

__all__ = [
    "metal_kernel",
    "EmulatedKernel",
    "KernelError",
    "KernelCompileError",
    "KernelLintError",
    "KernelRuntimeError",
    "full_source",
]

MAX_THREADS_PER_THREADGROUP = 1024
MAX_THREADGROUP_MEMORY = 32 * 1024
_LANE_ORDERS = {"forward": 0, "reverse": 1, "random": 2}

_NP_DTYPES = {
    mx.float32: np.float32,
    mx.float16: np.float16,
    mx.bfloat16: np.uint16,  # bits; numpy has no bfloat16
    mx.bool_: np.bool_,
    mx.int8: np.int8,
    mx.int16: np.int16,
    mx.int32: np.int32,
    mx.int64: np.int64,
    mx.uint8: np.uint8,
    mx.uint16: np.uint16,
    mx.uint32: np.uint32,
    mx.uint64: np.uint64,
}


class _Launch(ctypes.Structure):
    _fields_ = [
        ("bufs", ctypes.POINTER(ctypes.c_void_p)),
        ("lo", ctypes.POINTER(ctypes.c_int64)),
        ("hi", ctypes.POINTER(ctypes.c_int64)),
        ("names", ctypes.POINTER(ctypes.c_char_p)),
        ("grid", ctypes.c_uint32 * 3),
        ("tg", ctypes.c_uint32 * 3),
        ("lane_order", ctypes.c_int32),
        ("poison", ctypes.c_int32),
        ("strict_barriers", ctypes.c_int32),
        ("nworkers", ctypes.c_int32),
        ("seed", ctypes.c_uint64),
        ("max_tg_bytes", ctypes.c_int64),
        ("kernel_name", ctypes.c_char_p),
        ("err", ctypes.c_char_p),
        ("errlen", ctypes.c_int32),
    ]


_run_lock = threading.Lock()  # a compiled library holds one launch at a time


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    return v.lower() not in ("0", "false", "no", "off")


def _as_array(x: Any) -> mx.array:
    if isinstance(x, mx.array):
        return x
    if isinstance(x, (bool, int, float)):
        return mx.array(x)
    return mx.array(x)


def _host_view(x: mx.array, contiguous: bool) -> np.ndarray:
    """The array's elements as numpy (bfloat16 as uint16 bits); strided views keep MLX's strides."""
    if x.dtype not in _NP_DTYPES:
        raise KernelError(f"the emulator does not support dtype {x.dtype} in kernels")
    mx.eval(x)
    if x.dtype == mx.bfloat16:
        if contiguous:
            return np.array(x.view(mx.uint16))
        x = x.view(mx.uint16)
    if contiguous:
        return np.ascontiguousarray(np.array(x, copy=True))
    return np.asarray(memoryview(x))


class EmulatedKernel:
    """What ``metal_kernel`` returns: call it like an MLX kernel."""

    def __init__(
        self, name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs
    ):
        if not output_names:
            raise ValueError("[metal_kernel] Must specify at least one output.")
        self.name = name
        self.input_names = list(input_names)
        self.output_names = list(output_names)
        self.source = source
        self.header = header
        self.ensure_row_contiguous = ensure_row_contiguous
        self.atomic_outputs = atomic_outputs
        self._linted = False

    def generated(self, inputs, output_dtypes, template=None):
        """MLX's generated source (without its prelude) for these inputs."""
        infos = [
            InputInfo(n, a.dtype, a.ndim, a.size)
            for n, a in zip(self.input_names, map(_as_array, inputs), strict=True)
        ]
        return generate(
            self.name,
            self.input_names,
            self.output_names,
            self.source,
            self.header,
            infos,
            list(output_dtypes),
            template,
            self.atomic_outputs,
        )

    def __call__(
        self,
        *,
        inputs: Sequence[Any],
        output_shapes: Sequence[Sequence[int]],
        output_dtypes: Sequence[mx.Dtype],
        grid: tuple[int, int, int],
        threadgroup: tuple[int, int, int],
        template: Sequence[tuple[str, Any]] | None = None,
        init_value: float | None = None,
        verbose: bool = False,
        stream: Any = None,
        lane_order: str | None = None,
        seed: int = 0,
        guarded: bool | None = None,
        poison: bool | None = None,
        strict_barriers: bool | None = None,
        workers: int | None = None,
    ) -> list[mx.array]:
        for what, got, want in (
            ("inputs", len(inputs), len(self.input_names)),
            ("output_shapes", len(output_shapes), len(self.output_names)),
            ("output_dtypes", len(output_dtypes), len(self.output_names)),
        ):
            if got != want:
                raise ValueError(
                    f"[metal_kernel] Expected `{what}` to have size {want} but got size {got}."
                )
        lane_order = lane_order or os.environ.get("GPTOSS_MLX_EMULATOR_LANE_ORDER", "forward")
        if lane_order not in _LANE_ORDERS:
            raise ValueError(
                f"lane_order must be one of {sorted(_LANE_ORDERS)}, not {lane_order!r}"
            )
        guarded = _env_flag("GPTOSS_MLX_EMULATOR_GUARDED", False) if guarded is None else guarded
        poison = _env_flag("GPTOSS_MLX_EMULATOR_POISON", True) if poison is None else poison
        strict = (
            _env_flag("GPTOSS_MLX_EMULATOR_STRICT_BARRIERS", False)
            if strict_barriers is None
            else strict_barriers
        )
        workers = (
            workers or int(os.environ.get("GPTOSS_MLX_EMULATOR_WORKERS", 0)) or os.cpu_count() or 1
        )

        arrays = [_as_array(x) for x in inputs]
        output_dtypes = list(output_dtypes)
        gen = self.generated(arrays, output_dtypes, list(template or []))
        if verbose:
            print(f"Generated source code for `{self.name}`:\n```\n{gen.source}\n```")
        if not self._linted:
            build.lint(self.name, [("header", self.header), ("source", self.source)])
            self._linted = True

        grid = tuple(int(g) for g in grid)
        tg = tuple(int(t) for t in threadgroup)
        if len(grid) != 3 or len(tg) != 3 or min(grid) < 1 or min(tg) < 1:
            raise ValueError(
                f"grid and threadgroup must be three positive sizes, got {grid} and {tg}"
            )
        if tg[0] * tg[1] * tg[2] > MAX_THREADS_PER_THREADGROUP:
            raise KernelRuntimeError(
                f"Thread group size ({tg[0] * tg[1] * tg[2]}) is greater than  the maximum allowed "
                f"threads per threadgroup ({MAX_THREADS_PER_THREADGROUP}) (kernel '{self.name}')."
            )
        tg = tuple(min(t, g) for t, g in zip(tg, grid, strict=True))

        tu = build.translation_unit(gen, self.name, self.header, guarded)
        lib = build.load(self.name, tu)

        # buffers in parameter order
        n_bufs = max((p.index for p in gen.params), default=-1) + 1
        keep: list[np.ndarray] = []
        ptrs = (ctypes.c_void_p * max(n_bufs, 1))()
        lo = (ctypes.c_int64 * max(n_bufs, 1))()
        hi = (ctypes.c_int64 * max(n_bufs, 1))()
        names = (ctypes.c_char_p * max(n_bufs, 1))()
        host_inputs: list[np.ndarray] = []
        for x in arrays:
            host_inputs.append(_host_view(x, self.ensure_row_contiguous or x.ndim == 0))
        outputs = []
        for shape, dt in zip(output_shapes, output_dtypes, strict=True):
            if dt not in _NP_DTYPES:
                raise KernelError(f"the emulator does not support output dtype {dt}")
            o = np.empty(tuple(int(s) for s in shape), dtype=_NP_DTYPES[dt])
            if init_value is not None:
                o[...] = _np_value(init_value, dt)
            else:
                o.view(np.uint8)[...] = 0xFF
            outputs.append(o)

        def put(index: int, arr: np.ndarray, name: str, first: int = 0, last: int | None = None):
            keep.append(arr)
            ptrs[index] = arr.ctypes.data
            lo[index] = first
            hi[index] = arr.size if last is None else last
            names[index] = name.encode()

        for p in gen.params:
            if p.kind == "input":
                h = host_inputs[p.input_index]
                if h.ndim == 0:
                    h = h.reshape(1)
                first, last = _extent(h)
                put(p.index, h, p.name, first, last)
            elif p.kind == "shape":
                put(p.index, np.array(arrays[p.input_index].shape, dtype=np.int32), p.name)
            elif p.kind == "strides":
                h = host_inputs[p.input_index]
                put(p.index, np.array([s // h.itemsize for s in h.strides], dtype=np.int64), p.name)
            elif p.kind == "ndim":
                put(p.index, np.array([arrays[p.input_index].ndim], dtype=np.int32), p.name)
            elif p.kind == "output":
                put(p.index, outputs[p.output_index], p.name)

        err = ctypes.create_string_buffer(4096)
        launch = _Launch()
        launch.bufs = ptrs
        launch.lo = lo
        launch.hi = hi
        launch.names = names
        launch.grid[:] = grid
        launch.tg[:] = tg
        launch.lane_order = _LANE_ORDERS[lane_order]
        launch.poison = int(poison)
        launch.strict_barriers = int(strict)
        launch.nworkers = workers
        launch.seed = seed & 0xFFFFFFFFFFFFFFFF
        launch.max_tg_bytes = MAX_THREADGROUP_MEMORY
        launch.kernel_name = self.name.encode()
        launch.err = ctypes.cast(err, ctypes.c_char_p)
        launch.errlen = len(err)
        with _run_lock:
            rc = lib.msl_launch(ctypes.byref(launch))
        if rc != 0:
            raise KernelRuntimeError(err.value.decode(errors="replace"))
        result = []
        for o, dt in zip(outputs, output_dtypes, strict=True):
            a = mx.array(o)
            if dt == mx.bfloat16:
                a = a.view(mx.bfloat16)
            result.append(a)
        return result


def _extent(h: np.ndarray) -> tuple[int, int]:
    """First and one-past-last element offsets a strided view may touch, relative to element 0."""
    if h.size == 0:
        return 0, 0
    first = last = 0
    for n, s in zip(h.shape, h.strides, strict=True):
        step = s // h.itemsize
        if step < 0:
            first += (n - 1) * step
        else:
            last += (n - 1) * step
    return first, last + 1


def _np_value(v: float, dt: mx.Dtype):
    if dt == mx.bfloat16:
        return np.array(mx.array(v, dtype=mx.bfloat16).view(mx.uint16))
    return np.array(v).astype(_NP_DTYPES[dt])


def metal_kernel(
    name: str,
    input_names: Sequence[str],
    output_names: Sequence[str],
    source: str,
    header: str = "",
    ensure_row_contiguous: bool = True,
    atomic_outputs: bool = False,
) -> EmulatedKernel:
    """Drop-in for ``mx.fast.metal_kernel`` that runs the kernel on the CPU (module docstring)."""
    return EmulatedKernel(
        name, input_names, output_names, source, header, ensure_row_contiguous, atomic_outputs
    )


def full_source(kernel: EmulatedKernel, inputs, output_dtypes, template=None) -> str:
    """The source MLX generates for this call (what ``verbose=True`` prints), without prelude."""
    return kernel.generated([_as_array(x) for x in inputs], list(output_dtypes), template).source
