"""The `ultrarefiner` console script: training commands plus serve/worker/start."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from backend.app.engines.names import ENGINE_HELP
from training.cli import app

__all__ = ["app"]


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port.")] = 8000,
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            exists=True,
            dir_okay=False,
            readable=True,
            help="Bundle to serve (default: settings.model_path, else the active model, else the default).",
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help=f"Inference engine: {ENGINE_HELP}. Default: INFERENCE_ENGINE, else auto."),
    ] = None,
    log_level: Annotated[str, typer.Option(help="uvicorn log level.")] = "info",
) -> None:
    """Serve the segmentation API (FastAPI + uvicorn; no Redis or broker needed)."""
    import uvicorn
    from pydantic import ValidationError

    from backend.app.core.settings import Settings
    from backend.app.main import create_app

    overrides: dict = {}
    if model is not None:
        overrides["model_path"] = model
    if engine is not None:
        overrides["inference_engine"] = engine
    try:
        settings = Settings(**overrides)
    except ValidationError as error:
        first = error.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        typer.echo(f"error: {where}: {first.get('msg')}", err=True)
        raise typer.Exit(2) from None
    if settings.admin_token is None:
        # Never a placeholder: a token for this process, printed once (as `start` does).
        import secrets

        from pydantic import SecretStr

        token = secrets.token_urlsafe(24)
        settings = settings.model_copy(update={"admin_token": SecretStr(token)})
        typer.echo(
            f"ADMIN_TOKEN is not set: admin token for this server process: {token}\n"
            "(set ADMIN_TOKEN in the environment or .env to choose a lasting one)",
            err=True,
        )
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_level=log_level,
        log_config=_log_config(log_level),
        workers=1,
    )


#: The project's own loggers, shown beside uvicorn's: the model and engine served, one line per
#: rejected request, attributes a DICOM SEG left out (names only, never values).
PROJECT_LOGGERS = ("backend", "training")


def _log_config(log_level: str) -> dict:
    """uvicorn's logging configuration plus the project's loggers at ``log_level`` on its
    console handler (without this, Python shows their INFO lines nowhere)."""
    import copy

    from uvicorn.config import LOGGING_CONFIG

    config = copy.deepcopy(LOGGING_CONFIG)
    level = log_level.upper() if log_level.lower() != "trace" else "DEBUG"
    config["formatters"]["project"] = {
        "()": "uvicorn.logging.DefaultFormatter",
        "fmt": "%(levelprefix)s %(name)s: %(message)s",
    }
    config["handlers"]["project"] = {
        "formatter": "project",
        "class": "logging.StreamHandler",
        "stream": "ext://sys.stderr",
    }
    for name in PROJECT_LOGGERS:
        config["loggers"][name] = {"handlers": ["project"], "level": level, "propagate": False}
    return config


@app.command("start")
def start(
    host: Annotated[str, typer.Option(help="Interface to bind.")] = "127.0.0.1",
    api_port: Annotated[int, typer.Option(min=1, max=65535, help="API port.")] = 8000,
    ui_port: Annotated[int, typer.Option(min=1, max=65535, help="Admin UI port.")] = 7860,
) -> None:
    """Start API, training worker and admin UI locally (embedded defaults); Ctrl-C stops all."""
    from backend.launcher import start as start_services

    raise typer.Exit(start_services(host=host, api_port=api_port, ui_port=ui_port))


@app.command("worker", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def worker(ctx: typer.Context) -> None:
    """Run the Celery training worker on the `gpu` queue (extra options go to celery)."""
    import os
    import sys

    os.execv(sys.executable, [sys.executable, "-m", "worker", *ctx.args])


@app.command("db-upgrade")
def db_upgrade() -> None:
    """Apply the store's Alembic migrations (DATABASE_URL) and exit."""
    from backend.app.core.settings import Settings
    from backend.app.db.session import init_db

    init_db(Settings())
    typer.echo("database is at the latest migration")


if __name__ == "__main__":
    app()
