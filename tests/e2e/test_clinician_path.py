"""The clinician's path in a real headless Chromium against the real API (no training run).

API (``uvicorn backend.app.main:app``, default settings: the shipped model on the default
engine) and UI (``python -m frontend.app``) are started by this test. Scenarios:

* a BUSI image and its mask: segment; add a background point, then a box (two corners), and see
  the refined mask change each time on the cached embedding; undo; drag a box in the box panel;
  download the masks;
* bad files: a text file named ``.png`` shows the server's reason and clears the previous result;
  the ultrasound image given as its own mask and a mask of another size are refused by name;
* a DICOM cine (3 frames of a BUSI image, with a pixel spacing): frame selector, mm² areas, and
  a DICOM SEG download that references the chosen frame.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image

from tests.e2e.test_admin_ui import (
    BUSI,
    CHROMIUM,
    CHROMIUM_ARGS,
    TOKEN,
    Stack,
    _choose_model,
    _wait_text,
)
from tests.imaging_fixtures import US_MULTIFRAME_STORAGE

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

IMAGE = BUSI / "Dataset_BUSI_with_GT" / "benign" / "benign (10).png"
MASK = BUSI / "Dataset_BUSI_with_GT" / "benign" / "benign (10)_mask.png"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):

    if not IMAGE.is_file():
        pytest.skip(f"the shared BUSI data is missing ({IMAGE})")
    stack = Stack(tmp_path_factory.mktemp("clinician"))
    try:
        api, ui = stack.start_api(), stack.start_ui()
        stack.wait_ready(api, ui)
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert CHROMIUM is not None
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(stack, browser):
    """A new browser session, signed in, on the Compare tab."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    page = context.new_page()
    page.set_default_timeout(30_000)
    page.goto(stack.ui_url)
    page.fill("#token input", TOKEN)
    page.click("#signin-btn")
    page.wait_for_selector("#launch-btn", timeout=60_000)
    page.get_by_role("tab", name="Compare").click()
    yield page
    context.close()


def _refined_area(page) -> int:
    rows = page.locator("#compare-result tr").all_inner_texts()
    area = next(row for row in rows if row.startswith("Area (px)"))
    return int(area.split()[-1])


def _upload(page, selector: str, path: Path) -> None:
    """Put ``path`` in the file box ``selector`` (clearing the file it holds first)."""
    clear = page.locator(f"{selector} button[aria-label='Clear']")
    if clear.count():
        clear.first.click()
        page.wait_for_selector(f"{selector} input[type=file]", state="attached")
    page.set_input_files(f"{selector} input[type=file]", str(path))
    page.wait_for_timeout(600)


def _segment(page, expect: str, timeout: float = 300) -> str:
    page.click("#segment-btn")
    return _wait_text(page, "#compare-result", expect, timeout=timeout)


def _click_view(page, fx: float, fy: float) -> None:
    view = page.locator("#combined-view img")
    box = view.bounding_box()
    view.click(position={"x": box["width"] * fx, "y": box["height"] * fy})


def _download(page, suffix: str) -> Path:
    """Prepare downloads, then save the one whose file name ends with ``suffix``."""
    page.click("#export-btn")
    page.wait_for_selector("#downloads a", timeout=60_000)
    links = page.locator("#downloads a")
    hrefs = [links.nth(i).get_attribute("href") or "" for i in range(links.count())]
    matching = [i for i, href in enumerate(hrefs) if href.split("?")[0].endswith(suffix)]
    assert matching, hrefs
    with page.expect_download() as download:
        links.nth(matching[0]).click()
    return Path(download.value.path())


def _mode(page, name: str) -> None:
    page.locator("#click-mode").get_by_text(name, exact=False).click()


def test_correct_a_busi_mask_with_a_point_and_a_box_then_undo_and_download(page):
    _upload(page, "#compare-file", IMAGE)
    _upload(page, "#compare-truth", MASK)
    result = _segment(page, "Dice vs ground truth")
    assert "prompts derived from the coarse mask" in result
    assert "Refiner confidence" in result
    first = _refined_area(page)
    assert first > 0

    # A background point inside the lesion's box: the refined mask changes, the image is not
    # re-encoded (the server's cached embedding).
    _mode(page, "Background point")
    _click_view(page, 0.30, 0.30)
    result = _wait_text(page, "#compare-result", "clinician prompts: 1 point(s)", timeout=120)
    assert "cached embedding" in result
    after_point = _refined_area(page)
    assert after_point != first

    # A box: two clicks on opposite corners around the lesion.
    _mode(page, "Box")
    _click_view(page, 0.02, 0.08)
    _wait_text(page, "#status", "opposite corner", timeout=30)
    _click_view(page, 0.45, 0.50)
    _wait_text(page, "#compare-result", "1 point(s), 1 box", timeout=120)
    after_box = _refined_area(page)
    assert after_box != after_point

    # Undo removes the box: the mask of the point alone comes back.
    page.click("#undo-btn")
    result = _wait_text(page, "#compare-result", "clinician prompts: 1 point(s) ·", timeout=120)
    assert "1 box" not in result
    assert _refined_area(page) == after_point
    page.click("#undo-btn")
    _wait_text(page, "#compare-result", "prompts derived from the coarse mask", timeout=120)
    assert _refined_area(page) == first

    # Dragging across the lesion in the box panel sets the box directly.
    canvas = page.locator("#box-drawer canvas").first
    canvas.scroll_into_view_if_needed()
    area = canvas.bounding_box()
    page.mouse.move(area["x"] + area["width"] * 0.08, area["y"] + area["height"] * 0.08)
    page.mouse.down()
    for step in range(1, 11):
        page.mouse.move(
            area["x"] + area["width"] * (0.08 + 0.03 * step),
            area["y"] + area["height"] * (0.08 + 0.04 * step),
        )
    page.mouse.up()
    _wait_text(page, "#compare-result", "0 point(s), 1 box", timeout=120)
    assert _refined_area(page) != first
    page.click("#undo-btn")
    _wait_text(page, "#compare-result", "prompts derived from the coarse mask", timeout=120)

    # Layers and opacity redraw the combined view without a request.
    page.locator("#show-coarse input").check()
    page.wait_for_timeout(500)

    with Image.open(_download(page, "_refined_mask.png")) as mask, Image.open(IMAGE) as original:
        assert mask.size == original.size
        assert int((np.asarray(mask.convert("L")) > 0).sum()) == first


def test_bad_files_say_why_and_clear_the_previous_result(page, tmp_path):
    _upload(page, "#compare-file", IMAGE)
    _segment(page, "Area (px)")

    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("this is a text file, not an image\n" * 20)
    _upload(page, "#compare-file", not_an_image)
    result = _segment(page, "Could not segment this file", timeout=60)
    assert "unsupported file type" in result
    assert "Area (px)" not in result
    assert "⚠" in page.locator("#status").inner_text()
    assert page.locator("#combined-view img").count() == 0

    # The ultrasound image given as its own ground truth, and a mask of another size.
    _upload(page, "#compare-file", IMAGE)
    _upload(page, "#compare-truth", IMAGE)
    result = _segment(page, "not binary", timeout=120)
    assert "Could not segment this file" in result
    small = tmp_path / "small_mask.png"
    with Image.open(MASK) as mask:
        mask.resize((mask.width // 2, mask.height // 2)).save(small)
    _upload(page, "#compare-truth", small)
    result = _segment(page, "pixels but the image is", timeout=120)
    assert "Could not segment this file" in result and "not binary" not in result


def _cine(path: Path) -> Path:
    """A 3-frame ultrasound cine from a BUSI image (frames shifted), 0.1 mm pixels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    with Image.open(IMAGE) as image:
        gray = np.asarray(image.convert("L"))
    frames = np.stack([np.roll(gray, 6 * index, axis=1) for index in range(3)]).astype(np.uint8)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = US_MULTIFRAME_STORAGE
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = US_MULTIFRAME_STORAGE
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.PatientName, ds.PatientID = "Cine^Test", "CINE-1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "US", 1, 1
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20260101", "120000", "1", "A1"
    ds.ReferringPhysicianName, ds.PatientBirthDate, ds.PatientSex = "", "", "F"
    ds.Rows, ds.Columns = gray.shape
    ds.NumberOfFrames, ds.FrameIncrementPointer, ds.FrameTime = 3, 0x00181063, 33.3
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit, ds.PixelRepresentation = 7, 0
    ds.PixelSpacing = [0.1, 0.1]
    data = frames.tobytes()
    ds.PixelData = data + (b"\x00" if len(data) % 2 else b"")
    target = path / "cine.dcm"
    ds.save_as(target, enforce_file_format=True)
    return target


def test_a_dicom_cine_frame_with_mm_areas_and_a_seg_download(page, tmp_path):
    cine = _cine(tmp_path)
    _upload(page, "#compare-file", cine)
    result = _segment(page, "frame 1 of 3")
    assert "n/a" not in result.split("Area (mm²)")[1].split("\n")[0]  # spacing from the file
    page.wait_for_selector("#compare-frame input", state="visible")
    frame_box = page.locator("#compare-frame input").first
    frame_box.fill("2")
    frame_box.press("Tab")
    _segment(page, "frame 2 of 3")

    seg = pydicom.dcmread(io.BytesIO(_download(page, "_seg.dcm").read_bytes()))
    assert seg.SOPClassUID == "1.2.840.10008.5.1.4.1.1.66.4"
    source = pydicom.dcmread(cine)
    assert seg.ReferencedSeriesSequence[0].ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == (
        source.SOPInstanceUID
    )
    derivation = seg.PerFrameFunctionalGroupsSequence[0].DerivationImageSequence[0]
    assert int(derivation.SourceImageSequence[0].ReferencedFrameNumber) == 2


def test_save_a_corrected_mask_as_ground_truth_then_view_and_delete_it(page, stack):
    _upload(page, "#compare-file", IMAGE)
    _segment(page, "Area (px)")
    _mode(page, "Background point")
    _click_view(page, 0.30, 0.30)
    _wait_text(page, "#compare-result", "clinician prompts: 1 point(s)", timeout=120)
    corrected = _refined_area(page)
    page.click("#save-truth-btn")
    _wait_text(page, "#status", "Saved as ground truth: correction #", timeout=60)
    assert "corrected mask" in page.locator("#status").inner_text()
    page.click("#save-truth-btn")  # the same image again: refused, with how to replace it
    _wait_text(page, "#status", "saved already", timeout=60)
    page.locator("#replace-truth input").check()
    page.click("#save-truth-btn")
    _wait_text(page, "#status", "Saved as ground truth", timeout=60)

    page.get_by_role("tab", name="Corrections").click()
    table = _wait_text(page, "#corrections-table", "corrected", timeout=60)
    assert str(corrected) in table
    assert "1 saved correction" in page.locator("#corrections-info").inner_text()
    page.click("#view-correction-btn")
    page.wait_for_selector("#correction-view img", timeout=30_000)
    page.click("#delete-correction-btn")
    _wait_text(page, "#corrections-info", "0 saved correction", timeout=60)
    assert not list((stack.root / "corrections").rglob("*.png"))


def test_models_confirm_a_worse_model_then_roll_back_to_the_shipped_one(page, stack, tmp_path):

    import httpx

    from backend.app.db import crud
    from backend.app.db.session import init_db, session_scope
    from training.checkpoints import build_untrained_bundle, save_bundle

    database = stack.env["DATABASE_URL"]
    bundle = stack.root / "worse.pt"
    save_bundle(bundle, build_untrained_bundle())
    from backend.app.core.settings import Settings

    settings = Settings(database_url=database, admin_token=TOKEN)
    init_db(settings)
    with session_scope(settings) as session:
        worse = crud.register_model_version(
            session,
            bundle_path=bundle,
            sha256=crud.file_sha256(bundle),
            metrics={"model_version": "worse-model", "test": {"dice_coarse": 0.2, "dice_refined": 0.25}},
        ).id

    page.get_by_role("tab", name="Models").click()
    _wait_text(page, "#models-table", "worse-model", timeout=60)
    _choose_model(page, rf"^#{worse} ")
    _wait_text(page, "#activate-warning", "lower recorded refined Dice (0.250)", timeout=60)
    assert httpx.get(f"{stack.api_url}/ready", timeout=10).json()["model_source"] == "default"
    page.locator("#confirm-activate-btn:not([disabled])").click()
    _wait_text(page, "#status", "is now active", timeout=180)
    assert httpx.get(f"{stack.api_url}/ready", timeout=10).json()["model_version"] != "worse-model"
    _wait_text(page, "#models-table", "✓ active", timeout=30)

    _choose_model(page, r"shipped|^#1 ")
    _wait_text(page, "#status", "is now active", timeout=180)
    _wait_text(page, "#models-table", "active · shipped default", timeout=30)
    ready = httpx.get(f"{stack.api_url}/ready", timeout=10).json()
    assert ready["model_version"].startswith("compact-") and ready["untrained"] is False
