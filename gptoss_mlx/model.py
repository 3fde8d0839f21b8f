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
from .cache import DecodeSlot, KVCache, cache_buffers, decode_slots, make_cache, restore_buffers
from .config import ModelConfig
from .distributed import ExpertShard
from .moe import MoE


class TransformerBlock(nn.Module):
    """Pre-norm attention then pre-norm mixture of experts, each added to the residual stream."""

    def __init__(
        self, config: ModelConfig, layer_type: str, shard: ExpertShard | None = None
    ) -> None:
        super().__init__()
        self.input_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = Attention(config, layer_type)
        self.post_attention_layernorm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.mlp = MoE(config, shard)

    def __call__(
        self, x: mx.array, cache: KVCache | DecodeSlot | None = None, last_only: bool = False
    ) -> mx.array:
        """`[B, T, H]` -> `[B, T, H]`, or `[B, 1, H]` for the last position alone with `last_only`
        (keys and values of every position still go to the cache)."""
        h = self.self_attn(self.input_layernorm(x), cache, last_only)
        x = (x[:, -1:] if last_only else x) + h
        return x + self.mlp(self.post_attention_layernorm(x))


class GptOssModel(nn.Module):
    """`model(ids [B, T], cache=None) -> logits [B, T, vocab]`.

    With a `shard` (see `gptoss_mlx.distributed`) this process is one rank of several: its layers
    hold that rank's experts only, and every rank computes the same logits together.
    """

    def __init__(self, config: ModelConfig, shard: ExpertShard | None = None) -> None:
        super().__init__()
        self.config = config
        self.shard = shard
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = [TransformerBlock(config, t, shard) for t in config.layer_types]
        self.norm = nn.RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.kv_bits: int | None = None  # how `make_cache` stores keys and values (None: dtype)
        self.max_context: int | None = None  # most positions a generation may use (None: config)
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
        return self._through_blocks(self.embed_tokens(input_ids), cache, last_only)

    def _through_blocks(
        self,
        x: mx.array,
        cache: list[KVCache] | list[DecodeSlot] | None,
        last_only: bool = False,
    ) -> mx.array:
        """Embedded tokens `[B, T, hidden]` through every block and the final norm."""
        last = len(self.layers) - 1
        for i, layer in enumerate(self.layers):
            x = layer(x, cache[i] if cache is not None else None, last_only and i == last)
        return self.norm(x)

    def _decode_step(self, input_ids: mx.array, cache: list[KVCache]) -> mx.array:
        """One new token per row through the caches, as one compiled graph.

        The caches' buffers and the position go in as arrays (see `DecodeSlot`), so the step has
        the same shapes every token: `mx.compile` traces it once per cache capacity and fuses its
        element-wise work, which cuts the kernels launched per token. An embedding read from disk
        (`disk.DiskEmbedding`, which needs the ids on the host) is looked up before the graph,
        which then takes the rows instead of the ids. A model whose experts are read on the host
        (`Experts.host_reads`: an expert cache) runs the same graph uncompiled, synchronising once
        per layer.
        """
        c = self.config
        for layer_cache in cache:
            layer_cache.reserve(
                input_ids.shape[0], c.num_key_value_heads, c.head_dim, self.dtype, 1
            )
        if self._compiled_decode is None:
            self._compiled_decode = mx.compile(self._decode_graph, inputs=self.state)
        step = self._compiled_decode if self.traceable else self._decode_graph
        tokens = self.embed_tokens(input_ids) if self._embedding_on_host else input_ids
        logits, *buffers = step(tokens, mx.array(cache[0].offset), *cache_buffers(cache))
        restore_buffers(cache, buffers, c)
        return logits

    def _decode_graph(
        self, tokens: mx.array, offset: mx.array, *buffers: mx.array
    ) -> tuple[mx.array, ...]:
        """ids `[B, 1]` (or their embedding rows `[B, 1, hidden]`), the position and the caches'
        arrays -> (logits, the caches' new arrays)."""
        x = tokens if self._embedding_on_host else self.embed_tokens(tokens)
        slots = decode_slots(list(buffers), self.config, offset)
        logits = self.lm_head(self._through_blocks(x, slots))
        return (logits, *[a for slot in slots for a in slot.buffers])

    @property
    def _embedding_on_host(self) -> bool:
        return getattr(self.embed_tokens, "host_reads", False)

    @property
    def traceable(self) -> bool:
        """Whether the decode step may go through `mx.compile`: not when a kernel runs on the host
        (the emulator) nor when the experts are read on the host (an expert cache)."""
        return kernels.compilable(self) and not any(
            layer.mlp.experts.host_reads for layer in self.layers
        )

    def make_cache(self, kv_bits: int | None = None) -> list[KVCache]:
        """One cache per layer: a ring of `sliding_window` slots or a growing buffer, keys and
        values stored at `kv_bits` (8 or 4; 16: unquantized; None: the model's `kv_bits`)."""
        return make_cache(self.config, self.kv_bits if kv_bits is None else kv_bits)

    def expert_cache_stats(self) -> dict[str, int] | None:
        """Hits, misses, bytes read, synchronisations and slot copies of the expert caches, summed
        over layers (None without an expert cache)."""
        stats = [layer.mlp.experts.stats for layer in self.layers if layer.mlp.experts.host_reads]
        if not stats:
            return None
        keys = ("hits", "misses", "bytes_read", "syncs", "copies")
        return {k: sum(getattr(s, k) for s in stats) for k in keys}

    def describe(self) -> str:
        """The precision and placement of weights and cache, e.g. "dense 8-bit, experts MXFP4
        (16/32 resident), embedding from disk, KV 8-bit"."""
        attention = self.layers[0].self_attn.q_proj
        bits = getattr(attention, "bits", None)
        parts = [f"dense {bits}-bit" if bits else f"dense {str(self.dtype).split('.')[-1]}"]
        experts = self.layers[0].mlp.experts
        if experts.host_reads:
            parts.append(f"experts MXFP4 ({experts.num_slots}/{self.config.num_experts} resident)")
        else:
            parts.append("experts MXFP4")
        if not isinstance(self.embed_tokens, (nn.Embedding, nn.QuantizedEmbedding)):
            parts.append("embedding from disk")
        quantized_kv = self.kv_bits not in (None, 16)
        parts.append(f"KV {self.kv_bits}-bit" if quantized_kv else "KV unquantized")
        if self.max_context is not None:
            parts.append(f"context <= {self.max_context}")
        return ", ".join(parts)

    @property
    def group(self) -> mx.distributed.Group | None:
        """The ranks this model is sharded over (None in a single process)."""
        return self.shard.group if self.shard is not None else None

    @property
    def dtype(self) -> mx.Dtype:
        """The compute dtype (that of the normalisation gains)."""
        return self.norm.weight.dtype
