#!/usr/bin/env python3
"""Peak memory of a long prefill, split into weights, KV cache and the chunk's working set.

A synthetic model with gpt-oss's real hidden and attention sizes (hidden 2880, 64 query / 8 KV
heads of 64, window 128, expert width 2880) but 2 layers, 1 expert (top-1) and a vocabulary of
8000, so that it runs on a CPU in minutes. The prompt is prefilled in chunks through
`stream_generate` (2 tokens generated); MLX's peak allocation is reported next to the weights and
the KV cache, and the remainder is the per-chunk working set, which does not grow with depth.

    python bench/prefill_memory.py --prompt-tokens 8192 --chunk 512 [--dtype float32]
"""

from __future__ import annotations

import argparse

import mlx.core as mx

from gptoss_mlx import stream_generate
from gptoss_mlx.config import preset
from gptoss_mlx.loading import build_model, parse_dtype
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint
from gptoss_mlx.weights import checkpoint_from_tensors


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompt-tokens", type=int, default=8192)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--dtype", default="float32")
    args = parser.parse_args()
    config = preset("20b").replace(
        num_hidden_layers=2, num_experts=1, experts_per_token=1, vocab_size=8000, layer_types=()
    )
    tensors = random_checkpoint(config, seed=0)
    model = build_model(
        checkpoint_from_tensors(tensors, hf_config_json(config)), parse_dtype(args.dtype)
    )
    del tensors
    weights = sum(
        p.nbytes for _, p in __import__("mlx.utils").utils.tree_flatten(model.parameters())
    )
    cache = model.make_cache()
    prompt = mx.random.randint(
        0, config.vocab_size, (args.prompt_tokens,), key=mx.random.key(0)
    ).tolist()
    mx.clear_cache()
    for event in stream_generate(
        model,
        prompt,
        max_tokens=2,
        temperature=0.0,
        cache=cache,
        prefill_chunk=args.chunk,
        stop_tokens=(),
        progress=True,
    ):
        stats = event.stats
    kv = sum(c.nbytes for c in cache)
    gb = 1e9
    print(
        f"2 layers (1 sliding, 1 full), hidden 2880, heads 64/8 x 64, 1 expert of 2880, "
        f"vocab 8000, {args.dtype}; prompt {args.prompt_tokens} in chunks of {args.chunk}"
    )
    print(f"  peak allocation   {stats.peak_memory / gb:7.3f} GB")
    print(f"  weights           {weights / gb:7.3f} GB")
    print(
        f"  KV cache          {kv / gb:7.3f} GB (full layer: {cache[1].nbytes / gb:.3f}, "
        f"sliding ring: {cache[0].nbytes / gb:.4f})"
    )
    print(
        f"  working set       {(stats.peak_memory - weights - kv) / gb:7.3f} GB "
        "(per chunk, any depth)"
    )
    print(f"  prefill           {stats.prompt_tps:.1f} tok/s")


if __name__ == "__main__":
    main()
