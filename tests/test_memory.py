"""The memory plan: its figures against the memory actually allocated at gpt-oss's real layer
shapes, for every combination of dense bits, KV bits and expert cache; the advice it gives,
applied, fits; a memory budget; the `memory` command and the warning of the others."""

from __future__ import annotations

import json
import os
import re
import sys

import mlx.core as mx
import pytest
from click.testing import CliRunner

from gptoss_mlx import GptOssError, cli, load_model, memory, plan_memory
from gptoss_mlx.memory import MemorySettings
from gptoss_mlx.safetensors_check import read_header
from gptoss_mlx.weights import checkpoint_from_headers, read_checkpoint

sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
)

import mac_plans  # noqa: E402
import memory_plan  # noqa: E402

TOLERANCE = 0.02


@pytest.fixture(scope="module")
def shape_folders(tmp_path_factory):
    """name -> (folder, expert cache size), written when first asked for: gpt-oss-20b's layer
    shapes in 2 layers (1.0 GB) or gpt-oss-120b's in 1 full-attention layer (1.7 GB), vocabulary
    8000."""
    written = {}

    def folder_of(name: str) -> tuple[str, int]:
        if name not in written:
            folder = str(tmp_path_factory.mktemp(f"real-{name}"))
            written[name] = folder, memory_plan.write_checkpoint(name, folder)
        return written[name]

    return folder_of


@pytest.fixture(params=["20b", "120b"])
def real_shapes(request, shape_folders):
    """(name, folder, expert cache size) for each model's shapes."""
    return request.param, *shape_folders(request.param)


@pytest.fixture
def shapes_20b(shape_folders):
    """(folder, expert cache size) at gpt-oss-20b's shapes: enough for the checks that do not
    depend on the layer shapes."""
    return shape_folders("20b")


def test_plan_equals_what_is_allocated(real_shapes):
    """Weights and KV cache within 2% of what MLX allocates (the caches' buffers exactly), and
    the peak of a generation below the plan, for all 18 combinations."""
    name, folder, slots = real_shapes
    for dense, kv, cache in memory_plan.COMBINATIONS:
        r = memory_plan.measure(folder, memory_plan.options_of(dense, kv, cache, slots))
        print(memory_plan.format_row({"model": name, **r}))
        assert abs(r["weights"] - r["plan_weights"]) <= TOLERANCE * r["plan_weights"], r
        assert r["kv_buffers"] == r["plan_kv"], r
        # what else stays allocated after a generation (a few small arrays) is within the 2%
        assert abs(r["kv"] - r["plan_kv"]) <= TOLERANCE * r["plan_kv"] + 16_384, r
        assert r["peak"] <= r["plan_peak"], r


def test_peak_resident_set_is_below_the_plan(shapes_20b):
    """A fresh process, from before loading to after generating: RSS growth below the plan's
    total (MLX's peak below its arrays' share of it)."""
    (folder, slots), name = shapes_20b, "20b"
    for dense, kv, cache in ((16, 16, None), (8, 8, "slots")):
        r = memory_plan.measure_rss(folder, memory_plan.options_of(dense, kv, cache, slots))
        print(memory_plan.format_row({"model": name, **r}))
        assert r["peak"] <= r["plan_peak"] and r["rss_growth"] <= r["plan_total"], r


def flags_to_options(flags: str) -> dict:
    """`--kv-bits 8 --expert-cache 5` -> load_model's keywords."""
    words = flags.split()
    return {words[i][2:].replace("-", "_"): int(words[i + 1]) for i in range(0, len(words), 2)}


def test_the_advice_applied_fits(shapes_20b):
    (folder, _), name = shapes_20b, "20b"
    settings = MemorySettings(max_context=memory_plan.CONTEXT, prefill_chunk=memory_plan.PROMPT)
    everything = memory.fit(read_checkpoint(folder), mx.float32, settings)
    budget = everything.total // 2
    machine = {"physical": budget, "metal": False}
    plan = memory.fit(read_checkpoint(folder), mx.float32, settings, machine=machine)
    assert not plan.fits and plan.advice
    flags = plan.advice[0].split(" (")[0]
    assert "--expert-cache" in flags
    r = memory_plan.measure(folder, flags_to_options(flags))
    print(flags, memory_plan.format_row({"model": name, **r}))
    assert r["peak"] <= r["plan_peak"] <= budget
    # a budget picks the same settings
    model = load_model(
        folder,
        "float32",
        memory_budget=budget / 1e9,
        max_context=memory_plan.CONTEXT,
        prefill_chunk=memory_plan.PROMPT,
    )
    assert model.memory_plan.fits and model.memory_plan.settings.flags(model.config) == flags


def test_bench_warns_with_the_advice(shapes_20b, monkeypatch):
    folder, _ = shapes_20b
    settings = MemorySettings(max_context=memory_plan.CONTEXT)
    plan = memory.fit(read_checkpoint(folder), mx.bfloat16, settings)
    physical = (plan.weights + plan.total) // 2  # the weights fit, the rest does not
    monkeypatch.setattr(memory, "machine_memory", lambda: {"physical": physical, "metal": False})
    args = ["bench", "-m", folder, "--prompt-tokens", "8", "--gen-tokens", "2", "--repeats", "1"]
    args += ["--no-warmup", "--max-context", str(memory_plan.CONTEXT)]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "to fit: --" in warnings[0] and "--expert-cache" in warnings[0]


def test_a_budget_nothing_fits_is_refused(experts32_dir):
    with pytest.raises(GptOssError, match="nothing fits"):
        load_model(experts32_dir, "float32", memory_budget=0.0001, max_context=64)
    with pytest.raises(GptOssError, match="--memory-budget"):
        load_model(experts32_dir, "float32", memory_budget=-1)


def test_the_plan_from_headers_alone_is_the_plan_from_the_files(experts32_dir):
    """What `gptoss-mlx memory` does for a hub repo it has not downloaded: the same figures from
    the headers (dtypes and shapes) as from the files."""
    infos = {}
    for f in os.listdir(experts32_dir):
        if f.endswith(".safetensors"):
            infos.update(read_header(os.path.join(experts32_dir, f)))
    with open(os.path.join(experts32_dir, "config.json")) as f:
        config = json.load(f)
    settings = MemorySettings(kv_bits=8, expert_cache=8, max_context=4096)
    from_headers = memory.fit(
        checkpoint_from_headers(infos, config, "repo/id"), mx.bfloat16, settings
    )
    from_files = memory.fit(read_checkpoint(experts32_dir), mx.bfloat16, settings)
    for key in ("parts", "on_disk", "kv_cache", "working_set", "total", "disk_bytes_per_token"):
        assert from_headers.to_dict()[key] == from_files.to_dict()[key], key


def test_kv_and_context_figures_follow_the_shapes(experts32_dir):
    """Per 1k tokens: full layers x 2 (keys, values) x KV heads x head dim x 2 bytes (bf16)."""
    plan = plan_memory(experts32_dir, context=1000)
    from checkpoints import EXPERTS32 as c

    full = c.layer_types.count("full_attention")
    per_token = full * 2 * c.num_key_value_heads * c.head_dim * 2
    assert plan.kv_per_1k == per_token * 1000
    assert plan.context == 1000
    assert plan.kv_cache == per_token * 1024 + (len(c.layer_types) - full) * 8 * per_token // full
    eight = plan_memory(experts32_dir, context=1000, kv_bits=8)
    assert eight.kv_per_1k == full * 2 * c.num_key_value_heads * (c.head_dim + 4) * 1000


def test_mlx_cache_limit_is_the_working_set(experts32_dir):
    model = load_model(experts32_dir, "float32", max_context=512)
    previous = mx.set_cache_limit(0)
    try:
        assert previous == model.memory_plan.working_set
    finally:
        mx.set_cache_limit(previous)


def test_memory_command(experts32_dir):
    runner = CliRunner()
    r = runner.invoke(cli.main, ["memory", "-m", experts32_dir, "--context", "2048"])
    assert r.exit_code == 0, r.output
    for part in ("experts", "attention", "embedding", "unembedding", "router", "norms"):
        assert re.search(rf"^\s+{part}\s+\d+\.\d\d GB", r.output, re.M), part
    assert "KV cache at 2048" in r.output and "fits" in r.output
    r = runner.invoke(
        cli.main, ["memory", "-m", experts32_dir, "--kv-bits", "8", "--expert-cache", "8", "--json"]
    )
    plan = json.loads(r.output)
    want = plan_memory(experts32_dir, kv_bits=8, expert_cache=8)
    assert plan["total"] == want.total and plan["settings"]["expert_cache"] == 8


def test_generate_warns_when_the_configuration_does_not_fit(o200k_dir, monkeypatch):
    """Weights that fit the machine but a plan that does not: one warning line (not an error);
    nothing fits this tiny model's plan but the weights, so it has no advice to give (the bench
    test below shows the advice)."""
    plan = plan_memory(o200k_dir, max_context=64)
    physical = plan.weights + (plan.total - plan.weights) // 4
    monkeypatch.setattr(memory, "machine_memory", lambda: {"physical": physical, "metal": False})
    r = CliRunner().invoke(
        cli.main,
        ["generate", "Hi", "-m", o200k_dir, "--max-tokens", "2", "--max-context", "64"],
    )
    assert r.exit_code == 0, r.output
    warnings = [line for line in r.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "this configuration needs" in warnings[0]


def test_an_automatic_expert_cache_is_the_largest_that_fits(experts32_dir):
    everything = plan_memory(experts32_dir, "float32", max_context=256)
    assert (
        load_model(
            experts32_dir, "float32", expert_cache="auto", max_context=256
        ).memory_plan.settings.expert_cache
        is None
    )  # all fit: no cache
    budget = everything.total - everything.parts["experts"] // 2  # room for about half of them
    model = load_model(
        experts32_dir, "float32", expert_cache="auto", max_context=256, memory_budget=budget / 1e9
    )
    slots = model.memory_plan.settings.expert_cache
    assert 4 <= slots < 32 and model.memory_plan.fits
    assert model.memory_plan.settings.kv_bits is None  # the cache alone was enough
    one_more = plan_memory(experts32_dir, "float32", max_context=256, expert_cache=slots + 1)
    assert one_more.total > budget


def section(path: str, heading: str) -> str:
    """The text of a markdown file from `heading` to the next heading of its level."""
    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), path)) as f:
        text = f.read()
    start = text.index(heading)
    level = heading.split(" ")[0] + " "
    end = text.find("\n" + level, start + len(heading))
    return text[start : end if end >= 0 else None]


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def test_the_16gb_mac_section_quotes_the_planner():
    """README's "16 GB Mac" (and bench/README's table of it) give the planner's own figures for
    gpt-oss-20b on a 16 GB Mac and -120b on a 64 GB one at 8192 tokens: the default plan, the
    advised flags in the commands, the plan with them applied (and it fits), the wired limit."""
    readme = section("README.md", "## 16 GB Mac")
    bench = section("bench/README.md", "## Memory: the plan against what is allocated")
    for name, mac in mac_plans.MODELS:
        default, flags, fitted = mac_plans.advised(name, mac, 8192)
        assert not default.fits and fitted.fits
        model = "" if name == "20b" else f"-m openai/gpt-oss-{name} "
        assert (
            f"gptoss-mlx chat {model}--max-context 8192 {flags.replace(' --max-context 8192', '')}"
            in readme
        )
        for figure in (default.total, default.weights, fitted.total, fitted.weights):
            assert gb(figure) in readme and gb(figure)[:-3] in bench, (name, figure)
        for figure in (fitted.kv_cache, fitted.working_set):
            assert gb(figure) in readme, (name, figure)
        assert f"iogpu.wired_limit_mb={default.wired_limit_mb}" in readme
        assert f"~{fitted.disk_bytes_per_token / 1e6:.0f} MB" in readme
    full, flags, fitted = mac_plans.advised("20b", "16 GB Mac", None)
    assert (
        f"`{flags}` ({gb(fitted.total)}, ~{fitted.disk_bytes_per_token / 1e6:.0f} MB/token)"
        in readme
    )
    assert gb(full.total) in readme


@pytest.mark.parametrize("recommended", [10**12, 10**6])  # more than the plan needs, less
def test_on_a_mac_the_wired_limit_is_what_the_plan_needs_within_the_recommended_set(
    experts32_dir, monkeypatch, recommended
):
    """A Mac described to the planner: the wired limit set at load is the plan's total, or
    Metal's recommended working set when that is smaller (mlx-lm wires the whole set)."""
    mac = {"physical": 2 * 10**12, "metal": True, "recommended": recommended, "wired_limit_mb": 0}
    monkeypatch.setattr(memory, "machine_memory", lambda: mac)
    wired = []
    monkeypatch.setattr(mx, "set_wired_limit", lambda n: wired.append(n) or 0)
    model = load_model(experts32_dir, "float32", max_context=256)
    assert wired == [
        recommended if recommended < model.memory_plan.total else model.memory_plan.total
    ]


def test_serve_loads_with_the_memory_options(o200k_experts_dir, monkeypatch):
    """`serve` takes the same memory flags as generate, chat and bench (their README examples
    run them) and serves the model they load."""
    served = []
    monkeypatch.setattr(cli, "create_app", lambda model, tok, **kw: served.append(model))
    monkeypatch.setattr(cli, "serve", lambda app, host, port: None)
    args = ["serve", "-m", o200k_experts_dir, "--dense-bits", "16", "--kv-bits", "8"]
    args += ["--expert-cache", "8", "--max-context", "512", "--resident-embedding"]
    r = CliRunner().invoke(cli.main, args)
    assert r.exit_code == 0, r.output
    settings = served[0].memory_plan.settings
    assert (settings.dense_bits, settings.kv_bits, settings.expert_cache) == (16, 8, 8)
    assert (settings.max_context, settings.embedding_from_disk) == (512, False)
