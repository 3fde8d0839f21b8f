"""The input embedding served from the checkpoint file: the same logits as the resident table, in
every layout, with no table in memory."""

from __future__ import annotations

import gc

import checkpoints as ck
import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from gptoss_mlx import load_model
from gptoss_mlx.convert import convert
from gptoss_mlx.disk import DiskEmbedding, DiskTensor, InterleavedRows
from gptoss_mlx.safetensors_check import read_header


def bits(a: mx.array) -> np.ndarray:
    return np.array(a.view(mx.uint16) if a.dtype == mx.bfloat16 else a)


@pytest.fixture(scope="module")
def ids():
    return mx.array(np.random.RandomState(3).randint(0, ck.TINY.vocab_size, (2, 13)))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "writer, as_stored",
    [
        (ck.write_hf_mxfp4, {"dense_bits": 16}),
        (ck.write_original, {"dense_bits": 16}),
        (lambda f, c, t: ck.write_mlx_community(f, c, t, dense_bits=8), {}),
    ],
    ids=["hf-mxfp4", "original", "mlx-community-q8"],
)
def test_embedding_from_disk_gives_the_same_logits(
    tmp_path, hf_tensors, ids, writer, as_stored, dtype
):
    """Against the resident table at the same precision, as stored (a resident unquantized
    table would otherwise be quantized to 8 bits with the other dense weights)."""
    folder = writer(tmp_path / "ckpt", ck.TINY, hf_tensors)
    on_disk = load_model(folder, dtype, **as_stored)
    resident = load_model(folder, dtype, embedding_from_disk=False, **as_stored)
    assert isinstance(on_disk.embed_tokens, DiskEmbedding)
    assert isinstance(resident.embed_tokens, (nn.Embedding, nn.QuantizedEmbedding))
    assert not any(k.startswith("embed_tokens") for k, _ in tree_flatten(on_disk.parameters()))
    np.testing.assert_array_equal(bits(on_disk(ids)), bits(resident(ids)))
    cache_a, cache_b = on_disk.make_cache(), resident.make_cache()  # and through a decode step
    on_disk(ids[:1, :5], cache=cache_a), resident(ids[:1, :5], cache=cache_b)
    np.testing.assert_array_equal(
        bits(on_disk(ids[:1, 5:6], cache=cache_a)), bits(resident(ids[:1, 5:6], cache=cache_b))
    )


def allocated_by(load) -> tuple[object, int]:
    """(what `load()` returns, the MLX memory it left allocated)."""
    gc.collect()
    before = mx.get_active_memory()
    out = load()
    return out, mx.get_active_memory() - before


def test_embedding_from_disk_holds_no_table(hf_mxfp4_dir):
    """The resident model's extra memory is its embedding table (vocab x hidden, 8-bit)."""
    on_disk, without_table = allocated_by(lambda: load_model(hf_mxfp4_dir, "float32"))
    resident, with_table = allocated_by(
        lambda: load_model(hf_mxfp4_dir, "float32", embedding_from_disk=False)
    )
    table = resident.embed_tokens
    table_bytes = sum(table[k].nbytes for k in ("weight", "scales", "biases"))
    assert with_table - without_table == table_bytes
    # what is allocated is the plan's weights (give or take the RoPE frequencies, a few bytes)
    assert abs(without_table - on_disk.memory_plan.weights) < 1e-3 * without_table
    assert on_disk.embed_tokens.row_bytes == ck.TINY.hidden_size * 4  # float32 as stored
    assert on_disk.memory_plan.parts["embedding"] == 0
    assert on_disk.memory_plan.on_disk["embedding"] == ck.TINY.vocab_size * 64 * 4


def test_the_converted_folder_serves_its_quantized_embedding_from_disk(tmp_path, hf_mxfp4_dir, ids):
    folder = convert(hf_mxfp4_dir, str(tmp_path / "q8"), dense_bits=8)
    on_disk = load_model(folder, "float32")
    resident = load_model(folder, "float32", embedding_from_disk=False)
    assert on_disk.embed_tokens.table_scales is not None
    np.testing.assert_array_equal(np.array(on_disk(ids)), np.array(resident(ids)))


def test_disk_tensor_reads_rows_as_stored(tmp_path):
    a = np.arange(6 * 5 * 3, dtype=np.float32).reshape(6, 5, 3)
    b = (np.arange(6 * 4, dtype=np.uint32) * 7).reshape(6, 4)
    path = str(tmp_path / "t.safetensors")
    mx.save_safetensors(path, {"a": mx.array(a), "b": mx.array(b)})
    header = read_header(path)
    ta = DiskTensor(path, header["a"].offset, "F32", (6, 5, 3))
    assert np.array_equal(ta.read([0, 1, 2, 4]), a[[0, 1, 2, 4]])  # a run of three, then one
    assert np.array_equal(ta.rows(2, 5).read([1]), a[[3]])
    tb = DiskTensor(path, header["b"].offset, "U32", (6, 4))
    assert np.array_equal(tb.view("U8", (6, 16)).read([5]), b[[5]].view(np.uint8))
    pair = InterleavedRows(tb, tb.rows(0, 6))
    assert np.array_equal(pair.read([2])[0], np.stack([b[2], b[2]], axis=1).reshape(-1))
