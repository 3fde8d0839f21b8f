"""Key/value caches: a 128-slot ring buffer for sliding layers, a growing buffer for full layers.

Both take the new keys/values of T positions (`[B, H_kv, T, D]`, RoPE already applied) and return
the keys/values the new queries attend to, plus the mask that goes with them (see `attention_mask`).
Batches share one position counter (`offset`): rows have equal length.
"""

from __future__ import annotations

import mlx.core as mx


def attention_mask(num_queries: int, num_keys: int, window: int | None):
    """Mask for queries that are the last `num_queries` of `num_keys` consecutive positions.

    Query t (absolute position num_keys - num_queries + t) sees key j iff j <= its position and, for
    a sliding layer, its position - j < window. Returns None (nothing to mask), "causal" (MLX's
    lower-right causal mask), or a boolean `[T, S]` band.
    """
    if num_queries == 1 and (window is None or num_keys <= window):
        return None
    if window is None or num_keys <= window:
        return "causal"
    q_pos = mx.arange(num_keys - num_queries, num_keys)[:, None]
    k_pos = mx.arange(num_keys)[None, :]
    distance = q_pos - k_pos
    return (distance >= 0) & (distance < window)


class FullCache:
    """Every position's keys and values, in a buffer grown `step` positions at a time."""

    step = 256
    window = None

    def __init__(self):
        self.keys = None
        self.values = None
        self.offset = 0

    def update(self, keys: mx.array, values: mx.array):
        B, H, T, D = keys.shape
        needed = self.offset + T
        if self.keys is None or needed > self.keys.shape[2]:
            grow = ((needed - (0 if self.keys is None else self.keys.shape[2]) + self.step - 1)
                    // self.step) * self.step
            new_k = mx.zeros((B, H, grow, D), keys.dtype)
            new_v = mx.zeros((B, H, grow, values.shape[3]), values.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[..., : self.offset, :], new_k], axis=2)
                self.values = mx.concatenate([self.values[..., : self.offset, :], new_v], axis=2)
        self.keys[..., self.offset : needed, :] = keys
        self.values[..., self.offset : needed, :] = values
        self.offset = needed
        return (
            self.keys[..., :needed, :],
            self.values[..., :needed, :],
            attention_mask(T, needed, None),
        )

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class SlidingCache:
    """The last `window` positions' keys and values in a ring: position p lives in slot p % window.

    Decoding one token attends to the whole ring (every stored key is inside its window, order does
    not matter), so it needs no mask. A multi-token chunk attends to the previous window-1 positions
    in order followed by its own keys, under a band mask.
    """

    def __init__(self, window: int):
        self.window = window
        self.keys = None
        self.values = None
        self.offset = 0

    def _ordered(self, buffer: mx.array, count: int) -> mx.array:
        """The last `count` stored positions of `buffer`, oldest first."""
        slots = mx.arange(self.offset - count, self.offset) % self.window
        return mx.take(buffer, slots, axis=2)

    def update(self, keys: mx.array, values: mx.array):
        B, H, T, D = keys.shape
        W = self.window
        if self.keys is None:
            self.keys = mx.zeros((B, H, W, D), keys.dtype)
            self.values = mx.zeros((B, H, W, values.shape[3]), values.dtype)
        if T == 1:
            slot = self.offset % W
            self.keys[..., slot : slot + 1, :] = keys
            self.values[..., slot : slot + 1, :] = values
            self.offset += 1
            filled = min(self.offset, W)
            return self.keys[..., :filled, :], self.values[..., :filled, :], None

        previous = min(self.offset, W - 1)
        all_k = mx.concatenate([self._ordered(self.keys, previous), keys], axis=2)
        all_v = mx.concatenate([self._ordered(self.values, previous), values], axis=2)
        end = self.offset + T
        kept = min(W, end)
        # The last `kept` positions end - kept .. end - 1 go to slots (position % W).
        if kept == W:
            shift = (end - W) % W
            self.keys = mx.roll(all_k[..., -W:, :], shift, axis=2)
            self.values = mx.roll(all_v[..., -W:, :], shift, axis=2)
        else:  # fewer than W positions so far: they start at position 0 = slot 0
            self.keys[..., :kept, :] = all_k[..., -kept:, :]
            self.values[..., :kept, :] = all_v[..., -kept:, :]
        self.offset = end
        return all_k, all_v, attention_mask(T, previous + T, W)

    @property
    def nbytes(self) -> int:
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes
