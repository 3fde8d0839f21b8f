"""What every tool shares: a call as the model wrote it, the error a tool reports to the model,
and the interface of a built-in tool (a namespace declared in the system message).

A tool never sees tokens or the model: it gets a :class:`ToolCall` (recipient and argument text)
and returns the text the model reads back. A :class:`ToolError` (or any exception) raised by a
tool becomes that text, marked as an error, so a failing tool never ends a conversation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from ..harmony import ToolNamespace


@dataclass(frozen=True)
class ToolCall:
    """One call the model made: ``recipient`` as it wrote it after ``to=``.

    ``functions.get_weather`` (a function tool), ``browser.search`` (a built-in tool and its
    function) or ``python`` (a built-in tool without functions). ``arguments`` is the message
    text: JSON for functions and the browser, code for python. ``channel`` is the channel the
    call came on (its result goes back on the same one).
    """

    id: str
    recipient: str
    arguments: str
    channel: str | None = None

    @property
    def namespace(self) -> str:
        """``functions``, ``browser``, ``python``..."""
        return self.recipient.split(".", 1)[0]

    @property
    def function(self) -> str | None:
        """The function within the namespace (``get_weather``, ``search``); None for ``python``."""
        _, dot, rest = self.recipient.partition(".")
        return rest if dot else None

    @property
    def name(self) -> str:
        """The name in OpenAI-shaped messages: the function for function tools
        (``get_weather``), the recipient for built-in tools (``browser.search``, ``python``)."""
        return self.function if self.namespace == "functions" else self.recipient


class ToolError(Exception):
    """A failure to report to the model: the message says what went wrong (and what to do)."""


class BuiltinTool(ABC):
    """A built-in tool: a namespace the system message declares, run by the session.

    Subclasses give ``name`` (the namespace, e.g. ``"browser"``), :meth:`namespace` (the
    declaration, whose description must be true of what :meth:`run` does), :meth:`run` and
    :meth:`fresh`, and may keep state between calls (pages, a Python session): :meth:`reset`
    forgets it, :meth:`close` releases what it holds (processes, files).
    """

    name: str

    @abstractmethod
    def namespace(self) -> ToolNamespace:
        """How the system message declares this tool."""

    @abstractmethod
    def run(self, call: ToolCall) -> str:
        """The text the model reads back; raise :class:`ToolError` for a failure."""

    @abstractmethod
    def fresh(self) -> BuiltinTool:
        """A new instance with this one's configuration and none of its state (a server gives
        each request its own, so that no two clients share pages or a Python process)."""

    def reset(self) -> None:  # noqa: B027 (optional: a tool without state has nothing to do)
        """Forget what earlier calls left (a new conversation)."""

    def close(self) -> None:  # noqa: B027 (optional: a tool that holds nothing)
        """Release processes and files; the tool is not used again."""
