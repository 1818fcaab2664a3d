"""Small pieces the admin UI's tabs share: toasts, Markdown lists, change signatures, form widgets."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import gradio as gr

from frontend.schema_form import FieldSpec


def md_list(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def warn(message: str) -> None:
    try:
        gr.Warning(message)
    except Exception:  # outside an event (unit tests): nothing to show the toast to
        pass


def signature(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def field_component(spec: FieldSpec, label: str):
    """One Gradio input for one schema leaf; ``key`` keeps the user's value across re-renders."""
    common = {
        "label": label,
        "info": spec.info() or None,
        "key": f"cfg-{spec.key}",
        "elem_id": "cfg-" + spec.key.replace(".", "-"),
        "interactive": True,  # inside gr.render, Gradio cannot infer it from the events
    }
    value = spec.widget_value()
    if spec.kind == "choice":
        if len(spec.choices) <= 4 and value is not None:
            return gr.Radio(choices=list(spec.choices), value=value, **common)
        return gr.Dropdown(choices=list(spec.choices), value=value, **common)
    if spec.kind == "multi":
        return gr.CheckboxGroup(choices=spec.choices, value=value, **common)
    if spec.kind == "bool":
        return gr.Checkbox(value=value, **common)
    if spec.kind == "int":
        return gr.Number(value=value, precision=0, **common)
    if spec.kind == "float":
        return gr.Number(value=value, **common)
    placeholder = {
        "int_list": "comma-separated whole numbers, e.g. 0, 1",
        "float_list": "comma-separated numbers",
        "json": "JSON",
    }.get(spec.kind, "empty = default" if spec.nullable else None)
    return gr.Textbox(value=value, placeholder=placeholder, **common)


def promoted_label(spec: FieldSpec) -> str:
    if spec.key == "epochs":
        return "Epochs (every phase)"
    if spec.path[-1] == "config_name":
        return "Configuration"
    if spec.path[-1] == "root":
        return "Dataset root"
    return spec.label
