"""The controller's counters as Prometheus metrics (`armorstream controller --metrics-port`),
read at scrape time from the Controller and its ClusterState; also the pod's probe."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from controller.run import Controller
from enforcer.prometheus import ServedCollector

__all__ = ["ControllerMetrics"]

_PREFIX = "armorstream_controller_"


class ControllerMetrics(ServedCollector):
    def __init__(self, ctl: Controller, registry: CollectorRegistry | None = None) -> None:
        self.ctl = ctl
        super().__init__(registry)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        c = self.ctl
        for name, doc, value in (
            ("events_applied", "Lists and watch events folded into the cluster state", c.events_applied),
            ("records_published", "Changed control records and tombstones published", c.records_published),
            ("snapshots_published", "Full snapshots published", c.snapshots_published),
            ("invalid_policies", "Invalid policies reported (not applied)", c.invalid_reported),
        ):
            fam = CounterMetricFamily(_PREFIX + name, doc)
            fam.add_metric([], value)
            yield fam
        ready = GaugeMetricFamily(_PREFIX + "ready", "1 once every resource was listed and the first "
                                  "snapshot went out")
        ready.add_metric([], int(c.first_snapshot_after is not None))
        yield ready
        first = GaugeMetricFamily(_PREFIX + "first_snapshot_seconds", "Seconds from start to first snapshot")
        first.add_metric([], c.first_snapshot_after or 0.0)
        yield first
        records = GaugeMetricFamily(_PREFIX + "records", "Records per control table", labels=["table"])
        for table, n in c.state.sizes().items():
            records.add_metric([table], n)
        yield records
