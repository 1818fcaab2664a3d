"""The Gradio admin UI of UltraRefiner Studio.

``build_app(api_url)`` returns the :class:`gr.Blocks`; ``python -m frontend.app --port 7860
--api-url http://127.0.0.1:8000`` serves it. Every call to the backend goes through
:class:`frontend.client.BackendClient`; every failure is shown as a readable message (a toast
and the status line), never as a stack trace.

Tabs (visible only after signing in with the admin token, which lives in the session's
``gr.State`` and nowhere else):

* **Train** — a form generated from ``GET /api/config/schema``; Launch posts only the settings
  that differ from their defaults; the backend's validation errors are listed under the form.
* **Runs** — the run table (refreshed every 2 s by a ``gr.Timer``); a selected run shows its
  loss and Dice curves, a per-fold table of baseline vs refined Dice, the evaluations, its
  logs or error, and a Cancel button.
* **Compare** — upload an image (and optionally its ground-truth mask): the coarse and the
  refined masks drawn over it side by side, areas, timings, Dice against the ground truth,
  and (on request only) the two masks as PNG downloads.
* **Models** — registered model versions with their metrics; Activate one.
"""

from __future__ import annotations

import argparse
import atexit
import functools
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import gradio as gr

from frontend import compare as compare_tab
from frontend import corrections_tab, models_tab, views
from frontend.client import BackendClient, BackendError
from frontend.schema_form import PROMOTED, FieldSpec, FormError, collect_config, form_fields, sections

logger = logging.getLogger("ultrarefiner.ui")

DEFAULT_API_URL = "http://127.0.0.1:8000"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 7860
REFRESH_SECONDS = 2.0

CSS = """
#status p { margin: 0.2em 0; }
#train-errors { color: var(--error-text-color, #b91c1c); }
.ur-small textarea { font-family: ui-monospace, monospace; font-size: 12px; }
"""


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


def theme() -> gr.themes.Base:
    """The default theme with system fonts (the UI must work without internet)."""
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"],
        font_mono=["ui-monospace", "SFMono-Regular", "monospace"],
    )


_EXPORT_ROOT: Path | None = None
#: Exported mask PNGs older than this are removed at the next export (and all of them at exit).
EXPORT_MAX_AGE_S = 3600.0


def _export_folder() -> Path:
    """A fresh folder for one export, under this process's temp folder (pruned, removed at exit)."""
    global _EXPORT_ROOT
    if _EXPORT_ROOT is None or not _EXPORT_ROOT.is_dir():
        _EXPORT_ROOT = Path(tempfile.mkdtemp(prefix="ultrarefiner-ui-"))
        atexit.register(shutil.rmtree, _EXPORT_ROOT, True)
    now = time.time()
    for old in _EXPORT_ROOT.iterdir():
        try:
            if now - old.stat().st_mtime > EXPORT_MAX_AGE_S:
                shutil.rmtree(old, ignore_errors=True)
        except OSError:
            pass
    return Path(tempfile.mkdtemp(prefix="masks-", dir=_EXPORT_ROOT))


def _md_list(lines: list[str]) -> str:
    return "\n".join(f"- {line}" for line in lines)


def _warn(message: str) -> None:
    try:
        gr.Warning(message)
    except Exception:  # outside an event (unit tests): nothing to show the toast to
        pass


def _signature(*parts: Any) -> str:
    return hashlib.sha1(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def _field_component(spec: FieldSpec, label: str):
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


def _promoted_label(spec: FieldSpec) -> str:
    if spec.key == "epochs":
        return "Epochs (every phase)"
    if spec.path[-1] == "config_name":
        return "Configuration"
    if spec.path[-1] == "root":
        return "Dataset root"
    return spec.label


def build_app(api_url: str | None = None, *, api_key: str | None = None) -> gr.Blocks:
    """The admin UI talking to the backend at ``api_url`` (default: ``$API_URL``)."""
    api_url = (api_url or os.environ.get("API_URL") or DEFAULT_API_URL).rstrip("/")
    api_key = api_key if api_key is not None else os.environ.get("API_KEY") or None
    base_client = BackendClient(api_url, api_key=api_key)

    def client_for(token: str | None) -> BackendClient:
        if not token:
            raise BackendError("Sign in first: enter the admin token")
        return base_client.with_token(token)

    # delete_cache: Gradio's own copies of uploads and outputs are removed after an hour.
    with gr.Blocks(
        title="UltraRefiner Studio · admin", analytics_enabled=False, delete_cache=(900, 3600)
    ) as demo:
        token_state = gr.State(None)
        schema_state = gr.State(None)
        runs_sig_state = gr.State(None)
        detail_sig_state = gr.State(None)

        gr.Markdown(
            f"# UltraRefiner Studio · admin\nBreast-ultrasound lesion segmentation: coarse TransUNet "
            f"masks refined by a SAM-family model. Backend: `{api_url}`"
        )
        status = gr.Markdown("", elem_id="status")

        def guarded(*, toast: bool = True) -> Callable:
            """Turn any failure of a handler into ``{status: message}`` (+ a toast)."""

            def decorate(fn: Callable) -> Callable:
                @functools.wraps(fn)
                def wrapper(*args, **kwargs):
                    try:
                        result = fn(*args, **kwargs)
                        # Gradio reads an empty dict as one value: say "nothing changed" instead.
                        return {status: gr.skip()} if isinstance(result, dict) and not result else result
                    except BackendError as exc:
                        if toast:
                            _warn(exc.message)
                        return {status: f"⚠ {exc.message}"}
                    except Exception as exc:  # never a stack trace in the browser
                        logger.exception("UI handler %s failed", fn.__name__)
                        message = f"Unexpected error in the UI ({type(exc).__name__}); see the UI's log."
                        if toast:
                            _warn(message)
                        return {status: f"⚠ {message}"}

                return wrapper

            return decorate

        # ---------------------------------------------------------------- sign-in
        with gr.Column(visible=True, elem_id="signin-panel") as signin_panel:
            gr.Markdown("## Sign in\nEnter the admin token of the backend (`ADMIN_TOKEN`).")
            with gr.Row():
                token_box = gr.Textbox(
                    label="Admin token", type="password", elem_id="token", scale=4, max_length=4096
                )
                signin_btn = gr.Button("Sign in", variant="primary", elem_id="signin-btn", scale=1)

        with gr.Column(visible=False, elem_id="main-panel") as main_panel:
            with gr.Row():
                whoami = gr.Markdown("", elem_id="whoami")
                signout_btn = gr.Button("Sign out", size="sm", scale=0, elem_id="signout-btn")
            timer = gr.Timer(REFRESH_SECONDS, active=False)

            with gr.Tabs(elem_id="tabs") as tabs:
                # ------------------------------------------------------------ train
                with gr.Tab("Train", id="train", elem_id="tab-train"):
                    gr.Markdown(
                        "Fill in the run. Every hyper-parameter shows its default and help; only the "
                        "settings you change are sent, the backend fills in the rest."
                    )

                    # The buttons and the error list sit above the long form, in view without scrolling.
                    with gr.Row():
                        preview_btn = gr.Button("Preview request", elem_id="preview-btn")
                        launch_btn = gr.Button("Launch run", variant="primary", elem_id="launch-btn")
                    train_errors = gr.Markdown("", elem_id="train-errors")
                    preview = gr.Code(
                        label="Request body (POST /api/runs)",
                        language="json",
                        visible=False,
                        elem_id="preview-code",
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
                                        components.append(_field_component(spec, _promoted_label(spec)))
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
                                            components.append(_field_component(spec, spec.label))
                                            ordered.append(spec)
                        keys = [spec.key for spec in ordered]
                        preset_fields = [
                            (spec, comp)
                            for spec, comp in zip(ordered, components, strict=True)
                            if spec.presets
                        ]
                        if "config_name" in keys and preset_fields:

                            def follow_preset(name):
                                return [
                                    gr.update(value=spec.widget_value(spec.default_for(name)))
                                    for spec, _ in preset_fields
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
                                return {train_errors: _md_list(exc.errors), preview: gr.update(visible=False)}
                            return {
                                train_errors: "",
                                preview: gr.update(value=json.dumps(body, indent=2), visible=True),
                            }

                        @guarded()
                        def do_launch(token, *values):
                            try:
                                body = read_body(values)
                            except FormError as exc:
                                _warn("Some values cannot be read; see the list under the form")
                                return {train_errors: _md_list(exc.errors), status: "⚠ Fix the form"}
                            client = client_for(token)
                            try:
                                run = client.create_run(body)
                            except BackendError as exc:
                                if exc.status_code == 422:
                                    _warn(
                                        "The backend rejected the configuration; see the list under the form"
                                    )
                                    lines = exc.errors or [exc.message]
                                    return {
                                        train_errors: "**The backend rejected the configuration:**\n\n"
                                        + _md_list(lines),
                                        status: f"⚠ {exc.message}",
                                    }
                                raise
                            run_id = str(run.get("id")) if isinstance(run, dict) else ""
                            runs = client.list_runs()
                            gr.Info(f"Run #{run_id} launched")
                            return {
                                train_errors: "",
                                status: f"✓ Run #{run_id} launched.",
                                runs_table: views.run_rows(runs),
                                runs_sig_state: None,
                                run_select: gr.update(choices=views.run_choices(runs), value=run_id),
                                tabs: gr.Tabs(selected="runs"),
                            }

                        preview_btn.click(
                            do_preview, inputs=components, outputs=[train_errors, preview, status]
                        )
                        launch_btn.click(
                            do_launch,
                            inputs=[token_state, *components],
                            outputs=[train_errors, status, runs_table, runs_sig_state, run_select, tabs],
                        )

                # ------------------------------------------------------------ runs
                with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                    with gr.Row():
                        gr.Markdown("Runs refresh every 2 s. Click a row (or pick a run) for its details.")
                        refresh_runs_btn = gr.Button("Refresh", size="sm", scale=0, elem_id="refresh-runs")
                    runs_table = gr.Dataframe(
                        headers=views.RUN_COLUMNS,
                        value=[],
                        interactive=False,
                        elem_id="runs-table",
                        label="Runs",
                        max_height=320,
                    )
                    with gr.Row():
                        run_select = gr.Dropdown(
                            label="Selected run", choices=[], value=None, elem_id="run-select", scale=4
                        )
                        cancel_btn = gr.Button("Cancel run", variant="stop", elem_id="cancel-btn", scale=1)
                        resume_btn = gr.Button("Resume run", elem_id="resume-btn", scale=1)
                    run_summary = gr.Markdown("*No run selected.*", elem_id="run-summary")
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
                        headers=views.EVAL_COLUMNS,
                        value=[],
                        interactive=False,
                        label="Evaluations",
                        elem_id="eval-table",
                    )
                    run_logs = gr.Textbox(
                        label="Logs / error",
                        lines=8,
                        max_lines=20,
                        interactive=False,
                        elem_id="run-logs",
                        elem_classes=["ur-small"],
                    )

                # ------------------------------------------------------------ compare
                with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                    compare = compare_tab.build(client_for, token_state, status, guarded, _export_folder)

                # ------------------------------------------------------------ corrections, models
                corrections = corrections_tab.build(client_for, token_state, status, guarded)
                models = models_tab.build(client_for, token_state, status, guarded)

        # ==================================================================== handlers
        detail_outputs = [
            run_summary,
            loss_plot,
            dice_plot,
            folds_table,
            eval_table,
            run_logs,
            detail_sig_state,
        ]

        def detail_values(client: BackendClient, run_id: str, last_sig: str | None, force: bool) -> dict:
            run = client.get_run(run_id)
            run_sig = _signature(run)
            if not force and run_sig == last_sig:
                return {}
            metrics = client.run_metrics(run_id)
            losses, dices = views.epoch_frames(metrics)
            return {
                run_summary: views.run_summary_md(run),
                loss_plot: views.curves_figure(losses, "Loss per epoch", "loss"),
                dice_plot: views.curves_figure(dices, "Validation Dice per epoch", "Dice"),
                folds_table: views.fold_rows(metrics, run),
                eval_table: views.eval_rows(metrics),
                run_logs: views.logs_text(run, metrics),
                detail_sig_state: run_sig,
            }

        def empty_detail() -> dict:
            return {
                run_summary: "*No run selected.*",
                loss_plot: None,
                dice_plot: None,
                folds_table: [],
                eval_table: [],
                run_logs: "",
                detail_sig_state: None,
            }

        @guarded()
        def sign_in(token_text: str):
            token = (token_text or "").strip()
            if not token:
                raise BackendError("Enter the admin token")
            client = base_client.with_token(token)
            client.sign_in()
            schema = client.config_schema()
            return {
                token_state: token,
                schema_state: schema,
                token_box: "",
                signin_panel: gr.Column(visible=False),
                main_panel: gr.Column(visible=True),
                whoami: f"Signed in as admin on `{api_url}`.",
                timer: gr.Timer(active=True),
                status: "✓ Signed in.",
                runs_sig_state: None,
            }

        signin_outputs = [
            token_state,
            schema_state,
            token_box,
            signin_panel,
            main_panel,
            whoami,
            timer,
            status,
            runs_sig_state,
        ]
        signin_btn.click(sign_in, inputs=[token_box], outputs=signin_outputs)
        token_box.submit(sign_in, inputs=[token_box], outputs=signin_outputs)

        def sign_out():
            return {
                token_state: None,
                schema_state: None,
                signin_panel: gr.Column(visible=True),
                main_panel: gr.Column(visible=False),
                timer: gr.Timer(active=False),
                status: "Signed out.",
                runs_table: [],
                run_select: gr.update(choices=[], value=None),
                runs_sig_state: None,
                models.table: [],
                models.select: gr.update(choices=[], value=None),
                corrections.table: [],
                corrections.select: gr.update(choices=[], value=None),
                **compare_tab.signed_out(compare),
                **empty_detail(),
            }

        signout_btn.click(
            sign_out,
            outputs=[
                token_state,
                schema_state,
                signin_panel,
                main_panel,
                timer,
                status,
                runs_table,
                run_select,
                runs_sig_state,
                models.table,
                models.select,
                corrections.table,
                corrections.select,
                *compare.reset_outputs(),
                *detail_outputs,
            ],
        )

        # -- runs --------------------------------------------------------------------------
        def refresh_runs(
            token, selected, runs_sig, detail_sig, force: bool, with_detail: bool = True
        ) -> dict:
            client = client_for(token)
            # The selected run's detail is read before the list, so the table is never older than
            # the detail shown beside it (a run that just succeeded is "succeeded" in both).
            detail = None
            if selected and with_detail:
                try:
                    detail = detail_values(client, str(selected), detail_sig, force)
                except BackendError as error:
                    if error.status_code != 404:  # a run gone from the store: the list decides below
                        raise
            runs = client.list_runs()
            out: dict = {}
            sig = _signature(runs)
            if force or sig != runs_sig:
                choices = views.run_choices(runs)
                ids = [value for _, value in choices]
                reselect = selected not in ids
                if reselect:
                    selected = ids[0] if ids else None
                    detail = (
                        detail_values(client, str(selected), detail_sig, force)
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
                out.update({runs_table: views.run_rows(runs), run_select: select, runs_sig_state: sig})
            if detail:
                out.update(detail)
            if force:
                out[status] = ""
            return out

        runs_outputs = [runs_table, run_select, runs_sig_state, status, *detail_outputs]

        selections = SelectionTracker()

        @guarded(toast=False)
        def on_tick(token, selected, runs_sig, detail_sig, request: gr.Request):
            if not token:
                return {}
            session = getattr(request, "session_hash", None)
            # A tick queued before the user selected another run carries the old selection: it
            # refreshes the list only (no request for the old run's detail) ...
            fresh = not selections.is_stale(session, selected)
            out = refresh_runs(token, selected, runs_sig, detail_sig, force=False, with_detail=fresh)
            if selections.is_stale(session, selected):
                for component in detail_outputs:  # ... and drops a detail read while the selection changed
                    out.pop(component, None)
            return out

        timer.tick(
            on_tick,
            inputs=[token_state, run_select, runs_sig_state, detail_sig_state],
            outputs=runs_outputs,
            show_progress="hidden",
            queue=True,
            trigger_mode="always_last",
        )

        @guarded()
        def on_refresh(token, selected, runs_sig, detail_sig):
            return refresh_runs(token, selected, runs_sig, detail_sig, force=True)

        refresh_runs_btn.click(
            on_refresh,
            inputs=[token_state, run_select, runs_sig_state, detail_sig_state],
            outputs=runs_outputs,
        )

        def on_row_select(evt: gr.SelectData):
            row = evt.row_value if isinstance(evt.row_value, list) else None
            if not row or row[0] in (None, ""):
                return gr.skip()
            return gr.update(value=str(row[0]))

        runs_table.select(on_row_select, inputs=None, outputs=[run_select], show_progress="hidden")

        @guarded()
        def on_select_run(token, run_id, request: gr.Request):
            selections.remember(getattr(request, "session_hash", None), run_id)
            if not run_id:
                return empty_detail()
            return detail_values(client_for(token), str(run_id), None, force=True)

        run_select.change(on_select_run, inputs=[token_state, run_select], outputs=[*detail_outputs, status])

        @guarded()
        def on_cancel(token, run_id):
            if not run_id:
                raise BackendError("Select a run to cancel")
            client = client_for(token)
            client.cancel_run(str(run_id))
            gr.Info(f"Cancellation of run #{run_id} requested")
            out = detail_values(client, str(run_id), None, force=True)
            out[status] = f"■ Cancellation of run #{run_id} requested."
            return out

        cancel_btn.click(on_cancel, inputs=[token_state, run_select], outputs=[*detail_outputs, status])

        @guarded()
        def on_resume(token, run_id):
            if not run_id:
                raise BackendError("Select a run to resume")
            client = client_for(token)
            run = client.get_run(str(run_id))
            if str(run.get("status")) not in views.RESUMABLE:
                raise BackendError(
                    f"Run #{run_id} is {run.get('status')}: only cancelled, lost or failed runs resume"
                )
            client.resume_run(str(run_id))
            gr.Info(f"Run #{run_id} resumes from its last checkpoint")
            out = detail_values(client, str(run_id), None, force=True)
            out[status] = f"▶ Run #{run_id} queued to resume from its last checkpoint."
            return out

        resume_btn.click(on_resume, inputs=[token_state, run_select], outputs=[*detail_outputs, status])

    return demo


def launch(
    demo: gr.Blocks,
    *,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    prevent_thread_lock: bool = False,
    quiet: bool = False,
):
    """Serve ``demo`` (queue on, no share link, no SSR, system fonts)."""
    demo.queue(default_concurrency_limit=4)
    return demo.launch(
        server_name=host,
        server_port=port,
        share=False,
        show_error=False,
        prevent_thread_lock=prevent_thread_lock,
        quiet=quiet,
        ssr_mode=False,
        theme=theme(),
        css=CSS,
        footer_links=[],
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m frontend.app", description="UltraRefiner Studio admin UI"
    )
    parser.add_argument("--host", default=os.environ.get("UI_HOST", DEFAULT_HOST), help="bind address")
    parser.add_argument(
        "--port", type=int, default=int(os.environ.get("UI_PORT", DEFAULT_PORT)), help="port (env UI_PORT)"
    )
    parser.add_argument(
        "--api-url",
        default=os.environ.get("API_URL", DEFAULT_API_URL),
        help="backend URL (env API_URL)",
    )
    args = parser.parse_args(argv)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # httpx logs every request line at INFO; URLs never carry the token, but keep the log quiet.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logger.info("admin UI on http://%s:%d, backend %s", args.host, args.port, args.api_url)
    launch(build_app(args.api_url), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
