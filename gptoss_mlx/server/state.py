"""What one server holds: the model and tokenizer, its options, the prompt cache and the worker
that owns them, the built-in tools it runs, the turns it generated and the responses it stored.
Across ranks every rank holds one (rank 0's serves, the others' follow it: see :mod:`.worker`)."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from .. import distributed, harmony
from ..errors import GptOssError
from ..generate import GenerationEvent, LanguageModel, check_context
from ..prompt_cache import PromptCache
from ..tokenizer import Tokenizer
from ..tool_loop import ToolLoop
from ..turn_memory import TurnMemory
from .builtin import ServerTools, run_turn
from .protocol import RequestError, ServerOptions, ToolStep, Turn
from .worker import Generate, Job, Worker

__all__ = ["ServerState"]


class ResponseStore:
    """Responses kept for ``previous_response_id``: the conversation each one ends (chat-shaped
    messages, its output included), the ``max_items`` most recent."""

    def __init__(self, max_items: int) -> None:
        self.max_items = max_items
        self._items: OrderedDict[str, list[dict]] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, response_id: str, conversation: list[dict]) -> None:
        with self._lock:
            self._items[response_id] = conversation
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)

    def get(self, response_id: str) -> list[dict] | None:
        with self._lock:
            return self._items.get(response_id)


class ServerState:
    """The server's model, options and memory; the adapters' one handle on them.

    For a model sharded over ranks every rank builds one, together (``ranks``: this process's
    part): each takes rank 0's prompt-cache size, so that their caches make the same decisions.
    """

    def __init__(
        self,
        model: LanguageModel,
        tokenizer: Tokenizer,
        options: ServerOptions,
        ranks: distributed.Ranks | None = None,
    ):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.started = int(time.time())
        self.turns = TurnMemory()
        self.responses = ResponseStore(options.max_stored_responses)
        ranks = ranks if ranks is not None else distributed.Ranks(None)
        options.prompt_cache_bytes = ranks.share(options.prompt_cache_bytes)
        self.prompt_cache = PromptCache(
            model, options.prompt_cache_bytes, boundary_token=tokenizer.start_id
        )
        self.tools = ServerTools(options.builtin_tools, options.max_tool_rounds)
        self.worker = Worker(self._turn, self._round, options.max_queue, ranks)

    def _turn(self, job: Job, generate: Generate) -> Iterator[GenerationEvent | ToolStep]:
        """A job's events, its rounds run by ``generate(prompt, options)`` (the worker's: it
        hands each round to the other ranks). Runs on the worker: the only place the model is
        used."""
        if job.tool_loop is None:
            return generate(job.prompt, job.options)
        return run_turn(job.tool_loop, job.prompt, job.options, generate)

    def _round(
        self, prompt: list[int], options: dict[str, Any], cancelled: Callable[[], bool] | None
    ) -> Iterator[GenerationEvent]:
        """One generation, through the prompt cache."""
        return self.prompt_cache.stream_generate(
            prompt, tokenizer=self.tokenizer, cancelled=cancelled, **options
        )

    def render(
        self,
        messages: Sequence[Mapping],
        reasoning_effort: str,
        tools: list[dict] | None = None,
        response_format: Mapping | None = None,
        builtin: Sequence[str] = (),
    ) -> list[int]:
        """The harmony prompt for a request's messages (with the built-in tools ``builtin``
        declared), the turns this server generated rendered as the model wrote them (see
        ``TurnMemory``)."""
        try:
            prompt = harmony.render_prompt(
                self.turns.restore(messages),
                tools=tools,
                reasoning_effort=reasoning_effort,
                response_format=response_format,
                builtin_tools=self.tools.namespaces(builtin),
                tokenizer=self.tokenizer,
            )
        except RequestError:
            raise
        except GptOssError as e:
            raise RequestError(str(e), param="messages") from None
        try:
            check_context(self.model, len(prompt))
        except GptOssError as e:
            raise RequestError(str(e), param="messages", code="context_length_exceeded") from None
        return prompt

    def tool_loop(
        self, builtin: Sequence[str], functions: list[dict] | None, max_tool_rounds: int
    ) -> ToolLoop | None:
        """The tool loop of a request that gets the built-in tools ``builtin`` (None: none)."""
        if not builtin:
            return None
        return self.tools.loop(builtin, functions, max_tool_rounds, self.tokenizer)

    def submit(
        self, prompt: list[int], options: dict[str, Any], tool_loop: ToolLoop | None = None
    ) -> Job:
        """Queue a generation (from the event loop); :class:`QueueFull` when the queue is."""
        job = Job(prompt, options, tool_loop)
        self.worker.submit(job)
        return job

    def remember(self, turn: Turn, reasoning: str) -> None:
        """Keep a finished turn so that it renders as written when a client sends it back:
        ``reasoning`` as the client was shown it, the calls the server ran by their ids."""
        self.turns.remember(
            turn.tokens,
            reasoning,
            turn.content_text,
            turn.tool_calls,
            [c.id for c in turn.server_calls],
        )
