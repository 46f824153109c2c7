"""The service's own Prometheus metrics: requests per route and status with their durations (ltserve's routes are
answered in front of BentoML's metrics), predictions per shot group, the batch sizes actually run, and requests for
paths no route serves."""

from __future__ import annotations

from typing import Any

_METRICS: dict[str, Any] = {}


def service_metrics() -> dict[str, Any]:
    """This process's Prometheus metrics: predictions per shot group, the batch sizes actually run, and requests for
    unknown paths (one series, whatever the paths: they are answered 404 before BentoML's path-labelled metrics).

    Created on first use inside the worker: prometheus_client must be imported after BentoML has set up its
    multiprocess directory, so that /metrics aggregates them with BentoML's own.
    """
    if not _METRICS:
        import prometheus_client

        _METRICS["predictions"] = prometheus_client.Counter(
            "ltserve_predictions", "Images classified, by the shot group of the predicted class", ["shot_group"])
        _METRICS["unknown"] = prometheus_client.Counter(
            "ltserve_unknown", "Images flagged or rejected as unknown (open-set), by the shot group of their top class",
            ["shot_group"])
        _METRICS["batch_size"] = prometheus_client.Histogram(
            "ltserve_batch_size", "Images per model call (adaptive batching across requests)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 256, 512, 1024))
        _METRICS["requests"] = prometheus_client.Counter(
            "ltserve_requests", "Requests answered by ltserve's routes, by route template and HTTP status",
            ["route", "status"])
        _METRICS["duration"] = prometheus_client.Histogram(
            "ltserve_request_duration_seconds", "Time from the request's headers to its answer, by route template",
            ["route"], buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5, 10, 30))
        _METRICS["unmatched"] = prometheus_client.Counter(
            "ltserve_unmatched_requests", "Requests for a path no route serves (answered 404; paths not recorded)")
    return _METRICS




def record_request(route: str, status: int, seconds: float) -> None:
    """Count one answered request of an ltserve route (label values: route templates and statuses, bounded)."""
    metrics = service_metrics()
    metrics["requests"].labels(route=route, status=str(status)).inc()
    metrics["duration"].labels(route=route).observe(seconds)


def count_unmatched() -> None:
    """Count one request for a path no route serves."""
    service_metrics()["unmatched"].inc()
