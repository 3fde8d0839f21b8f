"""Find a checkpoint's layout and map its tensors onto the model's parameter tree.

Layouts:

- ``hf-mxfp4``: Hugging Face as published; expert weights as uint8 `_blocks` `[E, out, in/32, 16]`
  and `_scales` `[E, out, in/32]`. The blocks viewed as uint32 `[E, out, in/8]` ARE MLX's mxfp4
  weights (same nibble order and E8M0 scales), so they load memory-mapped with no copy.
- ``hf-bf16``: dequantized third-party uploads; `gate_up_proj` `[E, in, 2I]` and `down_proj`
  `[E, I, hidden]` stored transposed (`[E, in, out]`). Quantized to MXFP4 on load.
- ``original``: OpenAI's `original/` folder (`block.N.attn.qkv`, `mlp1_weight.blocks`, ...).
- ``mlx-community``: mlx-lm conversions; gate/up de-interleaved into `gate_proj`/`up_proj`, dense
  weights possibly affine-quantized. Gate and up rows are re-interleaved (bit-exact).
- ``gptoss-mlx``: this project's converted folders: the model's own parameter names.

Every tensor is returned lazily (`mx.load` maps the file; nothing is read until evaluated). Where
a tensor of ours is a checkpoint tensor's bytes as stored (moved, or viewed as another dtype), the
checkpoint also records where those bytes lie (`Checkpoint.disk`), so the embedding's rows and the
experts can be read from the file one at a time (`gptoss_mlx.disk`).

One rank of several (a `distributed.ExpertShard`) takes only its experts from the tensors stacked
over the experts `[E, ...]`: rows start..stop of each, read from the file as that byte range
alone (MLX's loader would read a whole tensor before slicing it), so a rank never holds more
than its share. Everything else is taken whole.
"""

from __future__ import annotations

import glob
import json
import os
from dataclasses import dataclass, field

import mlx.core as mx

from .config import ModelConfig
from .disk import MLX_DTYPES, DiskTensor, InterleavedRows, StoredRows
from .distributed import ExpertShard, expert_shard
from .errors import GptOssError
from .safetensors_check import TensorInfo, read_header

MXFP4_BLOCK = 32  # values sharing one E8M0 scale, along the input dim

# A tensor name that only one layout has, for recognising it.
_LAYOUT_MARKERS = {
    "hf-mxfp4": "model.layers.0.mlp.experts.gate_up_proj_blocks",
    "hf-bf16": "model.layers.0.mlp.experts.gate_up_proj",
    "original": "block.0.mlp.mlp1_weight.blocks",
    "mlx-community": "model.layers.0.mlp.experts.gate_proj.weight",
    "gptoss-mlx": "layers.0.mlp.experts.gate_up_proj.weight",
}


@dataclass
class Checkpoint:
    """A checkpoint read but not yet evaluated: our parameter names -> lazy arrays."""

    folder: str
    layout: str
    config: ModelConfig
    tensors: dict[str, mx.array]
    # our name -> "FILE: source name", for error messages
    origin: dict[str, str] = field(default_factory=dict)
    shard: ExpertShard | None = None  # the experts taken, when this process is one rank of several
    # our name -> where its bytes lie in a file, for tensors stored as we hold them (a rank's:
    # only its experts' rows)
    disk: dict[str, StoredRows] = field(default_factory=dict)


def find_weights_folder(path: str) -> str:
    """The folder holding config + safetensors: `path` itself, else its `original/` subfolder."""
    if not os.path.isdir(path):
        raise GptOssError(f"{path}: no such folder")
    for folder in (path, os.path.join(path, "original")):
        if os.path.isfile(os.path.join(folder, "config.json")) and (
            glob.glob(os.path.join(folder, "*.safetensors"))
            or os.path.isfile(os.path.join(folder, "model.safetensors.index.json"))
        ):
            return folder
    raise GptOssError(
        f"{path}: not a gpt-oss checkpoint (no config.json with *.safetensors "
        "weights here or in original/)"
    )


def _shard_files(folder: str) -> list[str]:
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                names = sorted(set(json.load(f)["weight_map"].values()))
        except (ValueError, KeyError):
            raise GptOssError(f"{index}: corrupt index file") from None
        missing = [n for n in names if not os.path.isfile(os.path.join(folder, n))]
        if missing:
            raise GptOssError(
                f"{folder}: missing shard {missing[0]} listed in "
                "model.safetensors.index.json; download it again"
            )
        return [os.path.join(folder, n) for n in names]
    return sorted(glob.glob(os.path.join(folder, "*.safetensors")))


def _detect_layout(names, folder: str) -> str:
    for layout, marker in _LAYOUT_MARKERS.items():
        if marker in names:
            return layout
    sample = ", ".join(sorted(names)[:3])
    raise GptOssError(
        f"{folder}: unknown checkpoint layout (tensors like {sample}); expected the "
        "Hugging Face gpt-oss layout (MXFP4 or bf16), OpenAI's original/, an "
        "mlx-community conversion or a gptoss-mlx folder"
    )


def read_checkpoint(path: str, group: mx.distributed.Group | None = None) -> Checkpoint:
    """Read a local checkpoint folder of any supported layout (lazily). In a `group` of several
    ranks, only this rank's experts (read at once: they are the bulk of its share)."""
    folder = find_weights_folder(path)
    try:
        with open(os.path.join(folder, "config.json")) as f:
            raw_config = json.load(f)
    except ValueError as e:
        raise GptOssError(f"{folder}/config.json: not valid JSON ({e})") from None

    infos: dict[str, TensorInfo] = {}
    for shard in _shard_files(folder):
        infos.update(read_header(shard))
    arrays: dict[str, mx.array] = {}
    for shard in sorted({info.file for info in infos.values()}):
        try:
            arrays.update(mx.load(shard))
        except Exception as e:  # MLX's reader reports format problems as RuntimeError/ValueError
            raise GptOssError(f"{os.path.basename(shard)}: cannot read safetensors ({e})") from None
    return checkpoint_from_tensors(arrays, raw_config, folder, infos, group)


def checkpoint_from_tensors(
    arrays: dict[str, mx.array],
    raw_config: dict,
    folder: str = "<memory>",
    infos: dict[str, TensorInfo] | None = None,
    group: mx.distributed.Group | None = None,
) -> Checkpoint:
    """Recognise the layout of `arrays` (named as in some checkpoint) and map them to our names;
    in a `group` of several ranks, keep only this rank's experts (`distributed.expert_shard`)."""
    layout = _detect_layout(arrays.keys(), folder)
    config = (ModelConfig.from_original if layout == "original" else ModelConfig.from_hf)(
        raw_config
    )
    shard = expert_shard(config.num_experts, group)
    source = _Source(dict(arrays), infos or {}, shard)
    tensors = _MAPPERS[layout](source, config)
    source.reject_leftovers()
    return Checkpoint(folder, layout, config, tensors, source.origin, shard, source.disk)


def checkpoint_from_headers(
    infos: dict[str, TensorInfo], raw_config: dict, folder: str
) -> Checkpoint:
    """A checkpoint known only by its safetensors headers (name -> dtype and shape): every tensor
    a lazy, never evaluated placeholder of the right shape and dtype, for planning memory."""
    unknown = sorted({i.dtype for i in infos.values()} - MLX_DTYPES.keys())
    if unknown:
        raise GptOssError(f"{folder}: unsupported tensor dtype {unknown[0]}")
    arrays = {name: mx.zeros(i.shape, MLX_DTYPES[i.dtype]) for name, i in infos.items()}
    return checkpoint_from_tensors(arrays, raw_config, folder, infos)


class _Source:
    """The checkpoint's tensors by their own names; `take` consumes one, recording its origin
    (`take_experts` one stacked over the experts, keeping only the shard's)."""

    def __init__(
        self,
        arrays: dict[str, mx.array],
        infos: dict[str, TensorInfo],
        shard: ExpertShard | None = None,
    ):
        self.arrays = arrays
        self.infos = infos
        self.shard = shard
        self.origin: dict[str, str] = {}
        self.disk: dict[str, StoredRows] = {}

    def where(self, name: str) -> str:
        info = self.infos.get(name)
        return f"{os.path.basename(info.file)}: {name}" if info else name

    def on_disk(self, name: str, experts: bool = False) -> DiskTensor | None:
        """Where tensor `name`'s bytes lie, when it was read from a file (`experts`: stacked over
        the experts, the shard's rows only)."""
        info = self.infos.get(name)
        if info is None or info.dtype not in MLX_DTYPES:
            return None
        stored = DiskTensor.of(info)
        if experts and self.shard is not None:
            return stored.rows(self.shard.start, self.shard.stop)
        return stored

    def has(self, name: str) -> bool:
        return name in self.arrays

    def take(self, name: str, dtype: mx.Dtype | None = None) -> mx.array:
        if name not in self.arrays:
            raise GptOssError(
                f"checkpoint is missing tensor {name} (does config.json match the weights?)"
            )
        array = self.arrays.pop(name)
        if dtype is not None and array.dtype != dtype:
            raise GptOssError(f"{self.where(name)} has dtype {array.dtype}, expected {dtype}")
        return array

    def take_experts(self, name: str, dtype: mx.Dtype | None = None) -> mx.array:
        """`take` for a tensor stacked over the experts `[E, ...]`: the shard's experts only
        (all of them without a shard)."""
        array = self.take(name, dtype)
        if self.shard is None:
            return array
        if array.ndim == 0 or array.shape[0] != self.shard.num_experts:
            raise GptOssError(
                f"{self.where(name)} has shape {list(array.shape)}, expected "
                f"{self.shard.num_experts} experts first"
            )
        stored = self.on_disk(name, experts=True)
        if stored is not None:  # only the shard's bytes are read, straight into the array
            return stored.read(range(stored.shape[0]))
        return mx.contiguous(array[self.shard.start : self.shard.stop])  # the slice would keep all

    def put(self, out: dict, ours: str, array: mx.array, *names: str) -> None:
        out[ours] = array
        self.origin[ours] = " + ".join(self.where(n) for n in names)

    def move(
        self,
        out: dict,
        ours: str,
        name: str,
        dtype: mx.Dtype | None = None,
        experts: bool = False,
    ) -> None:
        """Take `name` as our `ours` (`experts`: stacked over the experts, see `take_experts`)."""
        array = self.take_experts(name, dtype) if experts else self.take(name, dtype)
        self.put(out, ours, array, name)
        if (stored := self.on_disk(name, experts)) is not None:
            self.disk[ours] = stored

    def reject_leftovers(self) -> None:
        if self.arrays:
            extra = sorted(self.arrays)
            raise GptOssError(
                f"{self.where(extra[0])}: unexpected tensor ({len(extra)} in all) "
                "that config.json does not account for"
            )


def mxfp4_blocks_to_weight(blocks: mx.array) -> mx.array:
    """uint8 `[..., out, in/32, 16]` blocks -> MLX mxfp4 weight uint32 `[..., out, in/8]` (view)."""
    return blocks.reshape(*blocks.shape[:-2], -1).view(mx.uint32)


def quantize_mxfp4(w: mx.array) -> tuple[mx.array, mx.array]:
    """Dense `[..., out, in]` -> (uint32 weight, uint8 E8M0 scales) in MLX's mxfp4 layout."""
    weight, scales = mx.quantize(w, group_size=MXFP4_BLOCK, bits=4, mode="mxfp4")
    return weight, scales


def _interleave_rows(gate: mx.array, up: mx.array, axis: int) -> mx.array:
    """Rows g0, u0, g1, u1, ...: the published interleaved gate/linear layout."""
    stacked = mx.stack([gate, up], axis=axis + 1)
    shape = list(gate.shape)
    shape[axis] *= 2
    return stacked.reshape(shape)


def _move_mxfp4(src: _Source, out: dict, ours: str, blocks: str, scales: str, bias: str) -> None:
    """One MXFP4 expert projection: uint8 blocks viewed as MLX's weight, E8M0 scales, bias."""
    weight = mxfp4_blocks_to_weight(src.take_experts(blocks, mx.uint8))
    src.put(out, ours + ".weight", weight, blocks)
    if (stored := src.on_disk(blocks, experts=True)) is not None:
        src.disk[ours + ".weight"] = stored.view("U32", tuple(weight.shape))
    src.move(out, ours + ".scales", scales, mx.uint8, experts=True)
    src.move(out, ours + ".bias", bias, experts=True)


def _dense_hf(src: _Source, out: dict, prefix: str = "model.") -> None:
    """Embedding, norms, attention and router: HF names are ours behind `prefix`; quantized
    dense layers (`.scales`/`.biases`) come along as they are."""
    suffixes = (".weight", ".bias", ".scales", ".biases", ".sinks")
    for name in [n for n in src.arrays if n.startswith(prefix) and ".mlp.experts." not in n]:
        if name.endswith(suffixes):
            src.move(out, name[len(prefix) :], name)
    for name in [n for n in src.arrays if n.startswith("lm_head.")]:
        src.move(out, name, name)


def _map_hf_mxfp4(src: _Source, config: ModelConfig) -> dict:
    out: dict = {}
    _dense_hf(src, out)
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.mlp.experts.", f"layers.{i}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            _move_mxfp4(
                src, out, q + proj, p + proj + "_blocks", p + proj + "_scales", p + proj + "_bias"
            )
    return out


def _map_hf_bf16(src: _Source, config: ModelConfig) -> dict:
    out: dict = {}
    _dense_hf(src, out)
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.mlp.experts.", f"layers.{i}.mlp.experts."
        for proj in ("gate_up_proj", "down_proj"):
            dense = src.take_experts(p + proj)
            if dense.ndim != 3:
                raise GptOssError(
                    f"{src.where(p + proj)} must be 3-D "
                    f"[experts, in, out], got shape {list(dense.shape)}"
                )
            weight, scales = quantize_mxfp4(dense.swapaxes(1, 2))
            src.put(out, q + proj + ".weight", weight, p + proj)
            src.put(out, q + proj + ".scales", scales, p + proj)
            src.move(out, q + proj + ".bias", p + proj + "_bias", experts=True)
    return out


def _map_original(src: _Source, config: ModelConfig) -> dict:
    out: dict = {}
    src.move(out, "embed_tokens.weight", "embedding.weight")
    src.move(out, "lm_head.weight", "unembedding.weight")
    src.move(out, "norm.weight", "norm.scale")
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    bounds = {
        "q_proj": (0, q_width),
        "k_proj": (q_width, q_width + kv_width),
        "v_proj": (q_width + kv_width, q_width + 2 * kv_width),
    }
    for i in range(config.num_hidden_layers):
        b, ours = f"block.{i}.", f"layers.{i}."
        src.move(out, ours + "input_layernorm.weight", b + "attn.norm.scale")
        qkv_w, qkv_b = src.take(b + "attn.qkv.weight"), src.take(b + "attn.qkv.bias")
        if qkv_w.shape[0] != q_width + 2 * kv_width:
            raise GptOssError(
                f"{b}attn.qkv.weight has {qkv_w.shape[0]} rows, config implies "
                f"{q_width + 2 * kv_width}"
            )
        for proj, (lo, hi) in bounds.items():
            src.put(out, f"{ours}self_attn.{proj}.weight", qkv_w[lo:hi], b + "attn.qkv.weight")
            src.put(out, f"{ours}self_attn.{proj}.bias", qkv_b[lo:hi], b + "attn.qkv.bias")
        src.move(out, ours + "self_attn.sinks", b + "attn.sinks")
        src.move(out, ours + "self_attn.o_proj.weight", b + "attn.out.weight")
        src.move(out, ours + "self_attn.o_proj.bias", b + "attn.out.bias")
        src.move(out, ours + "post_attention_layernorm.weight", b + "mlp.norm.scale")
        src.move(out, ours + "mlp.router.weight", b + "mlp.gate.weight")
        src.move(out, ours + "mlp.router.bias", b + "mlp.gate.bias")
        for theirs, proj in (("mlp1", "gate_up_proj"), ("mlp2", "down_proj")):
            _move_mxfp4(
                src,
                out,
                ours + "mlp.experts." + proj,
                f"{b}mlp.{theirs}_weight.blocks",
                f"{b}mlp.{theirs}_weight.scales",
                f"{b}mlp.{theirs}_bias",
            )
    return out


def _map_mlx_community(src: _Source, config: ModelConfig) -> dict:
    out: dict = {}
    _dense_hf(src, out)
    for i in range(config.num_hidden_layers):
        p, q = f"model.layers.{i}.mlp.experts.", f"layers.{i}.mlp.experts."
        if src.has(p + "gate_proj.biases") or src.has(p + "down_proj.biases"):
            raise GptOssError(
                f"{src.where(p + 'gate_proj.biases')}: experts are affine-quantized; "
                "gptoss-mlx runs MXFP4 experts: use an MXFP4 upload or the original "
                "openai/gpt-oss checkpoint"
            )
        for part in ("weight", "scales", "bias"):
            dtype = {"weight": mx.uint32, "scales": mx.uint8}.get(part)
            gate, up = (
                src.take_experts(f"{p}gate_proj.{part}", dtype),
                src.take_experts(f"{p}up_proj.{part}", dtype),
            )
            src.put(
                out,
                f"{q}gate_up_proj.{part}",
                _interleave_rows(gate, up, axis=1),
                f"{p}gate_proj.{part}",
                f"{p}up_proj.{part}",
            )
            stored = [
                src.on_disk(f"{p}{half}.{part}", experts=True) for half in ("gate_proj", "up_proj")
            ]
            if None not in stored:
                src.disk[f"{q}gate_up_proj.{part}"] = InterleavedRows(*stored)
            src.move(out, f"{q}down_proj.{part}", f"{p}down_proj.{part}", dtype, experts=True)
    return out


def _map_gptoss_mlx(src: _Source, config: ModelConfig) -> dict:
    out: dict = {}
    for name in list(src.arrays):
        src.move(out, name, name, experts=".mlp.experts." in name)
    return out


_MAPPERS = {
    "hf-mxfp4": _map_hf_mxfp4,
    "hf-bf16": _map_hf_bf16,
    "original": _map_original,
    "mlx-community": _map_mlx_community,
    "gptoss-mlx": _map_gptoss_mlx,
}
