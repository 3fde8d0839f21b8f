"""gptoss-mlx: OpenAI's gpt-oss models on Apple Silicon with MLX.

The public API: `load_model` (and, with the tokenizer, `load`; `plan_memory` plans what they will
hold, before loading), `stream_generate`, `generate`,
`ChatSession` (multi-turn chat keeping the KV cache, running tools), `ToolLoop` (the tool loop on
its own, for other sessions), `tools` (function tools, `Browser`, `Python`), `PromptCache` (KV
caches of recent conversations, reused across requests), `convert`, `Benchmark`, `harmony`,
`check_response_format` (structured output, see `gptoss_mlx.constrain`), `distributed` (one model
across several processes: connecting, the leader's commands), and the one error type
`GptOssError`; the HTTP server is `gptoss_mlx.server.create_app`. The command line
(`gptoss_mlx.cli`) uses nothing else.
"""

from . import distributed, harmony, tools
from .benchmark import Benchmark
from .chat import ChatSession
from .config import ModelConfig, preset
from .constrain import check_response_format
from .convert import convert
from .errors import GptOssError
from .generate import GenerationEvent, GenerationStats, generate, stream_generate
from .loading import load, load_model, plan_memory
from .memory import MemoryPlan, MemorySettings
from .model import GptOssModel
from .prompt_cache import PromptCache
from .sample import check_sampling, make_sampler
from .tokenizer import StreamingDetokenizer, Tokenizer
from .tool_loop import ToolEvent, ToolLoop

__all__ = [
    "Benchmark",
    "ChatSession",
    "GenerationEvent",
    "GenerationStats",
    "GptOssError",
    "GptOssModel",
    "MemoryPlan",
    "MemorySettings",
    "ModelConfig",
    "PromptCache",
    "StreamingDetokenizer",
    "Tokenizer",
    "ToolEvent",
    "ToolLoop",
    "check_response_format",
    "check_sampling",
    "convert",
    "distributed",
    "generate",
    "harmony",
    "load",
    "load_model",
    "make_sampler",
    "plan_memory",
    "preset",
    "stream_generate",
    "tools",
]
