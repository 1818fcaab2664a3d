"""Engines, sessions and the start-up migration of the run store.

``init_db(settings)`` is called once per process (API lifespan, worker start): it creates the
SQLite parent folder, upgrades the schema to Alembic's head (serialised across processes by a
PostgreSQL advisory lock or a lock file beside the SQLite database) and returns the session
factory. Engines are cached per URL, so every caller in a process shares one pool.
"""

from __future__ import annotations

import fcntl
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:  # pragma: no cover
    from backend.app.core.settings import Settings

log = logging.getLogger(__name__)

DB_DIR = Path(__file__).resolve().parent
ALEMBIC_INI = DB_DIR / "alembic.ini"
MIGRATIONS_DIR = DB_DIR / "migrations"
#: Arbitrary constant key of the PostgreSQL advisory lock that serialises migrations.
_MIGRATION_LOCK_KEY = 7_215_430_118

_lock = threading.Lock()
_engines: dict[str, Engine] = {}
_factories: dict[str, sessionmaker[Session]] = {}
_migrated: set[str] = set()


def normalize_url(url: str) -> str:
    """``postgresql://`` / ``postgres://`` → ``postgresql+psycopg://`` (psycopg 3 is the driver)."""
    if url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    if url.startswith("postgresql://"):
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    return url


def _sqlite_pragmas(dbapi_connection, _record) -> None:
    # Let SQLAlchemy's "begin" event issue BEGIN (below) instead of the sqlite3 module.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    # WAL lets the API read while the worker writes; busy_timeout waits instead of failing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_begin_immediate(connection) -> None:
    """Take the write lock when a transaction starts (waiting up to busy_timeout).

    SQLite's default deferred transactions fail at once ("database is locked") when a
    transaction that has read upgrades to a write after another process wrote; the API and the
    worker both write the store, so every transaction is IMMEDIATE (they are all short).
    """
    connection.exec_driver_sql("BEGIN IMMEDIATE")


def _sqlite_path(url: str) -> Path | None:
    parsed = make_url(url)
    if parsed.get_backend_name() != "sqlite" or not parsed.database or parsed.database == ":memory:":
        return None
    return Path(parsed.database)


def get_engine(url: str) -> Engine:
    url = normalize_url(url)
    with _lock:
        engine = _engines.get(url)
        if engine is None:
            sqlite_path = _sqlite_path(url)
            if sqlite_path is not None:
                sqlite_path.parent.mkdir(parents=True, exist_ok=True)
                engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False})
                event.listen(engine, "connect", _sqlite_pragmas)
                event.listen(engine, "begin", _sqlite_begin_immediate)
            else:
                engine = create_engine(url, pool_pre_ping=True)
            _engines[url] = engine
        return engine


def get_sessionmaker(url: str) -> sessionmaker[Session]:
    url = normalize_url(url)
    factory = _factories.get(url)
    if factory is None:
        factory = sessionmaker(bind=get_engine(url), expire_on_commit=False)
        _factories[url] = factory
    return factory


def alembic_config(url: str, connection=None):
    from alembic.config import Config

    config = Config(str(ALEMBIC_INI))
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", normalize_url(url).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def upgrade_to_head(url: str) -> None:
    """``alembic upgrade head`` on ``url``, safe to call from several processes at once."""
    from alembic import command

    url = normalize_url(url)
    engine = get_engine(url)
    sqlite_path = _sqlite_path(url)
    if sqlite_path is not None:
        with _file_lock(sqlite_path.with_name(sqlite_path.name + ".migrate.lock")):
            with engine.begin() as connection:
                command.upgrade(alembic_config(url, connection), "head")
        return
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _MIGRATION_LOCK_KEY})
            connection.commit()
            try:
                with connection.begin():
                    command.upgrade(alembic_config(url, connection), "head")
            finally:
                connection.execute(text("SELECT pg_advisory_unlock(:key)"), {"key": _MIGRATION_LOCK_KEY})
                connection.commit()
        return
    with engine.begin() as connection:
        command.upgrade(alembic_config(url, connection), "head")


def init_db(settings: Settings) -> sessionmaker[Session]:
    """Create/upgrade the store named by ``settings.database_url``; return its session factory."""
    url = normalize_url(settings.database_url)
    if url not in _migrated:
        upgrade_to_head(url)
        _migrated.add(url)
        log.info("run store ready at %s", make_url(url).render_as_string(hide_password=True))
    return get_sessionmaker(url)


@contextmanager
def session_scope(settings_or_url: Settings | str) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    url = settings_or_url if isinstance(settings_or_url, str) else settings_or_url.database_url
    session = get_sessionmaker(url)()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def dispose_engines(*, close: bool = True) -> None:
    """Forget every engine (tests). ``close=False`` in a forked child: drop the parent's pooled
    connections without closing them, which would break the parent's sockets."""
    with _lock:
        for engine in _engines.values():
            engine.dispose(close=close)
        _engines.clear()
        _factories.clear()
        if close:
            _migrated.clear()
