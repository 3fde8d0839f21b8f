"""Keys and values cached at 8 or 4 bits: attention with sinks over them against a numpy reference
(a sink that takes most of the mass included), the model against a float cache past the sliding
window, the bytes saved, chat."""

from __future__ import annotations

import checkpoints as ck
import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx import ChatSession, GptOssError, load, load_model
from gptoss_mlx.ops import QuantizedKV, filled_slots, quantized_attention


def unpack(q: QuantizedKV) -> np.ndarray:
    """Dequantized values from the packed words, by the format's definition: element j of a row
    is bits [bits * (j % per_word), ...) of word j // per_word, times its group's scale plus its
    group's bias."""
    words = np.array(q.weight).astype(np.uint64)
    per_word = 32 // q.bits
    shifts = (np.arange(per_word) * q.bits).astype(np.uint64)
    codes = (words[..., None] >> shifts) & np.uint64(2**q.bits - 1)
    codes = codes.reshape(*words.shape[:-1], -1).astype(np.float64)
    scales = np.repeat(np.array(q.scales, np.float64), q.group_size, axis=-1)
    biases = np.repeat(np.array(q.biases, np.float64), q.group_size, axis=-1)
    return codes * scales + biases


def reference_attention(q, k, v, sinks, scale, visible):
    """numpy float64: q [B, Hq, T, D] over k, v [B, Hkv, S, D], visible [T, S] bool."""
    B, Hq, T, D = q.shape
    G = Hq // k.shape[1]
    k, v = np.repeat(k, G, axis=1), np.repeat(v, G, axis=1)
    s = np.einsum("bhtd,bhsd->bhts", q, k) * scale
    s = np.where(visible, s, -np.inf)
    sink = np.broadcast_to(sinks[None, :, None, None], (B, Hq, T, 1))
    logits = np.concatenate([s, sink], axis=-1)
    p = np.exp(logits - logits.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bhtd", p[..., :-1], v), p[..., -1]


def random_attention(seed, T, S, sink_mean=0.0):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(1, 16, T, 64)).astype(np.float32)
    k = rng.normal(size=(1, 2, S, 64)).astype(np.float32)
    v = rng.normal(size=(1, 2, S, 64)).astype(np.float32)
    sinks = (sink_mean + rng.normal(size=16)).astype(np.float32)
    return q, k, v, sinks


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("T, S", [(1, 37), (5, 40)])
def test_attention_over_quantized_keys_and_values(bits, T, S):
    q, k, v, sinks = random_attention(bits + T, T, S)
    qk, qv = (QuantizedKV.quantize(mx.array(a), 64, bits) for a in (k, v))
    if T == 1:  # a decoded token over a buffer with its first 30 slots filled
        mask, visible = filled_slots(S, 29), np.arange(S)[None, :] <= 29
    else:  # the last T of S positions, causal
        mask = "causal"
        visible = np.arange(S - T, S)[:, None] >= np.arange(S)[None, :]
    got = quantized_attention(mx.array(q), qk, qv, mx.array(sinks), 0.125, mask)
    want, _ = reference_attention(q, unpack(qk), unpack(qv), sinks, 0.125, visible)
    np.testing.assert_allclose(np.array(got), want, atol=2e-5, rtol=1e-4)


def test_a_sink_that_takes_most_of_the_mass():
    """Sinks around +10 against scores around 0: the sink takes over 90% of each head's
    probability, so the output is a fraction of what it would be without it."""
    q, k, v, sinks = random_attention(0, 1, 33, sink_mean=10.0)
    qk, qv = (QuantizedKV.quantize(mx.array(a), 64, 8) for a in (k, v))
    visible = np.ones((1, 33), bool)
    want, sink_mass = reference_attention(q, unpack(qk), unpack(qv), sinks, 0.125, visible)
    assert sink_mass.min() > 0.9
    got = np.array(quantized_attention(mx.array(q), qk, qv, mx.array(sinks), 0.125, None))
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-4)
    without, _ = reference_attention(q, unpack(qk), unpack(qv), sinks - 1e9, 0.125, visible)
    assert np.abs(without).mean() > 5 * np.abs(got).mean()


def kl(ref: np.ndarray, other: np.ndarray) -> np.ndarray:
    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p = log_softmax(ref.astype(np.float64))
    return (np.exp(p) * (p - log_softmax(other.astype(np.float64)))).sum(-1)


def cached_logits(model, ids, prompt, kv_bits):
    """Prefill `prompt` tokens, then decode the rest one by one: logits `[T - prompt + 1, V]`."""
    cache = model.make_cache(kv_bits)
    out = [np.array(model(mx.array([ids[:prompt]]), cache=cache)[0, -1:])]
    for t in range(prompt, len(ids)):
        out.append(np.array(model(mx.array([ids[t : t + 1]]), cache=cache)[0]))
    return np.concatenate(out)


@pytest.fixture(scope="module")
def model(experts32_dir):
    return load_model(experts32_dir, "float32")


@pytest.fixture(scope="module")
def ids():
    return np.random.RandomState(11).randint(0, ck.EXPERTS32.vocab_size, 48).tolist()


@pytest.mark.parametrize("bits, max_kl", [(8, 0.01), (4, 0.2)])
def test_close_to_a_float_cache_past_the_window(model, ids, bits, max_kl):
    """24 prompt tokens and 24 decoded, three times the 8-slot window: sliding rings wrap."""
    ref = cached_logits(model, ids, 24, 16)
    got = cached_logits(model, ids, 24, bits)
    divergence = kl(ref, got)
    agree = (ref.argmax(-1) == got.argmax(-1)).mean()
    print(
        f"kv {bits}-bit: mean KL {divergence.mean():.5f}, max {divergence.max():.5f}, "
        f"top-1 agreement {agree:.2f}"
    )
    assert divergence.mean() < max_kl
    assert not np.array_equal(ref, got)  # the cache did quantize


@pytest.mark.parametrize("bits", [8, 4])
def test_prefill_and_decode_read_the_same_quantized_values(model, ids, bits):
    """A chunk attends to its own keys as they are stored: prefilling a position and decoding it
    give the same logits up to float rounding (far closer than to a float cache)."""
    cache = model.make_cache(bits)
    whole = np.array(model(mx.array([ids[:30]]), cache=model.make_cache(bits))[0])
    model(mx.array([ids[:20]]), cache=cache)
    steps = np.concatenate(
        [np.array(model(mx.array([ids[t : t + 1]]), cache=cache)[0]) for t in range(20, 30)]
    )
    np.testing.assert_allclose(steps, whole[20:], atol=1e-4, rtol=1e-4)


def test_bytes_per_token(model):
    """Per position and KV head: D * bits / 8 bytes plus a scale and a bias per 64 (float32
    here, the compute dtype), against D * 4 unquantized."""
    D, Hkv = ck.EXPERTS32.head_dim, ck.EXPERTS32.num_key_value_heads
    full_layers = ck.EXPERTS32.layer_types.count("full_attention")
    for bits in (16, 8, 4):
        cache = model.make_cache(bits)
        model(mx.array([list(range(300))]), cache=cache)
        per_position = 2 * Hkv * (D * 4 if bits == 16 else D * bits // 8 + 2 * 4)
        full = sum(c.nbytes for c in cache if c.window is None)
        assert full == full_layers * 512 * per_position  # 300 positions: two steps of 256
        assert (model.make_cache(bits)[0].bits or 16) == bits


def test_the_decode_step_stays_compiled(model, ids):
    assert model.traceable
    cache = model.make_cache(8)
    model(mx.array([ids[:10]]), cache=cache)
    model(mx.array([ids[10:11]]), cache=cache)
    assert model._compiled_decode is not None and cache[1].offset == 11


def test_narrow_heads_are_refused(hf_mxfp4_dir):
    with pytest.raises(GptOssError, match="multiple of 32"):
        load_model(hf_mxfp4_dir, "float32", kv_bits=8).make_cache()
    with pytest.raises(GptOssError, match="--kv-bits must be"):
        load_model(hf_mxfp4_dir, "float32", kv_bits=6)


def test_chat_keeps_a_quantized_cache(o200k_experts_dir, tok):
    model, _ = load(o200k_experts_dir, kv_bits=8)
    assert model.make_cache()[0].bits == 8
    chat = ChatSession(model, tok, temperature=0.0, max_tokens=6, reasoning_effort="low")
    for text in ("Hi", "Once more"):
        list(chat.send(text))
    assert chat.stats.turns == 2 and chat.stats.full_prefills == 1
    unquantized, _ = load(o200k_experts_dir)
    plain = ChatSession(unquantized, tok, temperature=0.0, max_tokens=6, reasoning_effort="low")
    list(plain.send("Hi"))
    # bfloat16: 64 + 2 scales/biases of 2 bytes per position and head, against 128 bytes
    assert chat.stats.cache_bytes / plain.stats.cache_bytes == pytest.approx(68 / 128)
