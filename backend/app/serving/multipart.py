"""``multipart/form-data`` read from the request stream into memory, with hard size limits.

``Content-Length`` is checked first, then the bytes are counted while streaming: an upload is
never spooled to a temporary file, and nothing about it is logged.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from backend.app.serving.errors import SegmentError

MIB = 1024 * 1024
#: Room for the multipart envelope and the small text fields on top of the file limit.
ENVELOPE_BYTES = 256 * 1024
_MAX_FIELD_BYTES = 64 * 1024
_MAX_PARTS = 256


@dataclass
class Part:
    name: str
    filename: str | None
    content_type: str | None
    data: bytearray = field(default_factory=bytearray)


async def read_multipart(
    request: Request, *, limit_bytes: int, file_limit_bytes: int, file_part: str = "file"
) -> list[Part]:
    """Stream-parse a ``multipart/form-data`` body into memory, enforcing every size limit;
    ``file_part`` is the part the route reads its image from (named in the refusals)."""
    from python_multipart.multipart import MultipartParser, parse_options_header

    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        raise SegmentError(
            415, f"the request body must be multipart/form-data with the image in a part named {file_part!r}"
        )
    encoding = request.headers.get("content-encoding", "identity").strip().lower()
    if encoding not in ("", "identity"):
        # The body is parsed as sent: a compressed one would only fail later as "malformed".
        raise SegmentError(415, "Content-Encoding is not supported: send the multipart body uncompressed")
    boundary = options.get(b"boundary")
    if not boundary or len(boundary) > 200:
        raise SegmentError(400, "the multipart/form-data content type has no valid boundary")
    declared = request.headers.get("content-length")
    if declared is not None:
        try:
            declared_bytes = int(declared)
        except ValueError:
            raise SegmentError(400, "invalid Content-Length header") from None
        if declared_bytes > limit_bytes:
            raise SegmentError(
                413, f"the upload is {declared_bytes} bytes, above the limit of {limit_bytes} bytes"
            )

    parts: list[Part] = []
    header_field = bytearray()
    header_value = bytearray()
    headers: dict[str, bytes] = {}
    current: Part | None = None
    problem: list[SegmentError] = []

    def on_part_begin() -> None:
        headers.clear()

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header_field.extend(data[start:end])

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header_value.extend(data[start:end])

    def on_header_end() -> None:
        headers[bytes(header_field).decode("latin-1").lower()] = bytes(header_value)
        header_field.clear()
        header_value.clear()

    def on_headers_finished() -> None:
        nonlocal current
        disposition, params = parse_options_header(headers.get("content-disposition", b""))
        if disposition != b"form-data" or b"name" not in params:
            problem.append(
                SegmentError(400, "a multipart part lacks a form-data Content-Disposition with a name")
            )
            current = Part(name="", filename=None, content_type=None)
            return
        filename = params.get(b"filename")
        ctype = headers.get("content-type")
        current = Part(
            name=params[b"name"].decode("utf-8", "replace"),
            filename=filename.decode("utf-8", "replace") if filename is not None else None,
            content_type=ctype.decode("latin-1") if ctype else None,
        )
        if len(parts) >= _MAX_PARTS:
            problem.append(SegmentError(413, f"too many multipart parts (more than {_MAX_PARTS})"))
        parts.append(current)

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if current is None:
            return
        current.data.extend(data[start:end])
        is_file = current.filename is not None or current.name in ("file", "files", "mask")
        limit = file_limit_bytes if is_file else _MAX_FIELD_BYTES
        if len(current.data) > limit and not problem:
            what = "file" if is_file else f"form field {current.name!r}"
            problem.append(SegmentError(413, f"the {what} is larger than the limit of {limit} bytes"))

    parser = MultipartParser(
        boundary,
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
        },
        max_header_count=16,
    )
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > limit_bytes:
                raise SegmentError(413, f"the upload is larger than the limit of {limit_bytes} bytes")
            if chunk:
                parser.write(chunk)
            if problem:
                raise problem[0]
        parser.finalize()
    except SegmentError:
        raise
    except Exception as error:  # python-multipart raises its own errors on malformed bodies
        raise SegmentError(400, f"malformed multipart/form-data body ({type(error).__name__})") from None
    if problem:
        raise problem[0]
    if received == 0:
        raise SegmentError(
            400, f"the request body is empty: send the image as multipart/form-data part {file_part!r}"
        )
    return parts


def form_field(parts: list[Part], name: str) -> str | None:
    for part in parts:
        if part.name == name and part.filename is None:
            try:
                return part.data.decode("utf-8")
            except UnicodeDecodeError:
                raise SegmentError(400, f"form field {name!r} is not UTF-8 text") from None
    return None


def frame_field(query_value: int | None, parts: list[Part]) -> int | None:
    form_value = form_field(parts, "frame")
    if form_value is None or form_value.strip() == "":
        return query_value
    try:
        value = int(form_value.strip())
    except ValueError:
        raise SegmentError(422, "frame must be a non-negative integer") from None
    if value < 0:
        raise SegmentError(422, "frame must be a non-negative integer")
    return value


def limit_bytes(megabytes: float) -> int:
    return int(megabytes * MIB)


async def read_parts(request: Request, settings, total_mb: float, file_part: str = "file") -> list[Part]:
    """The multipart parts: at most ``total_mb`` in all, each file at most ``max_upload_mb``."""
    return await read_multipart(
        request,
        limit_bytes=limit_bytes(total_mb) + ENVELOPE_BYTES,
        file_limit_bytes=limit_bytes(settings.max_upload_mb),
        file_part=file_part,
    )
