"""`gptoss-mlx bench`: prompt and decode speed, memory, bytes per token, and kernel launches.

Every figure is measured on this machine with the engine's real generator (`stream_generate`,
greedy, no tokenizer) on random prompt tokens; nothing is estimated except the bandwidth ceiling,
which is `bandwidth / weight bytes read per decoded token` and is labelled as such.

With `compare="mlx-lm"` the same weights (the same arrays in memory, in the published layout, the
dense layers quantized as ours are) run through mlx-lm's gpt-oss model and `generate_step` in this
process, alternating runs, and the table shows ours / theirs.

The memory settings are `load`'s (`dense_bits`, `kv_bits`, `expert_cache`, ...; 8-bit dense
weights by default) and the report names them. Synthetic weights live in memory, so their
embedding stays resident; with an expert cache they are first written to a temporary checkpoint,
which the cache reads from.

With a distributed `group` (one rank of several, see `gptoss_mlx.distributed`) every rank runs the
same measurements on its shard; the result adds what each rank holds and the collectives one
decoded token costs, counted in the graph it evaluates.

`bench_kernels` (`gptoss-mlx bench --kernels`) measures each custom kernel against the mlx ops it
replaces at the model's shapes and prints the times and the decision (`kernels.measured`).
"""

from __future__ import annotations

import collections
import importlib
import os
import shutil
import statistics
import tempfile
import time
import weakref
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import ModuleType

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import kernels, memory
from .config import ModelConfig, preset
from .distributed import Group, leader_token
from .errors import GptOssError
from .generate import stream_generate
from .hub import resolve_model_path
from .loading import build_model, load_model, parse_dtype
from .memory import MemorySettings
from .model import GptOssModel
from .progress import progress_bar
from .quantize import quantize_dense, quantized_layers
from .synthetic import hf_config_json, random_checkpoint, save_checkpoint
from .weights import checkpoint_from_tensors, find_weights_folder, read_checkpoint

# A CPU-sized proxy of gpt-oss: real head geometry (64-dim heads, 8 query heads per KV
# head, window 128) at reduced width, depth and vocabulary.
TINY = ModelConfig(
    num_hidden_layers=4,
    num_experts=8,
    vocab_size=8000,
    hidden_size=512,
    intermediate_size=512,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=64,
    sliding_window=128,
)
SYNTHETIC = {"20b": preset("20b"), "120b": preset("120b"), "tiny": TINY}

# Unified-memory bandwidth in GB/s of Apple's chips (Apple's published figures).
CHIP_BANDWIDTH = {
    "m1": 68.25,
    "m1 pro": 200,
    "m1 max": 400,
    "m1 ultra": 800,
    "m2": 100,
    "m2 pro": 200,
    "m2 max": 400,
    "m2 ultra": 800,
    "m3": 100,
    "m3 pro": 150,
    "m3 max": 400,
    "m3 ultra": 819,
    "m4": 120,
    "m4 pro": 273,
    "m4 max": 546,
}


@dataclass
class RunResult:
    engine: str
    prompt_tokens: int
    gen_tokens: int
    prompt_tps: float
    decode_tps: float
    ttft_s: float
    peak_memory_bytes: int
    disk_bytes_per_token: float = 0.0  # read by an expert cache, per decoded token
    expert_hit_rate: float | None = None  # decode, with an expert cache


@dataclass
class Setting:
    prompt_tokens: int
    runs: dict[str, list[RunResult]] = field(default_factory=dict)

    def median(self, engine: str, key: str) -> float:
        return statistics.median(getattr(r, key) for r in self.runs[engine])


def chip_bandwidth(chip: str | None) -> float | None:
    """GB/s for a chip name ("M4 Max"), or for this Mac's chip when `chip` is None."""
    name = chip
    if name is None:
        if not mx.metal.is_available():
            return None
        name = str(mx.device_info().get("device_name", ""))
    key = name.lower().replace("apple", "").strip()
    if key in CHIP_BANDWIDTH:
        return CHIP_BANDWIDTH[key]
    if chip is not None:
        raise GptOssError(
            f"unknown chip {chip!r}: give --bandwidth GB/s, or one of "
            + ", ".join(
                k.upper() if " " not in k else k.split()[0].upper() + " " + k.split()[1].title()
                for k in CHIP_BANDWIDTH
            )
        )
    return None


def weight_bytes_per_token(model: GptOssModel) -> int:
    """Weight bytes one decoded token reads: all dense layers, k experts per layer (of E resident,
    or of an expert cache's slots), the whole unembedding and one embedding row (from memory or
    from disk). KV-cache reads come on top and grow with the context.

    On one rank of several, k of its own experts per layer: the pairs routed to other ranks run
    a local stand-in (see `distributed.ExpertShard.localize`), so each rank reads what one
    process would, less where a stand-in repeats an expert the token reads anyway.
    """
    c = model.config
    total = getattr(model.embed_tokens, "row_bytes", 0)  # an embedding read from disk
    for name, array in tree_flatten(model.parameters()):
        if ".mlp.experts." in name:  # [experts held (or slots), ...]
            total += array.nbytes // array.shape[0] * min(c.experts_per_token, array.shape[0])
        elif name.startswith("embed_tokens."):
            total += array.nbytes // c.vocab_size
        else:
            total += array.nbytes
    return total


# MLX primitives that never launch a kernel on a Metal GPU: evaluating one only points its output
# at the input's buffer with a new shape, strides or offset (NumberOfElements writes one scalar on
# the host). Read from MLX 0.32's mlx/backend/gpu/primitives.cpp and mlx/backend/common/common.cpp.
VIEWS = frozenset(
    {
        "AsStrided",
        "Broadcast",
        "BroadcastAxes",
        "Copy",
        "CustomTransforms",
        "Depends",
        "ExpandDims",
        "NumberOfElements",
        "Slice",
        "Split",
        "Squeeze",
        "StopGradient",
        "Transpose",
    }
)
# Primitives that are a view when the input's strides allow one and one copy kernel otherwise
# (which of the two only the evaluated input's layout tells).
RESHAPES = frozenset({"Contiguous", "Flatten", "Reshape", "Unflatten", "View"})


def count_primitives(outputs: mx.array | Sequence[mx.array]) -> collections.Counter:
    """The MLX primitives in the graph that computes `outputs` (not yet evaluated), by name."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "graph.dot")
        mx.export_to_dot(path, outputs)
        with open(path) as f:
            return collections.Counter(
                line.split('label ="', 1)[1].split('"', 1)[0]
                for line in f
                if "shape=rectangle" in line
            )


def launch_summary(counts: collections.Counter) -> dict:
    """Primitive counts split by what they cost on a Metal GPU.

    `launching`: primitives that launch at least one kernel (a few launch more than one, e.g.
    Concatenate one copy per input); `reshapes`: a view, or one copy kernel when the input's
    layout needs it; `views`: never a kernel. Names not in VIEWS or RESHAPES count as launching.
    """
    views = sum(n for p, n in counts.items() if p in VIEWS)
    reshapes = sum(n for p, n in counts.items() if p in RESHAPES)
    return {
        "launching": sum(counts.values()) - views - reshapes,
        "reshapes": reshapes,
        "views": views,
        "total": sum(counts.values()),
        "by_primitive": dict(counts.most_common()),
    }


def decode_step_primitives(
    model: nn.Module, make_cache: Callable[[], list], prompt_tokens: int = 16
) -> collections.Counter:
    """Primitives in one decode step (after a short prefill) of any MLX model with a cache."""
    cache = make_cache()
    mx.eval(model(mx.array([[1] * prompt_tokens]), cache=cache))
    return count_primitives(model(mx.array([[2]]), cache=cache))


class _Ours:
    name = "gptoss-mlx"

    def __init__(self, model: GptOssModel):
        self.model = model

    def run(self, prompt: list[int], gen_tokens: int) -> RunResult:
        for event in stream_generate(
            self.model, prompt, max_tokens=gen_tokens, temperature=0.0, stop_tokens=()
        ):
            stats = event.stats
        result = RunResult(
            self.name,
            len(prompt),
            stats.generation_tokens,
            stats.prompt_tps,
            stats.generation_tps,
            stats.time_to_first_token,
            stats.peak_memory,
        )
        if stats.expert_cache is not None:
            decode = stats.expert_cache["decode"]
            steps = max(stats.generation_tokens - 1, 1)  # tokens fed through the decode step
            result.disk_bytes_per_token = decode["bytes_read"] / steps
            result.expert_hit_rate = decode["hits"] / max(decode["hits"] + decode["misses"], 1)
        return result

    def primitives(self) -> collections.Counter:
        return decode_step_primitives(self.model, self.model.make_cache)


class _MlxLm:
    """mlx-lm's gpt-oss, driven by its own `generate_step`."""

    name = "mlx-lm"

    def __init__(self, model: nn.Module):
        self.model = model
        self._generate_step = _import_mlx_lm("mlx_lm.generate").generate_step
        self._make_prompt_cache = _import_mlx_lm("mlx_lm.models.cache").make_prompt_cache

    @classmethod
    def from_tensors(
        cls, tensors: dict, config_json: dict, dtype: mx.Dtype, dense_bits: int
    ) -> _MlxLm:
        """The same published-layout tensors, loaded as mlx-lm loads a checkpoint, the dense
        layers quantized as ours are (`quantize.quantize_dense`: the same MLX quantization)."""
        gpt_oss = _import_mlx_lm("mlx_lm.models.gpt_oss")
        model = gpt_oss.Model(gpt_oss.ModelArgs.from_dict(config_json))
        weights = model.sanitize(dict(tensors))
        nn.quantize(
            model,
            group_size=32,
            bits=4,
            mode="mxfp4",
            class_predicate=lambda path, _: f"{path}.scales" in weights,
        )
        weights = {
            k: (v.astype(dtype) if mx.issubdtype(v.dtype, mx.floating) else v)
            for k, v in weights.items()
        }
        model.load_weights(list(weights.items()))
        quantize_dense(model, dense_bits)
        mx.eval(model.parameters())
        return cls(model)

    @classmethod
    def from_folder(cls, folder: str, dense_bits: int) -> _MlxLm:
        model, _ = _import_mlx_lm("mlx_lm.utils").load_model(Path(folder))
        if not quantized_layers(model):  # dense weights stored unquantized: quantize as ours
            quantize_dense(model, dense_bits)
            mx.eval(model.parameters())
        return cls(model)

    def run(self, prompt: list[int], gen_tokens: int) -> RunResult:
        mx.reset_peak_memory()
        tic = time.perf_counter()
        n, t_first, t_last = 0, tic, tic
        steps = self._generate_step(
            mx.array(prompt),
            self.model,
            max_tokens=gen_tokens,
            sampler=lambda logits: mx.argmax(logits, axis=-1),
            prompt_cache=self._make_prompt_cache(self.model),
        )
        for token, _ in steps:
            int(token)
            n += 1
            t_last = time.perf_counter()
            if n == 1:
                t_first = t_last
        ttft = t_first - tic
        decode = (n - 1) / (t_last - t_first) if n > 1 else 0.0
        return RunResult(
            self.name, len(prompt), n, len(prompt) / ttft, decode, ttft, int(mx.get_peak_memory())
        )

    def primitives(self) -> collections.Counter:
        return decode_step_primitives(self.model, lambda: self._make_prompt_cache(self.model))


def _import_mlx_lm(module: str) -> ModuleType:
    """A module of mlx-lm, an optional dependency imported only when comparing against it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise GptOssError("--compare mlx-lm needs mlx-lm installed: pip install mlx-lm") from None


def _synthetic(
    name: str,
    seed: int,
    dtype: mx.Dtype,
    settings: MemorySettings,
    budget: int | None,
    folder: str,
    group: Group | None = None,
) -> tuple[GptOssModel, dict | None, dict]:
    """The model of random weights `name` fitted by `settings`, its tensors (None across ranks:
    each rank draws and keeps only its share, layer by layer) and its config.json. The weights are
    written to `folder` first when an expert cache must read them from a file."""
    if name not in SYNTHETIC:
        raise GptOssError(f"--synthetic must be one of {', '.join(SYNTHETIC)}, not {name!r}")
    config = SYNTHETIC[name]
    config_json = hf_config_json(config)
    tensors = None
    if group is not None and group.size() > 1:
        ckpt = checkpoint_from_tensors(
            random_checkpoint(config, seed=seed), config_json, group=group
        )
    else:
        tensors = random_checkpoint(config, seed=seed)
        mx.eval(tensors)
        if settings.expert_cache is not None:
            save_checkpoint(folder, tensors, config_json)
            ckpt = read_checkpoint(folder)
        else:
            ckpt = checkpoint_from_tensors(tensors, config_json)
    plan = memory.fit(ckpt, dtype, settings, budget, f"synthetic-{name}")
    model = build_model(ckpt, dtype, settings=plan.settings)
    model.memory_plan = plan
    return model, tensors, config_json


class Benchmark:
    """The engines to measure (ours, and mlx-lm when comparing) on one set of weights."""

    def __init__(
        self,
        *,
        model_path: str | None = None,
        synthetic: str | None = None,
        compare: str | None = None,
        dtype: str | None = None,
        seed: int = 0,
        progress: bool = False,
        bandwidth: float | None = None,
        chip: str | None = None,
        dense_bits: int | None = None,
        kv_bits: int | None = None,
        expert_cache: int | str | None = None,
        embedding_from_disk: bool = True,
        max_context: int | None = None,
        memory_budget: float | None = None,
        group: Group | None = None,
    ):
        """`bandwidth`: GB/s for the decode ceiling, else that of `chip` ("M4 Max"), else that
        of this Mac's chip when known. The memory keywords are `load_model`'s. `group`: the ranks
        to shard the model over."""
        if (model_path is None) == (synthetic is None):
            raise GptOssError("give exactly one of --model PATH|REPO or --synthetic 20b|120b|tiny")
        if compare not in (None, "mlx-lm"):
            raise GptOssError(f"--compare supports only mlx-lm, not {compare!r}")
        if compare and group is not None and group.size() > 1:
            raise GptOssError("--compare runs in one process: not across ranks")
        if compare:
            _import_mlx_lm("mlx_lm")
        self.bandwidth = bandwidth or chip_bandwidth(chip)  # an unknown chip fails here, first
        dtype = parse_dtype(dtype)  # the compute dtype of every engine (default bfloat16)
        self.dtype = dtype
        self.label = model_path or f"synthetic-{synthetic}"
        self.seed = seed
        self.progress = progress
        memory_options = dict(
            dense_bits=dense_bits,
            kv_bits=kv_bits,
            expert_cache=expert_cache,
            embedding_from_disk=embedding_from_disk,
            max_context=max_context,
        )
        if synthetic is not None:
            budget = None if memory_budget is None else memory.parse_budget(memory_budget)
            scratch = tempfile.mkdtemp(prefix="gptoss-bench-")  # removed with the benchmark
            weakref.finalize(self, shutil.rmtree, scratch, ignore_errors=True)
            model, tensors, config_json = _synthetic(
                synthetic, seed, dtype, MemorySettings(**memory_options), budget, scratch, group
            )
            dense_bits = model.memory_plan.settings.dense_bits
            theirs = (
                _MlxLm.from_tensors(tensors, config_json, dtype, dense_bits) if compare else None
            )
        else:
            folder = find_weights_folder(resolve_model_path(model_path, progress=progress))
            model = load_model(
                folder,
                dtype=dtype,
                progress=progress,
                memory_budget=memory_budget,
                group=group,
                **memory_options,
            )
            dense_bits = model.memory_plan.settings.dense_bits
            theirs = _MlxLm.from_folder(folder, dense_bits) if compare else None
        self.model = model
        self.engines = [_Ours(model)] + ([theirs] if theirs else [])

    def run(
        self,
        prompt_tokens: Sequence[int] = (512,),
        gen_tokens: int = 128,
        repeats: int = 3,
        warmup: bool = True,
        *,
        ops: bool = False,
    ) -> dict:
        """Each prompt length `repeats` times per engine, alternating which runs first; medians.

        With a bandwidth, the result has the bandwidth-bound decode ceiling; `ops` adds the
        primitives of one decode step per engine.
        """
        if gen_tokens < 2 or repeats < 1 or not prompt_tokens or any(p < 1 for p in prompt_tokens):
            raise GptOssError("--gen-tokens must be >= 2, --repeats >= 1 and prompt lengths >= 1")
        vocab = self.model.config.vocab_size
        key = mx.random.key(self.seed)
        settings = [Setting(p) for p in prompt_tokens]
        total = len(settings) * repeats * len(self.engines) + (len(self.engines) if warmup else 0)
        with progress_bar(total, "Benchmarking", self.progress) as bar:
            if warmup:
                for engine in self.engines:
                    engine.run(_prompt(key, vocab, min(64, min(prompt_tokens))), 4)
                    bar.update(1)
            for setting in settings:
                prompt = _prompt(key, vocab, setting.prompt_tokens)
                for r in range(repeats):
                    order = self.engines if r % 2 == 0 else self.engines[::-1]
                    for engine in order:
                        setting.runs.setdefault(engine.name, []).append(
                            engine.run(prompt, gen_tokens)
                        )
                        bar.update(1)
        names = [e.name for e in self.engines]
        bandwidth = self.bandwidth
        per_token = weight_bytes_per_token(self.model)
        result = {
            "model": self.label,
            "config": self.model.config.to_hf(),
            "device": str(mx.default_device()),
            "dtype": str(self.dtype),
            "precision": self.model.describe(),
            "memory_plan": self.model.memory_plan.to_dict(),
            "device_info": {k: str(v) for k, v in mx.device_info().items()},
            "weight_bytes_per_token": per_token,
            "bandwidth_gbs": bandwidth,
            "gen_tokens": gen_tokens,
            "repeats": repeats,
            "engines": names,
            "settings": [
                {
                    "prompt_tokens": s.prompt_tokens,
                    "median": {
                        n: {
                            k: s.median(n, k)
                            for k in (
                                "prompt_tps",
                                "decode_tps",
                                "ttft_s",
                                "peak_memory_bytes",
                                "disk_bytes_per_token",
                            )
                        }
                        for n in names
                    },
                    "runs": [asdict(r) for n in names for r in s.runs[n]],
                }
                for s in settings
            ],
        }
        if bandwidth:
            result["decode_ceiling_tps"] = bandwidth * 1e9 / per_token
        if ops:
            result["primitives_per_decode_step"] = self.primitives()
        if self.model.group is not None:
            result["ranks"] = rank_summary(self.model)
        return result

    def primitives(self) -> dict:
        """Per engine, the primitives one decode step evaluates (see `launch_summary`)."""
        return {engine.name: launch_summary(engine.primitives()) for engine in self.engines}


def rank_summary(model: GptOssModel) -> dict:
    """For a model sharded over ranks: the experts and weight bytes each rank holds, and the
    collectives of one decoded token (the model's, counted in a decode step's graph, and the one
    sharing rank 0's token). Every rank must call it."""
    group = model.group
    mine = mx.array(
        [model.shard.count, sum(a.nbytes for _, a in tree_flatten(model.parameters()))],
        dtype=mx.int64,
    )
    every = mx.distributed.all_gather(mine, group=group, stream=mx.cpu).reshape(-1, 2).tolist()
    step = decode_step_primitives(model, model.make_cache)
    token = count_primitives(leader_token(mx.array([0], dtype=mx.uint32), group))
    collectives = sum(n for c in (step, token) for p, n in c.items() if "AllReduce" in p)
    return {
        "size": group.size(),
        "experts_per_rank": [e for e, _ in every],
        "weight_bytes_per_rank": [b for _, b in every],
        "collectives_per_token": collectives,
    }


def kernel_shapes(config: ModelConfig) -> kernels.Shapes:
    """The shapes the kernels run at for a model of `config`."""
    return kernels.Shapes(
        hidden=config.hidden_size,
        intermediate=config.intermediate_size,
        experts_per_token=config.experts_per_token,
        heads=config.num_attention_heads,
        kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim,
        window=config.sliding_window,
    )


def bench_kernels(
    model_path: str | None = None, synthetic: str | None = None, progress: bool = False
) -> str:
    """Measure every kernel against its mlx path at the shapes of `model_path`'s config (only the
    config is read) or of a synthetic preset, afresh, and report times and decisions (the
    decisions are saved for later runs). Without a Metal GPU (and no $GPTOSS_MLX_KERNELS=emulate)
    there is nothing to measure: say so."""
    if (model_path is None) == (synthetic is None):
        raise GptOssError("give exactly one of --model PATH|REPO or --synthetic 20b|120b|tiny")
    if synthetic is not None:
        if synthetic not in SYNTHETIC:
            raise GptOssError(
                f"--synthetic must be one of {', '.join(SYNTHETIC)}, not {synthetic!r}"
            )
        config = SYNTHETIC[synthetic]
    else:
        folder = find_weights_folder(resolve_model_path(model_path, progress=progress))
        config = read_checkpoint(folder).config
    backend = kernels.resolve(None)
    if backend == "mlx":
        return (
            "No Metal GPU here (or $GPTOSS_MLX_KERNELS=mlx): every op runs the mlx path, no kernel "
            "to measure. On a Mac this prints each kernel's time against its mlx path and the "
            "decision; $GPTOSS_MLX_KERNELS=emulate runs the kernels through the CPU emulator "
            "(correctness, not speed)."
        )
    measure = kernels.policy(None) == "measure" or backend == "emulate"
    decisions = kernels.decide(backend, kernel_shapes(config), measure=measure, fresh=True)
    return kernels.format_decisions(decisions, backend, measured=measure)


def _prompt(key: mx.array, vocab: int, length: int) -> list[int]:
    return mx.random.randint(0, vocab, (length,), key=key).tolist()


def format_report(result: dict) -> str:
    """`Benchmark.run`'s result for people: the table, the primitive counts when measured, and a
    note when the figures come from MLX's CPU backend."""
    parts = [format_table(result)]
    if "ranks" in result:
        r = result["ranks"]
        parts.append(
            f"ranks: {r['size']} | experts per rank: {', '.join(map(str, r['experts_per_rank']))}"
            " | weights per rank: "
            + ", ".join(f"{b / 1e9:.3f} GB" for b in r["weight_bytes_per_rank"])
            + f" | collectives per decoded token: {r['collectives_per_token']}"
        )
    if "primitives_per_decode_step" in result:
        parts.append(format_ops(result))
    if "gpu" not in result["device"]:
        parts.append(
            "note: no Metal GPU here; these are CPU figures (MLX's CPU backend), a proxy for "
            "graph-level efficiency, not Apple Silicon speed."
        )
    return "\n\n".join(parts)


def format_table(result: dict) -> str:
    """The medians as a table for people; with a bandwidth, the decode ceiling and its fraction."""
    per_token = result["weight_bytes_per_token"]
    bandwidth_gbs = result["bandwidth_gbs"]
    ceiling = result.get("decode_ceiling_tps")
    streams = bool(result["memory_plan"]["settings"]["expert_cache"])
    lines = [
        f"model: {result['model']}   device: {result['device']} "
        f"({result['device_info'].get('device_name', '?')})   generated tokens: "
        f"{result['gen_tokens']}   repeats: {result['repeats']} (medians)",
        f"weights: {result['precision']}",
        f"weights read per decoded token: {per_token / 1e9:.3f} GB"
        + (
            f"   bandwidth {bandwidth_gbs:g} GB/s -> decode ceiling {ceiling:.1f} tok/s"
            if ceiling
            else ""
        ),
    ]
    header = (
        f"{'engine':<11} {'prompt':>7} {'prompt tok/s':>13} {'decode tok/s':>13} "
        f"{'TTFT s':>8} {'peak GB':>8}"
    )
    if ceiling:
        header += f" {'of ceiling':>10}"
    if streams:
        header += f" {'disk MB/token':>13}"
    lines += ["", header]
    engines = result["engines"]
    for s in result["settings"]:
        for name in engines:
            m = s["median"][name]
            row = (
                f"{name:<11} {s['prompt_tokens']:>7} {m['prompt_tps']:>13.1f} "
                f"{m['decode_tps']:>13.2f} {m['ttft_s']:>8.3f} {m['peak_memory_bytes'] / 1e9:>8.3f}"
            )
            if ceiling:
                row += f" {m['decode_tps'] / ceiling:>10.1%}"
            if streams:
                row += f" {m['disk_bytes_per_token'] / 1e6:>13.1f}"
            lines.append(row)
        if len(engines) == 2:
            ours, theirs = (s["median"][n] for n in engines)
            lines.append(
                f"{'ratio':<11} {s['prompt_tokens']:>7} "
                f"{ours['prompt_tps'] / theirs['prompt_tps']:>12.2f}x "
                f"{ours['decode_tps'] / theirs['decode_tps']:>12.2f}x"
            )
    return "\n".join(lines)


def format_ops(result: dict) -> str:
    """The primitive counts of `Benchmark.primitives` (in `result["primitives_per_decode_step"]`)
    as a table for people."""
    counts = result["primitives_per_decode_step"]
    lines = [
        "MLX primitives per decode step. launching: at least one kernel launch on a Metal GPU;",
        "reshapes: a view, or one copy kernel where the input's layout needs it; views: no kernel.",
    ]
    if "gpu" not in result["device"]:
        lines.append(
            f"Graphs built on {result['device']}: MLX's fast RMSNorm, RoPE and attention appear\n"
            "decomposed into several primitives there (in both engines); on a Mac each is one."
        )
    lines += ["", f"{'engine':<11} {'launching':>9} {'reshapes':>8} {'views':>6} {'total':>6}"]
    for name, c in counts.items():
        top = [(p, n) for p, n in c["by_primitive"].items() if p not in VIEWS | RESHAPES][:6]
        lines.append(
            f"{name:<11} {c['launching']:>9} {c['reshapes']:>8} {c['views']:>6} {c['total']:>6}   "
            + ", ".join(f"{p} {n}" for p, n in top)
        )
    if len(counts) == 2:
        ours, theirs = counts.values()
        ratio = {k: ours[k] / theirs[k] for k in ("launching", "reshapes", "views", "total")}
        lines.append(
            f"{'ratio':<11} {ratio['launching']:>8.2f}x {ratio['reshapes']:>7.2f}x "
            f"{ratio['views']:>5.2f}x {ratio['total']:>5.2f}x"
        )
    return "\n".join(lines)
