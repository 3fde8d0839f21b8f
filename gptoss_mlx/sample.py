"""Turning logits into the next token: greedy, or sampling under temperature, top-k, top-p, min-p.

The filters run on the logits in float32, in llama.cpp's default order (mlx-lm filters before the
temperature as well):

1. **top-k** (``top_k > 0``): keep the ``top_k`` largest logits;
2. **top-p** (``top_p < 1``): over the softmax of what top-k kept, sort by probability and keep the
   smallest prefix whose probability reaches ``top_p`` (a token is kept when the probability of
   the tokens ranked above it is still below ``top_p``; the most likely token is always kept);
3. **min-p** (``min_p > 0``): keep tokens whose probability is at least ``min_p`` times the most
   likely token's (a ratio, so it does not matter whether top-k/top-p renormalized first);
4. **temperature**: divide the surviving logits by ``temperature`` and sample from their softmax.

So the filters decide *which* tokens may be sampled from the untempered distribution, and the
temperature only reshapes the odds among them. ``temperature=0`` is greedy (the argmax, which
every filter keeps). Tokens tied with the last one kept at a threshold are kept too.

Randomness comes from an explicit ``mx.random`` key carried by the sampler and split on each call,
so a seed reproduces the same tokens and sampling never touches MLX's global random state.
"""

from __future__ import annotations

import math
import secrets

import mlx.core as mx

from .errors import GptOssError

__all__ = ["Sampler", "make_sampler", "sampling_probs", "filter_logits", "check_sampling"]


def check_sampling(
    temperature: float = 1.0, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0
) -> None:
    """Raise GptOssError for out-of-range sampling parameters."""

    def bad(name, value, allowed):
        raise GptOssError(f"{name} must be {allowed}, got {value!r}")

    for name, value in (("temperature", temperature), ("top_p", top_p), ("min_p", min_p)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
            bad(name, value, "a number (not NaN)")
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        bad("top_k", top_k, "an integer")
    if not temperature >= 0 or math.isinf(temperature):
        bad("temperature", temperature, ">= 0 (0 is greedy)")
    if not 0 < top_p <= 1:
        bad("top_p", top_p, "in (0, 1] (1 disables it)")
    if top_k < 0:
        bad("top_k", top_k, ">= 0 (0 disables it)")
    if not 0 <= min_p < 1:
        bad("min_p", min_p, "in [0, 1) (0 disables it)")


def filter_logits(
    logits: mx.array, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0
) -> mx.array:
    """Float32 logits `[..., V]` with the tokens top-k, then top-p, then min-p drop set to -inf."""
    x = logits.astype(mx.float32)
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = mx.min(mx.topk(x, top_k, axis=-1), axis=-1, keepdims=True)
        x = mx.where(x >= kth, x, -mx.inf)
    if top_p < 1.0:
        probs = mx.softmax(x, axis=-1)
        ranked = -mx.sort(-probs, axis=-1)  # descending
        before = mx.cumsum(ranked, axis=-1, inclusive=False)  # mass ranked above each token
        # The smallest probability still kept; everything at least that likely stays.
        threshold = mx.min(mx.where(before < top_p, ranked, mx.inf), axis=-1, keepdims=True)
        x = mx.where(probs >= threshold, x, -mx.inf)
    if min_p > 0.0:
        floor = mx.max(x, axis=-1, keepdims=True) + math.log(min_p)
        x = mx.where(x >= floor, x, -mx.inf)
    return x


def sampling_probs(
    logits: mx.array,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
) -> mx.array:
    """The distribution `[..., V]` (float32) the sampler draws from for these parameters.

    ``temperature=0`` gives a one-hot on the argmax (the first one on ties, as ``mx.argmax``).
    """
    check_sampling(temperature, top_p, top_k, min_p)
    if temperature == 0:
        best = mx.argmax(logits, axis=-1, keepdims=True)
        return (mx.arange(logits.shape[-1]) == best).astype(mx.float32)
    return mx.softmax(filter_logits(logits, top_k, top_p, min_p) / temperature, axis=-1)


class Sampler:
    """`sampler(logits [B, V]) -> token ids [B]` (uint32), lazily: nothing is evaluated here.

    Carries its own random key (from ``seed``, or a random seed when None) and splits it on
    every call, so the same seed and the same logits give the same tokens.
    """

    def __init__(
        self,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        seed: int | None = None,
    ):
        check_sampling(temperature, top_p, top_k, min_p)
        self.temperature, self.top_p, self.top_k, self.min_p = temperature, top_p, top_k, min_p
        if seed is not None and (
            isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64
        ):
            raise GptOssError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self.seed = secrets.randbits(63) if seed is None else seed
        self._key = mx.random.key(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def __call__(self, logits: mx.array) -> mx.array:
        if self.greedy:
            return mx.argmax(logits, axis=-1)
        self._key, key = mx.random.split(self._key)
        x = filter_logits(logits, self.top_k, self.top_p, self.min_p)
        if self.temperature != 1.0:
            x = x / self.temperature
        return mx.random.categorical(x, axis=-1, key=key)

    def probs(self, logits: mx.array) -> mx.array:
        """The distribution this sampler draws from (see :func:`sampling_probs`)."""
        return sampling_probs(logits, self.temperature, self.top_p, self.top_k, self.min_p)

    def __repr__(self) -> str:
        return (
            f"Sampler(temperature={self.temperature}, top_p={self.top_p}, top_k={self.top_k}, "
            f"min_p={self.min_p}, seed={self.seed})"
        )


def make_sampler(
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    min_p: float = 0.0,
    seed: int | None = None,
) -> Sampler:
    """A :class:`Sampler`; GptOssError when a parameter is out of range."""
    return Sampler(temperature, top_p, top_k, min_p, seed)
