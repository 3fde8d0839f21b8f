"""The sampler against distributions computed in numpy from the filters' definitions."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.errors import GptOssError
from gptoss_mlx.sample import make_sampler, sampling_probs


def reference_probs(logits, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0):
    """float64 numpy, one row at a time, straight from the definitions (documented order:
    top-k, top-p over what top-k kept, min-p, then temperature on the survivors)."""
    out = []
    for row in np.asarray(logits, np.float64):
        if temperature == 0:
            one = np.zeros_like(row)
            one[np.argmax(row)] = 1
            out.append(one)
            continue
        keep = np.ones(row.shape, bool)
        order = np.argsort(-row, kind="stable")
        if top_k > 0:
            keep[:] = False
            keep[order[:top_k]] = True
        p = np.where(keep, np.exp(row - row.max()), 0.0)
        p /= p.sum()
        if top_p < 1:
            mass_above = 0.0
            for i in order:  # most likely first; a token stays while the mass above is < top_p
                if not keep[i]:
                    continue
                if mass_above >= top_p:
                    keep[i] = False
                mass_above += p[i]
        if min_p > 0:
            keep &= p >= min_p * p[keep].max()
        q = np.where(keep, np.exp((row - row[keep].max()) / temperature), 0.0)
        out.append(q / q.sum())
    return np.stack(out)


@pytest.fixture(scope="module")
def logits():
    return np.random.RandomState(0).normal(0, 2.0, (3, 64)).astype(np.float32)


SETTINGS = [
    dict(),
    dict(temperature=0.0),
    dict(temperature=0.5),
    dict(temperature=1.7),
    dict(top_k=1),
    dict(top_k=5),
    dict(top_k=64),
    dict(top_p=0.3),
    dict(top_p=0.9),
    dict(top_p=1e-6),
    dict(min_p=0.05),
    dict(min_p=0.5),
    dict(temperature=0.7, top_k=10, top_p=0.8),
    dict(temperature=1.3, top_p=0.95, min_p=0.02),
    dict(temperature=0.6, top_k=20, top_p=0.9, min_p=0.1),
    dict(temperature=2.0, top_k=3, min_p=0.3),
]


@pytest.mark.parametrize(
    "kw", SETTINGS, ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()) or "default"
)
def test_filtered_distribution_matches_numpy(logits, kw):
    ours = np.array(sampling_probs(mx.array(logits), **kw))
    ref = reference_probs(logits, **kw)
    np.testing.assert_allclose(ours, ref, atol=2e-6)
    np.testing.assert_array_equal(ours > 0, ref > 0)  # exactly the same tokens survive


def test_filters_really_filter(logits):
    # Guard against a vacuous comparison: these settings keep strictly fewer tokens.
    for kw, most in ((dict(top_k=5), 5), (dict(top_p=0.3), 63), (dict(min_p=0.5), 63)):
        kept = (reference_probs(logits, **kw) > 0).sum(axis=1)
        assert (kept <= most).all() and (kept >= 1).all()
        assert (kept < 64).all()


def test_bfloat16_logits_are_filtered_in_float32():
    x = mx.array(np.random.RandomState(2).normal(0, 1, (1, 32)).astype(np.float32)).astype(
        mx.bfloat16
    )
    ours = np.array(sampling_probs(x, temperature=0.8, top_p=0.7))
    ref = reference_probs(np.array(x.astype(mx.float32)), temperature=0.8, top_p=0.7)
    np.testing.assert_allclose(ours, ref, atol=2e-6)


def chi_square(counts, probs):
    n = counts.sum()
    nz = probs > 0
    expected = n * probs[nz]
    return float(((counts[nz] - expected) ** 2 / expected).sum()), int(nz.sum() - 1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(),
        dict(temperature=0.6, top_k=6, top_p=0.9, min_p=0.05),
        dict(temperature=1.5, top_p=0.8),
    ],
)
def test_sampled_frequencies_follow_the_distribution(kw):
    row = np.random.RandomState(5).normal(0, 1.5, 12).astype(np.float32)
    n = 40_000
    sampler = make_sampler(**kw, seed=1234)
    tokens = np.array(sampler(mx.broadcast_to(mx.array(row), (n, row.size))))
    probs = reference_probs(row[None], **kw)[0]
    counts = np.bincount(tokens, minlength=row.size)
    assert counts[probs == 0].sum() == 0  # filtered tokens are never drawn
    stat, dof = chi_square(counts, probs)
    # dof + 4 sqrt(2 dof) + 5 is above chi-square's 99.95th percentile for every dof <= 11.
    assert stat < dof + 4 * np.sqrt(2 * dof) + 5, (stat, dof, counts)
    # ... and the test has power: the same counts reject the distribution without temperature.
    if kw.get("temperature", 1.0) != 1.0:
        wrong = reference_probs(row[None], **{**kw, "temperature": 1.0})[0]
        assert chi_square(counts, wrong)[0] > 10 * (dof + 4 * np.sqrt(2 * dof) + 5)


def test_same_seed_same_tokens_different_seed_different_tokens():
    logits = mx.array(np.random.RandomState(7).normal(0, 1, (4, 100)).astype(np.float32))

    def draw(seed, steps=20):
        s = make_sampler(temperature=1.0, top_p=0.95, seed=seed)
        return np.stack([np.array(s(logits)) for _ in range(steps)])

    a, b, c = draw(11), draw(11), draw(12)
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()
    assert len(np.unique(a)) > 5  # successive calls draw fresh randomness


def test_greedy_is_argmax_and_ignores_the_seed(logits):
    x = mx.array(logits)
    for seed in (0, 1):
        np.testing.assert_array_equal(
            np.array(make_sampler(temperature=0, seed=seed)(x)), logits.argmax(axis=1)
        )


def test_sampler_does_not_touch_global_random_state():
    mx.random.seed(99)
    expected = np.array(mx.random.uniform(shape=(3,)))
    mx.random.seed(99)
    make_sampler(seed=1)(mx.zeros((1, 10)))
    np.testing.assert_array_equal(np.array(mx.random.uniform(shape=(3,))), expected)


@pytest.mark.parametrize(
    "kw",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(top_p=0.0),
        dict(top_p=1.01),
        dict(top_k=-1),
        dict(top_k=2.5),
        dict(min_p=1.0),
        dict(min_p=-0.1),
        dict(temperature="hot"),
    ],
)
def test_out_of_range_parameters_are_rejected(kw):
    with pytest.raises(GptOssError):
        make_sampler(**kw)
    with pytest.raises(GptOssError):
        sampling_probs(mx.zeros((1, 4)), **kw)


@pytest.mark.parametrize("seed", [-1, 2**64, 1.5, "7", True])
def test_bad_seeds_are_rejected(seed):
    with pytest.raises(GptOssError, match="seed"):
        make_sampler(seed=seed)
