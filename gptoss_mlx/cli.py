"""The `gptoss-mlx` command line: a thin layer over the Python API.

Every command turns a `GptOssError` into a one-line message on stderr and exit status 1.
"""

from __future__ import annotations

import functools
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


@click.group()
@click.version_option(package_name="gptoss-mlx")
def main():
    """gpt-oss-20b and gpt-oss-120b on Apple Silicon with MLX."""


@click.command("convert")
@click.argument("src")
@click.option("-o", "--output", "dst", required=True, help="Folder to write (must not exist).")
@click.option("--dense-bits", type=click.Choice(["16", "8", "4"]), default=None,
              help="Quantize attention, embedding and unembedding to 8 or 4 bits (16: keep).")
@click.option("--force", is_flag=True, help="Replace DST if it exists.")
@user_errors
def convert_command(src, dst, dense_bits, force):
    """Convert SRC (folder or Hugging Face repo id) to an MLX-native folder at DST."""
    from .convert import convert

    out = convert(src, dst, dense_bits=int(dense_bits) if dense_bits else None, force=force,
                  progress=True)
    click.echo(f"wrote {out}", err=True)


main.add_command(convert_command)

if __name__ == "__main__":
    main()
