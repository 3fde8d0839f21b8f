"""Dense weights quantized at load: 8 bits by default, bit for bit what `convert --dense-bits`
writes, as stored for checkpoints that are already quantized."""

from __future__ import annotations

import checkpoints as ck
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gptoss_mlx import Benchmark, GptOssError, load_model
from gptoss_mlx.convert import convert


def raw(a: mx.array) -> np.ndarray:
    """The array's bits (bfloat16 as uint16)."""
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


def parameters(model) -> dict[str, tuple]:
    return {name: (a.dtype, raw(a)) for name, a in tree_flatten(model.parameters())}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_at_load_equals_the_converted_folder_bit_for_bit(
    tmp_path, hf_mxfp4_dir, bits, dtype
):
    converted = convert(hf_mxfp4_dir, str(tmp_path / "q"), dense_bits=bits)
    ours = load_model(hf_mxfp4_dir, dtype, dense_bits=bits, embedding_from_disk=False)
    theirs = load_model(converted, dtype, embedding_from_disk=False)
    a, b = parameters(ours), parameters(theirs)
    assert a.keys() == b.keys()
    assert "lm_head.scales" in a and "layers.0.self_attn.q_proj.biases" in a
    for name in a:
        assert a[name][0] == b[name][0] and np.array_equal(a[name][1], b[name][1]), name
    ids = mx.array(np.random.RandomState(0).randint(0, ck.TINY.vocab_size, (1, 12)))
    assert np.array_equal(raw(ours(ids)), raw(theirs(ids)))


def test_eight_bits_by_default_for_unquantized_dense_weights(hf_mxfp4_dir):
    model = load_model(hf_mxfp4_dir, dtype="float32")
    for layer in (model.layers[0].self_attn.q_proj, model.layers[3].self_attn.o_proj):
        assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (8, 64)
    assert isinstance(model.lm_head, nn.QuantizedLinear) and model.lm_head.bits == 8
    assert type(model.layers[0].mlp.router) is nn.Linear  # the router stays exact
    assert model.describe().startswith("dense 8-bit")
    exact = load_model(hf_mxfp4_dir, dtype="float32", dense_bits=16)
    assert type(exact.layers[0].self_attn.q_proj) is nn.Linear


def test_quantized_checkpoints_load_as_stored(tmp_path, hf_tensors):
    folder = ck.write_mlx_community(tmp_path / "q8", ck.TINY, hf_tensors, dense_bits=8)
    assert load_model(folder, dtype="float32").lm_head.bits == 8
    assert load_model(folder, dtype="float32", dense_bits=8).lm_head.bits == 8
    for bits in (4, 16):
        with pytest.raises(GptOssError, match="stored quantized at 8 bits"):
            load_model(folder, dtype="float32", dense_bits=bits)


def test_bench_reports_the_eight_bit_figure_by_default():
    """Bytes per decoded token from the config alone: attention projections and unembedding at
    8 bits (a byte per weight plus a bfloat16 scale and bias per 64), biases, norms, sinks and
    router in bfloat16, 4 of the 8 experts, one row of the (8-bit: synthetic weights live in
    memory, so the embedding stays resident) embedding."""
    bench = Benchmark(synthetic="tiny", dtype="bfloat16")
    c = bench.model.config
    H, D, Hq, Hkv = c.hidden_size, c.head_dim, c.num_attention_heads, c.num_key_value_heads
    q8 = lambda rows, cols: rows * cols + rows * (cols // 64) * 2 * 2  # noqa: E731
    projections = q8(Hq * D, H) + 2 * q8(Hkv * D, H) + q8(H, Hq * D)
    biases = (Hq * D + 2 * Hkv * D + H) * 2
    norms_sinks_router = (2 * H + Hq + c.num_experts * H + c.num_experts) * 2
    I = c.intermediate_size
    expert = (2 * I * H + H * I) // 2 + (2 * I * H + H * I) // 32 + (2 * I + H) * 2
    per_layer = projections + biases + norms_sinks_router + c.experts_per_token * expert
    want = c.num_hidden_layers * per_layer + q8(c.vocab_size, H) + H * 2 + q8(1, H)
    result = bench.run((8,), gen_tokens=2, repeats=1, warmup=False)
    assert result["weight_bytes_per_token"] == want
    assert result["precision"].startswith("dense 8-bit")
    exact = Benchmark(synthetic="tiny", dtype="bfloat16", dense_bits=16)
    assert exact.run((8,), gen_tokens=2, repeats=1, warmup=False)["weight_bytes_per_token"] > want
