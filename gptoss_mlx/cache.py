"""Key/value caches: a `window`-slot ring for sliding layers, a growing buffer for full layers.

Both store keys/values `[B, H_kv, slots, D]` (RoPE already applied) and share one position counter
(`offset`) across the batch: rows have equal length. Position p of a sliding layer lives in slot
p % window; position p of a full layer in slot p. With `bits` (8 or 4) the buffers hold keys and
values affine-quantized along D (`ops.QuantizedKV`, group 64, or 32 for narrower heads): every
position is quantized once, when it is written, and every later read sees those same values.

A chunk of T > 1 new positions goes through `update`, which returns the keys/values those queries
attend to (dequantized, for a quantized cache: one layer's worth at a time) and the mask that goes
with them (see `ops.attention_mask`). A single decoded token goes through `DecodeSlot` instead: a
functional update at an array-valued offset that always returns the whole buffer (still quantized,
for `ops.quantized_attention`) and a mask of its filled slots, so the decode step has fixed shapes
and can be compiled once (see `GptOssModel.__call__`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from copy import copy as shallow_copy
from dataclasses import dataclass

import mlx.core as mx

from .config import SLIDING, ModelConfig
from .errors import GptOssError
from .ops import QuantizedKV, attention_mask, filled_slots

KV_BITS = (16, 8, 4)  # 16: keys and values in the compute dtype, unquantized

Buffer = mx.array | QuantizedKV


def kv_group_size(head_dim: int) -> int:
    """The quantization group along the head dimension: 64, or 32 for heads of 32 or 96."""
    for group in (64, 32):
        if head_dim % group == 0:
            return group
    raise GptOssError(f"--kv-bits needs a head dimension that is a multiple of 32, not {head_dim}")


def check_kv_bits(bits: int | None) -> None:
    if bits is not None and bits not in KV_BITS:
        raise GptOssError(f"--kv-bits must be 8 or 4 (or 16: unquantized), not {bits}")


def each(fn: Callable[..., mx.array], buffer: Buffer, *others: Buffer) -> Buffer:
    """`fn` applied to a plain buffer, or to each part of a quantized one (position-axis ops)."""
    if isinstance(buffer, QuantizedKV):
        return buffer.map(fn, *others)
    return fn(buffer, *others)


def _new_object(a: mx.array) -> mx.array:
    """The same values in a new Python object: writes to either (which rebind it) leave the other
    alone, and nothing is copied until one is written (MLX arrays are values)."""
    return a[...]


def buffer_arrays(buffer: Buffer) -> list[mx.array]:
    return list(buffer.arrays) if isinstance(buffer, QuantizedKV) else [buffer]


def buffer_slots(buffer: Buffer | None) -> int:
    """Positions a buffer `[B, H_kv, slots, ...]` has room for (0 for None)."""
    return 0 if buffer is None else buffer_arrays(buffer)[0].shape[2]


def _nbytes(buffer: Buffer | None) -> int:
    return 0 if buffer is None else buffer.nbytes


class KVCache:
    """Keys and values `[B, H_kv, slots, D]` (None until first use) and the position counter;
    `FullCache` and `SlidingCache` say how positions map to slots, `bits` how they are stored."""

    window: int | None = None

    def __init__(self, bits: int | None = None) -> None:
        check_kv_bits(bits)
        self.bits = None if bits == 16 else bits
        self.keys: Buffer | None = None
        self.values: Buffer | None = None
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)

    def can_trim(self, n: int) -> bool:
        """Whether the last `n` positions can be forgotten."""
        return n <= self.offset

    def trim(self, n: int) -> bool:
        """Forget the last `n` positions (the next writes overwrite them); False if impossible."""
        if not self.can_trim(n):
            return False
        self.offset -= n
        return True

    def _store(self, x: mx.array) -> Buffer:
        """New keys or values `[B, H_kv, T, D]` as this cache stores them."""
        if self.bits is None:
            return x
        return QuantizedKV.quantize(x, kv_group_size(x.shape[-1]), self.bits)

    def _zeros(self, batch: int, kv_heads: int, slots: int, head_dim: int, dtype: mx.Dtype):
        return self._store(mx.zeros((batch, kv_heads, slots, head_dim), dtype))

    @staticmethod
    def _visible(buffer: Buffer) -> mx.array:
        """What queries attend to: the buffer, dequantized when it is quantized."""
        return buffer.dequantize() if isinstance(buffer, QuantizedKV) else buffer

    def copy(self) -> KVCache:
        """A cache holding the same positions that later writes to either leave the other alone.

        MLX arrays are values; only the buffers' Python objects (which writes rebind) are new, so
        nothing is copied until one of the two is written.
        """
        other = shallow_copy(self)
        if self.keys is not None:
            other.keys, other.values = (each(_new_object, b) for b in (self.keys, self.values))
        return other


class FullCache(KVCache):
    """Every position's keys and values, in a buffer grown `step` positions at a time."""

    step = 256  # a new capacity means a new decode-step shape (one recompilation)

    def reserve(
        self, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype, count: int
    ) -> None:
        """Make room for `count` more positions."""
        needed = self.offset + count
        have = buffer_slots(self.keys)
        if needed <= have:
            return
        grow = -(-(needed - have) // self.step) * self.step
        new_k = self._zeros(batch, kv_heads, grow, head_dim, dtype)
        new_v = self._zeros(batch, kv_heads, grow, head_dim, dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            # The whole buffer: after a trim it holds more slots than `offset`.
            def grown(old: mx.array, new: mx.array) -> mx.array:
                return mx.concatenate([old, new], axis=2)

            self.keys = each(grown, self.keys, new_k)
            self.values = each(grown, self.values, new_v)

    def update(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | str | None]:
        """Append T positions `[B, H_kv, T, D]`; -> every key and value so far and their mask."""
        B, H, T, D = keys.shape
        self.reserve(B, H, D, keys.dtype, T)
        start, end = self.offset, self.offset + T

        def write(buffer: mx.array, new: mx.array) -> mx.array:
            buffer[..., start:end, :] = new
            return buffer

        self.keys = each(write, self.keys, self._store(keys))
        self.values = each(write, self.values, self._store(values))
        self.offset = end

        def head(buffer: mx.array) -> mx.array:
            return buffer[..., :end, :]

        return (
            self._visible(each(head, self.keys)),
            self._visible(each(head, self.values)),
            attention_mask(T, end, None),
        )


class SlidingCache(KVCache):
    """The last `window` positions' keys and values in a ring: position p lives in slot p % window.

    A multi-token chunk attends to the previous window-1 positions in order followed by its own
    keys, under a band mask; then the last `window` positions are written back to their slots.
    """

    def __init__(self, window: int, bits: int | None = None) -> None:
        super().__init__(bits)
        self.window = window

    def reserve(
        self, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype, count: int
    ) -> None:
        """Allocate the ring on first use (it never grows)."""
        if self.keys is None:
            self.keys = self._zeros(batch, kv_heads, self.window, head_dim, dtype)
            self.values = self._zeros(batch, kv_heads, self.window, head_dim, dtype)

    def _ordered(self, buffer: Buffer, count: int) -> Buffer:
        """The last `count` stored positions of `buffer`, oldest first."""
        slots = mx.arange(self.offset - count, self.offset) % self.window
        return each(lambda a: mx.take(a, slots, axis=2), buffer)

    def update(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | str | None]:
        """Add T positions `[B, H_kv, T, D]`; -> the keys and values they attend to (the previous
        window - 1 positions, then theirs) and the band mask."""
        B, H, T, D = keys.shape
        W = self.window
        self.reserve(B, H, D, keys.dtype, T)
        previous = min(self.offset, W - 1)

        def joined(old: mx.array, new: mx.array) -> mx.array:
            return mx.concatenate([old, new], axis=2)

        all_k = each(joined, self._ordered(self.keys, previous), self._store(keys))
        all_v = each(joined, self._ordered(self.values, previous), self._store(values))
        end = self.offset + T
        kept = min(W, end)
        if kept == W:  # positions end-W .. end-1 go to slots (position % W): a rotation
            shift = (end - W) % W

            def rotated(a: mx.array) -> mx.array:
                return mx.roll(a[..., -W:, :], shift, axis=2)

            self.keys, self.values = each(rotated, all_k), each(rotated, all_v)
        else:  # fewer than W positions so far: position = slot

            def filled(buffer: mx.array, new: mx.array) -> mx.array:
                buffer[..., :kept, :] = new[..., -kept:, :]
                return buffer

            self.keys = each(filled, self.keys, all_k)
            self.values = each(filled, self.values, all_v)
        self.offset = end
        return self._visible(all_k), self._visible(all_v), attention_mask(T, previous + T, W)

    def can_trim(self, n: int) -> bool:
        """n <= 1, or any n while no slot has been overwritten yet (offset <= window).

        Once the ring has wrapped, the slot of a forgotten position held, before it, the position
        `window` earlier, which the next query (at the forgotten position) no longer sees;
        forgetting two would lose one it does see. Going back further takes a `snapshot`.
        """
        return n <= self.offset and (n <= 1 or self.offset <= self.window)

    def snapshot(self) -> RingSnapshot:
        """The ring as it is now (a few MB at gpt-oss shapes), to `restore` after it moved on."""
        if self.keys is None:
            return RingSnapshot(None, None, 0)
        keys, values = (each(_new_object, b) for b in (self.keys, self.values))
        return RingSnapshot(keys, values, self.offset)

    def restore(self, snapshot: RingSnapshot) -> None:
        """Put the ring back to `snapshot`: it holds the positions it held then (the snapshot
        itself stays valid for later restores)."""
        if snapshot.keys is None:
            self.keys = self.values = None
        else:
            self.keys, self.values = (
                each(_new_object, b) for b in (snapshot.keys, snapshot.values)
            )
        self.offset = snapshot.offset


@dataclass(frozen=True)
class RingSnapshot:
    """A sliding layer's ring buffers `[B, H_kv, window, D]` (quantized, for a quantized cache) at
    position counter `offset` (None before the ring's first use)."""

    keys: Buffer | None
    values: Buffer | None
    offset: int

    @property
    def nbytes(self) -> int:
        return _nbytes(self.keys) + _nbytes(self.values)


def make_cache(config: ModelConfig, bits: int | None = None) -> list[KVCache]:
    """One cache per layer: a ring of `sliding_window` slots or a growing buffer; `bits` 8 or 4
    quantizes keys and values (None or 16: the compute dtype)."""
    check_kv_bits(bits)
    if bits not in (None, 16):
        kv_group_size(config.head_dim)
    return [
        SlidingCache(config.sliding_window, bits) if t == SLIDING else FullCache(bits)
        for t in config.layer_types
    ]


class DecodeSlot:
    """One layer's cache as seen by a single decoded token at array-valued position `offset`.

    Writes the token's key/value to its slot (offset, or offset % window for a ring) and returns the
    whole buffer with a mask of the slots filled so far; every shape is fixed, so the decode step
    compiles once per buffer capacity. The new buffers are left in `keys`/`values`.
    """

    def __init__(self, keys: Buffer, values: Buffer, offset: mx.array, window: int | None) -> None:
        self.keys, self.values, self.offset, self.window = keys, values, offset, window

    def update(self, keys: mx.array, values: mx.array) -> tuple[Buffer, Buffer, mx.array]:
        """Write the token's key and value `[B, H_kv, 1, D]`; -> the whole buffers (quantized,
        for a quantized cache) and the mask of their filled slots."""
        slot = (self.offset % self.window if self.window else self.offset).reshape(1)

        def written(buffer: mx.array, new: mx.array) -> mx.array:
            return mx.slice_update(buffer, new, slot, axes=(2,))

        if isinstance(self.keys, QuantizedKV):
            group, bits = self.keys.group_size, self.keys.bits
            keys, values = (QuantizedKV.quantize(x, group, bits) for x in (keys, values))
        self.keys = each(written, self.keys, keys)
        self.values = each(written, self.values, values)
        return self.keys, self.values, filled_slots(buffer_slots(self.keys), self.offset)

    @property
    def buffers(self) -> list[mx.array]:
        """The keys' and values' arrays, flat (what the compiled decode step returns)."""
        return buffer_arrays(self.keys) + buffer_arrays(self.values)


def cache_buffers(cache: list[KVCache]) -> list[mx.array]:
    """Every layer's key and value arrays, flat, in layer order (the compiled decode step's
    inputs)."""
    return [a for c in cache for a in buffer_arrays(c.keys) + buffer_arrays(c.values)]


def decode_slots(arrays: list[mx.array], config: ModelConfig, offset: mx.array) -> list[DecodeSlot]:
    """`cache_buffers`' arrays back into one `DecodeSlot` per layer. A quantized buffer is the
    three arrays starting with a uint32 one; its bits and group follow from their shapes."""
    rest: Iterator[mx.array] = iter(arrays)

    def buffer() -> Buffer:
        first = next(rest)
        if first.dtype != mx.uint32:
            return first
        scales, biases = next(rest), next(rest)
        D = config.head_dim
        return QuantizedKV(first, scales, biases, D // scales.shape[-1], first.shape[-1] * 32 // D)

    return [
        DecodeSlot(buffer(), buffer(), offset, config.sliding_window if t == SLIDING else None)
        for t in config.layer_types
    ]


def restore_buffers(cache: list[KVCache], arrays: list[mx.array], config: ModelConfig) -> None:
    """Put the decode step's new buffers (flat, as `cache_buffers`) back into the caches and count
    the position."""
    slots = decode_slots(arrays, config, mx.array(0))
    for layer_cache, slot in zip(cache, slots, strict=True):
        layer_cache.keys, layer_cache.values = slot.keys, slot.values
        layer_cache.offset += 1
