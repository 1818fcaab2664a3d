"""``python -m worker [celery worker options]``: the training worker with the project's settings.

Equivalent to ``celery -A worker.celery_app worker -Q gpu -c 1 --pool=solo -n gpu@%h -l INFO``
(plus ``--without-gossip --without-mingle --without-heartbeat`` on the embedded broker); extra
options are appended, e.g. ``python -m worker -n gpu2@%h``.
"""

from __future__ import annotations

import sys

from backend.app.core.settings import get_settings
from worker.celery_app import app, worker_argv


def main(argv: list[str] | None = None) -> None:
    app.worker_main([*worker_argv(get_settings()), *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    main()
