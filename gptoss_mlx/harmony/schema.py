"""Tool declarations as gpt-oss saw them in training: JSON schemas as TypeScript-like types.

A ``# Tools`` section holds one namespace section per tool namespace. Function tools (OpenAI
shape) go in the developer message as ``## functions`` / ``namespace functions { ... } //
namespace functions``, each function a type ``type NAME = (_: {...}) => any;`` built from its
JSON schema: a ``// description`` line, optional fields marked ``?``, enums as unions of string
literals, ``oneOf`` as one ``| variant`` line each, ``nullable`` as ``| null`` and defaults as
``// default: x`` comments. Built-in tools (browser, python) are declared the same way, in the
system message, as :class:`ToolNamespace` s with a description of their own:
:func:`namespace_section` writes any namespace, :func:`tools_section` the heading over them.

Response formats (structured output) go at the end of the developer message as
``# Response Formats`` / ``## NAME`` / ``// description`` / the JSON schema
(:func:`response_formats_section`); :func:`parse_response_format` reads the OpenAI shapes of a
``response_format`` (Chat Completions) or ``text.format`` (Responses).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptoss_mlx.errors import GptOssError


def _get(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _has(obj: Any, key: str) -> bool:
    return isinstance(obj, dict) and key in obj


def _str(obj: Any, key: str) -> str | None:
    value = _get(obj, key)
    return value if isinstance(value, str) else None


def _compact_json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _is_enum(schema: Any) -> bool:
    values = _get(schema, "enum")
    return isinstance(values, list) and len(values) > 0


def _default_comment(schema: Any, value: Any, *, bare_enum_string: bool) -> str:
    """``default: ...``: strings quoted, except (where the caller asks) a string of an enum."""
    if isinstance(value, str):
        if not _is_enum(schema):
            return f'default: "{value}"'
        if bare_enum_string:
            return f"default: {value}"
    return f"default: {_compact_json(value)}"


def _with_null(schema: Any, type_str: str) -> str:
    if _get(schema, "nullable") is True and "null" not in type_str:
        return f"{type_str} | null"
    return type_str


def _schema_to_ts(schema: Any, indent: str) -> str:
    """One JSON schema as a TypeScript-like type. ``indent`` prefixes comment and field lines."""
    variants = _get(schema, "oneOf")
    if isinstance(variants, list):
        out = []
        for variant in variants:
            out.append(f"\n{indent} | ")
            out.append(_with_null(variant, _schema_to_ts(variant, indent + "   ")))
            notes = []
            if _str(variant, "description") is not None:
                notes.append(_str(variant, "description"))
            if _has(variant, "default"):
                notes.append(_default_comment(variant, variant["default"], bare_enum_string=False))
            if notes:
                out.append(" // " + " ".join(notes))
        return "".join(out)

    kind = _get(schema, "type")
    if isinstance(kind, list):
        names = ["number" if k == "integer" else k for k in kind if isinstance(k, str)]
        if names:
            return " | ".join(names)
        return "any"
    if kind == "object":
        return _object_to_ts(schema, indent)
    if kind == "string":
        values = _get(schema, "enum")
        if isinstance(values, list):
            quoted = [f'"{v}"' for v in values if isinstance(v, str)]
            if quoted:
                return " | ".join(quoted)
        return "string"
    if kind in ("number", "integer"):
        return "number"
    if kind == "boolean":
        return "boolean"
    if kind == "array":
        if _has(schema, "items"):
            return _schema_to_ts(schema["items"], indent) + "[]"
        return "Array<any>"
    return "any"


def _object_to_ts(schema: dict, indent: str) -> str:
    lines = []
    if _str(schema, "description") is not None:
        lines.append(f"{indent}// {schema['description']}\n")
    lines.append("{\n")
    props = _get(schema, "properties")
    if isinstance(props, dict):
        required_list = _get(schema, "required")
        required = (
            {r for r in required_list if isinstance(r, str)}
            if isinstance(required_list, list)
            else set()
        )
        for key, prop in props.items():
            optional = "" if key in required else "?"
            if _str(prop, "title") is not None:
                lines.append(f"{indent}// {prop['title']}\n{indent}//\n")
            if not _has(prop, "oneOf") and _str(prop, "description") is not None:
                lines.append(f"{indent}// {prop['description']}\n")
            examples = _get(prop, "examples")
            if isinstance(examples, list) and examples:
                lines.append(f"{indent}// Examples:\n")
                lines.extend(f'{indent}// - "{ex}"\n' for ex in examples if isinstance(ex, str))
            variants = _get(prop, "oneOf")
            if isinstance(variants, list):
                lines.append(_union_property_to_ts(key, optional, prop, variants, indent))
                continue
            type_str = _with_null(prop, _schema_to_ts(prop, indent + "    "))
            line = f"{indent}{key}{optional}: {type_str},"
            if not _has(prop, "oneOf") and _has(prop, "default"):
                line += " // " + _default_comment(prop, prop["default"], bare_enum_string=True)
            lines.append(line + "\n")
    lines.append(f"{indent}}}")
    return "".join(lines)


def _union_property_to_ts(key: str, optional: str, prop: dict, variants: list, indent: str) -> str:
    """A property whose schema is ``oneOf``: one ``| variant`` line each, comments trailing."""
    lines = []
    prop_desc = _str(prop, "description")
    first_desc = _str(variants[0], "description") if variants else None
    desc_above = prop_desc is not None and prop_desc != first_desc
    if desc_above:
        lines.append(f"{indent}// {prop_desc}\n")
    if _has(prop, "default"):
        lines.append(
            f"{indent}// {_default_comment(prop, prop['default'], bare_enum_string=True)}\n"
        )
    lines.append(f"{indent}{key}{optional}:\n")
    for i, variant in enumerate(variants):
        text = f"{indent} | " + _with_null(variant, _schema_to_ts(variant, indent + "   "))
        notes = []
        desc = _str(variant, "description")
        if not (i == 0 and desc_above) and desc is not None and desc != prop_desc:
            notes.append(desc)
        if _has(variant, "default"):
            notes.append(_default_comment(variant, variant["default"], bare_enum_string=True))
        if notes:
            text += " // " + " ".join(notes)
        lines.append(text + "\n")
    lines.append(f"{indent},\n")
    return "".join(lines)


def _text_lines(text: str) -> list[str]:
    """Lines split on "\\n" (a trailing "\\r" dropped, no final empty line): Rust's str::lines."""
    if not text:
        return []
    parts = text.split("\n")
    if parts[-1] == "":
        parts.pop()
    return [p[:-1] if p.endswith("\r") else p for p in parts]


@dataclass(frozen=True)
class FunctionDeclaration:
    """One OpenAI function tool: its name, description, parameter schema and ``strict`` flag."""

    name: str
    description: str
    parameters: Any  # JSON schema dict, or None for a tool without parameters
    strict: bool = False  # the caller asks for arguments that always follow `parameters`


def function_declarations(tools: Sequence[Mapping]) -> list[FunctionDeclaration]:
    """OpenAI function tools (``{"type": "function", "function": {...}}`` as Chat Completions
    sends them, or the function dict itself, as the Responses API does) as
    :class:`FunctionDeclaration` s; anything else is a :class:`GptOssError`."""
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise GptOssError(f"A tool must be a dict in OpenAI function-tool shape, got {tool!r}")
        if tool.get("type", "function") != "function":
            raise GptOssError(f"Only function tools are supported, got type {tool.get('type')!r}")
        spec = tool.get("function", tool)
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not name:
            raise GptOssError(f"A function tool needs a name: {tool!r}")
        out.append(
            FunctionDeclaration(
                name,
                spec.get("description") or "",
                spec.get("parameters"),
                spec.get("strict") is True,
            )
        )
    return out


@dataclass(frozen=True)
class ToolNamespace:
    """A namespace of tools, as openai-harmony's ``ToolNamespaceConfig``.

    ``functions`` are OpenAI function tools (``{"type": "function", "function": {...}}`` or the
    bare function dict); a namespace without functions (``python``) is declared by its
    ``description`` alone. Built-in tools are namespaces in the system message (``browser``
    with ``search``/``open``/``find``, ``python``); function tools the developer message's
    ``functions`` namespace.
    """

    name: str
    description: str | None = None
    functions: Sequence[Mapping] = ()


def namespace_section(namespace: ToolNamespace) -> str:
    """``## name``, the description, and ``namespace name { ... }`` with one ``type`` per
    function (its description above it as ``//`` lines). With functions, the namespace's
    description is written as ``//`` lines too; without, as plain text and no namespace block."""
    functions = function_declarations(namespace.functions)
    body = [f"## {namespace.name}\n"]
    if namespace.description is not None:
        lines = _text_lines(namespace.description)
        body.extend([f"// {line}" for line in lines] if functions else lines)
    if functions:
        body.append(f"namespace {namespace.name} {{\n")
        for fn in functions:
            body.extend(f"// {line}" for line in _text_lines(fn.description))
            if fn.parameters is None:
                body.append(f"type {fn.name} = () => any;\n")
            else:
                body.append(f"type {fn.name} = (_: {_schema_to_ts(fn.parameters, '')}) => any;\n")
        body.append(f"}} // namespace {namespace.name}")
    return "\n".join(body)


def tools_section(namespaces: Sequence[str]) -> str:
    """The ``# Tools`` section over already-rendered namespace sections (each ``## name ...``),
    one blank line between them: the developer message's function tools and the system message's
    built-in tools alike."""
    return "\n\n".join(["# Tools", *namespaces])


def tools_to_typescript(tools: Sequence[Mapping]) -> str:
    """The developer message's ``# Tools`` section for OpenAI function tools.

    Raises :class:`GptOssError` for a tool that is not a named function tool.
    """
    return tools_section([namespace_section(ToolNamespace("functions", None, tools))])


# The response format types: OpenAI's two, then this project's extensions (a regular expression
# and a Lark grammar in llguidance's syntax, for answers that are not JSON).
RESPONSE_FORMAT_TYPES = ("text", "json_schema", "json_object", "regex", "grammar")


@dataclass(frozen=True)
class ResponseFormat:
    """What the final answer must be, read from a request's ``response_format``.

    ``type`` is ``"json_schema"`` (``schema`` set, ``name`` and ``description`` shown to the model),
    ``"json_object"`` (any JSON object), ``"regex"`` (``pattern``: the whole answer matches it) or
    ``"grammar"`` (``grammar``: a Lark grammar in llguidance's syntax).
    """

    type: str
    name: str = "response"
    description: str = ""
    schema: Mapping | None = None
    pattern: str | None = None
    grammar: str | None = None

    @property
    def is_json(self) -> bool:
        return self.type in ("json_schema", "json_object")


def parse_response_format(fmt: Mapping | None) -> ResponseFormat | None:
    """The :class:`ResponseFormat` of an OpenAI-shaped ``response_format``; None for no format.

    Accepts Chat Completions' ``{"type": "json_schema", "json_schema": {"name", "schema",
    "strict", "description"}}``, the Responses API's flat ``{"type": "json_schema", "name",
    "schema", ...}``, ``{"type": "json_object"}``, ``{"type": "text"}`` (no format), and the
    extensions ``{"type": "regex", "pattern": "..."}`` and ``{"type": "grammar", "grammar":
    "..."}``. A malformed one is a :class:`GptOssError`; whether the schema, pattern or grammar
    compiles is checked where it is compiled (:mod:`gptoss_mlx.constrain`).
    """
    if fmt is None:
        return None
    if not isinstance(fmt, Mapping):
        raise GptOssError(f"response_format must be a dict with a 'type', got {fmt!r}")
    kind = fmt.get("type")
    if kind not in RESPONSE_FORMAT_TYPES:
        raise GptOssError(
            f"response_format type must be one of {', '.join(RESPONSE_FORMAT_TYPES)}, got {kind!r}"
        )
    if kind == "text":
        return None
    if kind == "json_object":
        return ResponseFormat("json_object")
    if kind == "json_schema":
        spec = fmt.get("json_schema", fmt)
        schema = spec.get("schema") if isinstance(spec, Mapping) else None
        if not isinstance(schema, Mapping):
            raise GptOssError(
                "a json_schema response_format needs a JSON schema object: "
                '{"type": "json_schema", "json_schema": {"name": ..., "schema": {...}}}'
            )
        name = spec.get("name") or "response"
        description = spec.get("description") or ""
        if not isinstance(name, str) or not isinstance(description, str):
            raise GptOssError("a json_schema response_format's name and description are text")
        return ResponseFormat("json_schema", name, description, schema=schema)
    field_name = "pattern" if kind == "regex" else "grammar"
    value = fmt.get(field_name)
    if not isinstance(value, str) or not value:
        raise GptOssError(
            f'a {kind} response_format needs its {field_name}: {{"type": "{kind}", '
            f'"{field_name}": "..."}}'
        )
    return ResponseFormat(kind, **{field_name: value})


def response_formats_section(fmt: ResponseFormat) -> str | None:
    """The developer message's ``# Response Formats`` section for a JSON schema format (None for
    the others: they have no schema to show)::

        # Response Formats

        ## NAME

        // DESCRIPTION        (only when there is one)
        {"type":"object",...}
    """
    if fmt.type != "json_schema":
        return None
    lines = [f"// {line}" for line in _text_lines(fmt.description)]
    body = "\n".join([*lines, _compact_json(fmt.schema)])
    return f"# Response Formats\n\n## {fmt.name}\n\n{body}"
