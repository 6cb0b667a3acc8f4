"""Prometheus metrics on a private registry (one per engine, so tests can run several)."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

logger = logging.getLogger(__name__)


class AggregatorMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.updates_folded = Counter("fedmq_updates_folded_total", "updates folded into the buffer", registry=r)
        self.rejected = Counter("fedmq_rejected_total", "inputs refused, by reason", ["reason"], registry=r)
        self.duplicates_dropped = Counter(
            "fedmq_duplicates_dropped_total", "redelivered chunks already in the WAL, acked and dropped", registry=r
        )
        self.current_version = Gauge("fedmq_current_version", "global model version", registry=r)
        self.buffer_fill = Gauge("fedmq_buffer_fill", "updates folded into the current buffer", registry=r)
        self.fold_seconds = Histogram(
            "fedmq_fold_seconds", "time to deserialize and fold one complete update", registry=r,
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.bytes_in = Counter("fedmq_bytes_in_total", "bytes of update chunks received", registry=r)
        self.bytes_out = Counter("fedmq_bytes_out_total", "bytes published", registry=r)
        self.site_paused = Gauge(
            "fedmq_site_paused", "1 while a site has paused itself (diverged model, lost state); alert on it",
            ["site"], registry=r,
        )
        self.reason_counts: dict[str, int] = {}

    def site_alert(self, site: str, alert: str | None) -> None:
        self.site_paused.labels(site=site).set(1 if alert else 0)

    def reject(self, reason: str) -> bool:
        """Count a refusal; True the first time this reason is seen (log it once)."""
        self.rejected.labels(reason=reason).inc()
        n = self.reason_counts.get(reason, 0)
        self.reason_counts[reason] = n + 1
        return n == 0

    def serve(self, port: int, host: str = "0.0.0.0") -> None:
        if port:
            start_http_server(port, addr=host, registry=self.registry)
            logger.info("metrics on http://%s:%d/metrics", host, port)
