"""`armorstream query`: the SOC's reports and plain SQL over the ClickHouse history.

Where the history is, in order: --clickhouse-url / $CLICKHOUSE_URL; the HTTP endpoint of
an `armorstream up` running on the data directory (its state file names it: chdb allows
one process per directory and `up` holds it); else the embedded store in DATA_DIR/clickhouse.
"""

from __future__ import annotations

import csv
import datetime as dt
import functools
import io
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import orjson
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

from armorstream import reports, upstate
from armorstream.upstate import clickhouse_path, running_state
from enforcer.errors import ArmorstreamError
from stream.store.client import Store, StoreConfig, StoreLocked, open_store

__all__ = ["connect", "emit", "query"]


def connect(root: Path, url: str | None) -> Store:
    """Open the history for reading (see the module docstring for the order)."""
    url = url or os.environ.get("CLICKHOUSE_URL") or None
    if url is None:
        state = running_state(root)
        if state is not None and state.clickhouse_url:
            url = state.clickhouse_url
    if url is not None:
        return open_store(StoreConfig(url=url), migrate=False)
    path = clickhouse_path(root)
    try:
        # Migrating a fresh directory gives empty reports rather than "table does not exist".
        return open_store(StoreConfig(path=path))
    except StoreLocked as e:
        raise StoreLocked(
            f"{e}. Query the running endpoint instead: --clickhouse-url http://HOST:PORT/armorstream"
        ) from None


def _cell(v: Any) -> Any:
    """A JSON/CSV-friendly value: times as ISO 8601 (UTC), arrays kept as lists."""
    if isinstance(v, dt.datetime):
        if v.tzinfo is None:
            v = v.replace(tzinfo=dt.UTC)
        return v.astimezone(dt.UTC).isoformat().replace("+00:00", "Z")
    if isinstance(v, dt.date):
        return v.isoformat()
    if isinstance(v, tuple):
        return list(v)
    return v


def _text(v: Any, table: bool = False) -> str:
    if table and isinstance(v, dt.datetime):
        return v.strftime("%Y-%m-%d %H:%M:%S")  # UTC, as stored; the table is for eyes
    v = _cell(v)
    if v is None:
        return ""
    if isinstance(v, list):
        return ",".join(map(str, v))
    return str(v)


def emit(result: reports.Result, fmt: str, title: str | None = None, out: Any = None) -> None:
    """Print rows as a rich table, JSON Lines (one object per row) or CSV with a header."""
    out = out or sys.stdout
    if fmt == "json":
        for row in result.rows:
            out.write(orjson.dumps(dict(zip(result.columns, map(_cell, row), strict=True))).decode() + "\n")
    elif fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(result.columns)
        w.writerows([_text(v) for v in row] for row in result.rows)
        out.write(buf.getvalue())
    else:
        table = Table(title=title, title_justify="left")
        for c in result.columns:
            table.add_column(c, overflow="fold", justify="right" if _numeric(result, c) else "left")
        for row in result.rows:
            table.add_row(*(_text(v, table=True) for v in row))
        console = Console(file=out)
        console.print(table)
        console.print(f"[dim]{len(result.rows)} row(s)[/]")


def _numeric(result: reports.Result, column: str) -> bool:
    i = result.columns.index(column)
    values = [r[i] for r in result.rows if r[i] is not None]
    return bool(values) and all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def _fail(e: ArmorstreamError) -> None:
    raise click.ClickException(str(e)) from None


def _common(fn: Callable[..., None]) -> Callable[..., None]:
    """Options every report takes: where the store is, the window and the output format."""

    @click.option("--since", "since_text", default="24h", show_default=True,
                  help="Window: 30m, 1h, 2d, 1w ... or 'all'.")
    @click.option("--json", "as_json", is_flag=True, help="JSON Lines: one object per row.")
    @click.option("--csv", "as_csv", is_flag=True, help="CSV with a header row.")
    @click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="armorstream data directory (default: $ARMORSTREAM_DATA or ./data).")
    @click.option("--clickhouse-url", default=None, metavar="URL",
                  help="http(s)://user:pass@host:port/db of a ClickHouse server (default: $CLICKHOUSE_URL, "
                       "else the running `armorstream up`, else DATA_DIR/clickhouse).")
    @functools.wraps(fn)
    def wrapper(since_text: str, as_json: bool, as_csv: bool, data_dir: Path | None,
                clickhouse_url: str | None, **kw: Any) -> None:
        if as_json and as_csv:
            raise click.UsageError("choose one of --json and --csv")
        fmt = "json" if as_json else "csv" if as_csv else "table"
        try:
            since = reports.parse_since(since_text)
            with connect(upstate.data_dir(data_dir), clickhouse_url) as store:
                fn(store=store, since=since, fmt=fmt, **kw)
        except ArmorstreamError as e:
            _fail(e)

    return wrapper


_limit = click.option("--limit", type=click.IntRange(1), default=50, show_default=True,
                      help="At most this many rows.")


@click.group("query")
def query() -> None:
    """Reports and SQL over the history: alerts, blocks, timelines, process trees, files, network."""


@query.command("alerts")
@click.option("--by", "by", multiple=True, type=click.Choice(list(reports.GROUPINGS)),
              help="Group by (repeatable; default: namespace, policy, severity).")
@_common
def alerts_cmd(store: Store, since: int | None, fmt: str, by: tuple[str, ...]) -> None:
    """Alert counts by namespace, policy and severity (or --by ...) over the window."""
    by = by or ("namespace", "policy", "severity")
    emit(reports.run(store, reports.alerts_summary(since, by)), fmt, f"alerts by {', '.join(by)}")


@query.command("recent")
@click.option("--namespace", "-n", default=None)
@_limit
@_common
def recent_cmd(store: Store, since: int | None, fmt: str, namespace: str | None, limit: int) -> None:
    """The latest alerts one by one, with the event_id `query tree` takes."""
    emit(reports.run(store, reports.recent_alerts(since, limit, namespace)), fmt, "latest alerts")


@query.command("blocked")
@_limit
@_common
def blocked_cmd(store: Store, since: int | None, fmt: str, limit: int) -> None:
    """The most frequently blocked actions (operation, process, resource, policy)."""
    emit(reports.run(store, reports.top_blocked(since, limit)), fmt, "top blocked actions")


@query.command("timeline")
@click.argument("pod")
@click.option("--namespace", "-n", default=None, help="Namespace (or give POD as NAMESPACE/POD).")
@click.option("--alerts-only", is_flag=True, help="Only the pod's alerts.")
@click.option("--limit", type=click.IntRange(1), default=500, show_default=True)
@_common
def timeline_cmd(store: Store, since: int | None, fmt: str, pod: str, namespace: str | None,
                 alerts_only: bool, limit: int) -> None:
    """What one pod did, oldest first: POD as NAMESPACE/POD or with --namespace."""
    if namespace is None:
        namespace, sep, pod = pod.rpartition("/")
        if not sep:
            raise click.UsageError("give the pod as NAMESPACE/POD or pass --namespace")
    q = reports.pod_timeline(namespace, pod, since, limit, alerts_only)
    emit(reports.run(store, q), fmt, f"timeline of {namespace}/{pod}")


@query.command("tree")
@click.argument("event_id", type=int)
@click.option("--window", "window_text", default="1d", show_default=True,
              help="How far back before each process to look for its parent.")
@_common
def tree_cmd(store: Store, since: int | None, fmt: str, event_id: int, window_text: str) -> None:
    """The process tree behind an alert: the alerting process and its ancestors (HostPPID chain)."""
    window = reports.parse_since(window_text) or 10 * 365 * 86400
    result = reports.process_tree(store, event_id, window)
    if fmt != "table":
        emit(result, fmt)
        return
    root: Tree | None = None
    node: Tree | None = None
    for row in result.dicts():
        when = _text(row["Timestamp"]) or "no event recorded"
        label = (
            f"[bold]{row['ProcessName'] or '?'}[/] pid {row['HostPID']} uid {row['UID']}"
            f" [dim]{row['Source']} · {when} · {row['seen']}[/]"
        )
        node = Tree(label) if node is None else node.add(label)
        root = root or node
    console = Console()
    first = result.dicts()[-1]
    where = f"{first['NamespaceName']}/{first['PodName']}" if first["PodName"] else "host"
    console.print(f"process tree of event {event_id} ({where})")
    if root is not None:
        console.print(root)


@query.command("file")
@click.argument("path")
@_limit
@_common
def file_cmd(store: Store, since: int | None, fmt: str, path: str, limit: int) -> None:
    """Who touched a file: PATH exactly, or a pattern with * (e.g. '/etc/*')."""
    emit(reports.run(store, reports.file_access(path, since, limit)), fmt, f"who touched {path}")


@query.command("network")
@click.option("--namespace", "-n", default=None)
@click.option("--pod", default=None)
@click.option("--owner", default=None, help="Owner (Deployment, DaemonSet, ...) name.")
@click.option("--container", default=None)
@click.option("--host", default=None, help="Host name (host processes and all its containers).")
@_limit
@_common
def network_cmd(store: Store, since: int | None, fmt: str, namespace: str | None, pod: str | None,
                owner: str | None, container: str | None, host: str | None, limit: int) -> None:
    """Network destinations of a workload: remote address, port, protocol, process."""
    wl = reports.Workload(namespace=namespace, pod=pod, owner=owner, container=container, host=host)
    emit(reports.run(store, reports.network_destinations(wl, since, limit)), fmt, "network destinations")


@query.command("sql")
@click.argument("statement")
@_common
def sql_cmd(store: Store, since: int | None, fmt: str, statement: str) -> None:
    """Run one SQL statement (database armorstream: tables events, alerts, rollups).

    {since:UInt64} in the statement is bound to the --since window in seconds.
    """
    params = {"since": since} if since is not None and "{since:" in statement else {}
    emit(reports.run(store, reports.Query(statement, params)), fmt)
