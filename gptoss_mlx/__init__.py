"""gptoss-mlx: OpenAI's gpt-oss models on Apple Silicon with MLX.

The public API: `load_model` (and, with the tokenizer, `load`), `stream_generate`, `generate`,
`harmony`, and the one error type `GptOssError`.
"""

from .config import ModelConfig, preset
from .errors import GptOssError
from .loading import load_model
from .model import GptOssModel

__all__ = ["GptOssError", "GptOssModel", "ModelConfig", "load_model", "preset"]
