"""gptoss-mlx: OpenAI's gpt-oss models on Apple Silicon with MLX.

The public API: `load_model` (and, with the tokenizer, `load`; `plan_memory` plans what they will
hold, before loading), `stream_generate`, `generate`,
`ChatSession` (multi-turn chat keeping the KV cache, running tools), `ToolLoop` (the tool loop on
its own, for other sessions), `tools` (function tools, `Browser`, `Python`), `convert`,
`Benchmark`, `harmony`, `check_response_format` (structured output, see `gptoss_mlx.constrain`),
and the one error type `GptOssError`. The command line (`gptoss_mlx.cli`) uses nothing else.
"""

from . import harmony, tools
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
    "StreamingDetokenizer",
    "Tokenizer",
    "ToolEvent",
    "ToolLoop",
    "check_response_format",
    "check_sampling",
    "convert",
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
