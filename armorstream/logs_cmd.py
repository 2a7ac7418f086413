"""`armorstream logs`: KubeArmor alerts and logs from the SIEM topics, like `karmor logs`.

Each Kafka record on the topics `alerts` and `logs` is one KubeArmor Alert/Log JSON object.
`--json` prints each record as received (one per line); otherwise records print as karmor
prints them: a header line, then `Field: value` for each non-empty field.
Follows new records by default; `--no-follow` prints what the topics hold and exits.
"""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import click
import orjson

from armorstream import upstate
from enforcer.errors import ArmorstreamError

__all__ = ["LogFilter", "format_text", "logs"]

DEFAULT_BROKER = "127.0.0.1:9092"
ALERT_TYPES = frozenset({"MatchedPolicy", "MatchedHostPolicy"})
# The order karmor prints fields in text mode (UpdatedTime goes in the header).
TEXT_FIELDS = (
    "ClusterName", "HostName", "NamespaceName", "PodName", "Labels", "ContainerName", "ContainerID",
    "ContainerImage", "Type", "PolicyName", "Severity", "Message", "Source", "Resource", "Operation",
    "Action", "Data", "Enforcer", "Result", "ATags", "Tags", "HostPID", "HostPPID", "Owner", "PID", "PPID",
    "ParentProcessName", "ProcessName", "UID", "Cwd", "TTY",
)  # fmt: skip


class LogsError(ArmorstreamError):
    pass


@dataclass(frozen=True, slots=True)
class LogFilter:
    """karmor's filters: exact names, substrings of Resource and Source."""

    namespace: str | None = None
    pod: str | None = None
    container: str | None = None
    operation: str | None = None
    resource: str | None = None
    source: str | None = None

    def matches(self, rec: Mapping[str, Any]) -> bool:
        for want, field in (
            (self.namespace, "NamespaceName"),
            (self.pod, "PodName"),
            (self.container, "ContainerName"),
            (self.operation, "Operation"),
        ):
            if want is not None and rec.get(field, "") != want:
                return False
        if self.resource is not None and self.resource not in str(rec.get("Resource", "")):
            return False
        return self.source is None or self.source in str(rec.get("Source", ""))


def format_text(rec: Mapping[str, Any]) -> str:
    kind = "Alert" if rec.get("Type") in ALERT_TYPES else "Log"
    lines = [f"== {kind} / {rec.get('UpdatedTime') or rec.get('Timestamp', '')} =="]
    for name in TEXT_FIELDS:
        v = rec.get(name)
        if v in (None, "", [], {}):
            continue
        if name == "Owner" and isinstance(v, Mapping):
            v = " ".join(f"{k}={v[k]}" for k in ("Ref", "Namespace", "Name") if v.get(k))
        elif isinstance(v, list):
            v = ",".join(map(str, v))
        lines.append(f"{name}: {v}")
    return "\n".join(lines) + "\n"


def topics_for(log_filter: str, alerts_topic: str, logs_topic: str) -> list[str]:
    return {"policy": [alerts_topic], "system": [logs_topic], "all": [alerts_topic, logs_topic]}[log_filter]


@dataclass(slots=True)
class Reader:
    broker: str
    topics: list[str]
    filter: LogFilter
    as_json: bool
    limit: int  # 0: no limit
    follow: bool
    from_beginning: bool
    out: TextIO
    wait_s: float = 10.0  # no-follow: how long to wait for the topics to exist
    printed: int = 0

    def emit(self, value: bytes | None) -> bool:
        """Print one record if it passes the filter; False once the limit is reached."""
        if not value:
            return True
        try:
            rec = orjson.loads(value)
        except orjson.JSONDecodeError:
            return True  # not a KubeArmor record: nothing karmor would print either
        if not isinstance(rec, dict) or not self.filter.matches(rec):
            return True
        self.out.write(value.decode(errors="replace") + "\n" if self.as_json else format_text(rec))
        self.out.flush()
        self.printed += 1
        return not (self.limit and self.printed >= self.limit)

    async def run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.errors import KafkaError

        consumer = AIOKafkaConsumer(
            bootstrap_servers=self.broker,
            group_id=None,  # a viewer: no group, no commits, every partition
            enable_auto_commit=False,
            auto_offset_reset="earliest" if self.from_beginning or not self.follow else "latest",
            metadata_max_age_ms=2000,  # notice topics created after we start
            request_timeout_ms=10_000,
        )
        try:
            await consumer.start()
        except KafkaError as e:
            await consumer.stop()
            raise LogsError(f"cannot reach the broker at {self.broker}: {e}") from None
        try:
            consumer.subscribe(self.topics)
            ends = await self._assigned(consumer)
            click.echo(f"reading {', '.join(self.topics)} from {self.broker}", err=True)
            while True:
                batches = await consumer.getmany(timeout_ms=500, max_records=1000)
                for records in batches.values():
                    for r in records:
                        if not self.emit(r.value):
                            return
                if not self.follow and not batches and await self._at_end(consumer, ends):
                    return
        except KafkaError as e:
            raise LogsError(f"reading from {self.broker} failed: {e}") from None
        finally:
            await consumer.stop()

    async def _assigned(self, consumer: Any) -> dict[Any, int]:
        """Wait until partitions are assigned; in --no-follow mode, the end offsets to stop at."""
        deadline = time.monotonic() + self.wait_s
        while not consumer.assignment():
            if not self.follow and time.monotonic() > deadline:
                return {}
            await asyncio.sleep(0.1)
        # Resolve the start positions now, so "reading ..." means records produced from here on are seen.
        for tp in consumer.assignment():
            await consumer.position(tp)
        if self.follow:
            return {}
        return dict(await consumer.end_offsets(list(consumer.assignment())))

    async def _at_end(self, consumer: Any, ends: dict[Any, int]) -> bool:
        # Positions past the end offsets seen at start, and a poll that came back empty:
        # the second condition covers brokers that report end offsets too low (tansu).
        for tp, end in ends.items():
            pos = await consumer.position(tp)
            if pos < end:
                return False
        return True


def resolve_broker(broker: str | None, data_dir: Path | None) -> tuple[str, str | None, str | None]:
    """--broker/$ARMORSTREAM_BROKER, else the running `armorstream up`, else 127.0.0.1:9092.

    Also returns the up state's topic names, when it gave the broker.
    """
    if broker:
        return broker, None, None
    state = upstate.running_state(upstate.data_dir(data_dir))
    if state is not None and state.broker:
        return state.broker, state.alerts_topic, state.logs_topic
    return DEFAULT_BROKER, None, None


@click.command("logs")
@click.option("--broker", "-b", default=None, envvar="ARMORSTREAM_BROKER",
              help="Kafka bootstrap host:port (default: the running `armorstream up`, else 127.0.0.1:9092).")
@click.option("--logFilter", "log_filter", type=click.Choice(["policy", "system", "all"]), default="policy",
              show_default=True, help="policy: alerts; system: logs; all: both.")
@click.option("--json", "as_json", is_flag=True, help="One JSON record per line, as received.")
@click.option("--namespace", "-n", default=None, help="Only this namespace.")
@click.option("--pod", default=None, help="Only this pod.")
@click.option("--container", default=None, help="Only this container name.")
@click.option("--operation", type=click.Choice(["Process", "File", "Network", "Capabilities", "Syscall"]),
              default=None, help="Only this operation.")
@click.option("--resource", default=None, help="Only records whose Resource contains this.")
@click.option("--source", default=None, help="Only records whose Source contains this.")
@click.option("--limit", type=click.IntRange(0), default=0, help="Stop after this many records (0: none).")
@click.option("--follow/--no-follow", default=True, show_default=True,
              help="Keep printing new records; --no-follow prints what the topics hold and exits.")
@click.option("--from-beginning", is_flag=True, help="When following, start at the oldest record.")
@click.option("--alerts-topic", default=None, help="Alerts topic (default: alerts).")
@click.option("--logs-topic", default=None, help="Logs topic (default: logs).")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data directory of a running `armorstream up` (default: $ARMORSTREAM_DATA or ./data).")
def logs(broker: str | None, log_filter: str, as_json: bool, namespace: str | None, pod: str | None,
         container: str | None, operation: str | None, resource: str | None, source: str | None, limit: int,
         follow: bool, from_beginning: bool, alerts_topic: str | None, logs_topic: str | None,
         data_dir: Path | None) -> None:
    """Print KubeArmor alerts and logs from the SIEM topics (like `karmor logs`)."""
    address, up_alerts, up_logs = resolve_broker(broker, data_dir)
    topics = topics_for(log_filter, alerts_topic or up_alerts or "alerts", logs_topic or up_logs or "logs")
    reader = Reader(
        broker=address, topics=topics, as_json=as_json, limit=limit, follow=follow,
        from_beginning=from_beginning, out=sys.stdout,
        filter=LogFilter(namespace, pod, container, operation, resource, source),
    )  # fmt: skip
    try:
        asyncio.run(reader.run())
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from None
    except KeyboardInterrupt:
        pass
