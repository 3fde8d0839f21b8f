#!/usr/bin/env python3
"""Decode speed with and without a response format, reasoning and answer measured separately.

A synthetic model (random weights in the published MXFP4 layout) with the real o200k vocabulary
of 201088 tokens, so that harmony prompts, the tokenizer and llguidance's masks are the real
ones. The random model is steered (tests/scripted.py's SteeredModel) to open an analysis message
and end it after `--reasoning` tokens, as a trained model would; everything else it writes is
its own random choice. `--shape scripted` replaces the model by tests/scripted.py's
ScriptedModel replaying a fixed completion (the reasoning, then a valid JSON answer): a step
costs little more than the decode loop itself, so the loop's own per-token cost shows.
Each repeat generates from the same prompt and seed twice, alternating:

* unconstrained: no format; after its reasoning the model writes `--answer` free tokens;
* constrained: a JSON schema response format; after the same reasoning (checked token for token)
  the final header is forced and the answer follows the schema, every token masked.

Reported per stretch: decode tokens/s (tokens after the stretch's first / time from its first
to its last token, as `GenerationStats` counts them), medians over the repeats; and the host
time per masked token spent computing masks (llguidance, then the copy of the packed mask).

    python bench/structured.py [--shape tiny|micro] [--reasoning 64] [--answer 64] [--repeats 5]
    python bench/structured.py --unconstrained-only   # only what existed before constraints

`--unconstrained-only` uses only the API that predates structured output, so the same script
measures the unconstrained path on an older checkout (before/after a change to the decode loop).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import mlx.core as mx  # noqa: E402

from gptoss_mlx import harmony, stream_generate  # noqa: E402
from gptoss_mlx.benchmark import TINY  # noqa: E402
from gptoss_mlx.loading import build_model, parse_dtype  # noqa: E402
from gptoss_mlx.synthetic import hf_config_json, random_checkpoint  # noqa: E402
from gptoss_mlx.tokenizer import default_tokenizer  # noqa: E402
from gptoss_mlx.weights import checkpoint_from_tensors  # noqa: E402
from tests.scripted import ScriptedModel, SteeredModel  # noqa: E402

SHAPES = {
    # The `gptoss-mlx bench --synthetic tiny` shape: 4 layers, hidden 512, 8 experts of 512.
    "tiny": TINY.replace(vocab_size=201088),
    # The test suite's o200k model: per-token work is mostly the unembedding and the loop itself,
    # so the mask's share of a step is as large as it gets.
    "micro": TINY.replace(vocab_size=201088, hidden_size=32, intermediate_size=32),
    "scripted": None,
}
# Strings bounded so that the random model ends its answer; every token of it is masked.
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "tags": {"type": "array", "items": {"enum": ["a", "b", "c"]}, "maxItems": 3},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["name", "age", "tags", "score"],
    "additionalProperties": False,
}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA}}
# What the scripted model answers (valid against SCHEMA, so the masks allow every token of it).
ANSWER = '{"name": "Ada Lovelace", "age": 36, "tags": ["a", "b", "c"], "score": 0.8125}'


def tps(times: list[float]) -> float:
    return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 else float("nan")


def run(model, tok, prompt, args, seed, fmt=None):
    """(tokens, arrival time of each, stats) of one generation."""
    analysis = "<|channel|>analysis<|message|>"
    if model is None:  # scripted: the reasoning, then ANSWER (free, or under the format)
        text = analysis + " think" * args.reasoning + "<|end|>"
        text += "<|start|>assistant<|channel|>final<|message|>" + ANSWER + "<|return|>"
        steered = ScriptedModel.from_harmony(text, tok)
    else:
        steered = SteeredModel.writing(model, tok, (0, analysis), (3 + args.reasoning, "<|end|>"))
    extra = {"response_format": fmt} if fmt is not None else {}
    tokens, times, stats = [], [], None
    for event in stream_generate(
        steered,
        prompt,
        tokenizer=tok,
        seed=seed,
        max_tokens=9 + args.reasoning + (args.answer if fmt is None else 2000),
        **extra,
    ):
        tokens.append(event.token)
        times.append(time.perf_counter())
        stats = event.stats or stats
    return tokens, times, stats


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--reasoning", type=int, default=64)
    parser.add_argument("--answer", type=int, default=64, help="free answer tokens (unconstrained)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--unconstrained-only", action="store_true")
    args = parser.parse_args()

    config = SHAPES[args.shape]
    model = None
    if config is not None:
        tensors = random_checkpoint(config, seed=0)
        model = build_model(
            checkpoint_from_tensors(tensors, hf_config_json(config)), parse_dtype(args.dtype)
        )
        del tensors
    tok = default_tokenizer()
    messages = [{"role": "user", "content": "Invent a person and describe them."}]
    # The prompt with the schema in it for both runs: only the constraint differs.
    prompt = harmony.render_prompt(
        messages, tokenizer=tok, **({} if args.unconstrained_only else {"response_format": FORMAT})
    )
    reasoning = slice(3, 3 + args.reasoning)  # the analysis message's text tokens
    # The answer: after the reasoning's <|end|> and the final header (forced when constrained).
    header = len(tok.encode("<|start|>assistant<|channel|>final<|message|>", allow_special=True))
    answer = slice(3 + args.reasoning + 1 + header, None)
    run(model, tok, prompt, args, args.seed)  # warm up (compilation, llguidance's tokenizer)
    if not args.unconstrained_only:
        run(model, tok, prompt, args, args.seed, FORMAT)

    rows = {k: [] for k in ("free_reason", "free_answer", "c_reason", "c_answer", "mask_us")}
    for r in range(args.repeats):
        seed = args.seed + r
        tokens, times, _ = run(model, tok, prompt, args, seed)
        rows["free_reason"].append(tps(times[reasoning]))
        rows["free_answer"].append(tps(times[answer]))
        free_tokens = len(tokens[answer])
        if args.unconstrained_only:
            continue
        c_tokens, c_times, stats = run(model, tok, prompt, args, seed, FORMAT)
        assert c_tokens[reasoning] == tokens[reasoning], "the reasoning changed under the format"
        rows["c_reason"].append(tps(c_times[reasoning]))
        rows["c_answer"].append(tps(c_times[answer]))
        rows["mask_us"].append(stats.mask_seconds / stats.masked_tokens * 1e6)
        json_tokens = len(c_tokens[answer])

    med = {k: statistics.median(v) for k, v in rows.items() if v}
    shape = (
        "ScriptedModel (logits of a fixed completion), vocabulary 201088"
        if config is None
        else f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, "
        f"{config.num_experts} experts, vocabulary {config.vocab_size}; {args.dtype}"
    )
    print(
        f"shape {args.shape}: {shape}; MLX {mx.__version__} on "
        f"{'Metal' if mx.metal.is_available() else 'CPU'}; prompt {len(prompt)} tokens; "
        f"medians of {args.repeats}"
    )
    print(f"{'stretch':<28} {'unconstrained tok/s':>20} {'constrained tok/s':>18}")
    if args.unconstrained_only:
        print(f"{'reasoning (' + str(args.reasoning) + ' tokens)':<28} {med['free_reason']:>20.2f}")
        print(f"{'answer (' + str(free_tokens) + ' free tokens)':<28} {med['free_answer']:>20.2f}")
        return
    print(
        f"{'reasoning (' + str(args.reasoning) + ' tokens)':<28} {med['free_reason']:>20.2f} "
        f"{med['c_reason']:>18.2f}"
    )
    print(
        f"{'answer (free / JSON, masked)':<28} {med['free_answer']:>20.2f} {med['c_answer']:>18.2f}"
        f"   (last runs: {free_tokens} free / {json_tokens} JSON tokens)"
    )
    print(f"host time computing a mask: {med['mask_us']:.0f} us per masked token (mean per run)")
    step_ms = 1e3 / med["free_answer"]
    print(f"decode step without a mask: {step_ms:.1f} ms")


if __name__ == "__main__":
    main()
