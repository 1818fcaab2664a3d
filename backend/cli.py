"""The `ultrarefiner` console script: training commands plus serve/worker/start."""

from __future__ import annotations

from training.cli import app

__all__ = ["app"]
