"""Which backend runs the kernels' ops, and the kernel objects.

A backend is one of

- `metal`: the kernel from `metal/*.metal` through `mx.fast.metal_kernel` (needs a Metal GPU);
- `mlx`: the pure-MLX ops of `gptoss_mlx.ops` (the specification);
- `emulate`: the same kernel source run by the CPU emulator (`gptoss_mlx.kernels.emulator`), for
  tests.

The choice comes from `load_model(..., kernels=...)`, else the environment variable
`GPTOSS_MLX_KERNELS=auto|metal|mlx|emulate`, else `auto` (metal where `mx.metal.is_available()`,
mlx elsewhere). Which kernels then run on Metal -- those correct and faster than the mlx ops, or
with a forced `metal` those correct -- is decided in `measured.py`.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable

import mlx.core as mx
import mlx.nn as nn

from ..errors import GptOssError
from . import sources
from .emulator import metal_kernel as emulated_metal_kernel

BACKENDS = ("auto", "metal", "mlx", "emulate")
ENV_VAR = "GPTOSS_MLX_KERNELS"
# Backends whose kernels are checked (and measured) before use. Tests add "emulate" to exercise it.
SELF_CHECK_BACKENDS = {"metal"}


def resolve(choice: str | None = None) -> str:
    """`choice` (or $GPTOSS_MLX_KERNELS, or auto) as one of metal | mlx | emulate."""
    source = "kernels=" if choice is not None else f"${ENV_VAR}="
    raw = choice if choice is not None else (os.environ.get(ENV_VAR) or "auto")
    value = str(raw).strip().lower()
    if value not in BACKENDS:
        raise GptOssError(
            f"unknown kernel backend {source}{raw!r}; choose one of {', '.join(BACKENDS)}"
        )
    if value == "auto":
        return "metal" if mx.metal.is_available() else "mlx"
    if value == "metal" and not mx.metal.is_available():
        raise GptOssError(
            f"{source}metal needs a Metal GPU (Apple Silicon) and none is available; "
            "use auto, mlx, or emulate (the CPU emulator, slow, for tests)"
        )
    return value


class UsesKernels:
    """Marks a module whose ops may run through the kernels (the model's attention and experts).

    `use` pins `kernel_backend` on every such module of a model; while it is None, each call
    resolves $GPTOSS_MLX_KERNELS (else auto) afresh.
    """

    kernel_backend: str | None = None  # a plain attribute, not a parameter

    @property
    def backend(self) -> str:
        """The backend this module's ops run on now."""
        return self.kernel_backend or resolve(None)


def kernel_modules(model: nn.Module) -> list[UsesKernels]:
    """The modules of `model` whose ops go through the kernels."""
    return [m for _, m in model.named_modules() if isinstance(m, UsesKernels)]


def compilable(model: nn.Module) -> bool:
    """Whether the decode step may go through `mx.compile`: not with the emulator, which runs the
    kernels on the host and so needs concrete arrays, not a trace."""
    return all(m.backend != "emulate" for m in kernel_modules(model))


# --- kernel objects ------------------------------------------------------------------------------

_ALL_KERNELS: list[Kernel] = []


class Kernel:
    """One kernel body of a `metal/<family>.metal` file, built per backend on first use."""

    def __init__(
        self,
        family: str,
        name: str,
        input_names: Iterable[str],
        output_names: Iterable[str],
        defines: str = "",
        variant: str = "",
    ):
        self.family, self.name = family, name
        self.input_names, self.output_names = list(input_names), list(output_names)
        self.defines = defines  # preprocessor lines put before the header (a variant of the body)
        self.variant = variant
        self._built: dict[str, Callable[..., list[mx.array]]] = {}
        _ALL_KERNELS.append(self)

    @property
    def kernel_name(self) -> str:
        return self.name + (f"_{self.variant}" if self.variant else "")

    def source(self) -> tuple[str, str]:
        """(header, body) as `metal_kernel` takes them."""
        header, bodies = sources.family(self.family)
        return self.defines + header, bodies[self.name]

    def build(self, backend: str) -> Callable[..., list[mx.array]]:
        """The kernel for `backend` (metal or emulate), built once."""
        if backend not in self._built:
            header, body = self.source()
            if backend == "metal":
                factory = mx.fast.metal_kernel
            elif backend == "emulate":
                factory = emulated_metal_kernel
            else:
                raise ValueError(f"no kernel for backend {backend!r}")
            self._built[backend] = factory(
                name=self.kernel_name,
                input_names=self.input_names,
                output_names=self.output_names,
                source=body,
                header=header,
            )
        return self._built[backend]

    def __call__(self, backend: str, **kwargs: object) -> list[mx.array]:
        return self.build(backend)(**kwargs)

    def reset(self) -> None:
        self._built.clear()

    @staticmethod
    def all() -> list[Kernel]:
        """Every kernel object defined."""
        return list(_ALL_KERNELS)


def relative_error(ours: mx.array, ref: mx.array) -> float:
    """max |ours - ref| / max |ref| in float32."""
    ours, ref = ours.astype(mx.float32), ref.astype(mx.float32)
    return (mx.abs(ours - ref).max() / mx.maximum(mx.abs(ref).max(), 1e-30)).item()
