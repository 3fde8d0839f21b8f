"""`load_model`: any supported checkpoint (folder or hub id) -> a ready `GptOssModel`.

Loading is lazy and memory-mapped, one part at a time, and fits the model to the machine
(`memory.MemorySettings`): dense weights quantized to 8 bits by default (`dense_bits`), the input
embedding served from the checkpoint file (`embedding_from_disk`), at most K experts per layer
resident (`expert_cache`), keys and values quantized (`kv_bits`), a context cap (`max_context`);
`memory_budget` picks the settings that fit a budget. The plan (`memory.plan_checkpoint`) comes
with the model as `model.memory_plan`.

Given a distributed group of several ranks, each process loads only its rank's experts (see
`gptoss_mlx.distributed`) and the ranks check that they loaded the same model.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_map

from . import kernels as kernel_backends
from . import memory
from .disk import DiskEmbedding, DiskTensor
from .distributed import check_same_model
from .errors import GptOssError
from .expert_cache import ExpertCache, stored_experts
from .hub import local_model_path, remote_headers, resolve_model_path
from .memory import MemoryPlan, MemorySettings
from .model import GptOssModel
from .progress import progress_bar
from .quantize import quantize_dense, resolve_dense_bits, stored_quantization
from .tokenizer import SPECIAL_TOKENS, Tokenizer, load_tokenizer
from .weights import Checkpoint, checkpoint_from_headers, read_checkpoint

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
_PACKED = (mx.uint32, mx.uint8)  # quantized weights and scales: loaded bit-exact, never cast


def parse_dtype(dtype: str | mx.Dtype | None) -> mx.Dtype:
    """None -> bfloat16; a name from DTYPES or an mx.Dtype otherwise."""
    if dtype is None:
        return mx.bfloat16
    if isinstance(dtype, mx.Dtype):
        return dtype
    if dtype not in DTYPES:
        raise GptOssError(f"unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_against_model(model: nn.Module, ckpt: Checkpoint) -> None:
    """Every parameter present, with the shape the config implies and a usable dtype; nothing
    extra."""
    expected = dict(tree_flatten(model.parameters()))
    missing = sorted(expected.keys() - ckpt.tensors.keys())
    if missing:
        raise GptOssError(
            f"{ckpt.folder}: checkpoint is missing {missing[0]} ({len(missing)} "
            "tensors in all); does config.json match the weights?"
        )
    extra = sorted(ckpt.tensors.keys() - expected.keys())
    if extra:
        raise GptOssError(
            f"{ckpt.origin.get(extra[0], extra[0])}: unexpected tensor "
            f"({len(extra)} in all) that config.json does not account for"
        )
    for name, want in expected.items():
        got = ckpt.tensors[name]
        where = ckpt.origin.get(name, name)
        if tuple(got.shape) != tuple(want.shape):
            raise GptOssError(
                f"{where} has shape {list(got.shape)}, but config.json implies {list(want.shape)}"
            )
        if want.dtype in _PACKED and got.dtype != want.dtype:
            raise GptOssError(f"{where} has dtype {got.dtype}, expected {want.dtype}")
        if want.dtype not in _PACKED and not mx.issubdtype(got.dtype, mx.floating):
            raise GptOssError(f"{where} has dtype {got.dtype}, expected a floating-point type")


def build_model(
    ckpt: Checkpoint,
    dtype: mx.Dtype | None,
    progress: bool = False,
    materialize: bool = True,
    kernels: str | None = None,
    settings: MemorySettings | None = None,
) -> GptOssModel:
    """Instantiate the model for `ckpt` and load its tensors; floats cast to `dtype` (None keeps
    them).

    `settings` say what is quantized and what stays on disk: resolved ones (`MemoryPlan.settings`:
    an expert cache is a number), where `dense_bits=None` keeps the dense weights as stored; by
    default none of the savings, everything resident as stored. Dense weights are quantized from
    their stored values and only then cast, as `convert --dense-bits` writes them. Parameters stay
    lazy until evaluated one tensor at a time (`materialize`), so peak memory stays near the size
    of the weights themselves (`memory.WeightFigures`); `ckpt.tensors` is handed over to the
    model (left empty). `kernels` picks the kernel backend (see `gptoss_mlx.kernels`).
    """
    settings = settings or MemorySettings(embedding_from_disk=False)
    kernel_backends.resolve(kernels)  # an invalid choice fails before any loading
    model = GptOssModel(ckpt.config, ckpt.shard)
    specs = stored_quantization(model, ckpt.tensors)
    if specs:
        nn.quantize(model, class_predicate=lambda path, _: specs.get(path, False))
    _check_against_model(model, ckpt)
    # The model takes the tensors over: a stored form that is quantized or cast must not stay
    # referenced (and, once read, resident) after its conversion.
    tensors, ckpt.tensors = ckpt.tensors, {}
    model.load_weights(list(tensors.items()), strict=True)
    del tensors
    dense_bits = resolve_dense_bits(specs, settings.dense_bits, None)
    if not specs:
        quantize_dense(model, dense_bits)
    if dtype is not None:
        cast = tree_map(
            lambda p: (
                p.astype(dtype) if mx.issubdtype(p.dtype, mx.floating) and p.dtype != dtype else p
            ),
            model.parameters(),
        )
        model.update(cast)
    compute = dtype or model.dtype
    if settings.embedding_from_disk and "embed_tokens.weight" in ckpt.disk:
        model.embed_tokens = _disk_embedding(model, ckpt, compute)
    local = ckpt.shard.count if ckpt.shard is not None else ckpt.config.num_experts
    if settings.expert_cache is not None and settings.expert_cache < local:
        for i, layer in enumerate(model.layers):  # a rank's cache holds its own experts
            layer.mlp.experts = ExpertCache(
                ckpt.config, settings.expert_cache, stored_experts(ckpt.disk, i), compute, local
            )
    model.kv_bits = settings.kv_bits
    model.max_context = settings.max_context
    kernel_backends.use(model, kernels)
    if not materialize:
        return model
    # One tensor at a time, so that at most one stored form (of a tensor being quantized or cast)
    # is held beside the weights; the unembedding first, before the rest is resident.
    groups = [model.lm_head, model.embed_tokens, *model.layers, model.norm]
    with progress_bar(len(groups), "Loading weights", progress) as bar:
        for part in groups:
            for _, array in tree_flatten(part.parameters()):
                mx.eval(array)
                mx.clear_cache()  # the stored form, if it was quantized or cast
            bar.update(1)
    model.eval()
    return model


def _disk_embedding(model: GptOssModel, ckpt: Checkpoint, dtype: mx.Dtype) -> DiskEmbedding:
    """The embedding served from the checkpoint file, quantized as stored (if it is)."""
    stored: dict[str, DiskTensor] = {
        part: ckpt.disk.get(f"embed_tokens.{part}") for part in ("weight", "scales", "biases")
    }
    table = model.embed_tokens
    return DiskEmbedding(
        stored["weight"],
        dtype,
        stored["scales"],
        stored["biases"],
        getattr(table, "group_size", None) if stored["scales"] else None,
        getattr(table, "bits", None) if stored["scales"] else None,
    )


def load_model(
    path_or_repo: str,
    dtype: str | mx.Dtype | None = None,
    *,
    progress: bool = False,
    kernels: str | None = None,
    dense_bits: int | None = None,
    kv_bits: int | None = None,
    expert_cache: int | str | None = None,
    embedding_from_disk: bool = True,
    max_context: int | None = None,
    memory_budget: float | None = None,
    prefill_chunk: int = memory.DEFAULT_PREFILL_CHUNK,
    group: mx.distributed.Group | None = None,
) -> GptOssModel:
    """Load gpt-oss from a local folder of any supported layout or a Hugging Face repo id.

    `dtype=None` computes in bfloat16; `"float32"` computes in float32 (for parity checks). Expert
    weights stay MXFP4 in every case. `kernels` = "auto" | "metal" | "mlx" | "emulate" picks how the
    attention and expert ops run (None: $GPTOSS_MLX_KERNELS, else auto; see `gptoss_mlx.kernels`).

    Memory (see `memory.MemorySettings`): `dense_bits` 8 (default for unquantized dense weights),
    4 or 16 (as published); `kv_bits` 8 or 4 (None: the compute dtype); `expert_cache` K experts
    resident per layer, or "auto" (as many as fit); `embedding_from_disk` (default True);
    `max_context` caps prompt + reply; `memory_budget` (GB) picks settings left unset to fit it.
    The plan is `model.memory_plan`; on a Mac, MLX's wired and cache limits are set from it
    (`memory.apply_limits`).

    `group`: the ranks (`mx.distributed.init()`) this process is one of; with more than one, it
    loads only its rank's experts from its own copy of the checkpoint (and plans for that share:
    an expert cache holds the rank's experts), and returns once every rank has loaded the same
    model at the same precision.
    """
    compute_dtype = parse_dtype(dtype)
    kernel_backends.resolve(kernels)
    ckpt = read_checkpoint(resolve_model_path(path_or_repo, progress=progress), group)
    settings = MemorySettings(
        dense_bits=dense_bits,
        kv_bits=kv_bits,
        expert_cache=expert_cache,
        embedding_from_disk=embedding_from_disk,
        max_context=max_context,
        prefill_chunk=prefill_chunk,
    )
    budget = None if memory_budget is None else memory.parse_budget(memory_budget)
    plan = memory.fit(ckpt, compute_dtype, settings, budget, path_or_repo)
    memory.check_machine(plan, ckpt.shard)
    model = build_model(
        ckpt, compute_dtype, progress=progress, kernels=kernels, settings=plan.settings
    )
    model.memory_plan = plan
    memory.apply_limits(plan)
    if ckpt.shard is not None:
        s = plan.settings
        description = {
            "config": model.config.to_hf(),
            "dtype": str(model.dtype),
            "dense_bits": s.dense_bits,
            "kv_bits": s.kv_bits,
            "max_context": s.max_context,
        }
        check_same_model(ckpt.shard.group, description)
    return model


def load(
    path_or_repo: str,
    dtype: str | mx.Dtype | None = None,
    *,
    progress: bool = False,
    kernels: str | None = None,
    dense_bits: int | None = None,
    kv_bits: int | None = None,
    expert_cache: int | str | None = None,
    embedding_from_disk: bool = True,
    max_context: int | None = None,
    memory_budget: float | None = None,
    prefill_chunk: int = memory.DEFAULT_PREFILL_CHUNK,
    group: mx.distributed.Group | None = None,
) -> tuple[GptOssModel, Tokenizer]:
    """`(model, tokenizer)` for a folder or hub id: `load_model` (same keywords) plus the
    checkpoint's tokenizer.

    The tokenizer comes from the folder's `tokenizer.json` when it has one (its special-token ids
    checked), else tiktoken's o200k_harmony. `group`: see `load_model`.
    """
    folder = resolve_model_path(path_or_repo, progress=progress)
    model = load_model(
        folder,
        dtype,
        progress=progress,
        kernels=kernels,
        dense_bits=dense_bits,
        kv_bits=kv_bits,
        expert_cache=expert_cache,
        embedding_from_disk=embedding_from_disk,
        max_context=max_context,
        memory_budget=memory_budget,
        prefill_chunk=prefill_chunk,
        group=group,
    )
    needed = max(SPECIAL_TOKENS.values()) + 1
    if model.config.vocab_size < needed:
        raise GptOssError(
            f"{path_or_repo}: the model's vocabulary has {model.config.vocab_size} "
            f"tokens, too few for o200k_harmony (needs {needed}); use load_model and "
            "token ids instead"
        )
    return model, load_tokenizer(folder)


def plan_memory(
    path_or_repo: str,
    dtype: str | mx.Dtype | None = None,
    *,
    context: int | None = None,
    dense_bits: int | None = None,
    kv_bits: int | None = None,
    expert_cache: int | str | None = None,
    embedding_from_disk: bool = True,
    max_context: int | None = None,
    memory_budget: float | None = None,
    prefill_chunk: int = memory.DEFAULT_PREFILL_CHUNK,
) -> MemoryPlan:
    """The memory plan `load_model` would make with the same keywords, from the checkpoint's
    config and safetensors headers alone: a local folder (or a hub repo already downloaded) is
    read lazily, a hub repo not downloaded yet gives its headers without its weights. `context`
    plans the KV cache for that many tokens (as `max_context` would cap it)."""
    folder = local_model_path(path_or_repo)
    if folder is not None:
        ckpt = read_checkpoint(folder)
    else:
        raw_config, infos = remote_headers(path_or_repo)
        ckpt = checkpoint_from_headers(infos, raw_config, path_or_repo)
    settings = MemorySettings(
        dense_bits=dense_bits,
        kv_bits=kv_bits,
        expert_cache=expert_cache,
        embedding_from_disk=embedding_from_disk,
        max_context=context or max_context,
        prefill_chunk=prefill_chunk,
    )
    budget = None if memory_budget is None else memory.parse_budget(memory_budget)
    return memory.fit(ckpt, parse_dtype(dtype), settings, budget, path_or_repo)
