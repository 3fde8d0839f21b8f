"""A model that emits given completions: harmony output without a trained model.

Tests of generation, the CLI, chat, the server and tools need the model to say exact things (an
analysis message, a tool call with given arguments, a final answer); a random model cannot. The
scripted model ignores what its input says: the logits of each forward call pick the next token
of the current script (at any temperature; the last entry once a script runs out). It follows
one script per generation, for tool loops that generate several times on one cache: the first
call, and every call of more than one token that follows a decode step (a new prefill), starts
the next script; a prefill's first token is its script's first. It counts its calls and records
every id fed through it, so tests can check what the model saw and that the pipelined decode loop
queues no step it does not need.
"""

from __future__ import annotations

import mlx.core as mx

VOCAB = 201088  # gpt-oss's vocabulary: the o200k_harmony tokenizer's ids all fit


class ScriptedCache:
    """The one cache entry the scripted model needs: how many positions went through it."""

    def __init__(self):
        self.offset = 0

    def can_trim(self, n: int) -> bool:
        return n <= self.offset

    def trim(self, n: int) -> bool:
        self.offset -= n
        return True


class ScriptedModel:
    """`model(ids [1, T], cache) -> logits [1, T, VOCAB]` whose argmax follows the scripts."""

    class config:
        vocab_size = VOCAB

    def __init__(self, *scripts):
        self.scripts = [list(s) for s in scripts]
        self.calls = 0
        self.script = -1  # index of the script being emitted
        self.pos = 0  # next token of that script
        self.fed: list[int] = []  # every id run through the model, in order
        self.prefills: list[list[int]] = []  # the ids of each generation's prefill call(s)
        self.contexts: list[list[int]] = []  # all ids fed when each generation's prefill ends
        self._last_width = 0

    @classmethod
    def from_harmony(cls, texts: str | list[str], tokenizer) -> ScriptedModel:
        """A model that emits `texts` (harmony, special tokens written out) token by token: one
        text, or a list whose n-th text is the n-th generation's."""
        texts = [texts] if isinstance(texts, str) else texts
        return cls(*(tokenizer.encode(t, allow_special=True) for t in texts))

    def make_cache(self) -> list:
        return [ScriptedCache()]

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        self.calls += 1
        width = ids.shape[1]
        if self.calls == 1 or (width > 1 and self._last_width == 1):
            self.script = min(self.script + 1, len(self.scripts) - 1)
            self.prefills.append([])
            self.contexts.append([])
        self.fed += ids.reshape(-1).tolist()
        if width > 1 or self.calls == 1:
            self.prefills[-1] += ids.reshape(-1).tolist()
            self.contexts[-1] = list(self.fed)
            self.pos = 0
        self._last_width = width
        cache[0].offset += width
        script = self.scripts[self.script]
        nxt = script[min(self.pos, len(script) - 1)]
        self.pos += 1
        row = mx.where(mx.arange(VOCAB) == nxt, 100.0, 0.0)  # exp(-100) x VOCAB: never sampled
        return mx.broadcast_to(row, (1, width, VOCAB))


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


FREE = None  # a script position where the model chooses


class ForcedModel:
    """A real model (its cache, its logits) whose generations follow scripts.

    Generation ``g`` (a prefill, then decode steps) emits ``scripts[g]``, where a :data:`FREE`
    position is the model's own choice among ordinary tokens (special tokens 100 below, so it
    does not end or restructure the harmony text); after the last script every position is free.
    Unlike :class:`SteeredModel` (steered by call count) it finds each generation's start from
    its calls (a prefill through ``last_logits`` after decode steps), however a prompt cache
    splits the prefill.
    A real cache means real prompt-cache reuse, and free positions make the output depend on
    what the cache holds. ``prompts`` records, per generation, the ids its prefill fed.
    """

    def __init__(self, model, scripts=()):
        self.model, self.config = model, model.config
        self.scripts = [list(s) for s in scripts]
        self.generation = -1
        self.position = 0
        self._decoding = True  # the next prefill call begins a new generation
        self.prompts: list[list[int]] = []
        self.ordinary = mx.arange(model.config.vocab_size) < 199998  # o200k_base's ids
        mx.eval(self.ordinary, model)  # MLX streams are per thread: nothing lazy for a worker

    @staticmethod
    def script(text: str, tokenizer) -> list:
        """Harmony text with ``{free:N}`` for N free positions -> a script."""
        out = []
        for i, piece in enumerate(text.replace("{free:", "\0").split("\0")):
            if i:
                count, _, piece = piece.partition("}")
                out += [FREE] * int(count)
            out += tokenizer.encode(piece, allow_special=True)
        return out

    def make_cache(self) -> list:
        return self.model.make_cache()

    def _logits(self, logits: mx.array) -> mx.array:
        script = self.scripts[self.generation] if self.generation < len(self.scripts) else []
        forced = script[self.position] if self.position < len(script) else FREE
        if forced is FREE:  # special tokens pushed far down, not out: a constraint may want one
            return mx.where(self.ordinary, logits, logits - 100.0)
        row = mx.where(mx.arange(logits.shape[-1]) == forced, 100.0, 0.0).astype(logits.dtype)
        return mx.broadcast_to(row, logits.shape)

    def last_logits(self, ids: mx.array, cache: list | None = None) -> mx.array:
        if self._decoding:  # a prefill after decode steps: the next generation
            self.generation += 1
            self.prompts.append([])
            self._decoding = False
        self.prompts[-1] += ids.reshape(-1).tolist()
        self.position = 0
        return self._logits(self.model.last_logits(ids, cache))

    def __call__(self, ids: mx.array, cache: list | None = None) -> mx.array:
        assert ids.shape == (1, 1), "a forced model's prefill goes through last_logits"
        self._decoding = True
        self.position += 1
        return self._logits(self.model(ids, cache=cache))
