#!/usr/bin/env python3
"""The memory planner's figures for gpt-oss-20b on a 16 GB Mac and gpt-oss-120b on a 64 GB Mac,
from the published checkpoints' shapes alone (nothing allocated, nothing downloaded).

The headers are those `openai/gpt-oss-20b` and `-120b` publish (names, dtypes, shapes: the
published layout at each model's config), so the plan is what `gptoss-mlx memory -m
openai/gpt-oss-20b` computes from the hub's headers. The Macs are described, not measured:
16 GiB with Metal's recommended working set at 2/3 of it (10.67 GiB), 64 GiB at 3/4 (48 GiB), the
fractions macOS has used on those sizes; on a Mac the planner reads the real values
(`mx.device_info()`). For each model, the plan with the defaults at the full context and at 8192
tokens, what the planner advises, and that plan re-made with the advice applied.

    python bench/mac_plans.py
"""

from __future__ import annotations

import dataclasses

import mlx.core as mx

from gptoss_mlx import memory
from gptoss_mlx.config import preset
from gptoss_mlx.synthetic import hf_config_json, published_headers
from gptoss_mlx.weights import checkpoint_from_headers

GIB = 2**30
MACS = {
    "16 GB Mac": {"physical": 16 * GIB, "metal": True, "recommended": 16 * GIB * 2 // 3},
    "64 GB Mac": {"physical": 64 * GIB, "metal": True, "recommended": 48 * GIB},
}


def plan(name: str, mac: str, settings: memory.MemorySettings) -> memory.MemoryPlan:
    config = preset(name)
    ckpt = checkpoint_from_headers(
        published_headers(config), hf_config_json(config), f"openai/gpt-oss-{name}"
    )
    return memory.fit(ckpt, mx.bfloat16, settings, None, ckpt.folder, MACS[mac])


MODELS = (("20b", "16 GB Mac"), ("120b", "64 GB Mac"))


def advised(
    name: str, mac: str, context: int | None
) -> tuple[memory.MemoryPlan, str, memory.MemoryPlan | None]:
    """The default plan at `context`, the flags of its first advice ("" when it fits) and the
    plan with them applied (None when it fits)."""
    settings = memory.MemorySettings(max_context=context)
    default = plan(name, mac, settings)
    if not default.advice:
        return default, "", None
    flags = default.advice[0].split(" (")[0]
    words = flags.split()
    applied = {words[i][2:].replace("-", "_"): int(words[i + 1]) for i in range(0, len(words), 2)}
    return default, flags, plan(name, mac, dataclasses.replace(settings, **applied))


def main() -> None:
    for name, mac in MODELS:
        for context in (None, 8192):
            p, flags, fitted = advised(name, mac, context)
            print(f"=== gpt-oss-{name} on a {mac}, context {p.context}")
            print(p.report())
            if fitted is not None:
                verdict = "fits" if fitted.fits else "does NOT fit"
                print(
                    f"advice applied ({flags}): total {fitted.total / 1e9:.2f} GB, "
                    f"{verdict}; weights {fitted.weights / 1e9:.2f} GB, KV "
                    f"{fitted.kv_cache / 1e9:.2f} GB, working set "
                    f"{fitted.working_set / 1e9:.2f} GB, ~{fitted.disk_bytes_per_token / 1e6:.0f} "
                    "MB/token read from disk under uniform routing"
                )
            print()


if __name__ == "__main__":
    main()
