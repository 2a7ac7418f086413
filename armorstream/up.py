"""`armorstream up`: the whole pipeline on one machine, under one supervisor.

Components start in dependency order, each as its own process (asyncio subprocesses):
broker (tansu) -> ClickHouse over HTTP (`armorstream clickhouse serve`) -> stream worker
-> controller (directory mode) -> sensor. Ctrl-C stops them in the reverse order, each
given time to finish (the sensor flushes its rings, the stream drains into ClickHouse)
before the next one stops, so nothing in flight is lost. A component whose command or
prerequisite is missing is skipped with the reason; the others still run.

DATA_DIR/clickhouse keeps the history across restarts, DATA_DIR/policies is the policy
directory the controller watches, DATA_DIR/logs/<component>.log holds each one's output,
DATA_DIR/up.json tells `status`, `query` and `logs` where everything is. The broker keeps
its topics in memory (tansu has no local disk storage engine): the history is ClickHouse.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from armorstream import upstate
from armorstream.cli import COMMANDS
from armorstream.embedded_broker import BrokerError, free_port, tansu_binary
from armorstream.upstate import ComponentState, UpState, clickhouse_path, running_state
from enforcer.errors import ArmorstreamError

__all__ = ["Component", "Supervisor", "component_plan", "up"]

ROOT = Path(__file__).resolve().parent.parent
BTF = Path("/sys/kernel/btf/vmlinux")
ALERTS_TOPIC = "alerts"
LOGS_TOPIC = "logs"
RUN_BEFORE_RESTART_S = 10.0  # a component that dies sooner is failing, not crashing now and then
MAX_RESTARTS = 5


class UpError(ArmorstreamError):
    pass


@dataclass
class Component:
    name: str
    argv: list[str]
    address: str = ""
    missing: str = ""  # why it cannot start here; empty when it can
    ready: Callable[[], Awaitable[bool]] | None = None  # None: ready once alive for a moment
    stop_signal: int = signal.SIGINT
    stop_timeout_s: float = 15.0
    state: ComponentState = field(init=False)
    proc: asyncio.subprocess.Process | None = None

    def __post_init__(self) -> None:
        self.state = ComponentState(self.name, address=self.address,
                                    status="skipped" if self.missing else "pending", detail=self.missing)


def _cli(*args: str) -> list[str]:
    # The same interpreter and package as this process: no PATH surprises under sudo.
    return [sys.executable, "-m", "armorstream.cli", *args]


async def tcp_ready(host: str, port: int) -> bool:
    try:
        _, w = await asyncio.wait_for(asyncio.open_connection(host, port), 1.0)
    except (OSError, TimeoutError):
        return False
    w.close()
    with contextlib.suppress(OSError):
        await w.wait_closed()
    return True


def http_get(url: str, timeout: float = 2.0) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            body: bytes = r.read()
            return body
    except OSError:
        return None


async def http_ready(url: str) -> bool:
    return await asyncio.to_thread(http_get, url, 1.0) is not None


def _command_missing(name: str) -> str:
    return "" if name in COMMANDS else f"`armorstream {name}` is not available in this version"


def sensor_missing() -> str:
    """The sensor's prerequisites, checked before starting it, one clear reason each."""
    if (m := _command_missing("sensor")):
        return m
    if os.geteuid() != 0:
        return "not root: the sensor loads BPF programs (run `sudo armorstream up`)"
    if not BTF.exists():
        return f"no kernel BTF at {BTF}: the sensor needs a kernel built with CONFIG_DEBUG_INFO_BTF"
    built = all((ROOT / "bpf" / ".output" / o).exists() for o in ("process.bpf.o", "file.bpf.o", "net.bpf.o"))
    if not built:
        tools = [t for t in ("make", "clang", "bpftool") if shutil.which(t) is None]
        if tools:
            return f"BPF objects not built and {', '.join(tools)} missing: apt-get install make clang llvm " \
                   "libbpf-dev bpftool"
    return ""


def broker_missing() -> str:
    try:
        tansu_binary()
    except BrokerError as e:
        return str(e)
    return ""


@dataclass(frozen=True)
class Plan:
    data_dir: Path
    broker_port: int
    clickhouse_port: int
    policies: Path
    metrics_port: int
    node_name: str
    with_sensor: bool = True
    stream_history: bool = True
    watch_cgroups: tuple[Path, ...] = ()  # empty: the sensor watches every container it finds
    host_visibility: str = "none"
    stream_metrics_port: int = 0  # 0: the stream serves no /metrics (status then shows no counters)

    @property
    def broker(self) -> str:
        return f"127.0.0.1:{self.broker_port}"

    @property
    def clickhouse_url(self) -> str:
        return f"http://127.0.0.1:{self.clickhouse_port}/armorstream"


def component_plan(p: Plan) -> list[Component]:
    """The components in start order (stop order is the reverse)."""
    tansu = broker_missing()
    listen = f"tcp://127.0.0.1:{p.broker_port}"
    stream_args = ["stream", "--broker", p.broker, "--alerts-topic", ALERTS_TOPIC, "--logs-topic", LOGS_TOPIC]
    if p.stream_history:
        stream_args += ["--clickhouse", p.clickhouse_url]
    stream_metrics = f"http://127.0.0.1:{p.stream_metrics_port}/metrics" if p.stream_metrics_port else ""
    if stream_metrics:
        stream_args += ["--metrics-addr", "127.0.0.1", "--metrics-port", str(p.stream_metrics_port)]
    sensor = sensor_missing() if p.with_sensor else "turned off (--no-sensor)"
    return [
        Component(
            "broker",
            [] if tansu else [str(tansu_binary()), "broker", "--listener-url", listen,
                              "--advertised-listener-url", listen, "--storage-engine", "memory://tansu/"],
            address=p.broker, missing=tansu, stop_signal=signal.SIGTERM, stop_timeout_s=5,
            ready=lambda: tcp_ready("127.0.0.1", p.broker_port),
        ),
        Component(
            "clickhouse",
            _cli("clickhouse", "serve", "--path", str(clickhouse_path(p.data_dir)),
                 "--listen", f"127.0.0.1:{p.clickhouse_port}"),
            address=p.clickhouse_url, missing=_command_missing("clickhouse"),
            ready=lambda: http_ready(f"http://127.0.0.1:{p.clickhouse_port}/ping"),
        ),
        # Stops after the sensor and the controller and before ClickHouse: it drains what the
        # sensor sent last into ClickHouse and the SIEM topics, so it gets the longest grace.
        Component("stream", _cli(*stream_args), address=stream_metrics, missing=_command_missing("stream"),
                  stop_timeout_s=60, ready=(lambda: http_ready(stream_metrics)) if stream_metrics else None),
        Component(
            "controller",
            _cli("controller", "--policies", str(p.policies), "--broker", p.broker,
                 "--node-name", p.node_name, "--one-record-per-batch"),
            missing=_command_missing("controller"),
        ),
        Component(
            "sensor",
            _cli("sensor", "--broker", p.broker, "--node-name", p.node_name,
                 "--spool-dir", str(p.data_dir / "spool"), "--metrics-addr", "127.0.0.1",
                 "--metrics-port", str(p.metrics_port), "--host-visibility", p.host_visibility,
                 *(a for cg in p.watch_cgroups for a in ("--watch-cgroup", str(cg)))),
            address=f"http://127.0.0.1:{p.metrics_port}/metrics", missing=sensor, stop_timeout_s=30,
            ready=lambda: http_ready(f"http://127.0.0.1:{p.metrics_port}/metrics"),
        ),
    ]  # fmt: skip


def _die_with_parent() -> None:
    # If the supervisor is killed outright, its components get SIGTERM instead of lingering.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _log_tail(path: Path, lines: int = 1) -> str:
    try:
        with path.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            text = f.read().decode(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return " | ".join(t.strip() for t in text[-lines:])


class Supervisor:
    def __init__(self, plan: Plan, components: list[Component], on_change: Callable[[], None]) -> None:
        self.plan = plan
        self.components = components
        self.on_change = on_change
        self.logs = plan.data_dir / "logs"
        self.stopping = asyncio.Event()
        self.state = UpState(
            pid=os.getpid(), data_dir=str(plan.data_dir.resolve()), broker=plan.broker,
            clickhouse_url=plan.clickhouse_url, alerts_topic=ALERTS_TOPIC, logs_topic=LOGS_TOPIC,
            components=[c.state for c in components],
        )  # fmt: skip

    def changed(self) -> None:
        self.state.save(self.plan.data_dir)
        self.on_change()

    async def start(self, c: Component, ready_timeout: float = 60.0) -> None:
        if c.missing:
            return
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{c.name}.log"
        with log_path.open("ab") as log:
            log.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} starting: {' '.join(c.argv)}\n".encode())
            log.flush()
            c.proc = await asyncio.create_subprocess_exec(
                *c.argv, stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log, cwd=self.plan.data_dir,
                start_new_session=True,  # Ctrl-C reaches the supervisor only: it stops them in order
                preexec_fn=_die_with_parent,
            )
        c.state.pid, c.state.started_at = c.proc.pid, time.time()
        c.state.status, c.state.detail = "starting", ""
        self.changed()
        deadline = time.monotonic() + ready_timeout
        settle = time.monotonic() + 2.0
        while True:
            if c.proc.returncode is not None:
                break
            if c.ready is not None and await c.ready():
                break
            if c.ready is None and time.monotonic() >= settle:
                break
            if time.monotonic() > deadline:
                c.state.detail = f"not ready after {ready_timeout:.0f}s (see {log_path})"
                break
            await asyncio.sleep(0.2)
        if c.proc.returncode is None:
            c.state.status = "running"
        self.changed()

    async def watch(self, c: Component) -> None:
        """Wait for the component to exit; restart it if it had been running a while."""
        while c.proc is not None and not self.stopping.is_set():
            code = await c.proc.wait()
            if self.stopping.is_set():
                return
            ran = time.time() - c.state.started_at
            tail = _log_tail(self.logs / f"{c.name}.log", 2)
            c.state.status, c.state.pid = "exited", 0
            c.state.detail = f"exit code {code}: {tail}" if tail else f"exit code {code}"
            self.changed()
            if ran < RUN_BEFORE_RESTART_S or c.state.restarts >= MAX_RESTARTS:
                return  # failing at start: restarting would only repeat the message
            c.state.restarts += 1
            await asyncio.sleep(min(30, 2**c.state.restarts))
            if not self.stopping.is_set():
                await self.start(c)

    async def stop(self, c: Component) -> None:
        if c.proc is None or c.proc.returncode is not None:
            if c.state.status in ("running", "starting"):
                c.state.status = "stopped"
            return
        c.state.status = "stopping"
        self.changed()
        with contextlib.suppress(ProcessLookupError):
            c.proc.send_signal(c.stop_signal)
        try:
            await asyncio.wait_for(c.proc.wait(), c.stop_timeout_s)
            c.state.detail = ""
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                c.proc.kill()
            await c.proc.wait()
            c.state.detail = f"killed after {c.stop_timeout_s:.0f}s"
        c.state.status, c.state.pid = "stopped", 0
        self.changed()

    async def run(self) -> None:
        watchers = []
        self.changed()
        try:
            for c in self.components:
                if self.stopping.is_set():
                    break
                await self.start(c)
                watchers.append(asyncio.create_task(self.watch(c)))
            await self.stopping.wait()
        finally:
            self.stopping.set()
            for c in reversed(self.components):
                await self.stop(c)
            for w in watchers:
                w.cancel()
            self.changed()


def status_table(state: UpState, title: str = "armorstream up") -> Table:
    styles = {"running": "green", "starting": "yellow", "stopping": "yellow", "exited": "red",
              "skipped": "dim", "stopped": "dim", "pending": "dim"}  # fmt: skip
    t = Table(title=title, title_justify="left")
    for col in ("component", "status", "pid", "address", "up", "restarts", "detail"):
        t.add_column(col, overflow="fold")
    now = time.time()
    for c in state.components:
        up_s = f"{now - c.started_at:.0f}s" if c.status == "running" and c.started_at else ""
        style = styles.get(c.status, "")
        address = "" if c.status == "skipped" else c.address
        t.add_row(c.name, f"[{style}]{c.status}[/]", str(c.pid or ""), address, up_s,
                  str(c.restarts or ""), c.detail)
    return t


def _port(value: int) -> int:
    return value or free_port()


@click.command("up")
@click.option("--data-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Where the history, policies, spool and logs live (default: $ARMORSTREAM_DATA or ./data).")
@click.option("--policies", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Policy directory the controller watches (default: DATA_DIR/policies).")
@click.option("--broker-port", type=click.IntRange(0, 65535), default=9092, show_default=True,
              help="Kafka port on 127.0.0.1 (0: any free port).")
@click.option("--clickhouse-port", type=click.IntRange(0, 65535), default=8123, show_default=True,
              help="ClickHouse HTTP port on 127.0.0.1 (0: any free port).")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=9464, show_default=True,
              help="Sensor Prometheus port on 127.0.0.1 (0: any free port).")
@click.option("--node-name", default=None, help="This machine's node name (default: the host name).")
@click.option("--sensor/--no-sensor", "with_sensor", default=True, show_default=True,
              help="Run the kernel sensor (needs root and BTF).")
@click.option("--watch-cgroup", "watch_cgroups", multiple=True, type=click.Path(path_type=Path),
              help="Sensor: watch only this cgroup (repeatable; default: every container found).")
@click.option("--host-visibility", default="none", show_default=True,
              help="Sensor: what to report for host processes (process,file,network,capabilities or none).")
@click.option("--stream-history/--no-stream-history", default=True, show_default=True,
              help="The stream writes the history into ClickHouse.")
@click.option("--no-ui", is_flag=True, help="Plain lines instead of the live status view.")
def up(data_dir: Path | None, policies: Path | None, broker_port: int, clickhouse_port: int,
       metrics_port: int, node_name: str | None, with_sensor: bool, watch_cgroups: tuple[Path, ...],
       host_visibility: str, stream_history: bool, no_ui: bool) -> None:
    """Run the whole pipeline on this machine: broker, ClickHouse, stream, controller, sensor.

    Ctrl-C stops everything in reverse order; the history in DATA_DIR survives restarts.
    `armorstream status` shows health and counters; `armorstream logs` and
    `armorstream query` find this instance through DATA_DIR/up.json.
    """
    root = upstate.data_dir(data_dir).resolve()
    other = running_state(root)
    if other is not None:
        raise click.ClickException(f"armorstream up is already running on {root} (pid {other.pid})")
    policy_dir = (policies or root / "policies").resolve()
    for d in (root, policy_dir):
        d.mkdir(parents=True, exist_ok=True)
    plan = Plan(data_dir=root, broker_port=_port(broker_port), clickhouse_port=_port(clickhouse_port),
                policies=policy_dir, metrics_port=_port(metrics_port),
                node_name=node_name or socket.gethostname(), with_sensor=with_sensor,
                stream_history=stream_history, watch_cgroups=watch_cgroups,
                host_visibility=host_visibility, stream_metrics_port=free_port())  # fmt: skip
    for port, what in ((plan.broker_port, "--broker-port"), (plan.clickhouse_port, "--clickhouse-port")):
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                raise click.ClickException(f"127.0.0.1:{port} is in use: choose another {what} (0: any free)")
    components = component_plan(plan)
    console = Console(stderr=True)
    last: dict[str, tuple[str, str]] = {}

    def plain() -> None:
        for c in components:
            now = (c.state.status, c.state.detail)
            if last.get(c.name) != now:
                last[c.name] = now
                extra = f" pid {c.state.pid}" if c.state.pid else ""
                why = f" ({c.state.detail})" if c.state.detail else ""
                console.print(f"{c.name}: {c.state.status}{extra}{why}", highlight=False)

    live: Live | None = None

    def refresh() -> None:
        if live is not None:
            live.update(status_table(sup.state, f"armorstream up: {root} (Ctrl-C stops)"))
        else:
            plain()

    sup = Supervisor(plan, components, refresh)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, sup.stopping.set)
        ticker = asyncio.create_task(_tick(refresh, sup.stopping)) if live is not None else None
        try:
            await sup.run()
        finally:
            if ticker:
                ticker.cancel()

    if not no_ui and console.is_terminal:
        live = Live(status_table(sup.state), console=console, refresh_per_second=2)
    try:
        if live is not None:
            with live:
                asyncio.run(main())
        else:
            asyncio.run(main())
    except ArmorstreamError as e:
        raise click.ClickException(str(e)) from None
    console.print(f"stopped; history kept in {clickhouse_path(root)}", highlight=False)


async def _tick(refresh: Callable[[], None], stopping: asyncio.Event) -> None:
    while not stopping.is_set():
        refresh()  # uptimes move even when nothing changes
        await asyncio.sleep(1)
