"""Progress bars on stderr for long work (loading, conversion, long prefills)."""

from __future__ import annotations

import contextlib
import sys

import click


@contextlib.contextmanager
def progress_bar(length: int, label: str, enabled: bool = True):
    """A click progress bar on stderr, or a no-op with the same `update(n)` when disabled."""
    if not enabled:
        yield _Silent()
        return
    with click.progressbar(length=length, label=label, file=sys.stderr, show_pos=True) as bar:
        yield bar


class _Silent:
    def update(self, n: int) -> None:
        pass
