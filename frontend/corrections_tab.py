"""The Corrections tab: the masks saved as ground truth (from Compare or ``POST /api/corrections``),
listed, viewed and deleted. They form the ``corrections`` dataset (its folder is shown) that
``ultrarefiner train … --dataset corrections --root <folder>`` trains on."""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr
import numpy as np
from PIL import Image

from frontend import overlay as ov
from frontend import views
from frontend.client import BackendClient, BackendError

COLUMNS = ["ID", "Saved", "Image", "Frame", "Mask", "Lesion px", "Model", "De-identified"]


def rows(listing: dict) -> list[list[Any]]:
    return [
        [
            item.get("id"),
            views.fmt_time(item.get("updated_at") or item.get("created_at")),
            f"{item.get('source_kind', '').upper()} {item.get('width')}×{item.get('height')}",
            int(item.get("frame") or 0) + 1,
            item.get("mask_source", ""),
            item.get("lesion_px", ""),
            item.get("model_version") or "",
            "yes" if item.get("deidentified") else "no (original DICOM kept)",
        ]
        for item in listing.get("items") or []
    ]


def summary(listing: dict) -> str:
    total = int(listing.get("total") or 0)
    folder = listing.get("folder") or "?"
    return (
        f"**{total} saved correction(s).** Folder: `{folder}` — train on it with "
        f"`ultrarefiner train all --dataset corrections --root {folder} --folds 2 …`."
    )


def view(client: BackendClient, correction_id: str) -> np.ndarray:
    """The saved image with its saved mask drawn (green)."""
    image = ov.load_image(client.correction_png(correction_id, "image"))
    with Image.open(io.BytesIO(client.correction_png(correction_id, "mask"))) as mask_image:
        mask = np.asarray(mask_image.convert("L")) > 127
    return ov.overlay(image, mask, ov.REFINED_COLOR)


@dataclass
class CorrectionsTab:
    table: Any
    select: Any


def build(
    client_for: Callable[[str | None], BackendClient], token_state: Any, status: Any, guarded
) -> CorrectionsTab:
    with gr.Tab("Corrections", id="corrections", elem_id="tab-corrections") as tab:
        with gr.Row():
            info = gr.Markdown(
                "Masks saved with **Save as ground truth** in Compare.", elem_id="corrections-info"
            )
            refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-corrections")
        table = gr.Dataframe(headers=COLUMNS, value=[], interactive=False, elem_id="corrections-table")
        with gr.Row():
            select = gr.Dropdown(
                label="Correction", choices=[], value=None, elem_id="correction-select", scale=4
            )
            view_btn = gr.Button("View", elem_id="view-correction-btn", scale=1)
            delete_btn = gr.Button("Delete", variant="stop", elem_id="delete-correction-btn", scale=1)
        preview = gr.Image(
            label="Saved image and mask", interactive=False, elem_id="correction-view", height=420
        )
    outputs = [info, table, select, preview, status]

    def listed(client: BackendClient) -> dict:
        listing = client.list_corrections()
        choices = [
            (f"#{item['id']} ({item.get('mask_source')})", str(item["id"])) for item in listing["items"]
        ]
        return {
            info: summary(listing),
            table: rows(listing),
            select: gr.update(choices=choices, value=choices[0][1] if choices else None),
        }

    @guarded()
    def on_refresh(token):
        return listed(client_for(token))

    @guarded()
    def on_view(token, correction_id):
        if not correction_id:
            raise BackendError("Pick a correction to view")
        return {preview: view(client_for(token), str(correction_id))}

    @guarded()
    def on_delete(token, correction_id):
        if not correction_id:
            raise BackendError("Pick a correction to delete")
        client = client_for(token)
        client.delete_correction(str(correction_id))
        return {**listed(client), preview: None, status: f"✓ Correction #{correction_id} deleted."}

    refresh_btn.click(on_refresh, inputs=[token_state], outputs=outputs)
    tab.select(on_refresh, inputs=[token_state], outputs=outputs)
    view_btn.click(on_view, inputs=[token_state, select], outputs=outputs)
    delete_btn.click(on_delete, inputs=[token_state, select], outputs=outputs)
    return CorrectionsTab(table=table, select=select)
