"""Rendering: OpenAI Chat Completions messages -> the token ids of a harmony prompt.

:func:`render_prompt` turns messages into a prompt ending in ``<|start|>assistant``. It is
token-identical to ``openai-harmony``'s ``render_conversation_for_completion`` (v0.0.8) for the
equivalent conversation:

* a system message (identity, knowledge cutoff, optional current date, reasoning effort, valid
  channels, and the ``Calls to these tools must go to the commentary channel: 'functions'.`` line
  only when function tools are defined);
* a developer message when there are instructions (all ``system``/``developer`` contents, in
  order, joined by a blank line) or tools (the ``# Tools`` section of :mod:`.schema`);
* the conversation. An assistant turn becomes an ``analysis`` message (``reasoning``), commentary
  messages to ``functions.NAME`` (``tool_calls``, ``<|constrain|>json``, ending in ``<|call|>``)
  and a ``final`` message (``content``; with tool calls, ``content`` is a commentary preamble).
  A ``tool`` message becomes ``functions.NAME to=assistant`` on ``commentary``.
* Earlier reasoning, as openai-harmony drops it: only when the last assistant message is on the
  ``final`` channel, and then only analysis messages *before the first* final message. During a
  tool-calling loop (last assistant message not final) all reasoning is kept.
* An assistant message that carries ``completion_token_ids`` (the ids the model generated for
  that turn, after the prompt's ``<|start|>assistant``) renders as those ids, message by message
  (``<|return|>`` stored as ``<|end|>``), instead of from its text: the model then sees its turn
  exactly as it wrote it (reasoning included, even when a client did not send it back), and a
  prompt cache holding that turn stays a prefix of the next prompt. The rule for earlier
  reasoning applies to its messages as to rendered ones. A server sets it only on turns it
  generated and a client sent back unchanged.

Built-in tools (browser, python) are declared in the *system* message's own ``# Tools`` section,
between the reasoning effort and the valid channels, one :class:`ToolNamespace` each, in name
order (openai-harmony keeps them in a sorted map). The model calls them on the ``analysis``
channel (``to=browser.search``, ``to=python``) and their results come back on the call's channel
from an author named after the tool: ``<|start|>browser.search to=assistant<|channel|>analysis``.
In OpenAI-shaped messages a built-in call is a tool call whose name is the namespace (``python``)
or ``namespace.function`` (``browser.search``) of a declared built-in tool (``builtin_tools=``).

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
"""

from __future__ import annotations

import datetime as _dt
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.harmony.format import CHANNELS, CONSTRAIN
from gptoss_mlx.harmony.parse import _parse_header
from gptoss_mlx.harmony.schema import (
    ToolNamespace,
    namespace_section,
    parse_response_format,
    response_formats_section,
    tools_section,
    tools_to_typescript,
)
from gptoss_mlx.tokenizer import Tokenizer, default_tokenizer

# The system message's first line unless a caller gives its own (openai-harmony's default too).
DEFAULT_MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
# What the system message's ``Reasoning:`` line may say.
REASONING_EFFORTS = ("low", "medium", "high")


@dataclass
class _Msg:
    """One harmony message, before tokenization."""

    author: str  # "system", "user", "assistant", "developer", or a tool name like functions.f
    text: str
    channel: str | None = None
    recipient: str | None = None
    content_type: str | None = None
    is_assistant: bool = False
    tokens: list[int] | None = None  # the exact ids of the whole message, when the model wrote it


def _render_msg(tok: Tokenizer, m: _Msg, out: list[int]) -> None:
    if m.tokens is not None:
        out += m.tokens
        return
    # Each piece is encoded on its own: merging across these boundaries would change the tokens.
    out.append(tok.start_id)
    out += tok.encode(m.author)
    if m.recipient is not None and m.recipient != "all":
        out += tok.encode(f" to={m.recipient}")
    if m.channel is not None:
        out.append(tok.channel_id)
        out += tok.encode(m.channel)
    if m.content_type is not None:
        if m.content_type.startswith(CONSTRAIN):
            out += tok.encode(" ")
            out.append(tok.constrain_id)
            rest = m.content_type[len(CONSTRAIN) :]
            if rest:
                out += tok.encode(rest)
        else:
            out += tok.encode(f" {m.content_type}")
    out.append(tok.message_id)
    out += tok.encode(m.text)
    out.append(tok.call_id if m.is_assistant and m.recipient is not None else tok.end_id)


# Content part types that hold text: Chat Completions' and the Responses API's.
TEXT_PARTS = ("text", "input_text", "output_text")


def content_text(content: Any) -> str:
    """Text of an OpenAI ``content``: a string, None, or a list of text parts (``text``,
    ``input_text``, ``output_text``); any other part (an image, audio, a file) is an error."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, str):
                parts.append(part)
            elif isinstance(part, Mapping) and part.get("type", "text") in TEXT_PARTS:
                parts.append(str(part.get("text", "")))
            else:
                kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
                raise GptOssError(
                    f"gpt-oss reads text only: a content part of type {kind!r} cannot be given "
                    "to it (send text parts or a string)"
                )
        return "".join(parts)
    if isinstance(content, (dict, int, float, bool)):
        return json.dumps(content, ensure_ascii=False)
    raise GptOssError(f"Unsupported message content: {content!r}")


# Where clients put an assistant turn's earlier reasoning (the first one given is used).
REASONING_FIELDS = ("reasoning", "reasoning_content", "thinking")


def reasoning_text(message: Mapping) -> str:
    """The reasoning an OpenAI-shaped assistant message carries ("" when none)."""
    return str(next((message[k] for k in REASONING_FIELDS if message.get(k)), ""))


def _arguments_text(arguments: Any) -> str:
    if arguments is None:
        return "{}"
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False)


def _function_recipient(name: str) -> str:
    return name if name.startswith("functions.") else f"functions.{name}"


def _generated_messages(tok: Tokenizer, completion: Sequence[int]) -> list[_Msg]:
    """A generated completion as the harmony messages it holds, each kept as the exact ids the
    model wrote (from its ``<|start|>`` to its end token; see :func:`chat_history_tokens`)."""
    ids = chat_history_tokens([tok.start_id, *tok.encode("assistant")], completion, tok)
    starts = [i for i, t in enumerate(ids) if t == tok.start_id]
    out = []
    for start, end in zip(starts, starts[1:] + [len(ids)], strict=True):
        span = ids[start:end]
        header = span[1 : span.index(tok.message_id)] if tok.message_id in span else span[1:]
        h = _parse_header(tok.decode(header), role_known=False)
        out.append(
            _Msg("assistant", "", h.channel, h.recipient, is_assistant=True, tokens=list(span))
        )
    return out


def is_builtin_call(name: str, builtin: Sequence[str]) -> bool:
    """Whether a tool call named ``name`` (``python``, ``browser.search``, ``get_weather``) goes
    to one of the built-in tool namespaces ``builtin`` rather than to ``functions``."""
    return not name.startswith("functions.") and name.split(".", 1)[0] in builtin


def _conversation_messages(
    messages: Sequence[Mapping],
    call_names: dict[str, str],
    tok: Tokenizer,
    builtin: Sequence[str] = (),
) -> list[_Msg]:
    """user / assistant / tool messages as harmony messages (system and developer skipped).

    ``call_names`` maps tool-call ids to function names; it is filled from assistant tool calls
    as they are seen, so a ``tool`` message can name its function by ``tool_call_id``. ``tok``
    splits a generated turn (``completion_token_ids``) into its messages. ``builtin``: the names
    of the built-in tool namespaces, whose calls go on ``analysis`` as ``code`` and whose results
    come from the tool itself (``python``, not ``functions.python``).
    A tool message may give its ``channel`` (the call's); by default ``commentary`` for
    functions, ``analysis`` for built-in tools.
    """
    out: list[_Msg] = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping) or "role" not in msg:
            raise GptOssError(f"Message {i} must be a dict with a 'role': {msg!r}")
        role = msg["role"]
        if role in ("system", "developer"):
            continue
        if role == "user":
            out.append(_Msg("user", content_text(msg.get("content"))))
        elif role == "assistant":
            reasoning = reasoning_text(msg)
            text = content_text(msg.get("content"))
            calls = msg.get("tool_calls") or []
            generated = msg.get("completion_token_ids")
            if generated is not None:
                for call in calls:
                    name = (call.get("function") or {}).get("name")
                    if call.get("id") and isinstance(name, str):
                        call_names[str(call["id"])] = name
                out += _generated_messages(tok, generated)
                continue
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
                    builtin_call = is_builtin_call(name, builtin)
                    out.append(
                        _Msg(
                            "assistant",
                            _arguments_text(fn.get("arguments")),
                            "analysis" if builtin_call else "commentary",
                            recipient=name if builtin_call else _function_recipient(name),
                            content_type="code" if builtin_call else CONSTRAIN + "json",
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
            builtin_call = is_builtin_call(name, builtin)
            out.append(
                _Msg(
                    name if builtin_call else _function_recipient(name),
                    content_text(msg.get("content")),
                    msg.get("channel") or ("analysis" if builtin_call else "commentary"),
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
    current_date: str | _dt.date | None,
    knowledge_cutoff: str | None,
    model_identity: str | None,
    has_functions: bool,
    builtin_tools: Sequence[ToolNamespace] = (),
) -> str:
    """The system message's text, its sections joined by a blank line.

    ``builtin_tools``: the built-in tool namespaces (browser, python) of the system message's
    ``# Tools`` section, written in name order; none by default.
    """
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
    if builtin_tools:
        ordered = sorted(builtin_tools, key=lambda ns: ns.name)
        sections.append(tools_section([namespace_section(ns) for ns in ordered]))
    channels = (
        f"# Valid channels: {', '.join(CHANNELS)}. Channel must be included for every message."
    )
    if has_functions:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    sections.append(channels)
    return "\n\n".join(sections)


def check_reasoning_effort(reasoning_effort: object) -> str | None:
    """The reasoning effort as the system message writes it (``Reasoning: low``).

    Accepts one of :data:`REASONING_EFFORTS` in any case (or an enum whose ``value`` is one, such
    as openai-harmony's ``ReasoningEffort``); None means no ``Reasoning:`` line. Anything else is
    a :class:`GptOssError` naming the valid values.
    """
    if reasoning_effort is None:
        return None
    effort = str(getattr(reasoning_effort, "value", reasoning_effort)).lower()
    if effort not in REASONING_EFFORTS:
        raise GptOssError(
            f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, "
            f"got {reasoning_effort!r}"
        )
    return effort


def _prompt_tokens(tok: Tokenizer, msgs: Sequence[_Msg]) -> list[int]:
    """``msgs`` rendered one after another, then ``<|start|>assistant`` for the model to go on."""
    out: list[int] = []
    for m in msgs:
        _render_msg(tok, m, out)
    out.append(tok.start_id)
    out += tok.encode("assistant")
    return out


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
    builtin_tools: Sequence[ToolNamespace] = (),
    response_format: Mapping | None = None,
) -> list[int]:
    """Token ids of the harmony prompt for ``messages`` (OpenAI Chat Completions shape).

    Ends with ``<|start|>assistant``: sample from there and stop on :data:`STOP_TOKENS`.
    ``tools`` are OpenAI function tools; ``builtin_tools`` the built-in tool namespaces (browser,
    python) declared in the system message; ``drop_analysis`` mirrors openai-harmony's
    ``auto_drop_analysis`` (on by default); a JSON schema ``response_format`` is shown to the
    model at the end of the developer message (``# Response Formats``, as harmony's guide writes
    it; openai-harmony has no API for it). Bad input is a :class:`GptOssError`.
    """
    tok = tokenizer or default_tokenizer()
    effort = check_reasoning_effort(reasoning_effort)
    function_tools = tools_to_typescript(tools) if tools else None  # the `# Tools` section
    fmt = parse_response_format(response_format)
    formats = response_formats_section(fmt) if fmt is not None else None
    instructions = [
        content_text(m.get("content"))
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
                has_functions=function_tools is not None,
                builtin_tools=builtin_tools,
            ),
        )
    ]
    if instructions or function_tools is not None or formats is not None:
        sections = []
        if instructions:
            sections += ["# Instructions", "\n\n".join(instructions)]
        if function_tools is not None:
            sections.append(function_tools)
        if formats is not None:
            sections.append(formats)
        msgs.append(_Msg("developer", "\n\n".join(sections)))
    msgs += _conversation_messages(messages, {}, tok, [ns.name for ns in builtin_tools])
    if drop_analysis:
        msgs = _drop_earlier_analysis(msgs)
    return _prompt_tokens(tok, msgs)


def render_messages(
    messages: Sequence[Mapping],
    *,
    history: Sequence[Mapping] = (),
    tokenizer: Tokenizer | None = None,
    builtin_tools: Sequence[ToolNamespace] = (),
) -> list[int]:
    """Token ids of ``messages`` (user / tool / assistant, OpenAI shape) to append to a chat's
    token history, without the ``<|start|>assistant`` that asks for a reply (:func:`render_turn`).

    ``history``: the earlier messages, used only to resolve a tool message's ``tool_call_id`` to
    its function name; ``builtin_tools`` as for :func:`render_prompt` (which tool names are
    built-in). System and developer messages belong to the first prompt and are ignored here.
    """
    tok = tokenizer or default_tokenizer()
    builtin = [ns.name for ns in builtin_tools]
    call_names: dict[str, str] = {}
    _conversation_messages(history, call_names, tok, builtin)
    out: list[int] = []
    for m in _conversation_messages(messages, call_names, tok, builtin):
        _render_msg(tok, m, out)
    return out


def render_turn(
    messages: Sequence[Mapping],
    *,
    history: Sequence[Mapping] = (),
    tokenizer: Tokenizer | None = None,
    builtin_tools: Sequence[ToolNamespace] = (),
) -> list[int]:
    """Token ids to append to a chat's token history for a new turn: :func:`render_messages`
    then ``<|start|>assistant``."""
    tok = tokenizer or default_tokenizer()
    rendered = render_messages(
        messages, history=history, tokenizer=tok, builtin_tools=builtin_tools
    )
    return rendered + [tok.start_id] + tok.encode("assistant")


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
