"""One image of a request, with its prompts and the output asked for, as a :class:`Job`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from backend.app.imaging import sniff_kind
from backend.app.schemas.segment import SegmentResponse
from backend.app.serving.errors import SegmentError
from backend.app.serving.multipart import form_field, frame_field
from backend.app.serving.prompts import ClinicianPrompts, parse_box, parse_points

OutputFormat = Literal["json", "png", "dicom-seg"]
SegmentsChoice = Literal["both", "refined"]


@dataclass
class Job:
    data: bytes
    filename: str | None
    content_type: str | None
    frame: int | None
    prompts: ClinicianPrompts
    output: OutputFormat = "json"
    segments: SegmentsChoice = "both"
    include_image: bool = False


@dataclass
class JobResult:
    response: SegmentResponse
    payload: bytes | None = None  # PNG overlay or DICOM SEG bytes


def single_job(parts, settings, format, segments, frame, points, box, include_image=False) -> Job:
    """The one image of a ``/segment`` request (with its clinician prompts) as a :class:`Job`."""
    files = [p for p in parts if p.name == "file"]
    if not files:
        raise SegmentError(422, "missing multipart part 'file' with the image")
    if len(files) > 1:
        raise SegmentError(422, "send exactly one part 'file' (use /segment/batch for several images)")
    upload = files[0]
    point_prompt = parse_points(form_field(parts, "points") or points, settings.max_points)
    job = Job(
        data=bytes(upload.data),
        filename=upload.filename,
        content_type=upload.content_type,
        frame=frame_field(frame, parts),
        prompts=ClinicianPrompts(
            points=point_prompt[0] if point_prompt else None,
            point_labels=point_prompt[1] if point_prompt else None,
            box=parse_box(form_field(parts, "box") or box),
        ),
        output=format,
        segments=segments,
        include_image=include_image,
    )
    upload.data.clear()
    if format == "dicom-seg" and job.data and sniff_kind(job.data) not in (None, "dicom"):
        raise SegmentError(415, "format=dicom-seg needs a DICOM upload; this file is not DICOM")
    return job


def batch_jobs(parts, settings, frame) -> list[tuple[int, Job]]:
    """The images of a ``/segment/batch`` request as indexed :class:`Job` s."""
    uploads = [p for p in parts if p.name in ("files", "file")]
    if not uploads:
        raise SegmentError(422, "missing multipart parts 'files' with the images")
    if len(uploads) > settings.max_batch_files:
        raise SegmentError(413, f"too many files: {len(uploads)} (at most {settings.max_batch_files})")
    frame_value = frame_field(frame, parts)
    jobs = [
        (
            index,
            Job(
                data=bytes(part.data),
                filename=part.filename,
                content_type=part.content_type,
                frame=frame_value,
                prompts=ClinicianPrompts(),
            ),
        )
        for index, part in enumerate(uploads)
    ]
    for part in uploads:
        part.data.clear()
    return jobs
