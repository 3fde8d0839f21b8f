"""The expert cache against the fully resident model: identical logits and greedy tokens in
prefill (small and large chunks) and decode, through generation and chat; what it counts; which
experts it keeps."""

from __future__ import annotations

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import ChatSession, GptOssError, load, load_model, stream_generate
from gptoss_mlx.convert import convert
from gptoss_mlx.expert_cache import ExpertCache

SLOTS = (4, 8, 16)


@pytest.fixture(scope="module")
def resident(experts32_dir):
    return load_model(experts32_dir, "float32")


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(8).randint(0, ck.EXPERTS32.vocab_size, 40).tolist()


def prefill_then_decode(model, ids, chunks=(0, 3, 20, 30), steps=10):
    """Logits of chunked prefill (chunks of 3, 17 and 10 tokens: below and above the sorting
    threshold) and of `steps` decoded tokens, concatenated `[T, vocab]`."""
    cache = model.make_cache()
    out = []
    for a, b in zip(chunks, chunks[1:], strict=False):
        out.append(np.array(model(mx.array([ids[a:b]]), cache=cache)[0]))
    for t in range(chunks[-1], chunks[-1] + steps):
        out.append(np.array(model(mx.array([ids[t : t + 1]]), cache=cache)[0]))
    return np.concatenate(out)


@pytest.mark.parametrize("slots", SLOTS)
def test_logits_are_the_resident_models_bit_for_bit(experts32_dir, resident, ids, slots):
    cached = load_model(experts32_dir, "float32", expert_cache=slots)
    assert all(isinstance(layer.mlp.experts, ExpertCache) for layer in cached.layers)
    assert cached.layers[0].mlp.experts.gate_up_proj.weight.shape[0] == slots
    np.testing.assert_array_equal(
        prefill_then_decode(cached, ids), prefill_then_decode(resident, ids)
    )
    stats = cached.expert_cache_stats()
    assert stats["misses"] > 0 and stats["hits"] > 0


@pytest.mark.parametrize("slots", SLOTS)
def test_greedy_generation_is_token_identical(experts32_dir, resident, ids, slots):
    def tokens(model, chunk):
        events = list(
            stream_generate(
                model, ids, max_tokens=12, temperature=0.0, stop_tokens=(), prefill_chunk=chunk
            )
        )
        return [e.token for e in events], events[-1].stats

    want, _ = tokens(resident, 16)
    cached = load_model(experts32_dir, "float32", expert_cache=slots)
    for chunk in (16, 5):  # 16 tokens x 4 experts sort by expert; 5 x 4 run as decode does
        got, stats = tokens(cached, chunk)
        assert got == want
    decode = stats.expert_cache["decode"]
    layers = ck.EXPERTS32.num_hidden_layers
    # One wait per layer and decoded token (11 fed): for the router; the slots fill lazily.
    assert decode["syncs"] == 11 * layers and decode["copies"] == 0
    assert decode["hits"] + decode["misses"] <= 11 * layers * 4
    assert "expert cache: decode" in stats.summary()


def test_counts_and_least_recently_used_eviction(experts32_dir):
    """Driven directly: which experts are resident, what is read, what is evicted."""
    model = load_model(experts32_dir, "float32", expert_cache=4)
    cache = model.layers[0].mlp.experts
    x = mx.random.normal((1, ck.EXPERTS32.hidden_size), key=mx.random.key(0))
    w = mx.full((1, 4), 0.25)

    def route(*experts):
        cache(x, mx.array([list(experts)], dtype=mx.uint32), w)

    route(0, 1, 2, 3)
    assert cache.resident == [0, 1, 2, 3] and (cache.stats.hits, cache.stats.misses) == (0, 4)
    assert cache.stats.bytes_read == 4 * cache.expert_bytes  # weights, scales, biases as stored
    route(1, 2, 3, 0)
    assert (cache.stats.hits, cache.stats.misses) == (4, 4)
    route(0, 1, 2, 9)  # 3 was used longest ago
    assert cache.resident == [0, 1, 2, 9]
    route(4, 5, 6, 7)  # all four slots reused
    assert cache.resident == [4, 5, 6, 7] and cache.stats.misses == 9

    cache = load_model(experts32_dir, "float32", expert_cache=8).layers[0].mlp.experts
    route(0, 1, 2, 3), route(4, 5, 6, 7), route(3, 2, 1, 0)  # 4..7 now used longest ago
    route(8, 9, 10, 11)
    assert cache.resident == [0, 1, 2, 3, 8, 9, 10, 11]


@pytest.mark.parametrize("tokens", [32, 8])  # 128 token-expert pairs sort by expert; 32 do not
def test_a_chunk_needing_every_expert_reads_each_once(experts32_dir, resident, tokens):
    """All 32 experts through 4 slots, in groups: each read once, the output the resident one."""
    model = load_model(experts32_dir, "float32", expert_cache=4)
    cache = model.layers[0].mlp.experts
    order = np.random.RandomState(0).permutation(32)
    experts = np.stack([np.roll(order, -4 * t)[:4] for t in range(tokens)]).astype(np.uint32)
    x = mx.random.normal((tokens, ck.EXPERTS32.hidden_size), key=mx.random.key(1))
    w = mx.softmax(mx.random.normal((tokens, 4), key=mx.random.key(2)), axis=-1)
    got = cache(x, mx.array(experts), w)
    want = resident.layers[0].mlp.experts(x, mx.array(experts), w)
    np.testing.assert_array_equal(np.array(got), np.array(want))
    assert cache.stats.misses == 32 and cache.stats.hits == 0
    assert cache.stats.bytes_read == 32 * cache.expert_bytes


@pytest.mark.parametrize("writer", [ck.write_original, ck.write_mlx_community])
def test_other_layouts_stream_their_experts(tmp_path, resident, ids, writer):
    tensors = ck.make_hf_tensors(ck.EXPERTS32, seed=4)
    folder = writer(tmp_path / "ckpt", ck.EXPERTS32, tensors)
    cached = load_model(folder, "float32", expert_cache=8)
    reference = load_model(folder, "float32")
    np.testing.assert_array_equal(
        prefill_then_decode(cached, ids, steps=3), prefill_then_decode(reference, ids, steps=3)
    )


def test_a_converted_folder_streams_and_bf16_experts_are_refused(tmp_path, experts32_dir, ids):
    converted = convert(experts32_dir, str(tmp_path / "mlx"))
    cached = load_model(converted, "float32", expert_cache=8)
    np.testing.assert_array_equal(
        prefill_then_decode(cached, ids, steps=2),
        prefill_then_decode(load_model(converted, "float32"), ids, steps=2),
    )
    bf16 = ck.write_hf_bf16(tmp_path / "bf16", ck.EXPERTS32, ck.make_hf_tensors(ck.EXPERTS32))
    with pytest.raises(GptOssError, match="convert it first"):
        load_model(bf16, "float32", expert_cache=8)


@pytest.mark.parametrize("slots", [3, "many", True])
def test_bad_sizes_are_refused(experts32_dir, slots):
    with pytest.raises(GptOssError, match="expert-cache"):
        load_model(experts32_dir, "float32", expert_cache=slots)


def test_a_cache_as_large_as_the_experts_is_no_cache(experts32_dir):
    model = load_model(experts32_dir, "float32", expert_cache=32)
    assert not model.layers[0].mlp.experts.host_reads and model.traceable


def chat_replies(model, tok) -> list[list[int]]:
    """Greedy token ids of two turns of a chat."""
    chat = ChatSession(model, tok, temperature=0.0, max_tokens=8, reasoning_effort="low")
    out = []
    for text in ("Hi there", "And again?"):
        out.append([e.token for e in chat.send(text) if hasattr(e, "token")])
    return out


@pytest.fixture(scope="module")
def resident_chat(o200k_experts_dir, tok):
    return chat_replies(load(o200k_experts_dir)[0], tok)


@pytest.mark.parametrize("slots", SLOTS)
def test_chat_is_token_identical(o200k_experts_dir, tok, resident_chat, slots):
    """Two turns (the second prefilled on top of the first's cache), each prompt needing more
    experts than 4 or 8 slots hold."""
    assert all(resident_chat)
    cached, _ = load(o200k_experts_dir, expert_cache=slots)
    assert chat_replies(cached, tok) == resident_chat
    assert cached.expert_cache_stats()["misses"] > 0
