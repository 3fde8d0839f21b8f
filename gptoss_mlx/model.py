"""The gpt-oss transformer.

    x = embed(ids)
    for each block:   x = x + attn(norm1(x))      (sliding-window on even layers, full on odd)
                      x = x + moe(norm2(x))
    logits = unembed(norm(x))                       (unembedding separate from embedding, no bias)

RMSNorm uses eps 1e-5 and a learned gain. Parameter names follow Hugging Face's layout without its
`model.` prefix, so checkpoints map onto this tree by renaming only.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels
from .attention import Attention
from .cache import DecodeSlot, FullCache, KVCache, SlidingCache
from .config import SLIDING, ModelConfig
from .moe import MoE


class TransformerBlock(nn.Module):
    """Pre-norm attention then pre-norm mixture of experts, each added to the residual stream."""

    def __init__(self, config: ModelConfig, layer_type: str) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoE(config)

    def __call__(
        self, x: mx.array, cache: KVCache | DecodeSlot | None = None, last_only: bool = False
    ) -> mx.array:
        """`[B, T, H]` -> `[B, T, H]`, or `[B, 1, H]` for the last position alone with `last_only`
        (keys and values of every position still go to the cache)."""
        h = self.self_attn(self.input_layernorm(x), cache, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssModel(nn.Module):
    """`model(ids [B, T], cache=None) -> logits [B, T, vocab]`."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [TransformerBlock(config, t) for t in config.layer_types]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._compiled_decode = None

    def __call__(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        if cache is not None and input_ids.shape[1] == 1:
            return self._decode_step(input_ids, cache)
        return self.lm_head(self.hidden_states(input_ids, cache))

    def last_logits(self, input_ids: mx.array, cache: list[KVCache] | None = None) -> mx.array:
        """Logits `[B, vocab]` of the last position only, for prefill: the last block computes its
        queries, attention output and experts for that one position (earlier positions there only
        feed the cache), and the unembedding runs once."""
        return self.lm_head(self.hidden_states(input_ids, cache, last_only=True))[:, -1, :]

    def hidden_states(
        self,
        input_ids: mx.array,
        cache: list[KVCache] | list[DecodeSlot] | None = None,
        last_only: bool = False,
    ) -> mx.array:
        """Final-normed hidden states `[B, T, hidden]` (`[B, 1, hidden]` with `last_only`)."""
        x = self.embed_tokens(input_ids)
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None, last_only and i == last)
        return self.norm(x)

    def _decode_step(self, input_ids: mx.array, cache: list[KVCache]) -> mx.array:
        """One new token per row through the caches, as one compiled graph.

        The caches' buffers and the position go in as arrays (see `DecodeSlot`), so the step has
        the same shapes every token: `mx.compile` traces it once per cache capacity and fuses its
        element-wise work, which cuts the kernels launched per token.
        """
        c = self.config
        for layer_cache in cache:
            layer_cache.reserve(
                input_ids.shape[0], c.num_key_value_heads, c.head_dim, self.dtype, 1
            )
        if self._compiled_decode is None:
            self._compiled_decode = mx.compile(self._decode_graph, inputs=self.state)
        # The emulated kernels run on the host and cannot be traced: no compile with them.
        step = self._compiled_decode if kernels.compilable(self) else self._decode_graph
        buffers = [b for layer_cache in cache for b in (layer_cache.keys, layer_cache.values)]
        logits, *buffers = step(input_ids, mx.array(cache[0].offset), *buffers)
        for i, layer_cache in enumerate(cache):
            layer_cache.keys, layer_cache.values = buffers[2 * i], buffers[2 * i + 1]
            layer_cache.offset += 1
        return logits

    def _decode_graph(
        self, input_ids: mx.array, offset: mx.array, *buffers: mx.array
    ) -> tuple[mx.array, ...]:
        slots = [
            DecodeSlot(
                buffers[2 * i],
                buffers[2 * i + 1],
                offset,
                self.config.sliding_window if t == SLIDING else None,
            )
            for i, t in enumerate(self.config.layer_types)
        ]
        logits = self.lm_head(self.hidden_states(input_ids, slots))
        return (logits, *[b for slot in slots for b in (slot.keys, slot.values)])

    def make_cache(self) -> list[KVCache]:
        """One cache per layer: a ring of `sliding_window` slots or a growing buffer."""
        return [
            SlidingCache(self.config.sliding_window) if t == SLIDING else FullCache()
            for t in self.config.layer_types
        ]

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the normalisation gains)."""
        return self.norm.weight.dtype
