"""Random gpt-oss weights in the published Hugging Face MXFP4 layout, at any shape.

Used by benchmarks (real shapes, no download) and tests (tiny shapes). Expert weights are random
FP4 codes with E8M0 scales chosen so each expert row has roughly unit gain; dense weights are
Gaussian with 1/sqrt(fan_in) scale; sinks are large enough to matter in the softmax.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

import mlx.core as mx
import numpy as np

from .config import ModelConfig
from .safetensors_check import TensorInfo

FP4_RMS = 2.93  # root mean square of the 16 E2M1 values


def tensor_key(seed: int, name: str) -> mx.array:
    """The random key of tensor `name`: from the seed and the name alone, so every tensor draws
    from its own stream whatever else the checkpoint holds."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return mx.random.key(int.from_bytes(digest[:8], "little"))


def random_checkpoint(
    config: ModelConfig, seed: int = 0, dtype: mx.Dtype = mx.bfloat16, numpy_blocks: bool = False
) -> dict[str, mx.array]:
    """Tensor name -> lazy random array, named and shaped as `openai/gpt-oss-*` publishes them.

    `numpy_blocks`: draw the expert blocks (the bulk of the bytes) with numpy's generator, tens
    of times faster on a CPU (other values, eagerly: for measuring memory and speed).
    """
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    D, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    t: dict[str, mx.array] = {}

    def normal(name: str, shape: tuple[int, ...], std: float, mean: float = 0.0) -> None:
        t[name] = (mean + mx.random.normal(shape, key=tensor_key(seed, name)) * std).astype(dtype)

    def expert_scales(name: str, shape: tuple[int, ...], fan_in: int) -> None:
        """E8M0 bytes around 2**e with e chosen so that FP4_RMS * 2**e ~ 1/sqrt(fan_in)."""
        e = round(math.log2(1.0 / (FP4_RMS * math.sqrt(fan_in))))
        codes = mx.random.randint(e - 1, e + 2, shape, key=tensor_key(seed, name))
        t[name] = (codes + 127).astype(mx.uint8)

    normal("model.embed_tokens.weight", (config.vocab_size, H), 1.0)
    normal("model.norm.weight", (H,), 0.1, mean=1.0)
    normal("lm_head.weight", (config.vocab_size, H), H**-0.5)
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        normal(p + "input_layernorm.weight", (H,), 0.1, mean=1.0)
        normal(p + "post_attention_layernorm.weight", (H,), 0.1, mean=1.0)
        for name, out_dims, in_dims in (
            ("q", Hq * D, H),
            ("k", Hkv * D, H),
            ("v", Hkv * D, H),
            ("o", H, Hq * D),
        ):
            normal(p + f"self_attn.{name}_proj.weight", (out_dims, in_dims), in_dims**-0.5)
            normal(p + f"self_attn.{name}_proj.bias", (out_dims,), 0.1)
        normal(p + "self_attn.sinks", (Hq,), 2.0)
        normal(p + "mlp.router.weight", (E, H), 2 * H**-0.5)
        normal(p + "mlp.router.bias", (E,), 0.1)
        for proj, out_dims, in_dims in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            g = in_dims // 32
            blocks = p + f"mlp.experts.{proj}_blocks"
            shape = (E, out_dims, g, 16)
            if numpy_blocks:
                rng = np.random.default_rng(np.array(tensor_key(seed, blocks)))
                t[blocks] = mx.array(rng.integers(0, 256, shape, dtype=np.uint8))
            else:
                codes = mx.random.randint(0, 256, shape, key=tensor_key(seed, blocks))
                t[blocks] = codes.astype(mx.uint8)
            expert_scales(p + f"mlp.experts.{proj}_scales", (E, out_dims, g), in_dims)
            normal(p + f"mlp.experts.{proj}_bias", (E, out_dims), 0.1)
    return t


def save_checkpoint(
    folder: str, tensors: dict[str, mx.array], config_json: dict, shards: int = 1
) -> None:
    """Write `tensors` as safetensors shards (with an index when more than one) plus config.json."""
    os.makedirs(folder, exist_ok=True)
    names = list(tensors)
    per_shard = math.ceil(len(names) / shards)
    weight_map = {}
    for s in range(shards):
        file = (
            "model.safetensors" if shards == 1 else f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        )
        part = {n: tensors[n] for n in names[s * per_shard : (s + 1) * per_shard]}
        mx.save_safetensors(os.path.join(folder, file), part, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    if shards > 1:
        with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config_json, f, indent=1)


def hf_config_json(config: ModelConfig) -> dict:
    """config.json as Hugging Face publishes it for the MXFP4 checkpoints."""
    return {
        **config.to_hf(),
        "quantization_config": {"quant_method": "mxfp4"},
        "eos_token_id": 200002,
        "pad_token_id": 199999,
    }


_SAFETENSORS_DTYPES = {mx.bfloat16: "BF16", mx.float16: "F16", mx.float32: "F32", mx.uint8: "U8"}


def published_headers(config: ModelConfig) -> dict[str, TensorInfo]:
    """The tensor names, dtypes and shapes `openai/gpt-oss-*` publishes, at `config`'s shapes (the
    headers of a checkpoint no one has to write: for planning memory), laid out one after the
    other in one file."""
    headers, offset = {}, 0
    for name, a in random_checkpoint(config).items():
        dtype = _SAFETENSORS_DTYPES[a.dtype]
        headers[name] = TensorInfo("model.safetensors", dtype, tuple(a.shape), offset, a.nbytes)
        offset += a.nbytes
    return headers
