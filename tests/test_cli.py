"""The CLI as a user runs it: `python -m gptoss_mlx.cli` in a subprocess, on a tiny checkpoint with
the real o200k vocabulary (so harmony prompts and the tokenizer are the real ones)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import click
import pytest
from click.testing import CliRunner
from scripted import ScriptedModel

from gptoss_mlx import cli as cli_module
from gptoss_mlx import generate, harmony, load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def cli(*args, input=None):
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(
        [sys.executable, "-m", "gptoss_mlx.cli", *args],
        input=input,
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def ok(result):
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    return result


@pytest.fixture(scope="module")
def model_tok(o200k_dir):
    return load(o200k_dir)


def user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [
        {"role": "user", "content": text}
    ]


def test_generate_json(o200k_dir, model_tok):
    model, tok = model_tok
    r = ok(
        cli(
            "generate",
            "Why is the sky blue?",
            "-m",
            o200k_dir,
            "--max-tokens",
            "5",
            "--temperature",
            "0",
            "--json",
        )
    )
    out = json.loads(r.stdout)
    assert set(out) >= {
        "reasoning",
        "content",
        "tool_calls",
        "prompt_token_ids",
        "completion_token_ids",
        "finish_reason",
        "stats",
    }
    assert out["prompt_token_ids"] == harmony.render_prompt(
        user("Why is the sky blue?"), tokenizer=tok
    )
    expected = generate(model, out["prompt_token_ids"], tokenizer=tok, max_tokens=5, temperature=0)
    assert out["completion_token_ids"] == expected["completion_token_ids"]
    assert {k: out[k] for k in ("reasoning", "content", "tool_calls")} == {
        k: expected[k] for k in ("reasoning", "content", "tool_calls")
    }
    assert out["finish_reason"] == "length"
    assert out["stats"]["prompt_tokens"] == len(out["prompt_token_ids"])
    assert out["stats"]["generation_tokens"] == 5 and out["stats"]["peak_memory"] > 0
    assert "generation: 5 tokens" in r.stderr  # the statistics line


def test_prompt_from_stdin_system_and_reasoning_effort(o200k_dir, model_tok):
    _, tok = model_tok
    r = ok(
        cli(
            "generate",
            "-m",
            o200k_dir,
            "--max-tokens",
            "2",
            "--json",
            "--seed",
            "1",
            "--system",
            "Talk like a pirate.",
            "--reasoning-effort",
            "high",
            input="What is MLX?\n",
        )
    )
    want = harmony.render_prompt(
        user("What is MLX?", "Talk like a pirate."), reasoning_effort="high", tokenizer=tok
    )
    assert json.loads(r.stdout)["prompt_token_ids"] == want


def test_streamed_raw_and_json_agree(o200k_dir, model_tok):
    _, tok = model_tok
    common = (
        "generate",
        "Hello",
        "-m",
        o200k_dir,
        "--max-tokens",
        "6",
        "--seed",
        "7",
        "--top-p",
        "0.9",
        "--top-k",
        "40",
        "--min-p",
        "0.01",
    )
    out = json.loads(ok(cli(*common, "--json")).stdout)
    raw = ok(cli(*common, "--raw")).stdout
    assert raw == tok.decode(out["completion_token_ids"]) + "\n"  # same seed, same tokens
    streamed = ok(cli(*common)).stdout
    assert out["content"].strip() in streamed


@pytest.mark.parametrize(
    "args",
    [
        ["--temperature", "-1"],
        ["--temperature", "nan"],
        ["--max-tokens", "0"],
        ["--max-tokens", "-5"],
        ["--top-p", "2"],
        ["--top-p", "0"],
        ["--top-k", "-1"],
        ["--min-p", "1"],
        ["--reasoning-effort", "extreme"],
        ["--seed", "-1"],
        ["--raw", "--json"],
    ],
)
def test_bad_flags_are_one_line_errors(o200k_dir, args):
    r = cli("generate", "Hi", "-m", o200k_dir, *args)
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("model", ["does/not/exist/anywhere", "EMPTY"])
def test_unknown_model_is_a_one_line_error(tmp_path, model):
    r = cli(
        "generate", "Hi", "-m", str(tmp_path) if model == "EMPTY" else model, "--max-tokens", "2"
    )
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), r.stderr


def test_empty_prompt_is_an_error(o200k_dir):
    r = cli("generate", "-m", o200k_dir, input="  \n")
    assert r.returncode == 1 and r.stderr.strip() == "error: the prompt is empty"


def test_chat_keeps_the_cache_across_turns(o200k_dir, model_tok):
    _, tok = model_tok
    r = ok(
        cli(
            "chat",
            "-m",
            o200k_dir,
            "--max-tokens",
            "4",
            "--temperature",
            "0",
            input="hi\n/stats\nagain\n/stats\n/reasoning high\n/bogus\n/quit\nnever sent\n",
        )
    )
    stats = re.findall(r"prefilled: (\d+) tokens in all, (\d+) last turn", r.stderr)
    first = len(harmony.render_prompt(user("hi"), tokenizer=tok))
    turn = len(harmony.render_turn(user("again"), tokenizer=tok))
    # Turn 2 prefills its own tokens plus the last sampled token and <|end|>, nothing older.
    assert stats == [(str(first), str(first)), (str(first + turn + 2), str(turn + 2))]
    assert "re-prefills" in r.stderr and "unknown command /bogus" in r.stderr
    assert "turns: 2" in r.stderr and r.stdout.strip()


def test_chat_ends_cleanly_at_end_of_input(o200k_dir):
    r = ok(cli("chat", "-m", o200k_dir, "--max-tokens", "2", input="hello\n"))
    assert r.stdout.strip()


# -- what a person sees: reasoning, answer, tool calls, statistics (a scripted model) -------------

THOUGHT_AND_ANSWER = (
    "<|channel|>analysis<|message|>The user greets me.<|end|>"
    "<|start|>assistant<|channel|>final<|message|>Hello there!<|return|>"
)


def run_scripted(monkeypatch, tok, completion, *args):
    """`gptoss-mlx generate Hi ARGS` in-process, the model replaced by one that emits
    `completion`; ANSI styles kept so dimming is visible."""
    model = ScriptedModel.from_harmony(completion, tok)
    monkeypatch.setattr(cli_module, "load", lambda *a, **kw: (model, tok))
    result = CliRunner().invoke(cli_module.main, ["generate", "Hi", *args], color=True)
    assert result.exit_code == 0, result.stderr
    return result


def test_reasoning_is_shown_dimmed_before_the_answer(monkeypatch, tok):
    r = run_scripted(monkeypatch, tok, THOUGHT_AND_ANSWER)
    plain = click.unstyle(r.stdout)
    assert plain.index("The user greets me.") < plain.index("Hello there!")
    dim_open = click.style("", dim=True, reset=False)  # the ANSI code that starts dim text
    dimmed = re.findall(re.escape(dim_open) + r"(.*?)\x1b\[0m", r.stdout)
    assert "".join(dimmed) == "The user greets me."  # the reasoning, and only it, dimmed
    # Statistics go to stderr, never into the answer.
    n = len(tok.encode(THOUGHT_AND_ANSWER, allow_special=True))
    assert f"generation: {n} tokens" in click.unstyle(r.stderr) and "generation:" not in plain


def test_hide_reasoning_prints_only_the_answer(monkeypatch, tok):
    r = run_scripted(monkeypatch, tok, THOUGHT_AND_ANSWER, "--hide-reasoning")
    assert click.unstyle(r.stdout).strip() == "Hello there!"
    assert "generation:" in click.unstyle(r.stderr)


def test_a_tool_call_is_named_with_its_arguments(monkeypatch, tok):
    call = (
        "<|channel|>commentary to=functions.get_weather <|constrain|>json"
        '<|message|>{"city": "Paris"}<|call|>'
    )
    r = run_scripted(monkeypatch, tok, call, "--hide-reasoning")
    assert click.unstyle(r.stdout).strip() == '[tool call] get_weather: {"city": "Paris"}'
    assert "finish: tool_calls" in click.unstyle(r.stderr)


# -- structured output -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, says",
    [
        (["--json-schema", "{not json"], "--json-schema value (not a file) is not JSON"),
        (["--json-schema", '{"type": "object", "if": {}}'], 'Unimplemented keys: ["if"]'),
        (["--json-schema", '{"type": "string", "format": "card"}'], "Unknown format: card"),
        (["--regex", "[a-"], "unclosed character class"),
        (["--grammar", "GRAMMAR"], 'unknown name: "foo"'),
        (["--regex", "a", "--json-schema", "{}"], "choose one of --json-schema, --regex"),
    ],
)
def test_bad_formats_are_one_line_errors_before_the_model_loads(tmp_path, args, says):
    """The model named does not exist: the format is refused before anything loads."""
    grammar = tmp_path / "bad.lark"
    grammar.write_text("start: foo\n")
    args = [str(grammar) if a == "GRAMMAR" else a for a in args]
    r = cli("generate", "Hi", "-m", "does/not/exist/anywhere", *args)
    assert r.returncode in (1, 2) and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], r.stderr


def test_json_schema_file_reaches_the_model_and_json_carries_parsed(o200k_dir, tmp_path, tok):
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    path = tmp_path / "count.json"
    path.write_text(json.dumps(schema))
    r = ok(
        cli("generate", "Count.", "-m", o200k_dir, "--json-schema", str(path), "--max-tokens", "3")
    )
    assert "masks: 3 tokens" in r.stderr  # the header, masked from the first token on
    r = ok(
        cli(
            "generate",
            "Count.",
            "-m",
            o200k_dir,
            "--json-schema",
            str(path),
            "--json",
            "--max-tokens",
            "3",
        )
    )
    out = json.loads(r.stdout)
    assert out["parsed"] is None and out["finish_reason"] == "length"  # cut short: no answer
    # The schema, named after its file, is in the developer message.
    prompt = tok.decode(out["prompt_token_ids"])
    assert (
        "# Response Formats\n\n## count\n\n" + json.dumps(schema, separators=(",", ":")) in prompt
    )
