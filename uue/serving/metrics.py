"""Custom Prometheus metrics of the UUE Serve application (next to Ray Serve's own `ray_serve_*` metrics).

Created inside replicas with `ray.serve.metrics`, which tags every series with the application,
deployment and replica. Ray's metrics agent on each node exposes them for Prometheus at
`http://NODE:METRICS_EXPORT_PORT/metrics` (`ray start --metrics-export-port=8080`; KubeRay: port 8080
of every pod). Names below appear with Ray's `ray_` prefix, e.g. `ray_uue_http_requests_total`.
"""

from __future__ import annotations


class ServingMetrics:
    """Request outcomes, rejected requests by reason, items embedded, tower retries, index swaps and size."""

    def __init__(self) -> None:
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter(
            "uue_http_requests_total", description="UUE HTTP requests by route and status code.",
            tag_keys=("route", "status"),
        )
        self.rejected = Counter(
            "uue_rejected_requests_total", description="UUE requests refused with a 4xx, by reason.",
            tag_keys=("reason",),
        )
        self.embedded = Counter(
            "uue_embedded_total", description="Users and statements embedded by the towers.", tag_keys=("kind",),
        )
        self.latency = Histogram(
            "uue_request_seconds", description="UUE request latency in the ingress, by route.",
            boundaries=[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0], tag_keys=("route",),
        )
        self.tower_retries = Counter(
            "uue_tower_retries_total", description="Tower calls sent again because their replica died.",
            tag_keys=("tower",),
        )
        self.index_swaps = Counter("uue_index_swaps_total", description="Statement index versions swapped in.")
        self.index_size = Gauge("uue_index_statements", description="Statements in the index being served.")

    def record_request(self, route: str, status: int, seconds: float) -> None:
        self.requests.inc(tags={"route": route, "status": str(status)})
        self.latency.observe(seconds, tags={"route": route})

    def record_rejected(self, reason: str) -> None:
        self.rejected.inc(tags={"reason": reason})

    def record_embedded(self, kind: str, count: int) -> None:
        if count:
            self.embedded.inc(count, tags={"kind": kind})

    def record_tower_retry(self, tower: str) -> None:
        self.tower_retries.inc(tags={"tower": tower})

    def record_index(self, size: int, swapped: bool) -> None:
        self.index_size.set(size)
        if swapped:
            self.index_swaps.inc()
