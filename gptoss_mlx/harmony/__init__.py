"""Harmony, the chat format gpt-oss was trained on: messages -> prompt ids, completion -> result.

We implement harmony ourselves because the engine needs control at the token level that
openai-harmony does not give: a parser that runs inside the decode loop, turns each sampled token
into reasoning / content / tool-call deltas and never raises on what the model writes
(openai-harmony raises ``HarmonyError``, e.g. on a header cut off by the end of the stream), and
rendering straight from OpenAI-shaped messages through the engine's own tokenizer (a checkpoint's
``tokenizer.json`` included) that appends each new turn to a chat's sampled token history, so its
KV cache is reused. It is proven against openai-harmony, a test-only dependency, in
``tests/test_harmony.py``: prompts token-identical to its ``render_conversation_for_completion`` on
17 hand-built and 120 seeded random conversations and 150 random tool sets, parse results equal to
its ``parse_messages_from_completion_tokens`` on hand-built, model-style and 150 random
completions, and the same result and deltas however a completion is split into ``feed`` calls.

Modules: :mod:`.schema` (tool declarations: JSON schemas as TypeScript-like types),
:mod:`.render` (system, developer and conversation messages -> prompt ids; token histories for
multi-turn chat), :mod:`.parse` (completion ids -> reasoning, content and tool calls, streaming),
:mod:`.format` (the words both sides share). Built-in tools (browser, python) are
:class:`ToolNamespace` s declared in the system message's ``# Tools`` section
(``render_prompt(builtin_tools=...)``); the tools themselves live in :mod:`gptoss_mlx.tools`.
A JSON schema response format goes at the end of the developer message (``# Response Formats``,
as harmony's guide shows it); openai-harmony has no API for it, so that section is tested
against the guide's layout.
"""

from gptoss_mlx.harmony.parse import (
    Delta,
    StreamParser,
    header_channel_and_recipient,
    parse_completion,
)
from gptoss_mlx.harmony.render import (
    DEFAULT_MODEL_IDENTITY,
    REASONING_EFFORTS,
    chat_history_tokens,
    check_reasoning_effort,
    common_prefix_length,
    content_text,
    is_builtin_call,
    reasoning_text,
    render_messages,
    render_prompt,
    render_turn,
)
from gptoss_mlx.harmony.schema import (
    FunctionDeclaration,
    ResponseFormat,
    ToolNamespace,
    function_declarations,
    namespace_section,
    parse_response_format,
    tools_to_typescript,
)
from gptoss_mlx.tokenizer import STOP_TOKENS

__all__ = [
    "STOP_TOKENS",
    "DEFAULT_MODEL_IDENTITY",
    "REASONING_EFFORTS",
    "check_reasoning_effort",
    "render_prompt",
    "render_turn",
    "render_messages",
    "chat_history_tokens",
    "common_prefix_length",
    "content_text",
    "reasoning_text",
    "tools_to_typescript",
    "function_declarations",
    "FunctionDeclaration",
    "parse_response_format",
    "ResponseFormat",
    "header_channel_and_recipient",
    "ToolNamespace",
    "namespace_section",
    "is_builtin_call",
    "parse_completion",
    "StreamParser",
    "Delta",
]
