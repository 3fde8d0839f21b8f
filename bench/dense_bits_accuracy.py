#!/usr/bin/env python3
"""What `convert --dense-bits 8|4` costs in accuracy and saves in bytes.

Builds a synthetic checkpoint (published MXFP4 layout; real head geometry, hidden 512, 8 experts,
4 layers, vocabulary 8000), converts it with --dense-bits 16, 8 and 4, and compares float32 logits
over 2 x 64 random tokens against the unquantized model: max |error| / max |logit|, mean KL
divergence (nats) and top-1 agreement. Bytes per decoded token are computed for gpt-oss-20b from
its real shapes (attention projections + unembedding; the embedding row read is negligible).

    python bench/dense_bits_accuracy.py
"""

from __future__ import annotations

import tempfile

import mlx.core as mx
import numpy as np

from gptoss_mlx import load_model
from gptoss_mlx.benchmark import TINY
from gptoss_mlx.config import preset
from gptoss_mlx.convert import convert
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

# The CPU-sized proxy of gpt-oss the benchmarks share (real head geometry, reduced width).
TEST_MODEL = TINY


def dense_bytes_per_token(bits: int, group_size: int = 64) -> float:
    """Bytes of attention projections + unembedding read per decoded token for gpt-oss-20b."""
    c = preset("20b")
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    params = c.num_hidden_layers * (c.hidden_size * (q + 2 * kv) + q * c.hidden_size)
    params += c.vocab_size * c.hidden_size
    if bits == 16:
        return params * 2
    return params * (bits / 8 + 4 / group_size)  # + bf16 scale and bias per group


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def main() -> None:
    ids = mx.array(np.random.RandomState(0).randint(0, TEST_MODEL.vocab_size, (2, 64)))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(
            f"{tmp}/src", random_checkpoint(TEST_MODEL, seed=1), hf_config_json(TEST_MODEL)
        )
        logits = {}
        for bits in (16, 8, 4):
            dst = convert(f"{tmp}/src", f"{tmp}/q{bits}", dense_bits=bits)
            logits[bits] = np.array(load_model(dst, dtype="float32", dense_bits=bits)(ids))
    ref = logits[16]
    print(
        f"test model: {TEST_MODEL.num_hidden_layers} layers, hidden {TEST_MODEL.hidden_size}, "
        f"vocab {TEST_MODEL.vocab_size}; 2 x 64 tokens; float32 compute"
    )
    print(
        f"{'dense':>6} {'rel max err':>12} {'mean KL':>10} {'top-1 agree':>12} "
        f"{'20b dense GB/token':>19}"
    )
    for bits in (16, 8, 4):
        err = np.abs(logits[bits] - ref).max() / np.abs(ref).max()
        p = np.exp(log_softmax(ref))
        kl = (p * (log_softmax(ref) - log_softmax(logits[bits]))).sum(-1).mean()
        agree = (logits[bits].argmax(-1) == ref.argmax(-1)).mean()
        print(
            f"{bits:>6} {err:12.4f} {kl:10.5f} {agree:12.3f} "
            f"{dense_bytes_per_token(bits) / 1e9:19.3f}"
        )


if __name__ == "__main__":
    main()
