"""Harmony, the chat format gpt-oss was trained on: messages -> prompt ids, completion ids -> result.

Rendering
---------
:func:`render_prompt` turns OpenAI Chat Completions messages into the token ids of a harmony
prompt ending in ``<|start|>assistant``. It is token-identical to ``openai-harmony``'s
``render_conversation_for_completion`` (v0.0.8) for the equivalent conversation:

* a system message (identity, knowledge cutoff, optional current date, reasoning effort, valid
  channels, and the ``Calls to these tools must go to the commentary channel: 'functions'.`` line
  only when function tools are defined);
* a developer message when there are instructions (all ``system``/``developer`` contents, in
  order, joined by a blank line) or tools (``# Tools`` / ``## functions`` / ``namespace
  functions``, each function a TypeScript-like type rendered from its JSON schema);
* the conversation. An assistant turn becomes an ``analysis`` message (``reasoning``), commentary
  messages to ``functions.NAME`` (``tool_calls``, ``<|constrain|>json``, ending in ``<|call|>``)
  and a ``final`` message (``content``; with tool calls, ``content`` is a commentary preamble).
  A ``tool`` message becomes ``functions.NAME to=assistant`` on ``commentary``.
* Earlier reasoning, as openai-harmony drops it: only when the last assistant message is on the
  ``final`` channel, and then only analysis messages *before the first* final message. During a
  tool-calling loop (last assistant message not final) all reasoning is kept.

Multi-turn chat with a kept KV cache
------------------------------------
Re-rendering the whole conversation each turn is *not* prefix-stable with what the cache holds:

1. the first turn's reasoning is dropped once a final answer exists (see above);
2. the model's tokens for a text are not always the canonical BPE re-encoding of that text;
3. the model writes ``<|channel|>commentary to=functions.X`` while the renderer writes
   ``to=functions.X<|channel|>commentary``;
4. the final answer ends in ``<|return|>`` when sampled but ``<|end|>`` in history.

So a chat loop that wants to prefill only the new tokens keeps the *token* history instead:
``history = chat_history_tokens(prompt, completion)`` (swaps the trailing ``<|return|>`` for
``<|end|>``) then ``next_prompt = history + render_turn(new_messages)``. That prompt is exactly
what openai-harmony renders with ``auto_drop_analysis=False`` (modulo 2 and 3), i.e. the model
keeps seeing its earlier reasoning: slightly more context used and a small departure from the
recommended dropping, in exchange for never re-prefilling. :func:`common_prefix_length` tells how
many cached tokens a freshly rendered prompt can reuse if a caller prefers exact re-rendering.

Parsing
-------
:class:`StreamParser` is fed completion ids (starting right after the prompt's
``<|start|>assistant``) and yields :class:`Delta` events per channel; :func:`parse_completion`
runs the same parser over a whole completion. ``reasoning`` collects analysis text, ``content``
final text and commentary preambles (and anything it cannot place), ``tool_calls`` every message
addressed to a recipient (``to=`` before or after ``<|channel|>``, on any channel, with or
without ``<|constrain|>``). It never raises on malformed output.
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.tokenizer import (
    STOP_TOKENS,
    StreamingDetokenizer,
    Tokenizer,
    default_tokenizer,
)

__all__ = [
    "STOP_TOKENS",
    "DEFAULT_MODEL_IDENTITY",
    "render_prompt",
    "render_turn",
    "chat_history_tokens",
    "common_prefix_length",
    "tools_to_typescript",
    "parse_completion",
    "StreamParser",
    "Delta",
]

DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
REASONING_EFFORTS = ("low", "medium", "high")
_CHANNELS = ("analysis", "commentary", "final")
_CONSTRAIN = "<|constrain|>"
_CHANNEL = "<|channel|>"
# Recipients that address a reader rather than a tool.
_NOT_TOOLS = ("all", "assistant", "user")


# --------------------------------------------------------------------------------------------
# JSON schema -> TypeScript-like types (the format the model saw in training)
# --------------------------------------------------------------------------------------------


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
class _Function:
    name: str
    description: str
    parameters: Any  # JSON schema dict, or None for a tool without parameters


def _normalize_tools(tools: Sequence[Mapping] | None) -> list[_Function]:
    out = []
    for tool in tools or ():
        if not isinstance(tool, Mapping):
            raise GptOssError(f"A tool must be a dict in OpenAI function-tool shape, got {tool!r}")
        if tool.get("type", "function") != "function":
            raise GptOssError(f"Only function tools are supported, got type {tool.get('type')!r}")
        spec = tool.get("function", tool)
        name = spec.get("name") if isinstance(spec, Mapping) else None
        if not isinstance(name, str) or not name:
            raise GptOssError(f"A function tool needs a name: {tool!r}")
        out.append(_Function(name, spec.get("description") or "", spec.get("parameters")))
    return out


def tools_to_typescript(tools: Sequence[Mapping]) -> str:
    """The developer message's ``# Tools`` section for OpenAI function tools."""
    functions = _normalize_tools(tools)
    body = ["## functions\n", "namespace functions {\n"]
    for fn in functions:
        body.extend(f"// {line}" for line in _text_lines(fn.description))
        if fn.parameters is None:
            body.append(f"type {fn.name} = () => any;\n")
        else:
            body.append(f"type {fn.name} = (_: {_schema_to_ts(fn.parameters, '')}) => any;\n")
    body.append("} // namespace functions")
    return "# Tools\n\n" + "\n".join(body)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


@dataclass
class _Msg:
    """One harmony message, before tokenization."""

    author: str  # "system", "user", "assistant", "developer", or a tool name like functions.f
    text: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    is_assistant: bool = False


def _render_msg(tok: Tokenizer, m: _Msg, out: list[int]) -> None:
    # Each piece is encoded on its own: merging across these boundaries would change the tokens.
    out.append(tok.start_id)
    out += tok.encode(m.author)
    if m.recipient is not None and m.recipient != "all":
        out += tok.encode(f" to={m.recipient}")
    if m.channel is not None:
        out.append(tok.channel_id)
        out += tok.encode(m.channel)
    if m.content_type is not None:
        if m.content_type.startswith(_CONSTRAIN):
            out += tok.encode(" ")
            out.append(tok.constrain_id)
            rest = m.content_type[len(_CONSTRAIN) :]
            if rest:
                out += tok.encode(rest)
        else:
            out += tok.encode(f" {m.content_type}")
    out.append(tok.message_id)
    out += tok.encode(m.text)
    out.append(tok.call_id if m.is_assistant and m.recipient is not None else tok.end_id)


def _content_text(content: Any) -> str:
    """Text of an OpenAI ``content``: a string, None, or a list of ``{"type": "text"}`` parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") == "text":
                parts.append(str(part.get("text", "")))
            else:
                raise GptOssError(
                    f"Only text content is supported, got a {part.get('type')!r} part"
                )
        return "".join(parts)
    if isinstance(content, (dict, int, float, bool)):
        return json.dumps(content, ensure_ascii=False)
    raise GptOssError(f"Unsupported message content: {content!r}")


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _function_recipient(name: str) -> str:
    return name if name.startswith("functions.") else f"functions.{name}"


def _conversation_messages(messages: Sequence[Mapping], call_names: dict[str, str]) -> list[_Msg]:
    """user / assistant / tool messages as harmony messages (system and developer skipped).

    ``call_names`` maps tool-call ids to function names; it is filled from assistant tool calls
    as they are seen, so a ``tool`` message can name its function by ``tool_call_id``.
    """
    out: list[_Msg] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise GptOssError(f"Message {i} must be a dict with a 'role': {msg!r}")
        role = msg["role"]
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(_Msg("user", _content_text(msg.get("content"))))
        elif role == "assistant":
            reasoning = next(
                (msg[k] for k in ("reasoning", "reasoning_content", "thinking") if msg.get(k)),
                None,
            )
            text = _content_text(msg.get("content"))
            calls = msg.get("tool_calls") or []
            if reasoning:
                out.append(_Msg("assistant", str(reasoning), "analysis", is_assistant=True))
            if calls:
                if text:  # words said before calling tools: a commentary preamble
                    out.append(_Msg("assistant", text, "commentary", is_assistant=True))
                for call in calls:
                    fn = call.get("function") or {}
                    name = fn.get("name")
                    if not isinstance(name, str) or not name:
                        raise GptOssError(
                            f"Tool call in message {i} has no function name: {call!r}"
                        )
                    if call.get("id"):
                        call_names[str(call["id"])] = name
                    out.append(
                        _Msg(
                            "assistant",
                            _arguments_text(fn.get("arguments")),
                            "commentary",
                            recipient=_function_recipient(name),
                            content_type=_CONSTRAIN + "json",
                            is_assistant=True,
                        )
                    )
            elif text or not reasoning:
                out.append(_Msg("assistant", text, "final", is_assistant=True))
        elif role in ("tool", "function"):
            name = call_names.get(str(msg.get("tool_call_id"))) or msg.get("name")
            if not name:
                raise GptOssError(
                    f"Tool message {i} names no function: give 'name' or the 'tool_call_id' of an "
                    "earlier assistant tool call"
                )
            out.append(
                _Msg(
                    _function_recipient(name),
                    _content_text(msg.get("content")),
                    "commentary",
                    recipient="assistant",
                )
            )
        else:
            raise GptOssError(
                f"Message {i} has unknown role {role!r} "
                "(expected system, developer, user, assistant or tool)"
            )
    return out


def _drop_earlier_analysis(msgs: list[_Msg]) -> list[_Msg]:
    """openai-harmony's auto_drop_analysis: when the last assistant message is a final answer,
    drop analysis messages that come before the first final message."""
    last_assistant = next((m for m in reversed(msgs) if m.is_assistant), None)
    if last_assistant is None or last_assistant.channel != "final":
        return msgs
    first_final = next(i for i, m in enumerate(msgs) if m.channel == "final")
    return [m for i, m in enumerate(msgs) if not (i < first_final and m.channel == "analysis")]


def _system_text(
    *,
    reasoning_effort: str | None,
    current_date: Any,
    knowledge_cutoff: str | None,
    model_identity: str | None,
    has_functions: bool,
) -> str:
    top = []
    if model_identity is not None:
        top.append(model_identity)
    if knowledge_cutoff is not None:
        top.append(f"Knowledge cutoff: {knowledge_cutoff}")
    if current_date is not None:
        if isinstance(current_date, (_dt.date, _dt.datetime)):
            current_date = current_date.strftime("%Y-%m-%d")
        top.append(f"Current date: {current_date}")
    sections = []
    if top:
        sections.append("\n".join(top))
    if reasoning_effort is not None:
        sections.append(f"Reasoning: {reasoning_effort}")
    channels = (
        f"# Valid channels: {', '.join(_CHANNELS)}. Channel must be included for every message."
    )
    if has_functions:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def _check_effort(reasoning_effort: Any) -> str | None:
    if reasoning_effort is None:
        return None
    effort = str(getattr(reasoning_effort, "value", reasoning_effort)).lower()
    if effort not in REASONING_EFFORTS:
        raise GptOssError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}"
        )
    return effort


def render_prompt(
    messages: Sequence[Mapping],
    *,
    tools: Sequence[Mapping] | None = None,
    reasoning_effort: str | None = "medium",
    current_date: str | _dt.date | None = None,
    knowledge_cutoff: str | None = "2024-06",
    tokenizer: Tokenizer | None = None,
    model_identity: str | None = DEFAULT_MODEL_IDENTITY,
    drop_analysis: bool = True,
) -> list[int]:
    """Token ids of the harmony prompt for ``messages`` (OpenAI Chat Completions shape).

    Ends with ``<|start|>assistant``: sample from there and stop on :data:`STOP_TOKENS`.
    ``drop_analysis`` mirrors openai-harmony's ``auto_drop_analysis`` (on by default).
    """
    tok = tokenizer or default_tokenizer()
    effort = _check_effort(reasoning_effort)
    functions = _normalize_tools(tools)
    instructions = [
        _content_text(m.get("content"))
        for m in messages
        if isinstance(m, Mapping) and m.get("role") in ("system", "developer")
    ]
    msgs = [
        _Msg(
            "system",
            _system_text(
                reasoning_effort=effort,
                current_date=current_date,
                knowledge_cutoff=knowledge_cutoff,
                model_identity=model_identity,
                has_functions=bool(functions),
            ),
        )
    ]
    if instructions or functions:
        sections = []
        if instructions:
            sections += ["# Instructions", "\n\n".join(instructions)]
        if functions:
            sections.append(tools_to_typescript(tools))
        msgs.append(_Msg("developer", "\n\n".join(sections)))
    msgs += _conversation_messages(messages, {})
    if drop_analysis:
        msgs = _drop_earlier_analysis(msgs)
    out: list[int] = []
    for m in msgs:
        _render_msg(tok, m, out)
    out.append(tok.start_id)
    out += tok.encode("assistant")
    return out


def render_turn(
    messages: Sequence[Mapping],
    *,
    history: Sequence[Mapping] = (),
    tokenizer: Tokenizer | None = None,
) -> list[int]:
    """Token ids to append to a chat's token history for a new turn, ending ``<|start|>assistant``.

    ``messages`` are the new user / tool (or assistant) messages; ``history`` the earlier ones,
    used only to resolve a tool message's ``tool_call_id`` to its function name. System and
    developer messages belong to the first prompt and are ignored here.
    """
    tok = tokenizer or default_tokenizer()
    call_names: dict[str, str] = {}
    _conversation_messages(history, call_names)
    out: list[int] = []
    for m in _conversation_messages(messages, call_names):
        _render_msg(tok, m, out)
    out.append(tok.start_id)
    out += tok.encode("assistant")
    return out


def chat_history_tokens(
    prompt: Sequence[int], completion: Sequence[int], tokenizer: Tokenizer | None = None
) -> list[int]:
    """The token history after a turn: ``prompt + completion`` as it belongs in a conversation.

    A trailing ``<|return|>`` becomes ``<|end|>`` (harmony stores finished answers that way);
    ``<|call|>`` stays (a tool call message ends in it); a completion cut off without a stop
    token gets ``<|end|>`` so the next message starts cleanly.
    """
    tok = tokenizer or default_tokenizer()
    out = list(prompt) + list(completion)
    if completion and completion[-1] == tok.return_id:
        out[-1] = tok.end_id
    elif completion and completion[-1] not in (tok.end_id, tok.call_id):
        out.append(tok.end_id)
    return out


def common_prefix_length(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share (how much of a KV cache can be reused)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


# --------------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------------


@dataclass
class Delta:
    """A piece of parsed output.

    ``kind`` is where it goes: ``"reasoning"``, ``"content"`` or ``"tool_call"``. ``channel`` is
    the harmony channel of its message (None when the model wrote none). Tool calls: the event
    that opens one has ``text == ""`` and ``tool_call`` = ``{"index", "id", "name"}``; the
    events after it carry pieces of the arguments with the same ``tool_call_index``.
    """

    kind: str
    text: str
    channel: str | None = None
    recipient: str | None = None
    tool_call_index: int | None = None
    tool_call: dict | None = None


@dataclass
class _Header:
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    author: str | None = None
    leftover: list[str] = field(default_factory=list)


def _parse_header(text: str, role_known: bool) -> _Header:
    """Parse a message header such as ``assistant to=functions.f<|channel|>commentary <|constrain|>json``.

    Tolerant: ``to=`` may come before or after the channel, the constrain marker may be missing
    (``json``), and words it cannot place are returned in ``leftover``.
    """
    h = _Header()
    at = text.find(_CHANNEL)
    if at >= 0:
        after = text[at + len(_CHANNEL) :]
        end = 0
        while end < len(after) and not after[end].isspace() and after[end] != "<":
            end += 1
        h.channel = after[:end] or None
        text = text[:at] + " " + after[end:]
    words = text.replace(_CONSTRAIN, " " + _CONSTRAIN).split()
    if words and not role_known and not words[0].startswith(("to=", "<|")):
        h.author = words.pop(0)
    elif words and words[0] == "assistant":
        h.author = words.pop(0)
    for word in words:
        if word.startswith("to=") and len(word) > 3 and h.recipient is None:
            h.recipient = word[3:]
        elif word.startswith(_CONSTRAIN) and h.content_type is None:
            h.content_type = word
        elif word.startswith("functions.") and h.recipient is None:
            h.recipient = word
        elif h.content_type is None and not word.startswith("<|"):
            h.content_type = word
        else:
            h.leftover.append(word)
    return h


_SEPARATOR = "\n\n"  # between two messages' texts in the same field (e.g. two analysis messages)
_MAX_HEADER_TOKENS = 64  # a header this long is not a header: treat it as text


class StreamParser:
    """Incremental harmony parser over an assistant completion.

    ``feed(token)`` (or a list of tokens) returns the :class:`Delta` events those tokens
    completed; ``finish()`` flushes at the end; ``result()`` gives the same dict as
    :func:`parse_completion`, and always equals the concatenation of the deltas, however the
    tokens were split into ``feed`` calls. Never raises on malformed or unknown tokens.
    """

    def __init__(self, tokenizer: Tokenizer | None = None, *, after_start: bool = True):
        """``after_start``: the stream begins right after ``<|start|>assistant`` (the prompt's end)."""
        self.tok = tokenizer or default_tokenizer()
        self._state = "header" if after_start else "idle"
        self._role_known = after_start
        self._header: list[int] = []
        self._detok = StreamingDetokenizer(self.tok)
        self._kind: str | None = None
        self._channel: str | None = None
        self._recipient: str | None = None
        self._call_index: int | None = None
        self._started_text = False
        self._reasoning: list[str] = []
        self._content: list[str] = []
        self._calls: list[dict] = []
        self.stop_token: int | None = None

    # -- public ------------------------------------------------------------------------------

    @property
    def channel(self) -> str | None:
        """Channel of the message being read (None between messages or when not given)."""
        return self._channel if self._state == "content" else None

    @property
    def in_header(self) -> bool:
        return self._state == "header"

    def feed(self, tokens: int | Iterable[int]) -> list[Delta]:
        try:
            tokens = iter(tokens)
        except TypeError:  # a single id (int, numpy or MLX scalar)
            tokens = iter((tokens,))
        events: list[Delta] = []
        for token in tokens:
            try:
                token = int(token)
            except (TypeError, ValueError):
                continue
            self._step(token, events)
        return events

    def finish(self) -> list[Delta]:
        """End of the stream: close the open message (or header) and flush buffered text."""
        events: list[Delta] = []
        if self._state == "header":
            self._header_failed(events, keep_going=False)
        elif self._state == "content":
            self._close_message(events)
        self._state = "idle"
        return events

    def result(self) -> dict:
        return {
            "reasoning": "".join(self._reasoning),
            "content": "".join(self._content),
            "tool_calls": [
                {
                    "id": c["id"],
                    "type": "function",
                    "function": {"name": c["name"], "arguments": "".join(c["arguments"])},
                }
                for c in self._calls
            ],
        }

    # -- state machine ---------------------------------------------------------------------

    def _step(self, token: int, events: list[Delta]) -> None:
        tok = self.tok
        special = tok.is_special(token)
        if self._state == "header":
            if token == tok.message_id:
                self._open_message(events)
            elif token == tok.start_id:
                if self._header:
                    self._header_failed(events, keep_going=False)
                self._begin_header(role_known=False)
            elif token in (tok.end_id, tok.return_id, tok.call_id, tok.endoftext_id):
                self._header_failed(events, keep_going=False)
                self._end(token)
            elif token in (tok.channel_id, tok.constrain_id) or not special:
                self._header.append(token)
                if len(self._header) > _MAX_HEADER_TOKENS:
                    self._header_failed(events, keep_going=True)
            # other special tokens (reserved, <|startoftext|>) carry nothing: skip them
        elif self._state == "content":
            if token in (tok.end_id, tok.return_id, tok.call_id, tok.endoftext_id):
                self._close_message(events)
                self._end(token)
            elif token == tok.start_id:
                self._close_message(events)
                self._begin_header(role_known=False)
            elif token == tok.channel_id:  # a new header without <|end|><|start|>assistant
                self._close_message(events)
                self._begin_header(role_known=True)
                self._header.append(token)
            elif not special:
                self._text(self._detok.add(token), events)
        else:  # idle: between messages
            if token == tok.start_id:
                self._begin_header(role_known=False)
            elif token == tok.channel_id:  # the model left out <|start|>assistant
                self._begin_header(role_known=True)
                self._header.append(token)
            elif not special and self._valid(token) and not self._blank(token):
                # text outside any message (whitespace between messages is skipped)
                self._set_target("content", None, None)
                self._state = "content"
                self._text(self._detok.add(token), events)

    def _valid(self, token: int) -> bool:
        try:
            self.tok.token_bytes(token)
            return True
        except (KeyError, ValueError, OverflowError):
            return False

    def _blank(self, token: int) -> bool:
        return not self.tok.token_bytes(token).strip()

    def _end(self, token: int) -> None:
        self._state = "idle"
        if token in STOP_TOKENS:
            self.stop_token = token

    def _begin_header(self, role_known: bool) -> None:
        self._state = "header"
        self._role_known = role_known
        self._header = []

    def _header_text(self) -> str:
        return self.tok.decode(t for t in self._header if self._valid(t))

    def _open_message(self, events: list[Delta]) -> None:
        h = _parse_header(self._header_text(), self._role_known)
        self._header = []
        self._state = "content"
        recipient = h.recipient
        if recipient is not None and recipient not in _NOT_TOOLS:
            name = (
                recipient[len("functions.") :] if recipient.startswith("functions.") else recipient
            )
            index = len(self._calls)
            call = {"index": index, "id": f"call_{index}", "name": name}
            self._calls.append({**call, "arguments": []})
            self._set_target("tool_call", h.channel, recipient, index)
            events.append(Delta("tool_call", "", h.channel, recipient, index, call))
        elif h.channel == "analysis":
            self._set_target("reasoning", h.channel, recipient)
        else:
            self._set_target("content", h.channel, recipient)
        if h.leftover:  # header words it could not place: keep them as text
            self._text(" ".join(h.leftover) + " ", events)

    def _header_failed(self, events: list[Delta], *, keep_going: bool) -> None:
        """A header that never reached <|message|>: its words go to content.

        ``keep_going``: the tokens that follow are this message's text (header too long)."""
        if not self._header:
            self._state = "idle"
            return
        h = _parse_header(self._header_text(), self._role_known)
        self._header = []
        self._set_target("content", h.channel, h.recipient)
        self._state = "content"
        words = ([h.content_type] if h.content_type else []) + h.leftover
        if words:
            self._text(" ".join(words), events)
        if not keep_going:
            self._close_message(events)
            self._state = "idle"

    def _set_target(
        self, kind: str, channel: str | None, recipient: str | None, index: int | None = None
    ) -> None:
        self._kind, self._channel, self._recipient, self._call_index = (
            kind,
            channel,
            recipient,
            index,
        )
        self._started_text = False

    def _text(self, text: str, events: list[Delta]) -> None:
        if not text:
            return
        if self._kind == "tool_call":
            self._calls[self._call_index]["arguments"].append(text)
        else:
            field_parts = self._reasoning if self._kind == "reasoning" else self._content
            if not self._started_text and field_parts:
                text = _SEPARATOR + text
            field_parts.append(text)
        self._started_text = True
        events.append(Delta(self._kind, text, self._channel, self._recipient, self._call_index))

    def _close_message(self, events: list[Delta]) -> None:
        self._text(self._detok.finalize(), events)
        self._state = "idle"


def parse_completion(tokens: Iterable[int], tokenizer: Tokenizer | None = None) -> dict:
    """Parse a finished assistant completion (the ids after the prompt's ``<|start|>assistant``).

    Returns ``{"reasoning": str, "content": str, "tool_calls": [OpenAI tool calls]}`` with each
    tool call's ``arguments`` exactly the text the model wrote and ids ``call_0``, ``call_1``...
    The stop token may be included or stripped. Never raises on malformed output.
    """
    parser = StreamParser(tokenizer)
    parser.feed(tokens)
    parser.finish()
    return parser.result()
