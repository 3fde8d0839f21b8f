"""``POST /v1/chat/completions``: a request -> prompt and generation options; a generated turn ->
a ``chat.completion`` or a stream of ``chat.completion.chunk`` s.

Reasoning goes out as ``message.reasoning`` and ``delta.reasoning`` (the convention OpenAI's
gpt-oss guide asks Chat Completions servers to follow; ``reasoning_content`` with the server's
``reasoning_format``); ``reasoning: {"exclude": true}`` leaves it out. Earlier reasoning may come
back on assistant messages as ``reasoning`` or ``reasoning_content``.

A request gets every built-in tool the server runs (``serve --tools``). Chat Completions has no
shape for calls the server runs itself, so they are part of the reasoning, where the model made
them: each call as ``[python]`` (or ``[browser.search]`` ...) and its code or arguments, each
result as ``[python result]`` (``[python error]`` when the model read an error) and the output,
streamed as they happen (:class:`ReasoningText`). ``message.content`` is the answer alone, and
``tool_calls`` only the calls for the client to run.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..harmony import Delta
from ..tool_loop import ToolLoop
from . import protocol as p
from .protocol import RequestError, ToolStep, Turn
from .state import ServerState
from .worker import Job

ROLES = ("system", "developer", "user", "assistant", "tool", "function")


@dataclass
class ChatRequest:
    prompt: list[int]
    options: dict[str, Any]  # stream_generate keywords
    stream: bool
    include_usage: bool
    exclude_reasoning: bool
    logprobs: int | None
    tool_loop: ToolLoop | None  # with the server's built-in tools


def _messages(body: Mapping) -> list[Mapping]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of messages", param="messages")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ROLES:
            raise RequestError(
                f"messages[{i}] must be an object with a 'role' among {', '.join(ROLES)}",
                param=f"messages[{i}]",
            )
        content = m.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(
                f"messages[{i}].content must be a string or a list of parts",
                param=f"messages[{i}].content",
            )
    return messages


def parse(body: Mapping, state: ServerState) -> ChatRequest:
    """Check the request and render its prompt (runs off the event loop: it tokenizes)."""
    p.refuse_unsupported(body)
    messages = _messages(body)
    effort = p.reasoning_effort(body, state.options.reasoning_effort)
    options = p.sampling(body, state.options, ("max_tokens", "max_completion_tokens"))
    options |= p.structured(
        state.tokenizer,
        p.function_tools(body.get("tools")),
        body.get("tool_choice"),
        body.get("response_format"),
        "response_format",
    )
    options["stop"] = p.stop_strings(body)
    logprobs = None
    if p.boolean(body, "logprobs"):
        logprobs = p.integer(body, "top_logprobs", 0, 0, 20)
    elif body.get("top_logprobs") is not None:
        raise RequestError("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    options["logprobs"] = logprobs
    exclude = p.mapping(body, "reasoning").get("exclude") is True
    exclude = exclude or body.get("include_reasoning") is False
    stream = p.boolean(body, "stream")
    include_usage = stream and p.mapping(body, "stream_options").get("include_usage") is True
    builtin = state.tools.names
    prompt = state.render(messages, effort, options["tools"], options["response_format"], builtin)
    loop = state.tool_loop(builtin, options["tools"], state.options.max_tool_rounds)
    return ChatRequest(prompt, options, stream, include_usage, exclude, logprobs, loop)


def usage(turn: Turn) -> dict:
    completion = len(turn.completion)
    return {
        "prompt_tokens": turn.input_tokens,
        "completion_tokens": completion,
        "total_tokens": turn.input_tokens + completion,
        "prompt_tokens_details": {"cached_tokens": turn.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
    }


def _header(state: ServerState, object_type: str, completion_id: str, created: int) -> dict:
    return {
        "id": completion_id,
        "object": object_type,
        "created": created,
        "model": state.options.model_name,
        "system_fingerprint": None,
    }


class ReasoningText:
    """The reasoning a client is shown, piece by piece: the model's, and the calls the server
    ran with their results (see the module docstring)."""

    def __init__(self) -> None:
        self.parts: list[str] = []

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def add(self, piece: Delta | ToolStep) -> str:
        """The text ``piece`` adds ("" for none)."""
        if isinstance(piece, ToolStep):
            call = piece.server_call
            if piece.kind == "result":
                label = "error" if piece.error else "result"
                text = f"\n\n[{call.recipient} {label}]\n{piece.output}\n\n"
            elif piece.kind == "limit":
                text = f"\n\n[{call.recipient} not run: the {piece.reason} limit was reached]"
            else:
                text = ""
        elif piece.kind == "server_call" and piece.tool_call is not None:
            text = ("\n\n" if self.text and not self.text.endswith("\n\n") else "") + (
                f"[{piece.recipient}]\n"
            )
        else:
            text = piece.text if piece.kind in ("reasoning", "server_call") else ""
        self.parts.append(text)
        return text


def reasoning_text(turn: Turn) -> str:
    """All of the turn's reasoning as the client is shown it."""
    shown = ReasoningText()
    for piece in turn.deltas:
        shown.add(piece)
    return shown.text


def response(turn: Turn, req: ChatRequest, state: ServerState) -> dict:
    """The ``chat.completion`` object for a finished turn."""
    reasoning = reasoning_text(turn)
    state.remember(turn, reasoning)
    message: dict[str, Any] = {"role": "assistant", "content": turn.content_text}
    if turn.calls and not turn.content_text:
        message["content"] = None
    if reasoning and not req.exclude_reasoning:
        message[state.options.reasoning_format] = reasoning
    if turn.calls:
        message["tool_calls"] = turn.tool_calls
    choice = {
        "index": 0,
        "message": message,
        "logprobs": {"content": turn.token_logprobs} if req.logprobs is not None else None,
        "finish_reason": turn.finish_reason,
    }
    created = int(time.time())
    return {
        **_header(state, "chat.completion", p.new_id("chatcmpl"), created),
        "choices": [choice],
        "usage": usage(turn),
    }


def _delta(d: Delta, state: ServerState) -> dict:
    if d.kind == "content":
        return {"content": d.text}
    call: dict[str, Any] = {"index": d.tool_call_index, "function": {"arguments": d.text}}
    if d.tool_call is not None:  # the call opens: its id and name first
        call.update(id=d.tool_call["id"], type="function")
        call["function"] = {"name": d.tool_call["name"], "arguments": ""}
    return {"tool_calls": [call]}


def sse(data: Any) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def stream(job: Job, turn: Turn, req: ChatRequest, state: ServerState) -> AsyncIterator[str]:
    """The SSE stream: deltas as they are generated, then ``finish_reason``, then usage if
    asked, then ``[DONE]``; an error after the stream began is one ``{"error": ...}`` chunk."""
    header = _header(state, "chat.completion.chunk", p.new_id("chatcmpl"), int(time.time()))
    sent_logprobs = 0

    def chunk(delta: dict, finish: str | None = None) -> str:
        nonlocal sent_logprobs
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        if req.logprobs is not None and ("content" in delta or finish is not None):
            choice["logprobs"] = {"content": turn.token_logprobs[sent_logprobs:]}
            sent_logprobs = len(turn.token_logprobs)
        out = {**header, "choices": [choice]}
        if req.include_usage:
            out["usage"] = None
        return sse(out)

    yield chunk({"role": "assistant", "content": ""})
    shown = ReasoningText()
    try:
        async for event in job.events():
            for d in turn.add(event):
                if isinstance(d, ToolStep) or d.kind in ("reasoning", "server_call"):
                    text = shown.add(d)
                    if text and not req.exclude_reasoning:
                        yield chunk({state.options.reasoning_format: text})
                else:
                    yield chunk(_delta(d, state))
    except Exception as e:  # reported in the stream: the status has been sent
        yield sse(p.describe(e)[1])
        yield "data: [DONE]\n\n"
        return
    state.remember(turn, shown.text)
    yield chunk({}, turn.finish_reason)
    if req.include_usage:
        yield sse({**header, "choices": [], "usage": usage(turn)})
    yield "data: [DONE]\n\n"
