"""Cache operations a prompt cache relies on, each checked against a full forward pass of the
same tokens: trimming a ring that has not wrapped, ring snapshots restored after the ring moved
on, and independent copies."""

from __future__ import annotations

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import load_model
from gptoss_mlx.cache import SlidingCache

WINDOW = ck.TINY.sliding_window  # 8


@pytest.fixture(scope="module")
def model(hf_mxfp4_dir):
    return load_model(hf_mxfp4_dir, dtype="float32")


def ids(n, seed):
    return np.random.RandomState(seed).randint(0, ck.TINY.vocab_size, n).tolist()


def logits(model, tokens, cache=None):
    return np.array(model(mx.array([tokens]), cache=cache)[0])


def continue_one_by_one(model, cache, tokens):
    return np.stack([logits(model, [t], cache)[-1] for t in tokens])


def close(a, b):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("held, back", [(7, 4), (8, 8), (5, 1)])
def test_a_ring_that_has_not_wrapped_trims_any_number(model, held, back):
    tokens, other = ids(held, 1), ids(back + 6, 2)
    cache = model.make_cache()
    logits(model, tokens, cache)
    assert all(c.can_trim(back) for c in cache) and all(c.trim(back) for c in cache)
    kept = tokens[: held - back]
    close(continue_one_by_one(model, cache, other), logits(model, kept + other)[len(kept) :])


def test_a_wrapped_ring_trims_one_at_most(model):
    cache = model.make_cache()
    logits(model, ids(WINDOW + 1, 3), cache)
    ring = next(c for c in cache if isinstance(c, SlidingCache))
    assert ring.can_trim(1) and not ring.can_trim(2)


@pytest.mark.parametrize("at, moved_on", [(5, 14), (11, 9), (11, 1)])
def test_a_ring_snapshot_restores_the_past_after_the_ring_wrapped(model, at, moved_on):
    """Snapshot at `at`, run `moved_on` more tokens (wrapping the ring), restore the rings and
    trim the full layers back to `at`: continuing gives the logits of a fresh forward pass."""
    tokens, other = ids(at + moved_on, 4), ids(12, 5)
    cache = model.make_cache()
    logits(model, tokens[:at], cache)
    snapshots = {i: c.snapshot() for i, c in enumerate(cache) if isinstance(c, SlidingCache)}
    for t in tokens[at:]:  # decode steps (the compiled, functional update)
        logits(model, [t], cache)
    logits(model, ids(3, 6), cache)  # and a chunk (the ring written in place)
    for i, c in enumerate(cache):
        if i in snapshots:
            c.restore(snapshots[i])
        else:
            assert c.trim(c.offset - at)
    assert all(c.offset == at for c in cache)
    want = logits(model, tokens[:at] + other)[at:]
    close(logits(model, other[:5], cache), want[:5])  # a chunk, then decode steps
    close(continue_one_by_one(model, cache, other[5:]), want[5:])
    assert sum(s.nbytes for s in snapshots.values()) == sum(
        c.nbytes for c in cache if isinstance(c, SlidingCache)
    )


def test_a_copy_and_its_original_go_separate_ways(model):
    """The original rewrites positions the copy holds (trim, then other tokens): the copy still
    continues as a fresh forward pass of its own tokens, and so does the original."""
    tokens, a, b = ids(11, 7), ids(6, 8), ids(6, 9)
    original = model.make_cache()
    logits(model, tokens, original)
    copied = [c.copy() for c in original]
    assert all(c.trim(1) for c in original)
    close(logits(model, a, original), logits(model, tokens[:-1] + a)[len(tokens) - 1 :])
    close(continue_one_by_one(model, copied, b), logits(model, tokens + b)[len(tokens) :])
    assert {c.offset for c in original} == {len(tokens) + 5}
    assert {c.offset for c in copied} == {len(tokens) + 6}


def test_a_full_layer_grows_past_positions_it_trimmed(model):
    """A trimmed full-layer buffer holds more slots than positions: growing it must keep them all
    (it used to keep only `offset` slots, and the next chunk did not fit)."""
    tokens, more, other = ids(300, 10), ids(200, 11), ids(300, 12)
    cache = model.make_cache()
    logits(model, tokens, cache)
    snapshots = {i: c.snapshot() for i, c in enumerate(cache) if isinstance(c, SlidingCache)}
    logits(model, more, cache)  # 500 positions in 512 slots
    for i, c in enumerate(cache):
        if i in snapshots:
            c.restore(snapshots[i])
        else:
            assert c.trim(len(more))
    close(logits(model, other, cache)[-5:], logits(model, tokens + other)[-5:])
