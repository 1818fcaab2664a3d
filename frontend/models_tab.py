"""The Models tab: every registered model version (the shipped default included), activation and
rollback, with a confirmation when the chosen model's recorded Dice is lower than the serving one's.

Handlers are module-level functions that tests call; :func:`build` lays the tab out and wires
them. The names shown are the ones the backend sends (``name``: the version a bundle serves
under, the same string as ``/ready`` and ``/segment``'s ``model_version``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import gradio as gr

from frontend import views
from frontend.client import BackendClient, BackendError

JSON = dict[str, Any]


def recorded_dice(model: JSON) -> float | None:
    """The refined Dice the model's record gives (its test evaluation, else its best other one)."""
    metrics = model.get("metrics") if isinstance(model.get("metrics"), dict) else {}
    block = views.metric_block(metrics)
    _, refined, _ = views.dice_triplet(block)
    return float(refined) if isinstance(refined, int | float) else None


def serving_model(models: list[JSON], serving_id: Any = None) -> JSON | None:
    """The version serving now: the replica's (``serving_id``), else the store's active one, else
    the shipped default (what a server without an active model serves)."""
    by_id = {str(m.get("id")): m for m in models}
    if serving_id is not None and str(serving_id) in by_id:
        return by_id[str(serving_id)]
    active = [m for m in models if m.get("active")]
    if active:
        return active[0]
    shipped = [m for m in models if m.get("shipped")]
    return shipped[0] if shipped else None


@dataclass
class Activation:
    """What :func:`request_activation` decided: done, or a confirmation is needed first."""

    done: bool
    message: str
    model_id: str | None = None


def request_activation(client: BackendClient, model_id: str | None, *, confirmed: bool = False) -> Activation:
    """Activate ``model_id`` (re-activating any version is a rollback); when its recorded Dice is
    lower than the serving model's and not ``confirmed``, nothing changes and the answer asks for
    a confirmation that names both figures."""
    if not model_id:
        raise BackendError("Pick a model version to activate")
    listing = client.list_models_page()
    models = listing["items"]
    chosen = next((m for m in models if str(m.get("id")) == str(model_id)), None)
    if chosen is None:
        raise BackendError(f"Model #{model_id} is no longer registered: refresh the list")
    current = serving_model(models, listing.get("serving_id"))
    name = views.model_version_name(chosen)
    if current is not None and str(current.get("id")) == str(model_id) and chosen.get("active"):
        return Activation(
            done=True, message=f"Model #{model_id} `{name}` is already active.", model_id=model_id
        )
    new_dice, old_dice = recorded_dice(chosen), recorded_dice(current) if current else None
    if not confirmed and new_dice is not None and old_dice is not None and new_dice < old_dice:
        return Activation(
            done=False,
            message=(
                f"Model #{model_id} `{name}` has a lower recorded refined Dice ({new_dice:.3f}) than the "
                f"serving model `{views.model_version_name(current)}` ({old_dice:.3f}). "
                "Press **Confirm activation** to serve it anyway."
            ),
            model_id=str(model_id),
        )
    client.activate_model(str(model_id))
    return Activation(
        done=True, message=f"✓ Model #{model_id} `{name}` is now active.", model_id=str(model_id)
    )


def rows_and_choices(models: list[JSON]) -> tuple[list[list[Any]], list[tuple[str, str]]]:
    return views.model_rows(models), views.model_choices(models)


@dataclass
class ModelsTab:
    tab: Any
    table: Any
    select: Any
    outputs: list[Any]


def build(
    client_for: Callable[[str | None], BackendClient], token_state: Any, status: Any, guarded
) -> ModelsTab:
    """Lay out the Models tab (inside ``gr.Tabs``) and wire its handlers."""
    with gr.Tab("Models", id="models", elem_id="tab-models") as models_tab:
        with gr.Row():
            gr.Markdown(
                "Registered model versions, the shipped default included. The active one serves "
                "`/segment`; activate any version to switch to it or to roll back."
            )
            refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-models")
        table = gr.Dataframe(
            headers=views.MODEL_COLUMNS,
            value=[],
            interactive=False,
            label="Model versions",
            elem_id="models-table",
        )
        with gr.Row():
            select = gr.Dropdown(
                label="Model version", choices=[], value=None, elem_id="model-select", scale=4
            )
            activate_btn = gr.Button("Activate", variant="primary", elem_id="activate-btn", scale=1)
        confirm_md = gr.Markdown("", elem_id="activate-warning")
        # Always in the page (enabled only while a confirmation is pending): no element that
        # appears and disappears under the user's pointer.
        with gr.Row():
            confirm_btn = gr.Button(
                "Confirm activation", variant="stop", interactive=False, elem_id="confirm-activate-btn"
            )
            cancel_btn = gr.Button("Keep the current model", interactive=False, elem_id="cancel-activate-btn")
    outputs = [table, select, confirm_md, confirm_btn, cancel_btn, status]

    def listed(client: BackendClient, selected: str | None = None) -> dict:
        listing = client.list_models_page()
        models = listing["items"]
        rows, choices = rows_and_choices(models)
        ids = [value for _, value in choices]
        if selected not in ids:
            current = serving_model(models, listing.get("serving_id"))
            selected = str(current["id"]) if current else (ids[0] if ids else None)
        return {table: rows, select: gr.update(choices=choices, value=selected)}

    def hide_confirmation() -> dict:
        return {
            confirm_md: "",
            confirm_btn: gr.Button(interactive=False),
            cancel_btn: gr.Button(interactive=False),
        }

    @guarded()
    def on_refresh(token, selected):
        return {**listed(client_for(token), selected), **hide_confirmation()}

    refresh_btn.click(on_refresh, inputs=[token_state, select], outputs=outputs)
    models_tab.select(on_refresh, inputs=[token_state, select], outputs=outputs)

    def activation(token, model_id, confirmed: bool) -> dict:
        client = client_for(token)
        decision = request_activation(client, model_id, confirmed=confirmed)
        if not decision.done:
            return {
                confirm_md: f"⚠ {decision.message}",
                confirm_btn: gr.Button(interactive=True),
                cancel_btn: gr.Button(interactive=True),
                status: "Confirmation needed: see the Models tab.",
            }
        gr.Info(decision.message.removeprefix("✓ "))
        return {**listed(client, decision.model_id), **hide_confirmation(), status: decision.message}

    @guarded()
    def on_activate(token, model_id):
        return activation(token, model_id, confirmed=False)

    @guarded()
    def on_confirm(token, model_id):
        return activation(token, model_id, confirmed=True)

    activate_btn.click(on_activate, inputs=[token_state, select], outputs=outputs)
    confirm_btn.click(on_confirm, inputs=[token_state, select], outputs=outputs)
    cancel_btn.click(
        lambda: {**hide_confirmation(), status: "Activation cancelled: the current model keeps serving."},
        outputs=outputs,
    )
    select.change(lambda: hide_confirmation(), outputs=outputs, show_progress="hidden")
    return ModelsTab(tab=models_tab, table=table, select=select, outputs=outputs)
