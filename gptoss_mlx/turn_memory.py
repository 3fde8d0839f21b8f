"""The assistant turns a server generated, so it recognizes them when a client sends them back.

Chat clients send the conversation whole with each request, assistant turns as they understood
them: often without the reasoning (Chat Completions has no official field for it), sometimes
reformatted. Harmony wants an assistant turn rendered as the model wrote it: without the
reasoning of a tool-calling turn the model forgets why it called the tool, and a turn re-rendered
from its text is not the tokens the model sampled (header order, tokenization), so a prompt
cache holding it would no longer be a prefix of the next prompt.

So each generated turn is remembered (its completion ids, and the reasoning, content and tool
calls the client was given, tool calls under ids unique to the server), and :meth:`restore`
gives back, for an assistant message that is one of them:

* sent back unchanged (same content and tool calls; reasoning the same or left out): its
  ``completion_token_ids``, which ``harmony.render_prompt`` renders as the exact ids, reasoning
  included;
* changed by the client but with a tool call id of the turn and no reasoning: the turn's
  reasoning (the model sees why it made the call, in canonical rendering).

Turns are matched by tool call id, then by the ids of the calls the server ran itself (built-in
tools: a Responses client sends back ``code_interpreter_call`` / ``web_search_call`` items, which
become ``builtin_call_ids`` on the assistant message), then by their answer text. A turn in which
the server ran tools is remembered whole: its completion ids are every round's, the tool results
between them included. Bounded to the ``max_turns`` most recent; thread-safe.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .harmony import content_text, reasoning_text

__all__ = ["TurnMemory"]


@dataclass(frozen=True)
class _Turn:
    completion: tuple[int, ...]
    reasoning: str
    content: str
    calls: tuple[tuple[str, str], ...]  # (name, arguments) of each tool call, in order


def _calls(message: Mapping) -> tuple[tuple[str, str], ...]:
    out = []
    for call in message.get("tool_calls") or ():
        fn = (call.get("function") or {}) if isinstance(call, Mapping) else {}
        out.append((str(fn.get("name")), fn.get("arguments")))
    return tuple(out)


class TurnMemory:
    """Generated assistant turns by tool call id and by answer text (see the module docstring)."""

    def __init__(self, max_turns: int = 1024) -> None:
        self.max_turns = max_turns
        self._by_call: OrderedDict[str, _Turn] = OrderedDict()
        self._by_answer: OrderedDict[str, _Turn] = OrderedDict()
        self._lock = threading.Lock()

    def remember(
        self,
        completion: Sequence[int],
        reasoning: str,
        content: str,
        tool_calls: Sequence[Mapping],
        builtin_call_ids: Sequence[str] = (),
    ) -> None:
        """Keep a generated turn: its completion ids (after the prompt, all of it) and what the
        client was given (tool calls in OpenAI shape, with the ids the client saw; the ids of the
        calls the server ran)."""
        turn = _Turn(
            tuple(completion), reasoning, content, _calls({"tool_calls": list(tool_calls)})
        )
        with self._lock:
            ids = [str(call["id"]) for call in tool_calls] + list(builtin_call_ids)
            for i in ids:
                self._put(self._by_call, i, turn)
            if not tool_calls and content:
                self._put(self._by_answer, content, turn)

    def _put(self, table: OrderedDict, key: str, turn: _Turn) -> None:
        table[key] = turn
        table.move_to_end(key)
        while len(table) > self.max_turns:
            table.popitem(last=False)

    def _find(self, message: Mapping) -> _Turn | None:
        ids = [str(c.get("id")) for c in message.get("tool_calls") or () if isinstance(c, Mapping)]
        ids += [str(i) for i in message.get("builtin_call_ids") or ()]
        with self._lock:
            found = next((self._by_call[i] for i in ids if i in self._by_call), None)
            if found is not None or message.get("tool_calls"):
                return found
            return self._by_answer.get(content_text(message.get("content")))

    def restore(self, messages: Sequence[Mapping]) -> list[Mapping]:
        """``messages`` with each assistant turn this server generated given back its
        ``completion_token_ids`` (sent back unchanged) or its ``reasoning`` (changed, reasoning
        left out); other messages as they are, but an assistant message that only names calls
        the server ran, in a turn it no longer remembers, is left out (nothing to render)."""
        out = []
        for message in messages:
            turn = self._find(message) if message.get("role") == "assistant" else None
            if turn is None and message.get("builtin_call_ids"):
                if not (
                    content_text(message.get("content"))
                    or reasoning_text(message)
                    or message.get("tool_calls")
                ):
                    continue
            if turn is not None:
                reasoning = reasoning_text(message)
                if (
                    content_text(message.get("content")) == turn.content
                    and _calls(message) == turn.calls
                    and reasoning in ("", turn.reasoning)
                ):
                    message = {**message, "completion_token_ids": list(turn.completion)}
                elif not reasoning and turn.reasoning and message.get("tool_calls"):
                    message = {**message, "reasoning": turn.reasoning}
            out.append(message)
        return out
