"""One rank of a distributed test run: `python tests/distributed_rank.py MODE OUT ARGS...` under
`mlx.launch` (or with MLX_RANK / MLX_HOSTFILE set). Test-only; never installed.

    parity OUT CKPT...   for each checkpoint: float32 logits of PROMPT, greedy tokens, tokens
                         sampled with no seed (each rank draws its own) (npz)
    memory OUT CKPT      bytes held right after loading: MLX active and peak, RSS, parameters
    mismatch OUT CKPT    rank r generates from PROMPT + [r]: prints the error it gets
"""

from __future__ import annotations

import json
import os
import resource
import sys

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from gptoss_mlx import GptOssError, distributed, generate, load_model

PROMPT = [1, 5, 9, 200, 33, 7, 100, 42, 300, 11, 12, 400, 8, 77, 150, 3, 260]
GREEDY_TOKENS = 24


def rss(key: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process in bytes (Linux; elsewhere the peak)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key + ":"))
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def main() -> None:
    mode, out, *folders = sys.argv[1:]
    group = distributed.connect()
    rank = group.rank() if group is not None else 0
    if mode == "parity":
        results = {}
        for i, folder in enumerate(folders):
            model = load_model(folder, "float32", group=group)
            logits = model(mx.array([PROMPT]))
            tokens = generate(model, PROMPT, max_tokens=GREEDY_TOKENS, temperature=0.0)
            sampled = generate(model, PROMPT, max_tokens=GREEDY_TOKENS, temperature=1.0)
            results[f"logits{i}"] = np.array(logits)
            results[f"tokens{i}"] = np.array(tokens["completion_token_ids"])
            results[f"sampled{i}"] = np.array(sampled["completion_token_ids"])  # no seed
        np.savez(os.path.join(out, f"rank{rank}.npz"), **results)
    elif mode == "memory":
        before = rss("VmRSS")
        # the dense weights as stored, all resident: a rank's share is then the stored bytes
        model = load_model(folders[0], group=group, dense_bits=16, embedding_from_disk=False)
        experts = sum(a.nbytes for n, a in tree_flatten(model.parameters()) if ".experts." in n)
        record = {
            "rank": rank,
            "active_bytes": mx.get_active_memory(),
            "peak_bytes": mx.get_peak_memory(),
            "rss_growth_bytes": rss("VmHWM") - before,
            "parameter_bytes": sum(a.nbytes for _, a in tree_flatten(model.parameters())),
            "expert_parameter_bytes": experts,
            "experts": model.layers[0].mlp.experts.gate_up_proj.weight.shape[0],
        }
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(record, f)
    elif mode == "mismatch":
        model = load_model(folders[0], "float32", group=group)
        try:
            generate(model, PROMPT + [rank], max_tokens=2, temperature=0.0)
        except GptOssError as e:
            print(f"GptOssError: {e}")
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
