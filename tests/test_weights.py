"""Every published checkpoint layout loads to the same model; bad checkpoints get clear errors."""

from __future__ import annotations

import json
import os

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import GptOssError, load_model
from gptoss_mlx.weights import read_checkpoint


@pytest.mark.parametrize(
    "writer,layout",
    [
        (ck.write_hf_mxfp4, "hf-mxfp4"),
        (ck.write_hf_bf16, "hf-bf16"),
        (ck.write_original, "original"),
        (
            lambda folder, cfg, t: ck.write_mlx_community(folder, cfg, t, dense_bits=0),
            "mlx-community",
        ),
    ],
)
def test_each_layout_matches_transformers(tmp_path, hf_tensors, ids, ref_logits, writer, layout):
    folder = writer(tmp_path / layout, ck.TINY, hf_tensors)
    assert read_checkpoint(folder).layout == layout
    assert ck.relative_error(ck.folder_logits(folder, ids), ref_logits) < ck.FLOAT32_TOL


def test_published_layout_experts_are_the_checkpoint_bytes(hf_mxfp4_dir, hf_tensors):
    """The uint8 blocks viewed as uint32 are the weights: bit-exact, no requantization."""
    model = load_model(hf_mxfp4_dir, dtype="float32", dense_bits=16)
    experts = model.layers[1].mlp.experts.gate_up_proj
    blocks = np.array(hf_tensors["model.layers.1.mlp.experts.gate_up_proj_blocks"])
    assert np.array_equal(
        np.array(experts.weight).view(np.uint8),
        blocks.reshape(blocks.shape[0], blocks.shape[1], -1),
    )
    assert np.array_equal(
        np.array(experts.scales),
        np.array(hf_tensors["model.layers.1.mlp.experts.gate_up_proj_scales"]),
    )


def test_mlx_community_quantized_dense_matches_reference_with_same_weights(
    tmp_path, hf_tensors, ids
):
    """8-bit affine dense weights: equal to transformers holding the dequantized 8-bit weights."""
    folder = ck.write_mlx_community(tmp_path / "q8", ck.TINY, hf_tensors, dense_bits=8)
    on_disk = mx.load(os.path.join(folder, "model.safetensors"))
    dequantized = dict(hf_tensors)
    for name in hf_tensors:
        base = name[: -len(".weight")]
        if name.endswith(".weight") and base + ".scales" in on_disk:
            dequantized[name] = mx.dequantize(
                on_disk[name],
                on_disk[base + ".scales"],
                on_disk[base + ".biases"],
                group_size=64,
                bits=8,
            )
    ref = ck.reference_logits(ck.reference_model(dequantized, ck.TINY), ids)
    model = load_model(folder, dtype="float32")
    assert type(model.layers[0].self_attn.q_proj).__name__ == "QuantizedLinear"
    assert ck.relative_error(ck.np32(model(mx.array(ids))), ref) < ck.FLOAT32_TOL


# ---- bad input -------------------------------------------------------------------------------


@pytest.fixture()
def two_shards(tmp_path, hf_tensors):
    return ck.write_hf_mxfp4(tmp_path / "ckpt", ck.TINY, hf_tensors, shards=2)


def shard(folder, n=2):
    return os.path.join(folder, f"model-0000{n}-of-00002.safetensors")


def expect_error(folder, *fragments):
    with pytest.raises(GptOssError) as err:
        load_model(folder, dtype="float32")
    message = str(err.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, message
    return message


def test_missing_shard(two_shards):
    os.remove(shard(two_shards))
    expect_error(two_shards, "missing shard", "model-00002-of-00002.safetensors")


def test_truncated_shard(two_shards):
    path = shard(two_shards)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(size - 1000)
    expect_error(two_shards, "model-00002-of-00002.safetensors", "truncated")


def test_corrupt_header(two_shards):
    with open(shard(two_shards, 1), "r+b") as f:
        f.seek(8)
        f.write(b"\xff\xfe garbage")
    expect_error(two_shards, "model-00001-of-00002.safetensors", "corrupt")


def test_wrong_dtype(tmp_path, hf_tensors):
    bad = dict(hf_tensors)
    name = "model.layers.0.mlp.experts.down_proj_blocks"
    bad[name] = bad[name].astype(mx.float16)
    folder = ck.write_hf_mxfp4(tmp_path, ck.TINY, bad, shards=1)
    expect_error(folder, name, "dtype", "uint8")


def test_wrong_shape(tmp_path, hf_tensors):
    bad = dict(hf_tensors)
    name = "model.layers.1.self_attn.k_proj.weight"
    bad[name] = bad[name][:-1]
    folder = ck.write_hf_mxfp4(tmp_path, ck.TINY, bad, shards=1)
    expect_error(folder, name, "shape")


def test_config_that_does_not_match_the_weights(hf_mxfp4_dir, tmp_path):
    import shutil

    folder = shutil.copytree(hf_mxfp4_dir, tmp_path / "c")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["num_hidden_layers"] = 2
    cfg["layer_types"] = cfg["layer_types"][:2]
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(str(folder), "unexpected tensor", "model.layers.2")
    cfg["num_hidden_layers"], cfg["layer_types"] = 6, None
    (folder / "config.json").write_text(json.dumps(cfg))
    expect_error(str(folder), "missing", "model.layers.4")


def test_unknown_layout(tmp_path):
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"),
        {"transformer.h.0.attn.c_attn.weight": mx.zeros((4, 4))},
    )
    (tmp_path / "config.json").write_text(json.dumps(ck.TINY.to_hf()))
    expect_error(str(tmp_path), "unknown checkpoint layout")


def test_not_a_checkpoint(tmp_path):
    expect_error(str(tmp_path), "not a gpt-oss checkpoint")


def test_hub_offline_says_to_pass_a_local_path(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    message = expect_error("openai/gpt-oss-20b")
    assert "local checkpoint folder" in message


def test_model_too_big_for_memory(monkeypatch, hf_mxfp4_dir):
    import gptoss_mlx.memory as memory

    monkeypatch.setattr(memory, "machine_memory", lambda: {"physical": 1000, "metal": False})
    expect_error(hf_mxfp4_dir, "GB for its weights", "this machine has")


def test_unknown_dtype(hf_mxfp4_dir):
    with pytest.raises(GptOssError, match="unknown dtype"):
        load_model(hf_mxfp4_dir, dtype="float64")
