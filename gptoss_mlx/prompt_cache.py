"""A prompt cache: the KV caches of recent conversations, so a request prefills only what it does
not share with one of them.

Each entry is a cache and the tokens it holds. A new prompt reuses the entry sharing its longest
token prefix, restored to the furthest position it can go back to at or before where the two
part (at most ``len(prompt) - 1``: one token must run to give the next token's logits), and only
the rest is prefilled. What "can go back to" means, for an entry holding ``n`` tokens:

* full-attention layers keep every position: any ``p <= n`` (``trim``);
* a sliding layer's ring keeps only the last ``window`` positions. Going back one position is
  always possible (see ``SlidingCache.can_trim``), and going back any number while ``n <=
  window`` (nothing overwritten yet). Further back it needs a **ring snapshot** taken when the
  ring was at ``p``: the cache keeps one (each a few MB) at every message start (each
  ``boundary_token``, ``<|start|>``) of the tokens it prefilled, and at the end of each prompt
  (where the completion began).

So the positions an entry restores exactly are ``n``, ``n - 1``, every position when ``n <=
window``, and its snapshot positions (message starts and prompt ends). That covers the ways a
conversation's next prompt departs from what the cache holds: a chat's answer ends ``<|return|>``
in the cache and ``<|end|>`` in history (one position), harmony drops the reasoning of earlier
turns once a final answer exists (the departure is at the end of the prompt that produced it),
and a client that edits or removes messages departs at a message start. Not covered: a client
changing the text *inside* a message the model wrote; that restores the nearest snapshot before it.

An entry is taken out of the store when the new prompt continues it (it loses at most one
position), and forked (its caches copied, nothing copied until written) when the prompt departs
earlier, so the conversation it held is still there for its own next request. Entries and their
snapshots are bounded by ``max_bytes``, least recently used first out.

Not thread-safe: one thread (the server's worker) owns the model and this cache.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from .cache import RingSnapshot
from .generate import GenerationEvent, LanguageModel, stream_generate
from .harmony import common_prefix_length

__all__ = ["PromptCache"]


@dataclass
class _Entry:
    tokens: list[int]  # what every layer of `cache` holds, in order
    cache: list
    snapshots: dict[int, dict[int, RingSnapshot]] = field(default_factory=dict)  # position ->
    # {layer index: ring at that position}, for the sliding layers

    @property
    def nbytes(self) -> int:
        rings = sum(s.nbytes for layers in self.snapshots.values() for s in layers.values())
        return sum(getattr(c, "nbytes", 0) for c in self.cache) + rings

    def reach(self, limit: int) -> int:
        """The furthest position <= limit this entry can be restored to exactly."""
        n = len(self.tokens)
        if limit <= n and all(c.can_trim(n - limit) for c in self.cache):
            return limit
        return max((p for p in self.snapshots if p <= limit), default=0)

    def restore(self, p: int) -> None:
        """Bring every layer back to holding `tokens[:p]` (a position `reach` allowed)."""
        n = len(self.tokens)
        rings = {} if all(c.can_trim(n - p) for c in self.cache) else self.snapshots[p]
        for i, c in enumerate(self.cache):
            if i in rings:
                c.restore(rings[i])
            else:
                c.trim(n - p)
        self.tokens = self.tokens[:p]
        self.snapshots = {q: s for q, s in self.snapshots.items() if q <= p}

    def fork(self) -> _Entry:
        return _Entry(list(self.tokens), [c.copy() for c in self.cache], dict(self.snapshots))


class PromptCache:
    """Caches of recent conversations for ``model``, at most ``max_bytes`` in all (0: none kept,
    every request prefills its whole prompt).

    :meth:`stream_generate` is :func:`gptoss_mlx.stream_generate` over token ids through this
    cache; its last event's ``stats.prompt_tokens`` is the number of tokens it prefilled, so
    ``len(prompt) - stats.prompt_tokens`` came from the cache.
    """

    def __init__(
        self, model: LanguageModel, max_bytes: int, *, boundary_token: int | None = None
    ) -> None:
        self.model = model
        self.max_bytes = max_bytes
        self.boundary_token = boundary_token
        self._entries: list[_Entry] = []  # least recently used first

    @property
    def nbytes(self) -> int:
        """Bytes the kept caches and snapshots take."""
        return sum(e.nbytes for e in self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def clear(self) -> None:
        self._entries.clear()

    def stream_generate(self, prompt: Sequence[int], **options: Any) -> Iterator[GenerationEvent]:
        """Generate from ``prompt`` (token ids), reusing the longest cached prefix; ``options``
        are :func:`gptoss_mlx.stream_generate`'s. The cache is kept once the events are
        exhausted, or the iterator closed early."""
        prompt = list(prompt)
        if self.max_bytes <= 0:
            return stream_generate(self.model, prompt, **options)
        entry = self._take(prompt)
        return self._generate(entry, prompt, options)

    def _take(self, prompt: list[int]) -> _Entry:
        """An entry restored to the longest prefix of `prompt` it can give (possibly none)."""
        limit = len(prompt) - 1
        best, reach = None, 0
        for entry in self._entries:
            p = entry.reach(min(common_prefix_length(entry.tokens, prompt), limit))
            if p > reach or (p == reach and best is not None and p > 0):
                best, reach = entry, p  # ties: the most recently used (later in the list)
        if best is None or reach == 0:
            return _Entry([], self.model.make_cache())
        if reach >= len(best.tokens) - 1:  # the prompt continues it: take it out
            self._entries.remove(best)
        else:  # it departs earlier: leave the entry for its own conversation
            best = best.fork()
        best.restore(reach)
        return best

    def _generate(
        self, entry: _Entry, prompt: list[int], options: dict
    ) -> Iterator[GenerationEvent]:
        start = len(entry.tokens)
        new = prompt[start:]
        pauses = [i for i, t in enumerate(new) if i > 0 and t == self.boundary_token]
        pauses.append(len(new))  # the end of the prompt: where the completion begins

        def snapshot(p: int) -> None:
            entry.snapshots[start + p] = {
                i: c.snapshot() for i, c in enumerate(entry.cache) if hasattr(c, "snapshot")
            }

        completion = []
        try:
            for event in stream_generate(
                self.model,
                new,
                cache=entry.cache,
                prefill_pauses=pauses,
                on_pause=snapshot,
                **options,
            ):
                completion.append(event.token)
                yield event
        finally:
            self._keep(entry, prompt + completion)

    def _keep(self, entry: _Entry, known: list[int]) -> None:
        """Store `entry` holding the first `offset` of the tokens known to have been fed."""
        offsets = {getattr(c, "offset", None) for c in entry.cache}
        if len(offsets) != 1 or None in offsets or next(iter(offsets)) > len(known):
            return  # interrupted inside a step: its state is unknown, drop it
        held = offsets.pop()
        entry.tokens = known[:held]
        entry.snapshots = {p: s for p, s in entry.snapshots.items() if p <= held}
        self._entries.append(entry)
        while self._entries and self.nbytes > self.max_bytes:
            self._entries.pop(0)
