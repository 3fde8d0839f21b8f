"""Key/value caches: a `window`-slot ring for sliding layers, a growing buffer for full layers.

Both store keys/values `[B, H_kv, slots, D]` (RoPE already applied) and share one position counter
(`offset`) across the batch: rows have equal length. Position p of a sliding layer lives in slot
p % window; position p of a full layer in slot p.

A chunk of T > 1 new positions goes through `update`, which returns the keys/values those queries
attend to and the mask that goes with them (see `ops.attention_mask`). A single decoded token goes
through `DecodeSlot` instead: a functional update at an array-valued offset that always returns
the whole buffer and a mask of its filled slots, so the decode step has fixed shapes and can be
compiled once (see `GptOssModel.__call__`).
"""

from __future__ import annotations

from copy import copy as shallow_copy
from dataclasses import dataclass

import mlx.core as mx

from .ops import attention_mask, filled_slots


class KVCache:
    """Keys and values `[B, H_kv, slots, D]` (None until first use) and the position counter;
    `FullCache` and `SlidingCache` say how positions map to slots."""

    window: int | None = None

    def __init__(self) -> None:
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes

    def can_trim(self, n: int) -> bool:
        """Whether the last `n` positions can be forgotten."""
        return n <= self.offset

    def trim(self, n: int) -> bool:
        """Forget the last `n` positions (the next writes overwrite them); False if impossible."""
        if not self.can_trim(n):
            return False
        self.offset -= n
        return True

    def copy(self) -> KVCache:
        """A cache holding the same positions that later writes to either leave the other alone.

        MLX arrays are values; only the buffers' Python objects (which writes rebind) are new, so
        nothing is copied until one of the two is written.
        """
        other = shallow_copy(self)
        if self.keys is not None:
            other.keys, other.values = self.keys[...], self.values[...]
        return other


class FullCache(KVCache):
    """Every position's keys and values, in a buffer grown `step` positions at a time."""

    step = 256  # a new capacity means a new decode-step shape (one recompilation)

    def reserve(
        self, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype, count: int
    ) -> None:
        """Make room for `count` more positions."""
        needed = self.offset + count
        have = 0 if self.keys is None else self.keys.shape[2]
        if needed <= have:
            return
        grow = -(-(needed - have) // self.step) * self.step
        new_k = mx.zeros((batch, kv_heads, grow, head_dim), dtype)
        new_v = mx.zeros((batch, kv_heads, grow, head_dim), dtype)
        if self.keys is None:
            self.keys, self.values = new_k, new_v
        else:
            # The whole buffer: after a trim it holds more slots than `offset`.
            self.keys = mx.concatenate([self.keys, new_k], axis=2)
            self.values = mx.concatenate([self.values, new_v], axis=2)

    def update(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | str | None]:
        """Append T positions `[B, H_kv, T, D]`; -> every key and value so far and their mask."""
        B, H, T, D = keys.shape
        self.reserve(B, H, D, keys.dtype, T)
        end = self.offset + T
        self.keys[..., self.offset : end, :] = keys
        self.values[..., self.offset : end, :] = values
        self.offset = end
        return self.keys[..., :end, :], self.values[..., :end, :], attention_mask(T, end, None)


class SlidingCache(KVCache):
    """The last `window` positions' keys and values in a ring: position p lives in slot p % window.

    A multi-token chunk attends to the previous window-1 positions in order followed by its own
    keys, under a band mask; then the last `window` positions are written back to their slots.
    """

    def __init__(self, window: int) -> None:
        super().__init__()
        self.window = window

    def reserve(
        self, batch: int, kv_heads: int, head_dim: int, dtype: mx.Dtype, count: int
    ) -> None:
        """Allocate the ring on first use (it never grows)."""
        if self.keys is None:
            self.keys = mx.zeros((batch, kv_heads, self.window, head_dim), dtype)
            self.values = mx.zeros((batch, kv_heads, self.window, head_dim), dtype)

    def _ordered(self, buffer: mx.array, count: int) -> mx.array:
        """The last `count` stored positions of `buffer`, oldest first."""
        slots = mx.arange(self.offset - count, self.offset) % self.window
        return mx.take(buffer, slots, axis=2)

    def update(
        self, keys: mx.array, values: mx.array
    ) -> tuple[mx.array, mx.array, mx.array | str | None]:
        """Add T positions `[B, H_kv, T, D]`; -> the keys and values they attend to (the previous
        window - 1 positions, then theirs) and the band mask."""
        B, H, T, D = keys.shape
        W = self.window
        self.reserve(B, H, D, keys.dtype, T)
        previous = min(self.offset, W - 1)
        all_k = mx.concatenate([self._ordered(self.keys, previous), keys], axis=2)
        all_v = mx.concatenate([self._ordered(self.values, previous), values], axis=2)
        end = self.offset + T
        kept = min(W, end)
        if kept == W:  # positions end-W .. end-1 go to slots (position % W): a rotation
            shift = (end - W) % W
            self.keys = mx.roll(all_k[..., -W:, :], shift, axis=2)
            self.values = mx.roll(all_v[..., -W:, :], shift, axis=2)
        else:  # fewer than W positions so far: position = slot
            self.keys[..., :kept, :] = all_k[..., -kept:, :]
            self.values[..., :kept, :] = all_v[..., -kept:, :]
        self.offset = end
        return all_k, all_v, attention_mask(T, previous + T, W)

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
        return RingSnapshot(self.keys[...], self.values[...], self.offset)

    def restore(self, snapshot: RingSnapshot) -> None:
        """Put the ring back to `snapshot`: it holds the positions it held then (the snapshot
        itself stays valid for later restores)."""
        if snapshot.keys is None:
            self.keys = self.values = None
        else:
            self.keys, self.values = snapshot.keys[...], snapshot.values[...]
        self.offset = snapshot.offset


@dataclass(frozen=True)
class RingSnapshot:
    """A sliding layer's ring buffers `[B, H_kv, window, D]` at position counter `offset` (None
    before the ring's first use)."""

    keys: mx.array | None
    values: mx.array | None
    offset: int

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class DecodeSlot:
    """One layer's cache as seen by a single decoded token at array-valued position `offset`.

    Writes the token's key/value to its slot (offset, or offset % window for a ring) and returns the
    whole buffer with a mask of the slots filled so far; every shape is fixed, so the decode step
    compiles once per buffer capacity. The new buffers are left in `keys`/`values`.
    """

    def __init__(
        self, keys: mx.array, values: mx.array, offset: mx.array, window: int | None
    ) -> None:
        self.keys, self.values, self.offset, self.window = keys, values, offset, window

    def update(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array, mx.array]:
        """Write the token's key and value `[B, H_kv, 1, D]`; -> the whole buffers and the mask of
        their filled slots."""
        slot = self.offset % self.window if self.window else self.offset
        self.keys = mx.slice_update(self.keys, keys, slot.reshape(1), axes=(2,))
        self.values = mx.slice_update(self.values, values, slot.reshape(1), axes=(2,))
        return self.keys, self.values, filled_slots(self.keys.shape[2], self.offset)
