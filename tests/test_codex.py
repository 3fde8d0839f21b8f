"""OpenAI's Codex CLI (which speaks only the Responses API) runs `codex exec` to completion against
`gptoss-mlx serve`, configured as the README says: a custom model provider whose `base_url` is
the server, `wire_api = "responses"`.

The model is the tiny random one, so what is checked is the protocol: every request Codex sends
is accepted, and Codex reports no error. Its turns are forced into harmony structure (a
ForcedModel: the reasoning and answer words are the random model's own): first a call to
Codex's `exec_command` tool, which Codex runs and sends back with the reasoning and the call,
then a final answer. (A model left entirely free never writes a stop token: its reply ends at
the token limit, a `response.incomplete` that Codex rightly reports as an error.)

Codex comes from npm (`@openai/codex`, installed by `.ci/run` into `.cache/npm`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
from scripted import ForcedModel
from serving import running

from gptoss_mlx import load
from gptoss_mlx.server import create_app

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODEX = os.environ.get("CODEX_BIN") or os.path.join(ROOT, ".cache/npm/node_modules/.bin/codex")
SCRIPTS = [
    "<|channel|>analysis<|message|>{free:8}<|end|><|start|>assistant<|channel|>commentary "
    'to=functions.exec_command <|constrain|>json<|message|>{"cmd": "echo hello-from-codex"}'
    "<|call|>",
    "<|channel|>analysis<|message|>{free:8}<|end|><|start|>assistant<|channel|>final"
    "<|message|>Done:{free:6}<|return|>",
]


class Recorder:
    """The app, recording each request's path, body and response status."""

    def __init__(self, app):
        self.app, self.requests = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        record = {"path": scope["path"], "body": b"", "status": None}
        self.requests.append(record)

        async def receiving():
            message = await receive()
            record["body"] += message.get("body", b"")
            return message

        async def sending(message):
            if message["type"] == "http.response.start":
                record["status"] = message["status"]
            await send(message)

        await self.app(scope, receiving, sending)


@pytest.mark.parametrize("api_key", [None, "sk-local-test"])
def test_codex_exec_runs_to_completion(o200k_dir, tmp_path, api_key):
    if not (os.path.exists(CODEX) or shutil.which("codex")):
        pytest.skip(
            "the Codex CLI is not installed: npm install --prefix .cache/npm @openai/codex "
            "(.ci/run does)"
        )
    model, tok = load(o200k_dir, dtype="float32")
    forced = ForcedModel(model, [ForcedModel.script(s, tok) for s in SCRIPTS])
    app = Recorder(
        create_app(forced, tok, model_name="gpt-oss-20b", max_tokens=64, api_key=api_key)
    )
    home, work = tmp_path / "codex-home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    with running(app) as url:
        (home / "config.toml").write_text(
            'model = "gpt-oss-20b"\n'
            'model_provider = "gptoss-mlx"\n\n'
            "[model_providers.gptoss-mlx]\n"
            'name = "gptoss-mlx"\n'
            f'base_url = "{url}/v1"\n'
            'wire_api = "responses"\n' + ('env_key = "GPTOSS_MLX_KEY"\n' if api_key else "")
        )
        done = subprocess.run(
            [
                CODEX if os.path.exists(CODEX) else shutil.which("codex"),
                "exec",
                "--skip-git-repo-check",
                # the one command is the script's echo; no sandbox needed (nor always possible)
                "--dangerously-bypass-approvals-and-sandbox",
                "Say hello.",
            ],
            cwd=work,
            env={**os.environ, "CODEX_HOME": str(home), "GPTOSS_MLX_KEY": api_key or ""},
            capture_output=True,
            text=True,
            timeout=300,
        )
    log = f"stdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, log
    assert "ERROR" not in done.stderr, log
    calls = [r for r in app.requests if r["path"] == "/v1/responses"]
    assert len(calls) == 2 and all(r["status"] == 200 for r in app.requests), app.requests
    # Codex ran the call and sent the result back with the turn that made it.
    second = json.loads(calls[1]["body"])
    kinds = [item.get("type") for item in second["input"]]
    assert kinds[-3:] == ["reasoning", "function_call", "function_call_output"]
    assert "hello-from-codex" in second["input"][-1]["output"]
    assert "Done:" in done.stdout
