"""Synthetic checkpoints: every tensor of the published layout at the real 20b and 120b shapes.

The expected names and shapes are written out here from gpt-oss's published Hugging Face layout
(`model.layers.N.mlp.experts.gate_up_proj_blocks` uint8 `[E, 5760, 90, 16]`, ...) and its published
sizes, not from the code under test. The checkpoints are built lazily and never evaluated (the
120b one would be about 65 GB).
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from checkpoints import TINY

from gptoss_mlx.config import preset
from gptoss_mlx.synthetic import random_checkpoint

# The published sizes: layers, experts; both share hidden 2880, expert width 2880, 64 query and
# 8 KV heads of 64, vocabulary 201088.
PUBLISHED = {"20b": (24, 32), "120b": (36, 128)}


def published_layout(layers: int, experts: int) -> dict[str, tuple[tuple[int, ...], mx.Dtype]]:
    """Tensor name -> (shape, dtype) of `openai/gpt-oss-*` in bfloat16 with MXFP4 experts."""
    bf16, u8 = mx.bfloat16, mx.uint8
    out = {
        "model.embed_tokens.weight": ((201088, 2880), bf16),
        "lm_head.weight": ((201088, 2880), bf16),
        "model.norm.weight": ((2880,), bf16),
    }
    for n in range(layers):
        p = f"model.layers.{n}."
        out |= {
            p + "input_layernorm.weight": ((2880,), bf16),
            p + "post_attention_layernorm.weight": ((2880,), bf16),
            p + "self_attn.q_proj.weight": ((4096, 2880), bf16),
            p + "self_attn.q_proj.bias": ((4096,), bf16),
            p + "self_attn.k_proj.weight": ((512, 2880), bf16),
            p + "self_attn.k_proj.bias": ((512,), bf16),
            p + "self_attn.v_proj.weight": ((512, 2880), bf16),
            p + "self_attn.v_proj.bias": ((512,), bf16),
            p + "self_attn.o_proj.weight": ((2880, 4096), bf16),
            p + "self_attn.o_proj.bias": ((2880,), bf16),
            p + "self_attn.sinks": ((64,), bf16),
            p + "mlp.router.weight": ((experts, 2880), bf16),
            p + "mlp.router.bias": ((experts,), bf16),
            p + "mlp.experts.gate_up_proj_blocks": ((experts, 5760, 90, 16), u8),
            p + "mlp.experts.gate_up_proj_scales": ((experts, 5760, 90), u8),
            p + "mlp.experts.gate_up_proj_bias": ((experts, 5760), bf16),
            p + "mlp.experts.down_proj_blocks": ((experts, 2880, 90, 16), u8),
            p + "mlp.experts.down_proj_scales": ((experts, 2880, 90), u8),
            p + "mlp.experts.down_proj_bias": ((experts, 2880), bf16),
        }
    return out


@pytest.mark.parametrize("name", ["20b", "120b"])
def test_real_size_checkpoint_has_the_published_layout(name):
    tensors = random_checkpoint(preset(name))  # lazy: nothing is evaluated
    want = published_layout(*PUBLISHED[name])
    assert sorted(tensors) == sorted(want)
    for key, (shape, dtype) in want.items():
        assert (tuple(tensors[key].shape), tensors[key].dtype) == (shape, dtype), key


def test_tensors_are_reproducible_and_distinct():
    """Same seed, same values; different tensors of one shape draw different values."""
    config = TINY
    a, b = random_checkpoint(config, seed=5), random_checkpoint(config, seed=5)
    for key in a:
        assert mx.array_equal(a[key], b[key]).item(), key
    q0, q1 = (a[f"model.layers.{n}.self_attn.q_proj.weight"] for n in (0, 1))
    assert not mx.array_equal(q0, q1).item()
    other = random_checkpoint(config, seed=6)["model.layers.0.self_attn.q_proj.weight"]
    assert not mx.array_equal(q0, other).item()
