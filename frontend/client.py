"""The admin UI's only way to the backend: a small typed HTTP client (httpx).

Every failure — an HTTP error, a refused connection, a timeout, a body that is not JSON — is
turned into a :class:`BackendError` whose ``message`` is a sentence a person can read
(``"data.folds: must be ≥ 2"``, ``"Sign-in failed: wrong token"``,
``"Backend not reachable at http://127.0.0.1:8000"``). The UI shows that message and nothing
else; stack traces never reach the browser.

The admin token is sent as ``Authorization: Bearer <token>`` and is never part of a message,
a ``repr`` or a log line.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
from dataclasses import dataclass, field
from typing import Any

import httpx

__all__ = [
    "BackendClient",
    "BackendError",
    "MaskResult",
    "SegmentResult",
    "format_validation_errors",
    "format_validation_error",
]

JSON = dict[str, Any]

#: Seconds to wait for an ordinary API call (segmentation gets ``segment_timeout``).
DEFAULT_TIMEOUT = 15.0
DEFAULT_SEGMENT_TIMEOUT = 180.0


class BackendError(Exception):
    """A backend call failed; ``message`` is safe and readable, meant for the UI.

    ``status_code`` is the HTTP status (``None`` when no response came back), ``errors`` the
    list of readable field errors of a 422 (empty otherwise).
    """

    def __init__(self, message: str, *, status_code: int | None = None, errors: list[str] | None = None):
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.errors = list(errors or [])

    def __str__(self) -> str:
        return self.message


# --------------------------------------------------------------------------------------------
# Readable pydantic / FastAPI validation errors
# --------------------------------------------------------------------------------------------

#: Location prefixes FastAPI adds that mean nothing to a person filling a form.
_LOC_NOISE = {"body", "query", "path", "header", "cookie", "form", "file"}


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return str(value)


def _field_label(loc: Any) -> str:
    if not isinstance(loc, list | tuple):
        return str(loc) if loc not in (None, "") else ""
    parts = [str(p) for p in loc]
    while parts and parts[0] in _LOC_NOISE:
        parts = parts[1:]
    # pydantic adds the validator's kind to locations inside unions ("int", "function-after[...]").
    parts = [p for p in parts if not (p.endswith("]") and "[" in p) and p not in {"int", "float", "str"}]
    label = ""
    for part in parts:
        if part.isdigit() and label:
            label += f"[{part}]"
        else:
            label = f"{label}.{part}" if label else part
    return label


def _readable_message(error: JSON) -> str:
    kind = str(error.get("type") or "")
    ctx = error.get("ctx") if isinstance(error.get("ctx"), dict) else {}
    msg = str(error.get("msg") or "invalid value")
    simple = {
        "greater_than_equal": ("must be ≥ {}", "ge"),
        "greater_than": ("must be > {}", "gt"),
        "less_than_equal": ("must be ≤ {}", "le"),
        "less_than": ("must be < {}", "lt"),
        "multiple_of": ("must be a multiple of {}", "multiple_of"),
        "string_too_short": ("must have at least {} characters", "min_length"),
        "string_too_long": ("must have at most {} characters", "max_length"),
        "too_short": ("must have at least {} items", "min_length"),
        "too_long": ("must have at most {} items", "max_length"),
    }
    if kind in simple:
        template, key = simple[kind]
        if key in ctx:
            return template.format(_number(ctx[key]))
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        return "is not a known setting"
    if kind in {"literal_error", "enum"} and "expected" in ctx:
        return f"must be one of {ctx['expected']}"
    if kind in {"int_parsing", "int_type", "int_from_float"}:
        return "must be a whole number"
    if kind in {"float_parsing", "float_type"}:
        return "must be a number"
    if kind in {"bool_parsing", "bool_type"}:
        return "must be true or false"
    if kind in {"string_type"}:
        return "must be text"
    if kind in {"list_type", "tuple_type"}:
        return "must be a list"
    if kind == "value_error":
        # "Value error, temperature_min must not exceed temperature_max" → the sentence itself.
        return msg.split(", ", 1)[1] if msg.startswith("Value error, ") else msg
    if kind == "assertion_error":
        return msg.split(", ", 1)[1] if msg.startswith("Assertion failed, ") else msg
    return msg[:1].lower() + msg[1:] if msg else "invalid value"


def format_validation_error(error: JSON) -> str:
    """One pydantic error dict → ``"data.folds: must be ≥ 2"``."""
    label = _field_label(error.get("loc"))
    message = _readable_message(error)
    return f"{label}: {message}" if label else message


def format_validation_errors(detail: Any) -> list[str]:
    """A 422 ``detail`` (list of pydantic errors, a dict or a string) → readable lines."""
    if isinstance(detail, list):
        lines = []
        for item in detail:
            line = format_validation_error(item) if isinstance(item, dict) else str(item)
            if line not in lines:
                lines.append(line)
        return lines
    if isinstance(detail, dict):
        if "loc" in detail or "msg" in detail:
            return [format_validation_error(detail)]
        if isinstance(detail.get("errors"), list):
            return format_validation_errors(detail["errors"])
        if "message" in detail:
            return [str(detail["message"])]
    if detail in (None, ""):
        return []
    return [str(detail)]


def _detail_text(detail: Any) -> str:
    if isinstance(detail, str):
        return detail
    if isinstance(detail, dict) and not ({"loc", "msg", "errors", "message"} & detail.keys()):
        return ""  # a body that is not an error description (e.g. /ready's status)
    lines = format_validation_errors(detail)
    return "; ".join(lines) if lines else ""


# --------------------------------------------------------------------------------------------
# Typed results
# --------------------------------------------------------------------------------------------


@dataclass
class MaskResult:
    """One mask of ``POST /segment``: a boolean H×W array at the original image size."""

    mask: Any  # np.ndarray bool H×W
    png: bytes
    area_px: int | None = None
    area_mm2: float | None = None
    bbox: list[int] | None = None

    @classmethod
    def from_json(cls, data: JSON, name: str) -> MaskResult:
        import numpy as np
        from PIL import Image

        encoded = data.get("mask_png") or ""
        if isinstance(encoded, str) and encoded.startswith("data:"):
            encoded = encoded.split(",", 1)[-1]
        try:
            png = base64.b64decode(encoded, validate=False)
            with Image.open(io.BytesIO(png)) as image:
                mask = np.asarray(image.convert("L")) > 127
        except (binascii.Error, OSError, ValueError) as exc:
            raise BackendError(f"The backend returned an unreadable {name} mask") from exc
        area = data.get("area_px")
        return cls(
            mask=mask,
            png=png,
            area_px=int(area) if area is not None else int(mask.sum()),
            area_mm2=data.get("area_mm2"),
            bbox=data.get("bbox"),
        )


@dataclass
class SegmentResult:
    model_version: str
    width: int
    height: int
    coarse: MaskResult
    refined: MaskResult
    iou_pred: float | None = None
    timings_ms: dict[str, float] = field(default_factory=dict)
    raw: JSON = field(default_factory=dict, repr=False)
    frame: int = 0
    n_frames: int = 1
    pixel_spacing_mm: list[float] | None = None
    embedding_cached: bool = False
    #: The decoded frame as the server saw it (H×W×3 uint8), when asked for (``include_image``).
    image: Any = None

    @property
    def no_lesion(self) -> bool:
        return not self.coarse.mask.any() and not self.refined.mask.any()

    @classmethod
    def from_json(cls, data: JSON) -> SegmentResult:
        for key in ("coarse", "refined"):
            if not isinstance(data.get(key), dict):
                raise BackendError(f"The backend's segmentation answer has no {key} mask")
        return cls(
            model_version=str(data.get("model_version", "?")),
            width=int(data.get("width") or 0),
            height=int(data.get("height") or 0),
            coarse=MaskResult.from_json(data["coarse"], "coarse"),
            refined=MaskResult.from_json(data["refined"], "refined"),
            iou_pred=data.get("iou_pred", data["refined"].get("iou_pred")),
            timings_ms=dict(data.get("timings_ms") or {}),
            raw={k: v for k, v in data.items() if k not in ("coarse", "refined", "image_png")},
            frame=int(data.get("frame") or 0),
            n_frames=int(data.get("n_frames") or 1),
            pixel_spacing_mm=data.get("pixel_spacing_mm"),
            embedding_cached=bool(data.get("embedding_cached")),
            image=_decode_image_png(data.get("image_png")),
        )


def _decode_image_png(encoded: Any):
    if not encoded:
        return None
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(base64.b64decode(encoded, validate=False))) as image:
            return np.asarray(image.convert("RGB"))
    except (binascii.Error, OSError, ValueError) as exc:
        raise BackendError("The backend returned an unreadable image") from exc


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


def _unwrap_list(data: Any, *keys: str) -> list[JSON]:
    """Lists come either bare or wrapped (``{"items": [...]}``/``{"runs": [...]}``)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        for key in (*keys, "items", "data", "results"):
            if isinstance(data.get(key), list):
                return data[key]
    raise BackendError("The backend returned an unexpected answer (expected a list)")


class BackendClient:
    """Typed access to the UltraRefiner backend.

    ``token`` is the admin token (``Authorization: Bearer``); ``api_key`` the optional
    ``X-API-Key`` of ``/segment``. ``transport`` lets tests route requests in-process.
    """

    def __init__(
        self,
        api_url: str,
        token: str | None = None,
        *,
        api_key: str | None = None,
        timeout: float = DEFAULT_TIMEOUT,
        segment_timeout: float = DEFAULT_SEGMENT_TIMEOUT,
        transport: httpx.BaseTransport | None = None,
    ):
        self.api_url = api_url.rstrip("/")
        self._token = token or None
        self._api_key = api_key or None
        self.timeout = timeout
        self.segment_timeout = segment_timeout
        self._transport = transport

    def __repr__(self) -> str:  # never show the token
        return f"BackendClient({self.api_url!r}, signed_in={self._token is not None})"

    def with_token(self, token: str | None) -> BackendClient:
        return BackendClient(
            self.api_url,
            token,
            api_key=self._api_key,
            timeout=self.timeout,
            segment_timeout=self.segment_timeout,
            transport=self._transport,
        )

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self, admin: bool) -> dict[str, str]:
        headers = {"Accept": "application/json"}
        if admin:
            if not self._token:
                raise BackendError("Sign in first: no admin token", status_code=401)
            headers["Authorization"] = f"Bearer {self._token}"
        if self._api_key:
            headers["X-API-Key"] = self._api_key
        return headers

    def _request(
        self,
        method: str,
        path: str,
        *,
        admin: bool = True,
        timeout: float | None = None,
        raw: bool = False,
        **kwargs: Any,
    ) -> Any:
        url = f"{self.api_url}{path}"
        try:
            with httpx.Client(timeout=timeout or self.timeout, transport=self._transport) as http:
                response = http.request(method, url, headers=self._headers(admin), **kwargs)
        except httpx.ConnectError as exc:
            raise BackendError(f"Backend not reachable at {self.api_url}") from exc
        except httpx.TimeoutException as exc:
            raise BackendError(f"The backend at {self.api_url} did not answer in time") from exc
        except httpx.HTTPError as exc:
            raise BackendError(f"Backend not reachable at {self.api_url} ({type(exc).__name__})") from exc
        if response.is_error:
            raise self._error_from(response)
        if raw:
            return response.content
        if response.status_code == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError as exc:
            raise BackendError(
                f"The backend answered {method} {path} with something that is not JSON",
                status_code=response.status_code,
            ) from exc

    @staticmethod
    def _error_from(response: httpx.Response) -> BackendError:
        status = response.status_code
        try:
            body = response.json()
            detail = body.get("detail", body) if isinstance(body, dict) else body
        except ValueError:
            detail = response.text.strip()[:300]
        if status == 401:
            return BackendError("Sign-in failed: wrong token", status_code=status)
        if status == 403:
            text = _detail_text(detail)
            return BackendError(f"Not allowed{': ' + text if text else ''}", status_code=status)
        if status == 422:
            errors = format_validation_errors(detail)
            message = "; ".join(errors) if errors else "The backend rejected the request (422)"
            return BackendError(message, status_code=status, errors=errors)
        text = _detail_text(detail) or response.reason_phrase
        if status == 404:
            return BackendError(f"Not found: {text}", status_code=status)
        if status == 409:
            return BackendError(f"Conflict: {text}", status_code=status)
        if status == 413:
            return BackendError(f"Too large: {text}", status_code=status)
        if status == 503:
            return BackendError(f"The backend is busy or not ready: {text}", status_code=status)
        if status >= 500:
            return BackendError(f"Backend error ({status}): {text}", status_code=status)
        return BackendError(f"{text} ({status})", status_code=status)

    # -- public, unauthenticated -------------------------------------------------------------

    def health(self) -> JSON:
        """``GET /health``."""
        return self._request("GET", "/health", admin=False)

    def ready(self) -> JSON:
        """``GET /ready`` (raises :class:`BackendError` with the reason while not ready)."""
        return self._request("GET", "/ready", admin=False)

    @staticmethod
    def _segment_form(
        points: list[list[float]] | None, box: list[float] | None, frame: int | None
    ) -> dict[str, str]:
        form: dict[str, str] = {}
        if points:
            form["points"] = json.dumps([[float(x), float(y), int(label)] for x, y, label in points])
        if box:
            form["box"] = json.dumps([float(v) for v in box])
        if frame is not None:
            form["frame"] = str(int(frame))
        return form

    def segment(
        self,
        image: bytes,
        filename: str = "image.png",
        *,
        points: list[list[float]] | None = None,
        box: list[float] | None = None,
        frame: int | None = None,
        include_image: bool = False,
    ) -> SegmentResult:
        """``POST /segment`` with one image (PNG/JPEG/…/DICOM) and optional clinician prompts
        (``points`` ``[[x, y, label], …]``, ``box`` ``[x0, y0, x1, y1]``, native pixels); masks come
        back decoded at the original size (and the decoded frame with ``include_image``)."""
        files = {"file": (filename or "image.png", image, "application/octet-stream")}
        params = {"include_image": "true"} if include_image else None
        data = self._request(
            "POST",
            "/segment",
            admin=False,
            files=files,
            data=self._segment_form(points, box, frame),
            params=params,
            timeout=self.segment_timeout,
        )
        if not isinstance(data, dict):
            raise BackendError("The backend returned an unexpected segmentation answer")
        return SegmentResult.from_json(data)

    def segment_dicom_seg(
        self,
        image: bytes,
        filename: str = "image.dcm",
        *,
        points: list[list[float]] | None = None,
        box: list[float] | None = None,
        frame: int | None = None,
    ) -> bytes:
        """``POST /segment?format=dicom-seg``: the DICOM Segmentation (Part 10 bytes) of a DICOM."""
        files = {"file": (filename or "image.dcm", image, "application/dicom")}
        return self._request(
            "POST",
            "/segment",
            admin=False,
            files=files,
            data=self._segment_form(points, box, frame),
            params={"format": "dicom-seg"},
            timeout=self.segment_timeout,
            raw=True,
        )

    # -- admin ------------------------------------------------------------------------------

    def sign_in(self) -> None:
        """Check the token against an admin route; raises ``BackendError`` (401 → wrong token)."""
        self._request("GET", "/api/runs", params={"limit": 1})

    def config_schema(self) -> JSON:
        """``GET /api/config/schema``: the JSON schema of the body of ``POST /api/runs``."""
        data = self._request("GET", "/api/config/schema")
        if not isinstance(data, dict):
            raise BackendError("The backend returned an unexpected configuration schema")
        return data

    def create_run(self, config: JSON) -> JSON:
        """``POST /api/runs``; returns the new run (with its ``id``)."""
        return self._request("POST", "/api/runs", json=config)

    def list_runs(self) -> list[JSON]:
        """``GET /api/runs``, newest first as the backend orders them."""
        return _unwrap_list(self._request("GET", "/api/runs"), "runs")

    def get_run(self, run_id: str | int) -> JSON:
        """``GET /api/runs/{id}``: status, phase, fold, epoch, progress, eta, error…"""
        return self._request("GET", f"/api/runs/{run_id}")

    def run_metrics(self, run_id: str | int) -> JSON:
        """``GET /api/runs/{id}/metrics``: epoch metrics, folds, evaluations."""
        return self._request("GET", f"/api/runs/{run_id}/metrics")

    def cancel_run(self, run_id: str | int) -> JSON:
        """``POST /api/runs/{id}/cancel``."""
        return self._request("POST", f"/api/runs/{run_id}/cancel")

    def resume_run(self, run_id: str | int) -> JSON:
        """``POST /api/runs/{id}/resume`` (a cancelled, lost or failed run, from its last checkpoint)."""
        return self._request("POST", f"/api/runs/{run_id}/resume")

    # -- corrections ----------------------------------------------------------------------

    def save_correction(
        self,
        image: bytes,
        filename: str,
        mask_png: bytes,
        *,
        frame: int | None = None,
        mask_source: str = "corrected",
        model_version: str | None = None,
        prompts: JSON | None = None,
        replace: bool = False,
    ) -> JSON:
        """``POST /api/corrections``: save the image (frame) and its mask as ground truth."""
        files = {
            "file": (filename or "image.png", image, "application/octet-stream"),
            "mask": ("mask.png", mask_png, "image/png"),
        }
        data = {"mask_source": mask_source, "replace": "true" if replace else "false"}
        if frame is not None:
            data["frame"] = str(int(frame))
        if model_version:
            data["model_version"] = model_version
        if prompts:
            data["prompts"] = json.dumps(prompts)
        return self._request("POST", "/api/corrections", files=files, data=data, timeout=self.segment_timeout)

    def list_corrections(self) -> JSON:
        """``GET /api/corrections``: ``items``, ``total`` and the dataset ``folder``."""
        return self._request("GET", "/api/corrections")

    def correction_png(self, correction_id: str | int, part: str) -> bytes:
        """The saved ``image`` or ``mask`` of a correction as PNG bytes."""
        return self._request("GET", f"/api/corrections/{correction_id}/{part}.png", raw=True)

    def delete_correction(self, correction_id: str | int) -> None:
        """``DELETE /api/corrections/{id}``."""
        self._request("DELETE", f"/api/corrections/{correction_id}")

    def list_models_page(self) -> JSON:
        """``GET /api/models`` as sent: ``items``, ``active_id`` and ``serving_id`` (this replica's)."""
        data = self._request("GET", "/api/models")
        return {
            "items": _unwrap_list(data, "models"),
            "active_id": data.get("active_id") if isinstance(data, dict) else None,
            "serving_id": data.get("serving_id") if isinstance(data, dict) else None,
        }

    def list_models(self) -> list[JSON]:
        """``GET /api/models``: the versions only (:meth:`list_models_page` has the ids beside)."""
        return self.list_models_page()["items"]

    def activate_model(self, model_id: str | int) -> JSON:
        """``POST /api/models/{id}/activate``."""
        return self._request("POST", f"/api/models/{model_id}/activate")
