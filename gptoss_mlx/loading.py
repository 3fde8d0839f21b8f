"""`load_model`: any supported checkpoint (folder or hub id) -> a ready `GptOssModel`."""

from __future__ import annotations

import os

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernels as kernel_backends
from .errors import GptOssError
from .hub import resolve_model_path
from .model import GptOssModel
from .progress import progress_bar
from .tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from .weights import Checkpoint, read_checkpoint

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_PACKED = (mx.uint32, mx.uint8)  # quantized weights and scales: loaded bit-exact, never cast


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """None -> bfloat16; a name from DTYPES or an mx.Dtype otherwise."""
    if dtype is None:
        return mx.bfloat16
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise GptOssError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def dense_quantization(model: nn.Module, tensors: dict) -> dict[str, dict]:
    """Module path -> quantization params, for each dense layer stored quantized (has `.scales`).

    Bits and group size follow from the stored shapes: weight uint32 `[out, in * bits / 32]`,
    scales `[out, in / group]`; affine quantization also stores `.biases`.
    """
    specs = {}
    for path, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Embedding)) and f"{path}.scales" in tensors:
            in_dims = module.weight.shape[-1]
            bits = tensors[f"{path}.weight"].shape[-1] * 32 // in_dims
            group_size = in_dims // max(tensors[f"{path}.scales"].shape[-1], 1)
            affine = f"{path}.biases" in tensors
            mode = "affine" if affine else {4: "mxfp4", 8: "mxfp8"}.get(bits, "affine")
            specs[path] = {"group_size": group_size, "bits": bits, "mode": mode}
    return specs


def quantized_layers(model: nn.Module) -> dict[str, dict]:
    """Module path -> quantization params of each quantized dense layer of a built model."""
    return {
        path: {"group_size": m.group_size, "bits": m.bits, "mode": m.mode}
        for path, m in model.named_modules()
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding))
    }


def _check_against_model(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every parameter present, with the shape the config implies and a usable dtype; nothing
    extra."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - ckpt.tensors.keys())
    if missing:
        raise GptOssError(
            f"{ckpt.folder}: checkpoint is missing {missing[0]} ({len(missing)} "
            "tensors in all); does config.json match the weights?"
        )
    extra = sorted(ckpt.tensors.keys() - expected.keys())
    if extra:
        raise GptOssError(
            f"{ckpt.origin.get(extra[0], extra[0])}: unexpected tensor "
            f"({len(extra)} in all) that config.json does not account for"
        )
    for name, want in expected.items():
        got = ckpt.tensors[name]
        where = ckpt.origin.get(name, name)
        if tuple(got.shape) != tuple(want.shape):
            raise GptOssError(
                f"{where} has shape {list(got.shape)}, but config.json implies {list(want.shape)}"
            )
        if want.dtype in _PACKED and got.dtype != want.dtype:
            raise GptOssError(f"{where} has dtype {got.dtype}, expected {want.dtype}")
        if want.dtype not in _PACKED and not mx.issubdtype(got.dtype, mx.floating):
            raise GptOssError(f"{where} has dtype {got.dtype}, expected a floating-point type")


def available_memory() -> int:
    """Bytes the weights may occupy: Metal's recommended working set, else physical memory."""
    if mx.metal.is_available():
        return int(mx.device_info()["max_recommended_working_set_size"])
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def build_model(
    ckpt: Checkpoint,
    dtype: mx.Dtype | None,
    progress: bool = False,
    materialize: bool = True,
    kernels: str | None = None,
) -> GptOssModel:
    """Instantiate the model for `ckpt` and load its tensors; floats cast to `dtype` (None keeps
    them).

    Parameters stay lazy until evaluated one layer at a time (`materialize`), so peak memory stays
    near the size of the weights themselves; the memory check runs only then. `kernels` picks the
    kernel backend (see `gptoss_mlx.kernels`).
    """
    kernel_backends.resolve(kernels)  # an invalid choice fails before any loading
    model = GptOssModel(ckpt.config)
    kernel_backends.use(model, kernels)
    specs = dense_quantization(model, ckpt.tensors)
    if specs:
        nn.quantize(model, class_predicate=lambda path, _: specs.get(path, False))
    _check_against_model(model, ckpt)
    weights = {
        name: t if (t.dtype in _PACKED or dtype is None) else t.astype(dtype)
        for name, t in ckpt.tensors.items()
    }
    model.load_weights(list(weights.items()), strict=True)
    if not materialize:
        return model
    total = sum(w.nbytes for w in weights.values())
    if total > available_memory():
        raise GptOssError(
            f"the model needs {total / 1e9:.1f} GB for its weights but this machine "
            f"offers {available_memory() / 1e9:.1f} GB; use a smaller model or "
            "`gptoss-mlx convert --dense-bits 8|4` to shrink the dense weights"
        )
    groups = [model.embed_tokens, *model.layers, model.norm, model.lm_head]
    with progress_bar(len(groups), "Loading weights", progress) as bar:
        for part in groups:
            mx.eval(part.parameters())
            bar.update(1)
    model.eval()
    return model


def load_model(
    path_or_repo: str,
    dtype: str | mx.Dtype | None = None,
    *,
    progress: bool = False,
    kernels: str | None = None,
) -> GptOssModel:
    """Load gpt-oss from a local folder of any supported layout or a Hugging Face repo id.

    `dtype=None` computes in bfloat16; `"float32"` computes in float32 (for parity checks). Expert
    weights stay MXFP4 in every case. `kernels` = "auto" | "metal" | "mlx" | "emulate" picks how the
    attention and expert ops run (None: $GPTOSS_MLX_KERNELS, else auto; see `gptoss_mlx.kernels`).
    """
    compute_dtype = parse_dtype(dtype)
    kernel_backends.resolve(kernels)
    ckpt = read_checkpoint(resolve_model_path(path_or_repo, progress=progress))
    return build_model(ckpt, compute_dtype, progress=progress, kernels=kernels)


def load(
    path_or_repo: str,
    dtype: str | mx.Dtype | None = None,
    *,
    progress: bool = False,
    kernels: str | None = None,
) -> tuple[GptOssModel, Tokenizer]:
    """`(model, tokenizer)` for a folder or hub id: `load_model` plus the checkpoint's tokenizer.

    The tokenizer comes from the folder's `tokenizer.json` when it has one (its special-token ids
    checked), else tiktoken's o200k_harmony.
    """
    folder = resolve_model_path(path_or_repo, progress=progress)
    model = load_model(folder, dtype, progress=progress, kernels=kernels)
    needed = max(SPECIAL_TOKENS.values()) + 1
    if model.config.vocab_size < needed:
        raise GptOssError(
            f"{path_or_repo}: the model's vocabulary has {model.config.vocab_size} "
            f"tokens, too few for o200k_harmony (needs {needed}); use load_model and "
            "token ids instead"
        )
    return model, load_tokenizer(folder)
