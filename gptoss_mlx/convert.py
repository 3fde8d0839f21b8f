"""Convert any supported checkpoint into this project's MLX-native folder.

The folder holds safetensors shards (at most `max_shard_bytes` each) named by the model's own
parameter tree, a `config.json` in the Hugging Face spelling plus a `gptoss_mlx` section recording
the source layout and quantization, and the tokenizer files. Expert weights are copied bit-exact
(MXFP4); `dense_bits=8|4` affine-quantizes the attention projections, embedding and unembedding
with MLX's own quantization (group size 64), through the same `quantize.quantize_dense` that
loading uses. The result appears at `dst` only when complete.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile

import mlx.core as mx
from mlx.utils import tree_flatten

from .errors import GptOssError
from .hub import resolve_model_path
from .loading import build_model
from .memory import MemorySettings
from .progress import progress_bar
from .quantize import check_dense_bits, quantized_layers
from .weights import read_checkpoint

OUR_FORMAT_KEY = "gptoss_mlx"  # config.json section recording how the folder was made
MAX_SHARD_BYTES = 5 * 10**9
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "generation_config.json",
    "chat_template.jinja",
)


def _plan_shards(params: list[tuple[str, mx.array]], max_bytes: int) -> list[list[str]]:
    shards, current, size = [], [], 0
    for name, array in params:
        if current and size + array.nbytes > max_bytes:
            shards.append(current)
            current, size = [], 0
        current.append(name)
        size += array.nbytes
    return shards + ([current] if current else [])


def _summary(quantization: dict[str, dict]) -> dict:
    """The dense layers' quantization for config.json: one spec when uniform, else per module."""
    specs = {json.dumps(s, sort_keys=True) for s in quantization.values()}
    if not quantization:
        return {"bits": 16}
    return json.loads(specs.pop()) if len(specs) == 1 else quantization


def convert(
    src: str,
    dst: str,
    *,
    dense_bits: int | None = None,
    force: bool = False,
    progress: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> str:
    """Write `src` (folder or hub id) to `dst` in the gptoss-mlx layout; returns `dst`.

    `dense_bits=None` keeps the dense weights as stored; 16 requires them unquantized; 8 or 4
    quantizes them. An existing `dst` is replaced only with `force=True`.
    """
    if dense_bits is not None:
        check_dense_bits(dense_bits)
    dst = os.path.abspath(os.path.expanduser(dst))
    if os.path.exists(dst) and not force:
        raise GptOssError(f"{dst} already exists; pass --force to replace it")

    folder = resolve_model_path(src, progress=progress)
    ckpt = read_checkpoint(folder)
    # Stored dtypes, experts bit-exact, evaluated shard by shard while writing; the dense layers
    # quantized as loading quantizes them (one implementation: quantize.quantize_dense).
    settings = MemorySettings(dense_bits=dense_bits, embedding_from_disk=False)
    model = build_model(ckpt, dtype=None, materialize=False, settings=settings)
    quantization = quantized_layers(model)

    parent = os.path.dirname(dst)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=parent)
    try:
        _write(model, ckpt, quantization, tmp, max_shard_bytes, progress)
        if os.path.exists(dst):
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst


def _write(model, ckpt, quantization: dict, out: str, max_shard_bytes: int, progress: bool) -> None:
    params = tree_flatten(model.parameters())
    arrays = dict(params)
    shards = _plan_shards(params, max_shard_bytes)
    weight_map = {}
    with progress_bar(len(params), "Converting", progress) as bar:
        for i, names in enumerate(shards):
            file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            part = {n: arrays[n] for n in names}
            mx.eval(part)
            mx.save_safetensors(os.path.join(out, file), part, metadata={"format": "mlx"})
            weight_map.update({n: file for n in names})
            bar.update(len(names))
    total = sum(a.nbytes for a in arrays.values())
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)

    config = ckpt.config.to_hf()
    config[OUR_FORMAT_KEY] = {
        "format_version": 1,
        "source_layout": ckpt.layout,
        "experts": {"mode": "mxfp4", "group_size": 32, "bits": 4},
        "dense": _summary(quantization),
    }
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(config, f, indent=1)
    # Tokenizer files sit beside the weights, or one level up for an original/ folder.
    for name in TOKENIZER_FILES:
        for where in (ckpt.folder, os.path.dirname(ckpt.folder)):
            if os.path.isfile(os.path.join(where, name)):
                shutil.copy2(os.path.join(where, name), os.path.join(out, name))
                break
