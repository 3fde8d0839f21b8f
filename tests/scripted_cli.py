"""The `gptoss-mlx` CLI with its model replaced by a scripted one, for tests that must run the CLI
in a real terminal (tmux) or a subprocess: `python tests/scripted_cli.py SCRIPTS.json ARGS...`
runs `gptoss-mlx ARGS...` where the model's n-th generation emits the n-th harmony text of the
JSON list SCRIPTS.json. Test-only; never installed."""

from __future__ import annotations

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from scripted import ScriptedModel  # noqa: E402

from gptoss_mlx import cli  # noqa: E402
from gptoss_mlx.tokenizer import default_tokenizer  # noqa: E402


def main() -> None:
    with open(sys.argv[1], encoding="utf-8") as f:
        texts = json.load(f)
    tokenizer = default_tokenizer()
    model = ScriptedModel.from_harmony(texts, tokenizer)
    cli.load = lambda *args, **kwargs: (model, tokenizer)
    sys.argv = ["gptoss-mlx", *sys.argv[2:]]
    cli.main()


if __name__ == "__main__":
    main()
