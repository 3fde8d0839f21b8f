"""One model across several processes (ranks) with `mx.distributed`: experts sharded by rank.

The split is expert parallel. Rank r of N holds experts [start_r, stop_r) of every layer (E // N
each, the first E % N ranks one more) and everything else whole: embedding, attention, router,
norms, unembedding. Every rank routes every token (the router is replicated, so all agree), runs
its own experts for the token-expert pairs routed to them, and the ranks' MoE outputs are summed:

    local pair   (e in [start_r, stop_r)):  expert e - start_r, weight w
    other pair:                              a local stand-in expert, weight 0
    moe(x) = all_sum over ranks of  sum_k w_k y_k          one all_sum of [T, H] per layer

The shapes never depend on the routing, so the decode step stays one compiled graph with no host
sync per layer. Sampling stays identical on every rank because rank 0's token is the one every
rank feeds back (`shared_sampler`): one all_sum of one id per token.

The runtime of a distributed command (`Ranks`): rank 0, the leader, reads input, decides and writes
output; the others follow the commands it shares (`share`). A collective that waits on a rank
that died fails at once (MLX's ring backend notices the closed socket); one that waits on a rank
that hangs, or on a machine that dropped off the network, is ended by a watchdog after
`GPTOSS_MLX_DISTRIBUTED_TIMEOUT` seconds without progress (generation, or the leader's ticks
while it waits for input). Either way each rank ends with a one-line error.
"""

from __future__ import annotations

import atexit
import contextlib
import hashlib
import json
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import numpy as np

from .errors import GptOssError

Group = mx.distributed.Group  # the ranks of a run, as `mx.distributed.init()` returns them

TIMEOUT_ENV = "GPTOSS_MLX_DISTRIBUTED_TIMEOUT"
DEFAULT_TIMEOUT = 60.0  # seconds: connecting, and the longest wait without progress
TICK = 1.0  # seconds between the leader's ticks while it waits for input
_TICK = {"gptoss-mlx": "tick"}  # what a tick shares

# Environment a launcher sets for each process: mlx.launch (ring, jaccl), mpirun, NCCL.
_LAUNCH_ENV = ("MLX_HOSTFILE", "MLX_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MLX_WORLD_SIZE")


# --- which experts a rank holds -------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class ExpertShard:
    """The experts one rank holds, out of `num_experts` per layer, and the group it sums with."""

    group: Group
    num_experts: int

    @property
    def rank(self) -> int:
        return self.group.rank()

    @property
    def size(self) -> int:
        return self.group.size()

    @property
    def start(self) -> int:
        base, extra = divmod(self.num_experts, self.size)
        return self.rank * base + min(self.rank, extra)

    @property
    def count(self) -> int:
        base, extra = divmod(self.num_experts, self.size)
        return base + (self.rank < extra)

    @property
    def stop(self) -> int:
        return self.start + self.count

    def localize(self, indices: mx.array, weights: mx.array) -> tuple[mx.array, mx.array]:
        """Routing over all experts (indices, weights `[N, k]`) -> the same over this rank's.

        A pair routed elsewhere keeps its place with weight 0 and a local stand-in: the token's
        first local expert when it has one (read for it anyway), else local expert 0.
        """
        indices = indices.astype(mx.int32)
        local = (indices >= self.start) & (indices < self.stop)
        own = indices - self.start
        first = mx.take_along_axis(own, mx.argmax(local, axis=-1, keepdims=True), axis=-1)
        stand_in = mx.where(mx.any(local, axis=-1, keepdims=True), first, 0)
        return mx.where(local, own, stand_in), mx.where(local, weights, mx.zeros_like(weights))

    def combine(self, partial: mx.array) -> mx.array:
        """This rank's share of the MoE output -> the whole of it: the sum over the ranks."""
        beat()  # the model is building the next chunk or token: the last one finished
        return mx.distributed.all_sum(partial, group=self.group)


def expert_shard(num_experts: int, group: Group | None) -> ExpertShard | None:
    """The shard this process holds in `group`; None for a single process (or no group)."""
    if group is None or group.size() == 1:
        return None
    if group.size() > num_experts:
        raise GptOssError(
            f"{group.size()} ranks for {num_experts} experts per layer: every rank must hold at "
            f"least one expert; run on at most {num_experts} ranks"
        )
    return ExpertShard(group, num_experts)


# --- sampling -------------------------------------------------------------------------------------

STOPPED = -1  # the token id every rank draws once rank 0's generation is cancelled


def _drawn(token: mx.array, cancelled: Callable[[], bool] | None) -> mx.array:
    """`token` as int32, or STOPPED if `cancelled()` says so now (as the draw is queued)."""
    return mx.where(cancelled is not None and cancelled(), STOPPED, token.astype(mx.int32))


def leader_token(
    token: mx.array, group: Group | None, cancelled: Callable[[], bool] | None = None
) -> mx.array:
    """Rank 0's `token` (int32) on every rank, lazily: one all_sum of the ids. STOPPED instead
    when rank 0's `cancelled()` is true as the draw is queued (the other ranks' is not asked).

    Every rank's share depends on its own `token`, even where it is replaced: collectives run in
    the order their inputs allow, and this one must follow the model's on every rank alike.
    """
    if group is None or group.size() == 1:
        return token
    beat()
    leads = group.rank() == 0
    mine = mx.where(leads, _drawn(token, cancelled if leads else None), 0)
    return mx.distributed.all_sum(mine, group=group)


def shared_sampler(
    sampler: Callable[[mx.array], mx.array],
    group: Group | None,
    cancelled: Callable[[], bool] | None = None,
) -> Callable[[mx.array], mx.array]:
    """`sampler`, with every rank taking rank 0's token: the ranks' logits can differ in the last
    bits (Macs of different chips round differently), their tokens never do.

    With `cancelled`, a draw queued once it returns true is STOPPED, on every rank alike: rank 0's
    cancellation travels with its token, so every rank ends the generation at the same token
    without a collective of its own. The generation feeds a valid token in its place (the step
    was queued before the draw was read) and drops that step.
    """
    if group is not None and group.size() > 1:
        return lambda logits: leader_token(sampler(logits), group, cancelled)
    if cancelled is None:
        return sampler
    return lambda logits: _drawn(sampler(logits), cancelled)


# --- connecting -----------------------------------------------------------------------------------


def timeout_seconds() -> float:
    """$GPTOSS_MLX_DISTRIBUTED_TIMEOUT, else DEFAULT_TIMEOUT."""
    raw = os.environ.get(TIMEOUT_ENV)
    if raw is None:
        return DEFAULT_TIMEOUT
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise GptOssError(f"{TIMEOUT_ENV} must be a number of seconds > 0, not {raw!r}")
    return value


def launched() -> bool:
    """Whether a launcher (mlx.launch, mpirun) started this process as one of several."""
    if not any(os.environ.get(k) for k in _LAUNCH_ENV):
        return False
    hostfile = os.environ.get("MLX_HOSTFILE")
    if hostfile and os.environ.get("MLX_RANK") is not None:
        try:  # `mlx.launch -n 1` writes an empty hostfile: one process
            with open(hostfile) as f:
                return len(json.loads(f.read() or "[]")) > 1
        except (OSError, ValueError):
            return True  # let init report it
    return True


def launch_rank() -> str | None:
    """This process's rank as its launcher numbered it (None when not launched as one of several),
    known before connecting: for messages."""
    if not launched():
        return None
    return os.environ.get("MLX_RANK", os.environ.get("OMPI_COMM_WORLD_RANK", "?"))


def connect(timeout: float | None = None) -> Group | None:
    """The group of the ranks this process was launched with, connected; None when it was not
    launched as one of several. GptOssError when the others cannot be reached within `timeout`
    seconds (default: `timeout_seconds()`)."""
    if not launched():
        return None
    timeout = timeout_seconds() if timeout is None else timeout
    rank = launch_rank()
    fired = threading.Event()
    start = time.monotonic()
    # MLX's ring backend waits for its left neighbour in accept() with no time limit; an alarm
    # interrupts that wait (in the main thread only). Connecting to the right neighbour gives up
    # by itself, after 5 tries over about 31 s, whatever the timeout.
    alarm = threading.current_thread() is threading.main_thread()
    if alarm:
        previous = signal.signal(signal.SIGALRM, lambda *_: fired.set())
        signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        group = mx.distributed.init(strict=True)
    except RuntimeError as e:
        waited = time.monotonic() - start
        why = f"no answer in {waited:.0f} s" if fired.is_set() else str(e)
        raise GptOssError(
            f"rank {rank}: cannot connect to the other ranks ({why}); check that every rank was "
            f"started, the hostfile's addresses and the network ({TIMEOUT_ENV} sets the wait)"
        ) from None
    finally:
        if alarm:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)
    return group if group.size() > 1 else None


def peer_failure(error: BaseException) -> GptOssError | None:
    """The one-line error for a collective that failed because another rank went away, or None
    when `error` is something else."""
    text = str(error)
    rank = launch_rank()
    if isinstance(error, RuntimeError) and text.startswith(("[ring]", "[mpi]", "[jaccl]")):
        return GptOssError(
            f"rank {rank}: another rank stopped, crashed or dropped off the network ({text})"
        )
    return None


def check_same_model(group: Group, description: dict) -> None:
    """GptOssError unless every rank of `group` describes its model the same way (configuration,
    dtype): ranks that loaded different checkpoints would compute nonsense together. Every rank
    waits here for the slowest to finish loading."""
    differ = _differing_rank(group, json.dumps(description, sort_keys=True).encode())
    if differ is not None:
        raise GptOssError(
            f"rank {differ} loaded a different model than rank 0 (configuration or dtype): "
            "give every rank the same checkpoint and options"
        )


def check_same_tokens(ids: list[int], group: Group | None) -> None:
    """GptOssError unless every rank is about to run the same token ids. Ranks that drifted apart
    (a prompt rendered differently) would otherwise exchange arrays of different shapes."""
    if group is None or group.size() == 1:
        return
    differ = _differing_rank(group, np.asarray(ids, dtype=np.int64).tobytes())
    if differ is not None:
        raise GptOssError(
            f"rank {differ} is about to run other tokens than rank 0: every rank must be "
            "given the same prompt (rank 0 shares its input: see gptoss_mlx.distributed.Ranks)"
        )
    beat()


def _differing_rank(group: Group, data: bytes) -> int | None:
    """The first rank whose `data` differs from rank 0's (compared by digest), or None."""
    digest = np.frombuffer(hashlib.sha256(data).digest(), np.uint8)
    every = mx.distributed.all_gather(mx.array(digest), group=group, stream=mx.cpu)
    rows = np.array(every).reshape(group.size(), -1)
    return next((r for r in range(group.size()) if (rows[r] != rows[0]).any()), None)


# --- the watchdog ---------------------------------------------------------------------------------


class Watchdog:
    """Ends this process with a one-line error when no progress was made for `timeout` seconds
    while armed. Progress is `beat()`: a shared command, a leader's tick, a chunk or token built."""

    def __init__(self, rank: int, timeout: float):
        self.rank, self.timeout = rank, timeout
        self.last = time.monotonic()
        self.armed = False
        threading.Thread(target=self._watch, name="gptoss-watchdog", daemon=True).start()

    def beat(self) -> None:
        self.last = time.monotonic()

    def arm(self) -> None:
        self.beat()
        self.armed = True

    def _watch(self) -> None:
        while True:
            time.sleep(min(1.0, self.timeout / 4))
            if self.armed and time.monotonic() - self.last > self.timeout:
                fail(
                    f"rank {self.rank}: no progress for {self.timeout:g} s: another rank hung or "
                    f"the network failed (the wait is set by {TIMEOUT_ENV})"
                )


_watchdog: Watchdog | None = None  # one per process, as mx.distributed's group is


def beat() -> None:
    """Mark progress for this process's watchdog, if it has one."""
    if _watchdog is not None:
        _watchdog.beat()


def fail(message: str) -> None:
    """Print `error: message` and end the process now, from any thread (the main one may be
    blocked in a collective that will never finish)."""
    _exit(f"error: {message}\n", 1)


_ending = threading.Lock()  # held by the one thread that ends the process


def _exit(line: str, status: int) -> None:
    """Write `line` to stderr and end the process, even if stderr is gone (a launcher that died
    closes the pipe it read the ranks' output from). Only the first thread to call it writes: a
    lost rank can be noticed by several at once, and the user reads one line."""
    _ending.acquire()
    try:
        os.write(_stderr_fd, line.encode())
    finally:
        os._exit(status)


def end_on_signals() -> None:
    """Across ranks, Ctrl-C (SIGINT) and SIGTERM end this process at once with one line, even
    while its main thread waits in a collective that will never finish (Python would run its
    handlers only once that wait returns). mlx.launch sends SIGTERM to every rank when one fails.

    The signals wake a thread through Python's wakeup fd; that thread ends the process.
    """
    if threading.current_thread() is not threading.main_thread():
        return
    read, write = os.pipe()
    os.set_blocking(write, False)
    for number in (signal.SIGINT, signal.SIGTERM):
        signal.signal(number, lambda *_: None)  # the wakeup fd does the work
    signal.set_wakeup_fd(write)
    rank = launch_rank()

    def watch() -> None:
        number = os.read(read, 1)[0]
        if number == signal.SIGINT:
            _exit("interrupted\n", 130)
        fail(
            f"rank {rank}: stopped by {signal.Signals(number).name} (mlx.launch stops every "
            "rank when one fails)"
        )

    threading.Thread(target=watch, name="gptoss-signals", daemon=True).start()


# --- the backend's own logs -----------------------------------------------------------------------


_stderr_fd = 2  # where this process's stderr really goes (see quiet_backend_logs)
_BACKEND_LOG = b"[ring]"
_CONNECTION_LOST = b"Too many send/recv errors"  # what the ring logs as it gives a connection up
_LOST = "[ring] connection to a peer was lost"  # and the error it then raises, if it can


def quiet_backend_logs() -> None:
    """Drop the ring backend's log lines from this process's stderr; everything else passes; and
    end this process at once, with one line, when the ring says it lost a connection.

    When a peer goes away MLX's ring backend logs "[ring] Socket 3 was closed by the peer" ten
    times and "Too many send/recv errors" before the collective fails; the one-line error that
    follows says what happened. That last line is also the only sure sign: MLX raises the
    failure only in the main thread and only as it queues more work, while every collective
    queued after it waits on the lost connection for ever (the ring's socket thread has
    returned), so this process cannot go on. $MLX_RING_VERBOSE (MLX's own switch for its logs)
    keeps them, and leaves the ending to the error or the watchdog.
    """
    global _stderr_fd
    if os.environ.get("MLX_RING_VERBOSE") or _stderr_fd != 2:
        return
    sys.stderr.flush()
    _stderr_fd = os.dup(2)
    read, write = os.pipe()
    os.dup2(write, 2)
    os.close(write)
    pump = threading.Thread(target=_filter_lines, args=(read, _stderr_fd), daemon=True)
    pump.start()

    def restore() -> None:  # at exit: the pipe's last writer closes, the pump drains it
        sys.stderr.flush()
        os.dup2(_stderr_fd, 2)
        pump.join(timeout=5)

    atexit.register(restore)


def _filter_lines(source: int, target: int) -> None:
    """Copy `source` to `target` as it comes, except lines starting with _BACKEND_LOG; end the
    process on _CONNECTION_LOST. C++ writes a line in pieces, so the start of each line is held
    until it tells which it is."""
    start, state = b"", "start"  # state: "start" (deciding), "pass" or "drop" (to the newline)
    dropped = b""  # the line being dropped, up to the length of _CONNECTION_LOST
    while data := os.read(source, 65536):
        while data:
            if state == "start":
                take = data[: len(_BACKEND_LOG) - len(start)]
                if b"\n" in take:
                    take = take[: take.index(b"\n") + 1]
                start, data = start + take, data[len(take) :]
                if start.endswith(b"\n"):  # a line shorter than the mark
                    os.write(target, start)
                    start = b""
                    continue
                if len(start) < len(_BACKEND_LOG):
                    break  # wait for the rest of the line's start
                state = "drop" if start == _BACKEND_LOG else "pass"
                if state == "pass":
                    os.write(target, start)
                start = b""
            end = data.find(b"\n")
            piece = data if end < 0 else data[: end + 1]
            data = data[len(piece) :]
            if state == "pass":
                os.write(target, piece)
            else:
                dropped = (dropped + piece)[: len(_CONNECTION_LOST) + 1]
                if dropped.lstrip().startswith(_CONNECTION_LOST):
                    fail(str(peer_failure(RuntimeError(_LOST))))
            if end >= 0:
                state, dropped = "start", b""
    if start:
        os.write(target, start)


# --- leader and followers -------------------------------------------------------------------------


class Ranks:
    """This process's part in a distributed command: rank 0 (the leader) reads input and shares
    what to do; the others receive it and do the same, silently. With no group (or a group of
    one) this process is the leader and sharing hands the message back.

    Construct it once the model is loaded: from then on the watchdog is armed.
    """

    def __init__(self, group: Group | None, timeout: float | None = None):
        global _watchdog
        self.group = group
        self.rank, self.size = (group.rank(), group.size()) if group is not None else (0, 1)
        self.leader = self.rank == 0
        self._lock = threading.Lock()  # one collective at a time: the ticker's or the main's
        if self.size == 1:
            return
        if _watchdog is None:
            _watchdog = Watchdog(self.rank, timeout_seconds() if timeout is None else timeout)
        _watchdog.arm()

    def share(self, message: Any = None) -> Any:
        """The leader's `message` (JSON-serialisable) on every rank; the others pass nothing."""
        if self.size == 1:
            return message
        with self._lock:
            return self._share(message)

    def _share(self, message: Any) -> Any:
        data = json.dumps(message).encode() if self.leader else b""
        n = mx.distributed.all_sum(
            mx.array([len(data)], mx.int32), group=self.group, stream=mx.cpu
        ).item()
        if self.leader:
            payload = mx.array(np.frombuffer(data, np.uint8))
        else:
            payload = mx.zeros((n,), mx.uint8)
        out = mx.distributed.all_sum(payload, group=self.group, stream=mx.cpu)
        text = bytes(np.array(out)).decode()
        beat()
        return json.loads(text)

    def receive(self) -> Any:
        """A follower's next command from the leader (its ticks skipped)."""
        while True:
            message = self.share()
            if message != _TICK:
                return message

    @contextlib.contextmanager
    def idle(self) -> Iterator[None]:
        """On the leader, around a wait for input (a line, a request): the followers get a tick
        every TICK seconds, so they know it is alive and the leader knows they are."""
        if not self.leader or self.size == 1:
            yield
            return
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(TICK):
                with self._lock:
                    if stop.is_set():
                        return
                    try:
                        self._share(_TICK)
                    except RuntimeError as e:
                        error = peer_failure(e)
                        fail(str(error) if error else f"rank {self.rank}: {e}")

        ticker = threading.Thread(target=tick, name="gptoss-ticker", daemon=True)
        ticker.start()
        try:
            yield
        finally:
            stop.set()
            ticker.join()
