#!/usr/bin/env python3
"""What `--kv-bits 8|4` costs in accuracy and saves in bytes.

A synthetic test model (published MXFP4 layout; real head geometry: 16 query / 2 KV heads of 64,
window 128; hidden 512, 8 experts, 4 layers, vocabulary 8000), bfloat16 compute. A 256-token
random prompt is prefilled, then 256 more tokens are fed one at a time through the decode step,
so positions reach 512, four times the sliding window (the rings have wrapped) and the full
layers attend over up to 512 keys. At each fed position the logits with the cache at 8 and 4 bits
are compared with those of the unquantized (bfloat16) cache: mean and largest KL divergence
(nats) and top-1 agreement. Then greedy generation (256 tokens after the same prompt) with each
cache: the tokens identical to the bfloat16 cache's, up to the first that differs. Bytes per
token are computed for gpt-oss-20b from its real shapes (12 full-attention layers; the sliding
layers' rings are 128 positions whatever the context).

    python bench/kv_bits_accuracy.py
"""

from __future__ import annotations

import tempfile

import mlx.core as mx
import numpy as np

from gptoss_mlx import load_model, stream_generate
from gptoss_mlx.benchmark import TINY
from gptoss_mlx.config import preset
from gptoss_mlx.memory import kv_bytes_per_1k
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

TEST_MODEL = TINY  # the CPU proxy: real head geometry, 4 layers, hidden 512, vocab 8000
PROMPT, FED = 256, 256


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def fed_logits(model, ids: list[int], bits: int) -> np.ndarray:
    """Logits `[FED, V]` of positions PROMPT .. PROMPT+FED-1, each fed through the decode step."""
    cache = model.make_cache(bits)
    model(mx.array([ids[:PROMPT]]), cache=cache)
    out = []
    for t in range(PROMPT, PROMPT + FED):
        out.append(
            np.array(model(mx.array([ids[t : t + 1]]), cache=cache)[0, -1].astype(mx.float32))
        )
    return np.stack(out)


def greedy(model, ids: list[int], bits: int) -> list[int]:
    events = stream_generate(
        model,
        ids[:PROMPT],
        max_tokens=FED,
        temperature=0.0,
        stop_tokens=(),
        cache=model.make_cache(bits),
    )
    return [e.token for e in events]


def main() -> None:
    ids = np.random.RandomState(0).randint(0, TEST_MODEL.vocab_size, PROMPT + FED).tolist()
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(tmp, random_checkpoint(TEST_MODEL, seed=1), hf_config_json(TEST_MODEL))
        model = load_model(tmp, "bfloat16", dense_bits=16)
        ref = fed_logits(model, ids, 16)
        ref_tokens = greedy(model, ids, 16)
        print(
            f"test model: {TEST_MODEL.num_hidden_layers} layers, hidden {TEST_MODEL.hidden_size}, "
            f"heads 16/2 x 64, window 128, vocab {TEST_MODEL.vocab_size}, bfloat16; prompt "
            f"{PROMPT} then {FED} positions decoded (up to {PROMPT + FED})"
        )
        c20 = preset("20b")
        base = kv_bytes_per_1k(c20, None, mx.bfloat16) / 1000
        print(
            f"{'KV':>4} {'mean KL':>9} {'max KL':>8} {'top-1 agree':>12} {'greedy same':>12} "
            f"{'20b KB/token':>13} {'saved':>6}"
        )
        for bits in (16, 8, 4):
            got = ref if bits == 16 else fed_logits(model, ids, bits)
            p = log_softmax(ref)
            kl = (np.exp(p) * (p - log_softmax(got))).sum(-1)
            agree = (ref.argmax(-1) == got.argmax(-1)).mean()
            tokens = ref_tokens if bits == 16 else greedy(model, ids, bits)
            same = next(
                (i for i, (a, b) in enumerate(zip(tokens, ref_tokens, strict=True)) if a != b), FED
            )
            per_token = kv_bytes_per_1k(c20, bits, mx.bfloat16) / 1000
            print(
                f"{bits:>4} {kl.mean():9.5f} {kl.max():8.4f} {agree:12.3f} {same:>8}/{FED} "
                f"{per_token / 1024:13.2f} {1 - per_token / base:6.1%}"
            )


if __name__ == "__main__":
    main()
