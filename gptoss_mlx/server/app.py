"""The ASGI app: routes, authentication, and every error as OpenAI-shaped JSON.

``create_app(model, tokenizer, **options)`` returns a FastAPI app to run with uvicorn (``gptoss-mlx
serve`` does), mount in another app, or test. Routes: ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/responses``. With ``api_key``, ``/v1`` requests need
``Authorization: Bearer KEY`` (401 otherwise).

A handler reads the JSON body, lets the adapter check it and render the prompt (in a thread
pool: it tokenizes), queues the generation on the worker, and streams (SSE) or collects its
events. Any error, a malformed request as much as a bug, reaches the client as ``{"error":
{"message", "type", "param", "code"}}`` with a 4xx/5xx status, never as a traceback, and the
server goes on serving.

``serve(app, host, port)`` runs it with uvicorn. For a model sharded over several processes
(``load(..., group=...)``) rank 0 does that with ``create_app(model, ...)`` and every other rank
calls ``follow(model, tokenizer)``, which runs the generations rank 0 shares until rank 0's
server stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import threading
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import fields
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import uvicorn
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from .. import distributed
from ..errors import GptOssError
from ..generate import LanguageModel
from ..harmony import REASONING_EFFORTS
from ..sample import check_sampling
from ..tokenizer import Tokenizer, default_tokenizer
from . import chat_completions, responses
from .protocol import RequestError, ServerOptions, Turn, describe, error_body
from .state import ServerState
from .worker import Job

__all__ = ["create_app", "follow", "serve"]

log = logging.getLogger("gptoss_mlx.server")

REASONING_FORMATS = ("reasoning", "reasoning_content")


def _options(options: dict[str, Any]) -> ServerOptions:
    known = {f.name for f in fields(ServerOptions)} - {"prompt_cache_bytes"}
    unknown = set(options) - known - {"prompt_cache_gb"}
    if unknown:
        raise GptOssError(f"unknown server option(s): {', '.join(sorted(unknown))}")
    gb = options.pop("prompt_cache_gb", None)
    out = ServerOptions(**options)
    if gb is not None:
        if isinstance(gb, bool) or not isinstance(gb, (int, float)) or not gb >= 0:
            raise GptOssError(f"prompt_cache_gb must be a number >= 0, got {gb!r}")
        out.prompt_cache_bytes = int(gb * (1 << 30))
    if out.reasoning_effort not in REASONING_EFFORTS:
        raise GptOssError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}")
    if out.reasoning_format not in REASONING_FORMATS:
        raise GptOssError(f"reasoning_format must be one of {', '.join(REASONING_FORMATS)}")
    if not isinstance(out.max_queue, int) or out.max_queue < 0:
        raise GptOssError(f"max_queue must be an integer >= 0, got {out.max_queue!r}")
    if out.max_tokens is not None and (not isinstance(out.max_tokens, int) or out.max_tokens < 1):
        raise GptOssError(f"max_tokens must be an integer >= 1, got {out.max_tokens!r}")
    rounds = out.max_tool_rounds
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0:
        raise GptOssError(f"max_tool_rounds must be an integer >= 0, got {rounds!r}")
    if isinstance(out.builtin_tools, str):
        raise GptOssError("builtin_tools must be a list, e.g. ['browser', 'python']")
    check_sampling(out.temperature, out.top_p, out.top_k, out.min_p)
    return out


class _EventStream(StreamingResponse):
    """Server-sent events that call ``on_close`` however the response ends: finished, or cut off
    by the client going away (which Starlette notices while streaming)."""

    def __init__(self, events: AsyncIterator[str], on_close: Callable[[], None]) -> None:
        super().__init__(
            events,
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


async def _collect(job: Job, turn: Turn, request: Request) -> None:
    """All of the job's events into ``turn``; a client that leaves meanwhile cancels the job."""

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        job.cancel()

    watcher = asyncio.create_task(watch())
    try:
        async for event in job.events():
            turn.add(event)
    finally:
        watcher.cancel()
        job.cancel()


async def _json_body(request: Request) -> Mapping:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(f"the request body must be JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    return body


def _error_response(e: BaseException) -> JSONResponse:
    status, body = describe(e)
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


def _state(request: Request) -> ServerState:
    return request.app.state.server


# Routes are module functions that find the server in `request.app.state`: FastAPI keeps
# endpoints and dependencies in module-level caches, and a closure over the server there would
# keep its model alive after the app is gone.


async def _authorize(request: Request) -> None:
    key = _state(request).options.api_key
    if key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(
        given.strip().encode(), key.encode()
    ):
        raise RequestError(
            "missing or wrong API key: send 'Authorization: Bearer KEY' with the key the server "
            "was started with",
            status=401,
            code="invalid_api_key",
        )


open_routes = APIRouter()
v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize)])


@open_routes.get("/health")
async def health(request: Request) -> dict:
    state = _state(request)
    return {"status": "ok", "model": state.options.model_name, "waiting": state.worker.waiting}


def _model_card(state: ServerState) -> dict:
    name = state.options.model_name
    return {"id": name, "object": "model", "created": state.started, "owned_by": "gptoss-mlx"}


@v1.get("/models")
async def list_models(request: Request) -> dict:
    return {"object": "list", "data": [_model_card(_state(request))]}


@v1.get("/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> dict:
    state = _state(request)
    if model_id != state.options.model_name:
        raise RequestError(
            f"this server serves {state.options.model_name!r}, not {model_id!r}",
            param="model",
            status=404,
            code="model_not_found",
        )
    return _model_card(state)


async def _handle(request: Request, api: Any) -> Response:
    """Parse and render (off the event loop), queue, then stream or collect the events."""
    state = _state(request)
    body = await _json_body(request)
    req = await run_in_threadpool(api.parse, body, state)
    job = state.submit(req.prompt, req.options, req.tool_loop)
    turn = Turn(len(req.prompt), state.tokenizer, req.options.get("logprobs"), req.tool_loop)
    if req.stream:
        return _EventStream(api.stream(job, turn, req, state), on_close=job.cancel)
    await _collect(job, turn, request)
    return JSONResponse(api.response(turn, req, state))


@v1.post("/chat/completions")
async def create_chat_completion(request: Request) -> Response:
    return await _handle(request, chat_completions)


@v1.post("/responses")
async def create_response(request: Request) -> Response:
    return await _handle(request, responses)


async def _refused(request: Request, e: Exception) -> JSONResponse:
    return _error_response(e)


async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
    code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
    message = f"{request.method} {request.url.path}: {e.detail}"
    return JSONResponse(
        error_body(message, code=code), status_code=e.status_code, headers=e.headers
    )


async def _invalid(request: Request, e: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(f"invalid request: {e.errors()}"), status_code=400)


async def _failed(request: Request, e: Exception) -> JSONResponse:
    log.exception("request failed: %s %s", request.method, request.url.path)
    return _error_response(e)


@contextlib.asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    yield
    state: ServerState = app.state.server
    await run_in_threadpool(state.worker.stop)
    state.prompt_cache.clear()  # the memory goes back now, not when the app is collected
    state.tools.close()


def create_app(model: LanguageModel, tokenizer: Tokenizer | None = None, **options: Any) -> FastAPI:
    """The OpenAI-compatible app serving ``model``.

    ``options`` (all optional): ``model_name`` (what ``/v1/models`` lists; requests may name any
    model), ``api_key``, ``prompt_cache_gb`` (0 disables the prompt cache), ``max_queue``,
    ``reasoning_effort`` and ``reasoning_format`` (``reasoning`` or ``reasoning_content``), the
    sampling defaults ``max_tokens`` (None: the rest of the context), ``temperature``,
    ``top_p``, ``top_k``, ``min_p``, ``seed``, and ``prefill_chunk``,
    ``max_stored_responses``; ``builtin_tools`` (``"browser"``, ``"python"`` or configured
    ``gptoss_mlx.tools.Browser(...)`` / ``Python(...)``: run server-side, a fresh copy for each
    request, see :mod:`gptoss_mlx.server.builtin`) and ``max_tool_rounds``. Bad options are a
    :class:`GptOssError`.

    A model sharded over ranks is served by rank 0, the others running :func:`follow` (started
    at about the same time: building the app waits for them).
    """
    settings = _options(dict(options))
    ranks = _ranks(model, leader=True)
    if isinstance(model, nn.Module):
        # MLX streams belong to threads: an array the model holds unevaluated (a private buffer
        # such as RoPE's periods) could not be evaluated on the worker thread. Evaluate it here.
        mx.eval(model)
    app = FastAPI(title="gptoss-mlx", lifespan=_lifespan)
    app.state.server = ServerState(model, tokenizer or default_tokenizer(), settings, ranks)
    app.include_router(open_routes)
    app.include_router(v1)
    app.add_exception_handler(GptOssError, _refused)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(Exception, _failed)
    return app


def serve(app: FastAPI, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Serve ``app`` (from :func:`create_app`) on http://host:port until its server stops.

    For a model sharded over ranks this is rank 0's part: uvicorn answers on a thread of its own
    while the calling thread, the main one, runs the worker (MLX tells only the main thread
    that a collective failed). When the server stops the other ranks' :func:`follow` returns.
    A :class:`GptOssError` when it cannot listen there (uvicorn's log says why).
    """
    worker = app.state.server.worker
    if worker.ranks.size == 1:
        uvicorn.run(app, host=host, port=port, log_level=log_level)
        return
    server = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level=log_level))

    def answer() -> None:
        try:
            server.run()
        finally:  # stopped, or never started: the worker ends, and tells the other ranks
            worker.stop()

    thread = threading.Thread(target=answer, name="gptoss-http", daemon=True)
    thread.start()
    worker.run()
    thread.join()
    if not server.started:
        raise GptOssError(f"cannot serve on http://{host}:{port}; the other ranks were stopped")


def follow(model: LanguageModel, tokenizer: Tokenizer | None = None) -> None:
    """A rank other than 0's part in serving a model sharded over ranks: run the generations
    rank 0's :func:`create_app` shares, exactly as it runs them, until its server stops. A
    :class:`GptOssError` when another rank went away."""
    ranks = _ranks(model, leader=False)
    state = ServerState(model, tokenizer or default_tokenizer(), ServerOptions(), ranks)
    state.worker.follow()


def _ranks(model: LanguageModel, leader: bool) -> distributed.Ranks:
    """This process's part in serving `model`: rank 0 serves, the others follow."""
    ranks = distributed.Ranks(getattr(model, "group", None))
    if ranks.leader != leader:
        raise GptOssError(
            f"rank {ranks.rank} of {ranks.size}: a model sharded over ranks is served by rank 0 "
            "(create_app) and followed by the others (gptoss_mlx.server.follow)"
        )
    return ranks
