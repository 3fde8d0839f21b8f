"""Loading the published MXFP4 layout costs no more memory than the weights themselves (as loaded:
dense weights quantized to 8 bits on the way)."""

from __future__ import annotations

import os
import sys

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import load_memory  # noqa: E402


def test_peak_memory_while_loading_is_near_the_weights_size(tmp_path):
    # One layer with gpt-oss-20b's real shapes (experts 0.42 GB); vocabulary reduced to 8000.
    r = load_memory.measure(layers=1, vocab=8000, folder=str(tmp_path))
    print(r)
    assert r["mlx_peak_ratio"] <= 1.1
    assert r["rss_growth_ratio"] <= 1.1
    # quantizing at load holds one stored tensor at a time beside the weights: the plan's figure
    assert r["mlx_peak_over_plan"] <= 1.001
