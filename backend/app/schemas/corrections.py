"""Schemas of the corrections API."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class CorrectionRead(BaseModel):
    model_config = ConfigDict(from_attributes=True)

    id: int
    image_key: str = Field(description="Hash of the decoded pixels: one correction per image (frame).")
    source_kind: str
    width: int
    height: int
    frame: int
    lesion_px: int
    mask_source: str = Field(description="'refined' (the model's mask, accepted) or 'corrected'.")
    model_version: str | None = None
    prompts: dict[str, Any] = Field(default_factory=dict)
    deidentified: bool
    created_at: datetime
    updated_at: datetime


class CorrectionList(BaseModel):
    items: list[CorrectionRead]
    total: int
    folder: str = Field(
        description="The corrections dataset's root (ultrarefiner train --dataset corrections)."
    )
