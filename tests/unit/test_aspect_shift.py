"""The field-of-view probe's crops: portrait windows hold the lesion, widening keeps the image."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "aspect_shift.py"
_spec = importlib.util.spec_from_file_location("aspect_shift", SCRIPT)
aspect_shift = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(aspect_shift)


def test_portrait_window_is_centred_on_the_lesion_and_stays_inside():
    mask = np.zeros((100, 200), dtype=bool)
    mask[40:60, 150:170] = True
    x0, x1 = aspect_shift.portrait_window(mask, 0.74)
    assert x1 - x0 == 74 and 0 <= x0 and x1 <= 200
    assert x0 <= 150 and x1 >= 170 and abs((x0 + x1) / 2 - 160) <= 1
    mask[:] = False
    mask[10:20, 190:200] = True  # at the edge: the window is pushed back inside the frame
    assert aspect_shift.portrait_window(mask, 0.74) == (126, 200)
    assert aspect_shift.portrait_window(np.zeros((100, 200), dtype=bool), 0.74) == (63, 137)
    assert aspect_shift.portrait_window(np.zeros((100, 60), dtype=bool), 0.74) == (0, 60)  # already narrow


def test_widen_pads_black_columns_either_side_only_when_narrower():
    image = np.full((100, 60, 3), 200, dtype=np.uint8)
    widened, left = aspect_shift.widen(image, 1.2)
    assert widened.shape == (100, 120, 3) and left == 30
    assert (widened[:, left : left + 60] == image).all() and widened[:, :left].max() == 0
    same, offset = aspect_shift.widen(np.zeros((100, 150), dtype=np.uint8), 1.2)
    assert same.shape == (100, 150) and offset == 0
