"""An expert cache: at most K experts of each layer resident, the rest read from the checkpoint file
when the router picks them.

`ExpertCache` stands in for a layer's `moe.Experts`: its `gate_up_proj` and `down_proj` hold K
slots (MXFP4 weights, scales and biases `[K, ...]`) instead of E experts. A call

1. reads the router's choice `[N, k]` on the host: the one synchronisation per layer and step,
   which also keeps the decode step from being one compiled graph (`Experts.host_reads`);
2. makes every expert the batch needs resident: a hit is already in a slot; a miss is read from
   the checkpoint (`disk.DiskTensor`) into a free slot, else the least recently used one that this
   batch does not need;
3. maps expert ids to slot ids and runs the same expert ops as the resident model (the kernels or
   `ops.experts`), so its outputs are the resident model's, bit for bit.

A batch that needs more distinct experts than there are slots (a prefill chunk) is cut so that
each part fits: from `ops.SORT_THRESHOLD` token-expert pairs on (where the resident model sorts
the pairs by expert too) into groups of experts, each group's pairs computed by
`ops.sorted_expert_outputs` and all of them mixed at the end, every missing expert read once per
chunk; below it (where the fused kernels may run) into consecutive tokens whose experts fit. Each
part after the first waits for the one before (one more synchronisation), so a slot it overwrites
is free to be written in place. Experts read from disk are copied into their slots lazily, with the
layer's computation; a call that reads more than k (experts per token) waits for each k to be
copied before it reads more, so at most k read experts are held beside the slots, plus k of this
layer's previous call when nothing has evaluated its output (the last block of a prefill chunk
whose logits are not needed): the next call's wait for the router flushes them. A decode step
(which misses at most k per layer) waits exactly once per layer.

Counters (`ExpertCacheStats`): hits and misses (experts per layer call), bytes read from disk,
synchronisations (waits for results) and copies (waits for slot writes of more than k reads).
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from . import ops
from .config import ModelConfig
from .disk import StoredRows
from .errors import GptOssError
from .moe import Experts, MXFP4SwitchLinear

PROJECTIONS = ("gate_up_proj", "down_proj")
PARTS = ("weight", "scales", "bias")


@dataclass
class ExpertCacheStats:
    """What an expert cache did since it was made (summed over layers by the model)."""

    hits: int = 0  # experts a call needed that were resident
    misses: int = 0  # experts read from disk
    bytes_read: int = 0
    syncs: int = 0  # waits for the device's results: one per call, one per extra part of a batch
    copies: int = 0  # waits for k read experts to be copied into their slots, when a call reads
    # more than k (a prefill chunk's groups; no computation is pending then)


class ExpertCache(Experts):
    """A layer's experts in `slots` resident slots, read from `stored` (our parameter name within
    the layer's experts, e.g. "gate_up_proj.weight" -> where its `[E, ...]` rows lie on disk).

    On one rank of several (`num_experts`: the rank's count), it holds that rank's experts: the
    ids it is given are local (`distributed.ExpertShard.localize`) and `stored` are the rank's
    rows; a pair routed to another rank arrives as one of the token's local experts (or local
    expert 0) with weight 0, so it costs no read beyond, at worst, that expert."""

    host_reads = True

    def __init__(
        self,
        config: ModelConfig,
        slots: int,
        stored: dict[str, StoredRows],
        dtype: mx.Dtype,
        num_experts: int | None = None,
    ) -> None:
        super().__init__(config, num_experts)
        E = config.num_experts if num_experts is None else num_experts
        H, I = config.hidden_size, config.intermediate_size
        if not config.experts_per_token <= slots < E:
            raise GptOssError(
                f"--expert-cache must be between {config.experts_per_token} (experts per token) "
                f"and {E - 1} (all {E} experts resident needs no cache), not {slots}"
            )
        missing = [f"{p}.{q}" for p in PROJECTIONS for q in PARTS if f"{p}.{q}" not in stored]
        if missing:
            raise GptOssError(
                "the expert cache reads MXFP4 experts from the checkpoint file, and this "
                f"checkpoint does not store them that way ({missing[0]}); convert it first: "
                "gptoss-mlx convert SRC -o DST"
            )
        self.gate_up_proj = MXFP4SwitchLinear(slots, H, 2 * I)
        self.down_proj = MXFP4SwitchLinear(slots, I, H)
        for proj in (self.gate_up_proj, self.down_proj):
            proj.bias = proj.bias.astype(dtype)
        self._stored = stored
        self.num_slots = slots
        self.experts_per_token = config.experts_per_token
        self._slot_of = np.full(E, -1, np.int64)  # expert -> slot, -1 when not resident
        self._expert_in = np.full(slots, -1, np.int64)  # slot -> expert, -1 when free
        self._last_used = np.full(slots, -1, np.int64)  # slot -> clock of its last use
        self._clock = 0
        self.stats = ExpertCacheStats()

    @property
    def resident(self) -> list[int]:
        """The experts in the slots now."""
        return sorted(int(e) for e in self._expert_in if e >= 0)

    @property
    def expert_bytes(self) -> int:
        """Bytes one expert occupies in a slot (weights, scales and biases of both projections)."""
        parts = [getattr(getattr(self, p), q) for p in PROJECTIONS for q in PARTS]
        return sum(a.nbytes for a in parts) // self.num_slots

    def __call__(self, x: mx.array, indices: mx.array, weights: mx.array) -> mx.array:
        """x `[N, H]`, indices and weights `[N, k]` -> `[N, H]`, as `Experts` computes it."""
        # The one wait: for the router, and any copy into the slots still pending since this
        # layer's last call (usually done already, with that call's experts).
        mx.eval(indices, self._slot_arrays)
        chosen = np.asarray(indices).astype(np.int64)
        self.stats.syncs += 1
        needed = np.unique(chosen)
        if len(needed) <= self.num_slots:
            self._make_resident(needed)
            return super().__call__(x, self._slot_ids(chosen), weights)
        if chosen.size >= ops.SORT_THRESHOLD:
            return self._by_expert_groups(x, chosen, weights, needed)
        return self._by_token_groups(x, chosen, weights)

    def _slot_ids(self, experts: np.ndarray) -> mx.array:
        return mx.array(self._slot_of[experts].astype(np.uint32))

    def _make_resident(self, experts: np.ndarray) -> None:
        """Read the experts of `experts` (distinct, at most `num_slots`) that are not resident into
        free or least recently used slots that `experts` does not use."""
        self._clock += 1
        slots = self._slot_of[experts]
        hits = slots[slots >= 0]
        self._last_used[hits] = self._clock
        misses = experts[slots < 0]
        self.stats.hits += len(hits)
        self.stats.misses += len(misses)
        if not len(misses):
            return
        candidates = np.setdiff1d(np.arange(self.num_slots), hits)
        victims = candidates[np.argsort(self._last_used[candidates], kind="stable")]
        for i, (expert, slot) in enumerate(zip(misses, victims[: len(misses)], strict=True)):
            if i and i % self.experts_per_token == 0:  # more than k to read: copy k at a time
                mx.eval(self._slot_arrays)
                self.stats.copies += 1
            self._read(int(expert), int(slot))

    @property
    def _slot_arrays(self) -> list[mx.array]:
        return [getattr(getattr(self, p), q) for p in PROJECTIONS for q in PARTS]

    def _read(self, expert: int, slot: int) -> None:
        """Expert `expert` from the checkpoint into slot `slot`, in place."""
        previous = self._expert_in[slot]
        if previous >= 0:
            self._slot_of[previous] = -1
        for proj_name in PROJECTIONS:
            proj = getattr(self, proj_name)
            for part in PARTS:
                stored = self._stored[f"{proj_name}.{part}"]
                rows = stored.read([expert])
                target = getattr(proj, part)
                target[slot : slot + 1] = rows.astype(target.dtype)
                self.stats.bytes_read += stored.row_bytes
        self._slot_of[expert] = slot
        self._expert_in[slot] = expert
        self._last_used[slot] = self._clock

    def _wait_for(self, done: list[mx.array]) -> None:
        """Evaluate the parts computed so far, so that slots they read can be overwritten in
        place."""
        if done:
            mx.eval(done[-1])
            self.stats.syncs += 1

    def _by_expert_groups(
        self, x: mx.array, chosen: np.ndarray, weights: mx.array, needed: np.ndarray
    ) -> mx.array:
        """Token-expert pairs in groups of at most `num_slots` experts (the resident ones first),
        each group's pairs sorted by expert as `ops.experts` sorts them; outputs mixed at the
        end."""
        N, k = chosen.shape
        flat = chosen.reshape(-1)
        resident = self._slot_of[needed] >= 0
        ordered = np.concatenate([needed[resident], needed[~resident]])
        positions, outputs = [], []
        for start in range(0, len(ordered), self.num_slots):
            group = ordered[start : start + self.num_slots]
            self._wait_for(outputs)
            self._make_resident(group)
            pairs = np.nonzero(np.isin(flat, group))[0]
            slot_ids = self._slot_of[flat[pairs]]
            order = np.argsort(slot_ids, kind="stable")
            pairs, slot_ids = pairs[order], slot_ids[order]
            outputs.append(
                ops.sorted_expert_outputs(
                    self.gate_up_proj,
                    self.down_proj,
                    x[mx.array(pairs // k)],
                    mx.array(slot_ids.astype(np.uint32)),
                    self.alpha,
                    self.limit,
                )
            )
            positions.append(pairs)
        back = mx.array(np.argsort(np.concatenate(positions)))
        y = mx.concatenate(outputs)[back]  # [N*k, H], pair order
        return ops.mix(y.reshape(N, k, -1), weights)

    def _by_token_groups(self, x: mx.array, chosen: np.ndarray, weights: mx.array) -> mx.array:
        """Consecutive tokens whose experts fit in the slots, each group through `Experts`."""
        groups, current, seen = [], [], set()
        for t, experts in enumerate(chosen):
            if len(seen | set(experts.tolist())) > self.num_slots:
                groups.append(current)
                current, seen = [], set()
            current.append(t)
            seen |= set(experts.tolist())
        groups.append(current)
        outputs: list[mx.array] = []
        for tokens in groups:
            self._wait_for(outputs)
            self._make_resident(np.unique(chosen[tokens]))
            rows = mx.array(tokens)
            outputs.append(
                Experts.__call__(self, x[rows], self._slot_ids(chosen[tokens]), weights[rows])
            )
        return mx.concatenate(outputs)


def stored_experts(disk: dict[str, StoredRows], layer: int) -> dict[str, StoredRows]:
    """Where layer `layer`'s expert tensors lie on disk, by name within the layer's experts."""
    prefix = f"layers.{layer}.mlp.experts."
    return {name[len(prefix) :]: rows for name, rows in disk.items() if name.startswith(prefix)}
