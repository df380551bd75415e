"""The ``lrc`` command. Thin: parses, calls the library, prints."""

from __future__ import annotations

import typer

from .. import __version__

app = typer.Typer(help="Compress neural networks by dynamical low-rank training.", no_args_is_help=True,
                  add_completion=False)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lrc {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Compress neural networks by dynamical low-rank training."""


def main() -> None:
    app()
