#!/usr/bin/env python3
"""The expert cache at gpt-oss-20b's layer shapes: resident bytes, disk bytes per decoded token,
hit rate and decode speed against the number of slots, under two routings.

A synthetic checkpoint in the published layout with 20b's real layer shapes (hidden 2880, 32
experts of 2880, 64/8 heads of 64) in --layers layers (vocabulary 8000) is written to a temporary
folder; each run loads it with `expert_cache=K` (K = 32: no cache, the compiled decode step),
prefills 16 tokens and decodes --tokens tokens greedily through `stream_generate`. The routers are
replaced by one of two routings, the same for every K (real routing statistics cannot be measured
without the real weights):

- uniform: each token picks 4 distinct experts uniformly at random, independently per layer: the
  worst case for a cache (no locality at all);
- trace: a routing trace with locality: each of the previous token's 4 experts is kept with
  probability --keep (0.6), and each one not kept is replaced by a draw from a Zipf(1.0)
  popularity over the 32 experts (a layer-specific random order), so some experts are hot and
  consecutive tokens share experts, as reported for trained MoE routers.

The mixing weights are a softmax over random logits either way. Speeds are this machine's (the
CPU backend, float32 compute), and the experts come from the OS's file cache, warm after the first
read: they are not a Mac's, and not an SSD's; disk bytes per token, divided by an SSD's bandwidth,
bound what the reads cost there (printed for 5 GB/s). Each run first generates once to fill the
cache (its compulsory misses are not counted), then measures a second generation. The last line
times what the design costs when nothing is missed, the models taking turns: a cache holding every
expert the routing uses (31 of 32 slots, routing over 31 experts), which decodes uncompiled with
one wait per layer, against the fully resident model (compiled), and the embedding read from disk
(the default) against a resident one.

    python bench/expert_cache.py [--layers 2] [--tokens 24] [--json]
"""

from __future__ import annotations

import argparse
import json
import tempfile

import mlx.core as mx
import numpy as np

from gptoss_mlx import load_model, stream_generate
from gptoss_mlx.config import preset
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

SLOTS = (4, 8, 12, 16, 24, 32)
SSD_GBS = 5.0


class Routing:
    """The experts each token uses in each layer: `choose(layer, position) -> [k]`."""

    def __init__(self, kind: str, experts: int, k: int, keep: float, seed: int = 0) -> None:
        self.kind, self.experts, self.k, self.keep = kind, experts, k, keep
        self.rng = np.random.default_rng(seed)
        self.previous: dict[int, np.ndarray] = {}
        ranks = np.arange(1, experts + 1)
        self.popularity = (1 / ranks) / (1 / ranks).sum()  # Zipf(1.0)
        self.order = {}

    def choose(self, layer: int) -> np.ndarray:
        if self.kind == "uniform":
            return self.rng.permutation(self.experts)[: self.k]
        order = self.order.setdefault(layer, self.rng.permutation(self.experts))
        chosen = [e for e in self.previous.get(layer, ()) if self.rng.random() < self.keep]
        while len(chosen) < self.k:
            e = int(order[self.rng.choice(self.experts, p=self.popularity)])
            if e not in chosen:
                chosen.append(e)
        self.previous[layer] = np.array(chosen)
        return self.previous[layer]


def route_with(model, routing: Routing) -> None:
    """Replace every layer's router by `routing` (indices uint32 `[N, k]`, softmax weights)."""
    for i, layer in enumerate(model.layers):

        def route(x: mx.array, layer_index: int = i) -> tuple[mx.array, mx.array]:
            n = x.shape[0]
            indices = np.stack([routing.choose(layer_index) for _ in range(n)]).astype(np.uint32)
            logits = mx.array(routing.rng.normal(size=indices.shape).astype(np.float32))
            return mx.array(indices), mx.softmax(logits, axis=-1).astype(x.dtype)

        layer.mlp.route = route


def generate(model, tokens: int) -> object:
    """Greedy generation of `tokens` tokens after a 16-token prompt: its statistics."""
    events = stream_generate(
        model, list(range(16)), max_tokens=tokens, temperature=0.0, stop_tokens=(), prefill_chunk=16
    )
    return list(events)[-1].stats


def loaded(folder: str, slots: int, routing: Routing, **options):
    model = load_model(folder, "float32", expert_cache=slots, max_context=1024, **options)
    route_with(model, routing)
    return model


def run(folder: str, slots: int, routing: Routing, tokens: int) -> dict:
    """One generation to warm the cache up (its compulsory misses), then the measured one."""
    model = loaded(folder, slots, routing)
    generate(model, tokens)
    stats = generate(model, tokens)
    plan = model.memory_plan
    decode = (stats.expert_cache or {}).get("decode")
    steps = stats.generation_tokens - 1
    out = {
        "slots": slots,
        "resident_expert_bytes": plan.parts["experts"],
        "resident_bytes": plan.weights,
        "decode_tps": stats.generation_tps,
        "disk_bytes_per_token": decode["bytes_read"] / steps if decode else 0.0,
        "hit_rate": decode["hits"] / (decode["hits"] + decode["misses"]) if decode else 1.0,
        "syncs_per_token": decode["syncs"] / steps if decode else 0.0,
        "copies_per_token": decode["copies"] / steps if decode else 0.0,
    }
    del model
    mx.clear_cache()
    return out


def what_waiting_costs(folder: str, experts: int, k: int, tokens: int, rounds: int) -> dict:
    """Decode tok/s (median of `rounds`, the models taking turns): fully resident (the compiled
    step), the same with the embedding resident too (no wait for the sampled id), and a cache of
    experts - 1 slots that misses nothing (routing over experts - 1; warmed up): the uncompiled
    step with one wait per layer."""

    def routing() -> Routing:
        return Routing("uniform", experts - 1, k, 0)

    models = {
        "resident, compiled": loaded(folder, experts, routing()),
        "resident embedding": loaded(folder, experts, routing(), embedding_from_disk=False),
        f"{experts - 1} slots, all hits": loaded(folder, experts - 1, routing()),
    }
    speeds: dict[str, list[float]] = {name: [] for name in models}
    for model in models.values():
        generate(model, tokens)  # warm-up: caches filled, steps compiled
    for _ in range(rounds):
        for name, model in models.items():
            speeds[name].append(generate(model, tokens).generation_tps)
    return {name: float(np.median(v)) for name, v in speeds.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--keep", type=float, default=0.6)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    config = preset("20b").replace(num_hidden_layers=args.layers, vocab_size=8000, layer_types=())
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        save_checkpoint(folder, random_checkpoint(config, seed=0), hf_config_json(config))
        mx.clear_cache()
        for kind in ("uniform", "trace"):
            for slots in SLOTS:
                routing = Routing(kind, config.num_experts, config.experts_per_token, args.keep)
                rows.append({"routing": kind, **run(folder, slots, routing, args.tokens)})
                if not args.json:
                    print(format_row(rows[-1], args.layers), flush=True)
        waiting = what_waiting_costs(
            folder, config.num_experts, config.experts_per_token, args.tokens, args.rounds
        )
        rows.append({"routing": "waiting", **waiting})
        if not args.json:
            print(
                f"decode tok/s here, median of {args.rounds} alternating runs: "
                + ", ".join(f"{name} {tps:.2f}" for name, tps in waiting.items())
            )
    if args.json:
        print(json.dumps(rows))


def format_row(r: dict, layers: int) -> str:
    per_token = r["disk_bytes_per_token"]
    experts = r["resident_expert_bytes"]
    ssd = f"{SSD_GBS * 1e9 / (per_token / layers * 24):7.1f}" if per_token else "      -"
    return (
        f"{r['routing']:<20} slots {r['slots']:>2}: resident experts {experts / 1e6:7.1f} MB "
        f"({experts / layers * 24 / 1e9:5.2f} GB at 24 layers), hit rate {r['hit_rate']:5.1%}, "
        f"disk {per_token / 1e6:6.1f} MB/token ({per_token / layers * 24 / 1e9:5.2f} GB at 24 "
        f"layers; SSD-bound {ssd} tok/s at {SSD_GBS:g} GB/s), waits/token "
        f"{r['syncs_per_token']:.1f} + {r['copies_per_token']:.1f} copies, decode "
        f"{r['decode_tps']:6.2f} tok/s here"
    )


if __name__ == "__main__":
    main()
