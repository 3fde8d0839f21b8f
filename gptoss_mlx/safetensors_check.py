"""Check safetensors shards before loading them, so a bad file gets a clear one-line error.

A safetensors file is an 8-byte little-endian header length, a JSON header mapping each tensor
name to its dtype, shape and byte range, then the data. `read_header` validates all of it against
the file's real size without reading any tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass

from .errors import GptOssError

_DTYPE_BYTES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "U16": 2,
    "I16": 2,
    "F16": 2,
    "BF16": 2,
    "U32": 4,
    "I32": 4,
    "F32": 4,
    "U64": 8,
    "I64": 8,
    "F64": 8,
}


@dataclass(frozen=True)
class TensorInfo:
    file: str
    dtype: str  # safetensors spelling: "U8", "BF16", ...
    shape: tuple[int, ...]
    offset: int  # where its bytes start in the file
    nbytes: int


def read_header(path: str) -> dict[str, TensorInfo]:
    """Tensor name -> TensorInfo for one shard; GptOssError if the file is corrupt or cut short."""
    name = os.path.basename(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise GptOssError(
                f"{name}: truncated safetensors file ({size} bytes); download it again"
            )
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
            raise GptOssError(
                f"{name}: truncated or not a safetensors file (header claims "
                f"{header_len} bytes, file has {size}); download it again"
            )
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, UnicodeDecodeError):
            raise GptOssError(f"{name}: corrupt safetensors header; download it again") from None
    data_size = size - 8 - header_len
    tensors = {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = (
                entry["dtype"],
                tuple(entry["shape"]),
                entry["data_offsets"],
            )
        except (KeyError, TypeError, ValueError):
            raise GptOssError(f"{name}: corrupt safetensors entry for {key}") from None
        count = 1
        for dim in shape:
            count *= dim
        if dtype in _DTYPE_BYTES and end - start != count * _DTYPE_BYTES[dtype]:
            raise GptOssError(
                f"{name}: tensor {key} has {end - start} bytes for shape "
                f"{list(shape)} {dtype}; the file is corrupt"
            )
        if end > data_size:
            raise GptOssError(
                f"{name}: truncated: tensor {key} ends at byte {end} of the data but "
                f"the file holds {data_size}; download it again"
            )
        tensors[key] = TensorInfo(path, dtype, shape, 8 + header_len + start, end - start)
    return tensors
