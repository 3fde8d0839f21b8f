"""Every example in the README runs: each shell command through the real CLI, each Python block
through the public API, with the model and sizes swapped for small ones.

The swaps are mechanical (below), so an example whose subcommand, flag or API call stops working
fails here. `gptoss-mlx serve` runs until it answers on a free port, then is stopped with Ctrl-C;
a Python block that talks to `http://127.0.0.1:8000` talks to a server this test starts (the tiny
model, its replies forced into harmony's shape: reasoning, then an answer). A fenced block right
after a line `<!-- readme-test: skip REASON -->` is not run (commands that need a second Mac or
sudo); the reason shows in the report.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from scripted import ForcedModel
from serving import running

from gptoss_mlx import load
from gptoss_mlx.server import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_MODEL = "openai/gpt-oss-20b"
SERVER_URL = "http://127.0.0.1:8000"  # where README examples expect `gptoss-mlx serve`
SKIP = re.compile(r"<!--\s*readme-test:\s*skip\s*(.*?)\s*-->\s*$")
FENCE = re.compile(r"^```(\w*)\s*$")
OPERATORS = ("&&", "|", ";")
# Flags whose values are made small: (flag, small value).
SMALL = {
    "--max-tokens": "4",
    "--prompt-tokens": "8,12",
    "--gen-tokens": "3",
    "--synthetic": "tiny",
    "--repeats": "1",
}
# Flags that name a file the reader writes (`--json-schema person.json`): one written here.
FILES = {"--json-schema": "schema", "--grammar": "grammar"}


def readme_blocks() -> list[tuple[str, str, int, str | None]]:
    """(language, code, first line number, skip reason) for each fenced block of README.md."""
    blocks, skip, block = [], None, None
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if block is None:
                fence = FENCE.match(line)
                if fence:
                    block = (fence.group(1), [], n + 1, skip)
                elif line.strip():  # a skip marker holds for the block right after it
                    marker = SKIP.match(line.strip())
                    skip = (marker.group(1) or "no reason given") if marker else None
            elif line.startswith("```"):
                lang, lines, start, reason = block
                blocks.append((lang, "".join(lines), start, reason))
                block, skip = None, None
            else:
                block[1].append(line)
    return blocks


def shell_examples() -> list[tuple[str, int, str | None]]:
    """(command, README line, skip reason) for each line of a shell block that runs gptoss-mlx
    or convert.py; of an install line (`... && pip install ... && gptoss-mlx ...`) only the
    gptoss-mlx part."""
    out = []
    for lang, code, start, skip in readme_blocks():
        if lang not in ("sh", "bash", "shell"):
            continue
        for offset, line in enumerate(code.splitlines()):
            words = shlex.split(line, comments=True)
            commands = split_on_operators(words)
            ours = [c for c in commands if runs_ours(c)]
            if ours:
                out.append((pipeline_of(line, commands, ours), start + offset, skip))
    return out


def split_on_operators(words: list[str]) -> list[list[str]]:
    commands, current = [], []
    for w in words:
        if w in OPERATORS:
            commands.append(current)
            commands.append([w])
            current = []
        else:
            current.append(w)
    commands.append(current)
    return commands


def runs_ours(command: list[str]) -> bool:
    return bool(command) and (
        command[0] == "gptoss-mlx"
        or command[:2] in (["python", "convert.py"],)
        or (command[0] == "mlx.launch" and "gptoss-mlx" in command)
    )


def under_launcher(command: list[str]) -> list[str]:
    """`mlx.launch ARGS [--] gptoss-mlx ...` as the launcher's part, ready to prefix a command
    (on free ports: other tests may be listening on the default ones)."""
    launcher = command[: command.index("gptoss-mlx")]
    if launcher[-1:] == ["--"]:
        launcher.pop()
    with socket.socket() as s:  # MLX's ring takes N ports from here; the kernel picked this free
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    executable = os.path.join(os.path.dirname(sys.executable), "mlx.launch")
    return [executable, *launcher[1:], "--starting-port", str(port), "--"]


def pipeline_of(line, commands, ours) -> list[list[str]]:
    """The commands to run: a pipe feeding ours is kept with it; `&&` chains are cut to ours."""
    if any(c == ["|"] for c in commands):
        return [c for c in commands if c != ["|"]]
    return ours


# Memory settings the tiny o200k checkpoint cannot take (16-dim heads, 8 experts): examples using
# them run on a checkpoint with 64-dim heads and 32 experts instead.
NEEDS_REAL_HEADS = ("--kv-bits", "--expert-cache", "kv_bits=", "expert_cache=")


def tiny_model_for(words: list[str] | str) -> str:
    """The `paths` key of the small checkpoint that stands in for the README's model."""
    text = " ".join(words) if isinstance(words, list) else words
    return "o200k_experts" if any(s in text for s in NEEDS_REAL_HEADS) else "o200k"


def shrink(command: list[str], paths: dict) -> list[str]:
    """The README command with small sizes and the tiny checkpoints in place of real models."""
    words = list(command)
    is_script = words[:2] == ["python", "convert.py"]
    sub = "convert" if is_script else (words[1] if len(words) > 1 else "")
    out = [sys.executable, "convert.py"] if is_script else [sys.executable, "-m", "gptoss_mlx.cli"]
    rest = words[2:]
    if sub == "convert":
        rest = [paths["hf"] if w == HUB_MODEL else w for w in rest]
        rest = [
            os.path.join(paths["tmp"], w) if prev in ("-o", "--output") else w
            for prev, w in zip([None] + rest[:-1], rest, strict=True)
        ]
        return out + (["convert"] if not is_script else []) + rest
    out.append(sub)
    model = paths[tiny_model_for(words)]
    has_model = False
    shrunk = []
    prev = None
    for w in rest:
        if prev in ("-m", "--model"):
            w, has_model = model, True
        elif prev in SMALL:
            w = SMALL[prev]
        elif prev in FILES and not w.lstrip().startswith("{"):  # a file the reader would write
            w = paths[FILES[prev]]
        shrunk.append(w)
        prev = w if w.startswith("-") else None
    if sub in ("generate", "chat", "serve", "memory") and not has_model:
        shrunk += ["-m", model]
    if sub in ("generate", "chat", "serve") and "--max-tokens" not in shrunk:
        shrunk += ["--max-tokens", SMALL["--max-tokens"]]
    if sub == "bench" and "--repeats" not in shrunk:
        shrunk += (
            ["--repeats", "1", "--prompt-tokens", "8", "--gen-tokens", "3"]
            if ("--prompt-tokens" not in shrunk)
            else ["--repeats", "1"]
        )
    return out + shrunk


@pytest.fixture(scope="module")
def paths(o200k_dir, o200k_experts_dir, hf_mxfp4_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("readme")
    (tmp / "schema.json").write_text('{"type": "object"}')
    (tmp / "answer.lark").write_text('start: "yes" | "no"')
    return {
        "o200k": o200k_dir,
        "o200k_experts": o200k_experts_dir,
        "hf": hf_mxfp4_dir,
        "tmp": str(tmp),
        "schema": str(tmp / "schema.json"),
        "grammar": str(tmp / "answer.lark"),
    }


EXAMPLES = shell_examples()


def test_the_readme_has_cli_examples():
    subcommands = {c[-1][1] for c, _, _ in EXAMPLES if c[-1][0] == "gptoss-mlx"}
    assert {"generate", "chat", "convert", "bench", "serve", "memory"} <= subcommands


@pytest.mark.parametrize(
    "pipeline, line, skip", EXAMPLES, ids=[f"README:{line}" for _, line, _ in EXAMPLES]
)
def test_cli_example_runs(pipeline, line, skip, paths):
    if skip:
        pytest.skip(f"README line {line}: {skip}")
    *feeders, ours = pipeline
    launcher = []
    if ours[0] == "mlx.launch":
        launcher, ours = under_launcher(ours), ours[ours.index("gptoss-mlx") :]
    stdin = None
    for feeder in feeders:  # only `echo TEXT |` and `printf TEXT |` feed our commands
        assert feeder[0] in ("echo", "printf"), f"README line {line}: pipe from {feeder[0]}"
        stdin = " ".join(feeder[1:]).replace("\\n", "\n") + ("\n" if feeder[0] == "echo" else "")
    if ours[1:2] == ["chat"]:
        stdin = "Hi\n/stats\n/quit\n"
    argv = launcher + shrink(ours, paths)
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    if ours[1:2] == ["serve"]:
        return serve_until_it_answers(argv, env, line, launched=bool(launcher))
    r = subprocess.run(
        argv, input=stdin, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, f"README line {line}: {shlex.join(ours)}\n{r.stderr}"
    assert "Traceback" not in r.stderr


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_until_it_answers(argv: list[str], env: dict, line: int, launched: bool) -> None:
    """Run a `serve` example on a free port until /health and /v1/models answer, then Ctrl-C
    (under `mlx.launch`, to the launcher and its ranks together, as a terminal sends it)."""
    if "--port" in argv:
        argv[argv.index("--port") + 1] = str(port := free_port())
    else:
        argv += ["--port", str(port := free_port())]
    key = argv[argv.index("--api-key") + 1] if "--api-key" in argv else "unused"
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        argv,
        cwd=ROOT,
        env=env,
        stdin=subprocess.PIPE if launched else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=launched,
    )
    try:
        deadline = time.monotonic() + 240
        while True:
            assert server.poll() is None, (
                f"README line {line}: serve exited\n{server.stderr.read()}"
            )
            assert time.monotonic() < deadline, f"README line {line}: serve never answered"
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"})
        assert models.status_code == 200, models.text
    finally:
        if launched:
            os.killpg(server.pid, signal.SIGINT)
        else:
            server.send_signal(signal.SIGINT)
        _, stderr = server.communicate(timeout=60)
    if launched:  # mlx.launch itself ends on Ctrl-C with a traceback of its own; every rank, 130
        ranks = int(argv[argv.index("-n") + 1])
        assert len(re.findall(r"rank \d+ exited with code 130", stderr)) == ranks, stderr
        assert "gptoss_mlx" not in "".join(stderr.split("Traceback")[1:]), stderr
        return
    assert server.returncode == 0, f"README line {line}: {shlex.join(argv)}\n{stderr}"
    assert "Traceback" not in stderr


@pytest.fixture(scope="module")
def readme_server(o200k_dir):
    """A server for the README's client examples: every reply is reasoning, then an answer."""
    model, tok = load(o200k_dir, dtype="float32")
    reply = (
        "<|channel|>analysis<|message|>{free:3}<|end|>"
        "<|start|>assistant<|channel|>final<|message|>{free:3}<|return|>"
    )
    forced = ForcedModel(model, [ForcedModel.script(reply, tok)] * 100)
    with running(create_app(forced, tok, model_name="gpt-oss-20b")) as url:
        yield url


def python_examples() -> list[tuple[str, int, str | None]]:
    return [(code, start, skip) for lang, code, start, skip in readme_blocks() if lang == "python"]


PY_EXAMPLES = python_examples()


@pytest.mark.parametrize(
    "code, line, skip", PY_EXAMPLES, ids=[f"README:{line}" for _, line, _ in PY_EXAMPLES]
)
def test_python_example_runs(code, line, skip, paths, monkeypatch, tmp_path, request):
    if skip:
        pytest.skip(f"README line {line}: {skip}")
    if SERVER_URL in code:
        code = code.replace(SERVER_URL, request.getfixturevalue("readme_server"))
    for hub_model in (HUB_MODEL, HUB_MODEL.replace("20b", "120b")):
        code = code.replace(repr(hub_model).replace("'", '"'), repr(paths[tiny_model_for(code)]))
    code = re.sub(r"max_tokens=\d+", "max_tokens=4", code)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"README.md:{line}", "exec"), {"__name__": "readme_example"})
