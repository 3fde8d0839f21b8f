"""The `gptoss-mlx` command line: a thin layer over the Python API.

Every command turns a `GptOssError` into a one-line message on stderr and exit status 1; a bad flag
(out of range, unknown choice) is one line too, with exit status 2.

Under a launcher (`mlx.launch`, mpirun) `generate`, `chat`, `bench` and `serve` run as one rank of
several, the model's experts sharded across them (`gptoss_mlx.distributed`): rank 0 reads the
input (for `serve`, the HTTP requests) and shares it, every rank computes, and only rank 0 writes
output. An error names its rank.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable

import click

from . import (
    Benchmark,
    ChatSession,
    GenerationEvent,
    GenerationStats,
    GptOssError,
    MemoryPlan,
    StreamingDetokenizer,
    Tokenizer,
    ToolEvent,
    check_response_format,
    check_sampling,
    convert,
    distributed,
    generate,
    load,
    plan_memory,
    tools,
)
from .benchmark import bench_kernels, format_report
from .harmony import REASONING_EFFORTS, Delta
from .kernels import BACKENDS
from .server import create_app, follow, serve
from .server.app import REASONING_FORMATS


def user_errors(command: Callable) -> Callable:
    """Report GptOssError (and Ctrl-C) as a message, never as a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except GptOssError as e:
            click.secho(f"error: {_ranked(str(e))}", fg="red", err=True)
            sys.exit(1)
        except RuntimeError as e:  # a collective that failed because another rank went away
            failure = distributed.peer_failure(e)
            if failure is None:
                raise
            click.secho(f"error: {failure}", fg="red", err=True)
            sys.exit(1)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)

    return wrapper


def _connect() -> distributed.Group | None:
    """The ranks this command runs across (None: a single process). Across ranks the ring
    backend's own log lines are kept off stderr (`distributed.quiet_backend_logs`) and Ctrl-C or
    SIGTERM end the process at once, with one line (`distributed.end_on_signals`)."""
    group = distributed.connect()
    if group is not None:
        distributed.quiet_backend_logs()
        distributed.end_on_signals()
    return group


def _ranked(message: str) -> str:
    """`message`, naming this process's rank when it is one of several."""
    rank = distributed.launch_rank()
    if rank is None or message.startswith("rank "):
        return message
    return f"rank {rank}: {message}"


class _Group(click.Group):
    """click's group, but a usage error is one line (`error: ...`), not usage + hint + error."""

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
def main() -> None:
    """gpt-oss-20b and gpt-oss-120b on Apple Silicon with MLX."""


DEFAULT_MODEL = "openai/gpt-oss-20b"
SAMPLING = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "seed")


@main.command("convert")
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
def convert_command(src: str, dst: str, dense_bits: str | None, force: bool) -> None:
    """Convert SRC (folder or Hugging Face repo id) to an MLX-native folder at DST."""
    bits = int(dense_bits) if dense_bits else None
    out = convert(src, dst, dense_bits=bits, force=force, progress=True)
    click.echo(f"wrote {out}", err=True)


class ExpertCacheSize(click.ParamType):
    """`--expert-cache`: a number of experts per layer, or `auto`."""

    name = "K|auto"

    def convert(self, value, param, ctx) -> int | str:
        if isinstance(value, int) or value == "auto":
            return value
        try:
            number = int(value)
        except (TypeError, ValueError):
            number = 0
        if number < 1:
            self.fail(f"{value!r} is not a positive number of experts or auto", param, ctx)
        return number


MEMORY_OPTIONS = ("dense_bits", "kv_bits", "expert_cache", "max_context", "memory_budget")


def memory_options(command: Callable) -> Callable:
    """How the model is fitted to memory (`load`'s keywords of the same names); see
    `gptoss-mlx memory`."""
    for option in reversed(
        [
            click.option(
                "--dense-bits",
                type=click.Choice(["16", "8", "4"]),
                default=None,
                help="Attention, embedding and unembedding weights at 8 or 4 bits, quantized at "
                "load, or 16 as published [8; quantized checkpoints: as stored].",
            ),
            click.option(
                "--kv-bits",
                type=click.Choice(["16", "8", "4"]),
                default=None,
                help="Keys and values cached at 8 or 4 bits [16: unquantized].",
            ),
            click.option(
                "--expert-cache",
                type=ExpertCacheSize(),
                default=None,
                help="Keep at most K experts per layer resident, reading the others from disk "
                "when picked; auto: as many as fit [all resident].",
            ),
            click.option(
                "--max-context",
                type=click.IntRange(min=2),
                default=None,
                help="Most tokens (prompt and reply) a generation may use; memory is planned for "
                "it [the model's context].",
            ),
            click.option(
                "--memory-budget",
                type=click.FloatRange(min=0, min_open=True),
                default=None,
                help="GB the model may use: settings not given are chosen to fit it.",
            ),
            click.option(
                "--resident-embedding",
                is_flag=True,
                help="Keep the input embedding in memory instead of reading its rows from disk.",
            ),
        ]
    ):
        command = option(command)
    return command


def _memory(options: dict) -> dict:
    """`load`'s memory keywords from the options of `memory_options` (removed from `options`)."""
    out = {name: options.pop(name) for name in MEMORY_OPTIONS}
    for bits in ("dense_bits", "kv_bits"):
        out[bits] = int(out[bits]) if out[bits] else None
    out["embedding_from_disk"] = not options.pop("resident_embedding")
    return out


def _warn_if_it_does_not_fit(plan: MemoryPlan | None) -> None:
    if plan is not None and not plan.fits:
        click.secho(plan.warning(), fg="yellow", err=True)


def model_options(command: Callable) -> Callable:
    command = memory_options(command)
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


def _options(options: list[Callable]) -> Callable:
    """A decorator adding click options in the order given."""

    def decorate(command: Callable) -> Callable:
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


def sampling_options(command: Callable) -> Callable:
    """The generation options shared by generate and chat; they reach the command as keywords
    named as `stream_generate` names them (plus `reasoning_effort` and `system`)."""
    max_tokens = click.option(
        "--max-tokens",
        type=click.IntRange(min=1),
        default=4096,
        show_default=True,
        help="Most tokens to generate per reply (reasoning included).",
    )
    system = click.option(
        "--system",
        default=None,
        help="Instructions for the model (harmony's developer message).",
    )
    return _options([max_tokens, *_sampling_option_list(), system])(command)


def _sampling_option_list() -> list[Callable]:
    """--temperature, --top-p, --top-k, --min-p, --seed and --reasoning-effort."""
    return [
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
            type=click.Choice(REASONING_EFFORTS),
            default="medium",
            show_default=True,
            help="How much the model thinks before answering.",
        ),
    ]


def _sampling(options: dict) -> dict:
    """The sampling keywords of `options`, checked before the model loads (NaN gets past click's
    range types)."""
    sampling = {k: options[k] for k in SAMPLING}
    check_sampling(sampling["temperature"], sampling["top_p"], sampling["top_k"], sampling["min_p"])
    return sampling


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

    def delta(self, d: Delta) -> None:
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

    def event(self, event: GenerationEvent | ToolEvent) -> None:
        if isinstance(event, ToolEvent):
            self.tool_event(event)
            return
        for d in event.deltas:
            self.delta(d)

    def tool_event(self, event: ToolEvent) -> None:
        """A call about to run, its result (errors in red, long output shortened), or the
        round limit."""
        if event.kind == "tool_run":  # the call is complete: end its line (approval may follow)
            self._write("\n" if self.line_open else "")
            return
        self._enter(f"tool_result {id(event)}")
        name = event.call.recipient.removeprefix("functions.")
        if event.kind == "tool_limit":
            self._write(f"[{name} not run: the limit of tool rounds for one reply was reached]\n")
            return
        self._write(f"[{name} {'error' if event.error else 'result'}]\n", bold=True)
        lines = event.output.rstrip("\n").splitlines() or ["(no output)"]
        if len(lines) > TOOL_OUTPUT_LINES:
            cut = len(lines) - TOOL_OUTPUT_LINES
            lines = lines[:TOOL_OUTPUT_LINES] + [f"... ({cut} more lines)"]
        self._write("\n".join(lines) + "\n", **({"fg": "red"} if event.error else {"dim": True}))

    def end(self) -> None:
        if self.line_open:
            click.echo()
        self.section, self.line_open = None, False


TOOL_OUTPUT_LINES = 20  # lines of a tool's result the chat shows (the model reads all of it)


class _RawPrinter:
    """Streams the completion as harmony text, special tokens included."""

    def __init__(self, tokenizer: Tokenizer):
        self.detokenizer = StreamingDetokenizer(tokenizer)

    def event(self, event: GenerationEvent) -> None:
        click.echo(self.detokenizer.add(event.token), nl=False)

    def end(self) -> None:
        click.echo(self.detokenizer.finalize())


def _read_prompt(prompt: str | None) -> str:
    """PROMPT, or stdin when it is missing or "-"; a clear error when neither has text."""
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise click.UsageError("give a PROMPT, or pipe one on stdin")
        prompt = sys.stdin.read()
    prompt = prompt.strip()
    if not prompt:
        raise GptOssError("the prompt is empty")
    return prompt


def _response_format(
    json_schema: str | None, regex: str | None, grammar: str | None
) -> dict | None:
    """The response_format of --json-schema (a file or JSON text), --regex or --grammar (a
    file), checked before the model loads."""
    given = [v for v in (json_schema, regex, grammar) if v is not None]
    if len(given) > 1:
        raise click.UsageError("choose one of --json-schema, --regex and --grammar")
    if json_schema is not None:
        is_file = os.path.isfile(json_schema)
        try:
            if is_file:
                with open(json_schema, encoding="utf-8") as f:
                    schema = json.load(f)
            else:
                schema = json.loads(json_schema)
        except (OSError, ValueError) as e:
            what = f"file {json_schema}" if is_file else "value (not a file)"
            raise GptOssError(f"--json-schema {what} is not JSON: {e}") from None
        name = os.path.splitext(os.path.basename(json_schema))[0] if is_file else "response"
        fmt = {"type": "json_schema", "json_schema": {"name": name, "schema": schema}}
    elif regex is not None:
        fmt = {"type": "regex", "pattern": regex}
    elif grammar is not None:
        with open(grammar, encoding="utf-8") as f:
            fmt = {"type": "grammar", "grammar": f.read()}
    else:
        return None
    check_response_format(fmt)
    return fmt


@main.command("generate")
@click.argument("prompt", required=False)
@model_options
@sampling_options
@click.option(
    "--json-schema",
    metavar="FILE_OR_JSON",
    default=None,
    help="Make the answer JSON that follows this schema (a file, or the schema itself).",
)
@click.option("--regex", default=None, help="Make the whole answer match this regular expression.")
@click.option(
    "--grammar",
    type=click.Path(exists=True, dir_okay=False),
    default=None,
    help="Make the answer follow this Lark grammar (llguidance's syntax).",
)
@click.option("--hide-reasoning", is_flag=True, help="Print only the answer (and tool calls).")
@click.option(
    "--raw", is_flag=True, help="Print the completion as harmony text, special tokens included."
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON object: reasoning, content, tool_calls, token ids, statistics "
    "(and, with --json-schema, the answer parsed).",
)
@user_errors
def generate_command(
    prompt: str | None,
    model: str,
    dtype: str | None,
    reasoning_effort: str,
    system: str | None,
    json_schema: str | None,
    regex: str | None,
    grammar: str | None,
    hide_reasoning: bool,
    raw: bool,
    as_json: bool,
    **options,
) -> None:
    """Answer PROMPT (or, without it, the text on stdin) with gpt-oss.

    Reasoning streams first (dimmed), then the answer; statistics go to stderr. With
    --json-schema, --regex or --grammar the model reasons freely, then its answer follows the
    format.
    """
    if raw and as_json:
        raise click.UsageError("choose one of --raw and --json")
    if distributed.launched() and prompt in (None, "-"):
        raise click.UsageError(
            "across ranks give the PROMPT as an argument (mlx.launch passes stdin on to every "
            "rank but never closes it)"
        )
    response_format = _response_format(json_schema, regex, grammar)
    prompt = _read_prompt(prompt)
    memory = _memory(options)
    sampling = _sampling(options)
    group = _connect()
    leader = group is None or group.rank() == 0
    interactive = sys.stderr.isatty() and leader
    mdl, tok = load(model, dtype, progress=interactive, group=group, **memory)
    if leader:
        _warn_if_it_does_not_fit(getattr(mdl, "memory_plan", None))
    request = {"prompt": prompt, "system": system, "effort": reasoning_effort, **sampling}
    request["response_format"] = response_format
    request = distributed.Ranks(group).share(request)  # every rank runs rank 0's request
    messages = [{"role": "system", "content": request["system"]}] if request["system"] else []
    messages.append({"role": "user", "content": request["prompt"]})
    printer = None if as_json else _RawPrinter(tok) if raw else _Printer(hide_reasoning)
    result = generate(
        mdl,
        messages,
        tokenizer=tok,
        reasoning_effort=request["effort"],
        response_format=request["response_format"],
        progress=interactive,
        on_event=printer.event if printer and leader else None,
        **{k: request[k] for k in SAMPLING},
    )
    if not leader:
        return
    if as_json:
        click.echo(json.dumps({"model": model, **result}, ensure_ascii=False))
    else:
        printer.end()
    click.secho(GenerationStats(**result["stats"]).summary(), dim=True, err=True)


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


SEARCH_HELP = (
    "browser: no search backend, so the model can open URLs and find text in pages but not "
    "search. To search, give --search-url URL (a SearXNG instance with the json format enabled: "
    "'search: formats: [html, json]' in its settings.yml) or set BRAVE_API_KEY (Brave Search "
    "API)."
)


def _builtin_tools(names: str | None, search_url: str | None, serving: bool = False) -> list:
    """The built-in tools `--tools` names, configured from the flags and environment (for
    `serve`: python's session lasts one request)."""
    if not names:
        if search_url:
            raise click.UsageError("--search-url needs --tools browser")
        return []
    chosen = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in ("browser", "python")]
    if unknown or not chosen:
        raise click.UsageError(
            f"--tools takes browser, python or both (comma-separated), not {names!r}"
        )
    if search_url and "browser" not in chosen:
        raise click.UsageError("--search-url needs --tools browser")
    out = []
    if "browser" in chosen:
        if search_url:
            backend = tools.SearxngSearch(search_url)
        elif os.environ.get("BRAVE_API_KEY"):
            backend = tools.BraveSearch()
        else:
            backend = None
            click.secho(SEARCH_HELP, fg="yellow", err=True)
        out.append(tools.Browser(search=backend))
    if "python" in chosen:
        python = tools.Python(scope="reply" if serving else "conversation")
        isolation = {
            "bwrap": "bubblewrap: no network, writes only in its scratch directory",
            "unshare": "a network namespace: no network; writes NOT restricted",
            "sandbox-exec": "sandbox-exec: no network, writes only in its scratch directory",
            "none": "NO sandbox: the code can use the network and write files",
        }[python.isolation.name]
        where = (
            "the code any client has the model write runs on this machine: a separate process "
            "and scratch directory for each request"
            if serving
            else f"a separate process, scratch directory {python.scratch}"
        )
        click.echo(
            f"python: {where}, {python.timeout:g} s and {python.memory_limit // 1024**2} MB per "
            f"call, {isolation}.",
            err=True,
        )
        out.append(python)
    return out


def _ask_before_python(call: tools.ToolCall) -> bool:
    """Ask the person at the terminal before the model's Python code runs."""
    if call.namespace != "python":
        return True
    return click.confirm(click.style("Run this Python code?", fg="yellow"), default=False, err=True)


def _show_sources(browser: tools.Browser, answer: str) -> None:
    """The pages the answer cites (【cursor†Lstart-Lend】), one line each."""
    seen = []
    for c in browser.citations(answer):
        line = f"【{c.cursor}†L{c.start}" + (f"-L{c.end}" if c.end != c.start else "") + "】"
        entry = f"{line} {c.title} {c.url}".rstrip()
        if entry not in seen:
            seen.append(entry)
    if seen:
        click.secho("Sources:\n" + "\n".join(seen), dim=True)


def _chat_command_line(session: ChatSession, line: str, say: Callable[..., None]) -> bool:
    """Handle a /command, telling the user through `say` (`click.secho` on stderr, or nothing on
    a follower rank); False when the chat should end."""
    name, _, arg = line[1:].strip().partition(" ")
    arg = arg.strip()
    if name in ("quit", "exit", "q"):
        return False
    if name == "reset":
        session.reset()
        say("(conversation cleared)")
    elif name == "stats":
        say(session.stats.summary())
    elif name == "reasoning":
        if not arg:
            say(
                f"reasoning effort: {session.reasoning_effort} "
                "(change it with /reasoning low|medium|high)"
            )
        else:
            try:
                session.set_reasoning_effort(arg)
            except GptOssError as e:
                say(f"error: {e}", fg="red")
            else:
                say(
                    f"(reasoning effort: {session.reasoning_effort}; it lives in the "
                    "system message, so the next turn re-prefills the whole "
                    "conversation)"
                )
    elif name == "help":
        say(CHAT_HELP)
    else:
        say(f"unknown command /{name}. {CHAT_HELP}", fg="red")
    return True


@main.command("chat")
@model_options
@sampling_options
@click.option("--hide-reasoning", is_flag=True, help="Print only the answers (and tool calls).")
@click.option(
    "--tools",
    "tool_names",
    default=None,
    help="Built-in tools the model may use: browser, python, or browser,python.",
)
@click.option(
    "--search-url",
    default=None,
    help="A SearXNG instance for the browser's search (or set BRAVE_API_KEY).",
)
@click.option("--yes", is_flag=True, help="Run the model's Python code without asking.")
@click.option(
    "--max-tool-rounds",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Most rounds of tool calls in one reply.",
)
@user_errors
def chat_command(
    model: str,
    dtype: str | None,
    reasoning_effort: str,
    system: str | None,
    hide_reasoning: bool,
    tool_names: str | None,
    search_url: str | None,
    yes: bool,
    max_tool_rounds: int,
    **options,
) -> None:
    """Chat with gpt-oss. The KV cache is kept between turns: each turn prefills only its new
    tokens. With --tools the model can browse the web and run Python (asking you first).

    Across ranks rank 0 reads the lines (end with /quit: mlx.launch never closes stdin) and every
    rank runs them; Ctrl-C ends the run.
    """
    memory = _memory(options)
    sampling = _sampling(options)
    if distributed.launched() and tool_names:
        raise GptOssError("--tools does not run across ranks yet: chat without it")
    builtin = _builtin_tools(tool_names, search_url)
    group = _connect()
    leader = group is None or group.rank() == 0
    interactive = sys.stderr.isatty() and leader
    mdl, tok = load(model, dtype, progress=interactive, group=group, **memory)
    if leader:
        _warn_if_it_does_not_fit(getattr(mdl, "memory_plan", None))
    ranks = distributed.Ranks(group)
    session = ChatSession(
        mdl,
        tok,
        system=system,
        reasoning_effort=reasoning_effort,
        builtin_tools=builtin,
        max_tool_rounds=max_tool_rounds,
        approve=None if yes else _ask_before_python,
        progress=interactive,
        **sampling,
    )
    with session:
        _chat_loop(session, model, reasoning_effort, hide_reasoning, ranks)


def _chat_loop(
    session: ChatSession,
    model: str,
    effort: str,
    hide_reasoning: bool,
    ranks: distributed.Ranks,
) -> None:
    """Read lines (rank 0: from stdin, shared with the others; the others: rank 0's), run each
    as a command or a turn; only rank 0 says anything."""
    leader = ranks.leader
    say = functools.partial(click.secho, err=True) if leader else _say_nothing
    browser = session.tool_loop.builtin.get("browser")
    if leader:
        _enable_line_editing()
        say(f"Chatting with {model} (reasoning: {effort}). {CHAT_HELP}")
    printer = _Printer(hide_reasoning)
    prompt = ">>> " if sys.stdin is not None and sys.stdin.isatty() else ""
    while True:
        line = _next_line(prompt, ranks)
        if line is None:
            if leader:
                click.echo()
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            if not _chat_command_line(session, text, say):
                break
            continue
        answer = []
        try:
            for event in session.send(text):
                if leader:
                    printer.event(event)
                if getattr(event, "kind", None) == "content":
                    answer.append(event.text)
        except KeyboardInterrupt:
            if ranks.size > 1:  # the others are mid-reply: the run ends
                raise
            printer.end()
            click.echo("(reply interrupted)", err=True)
        if not leader:
            continue
        printer.end()
        if browser is not None:
            _show_sources(browser, "".join(answer))


def _say_nothing(*args, **kwargs) -> None:
    """What a follower rank tells the user: nothing (rank 0 speaks for all)."""


def _next_line(prompt: str, ranks: distributed.Ranks) -> str | None:
    """The next line of the chat ("" after Ctrl-C at the prompt), None at the end of input. Across
    ranks rank 0 reads it, the followers ticking meanwhile, and shares it."""
    if not ranks.leader:
        return ranks.receive()
    try:
        with ranks.idle():
            line = input(prompt)
    except EOFError:
        line = None
    except KeyboardInterrupt:  # at the prompt: drop the line, keep chatting
        click.echo()
        line = ""
    return ranks.share(line)


class IntList(click.ParamType):
    """A comma-separated list of positive integers, e.g. `512,2048`."""

    name = "INT,INT,..."

    def convert(self, value, param, ctx) -> tuple[int, ...]:
        if isinstance(value, tuple):
            return value
        try:
            values = tuple(int(v) for v in str(value).split(",") if v.strip())
        except ValueError:
            values = ()
        if not values or any(v < 1 for v in values):
            self.fail(f"{value!r} is not a comma-separated list of positive integers", param, ctx)
        return values


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
    type=IntList(),
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
@click.option(
    "--kernels",
    "kernel_table",
    is_flag=True,
    help="Instead: time each custom Metal kernel against its mlx path and print the decision.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@memory_options
@user_errors
def bench_command(
    model_path: str | None,
    synthetic: str | None,
    prompt_tokens: tuple[int, ...],
    gen_tokens: int,
    repeats: int,
    warmup: bool,
    dtype: str,
    bandwidth: float | None,
    chip: str | None,
    compare: str | None,
    ops: bool,
    kernel_table: bool,
    seed: int,
    as_json: bool,
    **options,
) -> None:
    """Measure prompt and decode speed, memory and bytes per token (across ranks under
    mlx.launch: each rank on its shard, rank 0 reporting)."""
    if kernel_table:
        click.echo(bench_kernels(model_path, synthetic, progress=not as_json))
        return
    if distributed.launched() and compare:
        raise GptOssError("--compare runs in one process: not across ranks")
    group = _connect()
    leader = group is None or group.rank() == 0
    bench = Benchmark(
        model_path=model_path,
        synthetic=synthetic,
        compare=compare,
        dtype=dtype,
        seed=seed,
        progress=not as_json and leader,
        bandwidth=bandwidth,
        chip=chip,
        group=group,
        **_memory(options),
    )
    if leader and not as_json:
        _warn_if_it_does_not_fit(getattr(bench.model, "memory_plan", None))
    distributed.Ranks(group)  # from here a rank that stops or hangs ends the others
    result = bench.run(prompt_tokens, gen_tokens, repeats, warmup, ops=ops)
    if leader:
        click.echo(json.dumps(result, indent=1) if as_json else format_report(result))


@main.command("serve")
@model_options
@click.option(
    "--kernels",
    type=click.Choice(BACKENDS),
    default=None,
    help="Kernel backend [auto: Metal where available, else the mlx ops].",
)
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True)
@click.option("--api-key", default=None, help="Require 'Authorization: Bearer KEY' on /v1.")
@click.option(
    "--model-name", default=None, help="The model's name in /v1/models [the model's folder name]."
)
@click.option(
    "--prompt-cache-gb",
    type=click.FloatRange(min=0),
    default=2.0,
    show_default=True,
    help="Memory for the KV caches of recent conversations (0: none).",
)
@click.option(
    "--max-queue",
    type=click.IntRange(min=0),
    default=32,
    show_default=True,
    help="Requests that may wait for the model; beyond, 503 with Retry-After.",
)
@click.option(
    "--reasoning-format",
    type=click.Choice(REASONING_FORMATS),
    default="reasoning",
    show_default=True,
    help="The Chat Completions field reasoning goes out in.",
)
@click.option(
    "--max-tokens",
    type=click.IntRange(min=1),
    default=None,
    help="Most tokens per reply when a request does not say [the rest of the context].",
)
@click.option(
    "--tools",
    "tool_names",
    default=None,
    help="Built-in tools run server-side: browser, python, or browser,python. Python runs the "
    "code clients have the model write: enable it only for clients you trust.",
)
@click.option(
    "--search-url",
    default=None,
    help="A SearXNG instance for the browser's search (or set BRAVE_API_KEY).",
)
@click.option(
    "--max-tool-rounds",
    type=click.IntRange(min=0),
    default=10,
    show_default=True,
    help="Most built-in tool calls run in one reply.",
)
@_options(_sampling_option_list())
@user_errors
def serve_command(
    model: str,
    dtype: str | None,
    kernels: str | None,
    host: str,
    port: int,
    model_name: str | None,
    tool_names: str | None,
    search_url: str | None,
    **options,
) -> None:
    """Serve gpt-oss over an OpenAI-compatible HTTP API (Chat Completions and Responses).

    Point any OpenAI client at http://HOST:PORT/v1. Requests are queued and run one at a time;
    the KV caches of recent conversations are kept, so each turn prefills only its new tokens.
    With --tools the server runs the browser and python tools itself (each request its own).
    Across ranks rank 0 serves HTTP (and runs the tools) and the others follow its generations;
    Ctrl-C ends the run.
    """
    check_sampling(options["temperature"], options["top_p"], options["top_k"], options["min_p"])
    memory = _memory(options)
    group = _connect()
    leader = group is None or group.rank() == 0
    if leader and host not in ("127.0.0.1", "localhost", "::1") and not options["api_key"]:
        click.secho(f"warning: listening on {host} with no --api-key", fg="yellow", err=True)
    builtin = _builtin_tools(tool_names, search_url, serving=True) if leader else []
    progress = sys.stderr.isatty() and leader
    mdl, tok = load(model, dtype, progress=progress, kernels=kernels, group=group, **memory)
    if not leader:
        follow(mdl, tok)
        return
    _warn_if_it_does_not_fit(getattr(mdl, "memory_plan", None))
    name = model_name or model.rstrip("/").rsplit("/", 1)[-1]
    app = create_app(mdl, tok, model_name=name, builtin_tools=builtin, **options)
    ranks = f" across {group.size()} ranks" if group is not None else ""
    click.echo(f"Serving {model} as {name!r}{ranks} on http://{host}:{port}/v1", err=True)
    serve(app, host, port)


@main.command("memory")
@click.option(
    "-m",
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="Checkpoint folder or Hugging Face repo id (only its config and headers are read).",
)
@click.option(
    "--context",
    type=click.IntRange(min=1),
    default=None,
    help="Plan the KV cache for this many tokens [--max-context, else the model's context].",
)
@click.option(
    "--dtype",
    type=click.Choice(["bfloat16", "float16", "float32"]),
    default=None,
    help="Compute dtype [bfloat16].",
)
@click.option(
    "--prefill-chunk",
    type=click.IntRange(min=1),
    default=512,
    show_default=True,
    help="Tokens per prefill chunk.",
)
@memory_options
@click.option("--json", "as_json", is_flag=True, help="Print the plan as one JSON object.")
@user_errors
def memory_command(
    model: str,
    context: int | None,
    dtype: str | None,
    prefill_chunk: int,
    as_json: bool,
    **options,
) -> None:
    """Plan the memory MODEL needs, before loading anything: the weights by part, the KV cache,
    one prefill chunk's working set, against this machine; and what makes it fit."""
    plan = plan_memory(
        model, dtype, context=context, prefill_chunk=prefill_chunk, **_memory(options)
    )
    click.echo(json.dumps(plan.to_dict(), indent=1) if as_json else plan.report())


if __name__ == "__main__":
    main()
