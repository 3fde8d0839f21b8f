"""What the Chat Completions and Responses adapters share: request errors, reading request fields,
sampling and tool options, ids, and the generated turn as a client sees it.

A request field of the wrong type or out of range is a :class:`RequestError` naming it (OpenAI's
``param``); unknown fields are ignored (clients send many); a feature the server does not have
(``n > 1``, penalties, ...) is refused rather than ignored.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from ..constrain import check_response_format, compile_constraint
from ..errors import GptOssError
from ..generate import GenerationEvent
from ..harmony import REASONING_EFFORTS, Delta
from ..tokenizer import Tokenizer
from ..tool_loop import DEFAULT_MAX_TOOL_ROUNDS, ToolLoop
from ..tools import ToolCall as LoopCall

__all__ = [
    "ClientCall",
    "RequestError",
    "ServerCall",
    "ServerOptions",
    "ToolStep",
    "Turn",
    "describe",
    "error_body",
    "new_id",
]


class RequestError(GptOssError):
    """A request the server refuses, as OpenAI reports it: HTTP ``status``, error ``type``,
    the request field at fault (``param``) and a ``code``."""

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        status: int = 400,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.param, self.status, self.code, self.type = param, status, code, type


def error_body(
    message: str,
    type: str = "invalid_request_error",
    param: str | None = None,
    code: str | None = None,
) -> dict:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def describe(e: BaseException) -> tuple[int, dict]:
    """The HTTP status and OpenAI-shaped body for an error: a refused request as it says, any
    other GptOssError a 400, anything else a 500 that shows nothing of the server's insides."""
    if isinstance(e, RequestError):
        return e.status, error_body(str(e), e.type, e.param, e.code)
    if isinstance(e, GptOssError):
        return 400, error_body(str(e))
    return 500, error_body(
        "The server had an error while processing the request; it has been logged.",
        "server_error",
    )


def new_id(prefix: str) -> str:
    """An id unique to this server, e.g. ``call_`` + 24 hex digits for a tool call."""
    return f"{prefix}_{secrets.token_hex(12)}"


@dataclass
class ServerOptions:
    """The server's settings; request fields override the sampling defaults per request."""

    model_name: str = "gpt-oss"
    api_key: str | None = None
    reasoning_effort: str = "medium"
    reasoning_format: str = "reasoning"  # the field reasoning goes out in: or "reasoning_content"
    max_tokens: int | None = None  # a request's default: None, the rest of the context
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None
    prefill_chunk: int = 512
    max_queue: int = 32
    prompt_cache_bytes: int = 2 << 30
    max_stored_responses: int = 256
    builtin_tools: Sequence[Any] = ()  # run server-side: "browser", "python" or instances
    max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS  # calls run in one turn, at most


# -- reading request fields -----------------------------------------------------------------------


def _kind(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def number(body: Mapping, name: str, default: float, lo: float, hi: float, *, open_lo=False):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RequestError(f"'{name}' must be a number, got {_kind(value)}", param=name)
    if value < lo or value > hi or (open_lo and value == lo):
        side = "(" if open_lo else "["
        raise RequestError(f"'{name}' must be in {side}{lo}, {hi}], got {value}", param=name)
    return float(value)


def integer(body: Mapping, name: str, default: int | None, lo: int, hi: int | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"'{name}' must be an integer, got {_kind(value)}", param=name)
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise RequestError(f"'{name}' must be {bound}, got {value}", param=name)
    return value


def boolean(body: Mapping, name: str, default: bool = False) -> bool:
    value = body.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(f"'{name}' must be true or false, got {_kind(value)}", param=name)
    return value


def mapping(body: Mapping, name: str) -> Mapping:
    value = body.get(name)
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise RequestError(f"'{name}' must be an object, got {_kind(value)}", param=name)
    return value


def refuse_unsupported(body: Mapping) -> None:
    """A clear 400 for what the server does not do, rather than silently ignoring it."""
    n = body.get("n")
    if n not in (None, 1):
        raise RequestError("only n=1 is supported: send one request per completion", param="n")
    for name, neutral in (
        ("presence_penalty", 0),
        ("frequency_penalty", 0),
        ("repetition_penalty", 1),
    ):
        if body.get(name) not in (None, neutral):
            raise RequestError(
                f"'{name}' is not supported by this server (leave it out or at {neutral})",
                param=name,
            )
    if body.get("logit_bias"):
        raise RequestError("'logit_bias' is not supported by this server", param="logit_bias")


def reasoning_effort(body: Mapping, default: str) -> str:
    """``reasoning_effort`` or ``reasoning.effort`` (``minimal`` reads as ``low``)."""
    value = body.get("reasoning_effort")
    param = "reasoning_effort"
    if value is None:
        value, param = mapping(body, "reasoning").get("effort"), "reasoning.effort"
    if value is None:
        return default
    effort = value.lower() if isinstance(value, str) else value
    effort = "low" if effort == "minimal" else effort
    if effort not in REASONING_EFFORTS:
        raise RequestError(
            f"'{param}' must be one of {', '.join(REASONING_EFFORTS)} (or minimal), got {value!r}",
            param=param,
        )
    return effort


def sampling(body: Mapping, options: ServerOptions, max_tokens_fields: Sequence[str]) -> dict:
    """``stream_generate`` sampling keywords from a request, the server's defaults otherwise."""
    max_tokens = options.max_tokens
    for name in max_tokens_fields:
        max_tokens = integer(body, name, max_tokens, 1)
    out = {
        "temperature": number(body, "temperature", options.temperature, 0, 2),
        "top_p": number(body, "top_p", options.top_p, 0, 1, open_lo=True),
        "top_k": integer(body, "top_k", options.top_k, 0),
        "min_p": number(body, "min_p", options.min_p, 0, 1),
        "seed": integer(body, "seed", options.seed, 0, 2**63 - 1),
        "prefill_chunk": options.prefill_chunk,
    }
    if out["min_p"] >= 1:
        raise RequestError("'min_p' must be below 1", param="min_p")
    out["max_tokens"] = max_tokens  # None: to the end of the context
    return out


def function_tools(tools: Any, param: str = "tools") -> list[dict] | None:
    """Function tools in Chat Completions shape, from either API's shape. Tools of other types
    (built-in tools the server does not run, types it does not know) are left out, not refused,
    so agents that always send them still work."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise RequestError(f"'{param}' must be a list, got {_kind(tools)}", param=param)
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, Mapping):
            raise RequestError(f"'{param}[{i}]' must be an object", param=f"{param}[{i}]")
        if tool.get("type", "function") != "function":
            continue
        spec = tool.get("function") if isinstance(tool.get("function"), Mapping) else tool
        name = spec.get("name")
        if not isinstance(name, str) or not name:
            raise RequestError(f"'{param}[{i}]' is a function with no name", param=f"{param}[{i}]")
        fn = {"name": name, "description": spec.get("description") or ""}
        for key in ("parameters", "strict"):
            if spec.get(key) is not None:
                fn[key] = spec[key]
        out.append({"type": "function", "function": fn})
    return out or None


def structured(
    tokenizer: Tokenizer,
    tools: list[dict] | None,
    tool_choice: Any,
    response_format: Any,
    format_param: str,
) -> dict:
    """``stream_generate`` keywords for a request's tools, tool choice and response format,
    checked now (a 400 before anything is queued): the server renders the prompt itself, so
    ``tools`` there only serve the constraint (see ``gptoss_mlx.constrain``)."""
    if isinstance(response_format, Mapping) and response_format.get("type", "text") == "text":
        response_format = None
    try:
        check_response_format(response_format)
    except GptOssError as e:
        raise RequestError(str(e), param=format_param) from None
    try:
        compile_constraint(
            tokenizer, response_format=response_format, tools=tools, tool_choice=tool_choice
        )
    except GptOssError as e:
        raise RequestError(str(e), param="tool_choice") from None
    return {"tools": tools, "tool_choice": tool_choice, "response_format": response_format}


def stop_strings(body: Mapping, name: str = "stop") -> list[str]:
    value = body.get(name)
    if value is None:
        return []
    values = [value] if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise RequestError(f"'{name}' must be a string or a list of strings", param=name)
    if len(values) > 4:
        raise RequestError(f"'{name}' takes at most 4 strings", param=name)
    return [v for v in values if v]


# -- the generated turn ---------------------------------------------------------------------------


@dataclass
class ClientCall:
    """A call the turn ends on, for the client to run (a function it declared)."""

    id: str
    name: str
    arguments: list[str] = field(default_factory=list)

    def to_openai(self) -> dict:
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": "".join(self.arguments)},
        }


@dataclass
class ServerCall:
    """A call the server runs (see :mod:`.builtin`) as clients are shown it: ``tool``
    ``"python"`` or ``"browser"`` (a built-in tool of the request), or ``""`` (a tool that does
    not exist: the model reads an error). ``status``: ``in_progress`` while the model writes it,
    ``interpreting`` / ``searching`` while it runs, then ``completed``, ``failed`` (the model read
    an error) or ``incomplete`` (not run: a limit was reached)."""

    id: str  # ci_... (python), ws_... (browser), call_... (no such tool)
    recipient: str  # as the model wrote it: python, browser.search, ...
    tool: str
    arguments: list[str] = field(default_factory=list)
    status: str = "in_progress"
    output: str | None = None
    action: dict | None = None  # the browser's: OpenAI's web_search_call action

    @property
    def code(self) -> str:
        return "".join(self.arguments)


@dataclass
class ToolStep:
    """A server-side call between two rounds, as the worker hands it over (:func:`.builtin.
    run_turn`): ``run`` (about to run; ``action`` for a browser call, from its arguments),
    ``result`` (``output``, ``error``; ``tokens``: what it added to the conversation, the tool's
    message and the next ``<|start|>assistant``; ``action`` with what the browser showed) or
    ``limit`` (not run, ``reason`` ``max_tool_calls`` or ``max_tokens``: the turn ends on it).
    :meth:`Turn.add` gives it back with ``server_call``, the call it is about."""

    kind: str
    call: LoopCall
    output: str = ""
    error: bool = False
    tokens: list[int] = field(default_factory=list)
    action: dict | None = None
    reason: str | None = None
    server_call: ServerCall | None = None


RUNNING = {"python": "interpreting", "browser": "searching", "": "in_progress"}
ID_PREFIX = {"python": "ci", "browser": "ws", "": "call"}


class Turn:
    """An assistant turn as the client sees it, built from the generation's events.

    :meth:`add` takes an event and returns its pieces: harmony deltas, client calls renamed to
    server-unique ids (``call_...``, what the client is given and what ``TurnMemory`` keys on),
    the calls the server runs as deltas of kind ``server_call`` (ids ``ci_...``, ``ws_...``; the
    opening one's ``tool_call`` says which ``tool``), and :class:`ToolStep` s. With
    ``tool_loop`` (a request whose built-in tools the server runs) the turn may take several
    rounds: ``completion`` holds what the model wrote in all of them, ``tokens`` everything after
    the prompt (tool results and headers too).
    """

    def __init__(
        self,
        prompt_tokens: int,
        tokenizer: Tokenizer,
        logprobs: int | None = None,
        tool_loop: ToolLoop | None = None,
    ):
        self.prompt_tokens = prompt_tokens
        self.tokenizer = tokenizer
        self.logprobs = logprobs
        self.tool_loop = tool_loop
        self.reasoning: list[str] = []
        self.content: list[str] = []
        self.calls: list[ClientCall] = []
        self.server_calls: list[ServerCall] = []
        self.completion: list[int] = []  # the model's tokens, all rounds
        self.tokens: list[int] = []  # the turn after the prompt: the model's and the tools'
        self.read_tokens = 0  # tool results and headers fed between rounds
        self.reasoning_tokens = 0
        self.prefilled: int | None = None  # of the prompt (the first round)
        self.finish: str | None = None
        self.limit: str | None = None  # why a call was not run (ToolStep.reason)
        self.token_logprobs: list[dict] = []  # of the answer's tokens (OpenAI's logprobs.content)
        self.deltas: list[Delta | ToolStep] = []  # all pieces, calls under the server's ids
        self._writing: ClientCall | ServerCall | None = None  # the call being written

    def add(self, event: GenerationEvent | ToolStep) -> list[Delta | ToolStep]:
        if isinstance(event, ToolStep):
            out = [self._step(event)]
        else:
            out = self._token(event)
        self.deltas += out
        return out

    def _token(self, event: GenerationEvent) -> list[Delta]:
        self.completion.append(event.token)
        self.tokens.append(event.token)
        self.reasoning_tokens += event.part == "reasoning"
        if self.logprobs is not None and event.part == "content":
            self.token_logprobs.append(self._logprob_entry(event))
        out = []
        for d in event.deltas:
            if d.kind == "tool_call" and d.tool_call is not None:
                d = self._open_call(d)
            if d.kind == "tool_call" and isinstance(self._writing, ServerCall):
                d = replace(d, kind="server_call")
            if d.kind in ("tool_call", "server_call"):
                self._writing.arguments.append(d.text)
            elif d.kind == "reasoning":
                self.reasoning.append(d.text)
            else:
                self.content.append(d.text)
            out.append(d)
        if event.stats is not None:
            if self.prefilled is None:  # the first round's: the prompt's tokens not cached
                self.prefilled = event.stats.prompt_tokens
            self.finish = event.finish_reason
        return out

    def _open_call(self, d: Delta) -> Delta:
        """A call begins: the server's if its tool loop answers it, else the client's."""
        loop = self.tool_loop
        if loop is not None and loop.answers(LoopCall("", d.recipient or "", "")):
            namespace = (d.recipient or "").split(".", 1)[0]
            tool = namespace if namespace in loop.builtin else ""
            call = ServerCall(new_id(ID_PREFIX[tool]), d.recipient or "", tool)
            self.server_calls.append(call)
            self._writing = call
            opened = {**d.tool_call, "id": call.id, "tool": tool}
            return replace(d, kind="server_call", tool_call=opened)
        call = ClientCall(new_id("call"), d.tool_call["name"])
        self.calls.append(call)
        self._writing = call
        return replace(d, tool_call={**d.tool_call, "id": call.id})

    def _step(self, step: ToolStep) -> ToolStep:
        call = self.server_calls[-1]  # the loop runs the call the last round ended on
        if step.action is not None:
            call.action = step.action
        if step.kind == "run":
            call.status = RUNNING[call.tool]
        elif step.kind == "result":
            call.status = "failed" if step.error else "completed"
            call.output = step.output
            self.tokens += step.tokens
            self.read_tokens += len(step.tokens)
        else:
            call.status = "incomplete"
            self.limit = step.reason
        return replace(step, server_call=call)

    def _token_entry(self, token: int, logprob: float) -> dict:
        raw = self.tokenizer.token_bytes(token)
        return {
            "token": raw.decode("utf-8", errors="replace"),
            "logprob": logprob,
            "bytes": list(raw),
        }

    def _logprob_entry(self, event: GenerationEvent) -> dict:
        entry = self._token_entry(event.token, event.logprob)
        entry["top_logprobs"] = [self._token_entry(t, lp) for t, lp in event.top_logprobs or ()]
        return entry

    @property
    def finish_reason(self) -> str | None:
        """OpenAI's: ``tool_calls`` when the turn ends on client calls, ``length`` at the token
        limit or when a limit stopped a server-side call, else ``stop``."""
        if self.limit is not None:
            return "length"
        if self.calls and self.finish != "length":
            return "tool_calls"
        return self.finish

    @property
    def reasoning_text(self) -> str:
        return "".join(self.reasoning)

    @property
    def content_text(self) -> str:
        return "".join(self.content)

    @property
    def tool_calls(self) -> list[dict]:
        return [c.to_openai() for c in self.calls]

    @property
    def input_tokens(self) -> int:
        """Tokens the model read: the prompt, and the tool results between rounds."""
        return self.prompt_tokens + self.read_tokens

    @property
    def cached_tokens(self) -> int:
        """The prompt's tokens that came from the prompt cache (tool results never do)."""
        return self.prompt_tokens - (self.prefilled or 0)
