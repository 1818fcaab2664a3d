"""Clinician prompts of a ``/segment`` request: points ``[[x, y, label], …]`` and a box
``[x0, y0, x1, y1]`` in native pixels, parsed and range-checked with errors naming the problem."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from backend.app.serving.errors import SegmentError


@dataclass
class ClinicianPrompts:
    points: list[list[float]] | None = None
    point_labels: list[int] | None = None
    box: list[float] | None = None

    @property
    def given(self) -> bool:
        return self.points is not None or self.box is not None


def _finite_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def parse_points(raw: str | None, max_points: int) -> tuple[list[list[float]], list[int]] | None:
    """``[[x, y, label], ...]`` (label 1 lesion / 0 background; ``[x, y]`` means label 1)."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise SegmentError(400, "points is not valid JSON: expected [[x, y, label], ...]") from None
    if not isinstance(value, list) or not value:
        raise SegmentError(422, "points must be a non-empty JSON list [[x, y, label], ...]")
    if len(value) > max_points:
        raise SegmentError(422, f"too many points: {len(value)} (at most {max_points})")
    points: list[list[float]] = []
    labels: list[int] = []
    for index, item in enumerate(value):
        if not isinstance(item, list) or len(item) not in (2, 3) or not all(_finite_number(v) for v in item):
            raise SegmentError(422, f"points[{index}] must be [x, y] or [x, y, label] with finite numbers")
        label = item[2] if len(item) == 3 else 1
        if label not in (0, 1):
            raise SegmentError(422, f"points[{index}] label must be 1 (lesion) or 0 (background)")
        points.append([float(item[0]), float(item[1])])
        labels.append(int(label))
    return points, labels


def parse_box(raw: str | None) -> list[float] | None:
    """``[x0, y0, x1, y1]`` in native pixels."""
    if raw is None or raw.strip() == "":
        return None
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        raise SegmentError(400, "box is not valid JSON: expected [x0, y0, x1, y1]") from None
    if not isinstance(value, list) or len(value) != 4 or not all(_finite_number(v) for v in value):
        raise SegmentError(422, "box must be a JSON list [x0, y0, x1, y1] of 4 finite numbers")
    x0, y0, x1, y1 = (float(v) for v in value)
    if x0 == x1 or y0 == y1:
        raise SegmentError(422, "box has zero width or height")
    return [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)]


def check_prompt_ranges(prompts: ClinicianPrompts, width: int, height: int) -> None:
    if prompts.points is not None:
        for index, (x, y) in enumerate(prompts.points):
            if not (0 <= x <= width and 0 <= y <= height):
                raise SegmentError(
                    422, f"points[{index}] = ({x:g}, {y:g}) is outside the {width}×{height} image"
                )
    if prompts.box is not None:
        x0, y0, x1, y1 = prompts.box
        if x0 < 0 or y0 < 0 or x1 > width or y1 > height:
            raise SegmentError(422, f"box {prompts.box} is outside the {width}×{height} image")
