"""The Train tab: a form generated from ``GET /api/config/schema`` (defaults, bounds and help from
``training/config.py``); Preview shows the request, Launch posts only the settings that differ
from their defaults. The buttons and the backend's validation errors sit above the long form.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from frontend.client import BackendClient, BackendError
from frontend.schema_form import PROMOTED, FieldSpec, FormError, collect_config, form_fields, sections
from frontend.widgets import field_component, md_list, promoted_label, warn


@dataclass
class TrainTab:
    launch_btn: Any
    errors: Any


def build(
    client_for: Callable[[str | None], BackendClient],
    token_state: Any,
    schema_state: Any,
    status: Any,
    guarded: Callable,
    after_launch: Callable[[BackendClient, str], dict],
    launch_outputs: Callable[[], list],
) -> TrainTab:
    """Lay out the tab (inside its ``gr.Tab``). ``after_launch(client, run_id)`` gives the updates
    of other tabs once a run is launched (the Runs tab shows it), on ``launch_outputs()``."""
    gr.Markdown(
        "Fill in the run. Every hyper-parameter shows its default and help; only the "
        "settings you change are sent, the backend fills in the rest."
    )
    with gr.Row():
        preview_btn = gr.Button("Preview request", elem_id="preview-btn")
        launch_btn = gr.Button("Launch run", variant="primary", elem_id="launch-btn")
    train_errors = gr.Markdown("", elem_id="train-errors")
    preview = gr.Code(
        label="Request body (POST /api/runs)", language="json", visible=False, elem_id="preview-code"
    )

    @gr.render(inputs=[schema_state])
    def render_form(schema: dict | None):
        if not schema:
            gr.Markdown("*Sign in to load the training form.*")
            return
        fields = form_fields(schema)
        ordered: list[FieldSpec] = []
        components = []
        promoted = sorted(
            (f for f in fields if f.promoted),
            key=lambda f: (
                PROMOTED.index(f.path[-1]) if f.path[-1] in PROMOTED else len(PROMOTED),
                f.path,
            ),
        )
        with gr.Group():
            for start in range(0, len(promoted), 4):
                with gr.Row(equal_height=True):
                    for spec in promoted[start : start + 4]:
                        components.append(field_component(spec, promoted_label(spec)))
                        ordered.append(spec)
        for name, title, help_text, specs in sections(fields, schema):
            with gr.Accordion(title, open=False, elem_id=f"section-{name}"):
                if help_text and help_text.rstrip(".") not in title:
                    gr.Markdown(help_text)
                if any(spec.presets for spec in specs):
                    gr.Markdown(
                        "*These follow the chosen configuration (compact or full); "
                        "only values you change are sent.*"
                    )
                for start in range(0, len(specs), 3):
                    with gr.Row(equal_height=True):
                        for spec in specs[start : start + 3]:
                            components.append(field_component(spec, spec.label))
                            ordered.append(spec)
        keys = [spec.key for spec in ordered]
        preset_fields = [(spec, comp) for spec, comp in zip(ordered, components, strict=True) if spec.presets]
        if "config_name" in keys and preset_fields:

            def follow_preset(name):
                return [
                    gr.update(value=spec.widget_value(spec.default_for(name))) for spec, _ in preset_fields
                ]

            components[keys.index("config_name")].input(
                follow_preset,
                inputs=[components[keys.index("config_name")]],
                outputs=[comp for _, comp in preset_fields],
                show_progress="hidden",
            )

        def read_body(values: tuple) -> dict:
            return collect_config(ordered, list(values))

        @guarded()
        def do_preview(*values):
            try:
                body = read_body(values)
            except FormError as exc:
                return {train_errors: md_list(exc.errors), preview: gr.update(visible=False)}
            return {
                train_errors: "",
                preview: gr.update(value=json.dumps(body, indent=2), visible=True),
            }

        @guarded()
        def do_launch(token, *values):
            try:
                body = read_body(values)
            except FormError as exc:
                warn("Some values cannot be read; see the list above the form")
                return {train_errors: md_list(exc.errors), status: "⚠ Fix the form"}
            client = client_for(token)
            try:
                run = client.create_run(body)
            except BackendError as exc:
                if exc.status_code == 422:
                    warn("The backend rejected the configuration; see the list above the form")
                    lines = exc.errors or [exc.message]
                    return {
                        train_errors: "**The backend rejected the configuration:**\n\n" + md_list(lines),
                        status: f"⚠ {exc.message}",
                    }
                raise
            run_id = str(run.get("id")) if isinstance(run, dict) else ""
            gr.Info(f"Run #{run_id} launched")
            return {
                train_errors: "",
                status: f"✓ Run #{run_id} launched.",
                **after_launch(client, run_id),
            }

        preview_btn.click(do_preview, inputs=components, outputs=[train_errors, preview, status])
        launch_btn.click(
            do_launch,
            inputs=[token_state, *components],
            outputs=[train_errors, status, *launch_outputs()],
        )

    return TrainTab(launch_btn=launch_btn, errors=train_errors)
