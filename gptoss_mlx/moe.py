"""Top-4 mixture of experts with MXFP4 expert weights.

Router: logits = x W_r^T + b_r over E experts; keep the top 4 and softmax over those 4 only.
Expert e (weights in MXFP4, blocks of 32 along the input dim, interleaved gate/linear rows):

    h      = W1[e] x + b1[e]              [2I]: even rows gate, odd rows linear
    gate   = min(h[0::2], limit)          lin = clamp(h[1::2], -limit, limit)
    act    = gate * sigmoid(alpha * gate) * (lin + 1)
    y_e    = W2[e] act + b2[e]
    out    = sum_e w_e y_e

Gate and linear come from ONE gathered MXFP4 matmul over the published interleaved layout. The
fused decode kernels take the experts where they apply (`kernels.experts`); elsewhere `ops.experts`.

Across ranks (`distributed.ExpertShard`) a layer holds only its rank's experts: the routing over
all E is turned into one over those, and the ranks' outputs are summed.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn

from . import kernels, ops
from .config import ModelConfig
from .distributed import ExpertShard
from .weights import MXFP4_BLOCK


class MXFP4SwitchLinear(nn.Module):
    """E stacked `[out, in]` MXFP4 matrices with biases; each row of x picks its experts by index.

    weight: uint32 `[E, out, in/8]` (8 nibbles per word, low nibble = even element),
    scales: uint8 `[E, out, in/32]` (E8M0), bias: `[E, out]` (the layout `ops.MXFP4Weights` names).
    """

    def __init__(self, num_experts: int, input_dims: int, output_dims: int) -> None:
        super().__init__()
        self.weight = mx.zeros((num_experts, output_dims, input_dims // 8), dtype=mx.uint32)
        self.scales = mx.zeros(
            (num_experts, output_dims, input_dims // MXFP4_BLOCK), dtype=mx.uint8
        )
        self.bias = mx.zeros((num_experts, output_dims))

    def __call__(self, x: mx.array, indices: mx.array, sorted_indices: bool = False) -> mx.array:
        """x `[..., 1, in]` broadcast against indices `[...]` -> `[..., 1, out]` (bias added)."""
        return ops.gather_mxfp4_matmul(x, self, indices, sorted_indices)


class Experts(nn.Module, kernels.UsesKernels):
    """The experts of one layer (all E, or `num_experts` of them on a rank): `gate_up_proj`
    (hidden -> 2I interleaved), `down_proj` (I -> hidden)."""

    # Whether a call reads device values on the host (an expert cache reads the router's choice):
    # then the decode step cannot be traced into one compiled graph.
    host_reads = False

    def __init__(self, config: ModelConfig, num_experts: int | None = None) -> None:
        super().__init__()
        E = config.num_experts if num_experts is None else num_experts
        H, I = config.hidden_size, config.intermediate_size
        self.gate_up_proj = MXFP4SwitchLinear(E, H, 2 * I)
        self.down_proj = MXFP4SwitchLinear(E, I, H)
        self.alpha = config.swiglu_alpha
        self.limit = config.swiglu_limit

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x `[N, H]`, indices and weights `[N, k]` -> `[N, H]`."""
        args = (self.gate_up_proj, self.down_proj, x, indices, weights, self.alpha, self.limit)
        out = kernels.experts(self.backend, *args)  # the fused decode kernels, or None
        return out if out is not None else ops.experts(*args)


class MoE(nn.Module):
    """`[B, T, H]` -> `[B, T, H]`: route each token to its top-k experts and mix their outputs.

    With a `shard`, the layer holds that rank's experts only and sums its output with the other
    ranks'.
    """

    def __init__(self, config: ModelConfig, shard: ExpertShard | None = None) -> None:
        super().__init__()
        self.experts_per_token = config.experts_per_token
        self.router = nn.Linear(config.hidden_size, config.num_experts, bias=True)
        self.experts = Experts(config, shard.count if shard else None)
        self.shard = shard

    def route(self, x: mx.array) -> tuple[mx.array, mx.array]:
        """Top-k expert indices `[N, k]` and their softmax weights `[N, k]` (softmax over the k
        only)."""
        k = self.experts_per_token
        logits = self.router(x)
        indices = mx.argpartition(-logits, kth=k - 1, axis=-1)[..., :k]
        top = mx.take_along_axis(logits, indices, axis=-1)
        return indices, mx.softmax(top, axis=-1, precise=True)

    def __call__(self, x: mx.array) -> mx.array:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        indices, weights = self.route(flat)
        if self.shard is None:
            return self.experts(flat, indices, weights).reshape(B, T, H)
        out = self.experts(flat, *self.shard.localize(indices, weights))
        return self.shard.combine(out).reshape(B, T, H)
