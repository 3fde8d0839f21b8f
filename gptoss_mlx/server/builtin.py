"""Built-in tools on the server (``gptoss-mlx serve --tools browser,python``): which ones a request
gets, a fresh set of them for each request, and the tool loop run in the worker.

**Which.** The server runs the built-in tools it was started with, and only those. A Responses
request asks for them by tool type (``web_search``, ``web_search_preview``, their dated variants
such as ``web_search_preview_2025_03_11``, and ``browser_search``: the browser;
``code_interpreter``: python); a type the server was not started with is left out of the prompt,
like any tool it cannot run. A Chat Completions request gets every built-in tool the server runs
(that API has no type for them).

**Whose.** Each request gets its own instances (:meth:`BuiltinTool.fresh`): its own browser pages
and cursors, and its own Python process and scratch directory, started on the first call and
removed when the request ends. No two clients share a Python process, and the python tool tells
the model so (``scope="reply"``: the session lasts until the model answers or calls a function).

**How.** The worker runs the turn through a :class:`~gptoss_mlx.tool_loop.ToolLoop` on the prompt
cache: each round is one ``stream_generate`` whose prompt extends the previous round's, so it
prefills only the tool result and the next ``<|start|>assistant``. A call to a function the
client declared ends the turn (the client runs it, as without built-in tools); a call to a tool
that does not exist gets an error result the model reads. The request's ``max_tokens`` bounds
the tokens generated in all rounds together; ``max_tool_rounds`` (``max_tool_calls`` in a
Responses request, at most the server's) the calls run. While a tool runs the model waits: the
requests queued behind wait too (the browser's fetch timeout and the python tool's time limit
bound that).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from ..errors import GptOssError
from ..generate import GenerationEvent
from ..harmony import ToolNamespace
from ..tokenizer import Tokenizer
from ..tool_loop import ToolEvent, ToolLoop
from ..tools import Browser, BuiltinTool, Python, ToolCall, builtin_tool
from ..tools.browser import Page
from .protocol import ToolStep

__all__ = ["ServerTools", "responses_builtins", "run_turn", "web_search_action"]

# Responses API tool types -> the built-in tool that serves them.
RESPONSES_TYPES = {
    "web_search": "browser",
    "web_search_preview": "browser",
    "browser_search": "browser",
    "code_interpreter": "python",
}


DATED = re.compile(r"(web_search(?:_preview)?)_\d{4}_\d{2}_\d{2}")  # web_search_2025_08_26


def _builtin_for(tool_type: str) -> str | None:
    """The built-in tool a Responses tool type asks for (dated variants included), or None."""
    dated = DATED.fullmatch(tool_type)
    return RESPONSES_TYPES.get(dated.group(1) if dated else tool_type)


def responses_builtins(tools: Any, enabled: Sequence[str]) -> list[str]:
    """The built-in tools (of ``enabled``) a Responses request's ``tools`` ask for."""
    wanted = set()
    for tool in tools if isinstance(tools, list) else ():
        name = _builtin_for(str(tool.get("type"))) if isinstance(tool, Mapping) else None
        if name in enabled:
            wanted.add(name)
    return sorted(wanted)


class ServerTools:
    """The built-in tools a server runs: configured templates, a fresh copy of each per request.

    ``builtin_tools``: names (``"browser"``, ``"python"``) or configured instances, as
    ``ChatSession`` takes them (a ``Browser(allow_private_network=True)`` lets a test browse a
    local server). The python template is given ``scope="reply"``.
    """

    def __init__(self, builtin_tools: Sequence[str | BuiltinTool], max_tool_rounds: int) -> None:
        self.templates: dict[str, BuiltinTool] = {}
        for spec in builtin_tools:
            tool = builtin_tool(spec)
            if tool.name in self.templates:
                raise GptOssError(f"the built-in tool {tool.name!r} is given twice")
            if isinstance(tool, Python) and tool.scope != "reply":
                tool = tool.fresh(scope="reply")
            self.templates[tool.name] = tool
        self.max_tool_rounds = max_tool_rounds

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.templates)

    def namespaces(self, names: Sequence[str]) -> list[ToolNamespace]:
        """The system message's declarations of ``names`` (each fresh copy declares the same)."""
        return [self.templates[n].namespace() for n in names]

    def loop(
        self,
        names: Sequence[str],
        functions: Sequence[Mapping] | None,
        max_tool_rounds: int,
        tokenizer: Tokenizer,
    ) -> ToolLoop:
        """A tool loop for one request: fresh instances of ``names``; the client's ``functions``
        declared only (a call to one ends the turn)."""
        return ToolLoop(
            functions or (),
            [self.templates[n].fresh() for n in names],
            max_tool_rounds=min(max_tool_rounds, self.max_tool_rounds),
            tokenizer=tokenizer,
        )

    def close(self) -> None:
        for tool in self.templates.values():
            tool.close()


def _arguments(call: ToolCall) -> dict:
    try:
        args = json.loads(call.arguments or "{}")
    except json.JSONDecodeError:
        return {}
    return args if isinstance(args, dict) else {}


def web_search_action(call: ToolCall, page: Page | None = None) -> dict:
    """OpenAI's ``web_search_call.action`` for a browser call: ``search`` (the query, and the
    results' URLs as ``sources``), ``open_page`` (the URL) or ``find_in_page`` (the pattern and
    the page's URL). ``page``: the view the call showed, when it ran and succeeded."""
    args = _arguments(call)
    if call.function == "search":
        query = str(args.get("query", ""))
        action: dict[str, Any] = {"type": "search", "query": query, "queries": [query]}
        if page is not None:
            action["sources"] = [{"type": "url", "url": u} for u in page.links.values()]
        return action
    if call.function == "find":
        url = page.url if page is not None else None
        return {"type": "find_in_page", "pattern": str(args.get("pattern", "")), "url": url}
    target = args.get("id")
    url = page.url if page is not None else (target if isinstance(target, str) else None)
    return {"type": "open_page", "url": url}


def run_turn(
    loop: ToolLoop,
    prompt: list[int],
    options: dict[str, Any],
    generate: Callable[[list[int], dict[str, Any]], Iterator[GenerationEvent]],
) -> Iterator[GenerationEvent | ToolStep]:
    """One request's turn through ``loop`` (on the worker thread): the tokens' events of every
    round and a :class:`ToolStep` for each call run (``run``, ``result``) or stopped (``limit``).
    ``generate(prompt, options)`` is one round; ``options["max_tokens"]`` bounds all rounds
    together. The request's tools are closed when the turn ends (its Python process stopped,
    its scratch directory removed)."""
    budget = options.get("max_tokens")
    written = 0

    def one_round(round_prompt: list[int]) -> Iterator[GenerationEvent]:
        nonlocal written
        left = {} if budget is None else {"max_tokens": budget - written}
        for event in generate(round_prompt, {**options, **left}):
            written += 1
            yield event

    tok = loop.tokenizer
    header = [tok.start_id, *tok.encode("assistant")]
    browser = loop.builtin.get("browser")
    turn = loop.run(prompt, one_round)
    views = 0  # the browser's views before the call ran: a new one is what it showed
    try:
        for event in turn:
            if not isinstance(event, ToolEvent):
                yield event
                continue
            browsing = isinstance(browser, Browser) and event.call.namespace == "browser"
            if event.kind == "tool_limit":
                yield ToolStep("limit", event.call, reason="max_tool_calls")
                return
            if event.kind == "tool_run":
                if budget is not None and written >= budget:
                    yield ToolStep("limit", event.call, reason="max_tokens")
                    return  # the call is not run: the turn ends on it
                views = len(browser.stack) if browsing else 0
                action = web_search_action(event.call) if browsing else None
                yield ToolStep("run", event.call, action=action)
                continue
            action = None
            if browsing:
                shown = browser.stack[-1][0] if len(browser.stack) > views else None
                action = web_search_action(event.call, shown)
            tokens = turn.rounds[-1].result + header
            yield ToolStep("result", event.call, event.output, event.error, tokens, action)
    finally:
        turn.close()
        loop.close()
