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


class SteeredModel:
    """A real model whose n-th forward call (call 0 is the prefill, so it picks token 0) adds a
    large bias to a chosen token: it writes the harmony structure a trained model would (a
    header, the end of its reasoning) and the random model's own tokens everywhere else.

    ``steer`` maps decode steps to token ids. A steered token that a constraint masks out stays
    masked (the bias only raises its logit), so a constraint still decides.
    """

    def __init__(self, model, steer: dict[int, int], bias: float = 100.0):
        self.model, self.steer, self.bias = model, dict(steer), bias
        self.config = model.config
        self.calls = 0

    @classmethod
    def writing(cls, model, tokenizer, *pieces: tuple[int, str]) -> SteeredModel:
        """Steered to write each harmony text from its step on, e.g. `(0, "<|channel|>analysis
        <|message|>"), (12, "<|end|>")`: a header, then free tokens, then the end of the message."""
        return cls(model, {}).write(tokenizer, *pieces)

    def write(self, tokenizer, *pieces: tuple[int, str]) -> SteeredModel:
        """Steer anew, steps counted from the next call (a chat's next turn)."""
        self.steer = {}
        for at, text in pieces:
            for i, t in enumerate(tokenizer.encode(text, allow_special=True)):
                self.steer[self.calls + at + i] = t
        return self

    def make_cache(self) -> list:
        return self.model.make_cache()

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        return self._steered(self.model(ids, cache=cache))

    def last_logits(self, ids: mx.array, cache: list) -> mx.array:
        """The prefill's logits of the last position only, as the real model computes them."""
        return self._steered(self.model.last_logits(ids, cache))

    def _steered(self, logits: mx.array) -> mx.array:
        token = self.steer.get(self.calls)
        self.calls += 1
        if token is None:
            return logits
        bump = mx.where(mx.arange(logits.shape[-1]) == token, self.bias, 0.0)
        return logits + bump.astype(logits.dtype)
