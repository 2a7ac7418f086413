"""`armorstream status`: health and counters of the components `armorstream up` runs.

Reads DATA_DIR/up.json, then checks each component itself: the process is alive, the
broker accepts connections, ClickHouse answers /ping (and how many events and alerts it
holds), the sensor's /metrics answers (events seen, shipped, spooled, dropped).
Exit status: 0 when every started component is healthy, 1 when one is not, 3 when `up`
is not running on the data directory.
"""

from __future__ import annotations

import re
import socket
import sys
import time
import urllib.parse
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table

from armorstream import upstate
from armorstream.up import http_get
from armorstream.upstate import ComponentState, UpState

__all__ = ["Health", "check", "status"]

NOT_RUNNING = 3
_SENSOR_COUNTERS = ("events_seen", "events_shipped", "events_spooled", "events_dropped_kernel",
                    "events_dropped_user")  # fmt: skip
_STREAM_COUNTERS = ("events", "records_sent", "rows_stored", "dead_letters", "late_events")


@dataclass(slots=True)
class Health:
    name: str
    status: str
    healthy: bool
    pid: int = 0
    address: str = ""
    detail: str = ""
    counters: dict[str, Any] = field(default_factory=dict)


def _tcp_ok(address: str) -> bool:
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), 1.0):
            return True
    except (OSError, ValueError):
        return False


def _clickhouse_counters(url: str) -> dict[str, Any] | None:
    parts = urllib.parse.urlsplit(url)
    base = f"{parts.scheme}://{parts.netloc}"
    if http_get(f"{base}/ping") is None:
        return None
    sql = ("SELECT (SELECT count() FROM events), (SELECT count() FROM alerts), "
           "(SELECT toString(max(Timestamp)) FROM events) FORMAT JSONCompact")  # fmt: skip
    query = urllib.parse.urlencode({"database": parts.path.strip("/") or "armorstream", "query": sql})
    body = http_get(f"{base}/?{query}")
    if body is None:
        return {}
    events, alerts, last = orjson.loads(body)["data"][0]
    return {"events": int(events), "alerts": int(alerts), "last_event": last if int(events) else ""}


def _metric_counters(url: str, component: str, keys: tuple[str, ...]) -> dict[str, Any] | None:
    """armorstream_<component>_<key> values from a Prometheus /metrics page, summed over labels."""
    body = http_get(url)
    if body is None:
        return None
    pattern = re.compile(rf"^armorstream_{component}_(\w+?)(?:_total)?(?:\{{[^}}]*\}})? ([0-9.eE+-]+)$", re.M)
    values: dict[str, float] = {}
    for name, value in pattern.findall(body.decode(errors="replace")):
        values[name] = values.get(name, 0.0) + float(value)
    return {k: int(values[k]) for k in keys if k in values}


def check(c: ComponentState) -> Health:
    h = Health(c.name, c.status, healthy=True, pid=c.pid, address=c.address, detail=c.detail)
    if c.status in ("skipped", "stopped", "pending"):
        return h
    if c.status == "exited" or not upstate.pid_alive(c.pid):
        h.status, h.healthy = "exited" if c.status != "exited" else c.status, False
        return h
    if c.status == "running" and c.started_at:
        h.counters["uptime_s"] = int(time.time() - c.started_at)
    probe: dict[str, Any] | None = {}
    if c.name == "broker":
        probe = {} if _tcp_ok(c.address) else None
    elif c.name == "clickhouse":
        probe = _clickhouse_counters(c.address)
    elif c.name == "sensor":
        probe = _metric_counters(c.address, "sensor", _SENSOR_COUNTERS)
    elif c.name == "stream" and c.address:
        probe = _metric_counters(c.address, "stream", _STREAM_COUNTERS)
    if probe is None:
        h.healthy, h.detail = False, f"no answer at {c.address}"
    else:
        h.counters.update(probe)
    return h


@click.command("status")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Data directory of `armorstream up` (default: $ARMORSTREAM_DATA or ./data).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per component.")
def status(data_dir: Path | None, as_json: bool) -> None:
    """Health and counters of each component of a running `armorstream up`."""
    root = upstate.data_dir(data_dir)
    state: UpState | None = upstate.running_state(root)
    if state is None:
        click.echo(f"armorstream up is not running on {root.resolve()} (start it: armorstream up)", err=True)
        sys.exit(NOT_RUNNING)
    health = [check(c) for c in state.components]
    if as_json:
        for h in health:
            click.echo(orjson.dumps(asdict(h)).decode())
    else:
        t = Table(title=f"armorstream up (pid {state.pid}) on {state.data_dir}", title_justify="left")
        for col in ("component", "status", "health", "pid", "address", "counters", "detail"):
            t.add_column(col, overflow="fold")
        for h in health:
            counters = ", ".join(f"{k}={v}" for k, v in h.counters.items())
            mark = "[green]ok[/]" if h.healthy else "[red]unhealthy[/]"
            t.add_row(h.name, h.status, mark if h.status not in ("skipped", "stopped") else "",
                      str(h.pid or ""), h.address, counters, h.detail)
        Console().print(t)
    sys.exit(0 if all(h.healthy for h in health) else 1)
