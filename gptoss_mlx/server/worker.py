"""One worker thread owns the model: requests queue FIFO and run one at a time.

HTTP handlers only parse, :meth:`Worker.submit` a :class:`Job` (prompt ids, generation keywords
and, for a request whose built-in tools the server runs, its tool loop) and read its events from
the event loop (:meth:`Job.events`). The worker runs each job through ``generate(job)`` (the
prompt cache's ``stream_generate``, round after round with a tool loop) and hands over every
event as it comes; between two events it checks the job's cancel flag, so a client that goes
away stops its generation within a token (or before the next tool call runs) and frees the model
for the next request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from ..errors import GptOssError
from ..generate import GenerationEvent
from ..tool_loop import ToolLoop
from .protocol import RequestError, ToolStep

__all__ = ["Job", "QueueFull", "Worker"]

log = logging.getLogger("gptoss_mlx.server")

_DONE = object()


class QueueFull(RequestError):
    """More requests are waiting than the server queues (``--max-queue``): a 503."""

    def __init__(self, message: str) -> None:
        super().__init__(message, status=503, code="server_busy", type="server_error")


class Job:
    """A generation to run: ``prompt`` (token ids) with ``options`` (``stream_generate``
    keywords), through ``tool_loop`` when the server runs tools for it. Its events reach the event
    loop that created it, in order; the worker's exception, if any, is raised there after them."""

    def __init__(
        self, prompt: list[int], options: dict[str, Any], tool_loop: ToolLoop | None = None
    ) -> None:
        self.prompt, self.options, self.tool_loop = prompt, options, tool_loop
        self._loop = asyncio.get_running_loop()
        self._items: collections.deque = collections.deque()
        self._lock = threading.Lock()
        self._waiting = False  # the consumer waits on _wake
        self._wake = asyncio.Event()
        self._cancelled = threading.Event()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        """Stop it (before it starts, or after the token being generated); safe from any thread."""
        self._cancelled.set()

    def put(self, item: Any) -> None:
        """Hand an event (or the end, or an exception) to the consumer; from the worker thread."""
        with self._lock:
            self._items.append(item)
            wake, self._waiting = self._waiting, False
        if wake:
            try:
                self._loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                self.cancel()

    async def events(self) -> AsyncIterator[GenerationEvent | ToolStep]:
        """The job's events as they are generated (the loop wakes only when it has to wait)."""
        while True:
            with self._lock:
                items = list(self._items)
                self._items.clear()
                if not items:
                    self._wake.clear()
                    self._waiting = True
            if not items:
                await self._wake.wait()
                continue
            for item in items:
                if item is _DONE:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item


class Worker:
    """The thread that runs :class:`Job` s one after another through ``generate(job)``.

    At most ``max_queue`` jobs wait while one runs; :meth:`submit` raises :class:`QueueFull`
    beyond. The thread starts with the first job.
    """

    def __init__(
        self,
        generate: Callable[[Job], Iterator[GenerationEvent | ToolStep]],
        max_queue: int,
    ) -> None:
        self.generate = generate
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running: Job | None = None
        self._stopping = False

    @property
    def waiting(self) -> int:
        """Jobs queued behind the running one."""
        return len(self._queue)

    def submit(self, job: Job) -> None:
        with self._cond:
            if self._stopping:
                raise RequestError("the server is shutting down", status=503, type="server_error")
            busy = self._running is not None or self._queue
            if busy and len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"{len(self._queue)} requests are already waiting (the most this server "
                    "queues, --max-queue); retry shortly"
                )
            self._queue.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="gptoss-mlx", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        """Cancel what waits and runs, and end the thread once the running job has stopped."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancel()
            self._cond.notify()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _next(self) -> Job | None:
        with self._cond:
            self._running = None
            while not self._queue and not self._stopping:
                self._cond.wait()
            self._running = self._queue.popleft() if self._queue else None
            return self._running

    def _run(self) -> None:
        while (job := self._next()) is not None:
            if not job.cancelled:
                self._run_job(job)
            job.put(_DONE)

    def _run_job(self, job: Job) -> None:
        try:
            events = self.generate(job)
            try:
                for event in events:
                    job.put(event)
                    if job.cancelled or self._stopping:
                        break
            finally:
                events.close()
        except GptOssError as e:
            job.put(e)
        except Exception as e:  # a bug: the client gets a 500, the log the traceback
            log.exception("generation failed")
            job.put(e)
