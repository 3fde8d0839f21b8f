"""The tool loop: generate, run the tool the model called, feed its result back, generate again.

    prompt ──► generate ──► completion ends in <|call|>? ── no ──► the turn is over
                  ▲                      │ yes
                  │                      ▼
                  │      run the tool (a function, the browser, python); an exception in it
                  │      becomes its result, marked as an error
                  │                      │
                  └── history + <|start|>{tool} to=assistant<|channel|>...<|message|>{result}<|end|>
                      + <|start|>assistant

The loop keeps the conversation as *tokens* (``harmony.chat_history_tokens``): each round's prompt
is the previous prompt, the completion as sampled and the rendered result, so a caller that keeps
its KV cache (``ChatSession``, a server's prompt cache) prefills only the result and the next
header. All reasoning stays in the prompt during the loop, as harmony asks. The loop owns no
cache and no model: the caller passes ``generate(prompt_ids) -> events`` and keeps (or reuses)
its cache however it likes.

Which calls it runs: a function with a callable, or a built-in tool it was given (``browser``,
``python``). A call to a function declared without a callable ends the turn (the caller answers
it); a call to a tool that does not exist gets an error result while the loop has tools to run.
``max_tool_rounds`` bounds the rounds that run tools within one turn: a call beyond it is not run,
a ``tool_limit`` event says so and the turn ends on that call.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import harmony
from .errors import GptOssError
from .generate import GenerationEvent
from .harmony import StreamParser, ToolNamespace
from .tokenizer import Tokenizer, default_tokenizer
from .tools import BuiltinTool, FunctionTool, ToolCall, ToolError, builtin_tool, function_tool

__all__ = ["ToolEvent", "ToolLoop", "ToolTurn", "Round", "ToolCall"]

DEFAULT_MAX_TOOL_ROUNDS = 10


@dataclass
class ToolEvent:
    """A step of the loop between generations, in the same stream as the tokens' events.

    ``kind``: ``"tool_run"`` (the call is about to run), ``"tool_result"`` (its ``output``, with
    ``error`` set when the tool failed, was declined or does not exist) or ``"tool_limit"``
    (``max_tool_rounds`` reached: the call is not run and the turn ends). ``round`` counts the
    rounds of this turn that ran tools, from 0. ``text`` is always "" (no generated text), so a
    loop printing ``event.text`` runs unchanged.
    """

    kind: str
    call: ToolCall
    output: str = ""
    error: bool = False
    round: int = 0
    text: str = ""


@dataclass
class Round:
    """One generation of a turn: its full prompt, the completion as sampled and the rendered
    tool result that followed it (empty when none)."""

    prompt: list[int]
    completion: list[int] = field(default_factory=list)
    result: list[int] = field(default_factory=list)


Generate = Callable[[list[int]], Iterator[GenerationEvent]]


class ToolLoop:
    """Tools and the rules for running them; :meth:`run` drives one turn.

    ``tools``: Python callables (schema from their hints and docstring), ``(OpenAI function tool
    dict, callable)`` pairs, or bare dicts (declared only). ``builtin_tools``: ``"browser"``,
    ``"python"`` or configured :class:`~gptoss_mlx.tools.Browser` / :class:`~gptoss_mlx.tools.
    Python` instances. ``approve(call) -> bool`` is asked before each run (False: the model is
    told the user declined). Declare the tools in the prompt with :attr:`function_specs` and
    :attr:`namespaces` (``harmony.render_prompt(tools=..., builtin_tools=...)``).
    """

    def __init__(
        self,
        tools: Sequence[Any] = (),
        builtin_tools: Sequence[str | BuiltinTool] = (),
        *,
        max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
        approve: Callable[[ToolCall], bool] | None = None,
        tokenizer: Tokenizer | None = None,
    ) -> None:
        if isinstance(max_tool_rounds, bool) or not isinstance(max_tool_rounds, int):
            raise GptOssError(f"max_tool_rounds must be an integer >= 0, got {max_tool_rounds!r}")
        if max_tool_rounds < 0:
            raise GptOssError(f"max_tool_rounds must be an integer >= 0, got {max_tool_rounds!r}")
        self.functions: dict[str, FunctionTool] = {}
        for tool in tools or ():
            fn = function_tool(tool)
            if fn.name in self.functions:
                raise GptOssError(f"two function tools are named {fn.name!r}")
            self.functions[fn.name] = fn
        self.builtin: dict[str, BuiltinTool] = {}
        for spec in builtin_tools or ():
            tool = builtin_tool(spec)
            if tool.name in self.builtin:
                raise GptOssError(f"the built-in tool {tool.name!r} is given twice")
            self.builtin[tool.name] = tool
        clash = set(self.functions) & set(self.builtin)
        if clash:
            raise GptOssError(
                f"function tool {sorted(clash)[0]!r} has the name of a built-in tool; rename it"
            )
        self.max_tool_rounds = max_tool_rounds
        self.approve = approve
        self.tokenizer = tokenizer or default_tokenizer()
        self._calls = 0  # ids of calls: call_0, call_1, ... across the loop's life

    # -- declarations --------------------------------------------------------------------------

    @property
    def function_specs(self) -> list[dict] | None:
        """The function tools as OpenAI dicts (``render_prompt(tools=...)``); None when none."""
        return [dict(f.spec) for f in self.functions.values()] or None

    @property
    def namespaces(self) -> list[ToolNamespace]:
        """The built-in tools' declarations (``render_prompt(builtin_tools=...)``)."""
        return [tool.namespace() for tool in self.builtin.values()]

    @property
    def runs_tools(self) -> bool:
        """Whether any call can run here (a callable function or a built-in tool)."""
        return bool(self.builtin) or any(f.fn is not None for f in self.functions.values())

    # -- one turn ------------------------------------------------------------------------------

    def run(self, prompt: Sequence[int], generate: Generate) -> ToolTurn:
        """A turn from ``prompt`` (token ids ending ``<|start|>assistant``); iterate it for the
        events (:class:`GenerationEvent` per token, :class:`ToolEvent` between rounds)."""
        return ToolTurn(self, list(prompt), generate)

    def call_in(self, completion: Sequence[int]) -> ToolCall | None:
        """The call a completion ends with (its last message, closed by ``<|call|>``)."""
        if not completion or completion[-1] != self.tokenizer.call_id:
            return None
        parser = StreamParser(self.tokenizer)
        opened = [d for d in parser.feed(completion) + parser.finish() if d.tool_call is not None]
        calls = parser.result()["tool_calls"]
        if not opened or len(opened) != len(calls):
            return None
        self._calls += 1
        return ToolCall(
            id=f"call_{self._calls - 1}",
            recipient=opened[-1].recipient,
            arguments=calls[-1]["function"]["arguments"],
            channel=opened[-1].channel,
        )

    def _target(self, call: ToolCall) -> FunctionTool | BuiltinTool | None:
        if call.namespace == "functions":
            return self.functions.get(call.function or "")
        if call.namespace in self.builtin:
            return self.builtin[call.namespace]
        return self.functions.get(call.recipient)  # the model left out "functions."

    def answers(self, call: ToolCall) -> bool:
        """Whether this loop answers ``call`` (runs it or reports an error) rather than ending
        the turn on it for the caller."""
        target = self._target(call)
        if isinstance(target, FunctionTool) and target.fn is None:
            return False
        return target is not None or self.runs_tools

    def execute(self, call: ToolCall) -> tuple[str, bool]:
        """Run ``call``: ``(output, error)``. Every failure is an output the model can read."""
        target = self._target(call)
        if target is None:
            names = [f"functions.{n}" for n, f in self.functions.items() if f.fn] + list(
                self.builtin
            )
            return f"Error: there is no tool {call.recipient!r}; tools: {', '.join(names)}", True
        if self.approve is not None and not self.approve(call):
            return "Error: the user declined to run this call.", True
        try:
            return target.run(call), False
        except ToolError as e:
            return f"Error: {e}", True
        except Exception as e:  # a tool's own bug or bad arguments: the model reads it
            return f"Error: {type(e).__name__}: {e}", True

    def result_message(self, call: ToolCall, output: str) -> dict:
        """The OpenAI-shaped ``tool`` message answering ``call`` (rendered on its channel)."""
        message = {"role": "tool", "tool_call_id": call.id, "name": call.name, "content": output}
        if call.channel is not None:
            message["channel"] = call.channel
        return message

    def reset(self) -> None:
        """A new conversation: the built-in tools forget their state (pages, variables)."""
        for tool in self.builtin.values():
            tool.reset()

    def close(self) -> None:
        for tool in self.builtin.values():
            tool.close()


class ToolTurn:
    """One turn of a :class:`ToolLoop`: iterate it for the events.

    While and after it runs: :attr:`rounds` (each generation's prompt, completion, result),
    :attr:`messages` (the OpenAI-shaped assistant and tool messages it added) and
    :attr:`history` (the conversation's tokens so far, well-formed even if the caller stops
    iterating early).
    """

    def __init__(self, loop: ToolLoop, prompt: list[int], generate: Generate) -> None:
        self.loop, self.prompt, self.generate = loop, prompt, generate
        self.rounds: list[Round] = []
        self.messages: list[dict] = []
        self.tool_rounds = 0
        self._events = self._run()

    def __iter__(self) -> Iterator[GenerationEvent | ToolEvent]:
        return self

    def __next__(self) -> GenerationEvent | ToolEvent:
        return next(self._events)

    def close(self) -> None:
        self._events.close()

    @property
    def history(self) -> list[int]:
        """The token history: the last round's prompt, completion (``<|return|>`` as
        ``<|end|>``) and tool result, if any."""
        if not self.rounds:
            return list(self.prompt)
        last = self.rounds[-1]
        tok = self.loop.tokenizer
        return harmony.chat_history_tokens(last.prompt, last.completion, tok) + last.result

    def _run(self) -> Iterator[GenerationEvent | ToolEvent]:
        loop, tok = self.loop, self.loop.tokenizer
        prompt = self.prompt
        while True:
            current = Round(prompt)
            self.rounds.append(current)
            for event in self.generate(prompt):
                current.completion.append(event.token)
                yield event
            call = loop.call_in(current.completion)
            self._add_assistant(current.completion, call)
            if call is None or not loop.answers(call):
                return
            if self.tool_rounds >= loop.max_tool_rounds:
                yield ToolEvent("tool_limit", call, round=self.tool_rounds)
                return
            yield ToolEvent("tool_run", call, round=self.tool_rounds)
            output, error = loop.execute(call)
            message = loop.result_message(call, output)
            current.result = harmony.render_messages(
                [message], history=self.messages, tokenizer=tok, builtin_tools=loop.namespaces
            )
            self.messages.append(message)
            yield ToolEvent("tool_result", call, output, error, round=self.tool_rounds)
            self.tool_rounds += 1
            prompt = self.history + [tok.start_id] + tok.encode("assistant")

    def _add_assistant(self, completion: list[int], call: ToolCall | None) -> None:
        """The completion as an OpenAI-shaped assistant message; the call it ends with gets the
        loop's id (unique across the conversation)."""
        reply = harmony.parse_completion(completion, self.loop.tokenizer)
        message: dict = {"role": "assistant", "content": reply["content"]}
        if reply["reasoning"]:
            message["reasoning"] = reply["reasoning"]
        if reply["tool_calls"]:
            calls = reply["tool_calls"]
            if call is not None:
                calls[-1] = {**calls[-1], "id": call.id}
                calls[-1]["function"] = {**calls[-1]["function"], "name": call.name}
            message["tool_calls"] = calls
        self.messages.append(message)
