"""`gptoss-mlx serve` against `stream_generate`: what the HTTP layer costs, what the prompt cache
saves.

    python bench/server.py [--tokens 256] [--repeats 5] [--dtype float32]
    python bench/server.py --ranks 2 [--tokens 256] [--repeats 5]

The model: random weights with the CPU-proxy head geometry of `gptoss_mlx.benchmark.TINY` (64-dim
heads, 16 query / 2 KV heads, window 128, 8 experts, 4 layers) at hidden size 64, and
gpt-oss's real 201088-token vocabulary, so harmony prompts apply. On the 2-core CPU it decodes
40 to 70 tokens/s (14 to 26 ms a token): the per-token time of gpt-oss on a Mac is of that order, so
the HTTP layer's per-token cost weighs here about as it would there. The server runs in a child
process (uvicorn, as `gptoss-mlx serve` runs it) on the same weights; this process is its client
(httpx), so client and server do not share an interpreter.

1. Throughput. One prompt, greedy, exactly `--tokens` tokens (the random model writes no stop
   token), prompt cache off so both sides prefill the same prompt. Tokens per second = tokens /
   wall time from the call to the last event: `stream_generate` consumed in this process, against
   a streamed Chat Completion from sending the request to receiving `data: [DONE]` (every token
   after the first 64 a chunk: the random model's first 64 tokens read as a harmony header).
   Runs alternate; medians of `--repeats`.
2. Time to first token at turn 6 of an agent-like conversation: a system prompt with tools, then
   turns that each send back the reply and add a ~300-token result, 16-token replies. Turn 6 is
   sent with `max_tokens: 1` and not streamed, so its latency is prefill plus one token; against a
   server with the prompt cache and one without (`--prompt-cache-gb 0`). A fresh conversation per
   repeat; medians. Random replies carry no tool calls, but what the cache does is the same as
   for a tool loop: it reuses everything up to the end of the previous reply.
3. Across ranks (`--ranks N`, N > 1; then only this): `gptoss-mlx serve` of the same model
   saved to a folder, as one process and under `mlx.launch --backend ring -n N` on this machine
   (the experts sharded, rank 0 serving, the others following): the streamed throughput of 1.,
   and the latency of a conversation's second turn (prompt cache on, `max_tokens: 1`, not
   streamed).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

import httpx
import mlx.core as mx
import uvicorn

from gptoss_mlx import stream_generate
from gptoss_mlx.benchmark import TINY
from gptoss_mlx.harmony import render_prompt
from gptoss_mlx.loading import build_model, parse_dtype
from gptoss_mlx.server import create_app
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint, save_checkpoint
from gptoss_mlx.tokenizer import default_tokenizer
from gptoss_mlx.weights import checkpoint_from_tensors

CONFIG = TINY.replace(vocab_size=201088, hidden_size=64, intermediate_size=64)
SYSTEM = "You are a coding agent. " + " ".join(
    f"Rule {i}: read the files before you change them, and run the tests after." for i in range(60)
)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} in the workspace.",
            "parameters": {
                "type": "object",
                "properties": {"path": {"type": "string"}, "text": {"type": "string"}},
                "required": ["path"],
            },
        },
    }
    for name in ("read_file", "write_file", "run_tests", "search")
]


def build(dtype: str, seed: int):
    tensors = random_checkpoint(CONFIG, seed=seed)
    mx.eval(tensors)
    checkpoint = checkpoint_from_tensors(tensors, hf_config_json(CONFIG))
    return build_model(checkpoint, parse_dtype(dtype))


def serve(args) -> None:
    model = build(args.dtype, args.seed)
    app = create_app(
        model, default_tokenizer(), model_name="bench", prompt_cache_gb=args.prompt_cache_gb
    )
    uvicorn.run(app, host="127.0.0.1", port=args.serve, log_level="warning")


class Server:
    """A child process serving the bench model; or, given the model's `folder`, `gptoss-mlx
    serve` of it as `ranks` processes (under `mlx.launch` when more than one)."""

    def __init__(self, args, port: int, prompt_cache_gb: float, folder=None, ranks: int = 1):
        command = [sys.executable, __file__, "--serve", str(port), "--dtype", args.dtype]
        command += ["--prompt-cache-gb", str(prompt_cache_gb), "--seed", str(args.seed)]
        if folder is not None:
            command = [sys.executable, "-m", "gptoss_mlx.cli", "serve", "-m", folder]
            command += ["--dtype", args.dtype, "--port", str(port)]
            command += ["--prompt-cache-gb", str(prompt_cache_gb)]
        if ranks > 1:
            launcher = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
            command = [launcher, "--backend", "ring", "-n", str(ranks), "--", *command]
        self.process = subprocess.Popen(  # its own group: the ranks end with it
            command,
            env={**os.environ, "PYTHONPATH": _root()},
            stdin=subprocess.PIPE,  # mlx.launch spins on a closed stdin
            stdout=subprocess.DEVNULL if folder is not None else None,  # uvicorn's access log
            start_new_session=True,
        )
        self.url = f"http://127.0.0.1:{port}"
        while True:
            assert self.process.poll() is None, "the server exited"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)

    def chat(self, body: dict) -> tuple[float, dict]:
        """(seconds to the last byte, the response or the last usage chunk)."""
        tic = time.perf_counter()
        if not body.get("stream"):
            r = httpx.post(self.url + "/v1/chat/completions", json=body, timeout=None)
            return time.perf_counter() - tic, r.json()
        tail = b""
        with httpx.stream("POST", self.url + "/v1/chat/completions", json=body, timeout=None) as r:
            for chunk in r.iter_raw():  # the client reads, and parses only the last event
                tail = (tail + chunk)[-4096:]
        seconds = time.perf_counter() - tic
        last = [line for line in tail.split(b"\n") if line.startswith(b"data: {")][-1]
        return seconds, json.loads(last[6:])

    def close(self) -> None:
        os.killpg(self.process.pid, signal.SIGTERM)
        self.process.wait()
        self.process.stdin.close()


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def throughput(args, model, tok) -> None:
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    ids = render_prompt(messages, tokenizer=tok)
    server = Server(args, args.port, prompt_cache_gb=0)
    body = {
        "messages": messages,
        "max_tokens": args.tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    direct, served = [], []
    try:
        for _ in range(args.repeats + 1):  # the first round warms both up
            tic = time.perf_counter()
            events = stream_generate(
                model, ids, tokenizer=tok, max_tokens=args.tokens, temperature=0
            )
            n = sum(1 for _ in events)
            direct.append(n / (time.perf_counter() - tic))
            seconds, last = server.chat(body)
            assert last["usage"]["completion_tokens"] == args.tokens, last
            served.append(args.tokens / seconds)
    finally:
        server.close()
    d, s = statistics.median(direct[1:]), statistics.median(served[1:])
    print(
        f"throughput, prompt {len(ids)} tokens + {args.tokens} generated, medians of "
        f"{args.repeats}:\n  stream_generate  {d:8.2f} tok/s\n  server (SSE)     {s:8.2f} tok/s"
        f"\n  overhead         {100 * (1 - s / d):8.2f} %"
    )


def turn_six(args) -> None:
    results = {}
    for label, gb in (("prompt cache", 2.0), ("no prompt cache", 0.0)):
        server = Server(args, args.port + 1, prompt_cache_gb=gb)
        seconds, cached, prompt = [], [], 0
        try:
            for repeat in range(args.repeats + 1):
                messages = [{"role": "system", "content": SYSTEM}]
                for turn in range(1, 7):
                    result = " ".join(
                        f"line {turn}.{i}: value {repeat * 1000 + i}" for i in range(40)
                    )
                    messages.append({"role": "user", "content": f"Result of step {turn}: {result}"})
                    body = {"messages": messages, "tools": TOOLS, "temperature": 0}
                    body["max_tokens"] = 1 if turn == 6 else 16
                    took, reply = server.chat(body)
                    messages.append(reply["choices"][0]["message"])
                if repeat:  # the first conversation warms up
                    seconds.append(took)
                    cached.append(reply["usage"]["prompt_tokens_details"]["cached_tokens"])
                    prompt = reply["usage"]["prompt_tokens"]
        finally:
            server.close()
        results[label] = (statistics.median(seconds), statistics.median(cached), prompt)
    print(f"time to first token at turn 6 (max_tokens 1, not streamed), medians of {args.repeats}:")
    for label, (s, cached, prompt) in results.items():
        print(f"  {label:<16} {s:8.3f} s   prompt {prompt} tokens, {cached:.0f} from the cache")


def across_ranks(args) -> None:
    messages = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
    first = {"messages": messages, "max_tokens": args.tokens, "temperature": 0, "stream": True}
    first["stream_options"] = {"include_usage": True}
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        tensors = random_checkpoint(CONFIG, seed=args.seed, numpy_blocks=True)
        save_checkpoint(folder, tensors, hf_config_json(CONFIG))
        for ranks in (1, args.ranks):
            server = Server(args, args.port + 2, 2.0, folder=folder, ranks=ranks)
            tps, second = [], []
            try:
                for _ in range(args.repeats + 1):  # the first round warms up
                    seconds, last = server.chat(first)
                    assert last["usage"]["completion_tokens"] == args.tokens, last
                    tps.append(args.tokens / seconds)
                    _, reply = server.chat({**first, "stream": False, "max_tokens": 16})
                    turn = [*messages, reply["choices"][0]["message"]]
                    turn.append({"role": "user", "content": f"And then? ({len(tps)})"})
                    took, reply = server.chat({"messages": turn, "max_tokens": 1})
                    assert reply["usage"]["prompt_tokens_details"]["cached_tokens"] > 0, reply
                    second.append(took)
            finally:
                server.close()
            rows.append((ranks, statistics.median(tps[1:]), statistics.median(second[1:])))
    print(
        f"gptoss-mlx serve across ranks (localhost ring), {args.tokens} tokens streamed, medians "
        f"of {args.repeats}:"
    )
    for ranks, tps, took in rows:
        print(
            f"  {ranks} rank{'s' if ranks > 1 else ' '}  {tps:8.2f} tok/s   2nd turn {took:.3f} s"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--ranks", type=int, default=1, help="N > 1: only 3., across N ranks")
    parser.add_argument("--serve", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--prompt-cache-gb", type=float, default=2.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve is not None:
        return serve(args)
    print(
        f"model: random, {CONFIG.num_hidden_layers} layers, hidden {CONFIG.hidden_size}, "
        f"vocabulary {CONFIG.vocab_size}, window {CONFIG.sliding_window}, {args.dtype}; "
        f"MLX {mx.__version__} on {'Metal' if mx.metal.is_available() else 'CPU'}"
    )
    model, tok = build(args.dtype, args.seed), default_tokenizer()
    if args.ranks > 1:
        return across_ranks(args)
    throughput(args, model, tok)
    turn_six(args)


if __name__ == "__main__":
    main()
