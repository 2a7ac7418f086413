"""The stream worker's counters as Prometheus metrics (`armorstream stream --metrics-port`).

Read at scrape time from the objects that keep them (BatchProcessor, StreamRuntime, the
ClickHouse sink): nothing on the hot path changes. Ints written by the event loop and read
by the HTTP thread are consistent under the GIL. The endpoint doubles as the pod's probe.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from enforcer.prometheus import ServedCollector

__all__ = ["StreamMetrics"]

_PREFIX = "armorstream_stream_"

# processor.counters() key -> (metric, help)
_PROCESSOR: dict[str, tuple[str, str]] = {
    "batches": ("raw_batches", "Raw sensor batches decoded"),
    "events_in": ("events", "Events in the raw batches decoded"),
    "dead_letters": ("dead_letters", "Raw messages sent to the dead-letter topic (malformed)"),
    "lost_in_kernel": ("events_lost_in_kernel", "Events the sensors reported lost (ring buffer full)"),
    "missing_metadata": ("events_metadata_missing", "Events sent without pod metadata after the late wait"),
    "alerts_throttled": ("alerts_throttled", "Alerts dropped by per-container throttling"),
    "verdict_misses": ("verdict_cache_misses", "Distinct events the matcher decided (verdict cache misses)"),
    "redelivered_skipped": ("events_redelivered_skipped",
                            "Events of re-delivered raw batches the store already held (not sent again)"),
}


class StreamMetrics(ServedCollector):
    """Scrapes `runtime` (a stream.agents.StreamRuntime) and its processor and sink."""

    def __init__(self, runtime: Any, registry: CollectorRegistry | None = None) -> None:
        self.runtime = runtime
        super().__init__(registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        rt = self.runtime
        counters = rt.processor.counters()
        for key, (name, doc) in _PROCESSOR.items():
            fam = CounterMetricFamily(_PREFIX + name, doc)
            fam.add_metric([], counters[key])
            yield fam
        sent = CounterMetricFamily(_PREFIX + "records_sent", "Records sent to the SIEM and dead-letter "
                                   "topics", labels=["topic"])
        for kind, n in rt.sent.items():
            sent.add_metric([kind], n)
        yield sent
        fam = CounterMetricFamily(_PREFIX + "records_already_sent", "Alerts/Logs not sent again after a "
                                  "restart: found on the SIEM topics (sent before a crash, not yet stored)")
        fam.add_metric([], rt.already_sent)
        yield fam
        rows = getattr(rt.sink, "rows", None)
        if rows is not None:
            fam = CounterMetricFamily(_PREFIX + "rows_stored", "Rows inserted into ClickHouse")
            fam.add_metric([], rows)
            yield fam
        for name, doc, value in (
            ("late_events", "Events waiting for their pod's metadata", counters["late_waiting"]),
            ("steps_in_flight", "Steps being delivered (SIEM send, ClickHouse insert)", len(rt.deliveries)),
            ("caught_up", "1 once the control topics were read at start", int(rt.caught_up.is_set())),
            ("failed", "1 after a delivery failed (the worker stops; Kafka re-delivers)",
             int(rt.failure is not None)),
        ):
            g = GaugeMetricFamily(_PREFIX + name, doc)
            g.add_metric([], value)
            yield g
