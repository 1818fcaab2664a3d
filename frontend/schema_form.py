"""Turn the backend's training-config JSON schema into form fields, and form values back into JSON.

Pure Python (no Gradio): :func:`form_fields` walks ``GET /api/config/schema`` (resolving
``$ref``/``$defs``, ``anyOf`` with ``null``, ``allOf``) into a flat list of :class:`FieldSpec`,
one per leaf setting, each with its dotted path, widget kind, default and help text.
:func:`collect_config` turns the widgets' values back into the nested JSON body of
``POST /api/runs``, sending **only the settings that differ from their defaults** (plus the
required ones), so that defaults derived on the backend (e.g. the TransUNet sizes that follow
``config_name``) keep applying.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = ["FieldSpec", "FormError", "PROMOTED", "collect_config", "form_fields", "sections"]

#: Settings shown at the top of the form, outside the per-section accordions, in this order
#: (matched on the leaf name): every top-level setting is promoted, and these section leaves too.
PROMOTED = ("config_name", "phases", "dataset", "root", "folds", "limit", "epochs", "device")
PROMOTED_LEAVES = ("data.dataset", "data.root", "data.folds", "data.limit")

#: ``"Shortcut for data.folds."`` in a description makes a top-level setting an alias.
_SHORTCUT = re.compile(r"[Ss]hortcut for ([A-Za-z_][\w.]*\w)")

#: Section title of top-level leaves.
GENERAL = "general"

#: Readable titles of the sections of ``training/config.py`` (others: their name, prettified).
SECTION_TITLES = {
    "data": "Data and split",
    "transunet": "TransUNet architecture",
    "tinyvit": "TinyViT coarse architecture (coarse model tinyvit)",
    "refiner": "Refiner (backbone and prompts)",
    "coarse": "Phase 1: coarse segmenter training",
    "augment": "Phase 2a: mask augmentation",
    "refiner_train": "Phase 2b: refiner fine-tuning",
    "end_to_end": "Phase 3: end-to-end",
    "finetune": "Fine-tuning from a model: blend with its weights",
}

#: Words written differently in labels.
_LABEL_WORDS = {
    "lr": "learning rate",
    "ce": "CE",
    "bce": "BCE",
    "roi": "ROI",
    "amp": "AMP",
    "npz": "npz",
    "vit": "ViT",
    "mlp": "MLP",
    "l2": "L2",
    "phase1": "phase 1",
    "img": "image",
    "num": "number of",
    "n": "number of",
    "dedup": "dedup",
}


def pretty_label(name: str) -> str:
    """``"lr_coarse"`` → ``"Learning rate coarse"``; ``"config_name"`` → ``"Config name"``."""
    words = [_LABEL_WORDS.get(w, w) for w in name.split("_") if w]
    text = " ".join(words) or name
    return text[:1].upper() + text[1:]


WidgetKind = (
    str  # "choice" | "multi" | "bool" | "int" | "float" | "text" | "int_list" | "float_list" | "json"
)


class FormError(ValueError):
    """A value typed in the form cannot be turned into JSON (``errors``: readable lines)."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


@dataclass
class FieldSpec:
    path: tuple[str, ...]
    kind: WidgetKind
    label: str
    help: str = ""
    default: Any = None
    has_default: bool = False
    required: bool = False
    nullable: bool = False
    choices: list[Any] = field(default_factory=list)
    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: float | None = None
    exclusive_maximum: float | None = None
    #: Dotted path of the setting this top-level shortcut stands for (its default is shown).
    alias_of: str | None = None
    #: Defaults per named configuration (``x-<section>-presets`` of the schema), e.g. TransUNet
    #: sizes per ``config_name``: values equal to the chosen preset are not sent.
    presets: dict[str, Any] = field(default_factory=dict)

    @property
    def key(self) -> str:
        return ".".join(self.path)

    @property
    def section(self) -> str:
        return self.path[0] if len(self.path) > 1 else GENERAL

    @property
    def promoted(self) -> bool:
        return len(self.path) == 1 or self.key in PROMOTED_LEAVES

    def default_for(self, preset: str | None) -> Any:
        if preset is not None and preset in self.presets:
            return self.presets[preset]
        return self.default

    def range_text(self) -> str:
        parts = []
        if self.minimum is not None:
            parts.append(f"≥ {_fmt(self.minimum)}")
        if self.exclusive_minimum is not None:
            parts.append(f"> {_fmt(self.exclusive_minimum)}")
        if self.maximum is not None:
            parts.append(f"≤ {_fmt(self.maximum)}")
        if self.exclusive_maximum is not None:
            parts.append(f"< {_fmt(self.exclusive_maximum)}")
        return ", ".join(parts)

    def info(self) -> str:
        """Help text: description, allowed range and the default."""
        text = self.help.strip()
        extra = []
        rng = self.range_text()
        if rng:
            extra.append(rng)
        if self.has_default:
            extra.append(f"default: {_fmt(self.default)}")
        elif self.required:
            extra.append("required")
        if len({json.dumps(v, sort_keys=True) for v in self.presets.values()}) > 1:
            extra.append("per configuration: " + ", ".join(f"{k} {_fmt(v)}" for k, v in self.presets.items()))
        if extra:
            text = f"{text} ({'; '.join(extra)})" if text else "; ".join(extra)
        return text

    def widget_value(self, value: Any = ...) -> Any:
        """The value to show in the widget for ``value`` (the default when omitted)."""
        if value is ...:
            value = self.default if self.has_default else None
        if self.kind in ("int_list", "float_list"):
            return "" if value is None else ", ".join(_fmt(v) for v in value)
        if self.kind == "json":
            return "" if value is None else json.dumps(value)
        if self.kind == "text":
            return "" if value is None else str(value)
        if self.kind == "multi":
            # No default (a default factory): everything is selected.
            return list(self.choices if value is None and not self.has_default else value or [])
        if self.kind == "bool":
            return bool(value)
        return value

    def parse(self, raw: Any) -> Any:
        """Widget value → JSON value; raises ``ValueError`` with a readable message."""
        if self.kind == "bool":
            return bool(raw)
        if self.kind == "multi":
            chosen = list(raw or [])
            order = {choice: i for i, choice in enumerate(self.choices)}
            return sorted(chosen, key=lambda c: order.get(c, len(order)))
        if self.kind == "choice":
            return None if raw in (None, "") and self.nullable else raw
        if self.kind in ("int", "float"):
            if raw is None or (isinstance(raw, str) and not raw.strip()):
                if self.nullable:
                    return None
                raise ValueError("is required")
            try:
                number = float(raw)
            except (TypeError, ValueError) as exc:
                raise ValueError("must be a number") from exc
            if math.isnan(number):
                raise ValueError("must be a number")
            if self.kind == "int":
                if not number.is_integer():
                    raise ValueError("must be a whole number")
                return int(number)
            return number
        if self.kind in ("int_list", "float_list"):
            text = "" if raw is None else str(raw).strip().strip("[]()")
            if not text:
                return None if self.nullable else []
            items = [p.strip() for p in text.replace(";", ",").split(",") if p.strip()]
            try:
                if self.kind == "int_list":
                    return [int(p) for p in items]
                return [float(p) for p in items]
            except ValueError as exc:
                what = "whole numbers" if self.kind == "int_list" else "numbers"
                raise ValueError(f"must be a comma-separated list of {what}") from exc
        if self.kind == "json":
            text = "" if raw is None else str(raw).strip()
            if not text:
                return None
            try:
                return json.loads(text)
            except ValueError as exc:
                raise ValueError("must be valid JSON") from exc
        text = "" if raw is None else str(raw).strip()
        if not text and self.nullable:
            return None
        return text

    def is_default(self, value: Any, preset: str | None = None) -> bool:
        if not self.has_default:
            return False
        default = self.default_for(preset)
        if isinstance(value, float) or isinstance(default, float):
            try:
                return (
                    value is not None and default is not None and math.isclose(float(value), float(default))
                )
            except (TypeError, ValueError):
                return False
        if isinstance(value, list) and isinstance(default, list | tuple):
            return list(value) == list(default)
        return value == default


def _fmt(value: Any) -> str:
    if isinstance(value, bool):
        return "on" if value else "off"
    if value is None:
        return "none"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v) for v in value) + "]"
    return str(value)


# --------------------------------------------------------------------------------------------
# Schema walking
# --------------------------------------------------------------------------------------------


def _resolve(schema: dict, node: dict, seen: tuple[str, ...] = ()) -> dict:
    """Follow ``$ref`` (into ``$defs``/``definitions``) and single-element ``allOf``."""
    while isinstance(node, dict):
        if "$ref" in node:
            ref = node["$ref"]
            if ref in seen:
                return {}
            seen = (*seen, ref)
            target: Any = schema
            for part in ref.lstrip("#/").split("/"):
                target = target.get(part, {}) if isinstance(target, dict) else {}
            merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
            node = merged
            continue
        if "allOf" in node and len(node["allOf"]) == 1:
            merged = {
                **_resolve(schema, node["allOf"][0], seen),
                **{k: v for k, v in node.items() if k != "allOf"},
            }
            node = merged
            continue
        return node
    return {}


def _split_nullable(schema: dict, node: dict) -> tuple[dict, bool]:
    node = _resolve(schema, node)
    for key in ("anyOf", "oneOf"):
        if key in node:
            options = [_resolve(schema, o) for o in node[key]]
            non_null = [o for o in options if o.get("type") != "null"]
            nullable = len(non_null) < len(options)
            if len(non_null) == 1:
                inner = {**non_null[0], **{k: v for k, v in node.items() if k != key}}
                return inner, nullable
            return node, nullable
    if isinstance(node.get("type"), list):
        types = [t for t in node["type"] if t != "null"]
        nullable = len(types) < len(node["type"])
        return {**node, "type": types[0] if len(types) == 1 else types}, nullable
    return node, False


def _title(name: str, node: dict) -> str:
    title = node.get("title")
    generated = " ".join(w.capitalize() for w in name.split("_"))
    if title and isinstance(title, str) and title != generated:
        return title  # an explicit title in the schema
    return pretty_label(name)


def _leaf(path: tuple[str, ...], node: dict, schema: dict, required: bool) -> FieldSpec:
    outer = node
    node, nullable = _split_nullable(schema, node)
    has_default = "default" in outer or "default" in node
    default = outer.get("default", node.get("default"))
    typ = node.get("type")
    choices: list[Any] = []
    if "enum" in node:
        kind, choices = "choice", list(node["enum"])
    elif "const" in node:
        kind, choices = "choice", [node["const"]]
    elif typ == "boolean":
        kind = "bool"
    elif typ == "integer":
        kind = "int"
    elif typ == "number":
        kind = "float"
    elif typ == "string":
        kind = "text"
    elif typ == "array":
        items = node.get("items")
        prefix = node.get("prefixItems")
        item_nodes = [_split_nullable(schema, i)[0] for i in (prefix or ([items] if items else []))]
        if item_nodes and all("enum" in i for i in item_nodes) and not prefix:
            kind, choices = "multi", list(item_nodes[0]["enum"])
        elif item_nodes and all(i.get("type") == "integer" for i in item_nodes):
            kind = "int_list"
        elif item_nodes and all(i.get("type") in ("number", "integer") for i in item_nodes):
            kind = "float_list"
        else:
            kind = "json"
    else:
        kind = "json"
    return FieldSpec(
        path=path,
        kind=kind,
        label=_title(path[-1], outer if "title" in outer else node),
        help=str(outer.get("description") or node.get("description") or ""),
        default=default,
        has_default=has_default,
        required=required and not has_default,
        nullable=nullable,
        choices=choices,
        minimum=node.get("minimum"),
        maximum=node.get("maximum"),
        exclusive_minimum=node.get("exclusiveMinimum"),
        exclusive_maximum=node.get("exclusiveMaximum"),
    )


def _walk(schema: dict, node: dict, path: tuple[str, ...], out: list[FieldSpec], depth: int = 0) -> None:
    node = _resolve(schema, node)
    required = set(node.get("required") or [])
    for name, prop in (node.get("properties") or {}).items():
        inner, _nullable = _split_nullable(schema, prop)
        if inner.get("type") == "object" and inner.get("properties") and depth < 4:
            _walk(schema, inner, (*path, name), out, depth + 1)
        else:
            out.append(_leaf((*path, name), prop, schema, name in required))


def form_fields(schema: dict) -> list[FieldSpec]:
    """Every leaf setting of the schema, in schema order.

    A top-level shortcut (``"Shortcut for data.folds"``) replaces the setting it stands for
    and shows that setting's default; leaves of a section with ``x-<section>-presets`` take
    their defaults from the preset of the default ``config_name``.
    """
    out: list[FieldSpec] = []
    _walk(schema, schema, (), out)
    by_key = {spec.key: spec for spec in out}
    hidden: set[str] = set()
    for spec in out:
        match = _SHORTCUT.search(spec.help) if len(spec.path) == 1 else None
        target = by_key.get(match.group(1)) if match else None
        if target is None or target is spec:
            continue
        spec.alias_of = target.key
        if target.has_default:
            spec.default, spec.has_default = target.default, True
        if not spec.help.strip().endswith(".") or spec.help.lower().startswith("shortcut"):
            spec.help = target.help or spec.help
        hidden.add(target.key)
    config_name = by_key.get("config_name")
    preset_name = config_name.default if config_name is not None and config_name.has_default else None
    for spec in out:
        presets = schema.get(f"x-{spec.section}-presets")
        if len(spec.path) < 2 or not isinstance(presets, dict):
            continue
        spec.presets = {
            name: values[spec.path[-1]]
            for name, values in presets.items()
            if isinstance(values, dict) and spec.path[-1] in values
        }
        if preset_name in spec.presets:
            spec.default, spec.has_default = spec.presets[preset_name], True
    if schema.get("x-default-root-exists") is False:
        # The default dataset folder is not on the server: an empty field with a hint instead.
        for spec in out:
            if spec.path[-1] == "root":
                spec.default, spec.has_default = None, False
                spec.help = (spec.help.rstrip(".") + ". " if spec.help else "") + (
                    "No dataset at the default path on this server: enter the folder of your copy "
                    "(e.g. BUSI's, or the corrections folder shown in the Corrections tab)."
                )
    return [spec for spec in out if spec.key not in hidden]


def sections(
    fields: list[FieldSpec], schema: dict | None = None
) -> list[tuple[str, str, str, list[FieldSpec]]]:
    """Non-promoted fields grouped per top-level section: ``(name, title, help, fields)``."""
    order: list[str] = []
    grouped: dict[str, list[FieldSpec]] = {}
    for spec in fields:
        if spec.promoted:
            continue
        if spec.section not in grouped:
            order.append(spec.section)
            grouped[spec.section] = []
        grouped[spec.section].append(spec)
    result = []
    props = (schema or {}).get("properties") or {}
    for name in order:
        node = _resolve(schema or {}, props.get(name, {})) if schema else {}
        node, _ = _split_nullable(schema or {}, node) if schema else (node, False)
        if name == GENERAL:
            title, help_text = "General", "Run-wide settings."
        else:
            title = SECTION_TITLES.get(name) or name.replace("_", " ").capitalize()
            help_text = str(node.get("description") or "").strip()
        result.append((name, title, help_text, grouped[name]))
    return result


def collect_config(fields: list[FieldSpec], values: list[Any], *, only_changed: bool = True) -> dict:
    """Widget values (same order as ``fields``) → nested JSON body.

    Settings equal to their defaults (for preset sections: to the chosen configuration's
    preset) are left out when ``only_changed`` — the backend fills them in; required settings
    are always sent. Raises :class:`FormError` listing every value that cannot be read.
    """
    body: dict[str, Any] = {}
    errors: list[str] = []
    parsed: list[tuple[FieldSpec, Any]] = []
    for spec, raw in zip(fields, values, strict=True):
        try:
            parsed.append((spec, spec.parse(raw)))
        except ValueError as exc:
            errors.append(f"{spec.key}: {exc}")
    preset = next((value for spec, value in parsed if spec.key == "config_name"), None)
    for spec, value in parsed:
        if only_changed and spec.is_default(value, preset) and not spec.required:
            continue
        if value is None and (spec.alias_of or (not spec.has_default and not spec.required)):
            continue
        target = body
        for part in spec.path[:-1]:
            target = target.setdefault(part, {})
        target[spec.path[-1]] = value
    if errors:
        raise FormError(errors)
    return body
