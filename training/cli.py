"""`ultrarefiner` command line."""

from __future__ import annotations

import typer

app = typer.Typer(help="UltraRefiner Studio: train, evaluate, export and serve.", no_args_is_help=True)


@app.command()
def version() -> None:
    """Print the package version."""
    from importlib.metadata import version as _version

    typer.echo(_version("ultrarefiner-studio"))
