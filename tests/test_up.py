"""`armorstream up` for real: start it in the background, wait for health, check `status`,
`logs` and `query` through its state file, stop it with SIGINT (reverse order), restart it,
and find the history intact."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiokafka import AIOKafkaProducer
from conftest import need

from armorstream.embedded_broker import BrokerError, tansu_binary
from armorstream.up import sensor_missing
from armorstream.upstate import UpState
from stream.store import Sink, StoreConfig, open_store

pytestmark = [pytest.mark.slow, pytest.mark.broker, pytest.mark.clickhouse]

START_ORDER = ["broker", "clickhouse", "stream", "controller", "sensor"]


def armorstream(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "armorstream.cli", *args], capture_output=True, text=True,
                          timeout=timeout)  # fmt: skip


@pytest.fixture
def quiet_cgroup() -> Iterator[Path | None]:
    """An empty cgroup for the sensor to watch, so the test does not stream the whole machine."""
    if sensor_missing():
        yield None
        return
    from sensor.identity import cgroup2_mount

    path = cgroup2_mount() / f"armorstream-test-up-{os.getpid()}"
    path.mkdir(exist_ok=True)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            path.rmdir()


class Up:
    def __init__(self, data_dir: Path, quiet_cgroup: Path | None) -> None:
        self.data_dir = data_dir
        self.args = ["up", "--no-ui", "--data-dir", str(data_dir), "--broker-port", "0",
                     "--clickhouse-port", "0", "--metrics-port", "0", "--node-name", "test-node"]  # fmt: skip
        self.args += ["--watch-cgroup", str(quiet_cgroup)] if quiet_cgroup else ["--no-sensor"]
        self.proc: subprocess.Popen[str] | None = None

    def start(self, timeout: float = 120) -> UpState:
        self.proc = subprocess.Popen([sys.executable, "-m", "armorstream.cli", *self.args],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.proc.communicate()[0]
            state = UpState.load(self.data_dir)
            if state and state.pid == self.proc.pid and all(
                c.status in ("running", "skipped") for c in state.components
            ):
                return state
            time.sleep(0.3)
        raise AssertionError(f"up not healthy after {timeout}s: {UpState.load(self.data_dir)}")

    def stop(self) -> str:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        out, _ = self.proc.communicate(timeout=150)
        assert self.proc.returncode == 0, out
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


async def produce_alert(bootstrap: str, rec: dict[str, Any]) -> None:
    p = AIOKafkaProducer(bootstrap_servers=bootstrap)
    await p.start()
    try:
        await p.send_and_wait("alerts", orjson.dumps(rec), partition=0)
    finally:
        await p.stop()


def test_up_status_stop_restart(tmp_path: Path, quiet_cgroup: Path | None) -> None:
    try:
        tansu_binary()
    except BrokerError as e:
        need(False, str(e))
    data = tmp_path / "data"
    up = Up(data, quiet_cgroup)
    try:
        state = up.start()
        names = [c.name for c in state.components]
        assert names == START_ORDER
        running = [c.name for c in state.components if c.status == "running"]
        assert {"broker", "clickhouse", "stream", "controller"} <= set(running), state
        if quiet_cgroup is None:
            assert state.component("sensor").detail  # type: ignore[union-attr]  # says why it was skipped

        # status: every started component healthy, ClickHouse, stream and sensor counters present
        st = armorstream("status", "--data-dir", str(data), "--json")
        assert st.returncode == 0, st.stdout + st.stderr
        health = {h["name"]: h for h in map(orjson.loads, st.stdout.splitlines())}
        assert all(health[n]["healthy"] for n in running)
        assert {"events", "alerts"} <= set(health["clickhouse"]["counters"])
        assert {"events", "records_sent", "rows_stored"} <= set(health["stream"]["counters"])
        if "sensor" in running:
            assert "events_seen" in health["sensor"]["counters"]

        # history written through the running endpoint, read back by `query` via the state file
        rows = [{"timestamp_ns": time.time_ns() - i * 10**9, "NamespaceName": "up-test", "PodName": "p",
                 "Type": "MatchedPolicy", "PolicyName": "block-apt", "Severity": "5", "Action": "Block",
                 "Operation": "Process", "node": "up-test-node", "batch_seq": i}
                for i in range(5)]  # fmt: skip
        with open_store(StoreConfig(url=state.clickhouse_url), migrate=False) as store:
            assert Sink(store).insert_rows(rows).rows == 5
        q = armorstream("query", "alerts", "--data-dir", str(data), "--json", "--by", "namespace")
        assert q.returncode == 0, q.stderr
        assert {"NamespaceName": "up-test", "alerts": 5} in [
            {k: r[k] for k in ("NamespaceName", "alerts")} for r in map(orjson.loads, q.stdout.splitlines())
        ]

        # logs finds the broker through the state file
        alert = {"Type": "MatchedPolicy", "PolicyName": "up-test", "NamespaceName": "up-test",
                 "Action": "Block"}
        asyncio.run(produce_alert(state.broker, alert))
        lg = armorstream("logs", "--data-dir", str(data), "--no-follow", "--json", "--namespace", "up-test")
        assert lg.returncode == 0, lg.stderr
        assert [orjson.loads(line) for line in lg.stdout.splitlines()] == [alert]

        again = armorstream("up", "--no-ui", "--data-dir", str(data))
        assert again.returncode == 1 and "already running" in again.stderr

        out = up.stop()
        stopping = [line.split(":")[0] for line in out.splitlines() if line.endswith(("stopping", "stopped"))
                    or ": stopping pid" in line]  # fmt: skip
        order = list(dict.fromkeys(stopping))
        assert order == [n for n in reversed(START_ORDER) if n in running], out
        assert armorstream("status", "--data-dir", str(data)).returncode == 3

        # restart: same data directory, the history is still there
        state = up.start()
        q = armorstream("query", "sql", "SELECT count() AS n FROM alerts WHERE node = 'up-test-node'",
                        "--data-dir", str(data), "--csv")  # fmt: skip
        assert q.stdout == "n\n5\n", q.stderr
        up.stop()
    finally:
        up.kill()
