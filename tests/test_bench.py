"""`gptoss-mlx bench`: the JSON it prints, the bytes-per-token arithmetic, and the launch counts."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from gptoss_mlx.benchmark import TINY, Benchmark, count_primitives, format_ops, launch_summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "gptoss_mlx.cli", "bench", *args],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": REPO},
    )


def expected_bytes_per_token(c) -> int:
    """bf16 dense weights (--dense-bits 16), 4 of E MXFP4 experts per layer (4.25 bits/weight +
    bf16 biases),
    the whole unembedding and one embedding row, computed from the shapes by hand."""
    H, I, E, k = c.hidden_size, c.intermediate_size, c.num_experts, c.experts_per_token
    q, kv = c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim
    attention = 2 * (H * (q + 2 * kv) + (q + 2 * kv) + q * H + H + c.num_attention_heads)
    norms, router = 2 * 2 * H, 2 * (E * H + E)
    expert_weights = (2 * I * H + H * I) * 4.25 / 8
    expert_biases = 2 * (2 * I + H)
    experts = k * (expert_weights + expert_biases)
    per_layer = attention + norms + router + experts
    return int(c.num_hidden_layers * per_layer + 2 * H + 2 * c.vocab_size * H + 2 * H)


def test_bench_json_smoke():
    done = run_cli(
        "--synthetic",
        "tiny",
        "--json",
        "--prompt-tokens",
        "8,12",
        "--gen-tokens",
        "3",
        "--repeats",
        "1",
        "--no-warmup",
        "--bandwidth",
        "100",
        "--dense-bits",
        "16",
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["model"] == "synthetic-tiny" and result["engines"] == ["gptoss-mlx"]
    assert [s["prompt_tokens"] for s in result["settings"]] == [8, 12]
    for setting in result["settings"]:
        m = setting["median"]["gptoss-mlx"]
        assert m["prompt_tps"] > 0 and m["decode_tps"] > 0 and m["ttft_s"] > 0
        assert m["peak_memory_bytes"] > 0
        assert [r["gen_tokens"] for r in setting["runs"]] == [3]
    assert result["weight_bytes_per_token"] == expected_bytes_per_token(TINY)
    assert result["decode_ceiling_tps"] == pytest.approx(100e9 / result["weight_bytes_per_token"])


@pytest.mark.parametrize(
    "args,message",
    [
        ([], "exactly one of --model"),
        (["--synthetic", "tiny", "--chip", "Z80"], "unknown chip"),
        (["--synthetic", "tiny", "--prompt-tokens", "1,x"], "comma-separated"),
        (["--synthetic", "tiny", "--gen-tokens", "1"], "gen-tokens"),
    ],
)
def test_bench_errors_are_one_line(args, message):
    done = run_cli(*args)
    assert done.returncode != 0
    assert message in done.stderr and "Traceback" not in done.stderr


def test_views_are_told_apart_from_kernel_launches():
    """A graph built by hand: transpose, new axis and slice only re-stride the input (no kernel on
    a GPU), the reshape of their contiguous result likewise or one copy, exp and the concatenation
    launch kernels."""
    x = mx.array(np.arange(24, dtype=np.float32).reshape(4, 6))  # a constant: no primitive
    y = mx.exp(x.T[None, 1:3]).reshape(2, 4)
    counts = count_primitives(mx.concatenate([y, y]))
    assert counts == {
        "Transpose": 1,
        "ExpandDims": 1,
        "Slice": 1,
        "Exp": 1,
        "Reshape": 1,
        "Concatenate": 1,
    }
    summary = launch_summary(counts)
    assert (summary["launching"], summary["reshapes"], summary["views"]) == (2, 1, 3)
    assert summary["total"] == 6


def test_decode_step_launches_at_most_0_7x_mlx_lm():
    """Kernel-launching primitives of one decode step, ours against mlx-lm's on the same weights."""
    pytest.importorskip("mlx_lm")
    bench = Benchmark(synthetic="tiny", compare="mlx-lm")
    counts = bench.primitives()
    ours, theirs = counts["gptoss-mlx"], counts["mlx-lm"]
    table = format_ops({"device": str(mx.default_device()), "primitives_per_decode_step": counts})
    print(table)
    for c in (ours, theirs):
        assert c["launching"] + c["reshapes"] + c["views"] == c["total"]
        assert c["launching"] > 100  # the step's matmuls, gathers, softmaxes, ... are all there
    (row,) = [line.split() for line in table.splitlines() if line.startswith("gptoss-mlx ")]
    assert row[1:5] == [str(ours[k]) for k in ("launching", "reshapes", "views", "total")]
    assert ours["launching"] <= 0.7 * theirs["launching"]
