"""The sensor's counters, as Prometheus metrics and as a plain dict for status output.

The hot path increments plain ints (no lock, no label lookup per batch); a custom collector
turns them into metric families only when Prometheus scrapes. Ints written by the event
loop and read by the HTTP thread are consistent under the GIL.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from enforcer.prometheus import ServedCollector

__all__ = ["Counters", "SensorMetrics"]

_PREFIX = "armorstream_sensor_"


@dataclass(slots=True)
class Counters:
    events_seen: int = 0  # records drained from the kernel's ring buffers
    batches_seen: int = 0
    events_shipped: int = 0  # acked by Kafka on the direct path
    batches_shipped: int = 0
    events_spooled: int = 0  # written to the disk spool while the broker was away
    batches_spooled: int = 0
    events_replayed: int = 0  # sent from the spool and acked by Kafka
    batches_replayed: int = 0
    events_dropped_kernel: int = 0  # ring buffer full (LOST records / per-CPU drop map)
    events_dropped_user: int = 0  # spool full or unwritable
    batches_dropped_user: int = 0
    send_failures: int = 0  # sends that failed or timed out (each sends the shipper to the spool)


@dataclass(slots=True)
class _Gauges:
    spool_bytes: Callable[[], int] = lambda: 0
    spool_pending_batches: Callable[[], int] = lambda: 0
    spool_pending_events: Callable[[], int] = lambda: 0
    connected: Callable[[], int] = lambda: 0


# name -> (help, counter fields by label value); events share one family with a `where` label.
_COUNTERS: dict[str, tuple[str, dict[str, str]]] = {
    "events_seen": ("Records drained from the kernel ring buffers", {"": "events_seen"}),
    "batches_seen": ("Batches formed from drained records", {"": "batches_seen"}),
    "events_shipped": ("Records acked by Kafka on the direct path", {"": "events_shipped"}),
    "batches_shipped": ("Batches acked by Kafka on the direct path", {"": "batches_shipped"}),
    "events_spooled": ("Records written to the disk spool", {"": "events_spooled"}),
    "batches_spooled": ("Batches written to the disk spool", {"": "batches_spooled"}),
    "events_replayed": ("Records sent from the spool and acked by Kafka", {"": "events_replayed"}),
    "batches_replayed": ("Batches sent from the spool and acked by Kafka", {"": "batches_replayed"}),
    "events_dropped": (
        "Records lost: where=kernel (ring buffer full), where=user (spool full)",
        {"kernel": "events_dropped_kernel", "user": "events_dropped_user"},
    ),
    "batches_dropped": ("Batches dropped because the spool was full", {"user": "batches_dropped_user"}),
    "send_failures": ("Kafka sends that failed or timed out", {"": "send_failures"}),
}

_GAUGES: dict[str, str] = {
    "spool_bytes": "Bytes of spool segment files on disk",
    "spool_pending_batches": "Batches in the spool not yet acked by Kafka",
    "spool_pending_events": "Records in the spool not yet acked by Kafka",
    "connected": "1 while batches go straight to Kafka, 0 while they go to the spool",
}


class SensorMetrics(ServedCollector):
    """Counters plus gauges read from live objects (the spool, the shipper) at scrape time."""

    def __init__(self, node: str, registry: CollectorRegistry | None = None) -> None:
        self.node = node
        self.counters = Counters()
        self.gauges = _Gauges()
        super().__init__(registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self.counters
        for name, (doc, fields) in _COUNTERS.items():
            labels = ["node"] + (["where"] if "" not in fields else [])
            fam = CounterMetricFamily(_PREFIX + name, doc, labels=labels)
            for where, attr in fields.items():
                fam.add_metric([self.node, where] if where else [self.node], getattr(c, attr))
            yield fam
        for name, doc in _GAUGES.items():
            fam_g = GaugeMetricFamily(_PREFIX + name, doc, labels=["node"])
            fam_g.add_metric([self.node], getattr(self.gauges, name)())
            yield fam_g

    def snapshot(self) -> dict[str, Any]:
        """Every counter and gauge as a plain dict (status output, tests)."""
        out: dict[str, Any] = {"node": self.node, **asdict(self.counters)}
        for name in _GAUGES:
            out[name] = getattr(self.gauges, name)()
        return out
