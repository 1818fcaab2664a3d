"""The run store (models, migrations, CRUD) and the worker's recording, on SQLite and PostgreSQL.

The worker part drives :func:`worker.tasks.execute_run` with fake training functions (the
real pipeline runs in ``tests/integration/test_worker.py``).
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import inspect, select, text, update
from sqlalchemy.exc import IntegrityError

from backend.app.core.settings import Settings
from backend.app.db import crud
from backend.app.db.models import EpochMetric, ModelVersion, Run, RunStatus
from backend.app.db.session import get_engine, init_db, session_scope
from training.callbacks import ProgressEvent, TrainingCancelled
from training.config import TrainingConfig
from worker.tasks import execute_run, mark_lost_at_start, readable_error

TABLES = ("runs", "folds", "epoch_metrics", "evaluations", "model_versions")


@pytest.fixture
def store(database_url, tmp_path) -> Settings:
    """Settings whose run store is a fresh SQLite file or the session's PostgreSQL database."""
    settings = Settings(
        database_url=database_url,
        runs_dir=tmp_path / "runs",
        models_dir=tmp_path / "models",
        cache_dir=tmp_path / "cache",
    )
    init_db(settings)
    if database_url.startswith("postgresql"):
        with get_engine(database_url).begin() as connection:
            connection.execute(text(f"TRUNCATE {', '.join(TABLES)} RESTART IDENTITY CASCADE"))
    return settings


def _config(tmp_path: Path, **overrides) -> dict:
    cfg = TrainingConfig.model_validate(
        {"output_dir": str(tmp_path / "out"), "data": {"folds": 2, "limit": 12}, **overrides}
    )
    return cfg.model_dump(mode="json")


def _new_run(settings: Settings, tmp_path: Path) -> int:
    with session_scope(settings) as session:
        return crud.create_run(session, _config(tmp_path), runs_dir=settings.runs_dir).id


# ----------------------------------------------------------------------------- schema


def test_migrations_create_every_table_and_are_idempotent(store):
    engine = get_engine(store.database_url)
    names = set(inspect(engine).get_table_names())
    assert set(TABLES) | {"alembic_version"} <= names
    init_db(store)  # second call: no-op
    from alembic.script import ScriptDirectory

    from backend.app.db.session import alembic_config

    head = ScriptDirectory.from_config(alembic_config(store.database_url)).get_current_head()
    with engine.connect() as connection:
        assert connection.scalar(text("SELECT version_num FROM alembic_version")) == head


def test_sqlite_parent_folder_is_created(tmp_path):
    settings = Settings(database_url=f"sqlite:///{tmp_path / 'a' / 'b' / 'run.sqlite'}")
    init_db(settings)
    assert (tmp_path / "a" / "b" / "run.sqlite").is_file()


def test_models_match_migrations(store):
    """Autogenerate finds nothing to add: the models and the migrations agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from backend.app.db.models import Base

    with get_engine(store.database_url).connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": False})
        diff = compare_metadata(context, Base.metadata)
    assert diff == []


# ----------------------------------------------------------------------------- runs


def test_create_list_and_timestamps(store, tmp_path):
    first = _new_run(store, tmp_path)
    second = _new_run(store, tmp_path)
    with session_scope(store) as session:
        run = crud.get_run(session, first)
        assert run.status == RunStatus.queued
        assert run.output_dir == str(store.runs_dir / f"run-{first:06d}")
        assert run.config["output_dir"] == run.output_dir
        assert run.phases == ["coarse", "augment", "refiner", "end-to-end"]
        assert run.created_at.tzinfo is not None
        assert abs(datetime.now(UTC) - run.created_at) < timedelta(minutes=1)
        assert [r.id for r in crud.list_runs(session)] == [second, first]
        assert crud.count_runs(session, status="queued") == 2
        assert crud.list_runs(session, status="running") == []
        TrainingConfig.model_validate(run.config)  # stored config round-trips


def test_claim_is_atomic_and_checks_the_attempt(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        assert not crud.claim_run(session, run_id, attempt=2, hostname="w", pid=1)  # future attempt
        assert crud.claim_run(session, run_id, attempt=1, hostname="w", pid=1, device="cpu", task_id="t")
    with session_scope(store) as session:
        assert not crud.claim_run(session, run_id, attempt=1, hostname="w2", pid=2)  # alive elsewhere
        run = crud.get_run(session, run_id)
        assert (run.status, run.worker_pid, run.device, run.celery_task_id) == ("running", 1, "cpu", "t")
        assert crud.heartbeat(session, run_id, pid=1, hostname="w")
        assert not crud.heartbeat(session, run_id, pid=2, hostname="w")


def test_stale_heartbeat_is_lost_and_reclaimable(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        assert crud.claim_run(session, run_id, attempt=1, hostname="w", pid=1)
        assert crud.mark_lost_runs(session, lost_after_s=60) == []
        session.execute(
            update(Run)
            .where(Run.id == run_id)
            .values(heartbeat_at=datetime.now(UTC) - timedelta(seconds=120))
        )
    with session_scope(store) as session:
        run = crud.refresh_lost(session, crud.get_run(session, run_id), lost_after_s=60)
        assert run.status == RunStatus.lost
        assert "resume" in run.error
        assert not crud.heartbeat(session, run_id, pid=1, hostname="w")  # the old worker lost it
    with session_scope(store) as session:
        run = crud.prepare_resume(session, crud.get_run(session, run_id))
        assert (run.status, run.attempt, run.error) == ("queued", 2, None)
        assert not crud.claim_run(session, run_id, attempt=1, hostname="w", pid=1)  # stale message
        assert crud.claim_run(session, run_id, attempt=2, hostname="w", pid=3)


def test_worker_start_marks_its_own_runs_lost(store, tmp_path):
    mine, other = _new_run(store, tmp_path), _new_run(store, tmp_path)
    with session_scope(store) as session:
        crud.claim_run(session, mine, attempt=1, hostname="gpu@a", pid=1)
        crud.claim_run(session, other, attempt=1, hostname="gpu@b", pid=2)
    assert mark_lost_at_start(store, hostname="gpu@a") == [mine]
    with session_scope(store) as session:
        assert crud.get_run(session, mine).status == RunStatus.lost
        assert crud.get_run(session, other).status == RunStatus.running


def test_cancel_transitions(store, tmp_path):
    queued, running = _new_run(store, tmp_path), _new_run(store, tmp_path)
    with session_scope(store) as session:
        crud.claim_run(session, running, attempt=1, hostname="w", pid=1)
    with session_scope(store) as session:
        assert crud.request_cancel(session, crud.get_run(session, queued)).status == RunStatus.cancelled
        run = crud.request_cancel(session, crud.get_run(session, running))
        assert run.status == RunStatus.running and run.cancel_requested
        assert crud.is_cancel_requested(session, running)
        with pytest.raises(crud.StateError):
            crud.request_cancel(session, crud.get_run(session, queued))
        with pytest.raises(crud.StateError):
            crud.prepare_resume(session, crud.get_run(session, running))
        # A cancelled queued run can no longer be claimed by its (still queued) message.
        assert not crud.claim_run(session, queued, attempt=1, hostname="w", pid=1)


def test_epoch_fold_and_evaluation_rows_upsert(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        crud.record_epoch(session, run_id, phase="coarse", fold=0, epoch=0, losses={"total": 1.0}, dice=0.1)
        crud.record_epoch(session, run_id, phase="coarse", fold=0, epoch=0, losses={"total": 0.5}, dice=0.2)
        crud.record_epoch(session, run_id, phase="refiner", fold=None, epoch=0, losses={}, dice=0.3)
        crud.record_fold(
            session, run_id, phase="coarse", fold=0, best_epoch=0, checkpoint="a.pt", val_dice=0.2
        )
        crud.record_fold(
            session, run_id, phase="coarse", fold=0, best_epoch=1, checkpoint="b.pt", val_dice=0.4
        )
        crud.record_evaluation(
            session, run_id, dataset="busi", split="test", n_images=3, dice_coarse=0.7, dice_refined=0.75
        )
    with session_scope(store) as session:
        epochs = crud.epoch_metrics(session, run_id)
        assert [(e.phase, e.fold, e.losses["total"] if e.losses else None) for e in epochs] == [
            ("coarse", 0, 0.5),
            ("refiner", crud.NO_FOLD, None),
        ]
        (fold,) = crud.fold_results(session, run_id)
        assert (fold.best_epoch, fold.checkpoint, fold.val_dice) == (1, "b.pt", 0.4)
        (evaluation,) = crud.evaluations(session, run_id)
        assert evaluation.delta == pytest.approx(0.05)
    with session_scope(store) as session:  # rows go with their run
        session.delete(crud.get_run(session, run_id))
    with session_scope(store) as session:
        assert session.scalars(select(EpochMetric)).all() == []


def test_progress_never_decreases_and_phase_start_resets_the_epoch(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        crud.record_progress(
            session, run_id, phase="coarse", fold=1, epoch=3, epochs=5, progress=0.4, eta_s=9.0
        )
        crud.record_progress(session, run_id, progress=0.1)  # a resumed run re-planning
        run = crud.get_run(session, run_id)
        session.refresh(run)
        assert (run.phase, run.fold, run.epoch, run.epochs, run.progress, run.eta_s) == (
            "coarse",
            1,
            3,
            5,
            0.4,
            9.0,
        )
        crud.record_progress(session, run_id, phase="refiner", progress=0.5, reset_epoch=True)
        session.refresh(run)
        assert (run.phase, run.fold, run.epoch, run.epochs, run.progress) == (
            "refiner",
            None,
            None,
            None,
            0.5,
        )


def test_log_tail_keeps_the_last_lines(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        for i in range(10):
            crud.append_log(session, run_id, f"line {i}", keep=4)
        assert crud.get_run(session, run_id).log_tail.splitlines() == [f"line {i}" for i in range(6, 10)]


# ----------------------------------------------------------------------------- model versions


def test_exactly_one_active_model(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        assert crud.get_active_model_path(session) is None
        first = crud.register_model_version(session, bundle_path="/m/a.pt", sha256="a" * 64, run_id=run_id)
        again = crud.register_model_version(session, bundle_path="/m/a2.pt", sha256="a" * 64)
        assert again.id == first.id and not first.active
        second = crud.register_model_version(
            session, bundle_path="/m/b.pt", sha256="b" * 64, metrics={"d": 1}
        )
        crud.activate_model_version(session, first.id)
    with session_scope(store) as session:
        assert crud.get_active_model_path(session) == Path("/m/a.pt")
        crud.activate_model_version(session, second.id)
    with session_scope(store) as session:
        assert crud.get_active_model_path(session) == Path("/m/b.pt")
        assert [v.id for v in crud.list_model_versions(session) if v.active] == [second.id]
        assert crud.get_model_version(session, second.id).activated_at is not None
        with pytest.raises(LookupError):
            crud.activate_model_version(session, 999)
    # The database itself refuses a second active row.
    with pytest.raises(IntegrityError):
        with session_scope(store) as session:
            session.execute(update(ModelVersion).where(ModelVersion.id == first.id).values(active=True))


def test_concurrent_activations_leave_one_active(store, tmp_path):
    with session_scope(store) as session:
        ids = [
            crud.register_model_version(session, bundle_path=f"/m/{i}.pt", sha256=f"{i:064d}").id
            for i in range(4)
        ]
    errors: list[BaseException] = []

    def activate(version_id: int) -> None:
        try:
            with session_scope(store) as session:
                crud.activate_model_version(session, version_id)
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=activate, args=(i,)) for i in ids]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    with session_scope(store) as session:
        assert len([v for v in crud.list_model_versions(session) if v.active]) == 1
    assert errors == []


# ----------------------------------------------------------------------------- worker recording


def _fake_training(fail_at: int | None = None, cancel_check: bool = True, bundle: bool = True):
    """A stand-in for training.pipeline.run_training emitting the same events."""

    def run_training(cfg: TrainingConfig, callback, resume: bool = False) -> dict:
        callback.on_event(ProgressEvent("run_start", progress=0.0))
        callback.on_event(ProgressEvent("phase_start", phase="coarse", progress=0.0))
        steps = 0
        for fold in range(cfg.data.folds):
            callback.on_event(ProgressEvent("fold_start", phase="coarse", fold=fold, progress=fold / 2))
            for epoch in range(cfg.coarse.epochs):
                for step in range(3):
                    steps += 1
                    if fail_at is not None and steps == fail_at:
                        raise RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")
                    callback.on_event(
                        ProgressEvent("step", phase="coarse", fold=fold, epoch=epoch, step=step, steps=3)
                    )
                    if cancel_check and callback.should_stop():
                        raise TrainingCancelled("stopped")
                callback.on_event(
                    ProgressEvent(
                        "epoch_end",
                        phase="coarse",
                        fold=fold,
                        epoch=epoch,
                        epochs=cfg.coarse.epochs,
                        losses={"total": 1.0 / (epoch + 1), "ce": 0.5},
                        dice=0.5 + 0.1 * epoch,
                        lr=0.01,
                        elapsed_s=1.0,
                        progress=(fold + (epoch + 1) / cfg.coarse.epochs) / cfg.data.folds * 0.9,
                    )
                )
            callback.on_event(
                ProgressEvent(
                    "fold_end",
                    phase="coarse",
                    fold=fold,
                    dice=0.6,
                    extra={
                        "best_epoch": cfg.coarse.epochs - 1,
                        "checkpoint": str(cfg.output_dir / f"f{fold}.pt"),
                    },
                )
            )
        callback.on_event(ProgressEvent("phase_end", phase="coarse", progress=0.9))
        callback.on_event(ProgressEvent("warning", phase="end-to-end", message="coarse Dice dropped 3%"))
        callback.on_event(
            ProgressEvent(
                "evaluation",
                phase="end-to-end",
                dice=0.74,
                extra={
                    "dice_coarse": 0.70,
                    "dice_refined": 0.74,
                    "n_images": 3,
                    "split": "test",
                    "dataset": "busi",
                },
            )
        )
        callback.on_event(ProgressEvent("run_end", progress=1.0))
        cfg.output_dir.mkdir(parents=True, exist_ok=True)
        path = cfg.output_dir / "bundle.pt"
        if bundle:
            path.write_bytes(b"fake bundle " + str(cfg.output_dir).encode())
        return {
            "bundle": str(path) if bundle else None,
            "metrics": {"test_dice_refined": 0.74},
            "resume": resume,
        }

    return run_training


def test_execute_run_records_everything_and_registers_the_model(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    result = execute_run(run_id, settings=store, train_fn=_fake_training(), hostname="gpu@test")
    assert result["status"] == "succeeded"
    with session_scope(store) as session:
        run = crud.get_run(session, run_id)
        assert (run.status, run.progress, run.error, run.device) == ("succeeded", 1.0, None, "cpu")
        assert run.summary["metrics"] == {"test_dice_refined": 0.74}
        assert run.summary["resume"] is False
        assert "coarse Dice dropped" in run.log_tail
        assert run.finished_at is not None and run.heartbeat_at is not None
        assert len(crud.epoch_metrics(session, run_id)) == 2 * run.config["coarse"]["epochs"]
        assert [(f.fold, f.best_epoch) for f in crud.fold_results(session, run_id)] == [(0, 29), (1, 29)]
        (evaluation,) = crud.evaluations(session, run_id)
        assert (evaluation.dice_coarse, evaluation.dice_refined, evaluation.n_images) == (0.70, 0.74, 3)
        (version,) = crud.list_model_versions(session)
        assert version.run_id == run_id and not version.active
        assert Path(version.bundle_path).parent == store.models_dir
        assert version.sha256 == crud.file_sha256(Path(run.bundle_path))
        assert version.metrics["evaluations"][0]["delta"] == pytest.approx(0.04)
    # The message redelivered after success is dropped.
    assert execute_run(run_id, settings=store, train_fn=_fake_training())["status"] == "skipped"


def test_execute_run_failure_is_readable(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    result = execute_run(run_id, settings=store, train_fn=_fake_training(fail_at=2))
    assert result["status"] == "failed"
    with session_scope(store) as session:
        run = crud.get_run(session, run_id)
        assert run.status == RunStatus.failed
        assert run.error == "RuntimeError: CUDA out of memory."
        assert "Traceback" not in run.error and "failed: RuntimeError" in run.log_tail
        assert crud.list_model_versions(session) == []


def test_execute_run_cancel_stops_within_one_step(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    seen_steps: list[int] = []

    def train(cfg, callback, resume=False):
        for step in range(100):
            seen_steps.append(step)
            callback.on_event(ProgressEvent("step", phase="coarse", fold=0, epoch=0, step=step, steps=100))
            if step == 4:
                with session_scope(store) as session:
                    crud.request_cancel(session, crud.get_run(session, run_id))
            if callback.should_stop():
                raise TrainingCancelled("cancelled")
        return {}

    assert execute_run(run_id, settings=store, train_fn=train)["status"] == "cancelled"
    assert seen_steps[-1] == 4
    with session_scope(store) as session:
        run = crud.get_run(session, run_id)
        assert (run.status, run.finished_at is not None) == ("cancelled", True)
    with session_scope(store) as session:  # and it can be resumed
        assert crud.prepare_resume(session, crud.get_run(session, run_id)).attempt == 2
    result = execute_run(run_id, attempt=2, resume=True, settings=store, train_fn=_fake_training())
    assert result["status"] == "succeeded"


def test_execute_run_rejects_a_broken_config(store, tmp_path):
    with session_scope(store) as session:
        run = crud.create_run(session, {"phases": ["coarse"], "no_such_field": 1})
    assert execute_run(run.id, settings=store, train_fn=_fake_training())["status"] == "failed"
    with session_scope(store) as session:
        assert crud.get_run(session, run.id).error.startswith("invalid run config: ValidationError")


def test_redelivered_message_of_a_lost_run_resumes(store, tmp_path):
    run_id = _new_run(store, tmp_path)
    with session_scope(store) as session:
        crud.claim_run(session, run_id, attempt=1, hostname="gpu@dead", pid=1)
    mark_lost_at_start(store, hostname="gpu@dead")
    result = execute_run(run_id, attempt=1, settings=store, train_fn=_fake_training())
    assert result["status"] == "succeeded"
    with session_scope(store) as session:
        assert crud.get_run(session, run_id).summary["resume"] is True


def test_evaluation_events_map_to_splits_and_stages(store, tmp_path):
    from worker.tasks import StoreCallback

    run_id = _new_run(store, tmp_path)
    callback = StoreCallback(store, run_id, pid=1, hostname="w", dataset="busi")
    baseline = ProgressEvent(
        "evaluation",
        phase="end-to-end",
        dice=0.6,
        extra={"stage": "baseline", "dice_coarse": 0.5, "dice_refined": 0.6},
    )
    final = ProgressEvent(
        "evaluation",
        phase="test",
        dice=0.7,
        extra={
            "n_images": 4,
            "dice_coarse": 0.65,
            "dice_refined": 0.7,
            "delta": 0.05,
            "normal": {"n_images": 1},
        },
    )
    for event in (baseline, final, final):  # a repeated evaluation updates its row
        callback.on_event(event)
    with session_scope(store) as session:
        rows = crud.evaluations(session, run_id)
        assert [(r.phase, r.stage, r.dataset, r.split, r.n_images) for r in rows] == [
            ("end-to-end", "baseline", "busi", "val", None),
            ("test", "final", "busi", "test", 4),
        ]
        assert rows[1].extra["normal"] == {"n_images": 1} and rows[1].delta == pytest.approx(0.05)


def test_readable_error():
    assert readable_error(ValueError("bad\nvalue")) == "ValueError: bad"
    assert readable_error(KeyError()) == "KeyError"
    assert len(readable_error(RuntimeError("x" * 2000))) == 500
