"""Schema-driven fuzzing of the API: no generated request may cause a 5xx.

Schemathesis reads the app's OpenAPI schema and sends a bounded number of positive and negative
examples (random multipart bodies, query values, missing parts) to ``/segment``,
``/segment/batch``, ``/health`` and ``/ready``, and (signed in) to every admin route, ids and
offsets of any size included, on an SQLite and on a real PostgreSQL store. The untrained bundle
is served; random bytes never reach the model, so the run is fast.
"""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402

from backend.app.core.settings import Settings  # noqa: E402
from backend.app.main import create_app  # noqa: E402

ADMIN_TOKEN = "fuzz-admin-token"
ADMIN_OPERATIONS = [
    "GET /api/runs",
    "GET /api/runs/{run_id}",
    "GET /api/runs/{run_id}/metrics",
    "POST /api/runs/{run_id}/cancel",
    "POST /api/runs/{run_id}/resume",
    "GET /api/models",
    "POST /api/models/{version_id}/activate",
    "POST /api/runs",
    "GET /api/corrections",
    "GET /api/corrections/{correction_id}",
    "GET /api/corrections/{correction_id}/{part}.png",
    "DELETE /api/corrections/{correction_id}",
    "POST /api/corrections",
]


def _app(root, database_url: str):
    from training.checkpoints import build_untrained_bundle, save_bundle

    bundle = root / "untrained.pt"
    save_bundle(bundle, build_untrained_bundle())
    app = create_app(
        Settings(
            model_path=bundle,
            database_url=database_url,
            max_upload_mb=1.0,
            max_image_pixels=1_000_000,
            embedding_cache_items=4,
            inference_engine="torch",  # the engines have their own tests
            admin_token=ADMIN_TOKEN,
            runs_dir=root / "runs",
            models_dir=root / "models",
            corrections_dir=root / "corrections",
            embedded_broker_dir=root / "broker",
            redis_url=None,
        )
    )
    app.state.model_holder.load(bundle, source="settings")  # schemathesis calls skip the lifespan
    return app


def _operations(app) -> dict:
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    selected = schema.include(path_regex=r"^/(segment|segment/batch|health|ready|api/.*)$")
    found = [result.ok() for result in selected.get_all_operations()]
    return {f"{op.method.upper()} {op.path}": op for op in found}


@pytest.fixture(scope="module")
def operations(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    found = _operations(_app(root, f"sqlite:///{root / 'store.sqlite'}"))
    assert {"POST /segment", "POST /segment/batch"} <= set(found)
    return found


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def admin_operations(request, tmp_path_factory):
    """The admin routes on either store: PostgreSQL refuses what SQLite lets through (32-bit ids,
    NUL characters, NaN in JSON), so each is fuzzed against both."""
    root = tmp_path_factory.mktemp(f"fuzz-{request.param}")
    if request.param == "sqlite":
        url = f"sqlite:///{root / 'store.sqlite'}"
    else:
        url = request.getfixturevalue("postgres_url")
    found = _operations(_app(root, url))
    assert set(ADMIN_OPERATIONS) <= set(found)
    return found


def _check(case, headers: dict | None = None) -> None:
    response = case.call(headers=headers)
    case.validate_response(response, checks=[not_a_server_error])
    assert response.status_code < 500, response.text
    content_type = response.headers.get("content-type") or [""]
    if isinstance(content_type, list):
        content_type = content_type[0]
    if response.status_code >= 400 and content_type.startswith("application/json"):
        assert response.json().get("detail"), "every error names its problem in 'detail'"


@pytest.mark.parametrize(
    "label,mode",
    [
        ("POST /segment", GenerationMode.POSITIVE),
        ("POST /segment", GenerationMode.NEGATIVE),
        ("POST /segment/batch", GenerationMode.POSITIVE),
        ("POST /segment/batch", GenerationMode.NEGATIVE),
        ("GET /health", GenerationMode.POSITIVE),
        ("GET /ready", GenerationMode.POSITIVE),
    ],
    ids=lambda value: getattr(value, "value", value),
)
def test_no_server_errors(operations, label, mode):
    operation = operations[label]
    examples = 20 if label.startswith("POST") else 5

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=examples, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        _check(case)

    run()


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
@pytest.mark.parametrize("label", ADMIN_OPERATIONS)
def test_no_server_errors_on_admin_routes(admin_operations, label, mode):
    operation = admin_operations[label]
    auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(max_examples=15, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    def run(case) -> None:
        _check(case, headers=auth)

    run()
