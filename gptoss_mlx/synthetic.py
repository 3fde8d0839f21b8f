"""Random gpt-oss weights in the published Hugging Face MXFP4 layout, at any shape.

Used by benchmarks (real shapes, no download) and tests (tiny shapes). Expert weights are random
FP4 codes with E8M0 scales chosen so each expert row has roughly unit gain; dense weights are
Gaussian with 1/sqrt(fan_in) scale; sinks are large enough to matter in the softmax.
"""

from __future__ import annotations

import json
import math
import os

import mlx.core as mx

from .config import ModelConfig

FP4_RMS = 2.93  # root mean square of the 16 E2M1 values


def _expert_scales(key, shape, fan_in: int) -> mx.array:
    """E8M0 bytes around 2**e with e chosen so that FP4_RMS * 2**e ~ 1/sqrt(fan_in)."""
    e = round(math.log2(1.0 / (FP4_RMS * math.sqrt(fan_in))))
    return (mx.random.randint(e - 1, e + 2, shape, key=key) + 127).astype(mx.uint8)


def random_checkpoint(config: ModelConfig, seed: int = 0, dtype=mx.bfloat16) -> dict[str, mx.array]:
    """Tensor name -> lazy random array, named and shaped as `openai/gpt-oss-*` publishes them."""
    keys = iter(mx.random.split(mx.random.key(seed), 16 + 16 * config.num_hidden_layers))
    H, I, E = config.hidden_size, config.intermediate_size, config.num_experts
    D, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads

    def normal(shape, std):
        return (mx.random.normal(shape, key=next(keys)) * std).astype(dtype)

    t = {
        "model.embed_tokens.weight": normal((config.vocab_size, H), 1.0),
        "model.norm.weight": 1 + normal((H,), 0.1),
        "lm_head.weight": normal((config.vocab_size, H), H**-0.5),
    }
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = 1 + normal((H,), 0.1)
        t[p + "post_attention_layernorm.weight"] = 1 + normal((H,), 0.1)
        for name, out_dims, in_dims in (
            ("q", Hq * D, H),
            ("k", Hkv * D, H),
            ("v", Hkv * D, H),
            ("o", H, Hq * D),
        ):
            t[p + f"self_attn.{name}_proj.weight"] = normal((out_dims, in_dims), in_dims**-0.5)
            t[p + f"self_attn.{name}_proj.bias"] = normal((out_dims,), 0.1)
        t[p + "self_attn.sinks"] = normal((Hq,), 2.0)
        t[p + "mlp.router.weight"] = normal((E, H), 2 * H**-0.5)
        t[p + "mlp.router.bias"] = normal((E,), 0.1)
        for proj, out_dims, in_dims in (("gate_up_proj", 2 * I, H), ("down_proj", H, I)):
            g = in_dims // 32
            t[p + f"mlp.experts.{proj}_blocks"] = mx.random.randint(
                0, 256, (E, out_dims, g, 16), key=next(keys)
            ).astype(mx.uint8)
            t[p + f"mlp.experts.{proj}_scales"] = _expert_scales(
                next(keys), (E, out_dims, g), in_dims
            )
            t[p + f"mlp.experts.{proj}_bias"] = normal((E, out_dims), 0.1)
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
