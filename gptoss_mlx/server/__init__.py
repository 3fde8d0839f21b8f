"""``gptoss-mlx serve``: an OpenAI-compatible HTTP server (Chat Completions and Responses).

The HTTP face only: protocol in, protocol out. Modules: :mod:`.app` (``create_app``, ``serve``,
routes, authentication, errors), :mod:`.chat_completions` and :mod:`.responses` (each API's
requests -> prompts, generated turns -> response objects and stream events), :mod:`.protocol`
(what both share), :mod:`.state` (what one server holds), :mod:`.worker` (the one owner of the
model), :mod:`.builtin` (the built-in tools it runs, ``serve --tools``). Prompt rendering is
``harmony``'s, reuse across requests ``PromptCache`` and ``TurnMemory``'s, generation
``stream_generate``'s (round after round in the tool loop). Across ranks rank 0 serves and the
others ``follow`` (the same worker, the same generation).
"""

from .app import create_app, follow, serve

__all__ = ["create_app", "follow", "serve"]
