"""`gptoss-mlx chat --tools ...` as a person uses it: a scripted model calls python, the person is
asked, the result is shown and the answer follows; in a real terminal (tmux) and with piped
input. The CLI runs in a subprocess through tests/scripted_cli.py (the model replaced)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import uuid

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "tests", "scripted_cli.py")

CALL = (
    "<|channel|>analysis<|message|>I will compute it.<|end|>"
    "<|start|>assistant<|channel|>analysis to=python code<|message|>print(6 * 7)<|call|>"
)
ANSWER = "<|channel|>final<|message|>The answer is 42.<|return|>"


@pytest.fixture
def scripts(tmp_path):
    path = tmp_path / "scripts.json"
    path.write_text(json.dumps([CALL, ANSWER]))
    return str(path)


def env():
    out = dict(os.environ)
    out["PYTHONPATH"] = ROOT + os.pathsep + out.get("PYTHONPATH", "")
    return out


def chat(scripts, *args, input):
    return subprocess.run(
        [sys.executable, ENTRY, scripts, "chat", "--temperature", "0", *args],
        input=input,
        cwd=ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_python_call_approved_from_piped_input(scripts):
    r = chat(scripts, "--tools", "python", input="What is 6 times 7?\ny\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "Run this Python code?" in r.stderr
    out = r.stdout
    assert "[tool call] python: print(6 * 7)" in out
    assert out.index("[tool call] python") < out.index("[python result]\n42")
    assert out.index("[python result]") < out.index("The answer is 42.")
    assert "python: a separate process" in r.stderr


def test_declined_and_yes(scripts):
    r = chat(scripts, "--tools", "python", input="What is 6 times 7?\nn\n/quit\n")
    assert r.returncode == 0, r.stderr
    assert "[python error]\nError: the user declined to run this call." in r.stdout
    r = chat(scripts, "--tools", "python", "--yes", input="What is 6 times 7?\n/quit\n")
    assert r.returncode == 0 and "Run this Python code?" not in r.stderr
    assert "[python result]\n42" in r.stdout


def test_browser_without_search_says_how_to_configure_it(scripts):
    r = chat(scripts, "--tools", "browser", input="/quit\n")
    assert r.returncode == 0, r.stderr
    assert "--search-url URL" in r.stderr and "BRAVE_API_KEY" in r.stderr


@pytest.mark.parametrize(
    "args",
    [["--tools", "calculator"], ["--search-url", "http://localhost:8888"], ["--tools", ","]],
)
def test_bad_tool_flags_are_one_line_errors(scripts, args):
    r = chat(scripts, *args, input="")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error:")


# -- a real terminal ----------------------------------------------------------------------------


def tmux(*args):
    return subprocess.run(["tmux", *args], capture_output=True, text=True, timeout=30)


def wait_for(session, text, timeout=60.0):
    deadline = time.monotonic() + timeout
    screen = ""
    while time.monotonic() < deadline:
        screen = tmux("capture-pane", "-p", "-J", "-S", "-200", "-t", session).stdout
        if text in screen:
            return screen
        time.sleep(0.2)
    raise AssertionError(f"{text!r} never appeared on the screen:\n{screen}")


@pytest.mark.skipif(
    shutil.which("tmux") is None,
    reason="tmux is not installed (apt-get install tmux): the real-terminal test needs it",
)
def test_python_call_in_a_real_terminal(scripts):
    session = f"gptoss-{uuid.uuid4().hex[:8]}"
    command = " ".join(
        [
            f"PYTHONPATH={ROOT}",
            sys.executable,
            ENTRY,
            scripts,
            "chat --tools python --temperature 0",
            "; echo CHAT-EXITED $?; sleep 60",
        ]
    )
    assert (
        tmux("new-session", "-d", "-s", session, "-x", "160", "-y", "50", command).returncode == 0
    )
    try:
        wait_for(session, ">>> ")
        tmux("send-keys", "-t", session, "What is 6 times 7?", "Enter")
        screen = wait_for(session, "Run this Python code? [y/N]")
        assert "[tool call] python: print(6 * 7)" in screen
        assert "[python result]" not in screen  # nothing ran before the answer
        tmux("send-keys", "-t", session, "y", "Enter")
        screen = wait_for(session, "The answer is 42.")
        assert screen.index("Run this Python code?") < screen.index("[python result]")
        assert (
            screen.index("[python result]")
            < screen.index("42\n")
            < screen.index("The answer is 42.")
        )
        tmux("send-keys", "-t", session, "/quit", "Enter")
        assert "CHAT-EXITED 0" in wait_for(session, "CHAT-EXITED")
    finally:
        tmux("kill-session", "-t", session)
