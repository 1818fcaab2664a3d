"""The Compare tab: segment an image (or a DICOM frame) and correct the mask with clicks and a box.

The handlers are module-level functions of (client, state, inputs) that tests call directly;
:func:`build` lays the tab out and wires them. The state of one browser session
(:class:`CompareState`, in a ``gr.State``) holds the upload's path in Gradio's own upload cache
(nothing is copied), the last answer of ``/segment`` and the clinician's prompts. Every change of
the prompts re-runs ``/segment`` with them; the server keeps the image embedding of the upload,
so a correction does not re-encode the image (``embedding_cached`` in the answer).

Prompts: a click on the combined view adds a lesion point or a background point (the click mode
picks which), or, in box mode, sets one corner and then the opposite corner of the box; dragging
across the lesion in the box panel (``gradio-image-annotation``) draws the box directly. There
is one box: a new one replaces it. Undo steps back through the prompt history; Clear removes every
prompt (the prompts are then derived from the coarse mask again).
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
from gradio_image_annotation import image_annotator
from PIL import Image

from frontend import overlay as ov
from frontend.client import BackendClient, BackendError, SegmentResult

logger = logging.getLogger("ultrarefiner.ui")
JSON = dict[str, Any]

LESION_POINT = "Lesion point"
BACKGROUND_POINT = "Background point"
BOX_CORNERS = "Box (click two corners)"
CLICK_MODES = [LESION_POINT, BACKGROUND_POINT, BOX_CORNERS]
DICOM_SUFFIXES = (".dcm", ".dicom")
#: A dragged box narrower or lower than this (display pixels) is a press, not a box.
MIN_DRAG_PX = 12
ACCEPTED = [".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm", ".dicom"]


@dataclass(frozen=True)
class Prompt:
    """One clinician prompt in native pixels: a point (``label`` 1 lesion / 0 background) or a box."""

    kind: str  # "point" or "box"
    x: float = 0.0
    y: float = 0.0
    label: int = 1
    box: tuple[float, float, float, float] | None = None
    #: Derived from the coarse mask (the prompts the first answer used), not given by a click.
    derived: bool = False


def derived_prompts(result: SegmentResult) -> list[Prompt]:
    """The prompts the server derived from the coarse mask for ``result`` (none for clinician
    prompts or an empty coarse mask): the starting point of a correction, so that a first click
    refines the current mask instead of replacing it."""
    used = result.raw.get("prompts") or {}
    if used.get("source") != "coarse":
        return []
    prompts = []
    if used.get("box"):
        x0, y0, x1, y1 = (float(v) for v in used["box"])
        prompts.append(Prompt(kind="box", box=(x0, y0, x1, y1), derived=True))
    labels = used.get("point_labels") or []
    for index, point in enumerate(used.get("points") or []):
        label = int(labels[index]) if index < len(labels) else 1
        prompts.append(Prompt(kind="point", x=float(point[0]), y=float(point[1]), label=label, derived=True))
    return prompts


@dataclass
class CompareState:
    """What one browser session has segmented (``gr.State`` deep-copies it per session)."""

    path: str
    filename: str
    is_dicom: bool
    frame: int | None
    result: SegmentResult
    image: np.ndarray  # H×W×3 uint8, the frame as the server decoded it
    truth: np.ndarray | None = None
    prompts: list[Prompt] = field(default_factory=list)
    corner: tuple[float, float] | None = None  # first corner of a box being drawn
    #: The prompt lists before each change, oldest first: what Undo goes back to.
    history: list[list[Prompt]] = field(default_factory=list)

    @property
    def points(self) -> list[list[float]]:
        return [[p.x, p.y, p.label] for p in self.prompts if p.kind == "point"]

    @property
    def box(self) -> list[float] | None:
        boxes = [p.box for p in self.prompts if p.kind == "box" and p.box is not None]
        return list(boxes[-1]) if boxes else None


# ----------------------------------------------------------------------------- handlers


def _read_upload(path: str | None) -> tuple[bytes, str]:
    if not path:
        raise BackendError("Upload an image or a DICOM file first")
    file = Path(path)
    return file.read_bytes(), file.name


def _truth_for(truth_path: str | None, shape: tuple[int, int]) -> np.ndarray | None:
    if not truth_path:
        return None
    try:
        return ov.load_truth_mask(Path(truth_path).read_bytes(), shape)
    except ov.MaskError as exc:
        raise BackendError(f"Ground-truth mask refused: {exc}") from exc


def segment_upload(
    client: BackendClient, path: str | None, truth_path: str | None = None, frame: int | None = None
) -> CompareState:
    """Segment a new upload (its ``frame`` for a multi-frame file) with prompts derived from the
    coarse mask; the ground-truth mask, if any, must fit the decoded image."""
    data, filename = _read_upload(path)
    result = client.segment(data, filename, frame=frame, include_image=True)
    image = result.image
    if image is None:  # a backend without include_image: the UI cannot draw on DICOM then
        image = ov.load_image(data)
    shape = (result.height, result.width)
    if image.shape[:2] != shape:
        raise BackendError("The backend's image does not match its masks")
    return CompareState(
        path=str(path),
        filename=filename,
        is_dicom=data[128:132] == b"DICM" or filename.lower().endswith(DICOM_SUFFIXES),
        frame=result.frame if result.n_frames > 1 else None,
        result=result,
        image=image,
        truth=_truth_for(truth_path, shape),
    )


def resegment(
    client: BackendClient, state: CompareState, prompts: list[Prompt], *, remember: bool = True
) -> CompareState:
    """``/segment`` again with ``prompts`` (none: derived prompts) on the same upload and frame;
    with ``remember`` the current prompts go on the undo history."""
    data, filename = _read_upload(state.path)
    history = [*state.history, list(state.prompts)] if remember else list(state.history)
    updated = replace(state, prompts=list(prompts), corner=None, history=history)
    result = client.segment(data, filename, points=updated.points or None, box=updated.box, frame=state.frame)
    return replace(updated, result=result)


def display_to_native(state: CompareState, x: float, y: float) -> tuple[float, float]:
    """A click on the (possibly shrunk) combined view → native pixel coordinates."""
    height, width = state.image.shape[:2]
    scale = ov.scale_for_display(height, width)
    native_x = min(max(x / scale, 0.0), float(width))
    native_y = min(max(y / scale, 0.0), float(height))
    return native_x, native_y


def click(client: BackendClient, state: CompareState, x: float, y: float, mode: str) -> CompareState:
    """A click at display coordinates (x, y) in ``mode``: a point, or a box corner (the second
    corner completes the box, which replaces an earlier one)."""
    nx, ny = display_to_native(state, x, y)
    if mode == BOX_CORNERS:
        if state.corner is None:
            return replace(state, corner=(nx, ny))
        return _set_box(
            client,
            state,
            state.corner,
            (nx, ny),
            "The two box corners are too close: click the opposite corner of the lesion",
        )
    label = 0 if mode == BACKGROUND_POINT else 1
    base = state.prompts or derived_prompts(state.result)
    return resegment(client, state, [*base, Prompt(kind="point", x=nx, y=ny, label=label)])


def drag_box(
    client: BackendClient, state: CompareState, box: tuple[float, float, float, float]
) -> CompareState:
    """A box dragged on the (possibly shrunk) view, ``(x0, y0, x1, y1)`` in display pixels: it
    becomes the box prompt (replacing an earlier one) and the masks are recomputed."""
    corner_a = display_to_native(state, box[0], box[1])
    corner_b = display_to_native(state, box[2], box[3])
    return _set_box(client, state, corner_a, corner_b, "The box is too small: drag across the lesion")


def _set_box(client, state: CompareState, corner_a, corner_b, too_small: str) -> CompareState:
    """The box with opposite corners ``corner_a``/``corner_b`` (native pixels) as the one box
    prompt, on top of the current prompts (the derived ones before the first correction)."""
    (ax, ay), (bx, by) = corner_a, corner_b
    if abs(ax - bx) < 2 or abs(ay - by) < 2:
        raise BackendError(too_small)
    kept = [p for p in state.prompts or derived_prompts(state.result) if p.kind != "box"]
    box = (min(ax, bx), min(ay, by), max(ax, bx), max(ay, by))
    return resegment(client, state, [*kept, Prompt(kind="box", box=box)])


def undo(client: BackendClient, state: CompareState) -> CompareState:
    """Remove the pending box corner, else go back to the prompts before the last change (a
    click or Clear); back at the start, the masks of the derived prompts return exactly."""
    if state.corner is not None:
        return replace(state, corner=None)
    if not state.history:
        raise BackendError("Nothing to undo: no prompt given yet")
    previous = state.history[-1]
    if not any(not p.derived for p in previous):
        previous = []
    return resegment(client, replace(state, history=state.history[:-1]), previous, remember=False)


def clear(client: BackendClient, state: CompareState) -> CompareState:
    """Remove every prompt: the masks of the prompts derived from the coarse mask again (Undo
    brings the prompts back)."""
    if not state.prompts and state.corner is None:
        raise BackendError("No prompt to clear")
    return resegment(client, state, [])


@dataclass
class Views:
    combined: np.ndarray
    coarse: np.ndarray
    refined: np.ndarray
    markdown: str


def render(
    state: CompareState,
    *,
    show_coarse: bool = True,
    show_refined: bool = True,
    show_truth: bool = True,
    opacity: float = 0.35,
) -> Views:
    """The combined view (toggled layers at ``opacity``, prompts drawn), the side-by-side views
    and the result's facts."""
    result = state.result
    truth = state.truth if show_truth else None
    layers = []
    if show_coarse:
        layers.append((result.coarse.mask, ov.COARSE_COLOR))
    if show_refined:
        layers.append((result.refined.mask, ov.REFINED_COLOR))
    points = [(p.x, p.y, p.label) for p in state.prompts if p.kind == "point"]
    combined = ov.combined(
        state.image, layers, alpha=opacity, truth=truth, points=points, box=state.box, corner=state.corner
    )
    coarse = ov.overlay(state.image, result.coarse.mask, ov.COARSE_COLOR, alpha=opacity, truth=truth)
    refined = ov.overlay(state.image, result.refined.mask, ov.REFINED_COLOR, alpha=opacity, truth=truth)
    return Views(combined, coarse, refined, result_markdown(state))


def result_markdown(state: CompareState) -> str:
    """Areas (px, mm² where the file has a pixel spacing), confidence, Dice, prompts, timings."""
    result = state.result
    lines = []
    if result.no_lesion:
        lines.append("### No lesion found\nNeither the coarse nor the refined mask marks any pixel.")

    def area_mm2(value):
        return f"{value:.1f}" if isinstance(value, int | float) else "n/a (no pixel spacing in the file)"

    rows = [
        "| | Coarse | Refined |",
        "|---|---|---|",
        f"| Area (px) | {result.coarse.area_px} | {result.refined.area_px} |",
        f"| Area (mm²) | {area_mm2(result.coarse.area_mm2)} | {area_mm2(result.refined.area_mm2)} |",
        f"| Box (x0, y0, x1, y1) | {result.coarse.bbox or '—'} | {result.refined.bbox or '—'} |",
    ]
    if state.truth is not None:
        dice_coarse = ov.dice(result.coarse.mask, state.truth)
        dice_refined = ov.dice(result.refined.mask, state.truth)
        rows.append(f"| **Dice vs ground truth** | **{dice_coarse:.4f}** | **{dice_refined:.4f}** |")
    lines.append("\n".join(rows))
    if isinstance(result.iou_pred, int | float) and not result.no_lesion:
        lines.append(f"Refiner confidence (predicted IoU): **{result.iou_pred:.2f}**")
    if state.truth is not None:
        delta = ov.dice(result.refined.mask, state.truth) - ov.dice(result.coarse.mask, state.truth)
        lines.append(f"Δ Dice (refined − coarse): **{delta:+.4f}**")
    clicked = [p for p in state.prompts if not p.derived]
    n_points = sum(1 for p in clicked if p.kind == "point")
    n_boxes = sum(1 for p in clicked if p.kind == "box")
    prompt_text = (
        f"clinician prompts: {n_points} point(s)" + (", 1 box" if n_boxes else "")
        if clicked
        else "prompts derived from the coarse mask"
    )
    if state.corner is not None:
        prompt_text += " · box: click the opposite corner"
    facts = [f"model `{result.model_version}`", f"image {result.width}×{result.height}", prompt_text]
    if result.n_frames > 1:
        facts.append(f"frame {result.frame + 1} of {result.n_frames}")
    if result.embedding_cached:
        facts.append("cached embedding (image not re-encoded)")
    lines.append(" · ".join(facts))
    if result.timings_ms:
        timing = " · ".join(
            f"{name} {float(ms):.0f} ms"
            for name, ms in result.timings_ms.items()
            if isinstance(ms, int | float)
        )
        lines.append(f"Timings: {timing}")
    return "\n\n".join(lines)


def _mask_png(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return buffer.getvalue()


def save_as_truth(client: BackendClient, state: CompareState, *, replace: bool = False) -> JSON:
    """Save the image (frame) with the refined mask shown as ground truth (``POST
    /api/corrections``): ``corrected`` when clinician prompts made it, else ``refined`` (accepted
    as the model gave it), with the model version and the prompts. Only on this explicit request."""
    data, filename = _read_upload(state.path)
    clicked = [p for p in state.prompts if not p.derived]
    prompts = {"points": state.points, "box": state.box} if clicked else {}
    return client.save_correction(
        data,
        filename,
        _mask_png(state.result.refined.mask),
        frame=state.frame,
        mask_source="corrected" if clicked else "refined",
        model_version=state.result.model_version,
        prompts=prompts,
        replace=replace,
    )


def export(client: BackendClient, state: CompareState, folder: Path) -> list[Path]:
    """The masks as PNG files (and, for DICOM input, the DICOM SEG of the same prompts) in
    ``folder``; written only when the user asks to download."""
    stem = ov.safe_stem(state.filename)
    if state.frame is not None:
        stem += f"_frame{state.frame + 1}"
    paths = [
        ov.write_mask_png(_mask_png(state.result.coarse.mask), folder, f"{stem}_coarse_mask.png"),
        ov.write_mask_png(_mask_png(state.result.refined.mask), folder, f"{stem}_refined_mask.png"),
    ]
    if state.is_dicom:
        data, filename = _read_upload(state.path)
        seg = client.segment_dicom_seg(
            data, filename, points=state.points or None, box=state.box, frame=state.frame
        )
        target = Path(folder) / f"{stem}_seg.dcm"
        target.write_bytes(seg)
        paths.append(target)
    return paths


# ----------------------------------------------------------------------------- layout + wiring


@dataclass
class CompareTab:
    state: Any
    outputs: list[Any]  # the last one is the app's status line
    files: list[Any]
    cleared: Callable[[], dict]

    def reset_outputs(self) -> list[Any]:
        """What :func:`signed_out` updates."""
        return [*self.outputs[:-1], *self.files]


def build(
    client_for: Callable[[str | None], BackendClient],
    token_state: Any,
    status: Any,
    guarded: Callable,
    export_folder: Callable[[], Path],
) -> CompareTab:
    """Lay out the Compare tab inside the current ``gr.Tab`` and wire its handlers."""
    gr.Markdown(
        "Upload an ultrasound image or a DICOM file (optionally its ground-truth mask) and segment it "
        "with the active model. Orange: coarse mask; green: refined mask; yellow outline: ground truth. "
        "**Correct the mask:** click the combined view to add a lesion point or a background point, "
        "or pick the box mode and click two opposite corners; the refined mask is recomputed at once."
    )
    state = gr.State(None)
    with gr.Row():
        file_in = gr.File(
            label="Ultrasound image or DICOM", file_types=ACCEPTED, type="filepath", elem_id="compare-file"
        )
        truth_in = gr.File(
            label="Ground-truth mask (optional, same size as the image)",
            file_types=["image"],
            type="filepath",
            elem_id="compare-truth",
        )
        with gr.Column():
            frame_in = gr.Number(
                label="Frame (multi-frame DICOM)",
                value=1,
                minimum=1,
                precision=0,
                visible=False,
                elem_id="compare-frame",
            )
            segment_btn = gr.Button("Segment", variant="primary", elem_id="segment-btn")
    with gr.Row():
        with gr.Column(scale=3):
            combined_out = gr.Image(
                label="Combined view (click to correct)",
                format="png",
                interactive=False,
                elem_id="combined-view",
                height=520,
            )
        with gr.Column(scale=1):
            mode_in = gr.Radio(CLICK_MODES, value=LESION_POINT, label="A click adds", elem_id="click-mode")
            with gr.Row():
                undo_btn = gr.Button("Undo", size="sm", elem_id="undo-btn")
                clear_btn = gr.Button("Clear prompts", size="sm", elem_id="clear-btn")
            show_coarse = gr.Checkbox(value=False, label="Coarse mask", elem_id="show-coarse")
            show_refined = gr.Checkbox(value=True, label="Refined mask", elem_id="show-refined")
            show_truth = gr.Checkbox(value=True, label="Ground truth", elem_id="show-truth")
            opacity_in = gr.Slider(0.0, 1.0, value=0.35, step=0.05, label="Opacity", elem_id="opacity")
    compare_md = gr.Markdown("", elem_id="compare-result")
    with gr.Accordion("Draw a box (drag across the lesion)", open=True, elem_id="box-panel"):
        box_drawer = image_annotator(
            value=None,
            single_box=True,
            label_list=["box"],
            label_colors=[(255, 255, 255)],
            use_default_label=True,
            sources=[],
            image_type="numpy",
            show_label=False,
            show_download_button=False,
            show_clear_button=False,
            show_share_button=False,
            enable_keyboard_shortcuts=False,
            height=520,
            elem_id="box-drawer",
        )
    with gr.Accordion("Side by side", open=False, elem_id="side-by-side"):
        with gr.Row():
            coarse_out = gr.Image(
                label="Coarse mask", format="png", interactive=False, elem_id="coarse-overlay", height=360
            )
            refined_out = gr.Image(
                label="Refined mask", format="png", interactive=False, elem_id="refined-overlay", height=360
            )
    with gr.Row():
        save_btn = gr.Button("Save as ground truth", interactive=False, elem_id="save-truth-btn")
        replace_in = gr.Checkbox(
            value=False, label="Replace if this image is saved already", elem_id="replace-truth"
        )
    with gr.Row():
        export_btn = gr.Button("Prepare downloads", interactive=False, elem_id="export-btn")
        downloads = gr.File(label="Downloads", file_count="multiple", visible=False, elem_id="downloads")

    toggles = [show_coarse, show_refined, show_truth, opacity_in]
    views_out = [combined_out, coarse_out, refined_out, compare_md]
    outputs = [state, *views_out, export_btn, downloads, frame_in, box_drawer, save_btn, status]

    def shown(new_state: CompareState, toggle_values, message: str) -> dict:
        views = render(
            new_state,
            show_coarse=toggle_values[0],
            show_refined=toggle_values[1],
            show_truth=toggle_values[2],
            opacity=float(toggle_values[3]),
        )
        return {
            state: new_state,
            combined_out: views.combined,
            coarse_out: views.coarse,
            refined_out: views.refined,
            compare_md: views.markdown,
            export_btn: gr.Button(interactive=True),
            save_btn: gr.Button(interactive=True),
            downloads: gr.File(value=None, visible=False),
            # The box panel shows the same view, with no pending box (the prompt box is drawn in).
            box_drawer: {"image": views.combined, "boxes": []},
            status: message,
        }

    def cleared(message: str) -> dict:
        """An error on a new upload: the previous result is gone, the reason is shown."""
        return {
            state: None,
            combined_out: None,
            coarse_out: None,
            refined_out: None,
            compare_md: f"**Could not segment this file.** {message}",
            export_btn: gr.Button(interactive=False),
            save_btn: gr.Button(interactive=False),
            downloads: gr.File(value=None, visible=False),
            box_drawer: None,
            status: f"⚠ {message}",
        }

    def on_segment(token, path, truth_path, frame, *toggle_values):
        client = client_for(token)
        frame_index = max(0, int(frame or 1) - 1)
        try:
            new_state = segment_upload(client, path, truth_path, frame_index)
        except BackendError as exc:
            gr.Warning(exc.message)
            return cleared(exc.message)
        out = shown(new_state, toggle_values, f"✓ Segmented with model `{new_state.result.model_version}`.")
        multi = new_state.result.n_frames > 1
        out[frame_in] = gr.Number(
            visible=multi,
            maximum=new_state.result.n_frames if multi else None,
            value=(new_state.frame or 0) + 1,
            label=f"Frame (1–{new_state.result.n_frames})" if multi else "Frame (multi-frame DICOM)",
        )
        return out

    segment_btn.click(
        on_segment, inputs=[token_state, file_in, truth_in, frame_in, *toggles], outputs=outputs
    )

    def on_new_file():
        return {
            state: None,
            combined_out: None,
            coarse_out: None,
            refined_out: None,
            compare_md: "",
            export_btn: gr.Button(interactive=False),
            save_btn: gr.Button(interactive=False),
            downloads: gr.File(value=None, visible=False),
            frame_in: gr.Number(value=1),
            box_drawer: None,
        }

    file_in.change(on_new_file, outputs=outputs, show_progress="hidden")

    def correcting(action: Callable[..., CompareState], message: Callable[[CompareState], str]):
        @guarded()
        def handler(token, current, *args):
            if current is None:
                raise BackendError("Segment an image first")
            *extra, t0, t1, t2, t3 = args
            new_state = action(client_for(token), current, *extra)
            return shown(new_state, (t0, t1, t2, t3), message(new_state))

        handler.__name__ = f"on_{getattr(action, '__name__', 'correction')}"
        return handler

    def on_click(token, current, mode, t0, t1, t2, t3, evt: gr.SelectData):
        x, y = evt.index[0], evt.index[1]
        return correcting(
            lambda client, st: click(client, st, float(x), float(y), mode),
            lambda st: "Box: now click the opposite corner." if st.corner else "✓ Mask updated.",
        )(token, current, t0, t1, t2, t3)

    combined_out.select(on_click, inputs=[token_state, state, mode_in, *toggles], outputs=outputs)

    def on_drag(token, current, drawn, t0, t1, t2, t3):
        boxes = (drawn or {}).get("boxes") or []
        if current is None or not boxes:
            return {status: gr.skip()}  # the panel was reset by an update, not drawn on
        last = boxes[-1]
        box = (float(last["xmin"]), float(last["ymin"]), float(last["xmax"]), float(last["ymax"]))
        if abs(box[2] - box[0]) < MIN_DRAG_PX or abs(box[3] - box[1]) < MIN_DRAG_PX:
            return {status: gr.skip()}  # a press without a drag (the component's minimum box)
        return correcting(
            lambda client, st: drag_box(client, st, box), lambda st: "✓ Box set: mask updated."
        )(token, current, t0, t1, t2, t3)

    box_drawer.change(on_drag, inputs=[token_state, state, box_drawer, *toggles], outputs=outputs)
    undo_btn.click(
        correcting(undo, lambda st: "✓ Last prompt undone."),
        inputs=[token_state, state, *toggles],
        outputs=outputs,
    )
    clear_btn.click(
        correcting(clear, lambda st: "✓ Prompts cleared: masks from the coarse mask's prompts."),
        inputs=[token_state, state, *toggles],
        outputs=outputs,
    )

    def on_toggle(current, t0, t1, t2, t3):
        if current is None:
            return {status: gr.skip()}
        views = render(current, show_coarse=t0, show_refined=t1, show_truth=t2, opacity=float(t3))
        return {
            combined_out: views.combined,
            coarse_out: views.coarse,
            refined_out: views.refined,
            box_drawer: {"image": views.combined, "boxes": []},
        }

    for toggle in toggles:
        toggle.change(on_toggle, inputs=[state, *toggles], outputs=outputs, show_progress="hidden")

    @guarded()
    def on_export(token, current):
        if current is None:
            raise BackendError("Segment an image first")
        paths = export(client_for(token), current, export_folder())
        return {
            downloads: gr.File(value=[str(p) for p in paths], visible=True),
            status: "Downloads ready: " + ", ".join(p.name for p in paths),
        }

    export_btn.click(on_export, inputs=[token_state, state], outputs=outputs)

    @guarded()
    def on_save(token, current, replace):
        if current is None:
            raise BackendError("Segment an image first")
        try:
            saved = save_as_truth(client_for(token), current, replace=bool(replace))
        except BackendError as exc:
            if exc.status_code == 409:
                raise BackendError(
                    "This image is saved already: tick 'Replace if this image is saved already' to "
                    "replace its mask"
                ) from exc
            raise
        what = "corrected mask" if saved.get("mask_source") == "corrected" else "refined mask (accepted)"
        gr.Info(f"Saved as correction #{saved.get('id')}")
        return {status: f"✓ Saved as ground truth: correction #{saved.get('id')} ({what})."}

    save_btn.click(on_save, inputs=[token_state, state, replace_in], outputs=outputs)
    return CompareTab(state=state, outputs=outputs, files=[file_in, truth_in], cleared=on_new_file)


def signed_out(tab: CompareTab) -> dict:
    """The tab's outputs after signing out (:meth:`CompareTab.reset_outputs`): no upload, no
    result, no downloads."""
    return {**tab.cleared(), **{component: None for component in tab.files}}
