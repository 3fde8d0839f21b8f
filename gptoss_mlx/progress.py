"""Progress bars on stderr for long work (loading, conversion, long prefills)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Protocol

import click


class Progress(Protocol):
    def update(self, n: int) -> None:
        """Count `n` more units done."""


@contextlib.contextmanager
def progress_bar(length: int, label: str, enabled: bool = True) -> Iterator[Progress]:
    """A click progress bar on stderr, or a no-op with the same `update(n)` when disabled."""
    if not enabled:
        yield _Silent()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar


class _Silent:
    def update(self, n: int) -> None:
        pass
