#!/usr/bin/env python3
"""The memory plan against the memory actually allocated, at gpt-oss's real layer shapes.

Synthetic checkpoints in the published layout with gpt-oss-20b's and gpt-oss-120b's real layer
shapes (hidden 2880, 64/8 heads of 64, experts of 2880; 32 or 128 experts) but fewer layers and a
vocabulary of 8000, loaded with every combination of dense bits (16, 8, 4), KV bits (16, 8, 4)
and expert cache (none, or a quarter of the experts... 8 of 32, 16 of 128), one after the other
in one process. For each: MLX's active memory after loading (the weights) and after a short
generation at --max-context 256 (weights + KV cache), and MLX's peak during the generation, next
to the plan's figures (`gptoss_mlx.memory`). Float32 compute, so that the CPU runs it quickly.

    python bench/memory_plan.py [--models 20b,120b] [--json]

With --rss, instead, a fresh process per setting measures the peak resident set size it grows by
(from before loading to after generating) against the plan's total.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import subprocess
import sys
import tempfile

import mlx.core as mx

from gptoss_mlx import load_model, stream_generate
from gptoss_mlx.config import FULL, SLIDING, preset
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

CONTEXT = 256  # one step of the full layers' cache
PROMPT = 16
SHAPES = {
    # one sliding and one full layer, like the real models' pairs
    "20b": dict(layer_types=(SLIDING, FULL), slots=8),
    # one full layer: 128 experts of the real size are 1.7 GB a layer
    "120b": dict(layer_types=(FULL,), slots=16),
}
COMBINATIONS = list(itertools.product((16, 8, 4), (16, 8, 4), (None, "slots")))


def write_checkpoint(name: str, folder: str, vocab: int = 8000) -> int:
    """The synthetic checkpoint for `name` in `folder`; returns its expert cache size."""
    shape = SHAPES[name]
    config = preset(name).replace(
        num_hidden_layers=len(shape["layer_types"]),
        layer_types=shape["layer_types"],
        vocab_size=vocab,
    )
    save_checkpoint(folder, random_checkpoint(config, seed=0), hf_config_json(config))
    mx.clear_cache()
    return shape["slots"]


def measure(folder: str, options: dict, dtype: str = "float32", prompt: int = PROMPT) -> dict:
    """Load `folder` with `options` (load_model's keywords) and generate 3 tokens after a
    `prompt`-token prompt at max_context CONTEXT (unless `options` names one); what was allocated
    next to the plan."""
    gc.collect()
    mx.clear_cache()
    base = mx.get_active_memory()
    options = {"max_context": CONTEXT, **options}
    model = load_model(folder, dtype, prefill_chunk=prompt, **options)
    weights = mx.get_active_memory() - base
    ids = mx.random.randint(0, model.config.vocab_size, (prompt,), key=mx.random.key(0)).tolist()
    cache = model.make_cache()
    mx.reset_peak_memory()
    for _ in stream_generate(
        model,
        ids,
        max_tokens=3,
        temperature=0.0,
        stop_tokens=(),
        cache=cache,
        prefill_chunk=prompt,
    ):
        pass
    gc.collect()
    allocated = mx.get_active_memory() - base
    plan = model.memory_plan
    out = {
        "options": options,
        "plan_weights": plan.weights,
        "weights": weights,
        "plan_kv": plan.kv_cache,
        "kv": allocated - weights,
        "kv_buffers": sum(c.nbytes for c in cache),
        "plan_peak": plan.total - plan.to_dict()["runtime"],
        "peak": mx.get_peak_memory() - base,
        "plan_total": plan.total,
    }
    del model, cache
    gc.collect()
    mx.clear_cache()
    return out


RSS_SCRIPT = r"""
import json, sys
import gptoss_mlx, numpy  # the imports are the baseline, not the model
sys.path.insert(0, sys.argv[3])
import memory_plan

def status(key):  # VmRSS (now) / VmHWM (peak) on Linux; the peak on macOS, whose ru_maxrss is bytes
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = status("VmRSS")
out = memory_plan.measure(sys.argv[1], json.loads(sys.argv[2]))
out["rss_growth"] = status("VmHWM") - base
print(json.dumps(out))
"""


def measure_rss(folder: str, options: dict) -> dict:
    """`measure` in a fresh process, with its peak resident set size growth since before
    loading (`rss_growth`)."""
    here = __file__.rsplit("/", 1)[0]
    out = subprocess.run(
        [sys.executable, "-c", RSS_SCRIPT, folder, json.dumps(options), here],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout)


def options_of(dense: int, kv: int, cache: str | None, slots: int) -> dict:
    return {"dense_bits": dense, "kv_bits": kv, "expert_cache": slots if cache else None}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", default="20b,120b")
    parser.add_argument("--rss", action="store_true")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory() as folder:
            slots = write_checkpoint(name, folder)
            combos = COMBINATIONS if not args.rss else [(16, 16, None), (8, 8, "slots")]
            for dense, kv, cache in combos:
                options = options_of(dense, kv, cache, slots)
                r = measure_rss(folder, options) if args.rss else measure(folder, options)
                rows.append({"model": name, **r})
                if not args.json:
                    print(format_row(rows[-1]), flush=True)
    if args.json:
        print(json.dumps(rows))


def format_row(r: dict) -> str:
    o = r["options"]
    dense, kv = o.get("dense_bits", "8"), o.get("kv_bits", "16")  # load_model's defaults
    cache = o.get("expert_cache") or "all"
    line = (
        f"{r['model']:>4} dense {dense:>2} kv {kv:>2} experts {cache!s:>3}: "
        f"weights {r['weights'] / 1e6:8.2f} MB (plan {r['plan_weights'] / r['weights']:.4f}x) "
        f"KV {r['kv'] / 1e6:6.3f} MB (plan {r['plan_kv'] / max(r['kv'], 1):.4f}x) "
        f"peak {r['peak'] / 1e6:8.2f} MB (plan {r['plan_peak'] / r['peak']:.3f}x)"
    )
    if "rss_growth" in r:
        ratio = r["plan_total"] / r["rss_growth"]
        line += f" RSS growth {r['rss_growth'] / 1e6:8.2f} MB (plan {ratio:.3f}x)"
    return line


if __name__ == "__main__":
    main()
