"""A model that emits a given completion: harmony output without a trained model.

Tests of generation, the CLI, chat, the server and tools need the model to say exact things (an
analysis message, a tool call with given arguments, a final answer); a random model cannot. The
scripted model ignores its input: the logits of its n-th forward call pick `script[n]` at any
temperature (the last entry once the script runs out), so a prompt's prefill (one call) yields
`script[0]` and each decode step the next token. It counts its calls, so tests can check the
pipelined decode loop queues no step it does not need.
"""

from __future__ import annotations

import mlx.core as mx

VOCAB = 201088  # gpt-oss's vocabulary: the o200k_harmony tokenizer's ids all fit


class ScriptedCache:
    """The one cache entry the scripted model needs: how many positions went through it."""

    def __init__(self):
        self.offset = 0


class ScriptedModel:
    """`model(ids [1, T], cache) -> logits [1, T, VOCAB]` whose argmax follows the script."""

    class config:
        vocab_size = VOCAB

    def __init__(self, script):
        self.script = list(script)
        self.calls = 0

    @classmethod
    def from_harmony(cls, text: str, tokenizer) -> ScriptedModel:
        """A model that emits `text` (harmony, special tokens written out) token by token."""
        return cls(tokenizer.encode(text, allow_special=True))

    def make_cache(self) -> list:
        return [ScriptedCache()]

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        self.calls += 1
        if self.calls > 1:
            assert ids.shape == (1, 1)
        cache[0].offset += ids.shape[1]
        nxt = self.script[min(self.calls - 1, len(self.script) - 1)]
        row = mx.where(mx.arange(VOCAB) == nxt, 100.0, 0.0)  # exp(-100) x VOCAB: never sampled
        return mx.broadcast_to(row, (1, ids.shape[1], VOCAB))
