"""``POST /v1/responses``: input items -> chat-shaped messages -> prompt; a generated turn ->
output items (``reasoning`` with ``reasoning_text`` content, ``message`` with ``output_text``,
``function_call``, and for the built-in tools the server runs ``code_interpreter_call`` and
``web_search_call``) in a ``response``, or the standard stream of events.

Input items become the messages harmony renders: ``message`` items by role (``input_text`` /
``output_text`` parts), and consecutive ``reasoning`` / assistant ``message`` / ``function_call``
items one assistant turn (reasoning, preamble or answer, tool calls), ``function_call_output``
a tool message. ``code_interpreter_call`` and ``web_search_call`` items sent back keep the turn
they are part of together (the turn goes on to its answer or function calls) and name it by their
ids: the server renders it as it generated it, the calls and their results included (see
``TurnMemory``); a turn it no longer remembers renders without them. ``instructions`` come first
(they are not carried over by ``previous_response_id``, as with OpenAI's API); a stored
response's conversation comes before the new input.

Built-in tools (see :mod:`.builtin`): ``web_search``, ``web_search_preview`` (and dated
variants) and ``browser_search`` ask for the browser, ``code_interpreter`` for python, when the
server runs them; ``max_tool_calls`` bounds the calls run (at most the server's
``max_tool_rounds``). A ``code_interpreter_call`` item has the ``code`` and its output as
``outputs`` (``logs``), a ``web_search_call`` its ``action`` (``search`` with the results as
``sources``, ``open_page``, ``find_in_page``), both always (OpenAI's ``include`` asks for them;
here they are always there); a call that failed has status ``failed`` (the model read the error),
one not run for a limit ``incomplete``, and so is the response (``incomplete_details.reason``
``max_tool_calls``, or ``max_output_tokens``).
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..harmony import Delta, content_text
from ..tool_loop import ToolLoop
from . import protocol as p
from .builtin import responses_builtins
from .protocol import RequestError, ToolStep, Turn
from .state import ServerState
from .worker import Job


@dataclass
class ResponsesRequest:
    prompt: list[int]
    options: dict[str, Any]  # stream_generate keywords
    stream: bool
    store: bool
    conversation: list[dict]  # the messages before this turn, instructions left out
    echo: dict  # request fields a response object repeats
    tool_loop: ToolLoop | None  # with the built-in tools the request asked for


def _text(value: Any, param: str) -> str:
    try:
        return content_text(value)
    except p.GptOssError as e:
        raise RequestError(str(e), param=param) from None


def _reasoning(item: Mapping) -> str:
    parts = item.get("content") or []
    return "".join(str(c.get("text", "")) for c in parts if isinstance(c, Mapping) and "text" in c)


def input_messages(items: Any) -> list[dict]:
    """Responses input (a string or items) as chat-shaped messages."""
    if isinstance(items, str):
        return [{"role": "user", "content": items}]
    if not isinstance(items, list):
        raise RequestError("'input' must be a string or a list of items", param="input")
    out: list[dict] = []
    turn: dict | None = None  # the assistant turn being gathered

    # An assistant turn reads reasoning, then a preamble or an answer, then tool calls; an item
    # that cannot follow what the turn already has starts the next turn. A turn in which the
    # server ran tools goes on through them, to its answer or its function calls.
    follows = {
        "reasoning": ("reasoning", "content", "tool_calls"),
        "content": ("content", "tool_calls"),
        "builtin": ("tool_calls",),
        "tool_calls": (),
    }

    def assistant(part: str) -> dict:
        nonlocal turn
        ends = follows[part]
        if turn is not None and turn.get("builtin_call_ids"):
            ends = tuple(k for k in ends if k == "tool_calls")
        if turn is None or any(turn.get(k) for k in ends):
            turn = {"role": "assistant", "content": ""}
            out.append(turn)
        return turn

    for i, item in enumerate(items):
        param = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise RequestError(f"{param} must be an object", param=param)
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in ("user", "system", "developer", "assistant"):
                raise RequestError(f"{param} has an unknown role {role!r}", param=f"{param}.role")
            text = _text(item.get("content"), f"{param}.content")
            if role == "assistant":
                message = assistant("content")
                message["content"] += text
            else:
                turn = None
                out.append({"role": role, "content": text})
        elif kind == "reasoning":
            message = assistant("reasoning")
            message["reasoning"] = message.get("reasoning", "") + _reasoning(item)
        elif kind in ("code_interpreter_call", "web_search_call"):
            message = assistant("builtin")
            message.setdefault("builtin_call_ids", []).append(str(item.get("id")))
        elif kind == "function_call":
            if not isinstance(item.get("name"), str) or not item.get("call_id"):
                raise RequestError(f"{param} needs a 'name' and a 'call_id'", param=param)
            call = {
                "id": str(item["call_id"]),
                "type": "function",
                "function": {"name": item["name"], "arguments": item.get("arguments") or "{}"},
            }
            assistant("tool_calls").setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            turn = None
            out.append(
                {
                    "role": "tool",
                    "tool_call_id": str(item.get("call_id")),
                    "content": _text(item.get("output"), f"{param}.output"),
                }
            )
        # Other item types (calls to tools this server never runs, references) carry nothing
        # it can render: left out, like tools it cannot run.
    return out


def parse(body: Mapping, state: ServerState) -> ResponsesRequest:
    """Check the request and render its prompt (runs off the event loop: it tokenizes)."""
    p.refuse_unsupported(body)
    if body.get("background"):
        raise RequestError("background responses are not supported", param="background")
    conversation: list[dict] = []
    previous = body.get("previous_response_id")
    if previous is not None:
        conversation = list(state.responses.get(str(previous)) or ())
        if not conversation:
            raise RequestError(
                f"no stored response with id {previous!r} (responses are kept in memory, the "
                f"last {state.options.max_stored_responses}, and only with store: true)",
                param="previous_response_id",
            )
    if body.get("input") is None:
        raise RequestError("'input' is required", param="input")
    conversation += input_messages(body["input"])
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise RequestError("'instructions' must be a string", param="instructions")
    messages = ([{"role": "system", "content": instructions}] if instructions else []) + [
        *conversation
    ]
    effort = p.reasoning_effort(body, state.options.reasoning_effort)
    options = p.sampling(body, state.options, ("max_output_tokens",))
    text_format = p.mapping(p.mapping(body, "text"), "format") or None
    options |= p.structured(
        state.tokenizer,
        p.function_tools(body.get("tools")),
        body.get("tool_choice"),
        text_format,
        "text.format",
    )
    builtin = responses_builtins(body.get("tools"), state.tools.names)
    max_tool_calls = p.integer(body, "max_tool_calls", state.options.max_tool_rounds, 0)
    echo = {
        "instructions": instructions,
        "tools": body.get("tools") or [],
        "tool_choice": body.get("tool_choice", "auto"),
        "parallel_tool_calls": body.get("parallel_tool_calls", True),
        "temperature": options["temperature"],
        "top_p": options["top_p"],
        "max_output_tokens": body.get("max_output_tokens"),
        "max_tool_calls": body.get("max_tool_calls"),
        "previous_response_id": previous,
        "reasoning": {"effort": effort, "summary": None},
        "store": p.boolean(body, "store", True),
        "text": {"format": text_format or {"type": "text"}},
        "truncation": "disabled",
        "metadata": body.get("metadata") or {},
        "user": body.get("user"),
    }
    prompt = state.render(messages, effort, options["tools"], options["response_format"], builtin)
    loop = state.tool_loop(builtin, options["tools"], max_tool_calls)
    stream = p.boolean(body, "stream")
    return ResponsesRequest(prompt, options, stream, echo["store"], conversation, echo, loop)


def usage(turn: Turn) -> dict:
    completion = len(turn.completion)
    return {
        "input_tokens": turn.input_tokens,
        "input_tokens_details": {"cached_tokens": turn.cached_tokens},
        "output_tokens": completion,
        "output_tokens_details": {"reasoning_tokens": turn.reasoning_tokens},
        "total_tokens": turn.input_tokens + completion,
    }


class OutputItems:
    """Output items built from a turn's pieces, and the stream events that build them: a new
    item when the kind of output changes (reasoning, answer, each tool call). A call the server
    runs is a ``code_interpreter_call`` (its code streamed as the model writes it) or a
    ``web_search_call`` (added once its arguments are complete: its action needs them), each
    finished by its result; a call to a tool that does not exist shows no item (the model reads
    an error and goes on)."""

    TEXT = {"reasoning": "reasoning_text", "message": "output_text"}  # each item's text part
    ID_PREFIX = {"reasoning": "rs", "message": "msg", "function_call": "fc"}

    def __init__(self) -> None:
        self.items: list[dict] = []
        self._open: dict | None = None  # the text or function call item being written
        self._text: list[str] = []
        self._call: dict | None = None  # the item of the server-side call under way
        self.container_id = p.new_id("cntr")  # the request's Python session

    def add(self, d: Delta | ToolStep) -> list[dict]:
        if isinstance(d, ToolStep):
            return self._step(d)
        if d.kind == "server_call":
            return self._server_call(d)
        events = []
        kind = {"reasoning": "reasoning", "content": "message"}.get(d.kind, "function_call")
        if self._open is None or self._open["type"] != kind or d.tool_call is not None:
            events += self.close()
            events += self._start(kind, d)
        if d.text:
            self._text.append(d.text)
            events.append(self._delta(d.text))
        return events

    def _where(self, item: dict) -> dict:
        return {"item_id": item["id"], "output_index": self.items.index(item)}

    def _added(self, item: dict) -> dict:
        self.items.append(item)
        output_index = len(self.items) - 1
        # the item as it is now (sent before it changes)
        return {
            "type": "response.output_item.added",
            "output_index": output_index,
            "item": dict(item),
        }

    def _done(self, item: dict) -> dict:
        output_index = self.items.index(item)
        return {"type": "response.output_item.done", "output_index": output_index, "item": item}

    def _part(self, kind: str, text: str) -> dict:
        if kind == "reasoning":
            return {"type": "reasoning_text", "text": text}
        return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}

    def _start(self, kind: str, d: Delta) -> list[dict]:
        item: dict[str, Any] = {"id": p.new_id(self.ID_PREFIX[kind]), "type": kind}
        if kind == "reasoning":
            item.update(summary=[], content=[])
        elif kind == "message":
            item.update(role="assistant", status="in_progress", content=[])
        else:
            item.update(call_id=d.tool_call["id"], name=d.tool_call["name"], arguments="")
            item["status"] = "in_progress"
        self._open, self._text = item, []
        events = [self._added(item)]
        if kind in self.TEXT:
            part = self._part(kind, "")
            where = self._where(item)
            events.append(
                {"type": "response.content_part.added", **where, "content_index": 0, "part": part}
            )
        return events

    def _delta(self, text: str) -> dict:
        item = self._open
        if item["type"] == "function_call":
            kind = "response.function_call_arguments.delta"
            return {"type": kind, **self._where(item), "delta": text}
        event = {
            "type": f"response.{self.TEXT[item['type']]}.delta",
            **self._where(item),
            "content_index": 0,
            "delta": text,
        }
        if item["type"] == "message":
            event["logprobs"] = []
        return event

    # -- calls the server runs -------------------------------------------------------------------

    def _server_call(self, d: Delta) -> list[dict]:
        """A server-side call's header (``d.tool_call`` set) or a piece of its arguments."""
        events = []
        if d.tool_call is not None:
            events += self.close()
            if d.tool_call["tool"] == "python":
                self._call = {
                    "id": d.tool_call["id"],
                    "type": "code_interpreter_call",
                    "status": "in_progress",
                    "code": "",
                    "container_id": self.container_id,
                    "outputs": None,
                }
                events.append(self._added(self._call))
                events.append(self._event("code_interpreter_call.in_progress"))
        elif self._call is not None and self._call["type"] == "code_interpreter_call" and d.text:
            self._call["code"] += d.text
            events.append(self._event("code_interpreter_call_code.delta", delta=d.text))
        return events

    def _event(self, name: str, **fields: Any) -> dict:
        return {"type": f"response.{name}", **self._where(self._call), **fields}

    def _step(self, step: ToolStep) -> list[dict]:
        """A server-side call runs, has its result, or is not run (a limit)."""
        call, events = step.server_call, []
        if call.tool == "browser" and step.kind != "result":  # its item starts now
            self._call = {
                "id": call.id,
                "type": "web_search_call",
                "status": "in_progress",
                "action": call.action,
            }
            events.append(self._added(self._call))
        item = self._call
        if item is None or item["id"] != call.id:  # a tool that does not exist: no item
            return events
        kind = item["type"]
        python = kind == "code_interpreter_call"
        if python and step.kind != "result":
            events.append(self._event("code_interpreter_call_code.done", code=item["code"]))
        if step.kind == "run":
            running = ("interpreting",) if python else ("in_progress", "searching")
            events += [self._event(f"{kind}.{stage}") for stage in running]
            item["status"] = call.status
            return events
        if step.kind == "result":
            if python:
                item["outputs"] = [{"type": "logs", "logs": call.output or ""}]
            else:
                item["action"] = call.action
            if call.status == "completed":
                events.append(self._event(f"{kind}.completed"))
        item["status"] = call.status
        events.append(self._done(item))
        self._call = None
        return events

    def close(self) -> list[dict]:
        """Finish the open item (at a change of kind, and at the end); at the end, a server-side
        call cut short (the token limit) too."""
        events = []
        if self._call is not None:
            if self._call["type"] == "code_interpreter_call":
                events.append(
                    self._event("code_interpreter_call_code.done", code=self._call["code"])
                )
            self._call["status"] = "incomplete"
            events.append(self._done(self._call))
            self._call = None
        item, self._open = self._open, None
        if item is None:
            return events
        text, where = "".join(self._text), self._where(item)
        if item["type"] == "function_call":
            item.update(arguments=text, status="completed")
            kind = "response.function_call_arguments.done"
            events.append({"type": kind, **where, "name": item["name"], "arguments": text})
        else:
            part = self._part(item["type"], text)
            item["content"] = [part]
            done = {
                "type": f"response.{self.TEXT[item['type']]}.done",
                **where,
                "content_index": 0,
                "text": text,
            }
            if item["type"] == "message":
                item["status"] = "completed"
                done["logprobs"] = []
            events.append(done)
            events.append(
                {"type": "response.content_part.done", **where, "content_index": 0, "part": part}
            )
        events.append(self._done(item))
        return events


def response_object(
    response_id: str,
    created: int,
    req: ResponsesRequest,
    state: ServerState,
    items: list[dict],
    turn: Turn | None,
) -> dict:
    """The ``response`` object: in progress without a ``turn``, else completed or incomplete."""
    status, incomplete = "in_progress", None
    if turn is not None:
        status = "incomplete" if turn.finish_reason == "length" else "completed"
        if status == "incomplete":
            tools = turn.limit == "max_tool_calls" and turn.finish != "length"
            incomplete = {"reason": "max_tool_calls" if tools else "max_output_tokens"}
    return {
        "id": response_id,
        "object": "response",
        "created_at": created,
        "status": status,
        "model": state.options.model_name,
        "output": items,
        "usage": usage(turn) if turn is not None else None,
        "error": None,
        "incomplete_details": incomplete,
        **req.echo,
    }


def _finished(
    response_id: str, created: int, req: ResponsesRequest, state: ServerState, turn: Turn, items
):
    state.remember(turn, turn.reasoning_text)
    if req.store:
        answer: dict[str, Any] = {"role": "assistant", "content": turn.content_text}
        if turn.reasoning_text:
            answer["reasoning"] = turn.reasoning_text
        if turn.calls:
            answer["tool_calls"] = turn.tool_calls
        if turn.server_calls:
            answer["builtin_call_ids"] = [c.id for c in turn.server_calls]
        state.responses.put(response_id, req.conversation + [answer])
    return response_object(response_id, created, req, state, items, turn)


def response(turn: Turn, req: ResponsesRequest, state: ServerState) -> dict:
    """The ``response`` object for a finished turn (its deltas were all given to ``turn``)."""
    builder = OutputItems()
    for d in turn.deltas:
        builder.add(d)
    builder.close()
    return _finished(p.new_id("resp"), int(time.time()), req, state, turn, builder.items)


async def stream(
    job: Job, turn: Turn, req: ResponsesRequest, state: ServerState
) -> AsyncIterator[str]:
    """``response.created``, ``response.in_progress``, the items' events as they are generated,
    then ``response.completed`` (or ``response.incomplete`` at the token limit; on an error
    after the stream began, ``response.failed``)."""
    response_id, created = p.new_id("resp"), int(time.time())
    builder = OutputItems()
    sequence = 0

    def event(data: dict) -> str:
        nonlocal sequence
        data["sequence_number"] = sequence
        sequence += 1
        return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"

    snapshot = response_object(response_id, created, req, state, [], None)
    yield event({"type": "response.created", "response": snapshot})
    yield event({"type": "response.in_progress", "response": snapshot})
    try:
        async for generated in job.events():
            for d in turn.add(generated):
                for e in builder.add(d):
                    yield event(e)
    except Exception as e:  # reported in the stream: the status has been sent
        failed = response_object(response_id, created, req, state, builder.items, None)
        failed.update(status="failed", error=p.describe(e)[1]["error"])
        yield event({"type": "response.failed", "response": failed})
        return
    for e in builder.close():
        yield event(e)
    final = _finished(response_id, created, req, state, turn, builder.items)
    yield event({"type": f"response.{final['status']}", "response": final})
