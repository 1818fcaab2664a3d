"""Shared pytest fixtures (add new fixtures below; keep existing ones unchanged)."""

from __future__ import annotations

import os
import random
import uuid
from collections.abc import Iterator

import pytest

# ----------------------------------------------------------------- run store: PostgreSQL, Redis

#: Server database the tests connect to in order to create their own throw-away database.
POSTGRES_ADMIN_URL = os.environ.get(
    "ULTRAREFINER_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
REDIS_SERVER_URL = os.environ.get("ULTRAREFINER_TEST_REDIS_URL", "redis://127.0.0.1:6379")


def _postgres_reachable() -> str | None:
    try:
        import psycopg

        url = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(url, connect_timeout=3):
            return None
    except Exception as exc:  # noqa: BLE001
        return f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL}: {exc}"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """URL of a PostgreSQL database created for this test session and dropped after it."""
    reason = _postgres_reachable()
    if reason:
        pytest.skip(reason)
    import psycopg

    admin = POSTGRES_ADMIN_URL.replace("postgresql+psycopg://", "postgresql://")
    name = f"ultrarefiner_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    try:
        yield f"{base}/{name}"
    finally:
        from backend.app.db.session import dispose_engines

        dispose_engines()
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def database_url(request, tmp_path) -> str:
    """Each test twice: on a fresh SQLite file (in a folder not made yet) and on the session's
    PostgreSQL database, which refuses what SQLite lets through (32-bit ids, NUL, NaN in JSON)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'nested' / 'store.sqlite'}"
    return request.getfixturevalue("postgres_url")


@pytest.fixture
def redis_db_url() -> Iterator[str]:
    """``redis://…/<n>`` of an empty Redis database claimed for one test and flushed after it."""
    import redis

    try:
        client = redis.Redis.from_url(f"{REDIS_SERVER_URL}/0", socket_connect_timeout=3)
        databases = int(client.config_get("databases").get("databases", 16))
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"Redis is not reachable at {REDIS_SERVER_URL}: {exc}")
    candidates = list(range(1, databases))
    random.shuffle(candidates)
    token = f"ultrarefiner-test-{uuid.uuid4().hex}"
    for number in candidates:
        db = redis.Redis.from_url(f"{REDIS_SERVER_URL}/{number}")
        # Claim an empty database with a marker key; others' tests skip non-empty ones.
        if db.dbsize() == 0 and db.set("_ultrarefiner_test_claim", token, nx=True, ex=3600):
            if db.dbsize() == 1:
                try:
                    yield f"{REDIS_SERVER_URL}/{number}"
                finally:
                    if db.get("_ultrarefiner_test_claim") == token.encode():
                        db.flushdb()
                return
            db.delete("_ultrarefiner_test_claim")
    pytest.skip("no empty Redis database is free")


# ----------------------------------------------------------------- training: tiny data, fast encoder


@pytest.fixture(scope="session")
def synthetic_busi_root(tmp_path_factory):
    """A BUSI-layout tree of 10 small synthetic images: 4 benign, 3 malignant, 3 normal."""
    import numpy as np
    from PIL import Image

    root = tmp_path_factory.mktemp("synthetic_busi")
    rng = np.random.default_rng(7)
    for label, count in (("benign", 4), ("malignant", 3), ("normal", 3)):
        folder = root / "Dataset_BUSI_with_GT" / label
        folder.mkdir(parents=True)
        for index in range(1, count + 1):
            height, width = int(rng.integers(60, 80)), int(rng.integers(80, 100))
            rows, cols = np.mgrid[0:height, 0:width]
            texture = rng.normal(110, 30, (height, width)) + rng.uniform(-40, 40) * cols / width
            mask = np.zeros((height, width), dtype=bool)
            if label != "normal":
                cy, cx = rng.uniform(0.3, 0.7) * height, rng.uniform(0.3, 0.7) * width
                ry, rx = rng.uniform(0.12, 0.25) * height, rng.uniform(0.12, 0.25) * width
                mask = ((rows - cy) / ry) ** 2 + ((cols - cx) / rx) ** 2 <= 1
                texture[mask] -= 70  # hypoechoic lesion
            image = np.clip(texture, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(folder / f"{label} ({index}).png")
            Image.fromarray((mask * 255).astype(np.uint8)).save(folder / f"{label} ({index})_mask.png")
    return root


@pytest.fixture(scope="session")
def fake_refiner_encode():
    """A cheap deterministic stand-in for ``Refiner.encode`` (same shapes); patch it in yourself."""
    import torch
    import torch.nn.functional as F

    projection = torch.randn(256, 3, generator=torch.Generator().manual_seed(0)) * 0.5

    def encode(self, images):
        with torch.no_grad():
            pooled = F.adaptive_avg_pool2d(images.float(), self.embedding_side)  # B×3×E×E
            return torch.einsum("oc,bchw->bohw", projection.to(images.device), pooled)

    return encode


@pytest.fixture(scope="session")
def no_lesion_coarse():
    """A coarse segmenter that never finds a lesion (background logit 10, lesion logit −10)."""
    import torch

    class NoLesionCoarse(torch.nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            batch, _, height, width = images.shape
            return torch.stack([torch.full((batch, height, width), v) for v in (10.0, -10.0)], 1)

    return NoLesionCoarse()


@pytest.fixture
def fast_refiner_encoder(monkeypatch, fake_refiner_encode):
    """Patch the frozen refiner image encoder with :func:`fake_refiner_encode` for one test.

    Use it with a ``cache_dir`` under a temporary folder: its embeddings must not reach a shared cache.
    """
    from training.modeling.refiner import Refiner

    monkeypatch.setattr(Refiner, "encode", fake_refiner_encode)
    return fake_refiner_encode


@pytest.fixture(scope="session")
def make_tiny_config(synthetic_busi_root):
    """``make(output_dir, **overrides)`` → a fast TrainingConfig on the synthetic BUSI tree.

    Section overrides (dicts) are merged into the tiny defaults; the cache sits beside the run.
    """
    from training.config import TrainingConfig, TransUNetConfig

    def make(output_dir, **overrides):
        sections = {
            "data": {"root": synthetic_busi_root, "folds": 2},
            "transunet": TransUNetConfig.named("compact").model_dump() | {"img_size": 64},
            "refiner": {"pretrained": False},
            "coarse": {"epochs": 1, "batch_size": 4},
            "augment": {"per_mask": 2},
            "refiner_train": {"epochs": 1, "batch_size": 4},
            "end_to_end": {"epochs": 1, "batch_size": 4, "warmup_steps": 1},
        }
        for name, value in list(overrides.items()):
            if name in sections and isinstance(value, dict):
                sections[name] = sections[name] | value
                del overrides[name]
        values = {"output_dir": output_dir, "cache_dir": output_dir.parent / "cache", "device": "cpu"}
        return TrainingConfig(**(values | sections | overrides))

    return make


@pytest.fixture
def tiny_training_config(tmp_path, make_tiny_config):
    """Factory of a fast TrainingConfig writing under this test's ``tmp_path``."""
    return lambda **overrides: make_tiny_config(overrides.pop("output_dir", tmp_path / "run"), **overrides)
