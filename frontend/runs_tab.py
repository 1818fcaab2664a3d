"""The Runs tab: the live run table (refreshed by the app's timer), a selected run's curves, per-fold
baseline vs refined Dice, evaluations and logs, Cancel and Resume.

:class:`RunsTab` holds the components; its methods compute the updates (``detail_values``,
``refresh``) from the backend and are what the handlers wired by :func:`build` call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import gradio as gr

from frontend import views
from frontend.client import BackendClient, BackendError
from frontend.widgets import signature


class SelectionTracker:
    """The run each browser session selected last (the most recent ``max_sessions`` sessions).

    A periodic refresh carries the selection of the moment it started; when the user selects
    another run meanwhile, the refresh's detail belongs to the old run and must not overwrite the
    new run's detail. The selection handler records every selection here; the refresh does not
    read the detail of a selection that is already stale, and drops a detail it read when
    :meth:`is_stale` says its run stopped being the session's selection meanwhile.
    """

    def __init__(self, max_sessions: int = 1024) -> None:
        self.max_sessions = max_sessions
        self._latest: OrderedDict[str, str | None] = OrderedDict()
        self._lock = threading.Lock()

    @staticmethod
    def _run(run_id: Any) -> str | None:
        return None if run_id in (None, "") else str(run_id)

    def remember(self, session: str | None, run_id: Any) -> None:
        if not session:
            return
        with self._lock:
            self._latest[session] = self._run(run_id)
            self._latest.move_to_end(session)
            while len(self._latest) > self.max_sessions:
                self._latest.popitem(last=False)

    def is_stale(self, session: str | None, run_id: Any) -> bool:
        """True when ``session`` has since selected a run other than ``run_id``."""
        with self._lock:
            if not session or session not in self._latest:
                return False
            return self._latest[session] != self._run(run_id)


@dataclass
class RunsTab:
    table: Any
    select: Any
    refresh_btn: Any
    cancel_btn: Any
    resume_btn: Any
    summary: Any
    loss_plot: Any
    dice_plot: Any
    folds_table: Any
    eval_table: Any
    logs: Any
    sig_state: Any
    detail_sig_state: Any
    selections: SelectionTracker = field(default_factory=SelectionTracker)

    @property
    def detail_outputs(self) -> list[Any]:
        return [
            self.summary,
            self.loss_plot,
            self.dice_plot,
            self.folds_table,
            self.eval_table,
            self.logs,
            self.detail_sig_state,
        ]

    @property
    def outputs(self) -> list[Any]:
        """What a refresh updates (the app adds its status line)."""
        return [self.table, self.select, self.sig_state, *self.detail_outputs]

    def detail_values(self, client: BackendClient, run_id: str, last_sig: str | None, force: bool) -> dict:
        """The selected run's detail; ``{}`` when it did not change since ``last_sig``."""
        run = client.get_run(run_id)
        run_sig = signature(run)
        if not force and run_sig == last_sig:
            return {}
        metrics = client.run_metrics(run_id)
        losses, dices = views.epoch_frames(metrics)
        return {
            self.summary: views.run_summary_md(run),
            self.loss_plot: views.curves_figure(losses, "Loss per epoch", "loss"),
            self.dice_plot: views.curves_figure(dices, "Validation Dice per epoch", "Dice"),
            self.folds_table: views.fold_rows(metrics, run),
            self.eval_table: views.eval_rows(metrics),
            self.logs: views.logs_text(run, metrics),
            self.detail_sig_state: run_sig,
        }

    def empty_detail(self) -> dict:
        return {
            self.summary: "*No run selected.*",
            self.loss_plot: None,
            self.dice_plot: None,
            self.folds_table: [],
            self.eval_table: [],
            self.logs: "",
            self.detail_sig_state: None,
        }

    def signed_out(self) -> dict:
        return {
            self.table: [],
            self.select: gr.update(choices=[], value=None),
            self.sig_state: None,
            **self.empty_detail(),
        }

    def refresh(
        self, client: BackendClient, selected, runs_sig, detail_sig, *, force: bool, with_detail: bool = True
    ) -> dict:
        """The table (when it changed, or ``force``) and the selected run's detail."""
        # The selected run's detail is read before the list, so the table is never older than
        # the detail shown beside it (a run that just succeeded is "succeeded" in both).
        detail = None
        if selected and with_detail:
            try:
                detail = self.detail_values(client, str(selected), detail_sig, force)
            except BackendError as error:
                if error.status_code != 404:  # a run gone from the store: the list decides below
                    raise
        runs = client.list_runs()
        out: dict = {}
        sig = signature(runs)
        if force or sig != runs_sig:
            choices = views.run_choices(runs)
            ids = [value for _, value in choices]
            reselect = selected not in ids
            if reselect:
                selected = ids[0] if ids else None
                detail = (
                    self.detail_values(client, str(selected), detail_sig, force)
                    if selected and with_detail
                    else None
                )
            # A periodic refresh only sets the selection when it has none (or a vanished run):
            # its inputs may predate a selection made meanwhile (e.g. a launch), which it must
            # not undo.
            select = (
                gr.update(choices=choices, value=selected)
                if force or reselect
                else gr.update(choices=choices)
            )
            out.update({self.table: views.run_rows(runs), self.select: select, self.sig_state: sig})
        if detail:
            out.update(detail)
        return out

    def launched(self, client: BackendClient, run_id: str) -> dict:
        """After a launch: the table with the new run selected."""
        runs = client.list_runs()
        return {
            self.table: views.run_rows(runs),
            self.sig_state: None,
            self.select: gr.update(choices=views.run_choices(runs), value=run_id),
        }


def resume(client: BackendClient, run_id: str | None) -> None:
    """Resume a cancelled, lost or failed run from its last checkpoint (a clear error otherwise)."""
    if not run_id:
        raise BackendError("Select a run to resume")
    run = client.get_run(str(run_id))
    if str(run.get("status")) not in views.RESUMABLE:
        raise BackendError(
            f"Run #{run_id} is {run.get('status')}: only cancelled, lost or failed runs resume"
        )
    client.resume_run(str(run_id))


def build(
    client_for: Callable[[str | None], BackendClient],
    token_state: Any,
    timer: Any,
    status: Any,
    guarded: Callable,
) -> RunsTab:
    """Lay out the tab (inside its ``gr.Tab``) and wire its handlers and the app's timer."""
    with gr.Row():
        gr.Markdown("Runs refresh every 2 s. Click a row (or pick a run) for its details.")
        refresh_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-runs")
    table = gr.Dataframe(
        headers=views.RUN_COLUMNS,
        value=[],
        interactive=False,
        elem_id="runs-table",
        label="Runs",
        max_height=320,
    )
    with gr.Row():
        select = gr.Dropdown(label="Selected run", choices=[], value=None, elem_id="run-select", scale=4)
        cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="cancel-btn", scale=1)
        resume_btn = gr.Button("Resume run", elem_id="resume-btn", scale=1)
    summary = gr.Markdown("*No run selected.*", elem_id="run-summary")
    with gr.Row():
        loss_plot = gr.Plot(label="Loss per epoch", elem_id="loss-plot")
        dice_plot = gr.Plot(label="Validation Dice per epoch", elem_id="dice-plot")
    folds_table = gr.Dataframe(
        headers=views.FOLD_COLUMNS,
        value=[],
        interactive=False,
        label="Per fold: baseline (coarse) vs refined Dice on the fold's validation images",
        elem_id="folds-table",
    )
    eval_table = gr.Dataframe(
        headers=views.EVAL_COLUMNS, value=[], interactive=False, label="Evaluations", elem_id="eval-table"
    )
    logs = gr.Textbox(
        label="Logs / error",
        lines=8,
        max_lines=20,
        interactive=False,
        elem_id="run-logs",
        elem_classes=["ur-small"],
    )
    tab = RunsTab(
        table=table,
        select=select,
        refresh_btn=refresh_btn,
        cancel_btn=cancel_btn,
        resume_btn=resume_btn,
        summary=summary,
        loss_plot=loss_plot,
        dice_plot=dice_plot,
        folds_table=folds_table,
        eval_table=eval_table,
        logs=logs,
        sig_state=gr.State(None),
        detail_sig_state=gr.State(None),
    )
    outputs = [*tab.outputs, status]
    refresh_inputs = [token_state, select, tab.sig_state, tab.detail_sig_state]

    @guarded(toast=False)
    def on_tick(token, selected, runs_sig, detail_sig, request: gr.Request):
        if not token:
            return {}
        session = getattr(request, "session_hash", None)
        # A tick queued before the user selected another run carries the old selection: it
        # refreshes the list only (no request for the old run's detail) ...
        fresh = not tab.selections.is_stale(session, selected)
        out = tab.refresh(client_for(token), selected, runs_sig, detail_sig, force=False, with_detail=fresh)
        if tab.selections.is_stale(session, selected):
            for component in tab.detail_outputs:  # ... and drops a detail read while the selection changed
                out.pop(component, None)
        return out

    timer.tick(
        on_tick,
        inputs=refresh_inputs,
        outputs=outputs,
        show_progress="hidden",
        queue=True,
        trigger_mode="always_last",
    )

    @guarded()
    def on_refresh(token, selected, runs_sig, detail_sig):
        return {**tab.refresh(client_for(token), selected, runs_sig, detail_sig, force=True), status: ""}

    refresh_btn.click(on_refresh, inputs=refresh_inputs, outputs=outputs)

    def on_row_select(evt: gr.SelectData):
        row = evt.row_value if isinstance(evt.row_value, list) else None
        if not row or row[0] in (None, ""):
            return gr.skip()
        return gr.update(value=str(row[0]))

    table.select(on_row_select, inputs=None, outputs=[select], show_progress="hidden")

    @guarded()
    def on_select_run(token, run_id, request: gr.Request):
        tab.selections.remember(getattr(request, "session_hash", None), run_id)
        if not run_id:
            return tab.empty_detail()
        return tab.detail_values(client_for(token), str(run_id), None, force=True)

    select.change(on_select_run, inputs=[token_state, select], outputs=[*tab.detail_outputs, status])

    @guarded()
    def on_cancel(token, run_id):
        if not run_id:
            raise BackendError("Select a run to cancel")
        client = client_for(token)
        client.cancel_run(str(run_id))
        gr.Info(f"Cancellation of run #{run_id} requested")
        out = tab.detail_values(client, str(run_id), None, force=True)
        out[status] = f"■ Cancellation of run #{run_id} requested."
        return out

    cancel_btn.click(on_cancel, inputs=[token_state, select], outputs=[*tab.detail_outputs, status])

    @guarded()
    def on_resume(token, run_id):
        client = client_for(token)
        resume(client, run_id)
        gr.Info(f"Run #{run_id} resumes from its last checkpoint")
        out = tab.detail_values(client, str(run_id), None, force=True)
        out[status] = f"▶ Run #{run_id} queued to resume from its last checkpoint."
        return out

    resume_btn.click(on_resume, inputs=[token_state, select], outputs=[*tab.detail_outputs, status])
    return tab
