"""Function tools from Python callables: the JSON schema the model sees, and running a call.

``function_tool(fn)`` reads ``fn``'s signature and docstring: each parameter's type hint becomes
its JSON schema (``str`` string, ``int`` integer, ``float`` number, ``bool`` boolean,
``list[X]`` array of X, ``dict`` object, ``Literal[...]`` and ``Enum`` subclasses enums,
``X | None`` nullable, no hint: any), a default makes it optional (and is shown), the docstring's
first paragraph is the function's description and its ``Args:`` (Google style) or
``:param name:`` (Sphinx style) lines describe the parameters. ``FunctionTool(spec, fn)`` pairs
an OpenAI function tool dict written by hand with the callable that runs it.
"""

from __future__ import annotations

import enum
import inspect
import json
import re
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import GptOssError
from .base import ToolCall, ToolError

_SIMPLE = {str: "string", int: "integer", float: "number", bool: "boolean"}


def _schema(hint: Any) -> dict:
    """The JSON schema of a type hint (``{}``, any value, for what it cannot describe)."""
    if hint is inspect.Parameter.empty or hint is Any:
        return {}
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint in _SIMPLE:
        return {"type": _SIMPLE[hint]}
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        return _enum_schema([m.value for m in hint])
    if origin is typing.Literal:
        return _enum_schema(list(args))
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        inner = _schema(rest[0]) if len(rest) == 1 else {"anyOf": [_schema(a) for a in rest]}
        if len(rest) < len(args):  # Optional: null allowed too
            if isinstance(inner.get("type"), str):
                return {**inner, "type": [inner["type"], "null"]}
            return {"anyOf": [inner, {"type": "null"}]}
        return inner
    if hint in (list, tuple, set, frozenset) or origin in (list, tuple, set, frozenset):
        items = [a for a in args if a is not Ellipsis]
        return {"type": "array", **({"items": _schema(items[0])} if len(items) == 1 else {})}
    if hint is dict or origin is dict:
        return {"type": "object"}
    return {}


def _enum_schema(values: list) -> dict:
    kinds = {type(v) for v in values}
    if kinds == {str}:
        return {"type": "string", "enum": values}
    if len(kinds) == 1 and next(iter(kinds)) in _SIMPLE:
        return {"type": _SIMPLE[next(iter(kinds))], "enum": values}
    return {"enum": values}


_SECTION = re.compile(
    r"^\s*(Args|Arguments|Parameters|Returns?|Raises|Yields|Examples?|Notes?):\s*$"
)
_GOOGLE_ARG = re.compile(r"^\s*\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")
_SPHINX_ARG = re.compile(r"^\s*:param\s+(?:[^:]*\s)?(\w+)\s*:\s*(.*)$")


def _docstring(fn: Callable) -> tuple[str, dict[str, str]]:
    """(description, {parameter: description}) from ``fn``'s docstring."""
    doc = inspect.getdoc(fn) or ""
    summary, params, section, current = [], {}, None, None
    for line in doc.splitlines():
        sphinx = _SPHINX_ARG.match(line)
        heading = _SECTION.match(line)
        if sphinx:
            section, current = "sphinx", sphinx.group(1)
            params[current] = sphinx.group(2).strip()
        elif heading:
            section, current = heading.group(1).lower(), None
        elif section in ("args", "arguments", "parameters") and _GOOGLE_ARG.match(line):
            match = _GOOGLE_ARG.match(line)
            current = match.group(1)
            params[current] = match.group(2).strip()
        elif section is not None and current is not None and line.strip():
            params[current] = (params[current] + " " + line.strip()).strip()
        elif section is None:
            summary.append(line)
        elif not line.strip():
            current = None
    description = "\n".join(summary).strip().split("\n\n")[0].strip()
    return description, params


def function_spec(fn: Callable, name: str | None = None) -> dict:
    """The OpenAI function tool (``{"type": "function", "function": {...}}``) for ``fn``."""
    try:
        signature = inspect.signature(fn)
        hints = typing.get_type_hints(fn)
    except (TypeError, ValueError, NameError) as e:
        raise GptOssError(f"cannot read the signature of tool {fn!r}: {e}") from None
    description, docs = _docstring(fn)
    properties, required = {}, []
    for param in signature.parameters.values():
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        if param.kind is param.POSITIONAL_ONLY:
            raise GptOssError(
                f"tool {fn.__name__}: parameter {param.name!r} is positional-only; the model "
                "passes arguments by name"
            )
        schema = _schema(hints.get(param.name, param.annotation))
        if param.name in docs:
            schema["description"] = docs[param.name]
        if param.default is param.empty:
            required.append(param.name)
        elif _is_json(param.default):
            schema["default"] = param.default
        properties[param.name] = schema
    parameters = {"type": "object", "properties": properties}
    if required:
        parameters["required"] = required
    spec = {"name": name or fn.__name__, "description": description, "parameters": parameters}
    return {"type": "function", "function": spec}


def _is_json(value: Any) -> bool:
    try:
        json.dumps(value)
        return True
    except (TypeError, ValueError):
        return False


@dataclass(frozen=True)
class FunctionTool:
    """A function tool: its OpenAI declaration and the callable that runs it (None: declared
    only, a call to it ends the turn for the caller to answer)."""

    spec: Mapping
    fn: Callable | None = None

    @property
    def name(self) -> str:
        return self.spec.get("function", self.spec)["name"]

    def run(self, call: ToolCall) -> str:
        """Call ``fn`` with the call's JSON arguments; its result as text (a string as is,
        anything else as JSON)."""
        try:
            arguments = json.loads(call.arguments) if call.arguments.strip() else {}
        except json.JSONDecodeError as e:
            raise ToolError(f"the arguments are not valid JSON ({e}): {call.arguments!r}") from None
        if not isinstance(arguments, dict):
            raise ToolError(f"the arguments must be a JSON object, got {call.arguments!r}")
        result = self.fn(**arguments)
        if isinstance(result, str):
            return result
        return json.dumps(result, ensure_ascii=False, default=str)


def function_tool(tool: Callable | Mapping | tuple | FunctionTool) -> FunctionTool:
    """A :class:`FunctionTool` from what ``ChatSession(tools=[...])`` accepts: a callable (its
    schema derived), a ``(spec, callable)`` pair (an OpenAI function tool dict written by hand),
    or a bare spec dict (declared only: the session does not run it)."""
    if isinstance(tool, FunctionTool):
        return tool
    if isinstance(tool, tuple):
        if len(tool) != 2 or not isinstance(tool[0], Mapping) or not callable(tool[1]):
            raise GptOssError(
                f"a tool pair must be (OpenAI function tool dict, callable), got {tool!r}"
            )
        spec, fn = tool
    elif isinstance(tool, Mapping):
        spec, fn = tool, None
    elif callable(tool):
        spec, fn = function_spec(tool), tool
    else:
        raise GptOssError(
            f"a tool must be a callable, a (dict, callable) pair or an OpenAI function tool "
            f"dict, got {tool!r}"
        )
    inner = spec.get("function", spec) if isinstance(spec, Mapping) else None
    if spec.get("type", "function") != "function" or not isinstance(inner, Mapping):
        raise GptOssError(f"only function tools are supported, got {dict(spec)!r}")
    if not isinstance(inner.get("name"), str) or not re.fullmatch(r"[A-Za-z0-9_-]+", inner["name"]):
        raise GptOssError(
            f"a function tool needs a name of letters, digits, _ and -: {dict(spec)!r}"
        )
    return FunctionTool(spec, fn)
