"""gptoss-mlx: OpenAI's gpt-oss models on Apple Silicon with MLX.

The public API: `load_model` (and, with the tokenizer, `load`), `stream_generate`, `generate`,
`ChatSession` (multi-turn chat keeping the KV cache), `harmony`, and the one error type
`GptOssError`.
"""

from . import harmony
from .chat import ChatSession
from .config import ModelConfig, preset
from .errors import GptOssError
from .generate import GenerationEvent, GenerationStats, generate, stream_generate
from .loading import load, load_model
from .model import GptOssModel
from .sample import make_sampler

__all__ = [
    "ChatSession",
    "GenerationEvent",
    "GenerationStats",
    "GptOssError",
    "GptOssModel",
    "ModelConfig",
    "generate",
    "harmony",
    "load",
    "load_model",
    "make_sampler",
    "preset",
    "stream_generate",
]
