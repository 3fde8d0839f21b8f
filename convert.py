#!/usr/bin/env python3
"""Convert a gpt-oss checkpoint to the gptoss-mlx layout: same as `gptoss-mlx convert`.

python convert.py SRC -o DST [--dense-bits 16|8|4] [--force]
"""

from gptoss_mlx.cli import convert_command

if __name__ == "__main__":
    convert_command(prog_name="convert.py")
