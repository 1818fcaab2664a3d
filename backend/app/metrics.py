"""The Prometheus metric objects of the API (one process-wide registry, served at ``/metrics``);
every module that records a metric imports it from here."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0)

REQUESTS = Counter(
    "ultrarefiner_http_requests_total",
    "HTTP requests by route template, method and status.",
    ["route", "method", "status"],
)
REQUEST_LATENCY = Histogram(
    "ultrarefiner_http_request_duration_seconds",
    "HTTP request latency by route template (including queueing).",
    ["route", "method"],
    buckets=_LATENCY_BUCKETS,
)
STAGE_LATENCY = Histogram(
    "ultrarefiner_segment_stage_seconds",
    "Segmentation latency per stage (decode, preprocess, coarse, encoder, decoder, "
    "encode_response, total, queue).",
    ["stage"],
    buckets=(0.001, 0.005, *_LATENCY_BUCKETS),
)
QUEUE_DEPTH = Gauge("ultrarefiner_segment_queue_depth", "Segmentation requests waiting for a worker slot.")
IN_FLIGHT = Gauge("ultrarefiner_segment_in_flight", "Segmentations being computed.")
REJECTED = Counter(
    "ultrarefiner_segment_rejected_total", "Requests refused with 503 because the queue was full."
)
EMBEDDING_CACHE = Counter(
    "ultrarefiner_embedding_cache_total",
    "Embedding cache lookups by result: hit, miss (the encoder ran) or unused (nothing to refine).",
    ["result"],
)
SEGMENT_ERRORS = Counter(
    "ultrarefiner_segment_errors_total", "Rejected segmentation inputs by status.", ["status"]
)
