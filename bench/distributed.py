#!/usr/bin/env python3
"""Tokens/s of 1, 2 and 3 ranks on this machine (MLX's ring backend over localhost), the bytes
each rank sends per token and the collectives per token.

Writes a synthetic checkpoint (published MXFP4 layout), then for each rank count runs this script
as a worker under `mlx.launch --backend ring -n N` (one plain process for N = 1). Each rank:

- loads its shard, and runs `Benchmark` (greedy, random prompt tokens; medians of --repeats);
- counts the collectives of one decoded token in the graph it evaluates (`rank_summary`);
- measures the bytes its ring sockets carried, from the kernel's TCP counters (Linux TCP_INFO
  `tcpi_bytes_acked`, i.e. payload sent and acknowledged), around a run of G generated tokens
  and a run of 2: their difference over G - 2 tokens is what one decoded token costs;
- times one all_sum of what a layer sums per decoded token (`[1, hidden]`), 200 in a row: the
  latency each of those collectives adds.

    python bench/distributed.py --config tiny --ranks 1,2,3 [--json]
    python bench/distributed.py --config 120b --layers 2 --prompt-tokens 32 --gen-tokens 8
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TCP_BYTES_ACKED = 120  # offset of tcpi_bytes_acked (u64) in Linux's struct tcp_info


def ring_bytes_sent() -> int | None:
    """Payload bytes this process's TCP sockets have sent and had acknowledged (Linux), or None
    where the counters cannot be read. A worker has no sockets but the ring's."""
    if not sys.platform.startswith("linux") or not hasattr(socket, "TCP_INFO"):
        return None
    total = 0
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        try:
            if not stat.S_ISSOCK(os.fstat(fd).st_mode):
                continue
            sock = socket.socket(fileno=os.dup(fd))
        except OSError:
            continue
        try:
            if sock.type == socket.SOCK_STREAM and sock.family == socket.AF_INET:
                info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
                if len(info) >= TCP_BYTES_ACKED + 8:
                    total += struct.unpack_from("<Q", info, TCP_BYTES_ACKED)[0]
        finally:
            sock.close()
    return total


def worker(args: argparse.Namespace) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    from gptoss_mlx import Benchmark, distributed

    group = distributed.connect()
    bench = Benchmark(model_path=args.model, dtype=args.dtype, seed=0, group=group)
    rank = group.rank() if group is not None else 0
    timed = bench.run((args.prompt_tokens,), args.gen_tokens, args.repeats, warmup=True)
    sent = []
    for tokens in (2, args.gen_tokens):
        before = ring_bytes_sent()
        bench.run((args.prompt_tokens,), tokens, 1, warmup=False)
        after = ring_bytes_sent()
        sent.append(None if before is None else after - before)
    latency = None
    if group is not None:
        one = mx.zeros((1, bench.model.config.hidden_size), dtype=bench.model.dtype)
        mx.eval(mx.distributed.all_sum(one, group=group))
        start = time.perf_counter()
        for _ in range(200):
            mx.eval(mx.distributed.all_sum(one, group=group))
        latency = (time.perf_counter() - start) / 200
    record = {
        "ranks": group.size() if group is not None else 1,
        "all_sum_seconds": latency,
        "median": timed["settings"][0]["median"]["gptoss-mlx"],
        "rank": timed.get("ranks"),
        "sent_per_decoded_token": (
            None if None in sent else (sent[1] - sent[0]) / (args.gen_tokens - 2)
        ),
        "sent_in_prefill_run": sent[0],
        "peak_memory_bytes": mx.get_peak_memory(),
        "weight_bytes": sum(a.nbytes for _, a in tree_flatten(bench.model.parameters())),
    }
    every = [record]
    if group is not None:  # rank 0 reports every rank's bytes sent and peak memory
        mine = mx.array([record["sent_per_decoded_token"] or 0, record["peak_memory_bytes"]])
        rows = mx.distributed.all_gather(mine.astype(mx.float32), group=group, stream=mx.cpu)
        every = [
            {"sent_per_decoded_token": s, "peak_memory_bytes": p}
            for s, p in rows.reshape(-1, 2).tolist()
        ]
    if rank == 0:
        print(json.dumps({**record, "per_rank": every}))


def run(ranks: int, args: argparse.Namespace, folder: str) -> dict:
    command = [sys.executable, os.path.abspath(__file__), "--worker", "--model", folder]
    command += ["--dtype", args.dtype, "--prompt-tokens", str(args.prompt_tokens)]
    command += ["--gen-tokens", str(args.gen_tokens), "--repeats", str(args.repeats)]
    if ranks > 1:
        launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
        command = [launcher, "--backend", "ring", "-n", str(ranks), "--"] + command
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with subprocess.Popen(
        command, cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    ) as proc:  # stdin stays open while it runs: mlx.launch spins on a closed one
        out = proc.stdout.read()
        proc.stdin.close()
        proc.wait()
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"{ranks} ranks failed (exit {proc.returncode}):\n{out}")
    return json.loads(lines[-1])


def write_checkpoint(config_name: str, layers: int, folder: str) -> str:
    from gptoss_mlx.benchmark import TINY
    from gptoss_mlx.config import preset
    from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint

    if config_name == "tiny":
        config = TINY
    else:
        config = preset(config_name).replace(
            num_hidden_layers=layers, vocab_size=8000, layer_types=()
        )
    tensors = random_checkpoint(config, numpy_blocks=True)
    save_checkpoint(folder, tensors, hf_config_json(config), shards=1)
    return folder


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--config", choices=["tiny", "20b", "120b"], default="tiny")
    parser.add_argument("--layers", type=int, default=2, help="for 20b/120b shapes")
    parser.add_argument("--ranks", default="1,2,3")
    parser.add_argument("--dtype", default="float32", help="float32: see bench/README.md")
    parser.add_argument("--prompt-tokens", type=int, default=64)
    parser.add_argument("--gen-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    with tempfile.TemporaryDirectory() as folder:
        write_checkpoint(args.config, args.layers, folder)
        results = [run(int(n), args, folder) for n in args.ranks.split(",")]
    if args.json:
        print(json.dumps(results, indent=1))
        return
    shapes = (
        "tiny" if args.config == "tiny" else f"{args.config} layer shapes, {args.layers} layers"
    )
    print(
        f"synthetic {shapes}, {args.dtype}, prompt {args.prompt_tokens}, "
        f"{args.gen_tokens} generated, medians of {args.repeats}, localhost ring"
    )
    print(
        f"{'ranks':>5} {'experts/rank':>14} {'weights/rank GB':>16} {'prompt tok/s':>13} "
        f"{'decode tok/s':>13} {'collectives/tok':>16} {'sent/tok/rank':>14} {'all_sum us':>11}"
    )
    for r in results:
        info = r["rank"] or {}
        experts = ",".join(map(str, info.get("experts_per_rank", []))) or "all"
        sent = [p["sent_per_decoded_token"] for p in r["per_rank"]]
        print(
            f"{r['ranks']:>5} {experts:>14} {r['weight_bytes'] / 1e9:>16.3f} "
            f"{r['median']['prompt_tps']:>13.1f} {r['median']['decode_tps']:>13.2f} "
            f"{info.get('collectives_per_token', 0):>16} "
            f"{(max(s or 0 for s in sent) if r['ranks'] > 1 else 0):>13.0f}B "
            f"{(r['all_sum_seconds'] or 0) * 1e6:>11.0f}"
        )


if __name__ == "__main__":
    main()
