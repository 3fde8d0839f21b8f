"""The memory plan: what a model will hold, worked out from its checkpoint's headers before
anything is loaded, whether that fits this machine, and what makes it fit.

    weights       by part (experts, attention, embedding, unembedding, router, norms), at the
                  dtype, dense bits and expert cache the model will have: the bytes of each tensor
                  as loading will hold it, from its stored shape and dtype
    KV cache      per 1k tokens, and at the planned context (the caches' own buffers, built
                  lazily: full layers grow 256 positions at a time, sliding layers hold a ring)
    working set   one prefill chunk's activations in one layer, an upper bound (see
                  `working_set`)
    runtime       what the process adds besides MLX's arrays while it runs the model (the
                  interpreter's objects, compiled kernels): RUNTIME_BYTES
    budget        `--memory-budget`, else on a Mac Metal's recommended working set (what the GPU
                  may keep wired), else the physical memory

`fit` applies what the user asked for and, when a budget is given, picks the settings left open
so that the plan fits; a plan that does not fit carries its advice: the first of a ladder of
settings (KV at 8 bits, a shorter context, an expert cache, KV at 4 bits, shorter still, 4-bit
dense weights) that fits, and on a Mac the `sysctl iogpu.wired_limit_mb` value that would let the
configuration as it is fit instead.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
from dataclasses import dataclass, field

import mlx.core as mx

from .cache import check_kv_bits, make_cache
from .config import FULL, ModelConfig
from .disk import DiskTensor
from .distributed import ExpertShard
from .errors import GptOssError
from .model import GptOssModel
from .quantize import (
    DEFAULT_DENSE_BITS,
    quantizable,
    quantized_bytes,
    resolve_dense_bits,
    stored_quantization,
)
from .weights import Checkpoint

DEFAULT_PREFILL_CHUNK = 512  # tokens per prefill chunk (generate.stream_generate's default)
PARTS = ("experts", "attention", "embedding", "unembedding", "router", "norms")
GB = 1e9
MIB = 2**20
OS_RESERVE = 4 * 2**30  # memory a Mac keeps for macOS and apps when the GPU wires the rest
CONTEXT_LADDER = (32768, 16384, 8192, 4096)
# Memory the process adds besides MLX's arrays while loading and generating (model objects, the
# decode step's compiled kernels): 10-30 MB measured on Linux; a Mac's Metal kernels are loaded
# from a shared library. An allowance, not a measurement of this machine.
RUNTIME_BYTES = 64 * MIB


@dataclass(frozen=True)
class MemorySettings:
    """How a model is fitted to memory; None means "not chosen" (the defaults below apply, and a
    memory budget may choose).

    dense_bits: attention projections, embedding and unembedding at 8 or 4 bits (MLX affine,
        group 64) or 16 (as published); default 8 for unquantized checkpoints, as stored otherwise.
    kv_bits: keys and values stored at 8 or 4 bits (16: the compute dtype, the default).
    expert_cache: at most this many experts per layer resident, the rest read from disk when
        picked; "auto": as many as fit; default all resident.
    embedding_from_disk: the input embedding read from the checkpoint file, a row per token.
    max_context: the most positions (prompt and reply) a generation may use; default the
        model's context.
    prefill_chunk: tokens per prefill chunk, which sizes the working set.
    """

    dense_bits: int | None = None
    kv_bits: int | None = None
    expert_cache: int | str | None = None
    embedding_from_disk: bool = True
    max_context: int | None = None
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK

    def flags(self, config: ModelConfig) -> str:
        """The command-line flags that give these settings (those that differ from defaults)."""
        out = []
        if self.dense_bits not in (None, DEFAULT_DENSE_BITS):
            out.append(f"--dense-bits {self.dense_bits}")
        if self.kv_bits not in (None, 16):
            out.append(f"--kv-bits {self.kv_bits}")
        if self.max_context is not None and self.max_context < config.max_position_embeddings:
            out.append(f"--max-context {self.max_context}")
        if self.expert_cache is not None:  # resolved: None when every expert is resident
            out.append(f"--expert-cache {self.expert_cache}")
        return " ".join(out)


@dataclass
class MemoryPlan:
    """What a model will occupy (bytes) and whether it fits `budget`."""

    model: str
    layout: str
    config: ModelConfig
    dtype: mx.Dtype
    settings: MemorySettings  # resolved: dense_bits an int, expert_cache an int or None
    context: int
    parts: dict[str, int]  # resident weights by part
    on_disk: dict[str, int]  # served from the checkpoint file instead (embedding, experts)
    load_peak: int  # while loading (`WeightFigures`)
    kv_cache: int  # at `context`
    kv_per_1k: int  # full-attention layers' bytes per 1000 positions
    working_set: int
    budget: int
    budget_source: str
    machine: dict[str, int | str]
    experts: int = 0  # per layer in this process: all E, or a rank's share
    disk_bytes_per_token: int = 0  # expected with an expert cache (uniform routing) + embedding
    advice: list[str] = field(default_factory=list)

    @property
    def weights(self) -> int:
        return sum(self.parts.values())

    @property
    def total(self) -> int:
        """The peak: running (weights, KV cache, working set) or loading, whichever is larger,
        plus the runtime."""
        running = self.weights + self.kv_cache + self.working_set
        return max(running, self.load_peak) + RUNTIME_BYTES

    @property
    def fits(self) -> bool:
        return self.total <= self.budget

    @property
    def wired_limit_mb(self) -> int:
        """The `iogpu.wired_limit_mb` this plan needs on a Mac (rounded up to 256 MiB)."""
        return -(-self.total // (256 * MIB)) * 256

    def warning(self) -> str:
        """One line: what does not fit and what makes it fit."""
        line = (
            f"warning: this configuration needs {self.total / GB:.1f} GB but "
            f"{self.budget_source} is {self.budget / GB:.1f} GB"
        )
        if self.advice:
            line += "; to fit: " + " or ".join(self.advice)
        return line + " (details: gptoss-mlx memory)"

    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "layout": self.layout,
            "dtype": str(self.dtype),
            "settings": dataclasses.asdict(self.settings),
            "context": self.context,
            "parts": self.parts,
            "on_disk": self.on_disk,
            "weights": self.weights,
            "load_peak": self.load_peak,
            "kv_cache": self.kv_cache,
            "kv_per_1k_tokens": self.kv_per_1k,
            "working_set": self.working_set,
            "runtime": RUNTIME_BYTES,
            "total": self.total,
            "budget": self.budget,
            "budget_source": self.budget_source,
            "machine": self.machine,
            "fits": self.fits,
            "disk_bytes_per_token": self.disk_bytes_per_token,
            "advice": self.advice,
        }
        return json.loads(json.dumps(out, default=str))

    def report(self) -> str:
        """The plan for people."""
        s, c = self.settings, self.config
        dense = "bf16 as stored" if s.dense_bits == 16 else f"{s.dense_bits}-bit affine (group 64)"
        kv = "unquantized" if s.kv_bits in (None, 16) else f"{s.kv_bits}-bit"
        experts = (
            f"{s.expert_cache} of {self.experts} per layer resident, the rest read from disk"
            if s.expert_cache
            else f"all {self.experts} per layer resident"
        )
        lines = [
            f"{self.model} ({self.layout} layout, {c.num_hidden_layers} layers, "
            f"{c.num_experts} experts): compute {str(self.dtype).split('.')[-1]}, dense "
            f"weights {dense}, KV {kv}, context {self.context}, prefill chunk "
            f"{s.prefill_chunk}",
            "",
        ]

        def row(name: str, value: int, note: str = "") -> str:
            return f"  {name:<24} {value / GB:8.2f} GB" + (f"   {note}" if note else "")

        notes = {
            "experts": f"MXFP4; {experts}",
            "attention": dense,
            "embedding": "from disk, a row per token" if "embedding" in self.on_disk else dense,
            "unembedding": dense,
        }
        for part in PARTS:
            lines.append(row(part, self.parts.get(part, 0), notes.get(part, "")))
        lines.append(row("weights", self.weights))
        for part, size in self.on_disk.items():
            lines.append(row(f"  ({part} on disk)", size))
        lines.append(
            row(
                f"KV cache at {self.context}",
                self.kv_cache,
                f"{self.kv_per_1k / 1e6:.1f} MB per 1k tokens",
            )
        )
        lines.append(row("prefill working set", self.working_set, "one chunk, one layer"))
        lines.append(row("runtime", RUNTIME_BYTES, "interpreter and kernels (an allowance)"))
        if self.load_peak > self.weights + self.kv_cache + self.working_set:
            lines.append(row("peak while loading", self.load_peak, "above the running total"))
        lines.append(row("total", self.total))
        if self.disk_bytes_per_token:
            lines.append(
                f"  disk reads ~{self.disk_bytes_per_token / 1e6:.3g} MB per decoded token "
                "(the embedding row; expert misses under uniformly random routing, the worst case)"
            )
        lines.append("")
        lines.append(_machine_line(self.machine))
        verdict = "fits" if self.fits else "does NOT fit"
        lines.append(
            f"{verdict}: {self.total / GB:.2f} GB against {self.budget_source} "
            f"{self.budget / GB:.2f} GB"
        )
        if self.machine.get("metal"):
            lines.append(
                "wired limit this plan needs: "
                f"sudo sysctl iogpu.wired_limit_mb={self.wired_limit_mb}"
            )
        for advice in self.advice:
            lines.append(f"to fit: {advice}")
        return "\n".join(lines)


def _machine_line(machine: dict) -> str:
    line = f"this machine: {machine['physical'] / GB:.1f} GB memory"
    if machine.get("metal"):
        line += (
            f"; Metal's recommended working set {machine['recommended'] / GB:.2f} GB; "
            f"wired limit (iogpu.wired_limit_mb) {machine.get('wired_limit_mb') or 'default'}"
        )
    return line


# --- the machine --------------------------------------------------------------------------------


def machine_memory() -> dict[str, int | str]:
    """This machine's physical memory and, on a Mac, Metal's recommended working set and the
    system's GPU wired limit (`iogpu.wired_limit_mb`, 0 when left at its default)."""
    info: dict[str, int | str] = {
        "physical": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        "metal": mx.metal.is_available(),
    }
    if info["metal"]:
        info["recommended"] = int(mx.device_info()["max_recommended_working_set_size"])
        info["wired_limit_mb"] = _sysctl_int("iogpu.wired_limit_mb")
    return info


def _sysctl_int(name: str) -> int:
    if platform.system() != "Darwin":
        return 0
    try:
        out = subprocess.run(["sysctl", "-n", name], capture_output=True, text=True, timeout=5)
        return int(out.stdout.strip() or 0)
    except (OSError, ValueError, subprocess.SubprocessError):
        return 0


def parse_budget(gb: float | str) -> int:
    """A memory budget in GB (as `--memory-budget` takes it) -> bytes."""
    try:
        value = float(gb)
    except (TypeError, ValueError):
        value = float("nan")
    if not value > 0 or math.isinf(value):
        raise GptOssError(f"--memory-budget must be a positive number of GB, not {gb!r}")
    return int(value * GB)


def default_budget(machine: dict) -> tuple[int, str]:
    if machine.get("metal"):
        return int(machine["recommended"]), "Metal's recommended working set"
    return int(machine["physical"]), "this machine's memory"


# --- the figures --------------------------------------------------------------------------------


def part_of(name: str) -> str:
    """Which part of the model a parameter (our name) belongs to."""
    if ".mlp.experts." in name:
        return "experts"
    if name.startswith("embed_tokens."):
        return "embedding"
    if name.startswith("lm_head."):
        return "unembedding"
    if ".mlp.router." in name:
        return "router"
    if ".self_attn." in name:
        return "attention"
    return "norms"


@dataclass
class WeightFigures:
    """What the weights of a model being loaded occupy (bytes)."""

    resident: dict[str, int]  # by part, once loaded
    on_disk: dict[str, int]  # by part, served from the checkpoint file instead
    load_peak: int  # while loading: the weights so far and the stored form being converted


def weight_bytes(
    ckpt: Checkpoint, dtype: mx.Dtype, dense_bits: int, settings: MemorySettings
) -> WeightFigures:
    """The weights of the model loading `ckpt` would build: unquantized floats cast to `dtype`,
    packed weights as stored, dense layers at `dense_bits`, the embedding and the experts beyond
    the cache left in the file.

    Loading converts (quantizes or casts) one tensor at a time, the unembedding first: its stored
    form is read beside what it becomes, then freed. So the peak is the unembedding's two forms,
    or all the weights plus the largest other tensor's stored form (`loading.build_model`).
    """
    skeleton = GptOssModel(ckpt.config, ckpt.shard)  # parameters never evaluated: shapes only
    quantized_as_stored = stored_quantization(skeleton, ckpt.tensors)
    cache = settings.expert_cache
    resident = dict.fromkeys(PARTS, 0)
    on_disk: dict[str, int] = {}
    first_group, largest_transient = 0, 0
    for name, tensor in ckpt.tensors.items():
        module, leaf = name.rsplit(".", 1)
        part = part_of(name)
        if part == "embedding" and settings.embedding_from_disk and _on_disk(ckpt, name):
            on_disk[part] = on_disk.get(part, 0) + _stored_bytes(ckpt, name, tensor)
            continue
        transient = tensor.nbytes  # the stored form, held while it is converted
        if (
            not quantized_as_stored
            and dense_bits != 16
            and leaf == "weight"
            and quantizable(module, tuple(tensor.shape))
        ):
            size = quantized_bytes(tuple(tensor.shape), dense_bits, dtype)
        elif tensor.dtype in (mx.uint32, mx.uint8):
            size, transient = tensor.nbytes, 0  # read straight into place
        else:
            size = tensor.size * dtype.size
            transient = 0 if tensor.dtype == dtype else transient
        if part == "experts" and cache:  # [E, ...] (a rank's experts only, on a rank)
            on_disk[part] = on_disk.get(part, 0) + size
            size, transient = size // tensor.shape[0] * cache, 0  # empty slots
        resident[part] += size
        if part == "unembedding":
            first_group += size + transient
        else:
            largest_transient = max(largest_transient, transient)
    load_peak = max(first_group, sum(resident.values()) + largest_transient)
    return WeightFigures(resident, on_disk, load_peak)


def _on_disk(ckpt: Checkpoint, name: str) -> bool:
    return name in ckpt.disk


def _stored_bytes(ckpt: Checkpoint, name: str, tensor: mx.array) -> int:
    stored = ckpt.disk.get(name)
    return stored.nbytes if isinstance(stored, DiskTensor) else tensor.nbytes


def kv_bytes(config: ModelConfig, kv_bits: int | None, dtype: mx.Dtype, positions: int) -> int:
    """Bytes of the caches holding `positions` positions: the caches' own (lazy) buffers."""
    caches = make_cache(config, kv_bits)
    for c in caches:
        c.reserve(1, config.num_key_value_heads, config.head_dim, dtype, positions)
    return sum(c.nbytes for c in caches)


def kv_bytes_per_1k(config: ModelConfig, kv_bits: int | None, dtype: mx.Dtype) -> int:
    """Bytes 1000 more positions add to the full-attention layers' caches."""
    full = config.replace(num_hidden_layers=1, layer_types=(FULL,))
    step = 256 * 40
    per_position = kv_bytes(full, kv_bits, dtype, step) / step
    return round(per_position * 1000 * config.layer_types.count(FULL))


def working_set(
    config: ModelConfig,
    dtype: mx.Dtype,
    chunk: int,
    context: int,
    kv_bits: int | None,
    expert_cache: int | None,
    fused_attention: bool,
) -> int:
    """An upper bound on what one prefill chunk of `chunk` tokens adds at `context` positions.

    Activations live one layer at a time, so the bound is one layer's attention and experts
    (summed: MLX may still hold some of the attention's arrays while the experts run), in dtype
    words:

    - attention, per token: the residual stream and its norm, q/k/v with their rotated and
      transposed copies, the output and its projection: 4 H + 3 (Hq + 2 Hkv) D + 2 Hq D;
    - experts, per token-expert pair (chunk x k of them): the gathered rows, the gate/linear
      features (2I), the SwiGLU's temporaries and the outputs before and after mixing: 4 H + 9 I;
      MLX's CPU backend measured 12.3 H at H = I (bench/README.md);

    plus, for a quantized cache, one full layer's keys and values dequantized (2 S Hkv D); plus,
    with an expert cache, the experts read from disk and not yet in their slots (at most twice
    experts_per_token of them: see `ExpertCache`); plus, where attention is not
    fused (MLX's CPU backend composes scaled_dot_product_attention from primitives), one full
    layer's scores and softmax: 3.5 words per (query head, query, key), 3.2 measured. On a Mac the
    fused kernel keeps the scores on chip.
    """
    T, S, b = min(chunk, context), context, dtype.size
    H, I, k = config.hidden_size, config.intermediate_size, config.experts_per_token
    D, Hq, Hkv = config.head_dim, config.num_attention_heads, config.num_key_value_heads
    attention = T * (4 * H + 3 * (Hq + 2 * Hkv) * D + 2 * Hq * D) * b
    experts = T * k * (4 * H + 9 * I) * b + T * config.num_experts * 4 * 2  # + router logits
    total = attention + experts
    if kv_bits not in (None, 16):
        total += 2 * S * Hkv * D * b
    if expert_cache:
        mxfp4 = 3 * H * I // 2  # gate/linear 2I x H and down H x I, 4 bits each
        per_expert = mxfp4 + mxfp4 // 16 + (2 * I + H) * b  # + E8M0 scales (1 per 32) + biases
        total += 2 * k * per_expert
    if not fused_attention:
        total += 7 * b * Hq * T * S // 2
    return total


def plan_checkpoint(
    ckpt: Checkpoint,
    dtype: mx.Dtype,
    settings: MemorySettings,
    budget: int | None = None,
    model: str | None = None,
    machine: dict | None = None,
) -> MemoryPlan:
    """The plan for loading `ckpt` (read lazily: headers only) with `settings` (resolved)."""
    config = ckpt.config
    machine = machine or machine_memory()
    stored = stored_quantization(GptOssModel(config, ckpt.shard), ckpt.tensors)
    dense_bits = resolve_dense_bits(stored, settings.dense_bits, DEFAULT_DENSE_BITS)
    check_kv_bits(settings.kv_bits)
    cache = _resolve_cache(ckpt, settings.expert_cache)
    context = min(settings.max_context or math.inf, config.max_position_embeddings)
    settings = dataclasses.replace(settings, dense_bits=dense_bits, expert_cache=cache)
    weights = weight_bytes(ckpt, dtype, dense_bits, settings)
    if budget is None:
        budget, source = default_budget(machine)
    else:
        source = "the memory budget"
    plan = MemoryPlan(
        model=model or ckpt.folder,
        layout=ckpt.layout,
        config=config,
        dtype=dtype,
        settings=settings,
        context=context,
        parts=weights.resident,
        on_disk=weights.on_disk,
        load_peak=weights.load_peak,
        kv_cache=kv_bytes(config, settings.kv_bits, dtype, context),
        kv_per_1k=kv_bytes_per_1k(config, settings.kv_bits, dtype),
        working_set=working_set(
            config,
            dtype,
            settings.prefill_chunk,
            context,
            settings.kv_bits,
            cache,
            fused_attention=bool(machine.get("metal")),
        ),
        budget=budget,
        budget_source=source,
        machine=machine,
        experts=ckpt.shard.count if ckpt.shard is not None else config.num_experts,
    )
    plan.disk_bytes_per_token = _disk_bytes_per_token(plan)
    return plan


def _disk_bytes_per_token(plan: MemoryPlan) -> int:
    """Expected bytes read from disk per decoded token: under uniformly random routing a picked
    expert is missing with probability 1 - K/E; plus the embedding row."""
    c, K = plan.config, plan.settings.expert_cache
    out = 0
    if "embedding" in plan.on_disk:
        out += plan.on_disk["embedding"] // c.vocab_size
    if K:  # a token picks k of E; E_here of them are this process's, K of those resident
        per_expert = plan.on_disk["experts"] // plan.experts  # all layers
        out += round(c.experts_per_token * (plan.experts - K) / c.num_experts * per_expert)
    return out


def _resolve_cache(ckpt: Checkpoint, cache: int | str | None) -> int | None:
    """The expert cache size as a number of slots (None: every expert resident)."""
    if cache is None or cache == "auto":
        return None
    E = ckpt.shard.count if ckpt.shard is not None else ckpt.config.num_experts
    k = ckpt.config.experts_per_token
    if not isinstance(cache, int) or isinstance(cache, bool) or cache < k:
        raise GptOssError(
            f"--expert-cache must be a number of experts >= {k} (the experts each token uses), "
            f"or auto, not {cache!r}"
        )
    if cache >= E:
        return None
    if not any(".mlp.experts." in name for name in ckpt.disk):
        raise GptOssError(
            f"{ckpt.folder}: the expert cache reads MXFP4 experts from the checkpoint file, and "
            f"this {ckpt.layout} checkpoint does not store them that way; convert it first: "
            "gptoss-mlx convert SRC -o DST"
        )
    return cache


# --- fitting ------------------------------------------------------------------------------------


def fit(
    ckpt: Checkpoint,
    dtype: mx.Dtype,
    settings: MemorySettings,
    budget: int | None = None,
    model: str | None = None,
    machine: dict | None = None,
) -> MemoryPlan:
    """The plan for `settings`. With a `budget`, or an `expert_cache` of "auto", the settings left
    open (None) are chosen so that it fits (GptOssError if nothing does); "auto" first tries an
    expert cache alone (every expert resident when they all fit). A plan that does not fit
    carries its advice."""
    machine = machine or machine_memory()
    plan = plan_checkpoint(ckpt, dtype, settings, budget, model, machine)
    auto_cache = settings.expert_cache == "auto"
    if plan.fits:
        return plan
    options = list(_ladder(ckpt, dtype, settings, plan.budget, model, machine, auto_cache))
    fitting = next((p for p in options if p.fits), None)
    if budget is not None or auto_cache:
        if fitting is None:
            raise GptOssError(
                f"nothing fits {plan.budget / GB:.1f} GB ({plan.budget_source}): the smallest "
                f"configuration needs {min(p.total for p in options) / GB:.1f} GB"
            )
        return fitting
    plan.advice = _advice(plan, fitting)
    return plan


def _ladder(ckpt, dtype, settings, budget, model, machine, auto_cache):
    """Plans for ever more economical settings, changing only what the user left open: KV at 8
    bits, context 32768, an expert cache (the largest that fits), KV at 4 bits, context down to
    4096, 4-bit dense weights (with `auto_cache`, the expert cache alone comes first)."""
    config = ckpt.config
    current = settings
    if auto_cache:
        current = dataclasses.replace(settings, expert_cache=None)
    open_kv = settings.kv_bits is None and config.head_dim % 32 == 0  # else no KV groups fit
    open_context = settings.max_context is None
    open_cache = settings.expert_cache is None or auto_cache
    open_dense = settings.dense_bits is None
    can_stream = any(".mlp.experts." in name for name in ckpt.disk)

    def plan(s: MemorySettings) -> MemoryPlan:
        return plan_checkpoint(ckpt, dtype, s, budget, model, machine)

    def with_cache(s: MemorySettings) -> MemoryPlan:
        """`s` with the largest expert cache that fits (or the smallest, if none does)."""
        first = plan(s)
        if first.fits or not (open_cache and can_stream):
            return first
        low, high = config.experts_per_token, first.experts - 1
        best = plan(dataclasses.replace(s, expert_cache=low))
        while best.fits and low < high:  # the largest number of slots that fits
            middle = (low + high + 1) // 2
            candidate = plan(dataclasses.replace(s, expert_cache=middle))
            if candidate.fits:
                low, best = middle, candidate
            else:
                high = middle - 1
        return best

    steps: list[dict] = []
    if open_kv:
        steps.append({"kv_bits": 8})
    if open_context:
        steps.append({"max_context": CONTEXT_LADDER[0]})
    steps.append({"cache": True})
    if open_kv:
        steps.append({"kv_bits": 4})
    if open_context:
        steps += [{"max_context": n} for n in CONTEXT_LADDER[1:]]
    if open_dense:
        steps.append({"dense_bits": 4})
    if auto_cache:  # the expert cache alone, first
        yield with_cache(current)
    cache = False
    for step in steps:
        cache = step.pop("cache", cache)
        if step.get("max_context", 0) >= (current.max_context or config.max_position_embeddings):
            continue
        current = dataclasses.replace(current, **step)
        yield with_cache(current) if cache else plan(current)


def _advice(plan: MemoryPlan, fitting: MemoryPlan | None) -> list[str]:
    """What makes `plan` fit: the first fitting settings, and on a Mac the wired limit that would
    let `plan` fit as it is."""
    advice = []
    if fitting is not None:
        flags = fitting.settings.flags(plan.config)
        reads = ""
        if fitting.settings.expert_cache:
            reads = f", ~{fitting.disk_bytes_per_token / 1e6:.0f} MB/token from disk"
        advice.append(f"{flags} ({fitting.total / GB:.1f} GB{reads})")
    machine = plan.machine
    if machine.get("metal") and plan.total <= int(machine["physical"]) - OS_RESERVE:
        advice.append(
            f"sudo sysctl iogpu.wired_limit_mb={plan.wired_limit_mb} (leaves "
            f"{(int(machine['physical']) - plan.wired_limit_mb * MIB) / GB:.1f} GB for macOS)"
        )
    return advice


def check_machine(plan: MemoryPlan, shard: ExpertShard | None = None) -> None:
    """GptOssError when the weights alone exceed this machine's memory: loading would swap."""
    physical = int(plan.machine["physical"])
    if plan.weights > physical:
        whose, more = "the model needs", ""
        if shard is not None:
            whose = f"rank {shard.rank}'s share of the model ({shard.count} experts) needs"
            more = "; or more ranks"
        advice = f"; to fit: {' or '.join(plan.advice)}" if plan.advice else ""
        raise GptOssError(
            f"{whose} {plan.weights / GB:.1f} GB for its weights but this machine has "
            f"{physical / GB:.1f} GB{advice}{more}"
        )


def apply_limits(plan: MemoryPlan) -> None:
    """Set MLX's memory limits as a careful user would, from the plan.

    On a Mac, the wired limit (memory the GPU keeps resident, never paged out or compressed
    between tokens) is what the plan needs, capped at Metal's recommended working set: mlx-lm wires
    the whole recommended set; wiring only what the model uses leaves the rest to other apps. On
    every backend, MLX's cache of freed buffers is capped at one prefill chunk's working set (by
    default it may grow to the memory limit, holding e.g. the stored forms of the weights
    quantized at load, on top of the model).
    """
    if plan.machine.get("metal"):
        mx.set_wired_limit(min(plan.total, int(plan.machine["recommended"])))
    mx.set_cache_limit(plan.working_set)
    mx.clear_cache()
