"""Errors the emulator raises: all are GptOssError, so callers can catch one type."""

from gptoss_mlx.errors import GptOssError


class KernelError(GptOssError):
    """A Metal kernel is wrong: it does not compile, breaks a Metal rule, or misbehaves when run."""


class KernelCompileError(KernelError):
    """g++ rejected the kernel. ``line`` is the first failing line of the kernel body (1-based)."""

    line: int | None = None
    compiler_output: str = ""


class KernelLintError(KernelError):
    """The kernel uses something Metal forbids (``double``, recursion, exceptions, ...)."""


class KernelRuntimeError(KernelError):
    """The kernel misbehaved while running: barrier divergence, deadlock, out-of-bounds access,
    too much threadgroup memory, too many threads."""
