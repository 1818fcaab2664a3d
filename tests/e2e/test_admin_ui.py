"""The admin UI end to end: a real headless Chromium drives the Gradio app against the real stack.

Processes (each started by this test, stopped by its process group):

* the API — ``uvicorn backend.app.main:app`` with a throw-away SQLite store and the embedded
  (filesystem) broker in a temp folder;
* the worker — ``celery -A worker.celery_app worker -Q gpu -c 1 --pool=solo`` with the same
  environment;
* the UI — ``python -m frontend.app --port … --api-url …``.

Scenario: a wrong token is refused, the right one signs in; a validation error shows under the
form; a tiny run (BUSI, 12 images, 2 folds, 1 epoch, small batches) is launched, watched until
``succeeded`` with its per-fold results; a BUSI image and its mask are segmented in Compare
(both overlays, Dice, a mask download); the run's model is activated in Models.
Screenshots of every tab go to ``docs/screenshots/``.

Skipped only when Debian's Chromium is absent (``apt-get install chromium``); no browser is
ever downloaded.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "docs" / "screenshots"
BUSI = REPO.parent / "shared" / "data" / "BUSI"
BUSI_IMAGE = BUSI / "Dataset_BUSI_with_GT" / "benign" / "benign (10).png"
BUSI_MASK = BUSI / "Dataset_BUSI_with_GT" / "benign" / "benign (10)_mask.png"
TOKEN = "e2e-admin-token"
CHROMIUM = shutil.which("chromium") or ("/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None)
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--headless",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
#: The whole run on 2 shared CPU cores: embedding 12 images and four 1-epoch phases.
RUN_TIMEOUT_S = float(os.environ.get("ULTRAREFINER_E2E_RUN_TIMEOUT_S", "1200"))

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

if CHROMIUM is None:
    pytest.skip(
        "Debian's chromium is not installed (apt-get install -y chromium); the browser test needs it",
        allow_module_level=True,
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


class Stack:
    """The three processes of the test and their logs."""

    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[str, subprocess.Popen, Path]] = []
        self.api_url = f"http://127.0.0.1:{_free_port()}"
        self.ui_url = f"http://127.0.0.1:{_free_port()}"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("ULTRAREFINER_", "GRADIO_"))}
        for key in ("REDIS_URL", "API_KEY", "MODEL_PATH", "DATASETS_ROOT", "DATABASE_URL", "API_URL"):
            env.pop(key, None)
        env.update(
            DATABASE_URL=f"sqlite:///{root / 'store.sqlite'}",
            EMBEDDED_BROKER_DIR=str(root / "broker"),
            RUNS_DIR=str(root / "runs"),
            MODELS_DIR=str(root / "models"),
            CACHE_DIR=str(root / "cache"),
            ONNX_CACHE_DIR=str(root / "onnx"),
            CORRECTIONS_DIR=str(root / "corrections"),
            ADMIN_TOKEN=TOKEN,
            DEVICE="cpu",
            GRADIO_TEMP_DIR=str(root / "gradio"),
            GRADIO_ANALYTICS_ENABLED="False",
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"),
        )
        self.env = env

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        handle = log.open("wb")
        proc = subprocess.Popen(
            args, cwd=REPO, env=self.env, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True
        )
        handle.close()
        self.procs.append((name, proc, log))
        return proc

    def start_api(self) -> subprocess.Popen:
        """``uvicorn backend.app.main:app`` on this stack's API port."""
        return self.start(
            "api",
            [sys.executable, "-m", "uvicorn", "backend.app.main:app", "--host", "127.0.0.1", "--port",
             self.api_url.rsplit(":", 1)[1], "--log-level", "warning"],
        )  # fmt: skip

    def start_ui(self) -> subprocess.Popen:
        """``python -m frontend.app`` on this stack's UI port, talking to its API."""
        return self.start(
            "ui",
            [sys.executable, "-m", "frontend.app", "--host", "127.0.0.1", "--port",
             self.ui_url.rsplit(":", 1)[1], "--api-url", self.api_url],
        )  # fmt: skip

    def wait_ready(self, api: subprocess.Popen, ui: subprocess.Popen) -> None:
        self.wait_http(f"{self.api_url}/ready", api, "api", timeout=300)
        self.wait_http(self.ui_url, ui, "ui", timeout=180)

    def wait_http(self, url: str, proc: subprocess.Popen, name: str, timeout: float = 180.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.logs(name)}")
            try:
                if httpx.get(url, timeout=3).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise RuntimeError(f"{name} did not answer {url} in {timeout:.0f} s:\n{self.logs(name)}")

    def logs(self, name: str | None = None) -> str:
        return "\n".join(
            f"----- {n} ({p.returncode if p.poll() is not None else 'running'}) -----\n{_tail(log)}"
            for n, p, log in self.procs
            if name is None or n == name
        )

    def stop(self) -> None:
        for _, proc, _ in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)  # the group this test started
                except ProcessLookupError:
                    pass
        for _, proc, _ in reversed(self.procs):
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    if not BUSI_IMAGE.is_file():
        pytest.skip(f"the shared BUSI data is missing ({BUSI_IMAGE})")
    stack = Stack(tmp_path_factory.mktemp("e2e"))
    celery = Path(sys.executable).with_name("celery")
    try:
        api = stack.start_api()
        stack.start(
            "worker",
            [str(celery) if celery.exists() else "celery", "-A", "worker.celery_app", "worker", "-Q", "gpu",
             "-c", "1", "--pool=solo", "-l", "INFO", "-n", "e2e@%h"],
        )  # fmt: skip
        ui = stack.start_ui()
        stack.wait_ready(api, ui)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def page(stack):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1280, "height": 860}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(30_000)
        yield page
        context.close()
        browser.close()


def _shot(page, name: str, *, full_page: bool = False) -> None:
    """A small screenshot in docs/screenshots (palette PNG)."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    for close in page.locator('[data-testid="toast-close"]').all():  # toasts hide the header
        try:
            close.click(timeout=1000)
        except Exception:  # noqa: BLE001 - a toast that vanished on its own
            pass
    page.wait_for_timeout(400)
    page.screenshot(path=str(path), full_page=full_page)
    with Image.open(path) as image:
        image = image.convert("RGB")
        if image.width > 1024:
            image = image.resize((1024, round(image.height * 1024 / image.width)), Image.Resampling.LANCZOS)
        small = image.quantize(colors=96, method=Image.Quantize.MEDIANCUT)
    small.save(path, optimize=True)


def _fill_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input").first
    box.fill(str(value))
    box.press("Tab")


def _open_section(page, name: str) -> None:
    page.locator(f"#section-{name} button").first.click()


def _choose_model(page, option: str) -> None:
    """Pick the model whose dropdown label matches the regex ``option`` and press Activate."""
    page.locator("#model-select input").click()
    page.get_by_role("option", name=re.compile(option)).first.click()
    page.click("#activate-btn")


def _wait_text(page, selector: str, text: str, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    content = ""
    while time.monotonic() < deadline:
        content = page.locator(selector).first.inner_text()
        if text in content:
            return content
        time.sleep(0.25)
    raise AssertionError(f"{text!r} never appeared in {selector}; last text: {content!r}")


@pytest.mark.timeout(RUN_TIMEOUT_S + 600)
def test_admin_ui_end_to_end(stack, page):
    started = time.monotonic()
    page.goto(stack.ui_url)
    page.wait_for_selector("#token input")
    # Nothing but the sign-in form until signed in.
    assert not page.locator("#main-panel").is_visible()

    # -- sign in: a wrong token is refused readably, the right one opens the tabs ------------
    page.fill("#token input", "not-the-token")
    page.click("#signin-btn")
    _wait_text(page, "#status", "Sign-in failed: wrong token")
    assert not page.locator("#main-panel").is_visible()
    _shot(page, "signin")
    page.fill("#token input", TOKEN)
    page.click("#signin-btn")
    page.wait_for_selector("#launch-btn", timeout=60_000)
    assert page.locator("#main-panel").is_visible()
    token_inputs = page.locator("#token input")  # the token does not stay in the page
    assert token_inputs.count() == 0 or token_inputs.first.input_value() == ""

    # -- train: the form comes from the schema; a backend validation error shows inline ------
    _fill_number(page, "cfg-folds", 1)
    page.click("#launch-btn")
    _wait_text(page, "#train-errors", "folds: must be ≥ 2")

    page.locator("#cfg-root input, #cfg-root textarea").first.fill(str(BUSI))
    _fill_number(page, "cfg-folds", 2)
    _fill_number(page, "cfg-epochs", 1)
    _fill_number(page, "cfg-data-limit", 12)
    page.locator("#cfg-device").get_by_text("cpu", exact=True).click()
    _open_section(page, "coarse")
    _fill_number(page, "cfg-coarse-batch_size", 4)
    _open_section(page, "augment")
    _fill_number(page, "cfg-augment-per_mask", 1)
    _open_section(page, "refiner_train")
    _fill_number(page, "cfg-refiner_train-batch_size", 4)
    _open_section(page, "end_to_end")
    _fill_number(page, "cfg-end_to_end-batch_size", 2)
    _fill_number(page, "cfg-end_to_end-warmup_steps", 1)
    page.click("#preview-btn")
    body = _wait_text(page, "#preview-code", '"limit": 12')
    for expected in ('"folds": 2', '"epochs": 1', '"per_mask": 1', '"device": "cpu"'):
        assert expected in body, body
    assert "must be" not in page.locator("#train-errors").inner_text()
    page.evaluate("window.scrollTo(0, 0)")
    _shot(page, "train")

    page.click("#launch-btn")
    _wait_text(page, "#status", "launched", timeout=60)
    summary = _wait_text(page, "#run-summary", "Run #1", timeout=60)
    assert "Run #1" in summary

    # -- runs: live table and detail until the run succeeds ----------------------------------
    deadline = time.monotonic() + RUN_TIMEOUT_S
    shot_running = False
    while True:
        summary = page.locator("#run-summary").inner_text()
        if "succeeded" in summary:
            break
        if "failed" in summary or "cancelled" in summary or "lost" in summary:
            logs = page.locator("#run-logs textarea").input_value()
            pytest.fail(f"the run ended as: {summary}\nUI logs:\n{logs}\n{stack.logs('worker')}")
        if not shot_running and "running" in summary and "epoch" in summary:
            _shot(page, "runs")
            shot_running = True
        if time.monotonic() > deadline:
            pytest.fail(f"the run did not succeed in {RUN_TIMEOUT_S:.0f} s: {summary}\n{stack.logs()}")
        time.sleep(2)
    # The table is refreshed in the same update as the detail (read after it): no older status.
    _wait_text(page, "#runs-table", "succeeded", timeout=5)
    if not shot_running:
        _shot(page, "runs")
    folds = _wait_text(page, "#folds-table", "coarse", timeout=30)
    assert folds.count("coarse") >= 2, folds  # one row per fold of phase 1
    _wait_text(page, "#folds-table", "refiner", timeout=30)  # baseline vs refined on a fold
    _wait_text(page, "#eval-table", "busi", timeout=30)
    page.locator("#run-summary").scroll_into_view_if_needed()
    _shot(page, "run_detail", full_page=True)

    # -- models: the run's model is listed beside the shipped one; activate it (its recorded
    #    Dice is lower: the UI asks first), then roll back to the shipped default ------------
    page.get_by_role("tab", name="Models").click()
    _wait_text(page, "#models-table", "shipped default", timeout=60)
    table = _wait_text(page, "#models-table", "compact-", timeout=60)
    assert table.count("compact-") >= 2, table  # one name per model: the version it serves under
    _choose_model(page, r"^#2 ")
    deadline = time.monotonic() + 180
    while "is now active" not in page.locator("#status").inner_text():
        if "lower recorded refined Dice" in page.locator("#activate-warning").inner_text():
            page.locator("#confirm-activate-btn:not([disabled])").click()
            _wait_text(page, "#status", "is now active", timeout=180)
        assert time.monotonic() < deadline, "the run's model was not activated"
        time.sleep(0.5)
    _wait_text(page, "#models-table", "active", timeout=30)
    _shot(page, "models")
    ready = httpx.get(f"{stack.api_url}/ready", timeout=10).json()
    assert ready["model_source"] == "store"
    run_model_version = ready["model_version"]
    # -- compare: upload a BUSI image and its mask; both overlays, Dice, a download ----------
    page.get_by_role("tab", name="Compare").click()
    page.set_input_files("#compare-file input[type=file]", str(BUSI_IMAGE))
    page.set_input_files("#compare-truth input[type=file]", str(BUSI_MASK))
    page.wait_for_timeout(600)
    page.click("#segment-btn")
    result = _wait_text(page, "#compare-result", "Dice vs ground truth", timeout=300)
    assert "Area (px)" in result
    assert "untrained" not in result and run_model_version in result  # the activated model serves
    page.wait_for_selector("#combined-view img", timeout=30_000)
    page.click("#export-btn")
    page.wait_for_selector("#downloads a", timeout=60_000)
    links = page.locator("#downloads a")
    hrefs = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
    refined = next(i for i, href in enumerate(hrefs) if href.split("?")[0].endswith("_refined_mask.png"))
    with page.expect_download() as download:
        links.nth(refined).click()
    from PIL import Image

    with Image.open(download.value.path()) as mask:
        with Image.open(BUSI_IMAGE) as original:
            assert mask.size == original.size
    _shot(page, "compare", full_page=True)

    # -- rollback: the shipped default serves again -----------------------------------------
    page.get_by_role("tab", name="Models").click()
    _wait_text(page, "#models-table", "shipped default", timeout=60)
    _choose_model(page, r"^#1 ")
    _wait_text(page, "#status", "is now active", timeout=180)
    _wait_text(page, "#models-table", "active · shipped default", timeout=30)
    shipped = httpx.get(f"{stack.api_url}/ready", timeout=10).json()["model_version"]
    assert shipped != run_model_version and shipped.startswith("compact-")

    # -- cancel: a second run (same form) is cancelled from the Runs tab --------------------
    page.get_by_role("tab", name="Train").click()
    page.click("#launch-btn")
    _wait_text(page, "#run-summary", "Run #2", timeout=60)
    page.click("#cancel-btn")
    _wait_text(page, "#status", "Cancellation of run #2 requested", timeout=60)
    _wait_text(page, "#run-summary", "cancelled", timeout=300)
    print(f"e2e scenario took {time.monotonic() - started:.0f} s")
