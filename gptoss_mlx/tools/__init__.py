"""Tools the model can call, run by a session: function tools from Python callables, and
harmony's built-in ``browser`` and ``python``.

Tools sit beside the sessions and import only downward (harmony, for their declarations): no
model, no generation. Each turns a :class:`ToolCall` into the text the model reads back.

* :mod:`.functions`: JSON schemas from type hints and docstrings, running a call;
* :mod:`.browser`: ``search`` / ``open`` / ``find`` over pages shown as numbered lines, one cursor
  per page view, cited as ``【cursor†Lstart-Lend】``; search through SearXNG or Brave;
* :mod:`.python`: the model's code in a separate, limited (and where possible sandboxed) process.
"""

from __future__ import annotations

from ..errors import GptOssError
from .base import BuiltinTool, ToolCall, ToolError
from .browser import BraveSearch, Browser, SearchBackend, SearxngSearch
from .functions import FunctionTool, function_spec, function_tool
from .python import Python

__all__ = [
    "BraveSearch",
    "Browser",
    "BuiltinTool",
    "FunctionTool",
    "Python",
    "SearchBackend",
    "SearxngSearch",
    "ToolCall",
    "ToolError",
    "builtin_tool",
    "function_spec",
    "function_tool",
]

BUILTIN_TOOLS = {"browser": Browser, "python": Python}


def builtin_tool(tool: str | BuiltinTool) -> BuiltinTool:
    """A built-in tool from its name (default configuration) or a configured instance."""
    if isinstance(tool, BuiltinTool):
        return tool
    if isinstance(tool, str) and tool in BUILTIN_TOOLS:
        return BUILTIN_TOOLS[tool]()
    raise GptOssError(
        f"unknown built-in tool {tool!r}: give 'browser', 'python', or a configured "
        "gptoss_mlx.tools.Browser(...) / Python(...)"
    )
