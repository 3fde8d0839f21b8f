"""Dense-weight quantization: which layers `dense_bits` quantizes and how (MLX affine, group 64).

The attention projections, the embedding and the unembedding are quantized; the router stays exact
(tiny, and routing is sensitive), as do the norms, biases and sinks. A layer whose input width is
not a multiple of the group size stays exact too (never the case at gpt-oss's shapes). Loading
(`load(..., dense_bits=)`) and converting (`convert --dense-bits`) both go through
`quantize_dense`, so a model quantized at load holds bit for bit what the converted folder stores.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from .errors import GptOssError

DENSE_GROUP_SIZE = 64
DENSE_BITS = (16, 8, 4)  # 16: the dense weights as published (unquantized)
DEFAULT_DENSE_BITS = 8
# Module paths (their endings) of the dense layers that dense_bits quantizes.
QUANTIZABLE = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "embed_tokens",
    "lm_head",
)


def quantizable(path: str, weight_shape: tuple[int, ...]) -> bool:
    """Whether the dense layer at module `path` with weight `[out, in]` is quantized by
    dense_bits."""
    return path.endswith(QUANTIZABLE) and weight_shape[-1] % DENSE_GROUP_SIZE == 0


def quantize_dense(model: nn.Module, bits: int) -> None:
    """Affine-quantize (group 64) the model's unquantized dense layers that `quantizable` names,
    in place, lazily, from the weights' current dtype; 16 leaves them as they are."""
    check_dense_bits(bits)
    if bits == 16:
        return

    def target(path: str, module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Embedding)) and quantizable(
            path, module.weight.shape
        )

    nn.quantize(model, group_size=DENSE_GROUP_SIZE, bits=bits, class_predicate=target)


def quantized_bytes(shape: tuple[int, ...], bits: int, scale_dtype: mx.Dtype) -> int:
    """Bytes of a `[..., in]` weight affine-quantized at `bits` (group 64): packed weight plus one
    scale and one bias per group, in `scale_dtype`. Read off MLX's own (lazy, never evaluated)
    quantization, so it is its layout exactly."""
    weight, scales, biases = mx.quantize(
        mx.zeros(shape, scale_dtype), group_size=DENSE_GROUP_SIZE, bits=bits
    )
    return weight.nbytes + scales.nbytes + biases.nbytes


def check_dense_bits(bits: int) -> None:
    if bits not in DENSE_BITS:
        raise GptOssError(f"--dense-bits must be 16, 8 or 4, not {bits}")


def stored_quantization(model: nn.Module, tensors: dict) -> dict[str, dict]:
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


def resolve_dense_bits(stored: dict[str, dict], requested: int | None, default: int | None) -> int:
    """The dense bits a model will run at, given its stored quantization (`stored_quantization`).

    `requested` None takes `default` for unquantized dense weights (None: keep them) and the stored
    bits otherwise; quantized weights cannot be requantized to other bits or back to 16.
    """
    if requested is not None:
        check_dense_bits(requested)
    stored_bits = {s["bits"] for s in stored.values()}
    if not stored_bits:
        return requested or default or 16
    if requested is not None and stored_bits != {requested}:
        have = "/".join(str(b) for b in sorted(stored_bits))
        raise GptOssError(
            f"the dense weights are stored quantized at {have} bits, so they load as stored; "
            f"--dense-bits {requested} needs an unquantized checkpoint (e.g. openai/gpt-oss-20b)"
        )
    return stored_bits.pop() if len(stored_bits) == 1 else max(stored_bits)
