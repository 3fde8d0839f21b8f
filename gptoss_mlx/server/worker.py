"""One worker thread owns the model: requests queue FIFO and run one at a time.

HTTP handlers only parse, :meth:`Worker.submit` a :class:`Job` (prompt ids, generation keywords
and, for a request whose built-in tools the server runs, its tool loop) and read its events from
the event loop (:meth:`Job.events`). The worker runs each job through ``turn(job, generate)``,
whose rounds (one, or one per tool call in a tool loop) are ``generate(prompt, options)``: the
prompt cache's ``stream_generate`` through ``round(prompt, options, cancelled)``. It hands over
every event as it comes. Generation asks ``cancelled`` (the job's cancel flag) as it draws each
token, so a client that goes away stops its generation within two tokens, or before the next
tool call runs, and frees the model for the next request.

Across ranks (a model sharded over several processes, :mod:`gptoss_mlx.distributed`) rank 0's
worker is the leader: it waits for jobs inside ``Ranks.idle`` (the other ranks get its ticks),
shares each round's prompt and options before running it, and shares the end when it stops.
The other ranks run no server and no tools: their worker :meth:`~Worker.follow` s, running
every shared round through the same kind of prompt cache, so every rank makes the same steps.
The cancel flag needs no message of its own: rank 0's travels with each token (``cancelled``
above), so every rank stops at the same token. Across ranks the worker has no thread of its
own: it :meth:`~Worker.run` s on the main thread, the one MLX tells that a collective failed
(elsewhere the next collective waits on the lost connection for ever), and a rank that goes
away ends this one with a one-line error.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from .. import distributed
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


# round(prompt, options, cancelled): one generation; generate(prompt, options): one round of a
# job; turn(job, generate): the job's events, its rounds run by generate.
Round = Callable[[list[int], dict[str, Any], Callable[[], bool] | None], Iterator[GenerationEvent]]
Generate = Callable[[list[int], dict[str, Any]], Iterator[GenerationEvent]]
RunTurn = Callable[[Job, Generate], Iterator[GenerationEvent | ToolStep]]


class Worker:
    """Runs :class:`Job` s one after another through ``turn(job, generate)``, on a thread of its
    own.

    At most ``max_queue`` jobs wait while one runs; :meth:`submit` raises :class:`QueueFull`
    beyond. The thread starts with the first job. ``ranks``: this process's part when the model
    is sharded over several (see the module's docstring): then there is no thread, the caller
    :meth:`run` s the worker (rank 0) or has it :meth:`follow` (the others) on its main thread.
    """

    def __init__(
        self,
        turn: RunTurn,
        round: Round,
        max_queue: int,
        ranks: distributed.Ranks | None = None,
    ) -> None:
        self.turn, self.round = turn, round
        self.max_queue = max_queue
        self.ranks = ranks if ranks is not None else distributed.Ranks(None)
        self._queue: collections.deque[Job] = collections.deque()
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running: Job | None = None
        self._stopping = False
        self._started, self._ended = threading.Event(), threading.Event()  # run() began, returned

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
            if self._thread is None and self.ranks.size == 1:
                self._thread = threading.Thread(target=self.run, name="gptoss-mlx", daemon=True)
                self._thread.start()
            self._cond.notify()

    def stop(self) -> None:
        """Cancel what waits and runs; once :meth:`run` was called, wait (30 s at most) for it to
        return, the running job stopped."""
        with self._cond:
            self._stopping = True
            for job in self._queue:
                job.cancel()
            self._cond.notify()
        if self._started.is_set():
            self._ended.wait(timeout=30)

    def _next(self) -> Job | None:
        with self._cond:
            self._running = None
        with self.ranks.idle(), self._cond:  # across ranks, the others get ticks meanwhile
            while not self._queue and not self._stopping:
                self._cond.wait()
            self._running = job = self._queue.popleft() if self._queue else None
        return job

    def run(self) -> None:
        """Run the queued jobs as they come until :meth:`stop`. Across ranks, rank 0's part, on
        its main thread; the other ranks learn of the end when it returns."""
        self._started.set()
        try:
            while (job := self._next()) is not None:
                if not job.cancelled:
                    self._run_job(job)
                job.put(_DONE)
            self.ranks.share(None)  # across ranks: the others' end
        except RuntimeError as e:
            _end_if_a_rank_failed(e)
            raise
        finally:
            self._ended.set()

    def _run_job(self, job: Job) -> None:
        try:
            events = self.turn(job, self._leading(job))
            try:
                for event in events:
                    job.put(event)
                    if (job.cancelled or self._stopping) and isinstance(event, ToolStep):
                        break  # between rounds (a break inside one would leave the ranks apart)
            finally:
                events.close()
        except GptOssError as e:
            job.put(e)
        except Exception as e:  # a bug: the client gets a 500, the log the traceback
            _end_if_a_rank_failed(e)
            log.exception("generation failed")
            job.put(e)

    def _leading(self, job: Job) -> Generate:
        """The job's rounds: each handed to the other ranks, then run, until the job is
        cancelled."""

        def generate(prompt: list[int], options: dict[str, Any]) -> Iterator[GenerationEvent]:
            self.ranks.share({"prompt": prompt, "options": options})
            return self.round(prompt, options, lambda: job.cancelled or self._stopping)

        return generate

    def follow(self) -> None:
        """The part of a rank other than 0 (which runs the server): run every round rank 0
        shares, as it does, until it shares the end. GptOssError when another rank went away."""
        try:
            while (shared := self.ranks.receive()) is not None:
                try:
                    for _ in self.round(shared["prompt"], shared["options"], None):
                        pass
                except GptOssError:  # rank 0 met it too, and tells its client
                    pass
        except RuntimeError as e:
            failure = distributed.peer_failure(e)
            if failure is None:
                raise
            raise failure from None


def _end_if_a_rank_failed(error: BaseException) -> None:
    """End this process with one line when `error` is a collective that failed because another
    rank went away: the server cannot go on without it."""
    failure = distributed.peer_failure(error)
    if failure is not None:
        distributed.fail(str(failure))
