"""Tiny gpt-oss checkpoints in every published layout, and the `transformers` reference model.

Everything here is written independently of the code under test: MXFP4 is decoded with a numpy
lookup table built from the format's definition, and each layout is produced by renaming the
published Hugging Face tensors by that layout's own naming.
"""

from __future__ import annotations

import os

import mlx.core as mx
import numpy as np

from gptoss_mlx import load_model
from gptoss_mlx.config import ModelConfig, preset
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

# E2M1: bit 3 sign, bits 2-1 exponent, bit 0 mantissa.
FP4_VALUES = np.array(
    [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6], np.float32
)

TINY = ModelConfig(
    num_hidden_layers=4,
    num_experts=8,
    experts_per_token=4,
    vocab_size=512,
    hidden_size=64,
    intermediate_size=96,
    num_attention_heads=8,
    num_key_value_heads=2,
    head_dim=16,
    sliding_window=8,
)
# The real head geometry (64-dim heads, 8 query heads per KV head) at a small width.
REAL_HEADS = ModelConfig(
    num_hidden_layers=2,
    num_experts=4,
    experts_per_token=4,
    vocab_size=512,
    hidden_size=128,
    intermediate_size=64,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=64,
    sliding_window=8,
)
# 32 experts (as gpt-oss-20b) with the real head geometry, for the expert cache and the quantized
# KV cache (64-dim heads: one quantization group per head and position).
EXPERTS32 = REAL_HEADS.replace(num_experts=32, num_hidden_layers=4, layer_types=())


def np32(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32))


def dequantize_mxfp4(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """uint8 blocks `[..., out, G, 16]`, scales `[..., out, G]` -> float32 `[..., out, G*32]`."""
    low, high = blocks & 0x0F, blocks >> 4
    codes = np.stack([low, high], axis=-1).reshape(*blocks.shape[:-1], 32)  # low nibble first
    values = FP4_VALUES[codes] * np.exp2(scales.astype(np.float32) - 127)[..., None]
    return values.reshape(*blocks.shape[:-2], -1)


def make_hf_tensors(config: ModelConfig = TINY, seed: int = 0, dtype=mx.float32) -> dict:
    tensors = random_checkpoint(config, seed=seed, dtype=dtype)
    mx.eval(tensors)
    return tensors


def write_hf_mxfp4(folder, config, tensors, shards=2) -> str:
    save_checkpoint(str(folder), tensors, hf_config_json(config), shards=shards)
    return str(folder)


def dequantized_experts(tensors: dict, config: ModelConfig) -> dict:
    """Layer i -> (gate_up [E, 2I, H], down [E, H, I]) float32, decoded with the numpy table."""
    out = {}
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        out[i] = tuple(
            dequantize_mxfp4(
                np.array(tensors[p + f"{proj}_blocks"]), np.array(tensors[p + f"{proj}_scales"])
            )
            for proj in ("gate_up_proj", "down_proj")
        )
    return out


def write_hf_bf16(folder, config, tensors, dtype=mx.float32) -> str:
    """The dequantized layout: experts as plain `[E, in, out]` tensors, no blocks or scales."""
    out = {k: v for k, v in tensors.items() if "_blocks" not in k and "_scales" not in k}
    for i, (gate_up, down) in dequantized_experts(tensors, config).items():
        p = f"model.layers.{i}.mlp.experts."
        out[p + "gate_up_proj"] = mx.array(gate_up.transpose(0, 2, 1)).astype(dtype)
        out[p + "down_proj"] = mx.array(down.transpose(0, 2, 1)).astype(dtype)
    cfg = config.to_hf()
    save_checkpoint(str(folder), out, cfg, shards=1)
    return str(folder)


def write_original(folder, config, tensors) -> str:
    """OpenAI's `original/` layout inside `folder/original`."""
    t = tensors
    out = {
        "embedding.weight": t["model.embed_tokens.weight"],
        "unembedding.weight": t["lm_head.weight"],
        "norm.scale": t["model.norm.weight"],
    }
    for i in range(config.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"block.{i}."
        a = p + "self_attn."
        out[b + "attn.norm.scale"] = t[p + "input_layernorm.weight"]
        out[b + "attn.qkv.weight"] = mx.concatenate(
            [t[a + "q_proj.weight"], t[a + "k_proj.weight"], t[a + "v_proj.weight"]]
        )
        out[b + "attn.qkv.bias"] = mx.concatenate(
            [t[a + "q_proj.bias"], t[a + "k_proj.bias"], t[a + "v_proj.bias"]]
        )
        out[b + "attn.sinks"] = t[a + "sinks"]
        out[b + "attn.out.weight"] = t[a + "o_proj.weight"]
        out[b + "attn.out.bias"] = t[a + "o_proj.bias"]
        out[b + "mlp.norm.scale"] = t[p + "post_attention_layernorm.weight"]
        out[b + "mlp.gate.weight"] = t[p + "mlp.router.weight"]
        out[b + "mlp.gate.bias"] = t[p + "mlp.router.bias"]
        for theirs, proj in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            e = p + "mlp.experts." + proj
            out[f"{b}mlp.{theirs}_weight.blocks"] = t[e + "_blocks"]
            out[f"{b}mlp.{theirs}_weight.scales"] = t[e + "_scales"]
            out[f"{b}mlp.{theirs}_bias"] = t[e + "_bias"]
    original = {
        "num_hidden_layers": config.num_hidden_layers,
        "num_experts": config.num_experts,
        "experts_per_token": config.experts_per_token,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "swiglu_limit": 7.0,
        "head_dim": config.head_dim,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "sliding_window": config.sliding_window,
        "initial_context_length": 4096,
        "rope_theta": 150000,
        "rope_scaling_factor": 32.0,
        "rope_ntk_alpha": 1,
        "rope_ntk_beta": 32,
    }
    save_checkpoint(os.path.join(str(folder), "original"), out, original, shards=1)
    return str(folder)


def write_mlx_community(folder, config, tensors, dense_bits=8) -> str:
    """mlx-lm's conversion: gate/up de-interleaved, experts mxfp4, dense affine (group 64)."""
    out = {}
    for k, v in tensors.items():
        if "mlp.experts." in k:
            continue
        quantize = (
            dense_bits
            and k.endswith(".weight")
            and ("_proj." in k or "embed_tokens" in k or "lm_head" in k)
        )
        if quantize:
            w, s, b = mx.quantize(v, group_size=64, bits=dense_bits)
            base = k[: -len(".weight")]
            out[base + ".weight"], out[base + ".scales"], out[base + ".biases"] = w, s, b
        else:
            out[k] = v
    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            blocks = np.array(tensors[p + proj + "_blocks"])
            weight = blocks.reshape(*blocks.shape[:-2], -1).view(np.uint32)
            scales, bias = np.array(tensors[p + proj + "_scales"]), tensors[p + proj + "_bias"]
            if proj == "down_proj":
                out[p + "down_proj.weight"] = mx.array(weight)
                out[p + "down_proj.scales"] = mx.array(scales)
                out[p + "down_proj.bias"] = bias
            else:
                for name, rows in (
                    ("gate_proj", slice(0, None, 2)),
                    ("up_proj", slice(1, None, 2)),
                ):
                    out[p + name + ".weight"] = mx.array(np.ascontiguousarray(weight[:, rows]))
                    out[p + name + ".scales"] = mx.array(np.ascontiguousarray(scales[:, rows]))
                    out[p + name + ".bias"] = bias[:, rows]
    cfg = {**config.to_hf(), "quantization": {"group_size": 64, "bits": dense_bits}}
    save_checkpoint(str(folder), out, cfg, shards=1)
    return str(folder)


def reference_model(tensors: dict, config: ModelConfig):
    """`transformers`' GptOssForCausalLM in float32 holding the same (dequantized) weights."""
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM

    hf_config = GptOssConfig(**config.to_hf())
    hf_config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GptOssForCausalLM(hf_config).to(torch.float32).eval()
    state = {
        k: torch.from_numpy(np32(v).copy())
        for k, v in tensors.items()
        if "_blocks" not in k and "_scales" not in k
    }
    for i, (gate_up, down) in dequantized_experts(tensors, config).items():
        p = f"model.layers.{i}.mlp.experts."
        state[p + "gate_up_proj"] = torch.from_numpy(gate_up.transpose(0, 2, 1).copy())
        state[p + "down_proj"] = torch.from_numpy(down.transpose(0, 2, 1).copy())
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    assert not [m for m in missing if "rotary" not in m], missing
    return model


def reference_logits(model, ids: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(ids).long()).logits.float().numpy()


# max |ours - ref| / max |ref| below this counts as equal to the reference in float32.
FLOAT32_TOL = 1e-4


def logits(model, ids: np.ndarray, **kwargs) -> np.ndarray:
    """`model(ids)` as float32 numpy (kwargs such as `cache=` passed on)."""
    return np32(model(mx.array(ids), **kwargs))


def folder_logits(path, ids: np.ndarray, dtype: str = "float32") -> np.ndarray:
    """Logits of the checkpoint folder `path`, loaded with `load_model` with its dense weights as
    stored (`dense_bits=16`: the parity tests compare with transformers' unquantized model)."""
    return logits(load_model(path, dtype=dtype, dense_bits=16), ids)


def relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    """max |ours - ref| / max |ref|: the tolerance measure of the model tests."""
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def write_real_shapes(folder, name: str = "120b", layers: int = 1, vocab: int = 8000) -> str:
    """A random checkpoint (published MXFP4 layout) with the real layer shapes of gpt-oss-`name`
    but `layers` layers and a `vocab`-token vocabulary: for measuring memory, not accuracy."""
    config = preset(name).replace(num_hidden_layers=layers, vocab_size=vocab, layer_types=())
    tensors = random_checkpoint(config, numpy_blocks=True)
    save_checkpoint(str(folder), tensors, hf_config_json(config), shards=2)
    return str(folder)
