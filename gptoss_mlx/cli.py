"""The `gptoss-mlx` command line: a thin layer over the Python API.

Every command turns a `GptOssError` into a one-line message on stderr and exit status 1; a bad flag
(out of range, unknown choice) is one line too, with exit status 2.
"""

from __future__ import annotations

import functools
import json
import sys

import click

from .errors import GptOssError


def user_errors(command):
    """Report GptOssError (and Ctrl-C) as a message, never as a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GptOssError as e:
            click.secho(f"error: {e}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


class _Group(click.Group):
    """click's group, but a usage error is one line (`error: ...`) instead of usage + hint + error."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            rv = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except click.UsageError as e:
            where = f" (see '{e.ctx.command_path} --help')" if e.ctx is not None else ""
            click.secho(f"error: {e.format_message()}{where}", fg="red", err=True)
            sys.exit(e.exit_code)
        except click.ClickException as e:
            click.secho(f"error: {e.format_message()}", fg="red", err=True)
            sys.exit(e.exit_code)
        except click.exceptions.Abort:
            click.echo("aborted", err=True)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


@click.group(cls=_Group)
@click.version_option(package_name="gptoss-mlx")
def main():
    """gpt-oss-20b and gpt-oss-120b on Apple Silicon with MLX."""


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", "dst", required=True, help="Folder to write (must not exist).")
@click.option(
    "--dense-bits",
    type=click.Choice(["16", "8", "4"]),
    default=None,
    help="Quantize attention, embedding and unembedding to 8 or 4 bits (16: keep).",
)
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert_command(src, dst, dense_bits, force):
    """Convert SRC (folder or Hugging Face repo id) to an MLX-native folder at DST."""
    from .convert import convert

    out = convert(
        src, dst, dense_bits=int(dense_bits) if dense_bits else None, force=force, progress=True
    )
    click.echo(f"wrote {out}", err=True)


main.add_command(convert_command)

DEFAULT_MODEL = "openai/gpt-oss-20b"
EFFORTS = ["low", "medium", "high"]


def model_options(command):
    command = click.option(
        "--dtype",
        type=click.Choice(["bfloat16", "float16", "float32"]),
        default=None,
        help="Compute dtype of the dense weights [bfloat16].",
    )(command)
    return click.option(
        "-m",
        "--model",
        default=DEFAULT_MODEL,
        show_default=True,
        help="Checkpoint folder or Hugging Face repo id.",
    )(command)


def sampling_options(command):
    for option in reversed(
        [
            click.option(
                "--max-tokens",
                type=click.IntRange(min=1),
                default=4096,
                show_default=True,
                help="Most tokens to generate per reply (reasoning included).",
            ),
            click.option(
                "--temperature",
                type=click.FloatRange(min=0),
                default=1.0,
                show_default=True,
                help="0 is greedy.",
            ),
            click.option(
                "--top-p",
                type=click.FloatRange(0, 1, min_open=True),
                default=1.0,
                show_default=True,
                help="Nucleus sampling; 1 disables it.",
            ),
            click.option(
                "--top-k",
                type=click.IntRange(min=0),
                default=0,
                show_default=True,
                help="Sample among the K most likely tokens; 0 disables it.",
            ),
            click.option(
                "--min-p",
                type=click.FloatRange(0, 1, max_open=True),
                default=0.0,
                show_default=True,
                help="Drop tokens less likely than MIN_P x the best one.",
            ),
            click.option(
                "--seed",
                type=click.IntRange(0, 2**64 - 1),
                default=None,
                help="Random seed (reproducible output).",
            ),
            click.option(
                "--reasoning-effort",
                type=click.Choice(EFFORTS),
                default="medium",
                show_default=True,
                help="How much the model thinks before answering.",
            ),
            click.option(
                "--system",
                default=None,
                help="Instructions for the model (harmony's developer message).",
            ),
        ]
    ):
        command = option(command)
    return command


def _sampling(max_tokens, temperature, top_p, top_k, min_p, seed) -> dict:
    from .sample import check_sampling

    check_sampling(temperature, top_p, top_k, min_p)  # NaN gets past click's range types
    return dict(
        max_tokens=max_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        seed=seed,
    )


class _Printer:
    """Streams parsed deltas to stdout: reasoning dimmed (or hidden), then the answer, tool calls
    marked; a blank line between sections."""

    def __init__(self, hide_reasoning: bool = False):
        self.hide_reasoning = hide_reasoning
        self.section = None
        self.line_open = False

    def _write(self, text: str, **style) -> None:
        if text:
            click.echo(click.style(text, **style) if style else text, nl=False)
            self.line_open = not text.endswith("\n")

    def _enter(self, section: str) -> None:
        if self.section is not None and section != self.section:
            self._write("\n" if self.line_open else "")
            click.echo()
            self.line_open = False
        self.section = section

    def delta(self, d) -> None:
        if d.kind == "reasoning":
            if self.hide_reasoning:
                return
            self._enter("reasoning")
            self._write(d.text, dim=True)
        elif d.kind == "tool_call":
            if d.tool_call is not None:  # the call opens: name it
                self._enter(f"tool_call {d.tool_call_index}")
                self._write(f"[tool call] {d.tool_call['name']}: ", bold=True)
            self._write(d.text)
        else:
            self._enter("content")
            self._write(d.text)

    def end(self) -> None:
        if self.line_open:
            click.echo()
        self.section, self.line_open = None, False


def _stats_line(stats) -> None:
    if stats is not None:
        click.secho(stats.summary(), dim=True, err=True)


@click.command("generate")
@click.argument("prompt", required=False)
@model_options
@sampling_options
@click.option("--hide-reasoning", is_flag=True, help="Print only the answer (and tool calls).")
@click.option(
    "--raw", is_flag=True, help="Print the completion as harmony text, special tokens included."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: reasoning, content, tool_calls, token ids, statistics.",
)
@user_errors
def generate_command(
    prompt,
    model,
    dtype,
    max_tokens,
    temperature,
    top_p,
    top_k,
    min_p,
    seed,
    reasoning_effort,
    system,
    hide_reasoning,
    raw,
    as_json,
):
    """Answer PROMPT (or, without it, the text on stdin) with gpt-oss.

    Reasoning streams first (dimmed), then the answer; statistics go to stderr.
    """
    from . import harmony, load, stream_generate
    from .tokenizer import StreamingDetokenizer

    if raw and as_json:
        raise click.UsageError("choose one of --raw and --json")
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    prompt = prompt.strip()
    if not prompt:
        raise GptOssError("the prompt is empty")
    options = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed)
    interactive = sys.stderr.isatty()
    mdl, tok = load(model, dtype, progress=interactive)
    messages = ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": prompt}
    ]
    ids = harmony.render_prompt(messages, reasoning_effort=reasoning_effort, tokenizer=tok)

    printer, detok = _Printer(hide_reasoning), StreamingDetokenizer(tok)
    completion, stats = [], None
    for event in stream_generate(mdl, ids, tokenizer=tok, progress=interactive, **options):
        completion.append(event.token)
        stats = event.stats or stats
        if raw:
            click.echo(detok.add(event.token), nl=False)
        elif not as_json:
            for d in event.deltas:
                printer.delta(d)
    if raw:
        click.echo(detok.finalize())
    elif as_json:
        result = harmony.parse_completion(completion, tok)
        click.echo(
            json.dumps(
                {
                    "model": model,
                    "reasoning": result["reasoning"],
                    "content": result["content"],
                    "tool_calls": result["tool_calls"],
                    "finish_reason": stats.finish_reason,
                    "prompt_token_ids": ids,
                    "completion_token_ids": completion,
                    "stats": stats.to_dict(),
                },
                ensure_ascii=False,
            )
        )
    else:
        printer.end()
    _stats_line(stats)


CHAT_HELP = (
    "Commands: /reasoning low|medium|high, /reset, /stats, /help, /quit "
    "(or Ctrl-D). Ctrl-C stops a reply."
)


def _enable_line_editing() -> None:
    """Arrow keys and history for input() when a terminal is attached (stdlib readline)."""
    if sys.stdin is not None and sys.stdin.isatty():
        try:
            import readline  # noqa: F401  (importing it is what makes input() use it)
        except ImportError:  # Windows, or Python built without it
            pass


def _chat_command_line(session, line: str) -> bool:
    """Handle a /command; False when the chat should end."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        click.echo("(conversation cleared)", err=True)
    elif name == "stats":
        click.echo(session.stats.summary(), err=True)
    elif name == "reasoning":
        if not arg:
            click.echo(
                f"reasoning effort: {session.reasoning_effort} "
                "(change it with /reasoning low|medium|high)",
                err=True,
            )
        else:
            try:
                session.set_reasoning_effort(arg)
            except GptOssError as e:
                click.secho(f"error: {e}", fg="red", err=True)
            else:
                click.echo(
                    f"(reasoning effort: {session.reasoning_effort}; it lives in the "
                    "system message, so the next turn re-prefills the whole "
                    "conversation)",
                    err=True,
                )
    elif name == "help":
        click.echo(CHAT_HELP, err=True)
    else:
        click.secho(f"unknown command /{name}. {CHAT_HELP}", fg="red", err=True)
    return True


@click.command("chat")
@model_options
@sampling_options
@click.option("--hide-reasoning", is_flag=True, help="Print only the answers (and tool calls).")
@user_errors
def chat_command(
    model,
    dtype,
    max_tokens,
    temperature,
    top_p,
    top_k,
    min_p,
    seed,
    reasoning_effort,
    system,
    hide_reasoning,
):
    """Chat with gpt-oss. The KV cache is kept between turns: each turn prefills only its new
    tokens."""
    from . import ChatSession, load

    options = _sampling(max_tokens, temperature, top_p, top_k, min_p, seed)
    mdl, tok = load(model, dtype, progress=sys.stderr.isatty())
    session = ChatSession(
        mdl,
        tok,
        system=system,
        reasoning_effort=reasoning_effort,
        progress=sys.stderr.isatty(),
        **options,
    )
    _enable_line_editing()
    click.echo(f"Chatting with {model} (reasoning: {reasoning_effort}). {CHAT_HELP}", err=True)
    printer = _Printer(hide_reasoning)
    prompt = ">>> " if sys.stdin is not None and sys.stdin.isatty() else ""
    while True:
        try:
            line = input(prompt)
        except EOFError:
            click.echo()
            break
        except KeyboardInterrupt:  # at the prompt: drop the line, keep chatting
            click.echo()
            continue
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _chat_command_line(session, text):
                break
            continue
        try:
            for event in session.send(text):
                for d in event.deltas:
                    printer.delta(d)
        except KeyboardInterrupt:
            printer.end()
            click.echo("(reply interrupted)", err=True)
        printer.end()


main.add_command(generate_command)
main.add_command(chat_command)


@main.command("bench")
@click.option(
    "-m", "--model", "model_path", default=None, help="Checkpoint folder or Hugging Face repo id."
)
@click.option(
    "--synthetic",
    type=click.Choice(["20b", "120b", "tiny"]),
    default=None,
    help="Random weights at the real shapes (MXFP4 experts): no download needed.",
)
@click.option(
    "--prompt-tokens",
    default="512,2048,8192",
    show_default=True,
    help="Comma-separated prompt lengths.",
)
@click.option("--gen-tokens", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--repeats", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--warmup/--no-warmup", default=True, show_default=True)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default="bfloat16",
    show_default=True,
    help="Compute dtype (of every engine compared).",
)
@click.option(
    "--bandwidth",
    type=click.FloatRange(min=0, min_open=True),
    default=None,
    help="Memory bandwidth in GB/s, for the decode ceiling.",
)
@click.option("--chip", default=None, help='Apple chip name for its bandwidth, e.g. "M4 Max".')
@click.option(
    "--compare",
    type=click.Choice(["mlx-lm"]),
    default=None,
    help="Also run mlx-lm's gpt-oss on the same weights, alternating runs.",
)
@click.option(
    "--ops", is_flag=True, help="Also count the MLX primitives one decode step evaluates."
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@user_errors
def bench_command(
    model_path,
    synthetic,
    prompt_tokens,
    gen_tokens,
    repeats,
    warmup,
    dtype,
    bandwidth,
    chip,
    compare,
    ops,
    seed,
    as_json,
):
    """Measure prompt and decode speed, memory and bytes per token."""
    from .benchmark import Benchmark, chip_bandwidth, format_ops, format_table

    try:
        lengths = tuple(int(p) for p in prompt_tokens.split(",") if p.strip())
    except ValueError:
        raise GptOssError(
            f"--prompt-tokens must be comma-separated integers, not {prompt_tokens!r}"
        ) from None
    bandwidth = bandwidth or chip_bandwidth(chip)
    bench = Benchmark(
        model_path=model_path,
        synthetic=synthetic,
        compare=compare,
        dtype=dtype,
        seed=seed,
        progress=not as_json,
    )
    result = bench.run(lengths, gen_tokens=gen_tokens, repeats=repeats, warmup=warmup)
    result["bandwidth_gbs"] = bandwidth
    if bandwidth:
        result["decode_ceiling_tps"] = bandwidth * 1e9 / result["weight_bytes_per_token"]
    if ops:
        result["primitives_per_decode_step"] = bench.primitives()
    if as_json:
        click.echo(json.dumps(result, indent=1))
        return
    click.echo(format_table(result, bandwidth))
    if ops:
        click.echo("\n" + format_ops(result))
    import mlx.core as mx

    if not mx.metal.is_available():
        click.echo(
            "\nnote: no Metal GPU here; these are CPU figures (MLX's CPU backend), a proxy "
            "for graph-level efficiency, not Apple Silicon speed.",
            err=True,
        )


if __name__ == "__main__":
    main()
