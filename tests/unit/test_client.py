"""frontend.client against the real backend app (served by uvicorn in a thread; no mocks).

The app is ``backend.app.main.create_app`` with a throw-away SQLite store and the embedded
broker in a temp folder; no worker runs, so launched runs stay queued.
"""

from __future__ import annotations

import io
import socket
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from frontend.client import BackendClient, BackendError, format_validation_errors

TOKEN = "unit-test-admin-token"
#: The settings of the module's backend (for tests that put rows in its store).
SERVER: dict = {}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def api_url(tmp_path_factory) -> str:
    uvicorn = pytest.importorskip("uvicorn")
    from backend.app.core.settings import Settings
    from backend.app.main import create_app

    root = tmp_path_factory.mktemp("backend")
    settings = Settings(
        database_url=f"sqlite:///{root / 'store.sqlite'}",
        redis_url=None,
        embedded_broker_dir=root / "broker",
        admin_token=TOKEN,
        models_dir=root / "models",
        runs_dir=root / "runs",
        cache_dir=root / "cache",
        onnx_cache_dir=root / "onnx",
        model_path=None,
        device="cpu",
        inference_engine="torch",  # the engines have their own tests
    )
    app = create_app(settings)
    SERVER["settings"] = settings
    # Bind the socket here and hand it to uvicorn: no race for the port with parallel tests.
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            pytest.fail("the backend did not start")
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    # /ready turns 200 once the served model is loaded (an untrained bundle without models/default.pt).
    client = BackendClient(url)
    while True:
        try:
            client.ready()
            break
        except BackendError:
            if time.monotonic() > deadline:
                pytest.fail("the backend never became ready")
            time.sleep(0.2)
    yield url
    server.should_exit = True
    thread.join(timeout=15)
    sock.close()


@pytest.fixture
def admin(api_url) -> BackendClient:
    return BackendClient(api_url, TOKEN)


def _busi_like_png(width: int = 160, height: int = 120) -> bytes:
    """A gray speckled image with a dark elliptic 'lesion' (enough for the pipeline to run)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width]
    image = 150 + rng.normal(0, 20, (height, width))
    lesion = ((xx - width * 0.5) / (width * 0.2)) ** 2 + ((yy - height * 0.5) / (height * 0.18)) ** 2 <= 1
    image[lesion] = 40 + rng.normal(0, 8, lesion.sum())
    buffer = io.BytesIO()
    Image.fromarray(image.clip(0, 255).astype(np.uint8), mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def test_health_and_ready_need_no_token(api_url):
    client = BackendClient(api_url)
    assert client.health()
    assert client.ready()


def test_sign_in_with_the_right_token(admin):
    admin.sign_in()


def test_wrong_token_reads_sign_in_failed(api_url):
    with pytest.raises(BackendError) as caught:
        BackendClient(api_url, "not-the-token").sign_in()
    assert caught.value.status_code == 401
    assert caught.value.message == "Sign-in failed: wrong token"
    assert "not-the-token" not in str(caught.value)


def test_admin_call_without_token_is_refused_before_sending(api_url):
    with pytest.raises(BackendError, match="Sign in first"):
        BackendClient(api_url).list_runs()


def test_token_never_shown_in_repr(api_url):
    client = BackendClient(api_url, "super-secret-token")
    assert "super-secret-token" not in repr(client)


def test_connection_refused_is_readable():
    url = f"http://127.0.0.1:{_free_port()}"
    with pytest.raises(BackendError) as caught:
        BackendClient(url, TOKEN).list_runs()
    assert caught.value.message == f"Backend not reachable at {url}"
    assert caught.value.status_code is None


def test_config_schema_describes_the_run_request(admin):
    schema = admin.config_schema()
    props = schema["properties"]
    for key in ("config_name", "phases", "data", "coarse", "refiner_train", "end_to_end"):
        assert key in props, key


def test_validation_errors_are_readable_field_messages(admin):
    with pytest.raises(BackendError) as caught:
        admin.create_run({"folds": 1, "data": {"limit": 2}, "coarse": {"lr": 0}})
    error = caught.value
    assert error.status_code == 422
    assert "folds: must be ≥ 2" in error.errors
    assert "data.limit: must be ≥ 4" in error.errors
    assert "coarse.lr: must be > 0" in error.errors
    assert "folds: must be ≥ 2" in error.message


def test_unknown_setting_and_model_validator_messages(admin):
    with pytest.raises(BackendError) as caught:
        admin.create_run({"augment": {"temperature_min": 9.0, "temperature_max": 3.0}, "bogus": 1})
    assert "bogus: is not a known setting" in caught.value.errors
    assert any(
        line.startswith("augment") and "temperature_min must not exceed temperature_max" in line
        for line in caught.value.errors
    ), caught.value.errors


def test_missing_dataset_root_is_a_field_error(admin, tmp_path):
    with pytest.raises(BackendError) as caught:
        admin.create_run({"root": str(tmp_path / "nowhere"), "folds": 2, "epochs": 1, "data": {"limit": 12}})
    assert caught.value.status_code == 422
    assert any(line.startswith("root:") for line in caught.value.errors), caught.value.errors


def test_launch_list_watch_and_cancel_a_run(admin):
    busi = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BUSI"
    body = {"dataset": "busi", "folds": 2, "epochs": 1, "data": {"limit": 12}}
    if busi.is_dir():
        body["root"] = str(busi)
    else:  # pragma: no cover - the shared data always ships with the project
        pytest.skip("the shared BUSI data is missing")
    run = admin.create_run(body)
    run_id = run["id"]
    assert run["status"] == "queued"
    assert run_id in [item["id"] for item in admin.list_runs()]
    detail = admin.get_run(run_id)
    assert detail["config"]["data"]["folds"] == 2
    metrics = admin.run_metrics(run_id)
    assert metrics["epochs"] == [] and metrics["folds"] == [] and metrics["evaluations"] == []
    cancelled = admin.cancel_run(run_id)
    assert cancelled["status"] in {"cancelled", "queued"}
    assert cancelled.get("cancel_requested") or cancelled["status"] == "cancelled"


def test_unknown_run_and_model_read_not_found(admin):
    with pytest.raises(BackendError) as caught:
        admin.get_run(987654)
    assert caught.value.status_code == 404
    assert caught.value.message.startswith("Not found:")
    with pytest.raises(BackendError) as caught:
        admin.activate_model(987654)
    assert caught.value.status_code == 404


def test_models_list(admin):
    assert isinstance(admin.list_models(), list)


def test_segment_returns_both_masks_at_the_original_size(api_url):
    result = BackendClient(api_url).segment(_busi_like_png(160, 120), "lesion.png")
    for mask in (result.coarse, result.refined):
        assert mask.mask.shape == (120, 160)
        assert mask.mask.dtype == bool
        assert mask.area_px == int(mask.mask.sum())
        assert mask.png.startswith(b"\x89PNG")
    assert (result.width, result.height) == (160, 120)
    assert result.model_version
    assert "total" in result.timings_ms


def test_segment_rejects_a_non_image_readably(api_url):
    with pytest.raises(BackendError) as caught:
        BackendClient(api_url).segment(b"this is not an image", "notes.txt")
    assert caught.value.status_code in {400, 415, 422}
    assert "Traceback" not in caught.value.message


def test_format_validation_errors_of_other_shapes():
    assert format_validation_errors("plain text") == ["plain text"]
    assert format_validation_errors(None) == []
    assert format_validation_errors(
        [
            {
                "type": "literal_error",
                "loc": ["body", "dataset"],
                "msg": "x",
                "ctx": {"expected": "'busi' or 'bus'"},
            }
        ]
    ) == ["dataset: must be one of 'busi' or 'bus'"]
    assert format_validation_errors(
        [{"type": "missing", "loc": ["body", "phases", 0], "msg": "Field required"}]
    ) == ["phases[0]: is required"]


# ------------------------------------------------------------------ the UI's form ↔ the backend


def _form_values(fields, **changes):
    values = {spec.key: spec.widget_value() for spec in fields}
    values.update(changes)
    return [values[spec.key] for spec in fields]


def test_form_from_schema_sends_only_changed_settings(admin):
    from frontend.schema_form import collect_config, form_fields

    schema = admin.config_schema()
    fields = form_fields(schema)
    keys = {spec.key for spec in fields}
    # Shortcuts replace the settings they stand for; every section's hyper-parameters are there.
    assert {"dataset", "root", "folds", "epochs", "config_name", "phases", "data.limit"} <= keys
    assert "data.folds" not in keys and "data.root" not in keys
    assert {"coarse.lr", "refiner_train.change_penalty_weight", "end_to_end.warmup_steps"} <= keys
    by_key = {spec.key: spec for spec in fields}
    assert by_key["folds"].widget_value() == 5 and "≥ 2" in by_key["folds"].info()
    assert by_key["coarse.lr"].help

    busi = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BUSI"
    values = _form_values(fields, root=str(busi), folds=2, epochs=1, **{"data.limit": 12, "coarse.lr": 0.02})
    body = collect_config(fields, values)
    expected = {
        "phases": ["coarse", "augment", "refiner", "end-to-end"],
        "folds": 2,
        "epochs": 1,
        "data": {"limit": 12},
        "coarse": {"lr": 0.02},
    }
    if str(busi) != by_key["root"].default:  # the default root is not sent
        expected["root"] = str(busi)
    assert body == expected
    run = admin.create_run(body)
    config = admin.get_run(run["id"])["config"]
    admin.cancel_run(run["id"])
    assert config["data"]["folds"] == 2 and config["data"]["limit"] == 12
    assert config["coarse"]["epochs"] == 1 and config["end_to_end"]["epochs"] == 1
    assert config["coarse"]["lr"] == 0.02
    compact = schema["x-transunet-presets"]["compact"]
    assert config["transunet"]["hidden_size"] == compact["hidden_size"]


def test_form_full_configuration_follows_its_preset(admin):
    from frontend.schema_form import collect_config, form_fields

    schema = admin.config_schema()
    fields = form_fields(schema)
    full = schema["x-transunet-presets"]["full"]
    # What the UI does when "full" is picked: the TransUNet fields switch to the full preset.
    changes = {spec.key: spec.widget_value(spec.default_for("full")) for spec in fields if spec.presets}
    busi = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "BUSI"
    values = _form_values(fields, config_name="full", root=str(busi), folds=2, **changes)
    body = collect_config(fields, values)
    assert "transunet" not in body and body["config_name"] == "full"
    run = admin.create_run(body)
    config = admin.get_run(run["id"])["config"]
    admin.cancel_run(run["id"])
    assert config["transunet"]["hidden_size"] == full["hidden_size"]


def test_build_app_makes_the_blocks(api_url):
    import gradio as gr

    from frontend.app import build_app

    assert isinstance(build_app(api_url), gr.Blocks)


# ----------------------------------------------------------------------------- models tab


def _register_lower_dice_model(tmp_path) -> int:
    from backend.app.db import crud
    from backend.app.db.session import session_scope
    from training.checkpoints import build_untrained_bundle, save_bundle

    bundle = tmp_path / "tiny-run.pt"
    save_bundle(bundle, build_untrained_bundle())
    with session_scope(SERVER["settings"]) as session:
        version = crud.register_model_version(
            session,
            bundle_path=bundle,
            sha256=crud.file_sha256(bundle),
            metrics={"model_version": "tiny-run-model", "test": {"dice_coarse": 0.30, "dice_refined": 0.35}},
        )
        session.commit()
        return version.id


def test_models_tab_lists_the_shipped_model_confirms_a_worse_one_and_rolls_back(admin, tmp_path):
    from frontend import models_tab
    from training.checkpoints import DEFAULT_BUNDLE_PATH

    if not DEFAULT_BUNDLE_PATH.is_file():
        pytest.skip("no shipped model in this checkout")
    listing = admin.list_models_page()
    shipped = [m for m in listing["items"] if m["shipped"]]
    assert len(shipped) == 1 and shipped[0]["name"] == admin.ready()["model_version"]
    assert listing["serving_id"] == shipped[0]["id"]  # the default serves while none is active

    worse = _register_lower_dice_model(tmp_path)
    decision = models_tab.request_activation(admin, str(worse))
    assert not decision.done and "lower recorded refined Dice (0.350)" in decision.message
    assert admin.list_models_page()["serving_id"] == shipped[0]["id"]  # nothing changed

    decision = models_tab.request_activation(admin, str(worse), confirmed=True)
    assert decision.done and "tiny-run-model" in decision.message
    listing = admin.list_models_page()
    assert listing["active_id"] == worse and listing["serving_id"] == worse
    assert admin.ready()["model_version"] != shipped[0]["name"]

    # Rollback to the shipped model: a higher recorded Dice, no confirmation needed.
    decision = models_tab.request_activation(admin, str(shipped[0]["id"]))
    assert decision.done
    listing = admin.list_models_page()
    assert listing["active_id"] == shipped[0]["id"] == listing["serving_id"]
    assert admin.ready()["model_version"] == shipped[0]["name"]
    rows, choices = models_tab.rows_and_choices(listing["items"])
    assert any("shipped default" in str(row[1]) and "active" in str(row[1]) for row in rows)
    assert all(label.split(" ", 1)[1].startswith(("compact-", "tiny-run-model")) for label, _ in choices)
