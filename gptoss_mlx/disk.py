"""Tensors served from the checkpoint file, a few rows at a time: embedding rows and experts.

A `DiskTensor` is where a tensor's bytes lie in a safetensors shard; `read(rows)` reads only the
rows (slices along the first axis) asked for, with plain reads straight into an MLX array's
buffer. The pages go through the OS's file cache, which keeps what fits and drops what it must;
they are not mapped into the process (a memory map's pages would count in its resident size and
stay mapped). `DiskEmbedding` serves the input embedding this way, one row per token; the expert
cache reads experts, and a rank of several its experts' rows (`weights`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .errors import GptOssError
from .safetensors_check import TensorInfo

# safetensors dtype -> the MLX dtype its bytes are read as
MLX_DTYPES = {
    "U8": mx.uint8,
    "U32": mx.uint32,
    "I32": mx.int32,
    "F32": mx.float32,
    "F16": mx.float16,
    "BF16": mx.bfloat16,
}


@dataclass(frozen=True)
class DiskTensor:
    """A tensor of `shape` and safetensors `dtype` whose bytes start at byte `offset` of `file`."""

    file: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @classmethod
    def of(cls, info: TensorInfo) -> DiskTensor:
        """Where a tensor of a shard's header lies."""
        return cls(info.file, info.offset, info.dtype, tuple(info.shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one slice along the first axis."""
        itemsize = MLX_DTYPES[self.dtype].size
        return int(np.prod(self.shape[1:], dtype=np.int64)) * itemsize

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes

    def view(self, dtype: str, shape: tuple[int, ...]) -> DiskTensor:
        """The same bytes read as another dtype and shape (e.g. uint8 MXFP4 blocks as uint32)."""
        view = DiskTensor(self.file, self.offset, dtype, tuple(shape))
        if view.nbytes != self.nbytes or view.shape[0] != self.shape[0]:
            raise ValueError(f"cannot view {self.shape} {self.dtype} as {shape} {dtype}")
        return view

    def rows(self, start: int, stop: int) -> DiskTensor:
        """Rows start .. stop-1 as a tensor of their own (a rank's share of stacked experts)."""
        return DiskTensor(
            self.file,
            self.offset + start * self.row_bytes,
            self.dtype,
            (stop - start, *self.shape[1:]),
        )

    def read(self, rows: Sequence[int]) -> mx.array:
        """Rows `rows` (first-axis indices, ascending and distinct) -> `[len(rows), *shape[1:]]`,
        read from the file straight into the buffer of the array returned (nothing else holds
        them, even for a moment); consecutive rows in one read."""
        out = mx.zeros((len(rows) * self.row_bytes,), mx.uint8)
        mx.eval(out)
        buffer = memoryview(out)  # writable: MLX arrays lend their buffer
        with open(self.file, "rb", buffering=0) as f:
            i = 0
            while i < len(rows):
                j = i + 1
                while j < len(rows) and rows[j] == rows[j - 1] + 1:
                    j += 1
                f.seek(self.offset + int(rows[i]) * self.row_bytes)
                _read_exactly(f, buffer[i * self.row_bytes : j * self.row_bytes], self.file)
                i = j
        return out.view(MLX_DTYPES[self.dtype]).reshape(len(rows), *self.shape[1:])


def _read_exactly(f, buffer: memoryview, name: str) -> None:
    done = 0
    while done < len(buffer):
        n = f.readinto(buffer[done:])
        if not n:
            raise GptOssError(
                f"{os.path.basename(name)}: ends before its tensors do; download it again"
            )
        done += n


@dataclass(frozen=True)
class InterleavedRows:
    """A stacked tensor `[E, 2 * rows, ...]` whose rows alternate between two stored tensors
    `[E, rows, ...]` (mlx-community stores the experts' gate and linear rows apart): reading
    expert e interleaves them back, as loading does."""

    even: DiskTensor
    odd: DiskTensor

    @property
    def shape(self) -> tuple[int, ...]:
        return (self.even.shape[0], 2 * self.even.shape[1], *self.even.shape[2:])

    @property
    def dtype(self) -> str:
        return self.even.dtype

    @property
    def row_bytes(self) -> int:
        return 2 * self.even.row_bytes

    def rows(self, start: int, stop: int) -> InterleavedRows:
        return InterleavedRows(self.even.rows(start, stop), self.odd.rows(start, stop))

    def read(self, rows: Sequence[int]) -> mx.array:
        even, odd = self.even.read(rows), self.odd.read(rows)
        return mx.stack([even, odd], axis=2).reshape(len(rows), *self.shape[1:])


StoredRows = DiskTensor | InterleavedRows


class DiskEmbedding(nn.Module):
    """The input embedding read from the checkpoint file: ids `[B, T]` -> rows `[B, T, hidden]`.

    Holds no table in memory: each call reads the rows of the distinct ids it is given (so the ids
    must be on the host: reading them waits for the device). A table stored affine-quantized
    (`scales`, `biases`) is dequantized row by row, as `nn.QuantizedEmbedding` does; the rows come
    out in `dtype`, identical to gathering from the resident table cast to `dtype`.
    """

    host_reads = True  # its input is read on the host: no compiled graph can contain it

    def __init__(
        self,
        weight: DiskTensor,
        dtype: mx.Dtype,
        scales: DiskTensor | None = None,
        biases: DiskTensor | None = None,
        group_size: int | None = None,
        bits: int | None = None,
    ) -> None:
        super().__init__()
        self.table, self.table_scales, self.table_biases = weight, scales, biases
        self.group_size, self.bits = group_size, bits
        self.compute_dtype = dtype

    @property
    def row_bytes(self) -> int:
        """Bytes read from disk per token."""
        parts = (self.table, self.table_scales, self.table_biases)
        return sum(p.row_bytes for p in parts if p is not None)

    @property
    def nbytes_on_disk(self) -> int:
        return self.table.shape[0] * self.row_bytes

    def __call__(self, ids: mx.array) -> mx.array:
        flat = np.asarray(ids).reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() >= self.table.shape[0]):
            raise GptOssError(f"token id outside the vocabulary (0..{self.table.shape[0] - 1})")
        rows, inverse = np.unique(flat, return_inverse=True)
        table = self.table.read(rows)
        if self.table_scales is not None:
            scales = self.table_scales.read(rows).astype(self.compute_dtype)
            biases = self.table_biases.read(rows).astype(self.compute_dtype)
            table = mx.dequantize(table, scales, biases, group_size=self.group_size, bits=self.bits)
        table = table.astype(self.compute_dtype)
        return table[mx.array(inverse.reshape(-1))].reshape(*ids.shape, -1)
