"""What one server holds: the model and tokenizer, its options, the prompt cache and the worker
that owns them, the turns it generated and the responses it stored."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from .. import harmony
from ..errors import GptOssError
from ..generate import GenerationEvent, LanguageModel, check_context
from ..prompt_cache import PromptCache
from ..tokenizer import Tokenizer
from ..turn_memory import TurnMemory
from .protocol import RequestError, ServerOptions, Turn
from .worker import Job, Worker

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
    """The server's model, options and memory; the adapters' one handle on them."""

    def __init__(self, model: LanguageModel, tokenizer: Tokenizer, options: ServerOptions):
        self.model, self.tokenizer, self.options = model, tokenizer, options
        self.started = int(time.time())
        self.turns = TurnMemory()
        self.responses = ResponseStore(options.max_stored_responses)
        self.prompt_cache = PromptCache(
            model, options.prompt_cache_bytes, boundary_token=tokenizer.start_id
        )
        self.worker = Worker(self._generate, options.max_queue)

    def _generate(self, prompt: list[int], options: dict[str, Any]) -> Iterator[GenerationEvent]:
        """Runs on the worker thread: the only place the model is used."""
        return self.prompt_cache.stream_generate(prompt, tokenizer=self.tokenizer, **options)

    def render(
        self,
        messages: Sequence[Mapping],
        reasoning_effort: str,
        tools: list[dict] | None = None,
        response_format: Mapping | None = None,
    ) -> list[int]:
        """The harmony prompt for a request's messages, the turns this server generated
        rendered as the model wrote them (see ``TurnMemory``)."""
        try:
            prompt = harmony.render_prompt(
                self.turns.restore(messages),
                tools=tools,
                reasoning_effort=reasoning_effort,
                response_format=response_format,
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

    def submit(self, prompt: list[int], options: dict[str, Any]) -> Job:
        """Queue a generation (from the event loop); :class:`QueueFull` when the queue is."""
        job = Job(prompt, options)
        self.worker.submit(job)
        return job

    def remember(self, turn: Turn) -> None:
        """Keep a finished turn so that it renders as written when a client sends it back."""
        self.turns.remember(
            turn.completion, turn.reasoning_text, turn.content_text, turn.tool_calls
        )
