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
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gradio as gr

from frontend import compare as compare_tab
from frontend import corrections_tab, models_tab, runs_tab, train_tab
from frontend.client import BackendClient, BackendError
from frontend.widgets import warn

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
                            warn(exc.message)
                        return {status: f"⚠ {exc.message}"}
                    except Exception as exc:  # never a stack trace in the browser
                        logger.exception("UI handler %s failed", fn.__name__)
                        message = f"Unexpected error in the UI ({type(exc).__name__}); see the UI's log."
                        if toast:
                            warn(message)
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
                    train_tab.build(
                        client_for,
                        token_state,
                        schema_state,
                        status,
                        guarded,
                        after_launch=lambda client, run_id: {
                            **runs.launched(client, run_id),
                            tabs: gr.Tabs(selected="runs"),
                        },
                        launch_outputs=lambda: [runs.table, runs.sig_state, runs.select, tabs],
                    )

                # ------------------------------------------------------------ runs
                with gr.Tab("Runs", id="runs", elem_id="tab-runs"):
                    runs = runs_tab.build(client_for, token_state, timer, status, guarded)

                # ------------------------------------------------------------ compare
                with gr.Tab("Compare", id="compare", elem_id="tab-compare"):
                    compare = compare_tab.build(client_for, token_state, status, guarded, _export_folder)

                # ------------------------------------------------------------ corrections, models
                corrections = corrections_tab.build(client_for, token_state, status, guarded)
                models = models_tab.build(client_for, token_state, status, guarded)

        # ==================================================================== handlers
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
                runs.sig_state: None,
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
            runs.sig_state,
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
                **runs.signed_out(),
                models.table: [],
                models.select: gr.update(choices=[], value=None),
                corrections.table: [],
                corrections.select: gr.update(choices=[], value=None),
                **compare_tab.signed_out(compare),
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
                runs.table,
                runs.select,
                runs.sig_state,
                *runs.detail_outputs,
                models.table,
                models.select,
                corrections.table,
                corrections.select,
                *compare.reset_outputs(),
            ],
        )

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
