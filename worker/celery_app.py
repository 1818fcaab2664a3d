"""The Celery application of the training worker.

One training job at a time per worker, on the ``gpu`` queue::

    celery -A worker.celery_app worker -Q gpu -c 1 --pool=solo -n gpu@%h -l INFO

Broker: ``settings.redis_url`` (``REDIS_URL``) when set, else an embedded broker that needs no
server — kombu's filesystem transport under ``settings.embedded_broker_dir`` (the API and the
worker must share that folder). No result backend: a run's state lives in the run store.

Reliability settings: ``task_acks_late`` + ``task_reject_on_worker_lost`` (a message is acked
only once its task has finished), ``worker_prefetch_multiplier=1`` (a busy worker does not hold
a second run; it stays ``queued`` in the broker), ``worker_concurrency=1``.
"""

from __future__ import annotations

import logging
import threading
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

from celery import Celery
from celery.signals import worker_process_init, worker_ready

from backend.app.core.settings import get_settings

if TYPE_CHECKING:  # pragma: no cover
    from backend.app.core.settings import Settings

log = logging.getLogger(__name__)

#: Name the API sends and the worker registers (the API never imports the task code).
TRAIN_TASK = "ultrarefiner.train_run"
#: The Redis transport redelivers an unacked message after this long (a dead worker's run).
REDIS_VISIBILITY_TIMEOUT_S = 3600


def queue_name(settings: Settings) -> str:
    return settings.worker_queue


def broker_url(settings: Settings) -> str:
    return settings.redis_url or "filesystem://"


def embedded_broker_options(broker_dir: Path) -> dict[str, object]:
    """kombu filesystem transport folders (created here: the transport expects them)."""
    broker_dir = Path(broker_dir)
    queue_dir, control_dir, processed_dir = (
        broker_dir / "queue",
        broker_dir / "control",
        broker_dir / "processed",
    )
    for folder in (queue_dir, control_dir, processed_dir):
        folder.mkdir(parents=True, exist_ok=True)
    return {
        "data_folder_in": str(queue_dir),
        "data_folder_out": str(queue_dir),
        "control_folder": str(control_dir),
        "processed_folder": str(processed_dir),
        "store_processed": False,
        "polling_interval": 0.5,
    }


def create_celery_app(settings: Settings, *, main: str = "ultrarefiner") -> Celery:
    queue = queue_name(settings)
    app = Celery(main, broker=broker_url(settings), include=["worker.tasks"])
    embedded = not settings.redis_url
    app.conf.update(
        task_default_queue=queue,
        task_routes={TRAIN_TASK: {"queue": queue}},
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        result_backend=None,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        broker_connection_retry_on_startup=True,
        broker_transport_options=(
            embedded_broker_options(settings.embedded_broker_dir)
            if embedded
            else {"visibility_timeout": REDIS_VISIBILITY_TIMEOUT_S}
        ),
        # The filesystem transport has no fan-out for remote control; the run store is the
        # control plane anyway (cancel flag, heartbeats).
        worker_enable_remote_control=not embedded,
        worker_send_task_events=False,
        enable_utc=True,
    )
    return app


#: The worker's app (``celery -A worker.celery_app``), configured from the environment.
app = create_celery_app(get_settings())


def worker_argv(settings: Settings, *, hostname: str = "gpu@%h", loglevel: str = "INFO") -> list[str]:
    """Arguments of ``celery worker`` for one training job at a time (``python -m worker``)."""
    argv = ["worker", "-Q", queue_name(settings), "-c", "1", "--pool=solo", "-n", hostname, "-l", loglevel]
    if not settings.redis_url:
        # The embedded broker has no fan-out exchange worth polling for these.
        argv += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
    return argv


_clients: dict[tuple[str, str, str], Celery] = {}
_clients_lock = threading.Lock()


def client_for(settings: Settings) -> Celery:
    """A (cached) Celery app that publishes to the broker and queue ``settings`` name."""
    key = (broker_url(settings), queue_name(settings), str(settings.embedded_broker_dir))
    with _clients_lock:
        client = _clients.get(key)
        if client is None:
            client = create_celery_app(settings, main="ultrarefiner-client")
            _clients[key] = client
        return client


def enqueue_run(settings: Settings, run_id: int, *, attempt: int = 1, resume: bool = False) -> str:
    """Send the training task of a stored run to the ``gpu`` queue; returns the task id."""
    task_id = str(uuid.uuid4())
    client_for(settings).send_task(
        TRAIN_TASK,
        args=[run_id],
        kwargs={"attempt": attempt, "resume": resume},
        queue=queue_name(settings),
        task_id=task_id,
        retry=True,
        retry_policy={"max_retries": 2, "interval_start": 0, "interval_step": 0.5, "interval_max": 1.0},
    )
    log.info("enqueued run %s (attempt %s, resume=%s) as task %s", run_id, attempt, resume, task_id)
    return task_id


@worker_ready.connect
def _report_lost_runs_at_start(sender=None, **_kwargs) -> None:
    """A starting worker runs nothing yet: runs still marked running on its name are lost."""
    from worker.tasks import mark_lost_at_start

    hostname = getattr(sender, "hostname", None)
    try:
        mark_lost_at_start(get_settings(), hostname=hostname)
    except Exception:  # noqa: BLE001 - the store being down must not stop the worker
        log.exception("could not check for lost runs at worker start")


@worker_process_init.connect
def _fresh_connections_in_child(**_kwargs) -> None:
    """Prefork children must not reuse the parent's pooled database connections."""
    from backend.app.db.session import dispose_engines

    dispose_engines(close=False)
