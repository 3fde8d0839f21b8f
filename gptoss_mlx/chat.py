"""Multi-turn chat that keeps the KV cache across turns, so each turn prefills only its new tokens.

The conversation is kept twice:

* ``messages``: OpenAI-shaped messages (system, user, and assistant turns as parsed), used to
  re-render the whole prompt when the system message changes (``set_reasoning_effort``) and
  available to callers;
* ``history``: the *token* history by harmony's rules (``harmony.chat_history_tokens``: each
  completion as sampled, its ``<|return|>`` stored as ``<|end|>``). The next prompt is
  ``history + harmony.render_turn([user message])``, which extends what the cache holds, rather
  than a re-rendering (not prefix-stable: see ``gptoss_mlx/harmony/render.py``).

Before each generation the session compares the tokens the cache holds with the new prompt and
prefills only what differs: normally just the new turn, plus at most the last sampled token (not
yet fed when a turn ends at ``max_tokens``) and an ``<|end|>`` (replacing a fed ``<|return|>``,
which takes trimming one position off the cache).

Tools: a turn runs through a :class:`~gptoss_mlx.tool_loop.ToolLoop`. When the model calls a tool
the session has (a function with a callable, ``browser``, ``python``), the loop runs it, appends
the result and generates again from the same cache: each round prefills only the tool result
and the next ``<|start|>assistant``. The events stream the tokens of every round and a
:class:`~gptoss_mlx.tool_loop.ToolEvent` for each call run and each result.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import harmony
from .constrain import compile_constraint
from .errors import GptOssError
from .generate import GenerationEvent, GenerationStats, stream_generate
from .model import GptOssModel
from .sample import check_sampling
from .tokenizer import Tokenizer, default_tokenizer
from .tool_loop import DEFAULT_MAX_TOOL_ROUNDS, ToolCall, ToolEvent, ToolLoop, ToolTurn
from .tools import BuiltinTool

__all__ = ["ChatSession", "trim_cache"]


def trim_cache(cache: list, n: int) -> bool:
    """Drop the last ``n`` positions from every layer's cache; False (nothing changed) when a
    layer cannot, as a sliding ring cannot for n > 1 (see ``SlidingCache.can_trim``)."""
    if not all(c.can_trim(n) for c in cache):
        return False
    return all(c.trim(n) for c in cache)


@dataclass
class ChatStats:
    """Counters of a chat session (since the last reset)."""

    turns: int = 0
    prefilled_tokens: int = 0  # tokens run through prefill, all turns
    generated_tokens: int = 0
    full_prefills: int = 0  # generations that prefilled from scratch (first, after a reset)
    generations: int = 0  # one per turn, plus one per tool round
    tool_rounds: int = 0  # rounds that ran a tool, all turns
    last: GenerationStats | None = None
    last_prefill_tokens: int = 0  # the last generation's
    last_turn_prefills: list[int] = field(default_factory=list)  # each generation of the last turn
    history_tokens: int = 0
    cached_tokens: int = 0
    cache_bytes: int = 0

    def summary(self) -> str:
        lines = [
            f"turns: {self.turns} | history: {self.history_tokens} tokens | cache: "
            f"{self.cached_tokens} tokens, {self.cache_bytes / 1e6:.1f} MB",
            f"prefilled: {self.prefilled_tokens} tokens in all, "
            f"{sum(self.last_turn_prefills)} last turn | generated: {self.generated_tokens} "
            f"tokens | full prefills: {self.full_prefills}",
        ]
        if self.tool_rounds:
            rounds = " + ".join(str(n) for n in self.last_turn_prefills)
            lines.append(f"tool rounds: {self.tool_rounds} | last turn prefilled: {rounds}")
        if self.last is not None:
            lines.append("last turn: " + self.last.summary())
        return "\n".join(lines)


class ChatSession:
    """A conversation with a model, its KV cache kept between turns.

    ``send(text)`` yields :class:`GenerationEvent` s for the assistant's reply (the last one of
    each generation with ``stats``) and, between the rounds of a tool loop, :class:`ToolEvent` s;
    after it is exhausted (or closed early) the reply is part of the history.
    Sampling keywords (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``,
    ``prefill_chunk``) are passed on to :func:`stream_generate`; with a ``seed``, generation ``i``
    of the session uses ``seed + i`` so a whole session replays identically.

    Tools: ``tools`` are Python callables (their JSON schema from type hints and docstring),
    ``(OpenAI function tool dict, callable)`` pairs, or bare dicts (declared only: a call to one
    ends the turn, for the caller to handle). ``builtin_tools`` are ``"browser"``, ``"python"``
    or configured ``gptoss_mlx.tools.Browser(...)`` / ``Python(...)`` instances.
    ``max_tool_rounds`` bounds the rounds that run tools in one turn; ``approve(call) -> bool``,
    if given, is asked before each call runs. :meth:`close` stops the tools' processes.

    Structured output: ``response_format`` constrains every generation's final answer, and
    ``tool_choice`` (``"auto"``, ``"none"``, ``"required"``, or a named function) the first
    generation of each turn (the rounds after a tool ran are ``"auto"``, else a required call
    would repeat until ``max_tool_rounds``); ``strict`` functions' arguments always follow their
    schema (see :func:`stream_generate`). With a format or a forced tool choice, the model is
    offered function calls, not the built-in tools. One that cannot be enforced is a
    :class:`GptOssError` here.
    """

    def __init__(
        self,
        model: GptOssModel,
        tokenizer: Tokenizer | None = None,
        *,
        system: str | None = None,
        reasoning_effort: str = "medium",
        tools: Sequence[Any] | None = None,
        builtin_tools: Sequence[str | BuiltinTool] = (),
        max_tool_rounds: int = DEFAULT_MAX_TOOL_ROUNDS,
        approve: Callable[[ToolCall], bool] | None = None,
        tool_choice: str | Mapping | None = None,
        response_format: Mapping | None = None,
        current_date: str | datetime.date | None = None,
        **generation: Any,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer or default_tokenizer()
        self.system = system
        self.reasoning_effort = harmony.check_reasoning_effort(reasoning_effort)
        self.tool_loop = ToolLoop(
            tools or (),
            builtin_tools,
            max_tool_rounds=max_tool_rounds,
            approve=approve,
            tokenizer=self.tokenizer,
        )
        self.tool_choice = tool_choice
        self.response_format = response_format
        compile_constraint(
            self.tokenizer,
            response_format=response_format,
            tools=self.tool_loop.function_specs,
            tool_choice=tool_choice,
        )
        self.current_date = current_date
        check_sampling(
            generation.get("temperature", 1.0),
            generation.get("top_p", 1.0),
            generation.get("top_k", 0),
            generation.get("min_p", 0.0),
        )
        unknown = set(generation) - {
            "max_tokens",
            "temperature",
            "top_p",
            "top_k",
            "min_p",
            "seed",
            "prefill_chunk",
            "progress",
        }
        if unknown:
            raise GptOssError(f"unknown ChatSession option(s): {', '.join(sorted(unknown))}")
        self.generation = generation
        self.reset()

    # -- state ---------------------------------------------------------------------------------

    def reset(self) -> None:
        """Forget the conversation and empty the cache (the tools forget their state too)."""
        self.tool_loop.reset()
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.history: list[int] | None = None  # None: render the prompt from `messages`
        self._turn_started = False
        self._drop_cache()
        self.stats = ChatStats()

    def _drop_cache(self) -> None:
        self.cache = self.model.make_cache()
        self.cached: list[int] = []  # the tokens the cache holds, in order

    def set_reasoning_effort(self, effort: str) -> None:
        """Change the reasoning effort. It lives in the system message, the first thing in the
        cache, so the next turn re-renders the conversation and prefills it all again."""
        self.reasoning_effort = harmony.check_reasoning_effort(effort)
        self.history = None
        self._drop_cache()

    def close(self) -> None:
        """Stop the tools' processes and remove their files (the python tool's scratch)."""
        self.tool_loop.close()

    def __enter__(self) -> ChatSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- a turn ------------------------------------------------------------------------------

    def next_prompt(self, user_text: str) -> list[int]:
        """The full prompt (token ids) the next turn would run for ``user_text``."""
        user = {"role": "user", "content": user_text}
        if self.history is None:
            return harmony.render_prompt(
                self.messages + [user],
                tools=self.tool_loop.function_specs,
                builtin_tools=self.tool_loop.namespaces,
                reasoning_effort=self.reasoning_effort,
                current_date=self.current_date,
                response_format=self.response_format,
                tokenizer=self.tokenizer,
            )
        return self.history + harmony.render_turn([user], tokenizer=self.tokenizer)

    def send(self, user_text: str) -> Iterator[GenerationEvent | ToolEvent]:
        """The assistant's reply to ``user_text``: one event per token, and the tool loop's
        events between rounds when the model calls tools."""
        if not isinstance(user_text, str):
            raise GptOssError("a chat message must be text")
        turn = self.tool_loop.run(self.next_prompt(user_text), self._generate)
        self.stats.last_turn_prefills = []
        self._turn_started = True  # the next generation is the turn's first (tool_choice)
        return self._run(user_text, turn)

    def _run(self, user_text: str, turn: ToolTurn) -> Iterator[GenerationEvent | ToolEvent]:
        try:
            yield from turn
        finally:
            turn.close()
            self._record(user_text, turn)

    def _generate(self, prompt: list[int]) -> Iterator[GenerationEvent]:
        """One generation from ``prompt`` (the whole conversation's tokens), prefilling only what
        the cache does not hold yet; afterwards the cache record matches the cache."""
        reuse = harmony.common_prefix_length(self.cached, prompt)
        reuse = min(reuse, len(prompt) - 1)  # at least one token must run to get logits
        if not trim_cache(self.cache, len(self.cached) - reuse):
            self._drop_cache()
            reuse = 0
        if reuse == 0:
            self.stats.full_prefills += 1
        new = prompt[reuse:]
        self.cached = prompt[:reuse]
        self.stats.last_prefill_tokens = len(new)
        self.stats.last_turn_prefills.append(len(new))
        self.stats.prefilled_tokens += len(new)
        options = dict(self.generation)
        if options.get("seed") is not None:
            options["seed"] = int(options["seed"]) + self.stats.generations
        self.stats.generations += 1
        tool_choice, self._turn_started = (self.tool_choice if self._turn_started else None), False
        completion: list[int] = []
        try:
            for event in stream_generate(
                self.model,
                new,
                tokenizer=self.tokenizer,
                cache=self.cache,
                tools=self.tool_loop.function_specs,
                tool_choice=tool_choice,
                response_format=self.response_format,
                **options,
            ):
                completion.append(event.token)
                if event.stats is not None:
                    self.stats.last = event.stats
                yield event
        finally:
            self.stats.generated_tokens += len(completion)
            known = prompt + completion
            offset = getattr(self.cache[0], "offset", None) if self.cache else None
            if offset is None or offset > len(known):  # interrupted before a fed token was read
                self._drop_cache()
            else:
                self.cached = known[:offset]

    def _record(self, user_text: str, turn: ToolTurn) -> None:
        """Make the turn (finished or cut short) part of the conversation."""
        self.history = turn.history
        self.messages += [{"role": "user", "content": user_text}, *turn.messages]
        self.stats.turns += 1
        self.stats.tool_rounds += turn.tool_rounds
        self.stats.history_tokens = len(self.history)
        self.stats.cached_tokens = len(self.cached)
        self.stats.cache_bytes = sum(getattr(c, "nbytes", 0) for c in self.cache)
