"""`gptoss-mlx convert`: an MLX-native folder that loads to the same model, written atomically."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import GptOssError, load_model
from gptoss_mlx.convert import convert
from gptoss_mlx.weights import read_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("writer", [ck.write_hf_mxfp4, ck.write_hf_bf16, ck.write_original])
def test_converted_folder_matches_transformers(tmp_path, hf_tensors, ids, ref_logits, writer):
    src = writer(tmp_path / "src", ck.TINY, hf_tensors)
    dst = convert(src, str(tmp_path / "dst"))
    assert read_checkpoint(dst).layout == "gptoss-mlx"
    assert ck.relative_error(ck.folder_logits(dst, ids), ref_logits) < ck.FLOAT32_TOL


def test_experts_stay_bit_exact_and_config_records_layout(tmp_path, hf_mxfp4_dir, hf_tensors):
    (tmp_path / "tok").mkdir()
    dst = convert(hf_mxfp4_dir, str(tmp_path / "dst"))
    stored = {}
    for f in os.listdir(dst):
        if f.endswith(".safetensors"):
            stored.update(mx.load(os.path.join(dst, f)))
    blocks = np.array(hf_tensors["model.layers.2.mlp.experts.down_proj_blocks"])
    weight = np.array(stored["layers.2.mlp.experts.down_proj.weight"]).view(np.uint8)
    assert np.array_equal(weight, blocks.reshape(*blocks.shape[:2], -1))
    config = json.load(open(os.path.join(dst, "config.json")))
    assert config["gptoss_mlx"]["source_layout"] == "hf-mxfp4"
    assert config["gptoss_mlx"]["experts"]["mode"] == "mxfp4"
    assert config["gptoss_mlx"]["dense"] == {"bits": 16}


def test_dense_bits_quantizes_dense_weights(tmp_path, hf_mxfp4_dir, ids, ref_logits):
    errors = {}
    for bits in (8, 4):
        dst = convert(hf_mxfp4_dir, str(tmp_path / f"q{bits}"), dense_bits=bits)
        config = json.load(open(os.path.join(dst, "config.json")))
        assert config["gptoss_mlx"]["dense"] == {"bits": bits, "group_size": 64, "mode": "affine"}
        model = load_model(dst, dtype="float32")
        assert model.layers[0].self_attn.q_proj.bits == bits
        assert model.lm_head.bits == bits and model.embed_tokens.bits == bits
        assert type(model.layers[0].mlp.router).__name__ == "Linear"  # the router stays exact
        errors[bits] = ck.relative_error(ck.np32(model(mx.array(ids))), ref_logits)
    # Lossy, and 4 bits lose more than 8 (this random model amplifies rounding: see README).
    assert ck.FLOAT32_TOL < errors[8] < errors[4] < 1.0


def test_shards_respect_the_size_limit(tmp_path, hf_mxfp4_dir, ids, ref_logits):
    limit = 40_000
    dst = convert(hf_mxfp4_dir, str(tmp_path / "dst"), max_shard_bytes=limit)
    index = json.load(open(os.path.join(dst, "model.safetensors.index.json")))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 3
    for name in shards:
        tensors = mx.load(os.path.join(dst, name))
        if len(tensors) > 1:  # a single tensor larger than the limit gets a shard of its own
            assert sum(t.nbytes for t in tensors.values()) <= limit
    assert ck.relative_error(ck.folder_logits(dst, ids), ref_logits) < ck.FLOAT32_TOL


def test_tokenizer_files_are_copied(tmp_path, hf_tensors):
    src = ck.write_hf_mxfp4(tmp_path / "src", ck.TINY, hf_tensors, shards=1)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (tmp_path / "src" / name).write_text("{}")
    dst = convert(src, str(tmp_path / "dst"))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert os.path.isfile(os.path.join(dst, name))


def test_existing_destination_needs_force(tmp_path, hf_mxfp4_dir):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(GptOssError, match="--force"):
        convert(hf_mxfp4_dir, str(dst))
    assert (dst / "keep.txt").read_text() == "mine"
    convert(hf_mxfp4_dir, str(dst), force=True)
    assert not (dst / "keep.txt").exists()
    assert read_checkpoint(str(dst)).layout == "gptoss-mlx"


def test_failed_conversion_writes_nothing(tmp_path, hf_tensors):
    bad = dict(hf_tensors)
    bad["model.layers.3.mlp.experts.gate_up_proj_scales"] = bad[
        "model.layers.3.mlp.experts.gate_up_proj_scales"
    ][:, :-1]
    src = ck.write_hf_mxfp4(tmp_path / "src", ck.TINY, bad, shards=1)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(GptOssError, match="gate_up_proj_scales"):
        convert(src, str(out / "dst"))
    assert os.listdir(out) == []  # no destination and no temporary folder left behind


def run_cli(*args, script=None):
    command = [sys.executable, script] if script else [sys.executable, "-m", "gptoss_mlx.cli"]
    return subprocess.run(
        command + list(args),
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def test_cli_and_script_convert(tmp_path, hf_mxfp4_dir, ids, ref_logits):
    done = run_cli("convert", hf_mxfp4_dir, "-o", str(tmp_path / "a"), "--dense-bits", "16")
    assert done.returncode == 0, done.stderr
    done = run_cli(hf_mxfp4_dir, "-o", str(tmp_path / "b"), script=os.path.join(REPO, "convert.py"))
    assert done.returncode == 0, done.stderr
    for name in ("a", "b"):
        assert (
            ck.relative_error(ck.folder_logits(str(tmp_path / name), ids), ref_logits)
            < ck.FLOAT32_TOL
        )


@pytest.mark.parametrize("case", ["missing", "exists", "bits"])
def test_cli_errors_are_one_line(tmp_path, hf_mxfp4_dir, case):
    (tmp_path / "exists").mkdir()
    src, dst, extra = {
        "missing": (str(tmp_path / "nope"), str(tmp_path / "dst"), []),
        "exists": (hf_mxfp4_dir, str(tmp_path / "exists"), []),
        "bits": (hf_mxfp4_dir, str(tmp_path / "dst"), ["--dense-bits", "3"]),
    }[case]
    done = run_cli("convert", src, "-o", dst, *extra)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr
    assert not os.path.exists(tmp_path / "dst")
