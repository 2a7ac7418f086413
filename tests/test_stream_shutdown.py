"""A stop signal ends the stream worker even when the broker is gone (a supervisor relies on it)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def test_sigterm_with_broker_gone_exits_within_the_deadline(broker: object, tmp_path: Path) -> None:
    from armorstream.embedded_broker import TansuBroker

    assert isinstance(broker, TansuBroker)
    log = (tmp_path / "stream.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "armorstream.cli", "stream", "--broker", broker.bootstrap,
         "--clickhouse", f"chdb:{tmp_path / 'ch'}", "--shutdown-timeout", "3"],
        stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
    )
    try:
        time.sleep(10)  # past start-up: topics created, consumer in its group
        assert proc.poll() is None, (tmp_path / "stream.log").read_text()
        broker.stop()
        time.sleep(2)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(30)
        took = time.monotonic() - t0
        assert rc != 0 and took < 15, (rc, took)
        assert "shutdown took more than 3s" in (tmp_path / "stream.log").read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
