"""Where `armorstream up` keeps its data, and the state file that tells other commands about it.

`up` writes DATA_DIR/up.json while it runs: each component's pid, address and status.
`query`, `logs` and `status` read it so they talk to the running broker and to the
ClickHouse HTTP endpoint instead of opening the embedded store (chdb allows one process
per data directory, and `up` holds it).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson

__all__ = [
    "STATE_NAME",
    "ComponentState",
    "UpState",
    "clickhouse_path",
    "data_dir",
    "pid_alive",
    "running_state",
]

STATE_NAME = "up.json"
DEFAULT_DATA_DIR = Path("data")


def data_dir(value: Path | None = None) -> Path:
    """--data-dir, else $ARMORSTREAM_DATA, else ./data."""
    if value is not None:
        return value
    env = os.environ.get("ARMORSTREAM_DATA")
    return Path(env) if env else DEFAULT_DATA_DIR


def clickhouse_path(root: Path) -> Path:
    return root / "clickhouse"


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


@dataclass(slots=True)
class ComponentState:
    name: str
    status: str = "pending"  # pending, starting, running, exited, skipped, stopped
    pid: int = 0
    address: str = ""  # host:port for the broker, a URL for ClickHouse and metrics
    detail: str = ""  # why it was skipped or how it exited
    started_at: float = 0.0
    restarts: int = 0


@dataclass(slots=True)
class UpState:
    pid: int  # the supervisor
    data_dir: str
    broker: str = ""
    clickhouse_url: str = ""  # http://host:port/armorstream while the endpoint runs
    alerts_topic: str = "alerts"
    logs_topic: str = "logs"
    components: list[ComponentState] = field(default_factory=list)

    def save(self, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / (STATE_NAME + ".tmp")
        tmp.write_bytes(orjson.dumps(asdict(self), option=orjson.OPT_INDENT_2))
        tmp.replace(root / STATE_NAME)  # readers never see a half-written file

    @classmethod
    def load(cls, root: Path) -> UpState | None:
        try:
            raw: dict[str, Any] = orjson.loads((root / STATE_NAME).read_bytes())
            comps = [ComponentState(**c) for c in raw.pop("components", [])]
            return cls(components=comps, **raw)
        except (OSError, orjson.JSONDecodeError, TypeError):
            return None

    def component(self, name: str) -> ComponentState | None:
        return next((c for c in self.components if c.name == name), None)


def running_state(root: Path) -> UpState | None:
    """The state of an `up` supervisor that is still alive on this data directory, if any."""
    state = UpState.load(root)
    if state is None or not pid_alive(state.pid):
        return None
    return state


def remove_state(root: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        (root / STATE_NAME).unlink()
