"""Multi-turn chat that keeps the KV cache across turns, so each turn prefills only its new tokens.

The conversation is kept twice:

* ``messages``: OpenAI-shaped messages (system, user, and assistant turns as parsed), used to
  re-render the whole prompt when the system message changes (``set_reasoning_effort``) and
  available to callers;
* ``history``: the *token* history by harmony's rules (``harmony.chat_history_tokens``: each
  completion as sampled, its ``<|return|>`` stored as ``<|end|>``). The next prompt is
  ``history + harmony.render_turn([user message])``, which extends what the cache holds, rather
  than a re-rendering (not prefix-stable: see ``gptoss_mlx/harmony/render.py``).

Before each turn the session compares the tokens the cache holds with the new prompt and prefills
only what differs: normally just the new turn, plus at most the last sampled token (not yet fed
when a turn ends at ``max_tokens``) and an ``<|end|>`` (replacing a fed ``<|return|>``, which
takes trimming one position off the cache).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from . import harmony
from .constrain import compile_constraint
from .errors import GptOssError
from .generate import GenerationEvent, GenerationStats, stream_generate
from .model import GptOssModel
from .sample import check_sampling
from .tokenizer import Tokenizer, default_tokenizer

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
    full_prefills: int = 0  # turns that had to prefill from scratch (first, after a reset)
    last: GenerationStats | None = None
    last_prefill_tokens: int = 0
    history_tokens: int = 0
    cached_tokens: int = 0
    cache_bytes: int = 0

    def summary(self) -> str:
        lines = [
            f"turns: {self.turns} | history: {self.history_tokens} tokens | cache: "
            f"{self.cached_tokens} tokens, {self.cache_bytes / 1e6:.1f} MB",
            f"prefilled: {self.prefilled_tokens} tokens in all, {self.last_prefill_tokens} "
            f"last turn | generated: {self.generated_tokens} tokens | full prefills: "
            f"{self.full_prefills}",
        ]
        if self.last is not None:
            lines.append("last turn: " + self.last.summary())
        return "\n".join(lines)


@dataclass
class _Turn:
    prompt: list[int]
    completion: list[int] = field(default_factory=list)


class ChatSession:
    """A conversation with a model, its KV cache kept between turns.

    ``send(text)`` yields :class:`GenerationEvent` s for the assistant's reply (the last one with
    ``stats``); after it is exhausted (or closed early) the reply is part of the history.
    Sampling keywords (``max_tokens``, ``temperature``, ``top_p``, ``top_k``, ``min_p``, ``seed``,
    ``prefill_chunk``) are passed on to :func:`stream_generate`; with a ``seed``, turn ``i`` uses
    ``seed + i`` so a whole session replays identically. ``response_format`` and ``tool_choice``
    (with ``tools``) constrain every turn's answer and tool calls as in :func:`stream_generate`;
    one that cannot be enforced is a :class:`GptOssError` here.
    """

    def __init__(
        self,
        model: GptOssModel,
        tokenizer: Tokenizer | None = None,
        *,
        system: str | None = None,
        reasoning_effort: str = "medium",
        tools: Sequence[Mapping] | None = None,
        tool_choice: str | Mapping | None = None,
        response_format: Mapping | None = None,
        current_date: str | datetime.date | None = None,
        **generation: Any,
    ) -> None:
        self.model = model
        self.tokenizer = tokenizer or default_tokenizer()
        self.system = system
        self.reasoning_effort = harmony.check_reasoning_effort(reasoning_effort)
        self.tools = tools
        self.tool_choice = tool_choice
        self.response_format = response_format
        compile_constraint(
            self.tokenizer, response_format=response_format, tools=tools, tool_choice=tool_choice
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
        """Forget the conversation and empty the cache."""
        self.messages: list[dict] = []
        if self.system:
            self.messages.append({"role": "system", "content": self.system})
        self.history: list[int] | None = None  # None: render the prompt from `messages`
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

    # -- a turn ------------------------------------------------------------------------------

    def next_prompt(self, user_text: str) -> list[int]:
        """The full prompt (token ids) the next turn would run for ``user_text``."""
        user = {"role": "user", "content": user_text}
        if self.history is None:
            return harmony.render_prompt(
                self.messages + [user],
                tools=self.tools,
                reasoning_effort=self.reasoning_effort,
                current_date=self.current_date,
                response_format=self.response_format,
                tokenizer=self.tokenizer,
            )
        return self.history + harmony.render_turn([user], tokenizer=self.tokenizer)

    def send(self, user_text: str) -> Iterator[GenerationEvent]:
        """The assistant's reply to ``user_text``, one event per token."""
        if not isinstance(user_text, str):
            raise GptOssError("a chat message must be text")
        prompt = self.next_prompt(user_text)
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
        self.stats.prefilled_tokens += len(new)
        return self._run(user_text, prompt, new)

    def _run(self, user_text: str, prompt: list[int], new: list[int]) -> Iterator[GenerationEvent]:
        options = dict(self.generation)
        if options.get("seed") is not None:
            options["seed"] = int(options["seed"]) + self.stats.turns
        turn = _Turn(prompt)
        try:
            for event in stream_generate(
                self.model,
                new,
                tokenizer=self.tokenizer,
                cache=self.cache,
                tools=self.tools,
                tool_choice=self.tool_choice,
                response_format=self.response_format,
                **options,
            ):
                turn.completion.append(event.token)
                if event.stats is not None:
                    self.stats.last = event.stats
                yield event
        finally:
            self._record(user_text, turn)

    def _record(self, user_text: str, turn: _Turn) -> None:
        """Make the turn (finished or cut short) part of the conversation and the cache record."""
        known = turn.prompt + turn.completion
        offset = getattr(self.cache[0], "offset", None) if self.cache else None
        if offset is None or offset > len(known):  # interrupted before a fed token was read
            self._drop_cache()
        else:
            self.cached = known[:offset]
        self.history = harmony.chat_history_tokens(turn.prompt, turn.completion, self.tokenizer)
        reply = harmony.parse_completion(turn.completion, self.tokenizer)
        assistant = {"role": "assistant", "content": reply["content"]}
        if reply["reasoning"]:
            assistant["reasoning"] = reply["reasoning"]
        if reply["tool_calls"]:
            assistant["tool_calls"] = reply["tool_calls"]
        self.messages += [{"role": "user", "content": user_text}, assistant]
        self.stats.turns += 1
        self.stats.generated_tokens += len(turn.completion)
        self.stats.history_tokens = len(self.history)
        self.stats.cached_tokens = len(self.cached)
        self.stats.cache_bytes = sum(getattr(c, "nbytes", 0) for c in self.cache)
