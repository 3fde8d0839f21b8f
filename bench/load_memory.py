#!/usr/bin/env python3
"""Peak memory while loading a published-layout (HF MXFP4) checkpoint, against its size on disk.

Writes a synthetic checkpoint with gpt-oss-20b's real layer shapes (hidden 2880, 32 experts of
2880, 64/8 heads of 64) but fewer layers (and optionally a smaller vocabulary), then loads it in a
fresh process with `load_model(path)` (bfloat16, as a user would: dense weights quantized to 8 bits
as they load, the embedding left on disk) and prints MLX's peak allocation and the process's peak
RSS next to the checkpoint's tensor bytes and to the weights as loaded (the memory plan's).

    python bench/load_memory.py --layers 2 [--vocab 201088] [--json]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

MEASURE = r"""
import json, sys
import mlx.core as mx
from gptoss_mlx import load_model

def status(key):  # VmRSS (now) / VmHWM (peak) on Linux; the peak on macOS, whose ru_maxrss is bytes
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) * 1024 for l in f if l.startswith(key + ":"))
    except OSError:
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

base = status("VmRSS")
model = load_model(sys.argv[1])
print(json.dumps({"mlx_peak_bytes": mx.get_peak_memory(), "rss_peak_bytes": status("VmHWM"),
                  "rss_before_load_bytes": base, "rss_after_bytes": status("VmRSS"),
                  "loaded_weight_bytes": model.memory_plan.weights,
                  "plan_load_peak_bytes": model.memory_plan.load_peak}))
"""


def measure(layers: int, vocab: int, folder: str) -> dict:
    import mlx.core as mx

    from gptoss_mlx.config import preset
    from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

    config = preset("20b").replace(num_hidden_layers=layers, vocab_size=vocab, layer_types=())
    tensors = random_checkpoint(config, seed=0)
    save_checkpoint(folder, tensors, hf_config_json(config), shards=2)
    expert = sum(t.nbytes for n, t in tensors.items() if ".mlp.experts." in n)
    dense = sum(t.nbytes for n, t in tensors.items() if ".mlp.experts." not in n)
    del tensors
    mx.clear_cache()
    out = subprocess.run(
        [sys.executable, "-c", MEASURE, folder], capture_output=True, text=True, check=True
    )
    result = json.loads(out.stdout)
    result.update(
        layers=layers,
        vocab=vocab,
        expert_bytes=expert,
        dense_bytes=dense,
        checkpoint_bytes=expert + dense,
        mlx_peak_ratio=result["mlx_peak_bytes"] / (expert + dense),
        mlx_peak_over_plan=result["mlx_peak_bytes"] / result["plan_load_peak_bytes"],
        rss_growth_ratio=(result["rss_peak_bytes"] - result["rss_before_load_bytes"])
        / (expert + dense),
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=201088)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        r = measure(args.layers, args.vocab, folder)
    if args.json:
        print(json.dumps(r))
        return
    gb = 1e9
    print(
        f"synthetic gpt-oss-20b shapes, {r['layers']} layers, vocab {r['vocab']}, HF MXFP4 layout"
    )
    print(
        f"  checkpoint tensors   {r['checkpoint_bytes'] / gb:7.3f} GB "
        f"(experts {r['expert_bytes'] / gb:.3f} + dense {r['dense_bytes'] / gb:.3f})"
    )
    print(
        f"  weights as loaded    {r['loaded_weight_bytes'] / gb:7.3f} GB "
        "(dense at 8 bits, embedding on disk)"
    )
    print(
        f"  plan's loading peak  {r['plan_load_peak_bytes'] / gb:7.3f} GB "
        "(the weights, or the unembedding's stored and quantized forms, whichever is larger)"
    )
    print(
        f"  MLX peak allocation  {r['mlx_peak_bytes'] / gb:7.3f} GB  = {r['mlx_peak_ratio']:.3f}x "
        f"the checkpoint, {r['mlx_peak_over_plan']:.4f}x the plan's loading peak"
    )
    print(
        f"  RSS growth in load   {(r['rss_peak_bytes'] - r['rss_before_load_bytes']) / gb:7.3f} GB"
        f"  = {r['rss_growth_ratio']:.3f}x (includes library code and the allocator's cache)"
    )


if __name__ == "__main__":
    main()
