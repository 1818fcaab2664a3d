"""Pure pieces of the admin UI: ground-truth checks, prompt geometry, labels, ETA-free curves."""

from __future__ import annotations

import io

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from frontend import overlay as ov
from frontend import views
from frontend.client import MaskResult, SegmentResult
from frontend.compare import CompareState, Prompt, derived_prompts, display_to_native, render
from tests.imaging_fixtures import BUSI_ROOT


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def test_truth_mask_of_another_size_is_refused_by_name():
    mask = np.zeros((30, 40), np.uint8)
    mask[5:10, 5:10] = 255
    with pytest.raises(ov.MaskError, match="40×30 pixels but the image is 80×60"):
        ov.load_truth_mask(_png(mask), (60, 80))


def test_a_mask_declaring_a_huge_canvas_is_refused_without_decoding_it():
    buffer = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buffer, format="BMP")
    for side, words in ((12_000, "12000×12000 pixels but the image is 80×60"), (20_000, "far more pixels")):
        data = bytearray(buffer.getvalue())
        data[18:26] = side.to_bytes(4, "little") * 2  # width and height in the BMP header
        with pytest.raises(ov.MaskError, match=words):
            ov.load_truth_mask(bytes(data), (60, 80))


def test_the_ultrasound_image_is_not_a_mask():
    image = BUSI_ROOT / "benign" / "benign (10).png"
    if not image.is_file():
        pytest.skip("BUSI data missing")
    data = image.read_bytes()
    with Image.open(io.BytesIO(data)) as opened:
        shape = (opened.height, opened.width)
    with pytest.raises(ov.MaskError, match="not binary"):
        ov.load_truth_mask(data, shape)
    real = ov.load_truth_mask((BUSI_ROOT / "benign" / "benign (10)_mask.png").read_bytes(), shape)
    assert real.dtype == bool and 0 < real.mean() < 0.5


def test_a_jpeg_like_mask_with_few_edge_levels_is_accepted():
    mask = np.zeros((100, 100), np.uint8)
    mask[20:60, 20:60] = 255
    mask[20, 20:60] = 128  # an antialiased edge: 40 pixels of 10000
    assert ov.load_truth_mask(_png(mask), (100, 100)).sum() == 40 * 40


def _state(width: int = 1536, height: int = 1024) -> CompareState:
    empty = np.zeros((height, width), bool)
    result = SegmentResult(
        model_version="m",
        width=width,
        height=height,
        coarse=MaskResult(mask=empty, png=b""),
        refined=MaskResult(mask=empty, png=b""),
        raw={"prompts": {"points": [[10, 20], [30, 40]], "point_labels": [1, 0], "box": [1, 2, 300, 400],
                         "source": "coarse"}},
    )  # fmt: skip
    return CompareState(
        path="x", filename="x.png", is_dicom=False, frame=None, result=result,
        image=np.zeros((height, width, 3), np.uint8),
    )  # fmt: skip


def test_clicks_on_the_shrunk_view_map_to_native_pixels():
    state = _state()  # shown at 768 × 512 (scale 0.5)
    assert display_to_native(state, 100, 50) == (200.0, 100.0)
    assert display_to_native(state, 10_000, -5) == (1536.0, 0.0)  # clamped into the image


def test_a_first_correction_starts_from_the_derived_prompts():
    prompts = derived_prompts(_state().result)
    assert [p.kind for p in prompts] == ["box", "point", "point"] and all(p.derived for p in prompts)
    assert [(p.x, p.y, p.label) for p in prompts[1:]] == [(10, 20, 1), (30, 40, 0)]


def test_no_lesion_is_said_plainly_and_prompts_are_drawn():
    state = _state(200, 100)
    state.prompts = [Prompt(kind="point", x=50, y=50, label=0)]
    views_out = render(state)
    assert "No lesion found" in views_out.markdown
    assert views_out.combined.shape == (100, 200, 3)
    assert tuple(views_out.combined[50, 50]) == (235, 50, 50)  # the background point, red


def test_phase_labels_name_the_phase_2_baseline():
    assert views.phase_label("refiner") == "phase 2 · refiner (baseline of phase 3)"
    assert views.phase_label("end_to_end", "baseline") == "phase 3 · end-to-end · before training"
    evaluation = {"phase": "refiner", "stage": "final", "dataset": "busi", "split": "val"}
    evaluation |= {"dice_coarse": 0.7, "dice_refined": 0.72}
    rows = views.eval_rows({"evaluations": [evaluation]})
    assert rows[0][0].startswith("phase 2") and rows[0][-1] == "+0.0200"


def test_one_epoch_curve_is_readable():
    figure = views.curves_figure(pd.DataFrame([{"epoch": 1, "value": 0.5, "series": "coarse"}]), "Dice", "d")
    axes = figure.axes[0]
    assert axes.get_xlim() == (0.5, 1.5) and list(axes.get_xticks()) == [1]


def test_models_show_dice_before_and_after_fine_tuning():
    metrics = {
        "test": {"dice_coarse": 0.8, "dice_refined": 0.86},
        "init_test": {"dice_coarse": 0.79, "dice_refined": 0.82},
        "init_from": {"model_version": "compact-litemedsam-start"},
    }
    row = views.model_rows([{"id": 3, "name": "tuned", "metrics": metrics}])[0]
    assert row[views.MODEL_COLUMNS.index("Fine-tuned: refined Dice before → after")] == (
        "0.8200 → 0.8600 from compact-litemedsam-start"
    )
    assert views.fine_tuning_text({"test": {"dice_refined": 0.7}}) == ""
    blended = metrics | {"blend": {"status": "chosen", "alpha": 0.3}}
    assert views.fine_tuning_text(blended) == "0.8200 → 0.8600 from compact-litemedsam-start, blend α 0.3"
    pooled = {
        "test": {
            "dice_refined": 0.8,
            "by_dataset": {"busi": {"dice_refined": 0.75}, "corrections": {"dice_refined": 0.6}},
        },
        "init_test": {
            "dice_refined": 0.7,
            "by_dataset": {"busi": {"dice_refined": 0.76}, "corrections": {"dice_refined": 0.1}},
        },
        "init_from": {"model_version": "start"},
    }
    assert views.fine_tuning_text(pooled) == (
        "0.7000 → 0.8000 (busi 0.7600 → 0.7500; corrections 0.1000 → 0.6000) from start"
    )


def test_train_form_leaves_a_missing_default_root_empty_with_a_hint():
    from backend.app.schemas.runs import run_request_schema
    from frontend.schema_form import form_fields

    schema = run_request_schema()
    assert isinstance(schema["x-default-root-exists"], bool)
    schema["x-default-root-exists"] = False
    (root,) = [spec for spec in form_fields(schema) if spec.path[-1] == "root"]
    assert root.widget_value() == "" and "No dataset at the default path" in root.help


def test_run_progress_and_eta_read_the_backend_fields():
    assert views.progress_percent({"progress": 0.4567}) == 45.7
    assert views.eta_text({"status": "running", "eta_s": 125}) == views.fmt_duration(125) != ""
    assert views.eta_text({"status": "succeeded", "eta_s": 5}) == ""
